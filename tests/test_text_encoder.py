"""Prompt cleaning, tokenization and the UMT5 encoder against the official golden outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import rel_l2

from wan_local.errors import CheckpointError, InputError
from wan_local.models.text_encoder import TextEncoder
from wan_local.prompt import PromptTokenizer, clean_prompt
from wan_local.weights.umt5 import (
    detect_umt5_naming,
    normalize_transformers_umt5,
    official_umt5_to_transformers,
    prepare_umt5_state_dict,
    umt5_config_from_state_dict,
)

PIPELINE_CASES = ["t2v_a14b_unipc", "t2v_a14b_dpmpp", "i2v_a14b_unipc", "ti2v_5b_t2v", "ti2v_5b_i2v"]
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
COMFY_PREFIX = "text_encoders.umt5.transformer."
LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
FFN_LINEARS = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@pytest.fixture(scope="module")
def official_sd(tiny: Path) -> dict[str, torch.Tensor]:
    """The official .pth as stored (bf16), memory-mapped."""
    return torch.load(tiny / "t2v-A14B" / T5_FILE, weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def encoder_fp32(official_sd: dict[str, torch.Tensor]) -> TextEncoder:
    """Encoder with the bf16 file upcast to fp32, as in the fixture run."""
    config, sd = prepare_umt5_state_dict(official_sd, source=T5_FILE)
    return TextEncoder.from_state_dict(config, {k: v.float() for k, v in sd.items()})


def _tokenizer(tiny: Path, case: dict) -> PromptTokenizer:
    return PromptTokenizer.from_dir(tiny / case["args"]["task"] / TOKENIZER_DIR)


# --- tokenization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_golden_token_ids(name: str, tiny: Path, cases: dict, golden) -> None:
    case, g = cases[name], golden(name)
    tok = _tokenizer(tiny, case)
    for text, prefix in ((case["args"]["prompt"], "prompt"), (case["args"]["n_prompt_effective"], "neg")):
        ids, mask = tok([text])
        assert ids.dtype == mask.dtype == torch.int64
        assert torch.equal(ids[0], g[f"{prefix}_ids"]), prefix
        assert torch.equal(mask[0], g[f"{prefix}_mask"]), prefix


def test_clean_prompt() -> None:
    assert clean_prompt("  a \t red\n\n fox   ") == "a red fox"
    assert clean_prompt("Tom &amp; Jerry") == "Tom & Jerry"
    assert clean_prompt("&amp;lt;b&amp;gt; bold") == "<b> bold"  # unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 au lait") == "café au lait"  # ftfy repairs mojibake
    assert clean_prompt("\u3000全角\u3000空格 ") == "全角 空格"  # unicode whitespace collapses too
    assert clean_prompt("Keep CASE, punctuation!") == "Keep CASE, punctuation!"


def test_tokenizer_cleans_inside_call(tiny: Path, cases: dict) -> None:
    tok = _tokenizer(tiny, cases["t2v_a14b_unipc"])
    raw_ids, raw_mask = tok(["  The sun &amp;amp; the   hills.\n"])
    ids, mask = tok(["The sun & the hills."])
    assert torch.equal(raw_ids, ids) and torch.equal(raw_mask, mask)


def test_truncation_keeps_eos(tiny: Path, cases: dict) -> None:
    tok = _tokenizer(tiny, cases["t2v_a14b_unipc"])
    text = "A red fox runs through fresh snow at sunrise. " * 80
    full_ids, full_mask = tok([text], max_length=4096)
    n_full = int(full_mask.sum())
    assert n_full > 600 and full_ids[0, n_full - 1] == 1
    ids, mask = tok([text, "short"])
    assert ids.shape == mask.shape == (2, 512)
    assert int(mask[0].sum()) == 512 and ids[0, 511] == 1
    assert torch.equal(ids[0, :511], full_ids[0, :511])
    assert ids[1, int(mask[1].sum()) - 1] == 1 and (ids[1, int(mask[1].sum()) :] == 0).all()


def test_tokenizer_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="empty_tok"):
        PromptTokenizer.from_dir(tmp_path / "empty_tok")
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_tok.*tokenizer\.json.*spiece\.model"):
        PromptTokenizer.from_dir(tmp_path / "empty_tok")


def test_tokenizer_input_errors(tiny: Path, cases: dict) -> None:
    tok = _tokenizer(tiny, cases["t2v_a14b_unipc"])
    with pytest.raises(InputError):
        tok("not a list")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        tok(["ok"], max_length=1)


def test_sentencepiece_fallback(tiny: Path, tmp_path: Path) -> None:
    import sentencepiece

    spiece = tiny / "t2v-A14B" / TOKENIZER_DIR / "spiece.model"
    shutil.copy(spiece, tmp_path / "spiece.model")
    tok = PromptTokenizer.from_dir(tmp_path)
    text = "A cat wearing  sunglasses &amp; plays a tiny piano."
    expected = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).encode(clean_prompt(text))
    ids, mask = tok([text], max_length=64)
    n = len(expected) + 1
    assert ids[0, : n - 1].tolist() == expected
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()
    assert int(mask.sum()) == n
    ids, mask = tok([text * 20], max_length=16)
    assert int(mask.sum()) == 16 and ids[0, 15] == 1


# --- encoder ------------------------------------------------------------------------------------------------


def test_config_from_official_shapes(official_sd: dict[str, torch.Tensor], cases: dict, tiny: Path) -> None:
    import json

    tiny_config = json.loads((tiny / "golden" / "cases.json").read_text())["tiny_config"]
    t5 = tiny_config["t5"]
    config = umt5_config_from_state_dict(official_sd)
    assert detect_umt5_naming(official_sd) == "official"
    assert config.vocab_size == tiny_config["t5_vocab_size"]
    assert (config.d_model, config.num_heads * config.d_kv, config.d_ff) == (
        t5["dim"],
        t5["dim_attn"],
        t5["dim_ffn"],
    )
    assert (config.num_layers, config.num_heads) == (t5["encoder_layers"], t5["num_heads"])
    assert config.relative_attention_num_buckets == t5["num_buckets"]
    assert config.relative_attention_max_distance == 128 and config.layer_norm_epsilon == 1e-6
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act


def test_meta_build_ties_embedding(encoder_fp32: TextEncoder) -> None:
    umt5 = encoder_fp32.umt5
    assert umt5.shared.weight is umt5.encoder.embed_tokens.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in encoder_fp32.parameters())
    assert not encoder_fp32.training


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_golden_context(name: str, tiny: Path, cases: dict, golden, encoder_fp32: TextEncoder) -> None:
    case, g = cases[name], golden(name)
    tok = _tokenizer(tiny, case)
    texts = [case["args"]["prompt"], case["args"]["n_prompt_effective"]]
    # The reference encodes each prompt alone (batch 1); a batch of two must give the same rows.
    single = [encoder_fp32.encode(*tok([t]))[0] for t in texts]
    batched = encoder_fp32.encode(*tok(texts))
    for outs in (single, batched):
        for out, key in zip(outs, ("context_prompt", "context_neg"), strict=True):
            assert out.dtype == torch.float32
            assert rel_l2(out, g[key]) <= 1e-5, key


# --- ComfyUI / fp8_scaled -----------------------------------------------------------------------------------


def _comfy_fp8_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI-style bundle: prefixed transformers names, fp8 Linear weights with per-layer fp32 scales
    (layer 0 spelled .scale_weight, later layers .weight_scale), a format marker and a foreign model's key."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in official_umt5_to_transformers(official).items():
        tensor = tensor.float()
        layer = key.removesuffix(".weight")
        if layer.endswith(LINEARS + FFN_LINEARS):
            scale = tensor.abs().amax() / FP8_MAX
            spelling = ".scale_weight" if ".block.0." in key else ".weight_scale"
            out[COMFY_PREFIX + key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[COMFY_PREFIX + layer + spelling] = scale.to(torch.float32)
            out[COMFY_PREFIX + layer + ".scale_input"] = torch.tensor(1.0)
        else:
            out[COMFY_PREFIX + key] = tensor
    out[COMFY_PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    out["model.diffusion_model.blocks.0.self_attn.q.weight"] = torch.zeros(4, 4)  # other model in the bundle
    return out


def test_comfy_fp8_scaled_loads(official_sd: dict[str, torch.Tensor], tiny: Path, cases: dict, golden) -> None:
    comfy = _comfy_fp8_dict(official_sd)
    assert detect_umt5_naming(comfy) == "transformers"
    config, sd = prepare_umt5_state_dict(comfy, dtype=torch.float32, source="umt5_fp8_scaled.safetensors")
    reference = {k: v.float() for k, v in official_umt5_to_transformers(official_sd).items()}
    assert sd.keys() == reference.keys()
    n_quantised = 0
    for key, w in reference.items():
        assert sd[key].dtype == torch.float32
        if key.removesuffix(".weight").endswith(LINEARS + FFN_LINEARS):
            n_quantised += 1
            # e4m3: 3 mantissa bits -> relative rounding <= 2^-4; subnormal spacing 2^-9 -> 2^-10 * scale
            scale = w.abs().amax() / FP8_MAX
            assert torch.equal(sd[key], (w / scale).to(torch.float8_e4m3fn).float() * scale), key
            assert ((sd[key] - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale + 1e-7).all(), key
        else:
            assert torch.equal(sd[key], w), key
    assert n_quantised == 7 * config.num_layers

    encoder = TextEncoder.from_state_dict(config, sd)
    case = cases["t2v_a14b_dpmpp"]
    tok = _tokenizer(tiny, case)
    outs = encoder.encode(*tok([case["args"]["prompt"], case["args"]["n_prompt_effective"]]))
    g = golden("t2v_a14b_dpmpp")
    # Stated bound for fp8_scaled vs fp32: 0.15 rel. L2. Each weight carries up to 2^-4 relative rounding, and
    # T5's unscaled attention logits amplify it; measured 0.076-0.109 over the ten golden contexts.
    for out, key in zip(outs, ("context_prompt", "context_neg"), strict=True):
        assert rel_l2(out, g[key]) <= 0.15, key


def test_tied_embedding_alias_only(official_sd: dict[str, torch.Tensor]) -> None:
    sd = official_umt5_to_transformers(official_sd)
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    out = normalize_transformers_umt5(sd)
    assert "encoder.embed_tokens.weight" not in out
    assert out["shared.weight"] is official_sd["token_embedding.weight"]  # renamed, not copied


# --- key errors ---------------------------------------------------------------------------------------------


def test_missing_official_key_is_named(official_sd: dict[str, torch.Tensor]) -> None:
    sd = dict(official_sd)
    del sd["blocks.1.attn.k.weight"]
    with pytest.raises(
        CheckpointError, match=r"models_t5_umt5-xxl-enc-bf16\.pth.*1 missing keys: blocks\.1\.attn\.k\.weight"
    ):
        prepare_umt5_state_dict(sd, source=T5_FILE)


def test_transformers_key_errors_are_named(official_sd: dict[str, torch.Tensor]) -> None:
    sd = official_umt5_to_transformers(official_sd)
    del sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
    sd["encoder.block.0.layer.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        prepare_umt5_state_dict(sd, source="text_encoder/model.safetensors")
    message = str(info.value)
    assert "text_encoder/model.safetensors" in message
    assert "1 missing keys: encoder.block.0.layer.1.DenseReluDense.wo.weight" in message
    assert "1 unexpected keys: encoder.block.0.layer.1.extra.weight" in message


def test_wrong_shape_and_unknown_format(official_sd: dict[str, torch.Tensor]) -> None:
    sd = dict(official_sd)
    sd["blocks.0.norm2.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm2\.weight \(7,\)"):
        prepare_umt5_state_dict(sd, source=T5_FILE)
    with pytest.raises(CheckpointError, match="not a UMT5 text encoder"):
        detect_umt5_naming({"foo.weight": torch.zeros(1)}, source="foo.safetensors")
