"""BlockStreamer on CUDA: streamed == resident bit for bit under every pinning, re-attach, autocast, peak memory."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from streaming_models import ToyNet, assert_restored, golden_model, random_dit, run, snapshot

from wan_local.memory.streaming import BlockStreamer, block_nbytes, move_unstreamed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("pinning", ["all", "none", "first"])
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_streamed_equals_resident(pinning: str, depth: int, tiny: Path, cases: dict, golden) -> None:
    g = golden("dit_t2v")
    resident = run(golden_model(tiny, cases).to("cuda"), g, "cuda")
    model = golden_model(tiny, cases)
    snap = snapshot(model)
    chunk = 16 << 10  # small staging chunks: a pageable block goes through many double-buffered chunks
    first = -(-block_nbytes(model.blocks[0]) // mmap.PAGESIZE) * mmap.PAGESIZE  # page-rounded slab
    cap = {"all": 1 << 40, "none": 0, "first": first + 2 * chunk}[pinning]
    move_unstreamed(model, [0, 1], "cuda")
    with BlockStreamer(model, [0, 1], "cuda", depth, cap, chunk_bytes=chunk, timing=True) as streamer:
        outs = [run(model, g, "cuda") for _ in range(3)]
        stats = streamer.read_stats()
    assert all(torch.equal(o, resident) for o in outs)
    expected_pinned = {"all": 2 * first, "none": 0, "first": first}[pinning]
    assert stats.pinned_bytes == expected_pinned
    assert stats.staging_bytes == (0 if pinning == "all" else 2 * chunk)
    assert stats.copy_s > 0 and stats.stall_s >= 0 and stats.on_demand_loads == 0
    move_unstreamed(model, [0, 1], "cpu")
    assert_restored(model, snap)


@pytest.mark.parametrize("pinning", ["all", "none"])
def test_cuda_reattach_pins_nothing(pinning: str) -> None:
    model = ToyNet(n=64).cuda()
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        resident = model(x)
    model = ToyNet(n=64)
    snap = snapshot(model)
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
    assert_restored(model, snap)


def test_cuda_quantized_and_bf16_autocast() -> None:
    model = ToyNet(n=64).cuda()
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        resident = model(x)
    model = ToyNet(n=64)
    move_unstreamed(model, range(6), "cuda")
    with BlockStreamer(model, range(6), "cuda", 2, pinned_cap_bytes=1 << 30), torch.inference_mode():
        assert all(torch.equal(model(x), resident) for _ in range(3))

    dit = random_dit(num_layers=4, dim=128, ffn_dim=256, num_heads=2).to(torch.bfloat16).cuda()
    x, t, ctx = torch.randn(1, 4, 2, 8, 8, device="cuda"), torch.tensor([500], device="cuda"), [torch.randn(5, 6)]
    ctx = [c.cuda().to(torch.bfloat16) for c in ctx]
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        resident = dit(x, t, ctx)
        dit2 = random_dit(num_layers=4, dim=128, ffn_dim=256, num_heads=2).to(torch.bfloat16)
        move_unstreamed(dit2, [1, 3], "cuda")
        with BlockStreamer(dit2, [1, 3], "cuda", 1, pinned_cap_bytes=1 << 30):
            assert torch.equal(dit2(x, t, ctx), resident) and torch.equal(dit2(x, t, ctx), resident)


@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_peak_memory_is_buffers_not_blocks(depth: int) -> None:
    """Peak allocated ~ non-block weights + (depth + 1) x largest block + the same activations as resident."""
    kw = dict(num_layers=8, dim=256, ffn_dim=1024, num_heads=4)
    x, t, ctx = torch.randn(1, 4, 2, 16, 16), torch.tensor([500]), [torch.randn(5, 6)]
    args = (x.cuda(), t.cuda(), [ctx[0].cuda()])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    resident_model = random_dit(**kw).cuda()
    weights = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        expected = resident_model(*args)
    activations = torch.cuda.max_memory_allocated() - base - weights
    del resident_model

    model = random_dit(**kw)
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
