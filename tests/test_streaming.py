"""BlockStreamer: streamed == resident bit for bit, exact uninstall, host RAM, quantized blocks, errors, CUDA."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, rel_l2
from torch import nn

from wan_local.errors import InputError
from wan_local.memory.pinned import ALIGN_BYTES
from wan_local.memory.streaming import BlockStreamer, block_nbytes, move_unstreamed
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.loading import load_dit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------------ fixtures


def _golden_model(tiny: Path, cases: dict) -> WanDiT:
    return load_dit(tiny / cases["dit_t2v"]["checkpoint"]).eval()


def _run(model: nn.Module, g: dict, device: str = "cpu") -> torch.Tensor:
    with torch.inference_mode():
        return model(g["x"][None].to(device), g["t"].to(device), [g["context"].to(device)])


def _snapshot(model: nn.Module) -> dict[str, tuple[int, torch.device, torch.dtype, torch.Tensor]]:
    return {n: (id(t), t.device, t.dtype, t.detach().cpu().clone()) for n, t in _named_tensors(model)}


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _assert_restored(model: nn.Module, snap: dict) -> None:
    now = dict(_named_tensors(model))
    assert now.keys() == snap.keys()
    for name, (ident, device, dtype, value) in snap.items():
        t = now[name]
        assert id(t) == ident and t.device == device and t.dtype == dtype, name
        assert torch.equal(t.detach().cpu(), value), name
        assert not t.is_pinned() or t.device.type != "cpu", name


class _BufferProbe:
    """Records, per call of each block, whether all its tensors live inside one of the streamer's buffers."""

    def __init__(self, streamer: BlockStreamer, blocks: nn.ModuleList) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]
        self.streamer = streamer

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            starts = {buf.untyped_storage().data_ptr() for buf in self.streamer._buffers}
            tensors = [*module.parameters(), *module.buffers()]
            self.calls.append((index, all(t.untyped_storage().data_ptr() in starts for t in tensors)))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------- golden fixture (CPU, exact)


@pytest.mark.parametrize("streamed", [[0, 1], [0], [1]], ids=["all", "first", "last"])
@pytest.mark.parametrize("depth", [1, 2])
def test_streamed_equals_resident_bit_for_bit(streamed, depth, tiny: Path, cases: dict, golden) -> None:
    g = golden("dit_t2v")
    model = _golden_model(tiny, cases)
    resident = _run(model, g)
    print(f"dit_t2v resident: rel_l2 = {rel_l2(resident[0], g['out']):.3e}")
    assert rel_l2(resident[0], g["out"]) <= 1e-5
    snap = _snapshot(model)

    streamer = BlockStreamer(model, streamed, "cpu", prefetch_depth=depth)
    probe = _BufferProbe(streamer, model.blocks)
    with streamer:
        first, second = _run(model, g), _run(model, g)  # the second forward uses the wrapped-around prefetch
        stats = streamer.read_stats()
        buffers = {buf.untyped_storage().data_ptr() for buf in streamer._buffers}
        between_runs = [t.untyped_storage().data_ptr() for i in streamed for t in model.blocks[i].parameters()]
        assert not buffers & set(between_runs)  # between runs, streamed weights point at their host slab
    probe.remove()

    assert torch.equal(first, resident) and torch.equal(second, resident)
    assert probe.calls == [(i, i in streamed) for i in (0, 1)] * 2
    # Each forward moves every streamed block once; `depth` loads for the next forward are already queued.
    assert stats.forwards == 2 and stats.on_demand_loads == 0
    assert stats.loads == 2 * len(streamed) + depth
    assert stats.pageable_bytes == sum(block_nbytes(model.blocks[i], "cpu") for i in streamed)
    assert stats.pinned_bytes == 0 and stats.staging_bytes == 0
    assert stats.device_buffer_bytes == (depth + 1) * max(block_nbytes(model.blocks[i], "cpu") for i in streamed)

    _assert_restored(model, snap)
    assert torch.equal(_run(model, g), resident)


# ---------------------------------------------------------------------------- random DiT with more blocks


def _random_dit(num_layers: int = 5, seed: int = 0, **overrides) -> WanDiT:
    fields = dict(model_type="t2v", in_dim=4, out_dim=4, dim=24, ffn_dim=32, freq_dim=16, num_heads=2)
    fields.update(num_layers=num_layers, text_len=8, text_dim=6)
    fields.update(overrides)
    torch.manual_seed(seed)
    return WanDiT(DiTConfig(**fields)).eval()


