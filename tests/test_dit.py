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
from wan_local.models import rope as rope_module
from wan_local.models import timesteps as timesteps_module
from wan_local.models.attention import attention
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.models.rope import apply_rope, rope_table
from wan_local.models.timesteps import per_token_timesteps

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
        monkeypatch.setattr(dit_module, "shared_timestep", lambda t: None)
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
        monkeypatch.setattr(rope_module, "ROPE_CHUNK_TOKENS", 5)  # 12 tokens -> chunks of 5, 5, 2
        chunked = model(x, t, ctx)
    assert torch.equal(whole, chunked)


def test_rope_table_split_for_head_dim_128() -> None:
    """Real head dim: 64 complex slots split 22/21/21 over (frame, height, width), base 10000, float64."""
    grid = (2, 3, 4)
    table = rope_table(grid, 128, "cpu").view(*grid, 64)
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


def test_attention_kernel_context():
    """The job's kernel is scoped to its context; CPU tensors run SDPA whatever the kernel (no import tried)."""
    from wan_local.models import attention as attn

    q = torch.randn(1, 5, 2, 8)
    expected = attn.attention(q, q, q)
    for name in attn.ATTENTION_KERNELS:
        with attn.use_kernel(name):
            assert attn._kernel.get() == name
            assert torch.equal(attn.attention(q, q, q), expected)
    assert attn._kernel.get() == "sdpa"
    with pytest.raises(ValueError, match="not one of"), attn.use_kernel("auto"):
        pass


def test_a_kernel_package_that_does_not_import(monkeypatch):
    """Found but broken (a wheel for another torch): "auto" runs SDPA and says why; "flash" is refused."""
    from wan_local.kernels import Choice
    from wan_local.models import attention as attn

    def broken(kernel):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(attn, "kernel_function", broken)
    flash = Choice("flash2", "FlashAttention-2 2.8.3 on sm89, bf16")
    assert attn.load_kernel(Choice("sdpa", "x"), "flash") == Choice("sdpa", "x")
    fallback = attn.load_kernel(flash, "auto")
    assert fallback.kernel == "sdpa" and "flash2 is installed but does not import (undefined symbol" in fallback.reason
    with pytest.raises(InputError, match="--attention flash: flash2 is installed but does not import"):
        attn.load_kernel(flash, "flash")


# ------------------------------------------------------------------------------ memory-lean block: same numerics


def _reference_block_forward(block, x, e0, context, rope, t_index):
    """DiTBlock maths written the straightforward way (the reference's expressions, every temporary kept)."""

    def rms(norm, y):
        yf = y.float()
        return (yf * torch.rsqrt(yf.pow(2).mean(dim=-1, keepdim=True) + norm.eps)).type_as(y) * norm.weight

    def attn(module, xq, source, rope=None):
        n = module.num_heads
        q = rms(module.norm_q, module.q(xq)).unflatten(-1, (n, -1))
        k = rms(module.norm_k, module.k(source)).unflatten(-1, (n, -1))
        v = module.v(source).unflatten(-1, (n, -1))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return module.o(attention(q, k, v).flatten(2))

    m = [u[t_index] for u in (block.modulation[0] + e0).unbind(1)]  # [B, 1 or L, C] each
    a = block.norm1(x).float() * (1 + m[1]) + m[0]
    x = x + attn(block.self_attn, a, a, rope) * m[2]
    x = x + attn(block.cross_attn, block.norm3(x), context)
    b = block.norm2(x).float() * (1 + m[4]) + m[3]
    return x + block.ffn(b) * m[5]


def _reference_head_forward(head, x, e, t_index):
    """Head maths written the straightforward way: shift and scale gathered for every token."""
    with dit_module._fp32_region(x.device.type):
        shift, scale = (m[t_index] for m in (head.modulation[0].float() + e.unsqueeze(1)).unbind(1))
        return dit_module.fp32_linear(head.head, head.norm(x).float() * (1 + scale) + shift)


def _reference_forwards(m: pytest.MonkeyPatch) -> None:
    m.setattr(dit_module.DiTBlock, "forward", _reference_block_forward)
    m.setattr(dit_module.Head, "forward", _reference_head_forward)


