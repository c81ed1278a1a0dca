"""Loading Wan2.2 checkpoints in the diffusers and ComfyUI formats (fact sheet §3.2, §3.3).

Two kinds of evidence:
- tiny models built with diffusers itself (random weights, `save_pretrained`), loaded through our loaders and run
  next to diffusers' own forward passes: proves our key maps against the real diffusers names;
- diffusers / ComfyUI folders converted from the tiny official fixture, loaded and checked against the golden
  outputs of the official code: proves the whole path (layout detection, renaming, fp8 dequantisation).

The official -> foreign renamings used to build the folders are written here from the fact sheet's tables, not taken
from `wan_local.weights.keymaps`, so the loader's maps are checked against an independent rendition (and the DiT
and UMT5 renditions are themselves checked against diffusers / transformers module names).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from comfy_files import (
    FP8_DIT_LINEAR,
    official_dit_sd,
    umt5_to_transformers,
    write_comfy_dit,
    write_comfy_text_encoder,
    write_comfy_vae,
)
from conftest import rel_l2
from safetensors.torch import load_file, save_file

from wan_local.models.vae21 import WanVAE21
from wan_local.models.vae22 import WanVAE22
from wan_local.specs import get_task
from wan_local.weights.keymaps import vae21_official_to_diffusers_key
from wan_local.weights.layout import HIGH, LOW, find_checkpoints
from wan_local.weights.loading import load_dit, load_text_encoder, load_vae

GOLDEN_TOL = 1e-5
# Our DiT vs diffusers' WanTransformer3DModel, same weights, fp32. Diffusers computes some steps differently
# (fp32 sinusoid, residual casts, fused attention processor); measured rel. L2 ~1.5e-6 (t2v / i2v / ti2v).
DIFFUSERS_DIT_TOL = 1e-5
# VAE vs diffusers' AutoencoderKLWan: the same convolutions, but diffusers' decode order of operations changes
# between releases. Measured encode / decode rel. L2: 0 / 0 with diffusers 0.35, 3.3e-8 / 4.7e-6 (wan2.1) and
# 1.4e-7 / 1.5e-6 (wan2.2) with 0.42.1: float32 rounding through ~20 stacked convolutions. A wrong key or layout
# gives O(1), so 2e-5 (4x the largest measured) holds for any diffusers release the test extra admits.
DIFFUSERS_VAE_TOL = 2e-5
# DiT file with every block Linear weight in float8_e4m3fn (per-layer scale = absmax / 448), other tensors fp16:
# rel. L2 to the golden dit_t2v output measured 1.2e-2 (e4m3 keeps 3 mantissa bits: up to 6 % per weight).
FP8_GOLDEN_TOL = 3e-2
# fp16 file of the fixture's float32 t2v DiT (every weight rounded to 11 significant bits): measured 3.6e-4.
FP16_GOLDEN_TOL = 2e-3

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
BUNDLE_T5_PREFIX = "text_encoders.umt5.transformer."
DIT_STEM = "diffusion_pytorch_model"


# ---------------------------------------------------------------------------------------------------- helpers


# official -> diffusers DiT names, fact sheet §3.2 table (first match wins).
_DIT_TO_DIFFUSERS = [
    (re.compile(p), r)
    for p, r in [
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"^head\.modulation$", "scale_shift_table"),
        (r"^head\.head\.", "proj_out."),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
        (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
        (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
        (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
        (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    ]
]


def _dit_to_diffusers_key(key: str) -> str:
    for pattern, repl in _DIT_TO_DIFFUSERS:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key  # patch_embedding.*


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights: N(0, 0.05) everywhere, norm scales around 1 (keeps q/k and features alive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = ("norm" in name and name.endswith("weight")) or name.endswith("gamma")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """Diffusers-style sharded save: `<stem>-0000i-of-0000N.safetensors` + `<stem>.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dit_inputs(golden) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = golden("dit_t2v")
    return g["x"][None], g["t"], [g["context"]]


def _golden_dit_error(model: torch.nn.Module, golden) -> float:
    x, t, ctx = _dit_inputs(golden)
    with torch.inference_mode():
        out = model(x, t, ctx)
    return rel_l2(out[0], golden("dit_t2v")["out"])


def _golden_vae21_error(vae: WanVAE21, golden) -> float:
    g = golden("vae21_decode")
    return rel_l2(vae.decode(g["latent"][None])[0], g["video"])


def _golden_context_error(encoder, golden) -> float:
    g = golden("t2v_a14b_unipc")
    out = encoder.encode(g["prompt_ids"][None], g["prompt_mask"][None])[0]
    return rel_l2(out, g["context_prompt"])


# ---------------------------------------------------------------------------------------- diffusers: own models

DIT_KINDS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}


@pytest.mark.parametrize("model_type", list(DIT_KINDS))
def test_diffusers_transformer_matches_diffusers_forward(model_type: str, tmp_path: Path) -> None:
    """A diffusers-saved WanTransformer3DModel loads through load_dit and computes what diffusers computes."""
    diffusers = pytest.importorskip("diffusers")
    in_ch, out_ch = DIT_KINDS[model_type]
    ref = diffusers.WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=in_ch,
        out_channels=out_ch,
        text_dim=32,
        freq_dim=256,
        ffn_dim=128,
        num_layers=2,
    ).eval()
    _randomize(ref, seed=0)
    ref.save_pretrained(tmp_path)

    model = load_dit(tmp_path, expected_model_type=model_type)
    assert model.cfg.model_type == model_type
    assert (model.cfg.dim, model.cfg.num_heads, model.cfg.num_layers) == (64, 2, 2)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, out_ch, 3, 4, 6, generator=g)
    y = torch.randn(1, in_ch - out_ch, 3, 4, 6, generator=g) if model_type == "i2v" else None
    context = torch.randn(7, 32, generator=g)
    padded = torch.zeros(1, 512, 32)  # diffusers does not pad the text rows; our DiT pads with zeros to 512
    padded[0, :7] = context
    if model_type == "ti2v":
        t = torch.full((1, 3 * 2 * 3), 500.0)  # per-token timesteps, 0 on the tokens of latent frame 0
        t[:, : 2 * 3] = 0.0
    else:
        t = torch.tensor([750])
    with torch.inference_mode():
        ours = model(x, t, [context], y=y)
        hidden = x if y is None else torch.cat([x, y], dim=1)
        expected = ref(hidden_states=hidden, timestep=t, encoder_hidden_states=padded, return_dict=False)[0]
    assert expected.std() > 1e-2  # not a trivial output
    err = rel_l2(ours, expected)
    print(f"diffusers DiT {model_type}: rel_l2 = {err:.3e}")
    assert err <= DIFFUSERS_DIT_TOL


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_diffusers_vae_matches_diffusers(kind: str, tmp_path: Path) -> None:
    """A diffusers-saved AutoencoderKLWan loads through load_vae; the exact relations tested are

    ours.encode(x) == (D.encode(x).latent_dist.mode() - latents_mean) * (1 / latents_std)
    ours.decode(z) == D.decode(z / (1 / latents_std) + latents_mean).sample      (both clamped to [-1, 1])

    with latents_mean / latents_std from D's config: diffusers' AutoencoderKLWan does not normalise, ours does
    (in the reference's form, fact sheet §5.4; writing z * std instead of z / (1 / std) alone moves the decoded
    video by ~4e-6).
    """
    diffusers = pytest.importorskip("diffusers")
    if kind == "wan2.1":
        ref = diffusers.AutoencoderKLWan(base_dim=4, z_dim=16)  # latents_mean / std: the library's defaults
    else:
        ref = diffusers.AutoencoderKLWan(
            base_dim=4,
            decoder_base_dim=6,
            z_dim=48,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=list(WanVAE22.latent_mean),
            latents_std=list(WanVAE22.latent_std),
        )
    ref.eval()
    _randomize(ref, seed=3)
    ref.save_pretrained(tmp_path)

    vae = load_vae(tmp_path, kind)
    assert isinstance(vae, WanVAE21 if kind == "wan2.1" else WanVAE22)
    s, z_dim = vae.spatial_stride, vae.z_dim
    mean = torch.tensor(ref.config.latents_mean).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, z_dim, 1, 1, 1)

    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 5, 2 * s, 3 * s, generator=g) * 2 - 1
    latent = torch.randn(1, z_dim, 3, 2, 3, generator=g)
    with torch.inference_mode():
        expected_latent = (ref.encode(video).latent_dist.mode() - mean) * (1 / std)
        expected_video = ref.decode(latent / (1 / std) + mean).sample
        ours_latent = vae.encode(video)
        ours_video = vae.decode(latent)
    assert expected_video.std() > 1e-2 and expected_latent.std() > 1e-2
    enc_err, dec_err = rel_l2(ours_latent, expected_latent), rel_l2(ours_video, expected_video)
    print(f"diffusers VAE {kind}: encode rel_l2 = {enc_err:.3e}, decode rel_l2 = {dec_err:.3e}")
    assert enc_err <= DIFFUSERS_VAE_TOL
    assert dec_err <= DIFFUSERS_VAE_TOL


# ------------------------------------------------------------------------------- diffusers: converted fixture


def _diffusers_transformer_config(folder: Path) -> dict:
    """The diffusers config.json an official DiT folder converts to (fact sheet §3.2)."""
    config = json.loads((folder / "config.json").read_text())
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.42.1",
        "added_kv_proj_dim": None,
        "attention_head_dim": config["dim"] // config["num_heads"],
        "cross_attn_norm": True,
        "eps": config["eps"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "image_dim": None,
        "in_channels": config["in_dim"],
        "num_attention_heads": config["num_heads"],
        "num_layers": config["num_layers"],
        "out_channels": config["out_dim"],
        "patch_size": [1, 2, 2],
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        "text_dim": config.get("text_dim", 4096),
    }


def _write_diffusers_transformer(src: Path, dst: Path, shards: int) -> None:
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(_diffusers_transformer_config(src), indent=2))
    sd = {_dit_to_diffusers_key(k): v for k, v in official_dit_sd(src).items()}
    if shards == 1:
        save_file(sd, str(dst / f"{DIT_STEM}.safetensors"))
    else:
        _save_sharded(sd, dst, DIT_STEM, shards)


@pytest.fixture(scope="module")
def diffusers_folder(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Wan2.2-T2V-A14B-Diffusers-style folder converted from the tiny official t2v-A14B fixture."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    src = tiny / "t2v-A14B"
    root = tmp_path_factory.mktemp("diffusers") / "Wan2.2-T2V-A14B-Diffusers"
    root.mkdir()
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": 0.875,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    _write_diffusers_transformer(src / "high_noise_model", root / "transformer", shards=2)  # high noise
    _write_diffusers_transformer(src / "low_noise_model", root / "transformer_2", shards=1)  # low noise

    vae_sd = torch.load(src / "Wan2.1_VAE.pth", map_location="cpu", weights_only=True)
    (root / "vae").mkdir()
    save_file(
        {vae21_official_to_diffusers_key(k): v for k, v in vae_sd.items()},
        str(root / "vae" / f"{DIT_STEM}.safetensors"),
    )
    vae_ref = diffusers.AutoencoderKLWan(base_dim=vae_sd["encoder.conv1.weight"].shape[0], z_dim=16)
    vae_ref.save_config(root / "vae")

    # text_encoder/: a real transformers UMT5EncoderModel save (its strict load also checks the §4.3 map).
    t5_sd = umt5_to_transformers(torch.load(src / T5_FILE, map_location="cpu", weights_only=True))
    layers = 1 + max(int(k.split(".")[2]) for k in t5_sd if k.startswith("encoder.block."))
    buckets, heads = t5_sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner, d_model = t5_sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape
    config = transformers.UMT5Config(
        vocab_size=t5_sd["shared.weight"].shape[0],
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=t5_sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    encoder = transformers.UMT5EncoderModel(config)
    encoder.load_state_dict({**t5_sd, "encoder.embed_tokens.weight": t5_sd["shared.weight"]}, strict=True)
    # bf16 and sharded, as the published repos.
    encoder.to(torch.bfloat16).save_pretrained(root / "text_encoder", max_shard_size="40KB")
    shutil.copytree(src / TOKENIZER_DIR, root / "tokenizer")
    return root


def test_diffusers_folder_keys_are_diffusers_names(diffusers_folder: Path) -> None:
    """The test's own official->diffusers renaming gives exactly the parameter names and shapes of diffusers."""
    diffusers = pytest.importorskip("diffusers")
    for sub, cls in (("transformer", diffusers.WanTransformer3DModel), ("vae", diffusers.AutoencoderKLWan)):
        config = json.loads((diffusers_folder / sub / "config.json").read_text())
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
        files = sorted((diffusers_folder / sub).glob("*.safetensors"))
        stored = {k: tuple(v.shape) for f in files for k, v in load_file(str(f)).items()}
        assert stored == expected, sub


def test_diffusers_folder_layout_and_golden(diffusers_folder: Path, tiny: Path, golden) -> None:
    """find_checkpoints recognises the layout (transformer = high noise, transformer_2 = low noise) and every
    component loads to the official numbers."""
    found = find_checkpoints(diffusers_folder, get_task("t2v-A14B"))
    assert found.format == "diffusers"
    assert found.dit == {HIGH: diffusers_folder / "transformer", LOW: diffusers_folder / "transformer_2"}
    assert found.vae == diffusers_folder / "vae"
    assert found.text_encoder == diffusers_folder / "text_encoder"
    assert found.tokenizer == diffusers_folder / "tokenizer"

    high = load_dit(found.dit[HIGH], expected_model_type="t2v")
    err = _golden_dit_error(high, golden)
    print(f"diffusers folder: dit_t2v rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL

    low = load_dit(found.dit[LOW], expected_model_type="t2v")
    official_low = official_dit_sd(tiny / "t2v-A14B" / "low_noise_model")
    loaded_low = low.state_dict()
    assert loaded_low.keys() == official_low.keys()
    assert all(torch.equal(loaded_low[k], official_low[k].float()) for k in official_low)

    vae = load_vae(found.vae, "wan2.1")
    err = _golden_vae21_error(vae, golden)
    print(f"diffusers folder: vae21_decode rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL

    encoder = load_text_encoder(found.text_encoder, dtype=torch.float32)
    err = _golden_context_error(encoder, golden)
    print(f"diffusers folder: t2v_a14b_unipc context_prompt rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL


# -------------------------------------------------------------------------------------------------- ComfyUI
# The files are written by tests/comfy_files.py, keyed as Comfy-Org's repackaged files (spec §3.3).


@pytest.fixture(scope="module")
def comfy_folder(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI models folder: diffusion_models/ (t2v high + low, and an i2v decoy), vae/ (both VAEs),
    text_encoders/ (carrying its tokenizer); no tokenizer folder, as in a ComfyUI install."""
    root = tmp_path_factory.mktemp("comfyui")
    dm = root / "diffusion_models"
    write_comfy_dit(dm / "wan2.2_t2v_high_noise_14B_fp16.safetensors", tiny / "t2v-A14B" / "high_noise_model")
    write_comfy_dit(dm / "wan2.2_t2v_low_noise_14B_fp16.safetensors", tiny / "t2v-A14B" / "low_noise_model")
    write_comfy_dit(dm / "wan2.2_i2v_high_noise_14B_fp16.safetensors", tiny / "i2v-A14B" / "high_noise_model")
    write_comfy_vae(root / "vae" / "wan_2.1_vae.safetensors", tiny / "t2v-A14B" / "Wan2.1_VAE.pth")
    write_comfy_vae(root / "vae" / "wan2.2_vae.safetensors", tiny / "ti2v-5B" / "Wan2.2_VAE.pth")
    write_comfy_text_encoder(root / "text_encoders" / "umt5_xxl_fp16.safetensors", tiny)
    return root


def test_comfyui_folder_layout(comfy_folder: Path) -> None:
    """find_checkpoints finds the ComfyUI files: experts by file name, the VAE of the task by latent width, the
    tokenizer inside the text encoder (no folder)."""
    found = find_checkpoints(comfy_folder, get_task("t2v-A14B"))
    dm = comfy_folder / "diffusion_models"
    assert found.format == "comfyui"
    assert found.dit == {
        HIGH: dm / "wan2.2_t2v_high_noise_14B_fp16.safetensors",
        LOW: dm / "wan2.2_t2v_low_noise_14B_fp16.safetensors",
    }
    assert found.vae == comfy_folder / "vae" / "wan_2.1_vae.safetensors"
    assert found.text_encoder == comfy_folder / "text_encoders" / "umt5_xxl_fp16.safetensors"
    assert found.tokenizer is None


def test_comfyui_folder_loads_to_golden(comfy_folder: Path, tiny: Path, golden) -> None:
    """fp16 files load to exactly the fp16-rounded weights; the golden outputs are met within that rounding."""
    found = find_checkpoints(comfy_folder, get_task("t2v-A14B"))
    high = load_dit(found.dit[HIGH], expected_model_type="t2v")
    assert high.cfg.num_heads == 2  # from the config in the file's metadata (dim // 128 would be 0)
    err = _golden_dit_error(high, golden)
    print(f"ComfyUI fp16 DiT: dit_t2v rel_l2 = {err:.3e}")
    assert err <= FP16_GOLDEN_TOL

    low = load_dit(found.dit[LOW], expected_model_type="t2v").state_dict()
    official_low = official_dit_sd(tiny / "t2v-A14B" / "low_noise_model")
    assert all(torch.equal(low[k], official_low[k].half().float()) for k in official_low)

    err = _golden_vae21_error(load_vae(found.vae, "wan2.1"), golden)
    print(f"ComfyUI VAE: vae21_decode rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL

    err = _golden_context_error(load_text_encoder(found.text_encoder, dtype=torch.float32), golden)
    print(f"ComfyUI UMT5 fp16: context_prompt rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL  # the bf16 fixture is exact in fp16


def test_comfyui_fp16_dit(tiny: Path, tmp_path: Path, golden) -> None:
    """The i2v expert (stored bf16 in the fixture, so exact in fp16) reproduces dit_i2v."""
    path = tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors"
    written = write_comfy_dit(path, tiny / "i2v-A14B" / "low_noise_model")
    model = load_dit(path, expected_model_type="i2v")
    loaded = model.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], written[k]) for k in written)
    g = golden("dit_i2v")
    with torch.inference_mode():
        out = model(g["x"][None], g["t"], [g["context"]], y=g["y"][None])
    err = rel_l2(out[0], g["out"])
    print(f"ComfyUI fp16 i2v DiT: dit_i2v rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL


def test_comfyui_fp8_scaled_dit(tiny: Path, tmp_path: Path, golden) -> None:
    """fp8_scaled: every block Linear weight is dequantised to float(W_fp8) * scale_weight; the output stays
    within the e4m3 quantisation error of the golden one."""
    path = tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    dequantised = write_comfy_dit(path, tiny / "t2v-A14B" / "high_noise_model", "fp8_scaled")
    model = load_dit(path, expected_model_type="t2v")
    loaded = model.state_dict()
    assert loaded.keys() == dequantised.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], dequantised[k]) for k in dequantised)
    assert sum(bool(FP8_DIT_LINEAR.fullmatch(k)) for k in loaded) == 2 * 10  # 2 layers x (4 + 4 + 2) Linears
    err = _golden_dit_error(model, golden)
    print(f"ComfyUI fp8_scaled DiT: dit_t2v rel_l2 = {err:.3e}")
    assert 0 < err <= FP8_GOLDEN_TOL


def test_comfyui_bundle_text_encoder(tiny: Path, tmp_path: Path, golden) -> None:
    """An all-in-one bundle: the encoder under `text_encoders.umt5.transformer.` next to another model's keys."""
    official = torch.load(tiny / "t2v-A14B" / T5_FILE, map_location="cpu", weights_only=True)
    bundle = {BUNDLE_T5_PREFIX + k: v for k, v in umt5_to_transformers(official).items()}
    bundle["model.diffusion_model.blocks.0.self_attn.q.weight"] = torch.zeros(4, 4)
    save_file(bundle, str(tmp_path / "bundle.safetensors"))
    err = _golden_context_error(load_text_encoder(tmp_path / "bundle.safetensors", dtype=torch.float32), golden)
    print(f"ComfyUI bundle UMT5: context_prompt rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_comfyui_vae_file(prefix: str, tiny: Path, tmp_path: Path, golden) -> None:
    """A VAE single file with official names, bare (as written by the builder) or under a bundle prefix."""
    path = tmp_path / "wan_2.1_vae.safetensors"
    write_comfy_vae(path, tiny / "t2v-A14B" / "Wan2.1_VAE.pth")
    if prefix:
        save_file({prefix + k: v for k, v in load_file(str(path)).items()}, str(path))
    err = _golden_vae21_error(load_vae(path, "wan2.1"), golden)
    assert err <= GOLDEN_TOL