@pytest.mark.parametrize("streamed", [[0, 2, 4], [1, 2, 3], [0, 1, 2, 3, 4]])
@pytest.mark.parametrize("depth", [1, 2])
def test_cfg_pairs_over_many_blocks(streamed, depth) -> None:
    """cond/uncond forwards alternate (different inputs) across several steps: every one matches resident."""
    model = _random_dit()
    torch.manual_seed(1)
    x = torch.randn(1, 4, 2, 4, 6)
    cond, uncond = [torch.randn(5, 6)], [torch.randn(3, 6)]
    calls = [(torch.tensor([t]), ctx) for t in (900, 300) for ctx in (cond, uncond)]
    with torch.inference_mode():
        resident = [model(x, t, ctx) for t, ctx in calls]
        with BlockStreamer(model, streamed, "cpu", depth) as streamer:
            streamed_out = [model(x, t, ctx) for t, ctx in calls]
    assert all(torch.equal(a, b) for a, b in zip(streamed_out, resident, strict=True))
    assert streamer.stats.loads == len(calls) * len(streamed) + depth


# --------------------------------------------------------------------------------- quantized toy blocks


class _ToyQLinear(nn.Module):
    """int8 weight buffer + fp32 per-row scale + bf16 bias, dequantised in forward (like a weight-only quant)."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(n, n, generator=gen)
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.scale, self.bias.float())


class _ToyBlock(nn.Module):
    def __init__(self, n: int, seed: int, wide: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = _ToyQLinear(n, gen)
        self.register_buffer("gain", torch.tensor(0.5 + 0.1 * seed))  # 0-dim
        self.register_buffer("mask", torch.rand(n, generator=gen) > 0.3)  # bool
        self.wide = nn.Parameter(torch.randn(n, 3 * n, generator=gen) * 0.1) if wide else None  # uneven sizes
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("block failed on purpose")
        y = x + self.gain * torch.tanh(self.lin(x)) * self.mask
        if self.wide is not None:
            y = y + (x @ self.wide)[..., : x.shape[-1]]
        return y


class _ToyNet(nn.Module):
    def __init__(self, n: int = 16, num_blocks: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ToyBlock(n, i, wide=i % 3 == 1) for i in range(num_blocks))
        torch.manual_seed(0)
        self.head = nn.Linear(n, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("depth", [1, 2])
def test_quantized_blocks_stream_exactly(depth: int) -> None:
    model = _ToyNet()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        resident = model(x)
    snap = _snapshot(model)
    streamed = [0, 1, 2, 4, 5]
    with BlockStreamer(model, streamed, "cpu", depth) as streamer, torch.inference_mode():
        outs = [model(x) for _ in range(3)]
        assert model.blocks[0].lin.qweight.dtype == torch.int8 and model.blocks[0].lin.bias.dtype == torch.bfloat16
    assert all(torch.equal(o, resident) for o in outs)
    assert streamer.buffer_bytes == max(block_nbytes(model.blocks[i], "cpu") for i in streamed)
    _assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quant_module_dit_streams_exactly(mode: str) -> None:
    """The project's QuantLinear (int8/fp8 weight + fp32 scale parameters) streams like any other block."""
    quant = pytest.importorskip("wan_local.memory.quant")
    model = quant.quantize_dit(_random_dit(num_layers=4, dim=64, ffn_dim=128, num_heads=2), mode)
    assert any(p.element_size() == 1 for p in model.blocks[0].parameters())
    x, t, ctx = torch.randn(1, 4, 2, 4, 6), torch.tensor([500]), [torch.randn(3, 6)]
    with torch.inference_mode():
        resident = model(x, t, ctx)
        with BlockStreamer(model, [0, 2, 3], "cpu", 2):
            assert all(torch.equal(model(x, t, ctx), resident) for _ in range(3))


def test_recovers_after_a_failed_forward() -> None:
    model = _ToyNet()
    x = torch.randn(2, 16)
    with torch.no_grad():
        resident = model(x)
        with BlockStreamer(model, [0, 2, 3, 5], "cpu", 2):
            model.blocks[3].fail = True
            with pytest.raises(RuntimeError, match="on purpose"):
                model(x)
            model.blocks[3].fail = False
            assert torch.equal(model(x), resident)
            assert torch.equal(model(x), resident)