def _golden_run(model: WanDiT, g: dict, autocast: bool) -> torch.Tensor:
    y = g["y"][None] if "y" in g else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(g["x"][None], g["t"], [g["context"]], y=y)


@pytest.mark.parametrize("name", ["dit_t2v", "dit_i2v", "dit_ti2v"])
def test_lean_block_and_head_are_bit_identical_to_the_reference_expressions(name, tiny, cases, golden, monkeypatch):
    """Freed temporaries, in-place RoPE / GELU / residual adds / head modulation and the early bf16 casts change no
    bit: fp32, bf16 autocast with fp32 weights and with bf16 weights (the pipeline's regime), batch 1 and 2."""
    g = golden(name)
    model = _load_official_dit(tiny / cases[name]["checkpoint"])
    g2 = dict(g, x=g["x"].flip(-1), context=g["context"][:3])  # a second, different sample
    monkeypatch.setattr(rope_module, "ROPE_CHUNK_TOKENS", 5)  # several RoPE chunks, one partial
    monkeypatch.setattr(timesteps_module, "MOD_CHUNK_TOKENS", 5)  # several per-token modulation chunks
    for weights in (torch.float32, torch.bfloat16):
        model = model.to(weights)
        for autocast in (False, True) if weights == torch.float32 else (True,):
            lean = _golden_run(model, g, autocast)
            with monkeypatch.context() as m:
                _reference_forwards(m)
                reference = _golden_run(model, g, autocast)
            assert torch.equal(lean, reference), (weights, autocast)
    model = model.float()
    x = torch.cat([g["x"][None], g2["x"][None]])
    t = torch.cat([g["t"], g["t"].flip(-1) if g["t"].dim() == 2 else g["t"] // 2])
    y = torch.cat([g["y"][None]] * 2) if "y" in g else None
    with torch.inference_mode():
        lean = model(x, t, [g["context"], g2["context"]], y=y)
        _reference_forwards(monkeypatch)
        assert torch.equal(lean, model(x, t, [g["context"], g2["context"]], y=y))


def test_block_leaves_its_input_alone() -> None:
    """The block's residual adds are in place on its own tensor, never on the caller's x (bf16 or fp32)."""
    cfg = _tiny()
    block = _random_model(cfg).blocks[0]
    rope = rope_table((1, 2, 3), cfg.head_dim, "cpu")
    e0, ctx, t_index = torch.randn(1, 6, cfg.dim), torch.randn(1, cfg.text_len, cfg.dim), torch.zeros(1, 1).long()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 6, cfg.dim).to(dtype)
        before = x.clone()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, e0, ctx, rope, t_index)
        assert torch.equal(x, before) and out.dtype == torch.float32
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------- FFN token chunks

# Chunked FFN matrices multiply fewer rows at a time; the CPU float32 GEMM may then round a row differently
# (measured ≤ 2e-7 relative L2 on the golden cases), so chunks smaller than L are checked against this bound.
FFN_CHUNK_TOL = 1e-6


def _set_chunk(model: WanDiT, chunk: int | None) -> None:
    for block in model.blocks:
        block.ffn_chunk_tokens = chunk


def _chunk_of(model: WanDiT) -> int | None:
    """The FFN chunk every block of `model` runs with (they must agree)."""
    values = {block.ffn_chunk_tokens for block in model.blocks}
    assert len(values) == 1
    return values.pop()


