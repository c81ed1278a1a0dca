"""WanDiT against golden outputs of the official WanModel, plus equivalences and input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import rel_l2
from safetensors.torch import load_file

from wan_local.errors import InputError
from wan_local.models import dit as dit_module
from wan_local.models.attention import attention
from wan_local.models.dit import DiTConfig, WanDiT, per_token_timesteps

GOLDEN_TOL = 1e-5


def _load_official_dit(folder: Path) -> WanDiT:
    """Build WanDiT from an official DiT folder (config.json + one or sharded safetensors), params fp32."""
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    else:
        sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    sd = {k: v.float() for k, v in sd.items()}  # bf16 files are upcast, as the reference does
    config.setdefault("text_dim", int(sd["text_embedding.0.weight"].shape[1]))
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**config))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("name", ["dit_t2v", "dit_i2v", "dit_ti2v"])
def test_golden_forward(name: str, tiny: Path, cases: dict, golden) -> None:
    g = golden(name)
    model = _load_official_dit(tiny / cases[name]["checkpoint"])
    y = g["y"][None] if "y" in g else None
    with torch.inference_mode():
        out = model(g["x"][None], g["t"], [g["context"]], y=y)
    assert out.dtype == torch.float32
    err = rel_l2(out[0], g["out"])
    print(f"{name}: rel_l2 = {err:.3e}")
    assert err <= GOLDEN_TOL


def test_ti2v_golden_timesteps_from_mask(cases: dict, golden) -> None:
    """The per-token t of dit_ti2v is what per_token_timesteps builds from a frame-0-zero mask."""
    g = golden("dit_ti2v")
    mask = torch.ones_like(g["x"])
    mask[:, 0] = 0
    t = per_token_timesteps(mask, cases["dit_ti2v"]["timestep"], (1, 2, 2))
    assert t.dtype == torch.float32
    assert torch.equal(t, g["t"])


def _tiny(model_type: str = "t2v", **overrides) -> DiTConfig:
    fields = dict(model_type=model_type, in_dim=4, out_dim=4, dim=24, ffn_dim=32, freq_dim=16, num_heads=2)
    fields.update(num_layers=2, text_len=8, text_dim=6)
    fields.update(overrides)
    return DiTConfig(**fields)


def _random_model(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(cfg).eval()


def test_broadcast_time_embedding_equals_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(_tiny())
    x = torch.randn(2, 4, 2, 4, 6)
    context = [torch.randn(5, 6), torch.randn(3, 6)]
    num_tokens = 2 * 2 * 3
    t_sample = torch.tensor([300, 700])
    with torch.inference_mode():
        broadcast = model(x, t_sample, context)
        # Force the per-token gather path even though every token of a sample has the same timestep.
        monkeypatch.setattr(dit_module, "_shared_timestep", lambda t: None)
        per_token = model(x, t_sample[:, None].expand(2, num_tokens), context)
    assert rel_l2(per_token, broadcast) <= 1e-6


def test_per_token_distinct_timesteps_differ_from_broadcast() -> None:
    """Per-token timesteps are really used: frame-0 tokens at t=0 change the output."""
    model = _random_model(_tiny("ti2v"))
    x = torch.randn(1, 4, 2, 4, 6)
    mask = torch.ones(4, 2, 4, 6)
    mask[:, 0] = 0
    t_tok = per_token_timesteps(mask, 500)
    assert t_tok.shape == (1, 12) and t_tok[0, :6].eq(0).all() and t_tok[0, 6:].eq(500).all()
    with torch.inference_mode():
        out_tok = model(x, t_tok, [torch.randn(4, 6)])
        out_all = model(x, torch.tensor([500.0]), [torch.randn(4, 6)])
    assert rel_l2(out_tok, out_all) > 1e-3


def test_rope_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(_tiny())
    x, t, ctx = torch.randn(1, 4, 2, 4, 6), torch.tensor([400]), [torch.randn(3, 6)]
    with torch.inference_mode():
        whole = model(x, t, ctx)
        monkeypatch.setattr(dit_module, "_ROPE_CHUNK_TOKENS", 5)  # 12 tokens -> chunks of 5, 5, 2
        chunked = model(x, t, ctx)
    assert torch.equal(whole, chunked)


def test_rope_table_split_for_head_dim_128() -> None:
    """Real head dim: 64 complex slots split 22/21/21 over (frame, height, width), base 10000, float64."""
    grid = (2, 3, 4)
    table = dit_module.rope_table(grid, 128, "cpu").view(*grid, 64)
    assert table.dtype == torch.complex128
    f, h, w = 1, 2, 3
    angles = torch.angle(table[f, h, w])
    j_t, j_hw = torch.arange(22, dtype=torch.float64), torch.arange(21, dtype=torch.float64)
    expected = torch.cat([f * 10000 ** (-2 * j_t / 44), h * 10000 ** (-2 * j_hw / 42), w * 10000 ** (-2 * j_hw / 42)])
    wrapped = torch.remainder(expected + torch.pi, 2 * torch.pi) - torch.pi
    assert torch.allclose(angles, wrapped, atol=1e-12)
    assert torch.allclose(table.abs(), torch.ones((), dtype=torch.float64), atol=1e-15)


def test_batch_equals_single_runs() -> None:
    model = _random_model(_tiny("i2v", in_dim=7))
    x, y = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    context = [torch.randn(8, 6), torch.randn(2, 6)]  # full length and short
    t = torch.tensor([999, 250])
    with torch.inference_mode():
        batched = model(x, t, context, y=y)
        singles = [model(x[i : i + 1], t[i : i + 1], [context[i]], y=y[i : i + 1]) for i in range(2)]
    assert batched.shape == (2, 4, 3, 4, 4)
    for i in range(2):
        assert rel_l2(batched[i : i + 1], singles[i]) <= 1e-6


def test_padded_context_tensor_equals_list() -> None:
    model = _random_model(_tiny())
    x, t = torch.randn(1, 4, 1, 2, 2), torch.tensor([10])
    ctx = torch.randn(3, 6)
    padded = torch.zeros(1, 8, 6)
    padded[0, :3] = ctx
    with torch.inference_mode():
        assert torch.equal(model(x, t, [ctx]), model(x, t, padded))


def test_meta_construction_and_strict_load() -> None:
    cfg = _tiny()
    sd = _random_model(cfg).state_dict()
    with torch.device("meta"):
        model = WanDiT(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    assert all(b is not None and not b.is_meta for b in model.buffers())
    expected = {
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_embedding.2.weight",
        "time_projection.1.weight",
        "blocks.1.modulation",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.0.norm3.bias",
        "blocks.0.cross_attn.o.weight",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.bias",
        "head.modulation",
        "head.head.weight",
    }
    assert expected <= set(sd)
    assert not any("norm1" in k or "norm2" in k or "head.norm" in k for k in sd)
    with torch.inference_mode():
        model(torch.randn(1, 4, 1, 2, 2), torch.tensor([1]), [torch.randn(2, 6)])


def test_golden_state_dict_keys_match_exactly(tiny: Path) -> None:
    """The other tiny official folders load with strict=True (their key sets equal ours)."""
    for folder in ["t2v-A14B/low_noise_model", "i2v-A14B/high_noise_model", "ti2v-5B"]:
        model = _load_official_dit(tiny / folder)
        assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_type": "s2v"}, "model_type"),
        ({"dim": 25}, "dim"),
        ({"num_heads": 8}, "num_heads"),  # head dim 3: too small for the 3-axis RoPE
        ({"dim": 22, "num_heads": 2}, "num_heads"),  # head dim 11: odd
        ({"freq_dim": 15}, "freq_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"patch_size": (1, 2)}, "patch_size"),
        ({"model_type": "i2v", "in_dim": 4}, "in_dim"),
    ],
)
def test_config_validation(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"DiTConfig\.{field}="):
        _tiny(**overrides)


def test_config_normalises_patch_size_list() -> None:
    assert _tiny(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)


def test_input_errors() -> None:
    t2v = _random_model(_tiny())
    i2v = _random_model(_tiny("i2v", in_dim=7))
    x, t, ctx = torch.randn(1, 4, 1, 2, 2), torch.tensor([5]), [torch.randn(2, 6)]
    y = torch.randn(1, 3, 1, 2, 2)
    with torch.inference_mode():
        with pytest.raises(InputError, match="needs the conditioning tensor y"):
            i2v(x, t, ctx)
        with pytest.raises(InputError, match="takes no conditioning tensor y"):
            t2v(x, t, ctx, y=y)
        with pytest.raises(InputError, match="channels"):
            i2v(x, t, ctx, y=torch.randn(1, 2, 1, 2, 2))
        with pytest.raises(InputError, match="divisible by patch size"):
            t2v(torch.randn(1, 4, 1, 3, 2), t, ctx)
        with pytest.raises(InputError, match="timesteps t have shape"):
            t2v(x, torch.tensor([5, 6]), ctx)
        with pytest.raises(InputError, match="context of shape"):
            t2v(x, t, [torch.randn(9, 6)])  # longer than text_len
        with pytest.raises(InputError, match="context tensor has shape"):
            t2v(x, t, torch.randn(1, 2, 6))


def test_attention_dtypes() -> None:
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    out = attention(q, k, v)
    ref = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k) / 8**0.5, dim=-1)
    assert out.dtype == torch.float32
    assert rel_l2(out, torch.einsum("bnqk,bknd->bqnd", ref, v)) <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, k, v).dtype == torch.float32  # follows q, computed in bf16
        assert attention(q.bfloat16(), k, v).dtype == torch.bfloat16


def test_autocast_bf16_smoke(tiny: Path, cases: dict, golden) -> None:
    """Under bf16 autocast the dtype flow runs, returns fp32 and stays near the fp32 golden output."""
    g = golden("dit_t2v")
    model = _load_official_dit(tiny / cases["dit_t2v"]["checkpoint"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(g["x"][None], g["t"], [g["context"]])
    assert out.dtype == torch.float32
    assert rel_l2(out[0], g["out"]) <= 2e-2  # measured 3.2e-3


def test_per_token_timesteps_errors() -> None:
    with pytest.raises(InputError, match="expected"):
        per_token_timesteps(torch.ones(4, 4), 3)
    with pytest.raises(InputError, match="not divisible"):
        per_token_timesteps(torch.ones(2, 3, 4), 3)


def test_attention_backend_context(monkeypatch):
    """The backend in effect is scoped to its context; SDPA is used on the CPU whatever is asked."""
    from wan_local.models import attention as attn

    q = torch.randn(1, 5, 2, 8)
    expected = attn.attention(q, q, q)
    for name in attn.BACKENDS:
        with attn.use_backend(name):
            assert attn._backend.get() == name
            assert torch.equal(attn.attention(q, q, q), expected)
    assert attn._backend.get() == "auto"
    with pytest.raises(ValueError, match="not one of"), attn.use_backend("xformers"):
        pass