def test_detach_keeps_the_host_side_for_the_next_attach() -> None:
    """detach() frees the device side only; attach() again packs nothing; uninstall() restores the model."""
    model = _ToyNet()
    x = torch.randn(2, 16)
    snap = _snapshot(model)
    with torch.no_grad():
        resident = model(x)
        streamer = BlockStreamer(model, [0, 2, 3], "cpu", 1).install()
        slabs = [t.untyped_storage().data_ptr() for t in model.blocks[2].parameters()]
        for _ in range(3):
            assert torch.equal(model(x), resident) and streamer.stats.forwards == 1
            streamer.detach()
            assert streamer.prepared and not streamer.installed and streamer._buffers == []
            assert [t.untyped_storage().data_ptr() for t in model.blocks[2].parameters()] == slabs
            assert torch.equal(model(x), resident), "detached: the blocks run from their host slabs"
            streamer.attach()
        assert streamer.stats.packs == 3 and streamer.stats.pins == 0
        streamer.uninstall()
    assert not streamer.prepared
    _assert_restored(model, snap)


@pytest.mark.parametrize("timing", [False, True])
def test_copy_times_are_measured_only_when_asked(timing: bool) -> None:
    model = _ToyNet()
    with BlockStreamer(model, range(6), "cpu", 1, timing=timing) as streamer, torch.no_grad():
        model(torch.randn(2, 16))
    stats = streamer.read_stats()
    assert stats.forwards == 1 and stats.loads == 7
    assert (stats.copy_s > 0 and stats.stall_s > 0) if timing else (stats.copy_s == 0 and stats.stall_s == 0)


def test_blocks_called_out_of_order_load_on_demand() -> None:
    model = _ToyNet()
    x = torch.randn(2, 16)
    with torch.inference_mode():
        expected = [model.blocks[i](x) for i in (4, 0, 0, 2)]
        resident = model(x)
        with BlockStreamer(model, [0, 2, 4], "cpu", 1) as streamer:
            got = [model.blocks[i](x) for i in (4, 0, 0, 2)]
            full = model(x)  # after the stray calls, a forward starts its prefetch chain over
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert torch.equal(full, resident)
    assert streamer.stats.on_demand_loads >= 2


def test_cpu_tensors_keep_their_alignment() -> None:
    """CPU kernels pick code paths by address alignment: a streamed tensor sits where its resident one would, modulo
    ALIGN_BYTES (here weights at odd offsets of one storage, as memory-mapped checkpoints load)."""
    model = _ToyNet()
    tensors = [t for b in model.blocks for t in [*b.parameters(), *b.buffers()]]
    storage = torch.empty(sum(t.numel() * t.element_size() + 64 for t in tensors), dtype=torch.uint8)
    offset = 24
    for t in tensors:
        n = t.numel() * t.element_size()
        view = storage[offset : offset + n].view(t.dtype).view(t.shape)
        view.copy_(t.detach())
        t.data = view
        offset += n + 40
    residues = {id(t): t.data_ptr() % ALIGN_BYTES for t in tensors}
    x = torch.randn(2, 16)
    with torch.no_grad():
        resident = model(x)
        seen = []
        probes = [
            b.register_forward_pre_hook(lambda m, a: seen.extend(t.data_ptr() % ALIGN_BYTES for t in m.parameters()))
            for b in model.blocks
        ]
        with BlockStreamer(model, range(6), "cpu", 2):
            assert torch.equal(model(x), resident)
        for p in probes:
            p.remove()
    expected = [residues[id(t)] for b in model.blocks for t in b.parameters()]
    assert seen == expected and len(set(expected)) > 1
    assert all(t.data_ptr() % ALIGN_BYTES == residues[id(t)] for t in tensors), "the slabs keep it too"


# -------------------------------------------------------------------------------------------- host memory


_RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, psutil, torch
    from wan_local.memory.streaming import BlockStreamer
    from wan_local.models.dit import DiTConfig, WanDiT

    proc = psutil.Process()
    cfg = DiTConfig(model_type="t2v", in_dim=4, out_dim=4, dim=512, ffn_dim=2048, freq_dim=16, num_heads=4,
                    num_layers=6, text_len=8, text_dim=8)
    torch.manual_seed(0)
    rss0 = proc.memory_info().rss
    model = WanDiT(cfg)
    rss1 = proc.memory_info().rss
    streamer = BlockStreamer(model, range(6), "cpu", 1).install()
    gc.collect()
    rss2 = proc.memory_info().rss
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    print(json.dumps(dict(rss0=rss0, rss1=rss1, rss2=rss2, block_bytes=block_bytes,
                          host=streamer.stats.pageable_bytes, buffers=streamer.stats.device_buffer_bytes)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses glibc's MALLOC_MMAP_THRESHOLD_")
def test_install_keeps_one_host_copy() -> None:
    """RSS after install ~ weights (+ the reused buffers, host memory on CPU), never weights x 2.

    Runs in a fresh process with a fixed malloc mmap threshold so freed weights go back to the OS at once
    (otherwise glibc may keep freed heap pages resident and RSS would not show the release).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(r)
    streamed = r["block_bytes"]
    assert r["host"] == pytest.approx(streamed, rel=0.01)
    assert r["rss1"] - r["rss0"] >= 0.9 * streamed  # the model really is resident before install
    assert r["rss2"] - r["rss1"] <= r["buffers"] + 0.15 * streamed  # slabs replaced the originals


# ------------------------------------------------------------------------------------------------- errors


def test_invalid_arguments() -> None:
    model = _ToyNet()
    with pytest.raises(InputError, match="distinct block indices"):
        BlockStreamer(model, [0, 6], "cpu")
    with pytest.raises(InputError, match="distinct block indices"):
        BlockStreamer(model, [], "cpu")
    with pytest.raises(InputError, match="distinct block indices"):
        BlockStreamer(model, [1, 1], "cpu")
    with pytest.raises(InputError, match="prefetch_depth"):
        BlockStreamer(model, [0], "cpu", prefetch_depth=3)
    with pytest.raises(InputError, match="pinned_cap_bytes"):
        BlockStreamer(model, [0], "cpu", pinned_cap_bytes=-1)
    with pytest.raises(InputError, match=r"nn\.ModuleList"):
        BlockStreamer(model, [0], "cpu", blocks_attr="head")
    with pytest.raises(InputError, match="supports 'cuda' and 'cpu'"):
        BlockStreamer(model, [0], "mps")
    streamer = BlockStreamer(model, [0], "cpu").install()
    with pytest.raises(InputError, match="already installed"):
        streamer.install()
    streamer.uninstall()
    streamer.uninstall()  # idempotent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_an_input_error() -> None:
    with pytest.raises(InputError, match="CUDA is not available"):
        BlockStreamer(_ToyNet(), [0], "cuda")


def test_rejects_meta_and_shared_tensors() -> None:
    with torch.device("meta"):
        meta_model = _random_dit(num_layers=2)
    with pytest.raises(InputError, match="meta device"):
        BlockStreamer(meta_model, [0], "cpu")
    model = _ToyNet()
    model.blocks[2].lin.bias = model.blocks[1].lin.bias
    with pytest.raises(InputError, match="shared between block"):
        BlockStreamer(model, [1], "cpu")
    model = _ToyNet()
    model.head.weight = model.blocks[0].wide if model.blocks[0].wide is not None else model.blocks[1].wide
    with pytest.raises(InputError, match="shared between block"):
        BlockStreamer(model, [0, 1], "cpu")


def test_move_unstreamed_counts_everything_but_streamed_blocks() -> None:
    """The real device move is covered by the CUDA tests; here: what is moved, and identities are kept."""
    model = _ToyNet()
    ids = {n: id(t) for n, t in _named_tensors(model)}
    moved = move_unstreamed(model, [0, 1], "cpu")
    streamed = [*model.blocks[0].parameters(), *model.blocks[0].buffers(), *model.blocks[1].parameters()]
    streamed += list(model.blocks[1].buffers())
    total = sum(t.numel() * t.element_size() for _, t in _named_tensors(model))
    assert moved == total - sum(t.numel() * t.element_size() for t in streamed)
    assert ids == {n: id(t) for n, t in _named_tensors(model)}


# --------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pinning", ["all", "none", "first"])
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_streamed_equals_resident(pinning: str, depth: int, tiny: Path, cases: dict, golden) -> None:
    g = golden("dit_t2v")
    resident = _run(_golden_model(tiny, cases).to("cuda"), g, "cuda")
    model = _golden_model(tiny, cases)
    snap = _snapshot(model)
    chunk = 16 << 10  # small staging chunks: a pageable block goes through many double-buffered chunks
    first = -(-block_nbytes(model.blocks[0]) // mmap.PAGESIZE) * mmap.PAGESIZE  # page-rounded slab
    cap = {"all": 1 << 40, "none": 0, "first": first + 2 * chunk}[pinning]
    move_unstreamed(model, [0, 1], "cuda")
    with BlockStreamer(model, [0, 1], "cuda", depth, cap, chunk_bytes=chunk, timing=True) as streamer:
        outs = [_run(model, g, "cuda") for _ in range(3)]
        stats = streamer.read_stats()
    assert all(torch.equal(o, resident) for o in outs)
    expected_pinned = {"all": 2 * first, "none": 0, "first": first}[pinning]
    assert stats.pinned_bytes == expected_pinned
    assert stats.staging_bytes == (0 if pinning == "all" else 2 * chunk)
    assert stats.copy_s > 0 and stats.stall_s >= 0 and stats.on_demand_loads == 0
    move_unstreamed(model, [0, 1], "cpu")
    _assert_restored(model, snap)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pinning", ["all", "none"])
def test_cuda_reattach_pins_nothing(pinning: str) -> None:
    model = _ToyNet(n=64).cuda()
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        resident = model(x)
    model = _ToyNet(n=64)
    snap = _snapshot(model)
    move_unstreamed(model, range(6), "cuda")
    cap = {"all": 1 << 30, "none": 0}[pinning]
    streamer = BlockStreamer(model, range(6), "cuda", 1, cap, chunk_bytes=4096).install()
    pins = streamer.stats.pins
    assert pins == (6 if pinning == "all" else 1)  # six slabs, or the staging allocation
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(x), resident)
            streamer.detach()
            assert streamer.pinned_host_bytes == streamer.stats.pinned_bytes + streamer.stats.staging_bytes
            assert all(t.is_pinned() == (pinning == "all") for t in model.blocks.parameters())
            streamer.attach()
    assert streamer.stats.pins == pins and streamer.stats.packs == 6
    streamer.uninstall()
    assert streamer.pinned_host_bytes == 0
    move_unstreamed(model, range(6), "cpu")
    _assert_restored(model, snap)


@pytest.mark.gpu
@cuda
def test_cuda_quantized_and_bf16_autocast() -> None:
    model = _ToyNet(n=64).cuda()
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        resident = model(x)
    model = _ToyNet(n=64)
    move_unstreamed(model, range(6), "cuda")
    with BlockStreamer(model, range(6), "cuda", 2, pinned_cap_bytes=1 << 30), torch.inference_mode():
        assert all(torch.equal(model(x), resident) for _ in range(3))

    dit = _random_dit(num_layers=4, dim=128, ffn_dim=256, num_heads=2).to(torch.bfloat16).cuda()
    x, t, ctx = torch.randn(1, 4, 2, 8, 8, device="cuda"), torch.tensor([500], device="cuda"), [torch.randn(5, 6)]
    ctx = [c.cuda().to(torch.bfloat16) for c in ctx]
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        resident = dit(x, t, ctx)
        dit2 = _random_dit(num_layers=4, dim=128, ffn_dim=256, num_heads=2).to(torch.bfloat16)
        move_unstreamed(dit2, [1, 3], "cuda")
        with BlockStreamer(dit2, [1, 3], "cuda", 1, pinned_cap_bytes=1 << 30):
            assert torch.equal(dit2(x, t, ctx), resident) and torch.equal(dit2(x, t, ctx), resident)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_peak_memory_is_buffers_not_blocks(depth: int) -> None:
    """Peak allocated ~ non-block weights + (depth + 1) x largest block + the same activations as resident."""
    kw = dict(num_layers=8, dim=256, ffn_dim=1024, num_heads=4)
    x, t, ctx = torch.randn(1, 4, 2, 16, 16), torch.tensor([500]), [torch.randn(5, 6)]
    args = (x.cuda(), t.cuda(), [ctx[0].cuda()])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    resident_model = _random_dit(**kw).cuda()
    weights = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        expected = resident_model(*args)
    activations = torch.cuda.max_memory_allocated() - base - weights
    del resident_model

    model = _random_dit(**kw)
    nonblock = move_unstreamed(model, range(8), "cuda")
    with BlockStreamer(model, range(8), "cuda", depth, pinned_cap_bytes=1 << 30) as streamer:
        held = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            out = model(*args)
        peak = torch.cuda.max_memory_allocated() - base
    block = max(block_nbytes(b) for b in model.blocks)
    assert torch.equal(out, expected)
    assert streamer.stats.device_buffer_bytes == (depth + 1) * block
    assert held <= nonblock + (depth + 1) * block + 64 * 1024  # allocator rounding of the non-block tensors
    assert peak <= held + activations * 1.05 + (1 << 20)
    assert peak < weights + activations