@pytest.mark.parametrize("name", ["dit_t2v", "dit_ti2v"])
def test_ffn_chunking_matches_unchunked(name, tiny, cases, golden, monkeypatch):
    """Chunks dividing L or not, per-token TI2V timesteps split across chunk edges (frame 0 is t = 0)."""
    g = golden(name)
    length = cases[name]["seq_len"]
    model = _load_official_dit(tiny / cases[name]["checkpoint"])
    assert _chunk_of(model) is None
    whole = _golden_run(model, g, autocast=False)
    whole_bf16 = _golden_run(model, g, autocast=True)
    for chunk in (1, 5, 7, length - 1, length, 10**6):
        _set_chunk(model, chunk)
        out = _golden_run(model, g, autocast=False)
        if chunk >= length:  # one chunk: the very same computation
            assert torch.equal(out, whole)
        assert rel_l2(out, whole) <= FFN_CHUNK_TOL, chunk
        assert rel_l2(out[0], g["out"]) <= GOLDEN_TOL
        # bf16 autocast: the same bound on top of bf16 rounding (measured bit-identical here)
        assert rel_l2(_golden_run(model, g, autocast=True), whole_bf16) <= FFN_CHUNK_TOL, chunk
    # Per-token modulation gathered in chunks that straddle the FFN chunks and the t = 0 / t = 500 edge.
    monkeypatch.setattr(timesteps_module, "MOD_CHUNK_TOKENS", 4)
    _set_chunk(model, 5)
    reference = _golden_run(model, g, autocast=False)
    monkeypatch.setattr(timesteps_module, "MOD_CHUNK_TOKENS", 3)
    assert torch.equal(_golden_run(model, g, autocast=False), reference)


def test_ffn_chunk_attribute_keeps_the_state_dict_and_is_validated() -> None:
    cfg = _tiny()
    model = _random_model(cfg)
    keys = set(model.state_dict())
    _set_chunk(model, 3)
    assert set(model.state_dict()) == keys
    x, t, ctx = torch.randn(1, 4, 2, 4, 6), torch.tensor([400]), [torch.randn(3, 6)]
    for bad in (0, -2, 2.5):
        _set_chunk(model, bad)
        with pytest.raises(InputError, match="ffn_chunk_tokens"), torch.inference_mode():
            model(x, t, ctx)


def test_expert_slots_apply_the_plans_ffn_chunk(tiny, cases, golden):
    """ExpertSlots._place sets the plan's FFN chunk on every block and resets it without one; output unchanged."""
    from types import SimpleNamespace

    from wan_local.memory.experts import ExpertSlots
    from wan_local.memory.options import MemoryOptions
    from wan_local.weights.layout import HIGH

    g = golden("dit_t2v")
    slots = ExpertSlots(
        {HIGH: tiny / cases["dit_t2v"]["checkpoint"]}, "t2v", torch.device("cpu"), torch.float32, MemoryOptions()
    )
    slots.configure(None, keep_idle=False)
    plain = slots(HIGH)
    assert _chunk_of(plain) is None
    whole = _golden_run(plain, g, autocast=False)
    slots.park()

    slots.configure(SimpleNamespace(streamed_blocks=(), ffn_chunk_tokens=5), keep_idle=True)
    chunked = slots(HIGH)
    assert _chunk_of(chunked) == 5
    out = _golden_run(chunked, g, autocast=False)
    assert rel_l2(out, whole) <= FFN_CHUNK_TOL and rel_l2(out[0], g["out"]) <= GOLDEN_TOL
    slots.park()  # kept idle with its chunk set

    slots.configure(SimpleNamespace(streamed_blocks=(), ffn_chunk_tokens=None), keep_idle=True)
    again = slots(HIGH)
    assert again is chunked and _chunk_of(again) is None  # the idle expert is reset
    assert torch.equal(_golden_run(again, g, autocast=False), whole)
    slots.release()


def test_forward_refuses_autograd() -> None:
    """The DiT is inference-only: where autograd would record (grad mode on and a parameter or an input needing
    grad) it raises a clear error instead of writing in place into tensors backward would need."""
    model = _random_model(_tiny("ti2v"))  # fresh parameters require grad
    x, ctx = torch.randn(1, 4, 2, 4, 6), [torch.randn(5, 6)]
    t = per_token_timesteps(torch.ones(2, 4, 6).index_fill_(0, torch.tensor([0]), 0), 300)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x, t, ctx)
    with torch.no_grad():
        expected = model(x, t, ctx)
    model.requires_grad_(False)
    assert torch.equal(model(x, t, ctx), expected)  # grad mode on, nothing to record: the one forward
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x.clone().requires_grad_(), t, ctx)
