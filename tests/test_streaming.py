"""BlockStreamer on the CPU: streamed == resident bit for bit, exact uninstall, re-attach, host RAM, quantized
blocks, errors (CUDA: test_streaming_cuda.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, rel_l2
from streaming_models import ToyNet, assert_restored, golden_model, named_tensors, random_dit, run, snapshot
from torch import nn

from wan_local.errors import InputError
from wan_local.memory.pinned import ALIGN_BYTES
from wan_local.memory.streaming import BlockStreamer, block_nbytes, move_unstreamed

# ------------------------------------------------------------------------------------------------ fixtures


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
    model = golden_model(tiny, cases)
    resident = run(model, g)
    print(f"dit_t2v resident: rel_l2 = {rel_l2(resident[0], g['out']):.3e}")
    assert rel_l2(resident[0], g["out"]) <= 1e-5
    snap = snapshot(model)

    streamer = BlockStreamer(model, streamed, "cpu", prefetch_depth=depth)
    probe = _BufferProbe(streamer, model.blocks)
    with streamer:
        first, second = run(model, g), run(model, g)  # the second forward uses the wrapped-around prefetch
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

    assert_restored(model, snap)
    assert torch.equal(run(model, g), resident)


# ---------------------------------------------------------------------------- random DiT with more blocks


@pytest.mark.parametrize("streamed", [[0, 2, 4], [1, 2, 3], [0, 1, 2, 3, 4]])
@pytest.mark.parametrize("depth", [1, 2])
def test_cfg_pairs_over_many_blocks(streamed, depth) -> None:
    """cond/uncond forwards alternate (different inputs) across several steps: every one matches resident."""
    model = random_dit()
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


@pytest.mark.parametrize("depth", [1, 2])
def test_quantized_blocks_stream_exactly(depth: int) -> None:
    model = ToyNet()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        resident = model(x)
    snap = snapshot(model)
    streamed = [0, 1, 2, 4, 5]
    with BlockStreamer(model, streamed, "cpu", depth) as streamer, torch.inference_mode():
        outs = [model(x) for _ in range(3)]
        assert model.blocks[0].lin.qweight.dtype == torch.int8 and model.blocks[0].lin.bias.dtype == torch.bfloat16
    assert all(torch.equal(o, resident) for o in outs)
    assert streamer.buffer_bytes == max(block_nbytes(model.blocks[i], "cpu") for i in streamed)
    assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quant_module_dit_streams_exactly(mode: str) -> None:
    """The project's QuantLinear (int8/fp8 weight + fp32 scale parameters) streams like any other block."""
    formats = pytest.importorskip("wan_local.memory.quant.formats")
    model = formats.quantize_dit(random_dit(num_layers=4, dim=64, ffn_dim=128, num_heads=2), mode)
    assert any(p.element_size() == 1 for p in model.blocks[0].parameters())
    x, t, ctx = torch.randn(1, 4, 2, 4, 6), torch.tensor([500]), [torch.randn(3, 6)]
    with torch.inference_mode():
        resident = model(x, t, ctx)
        with BlockStreamer(model, [0, 2, 3], "cpu", 2):
            assert all(torch.equal(model(x, t, ctx), resident) for _ in range(3))


def test_recovers_after_a_failed_forward() -> None:
    model = ToyNet()
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
    model = ToyNet()
    x = torch.randn(2, 16)
    snap = snapshot(model)
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
    assert_restored(model, snap)


@pytest.mark.parametrize("timing", [False, True])
def test_copy_times_are_measured_only_when_asked(timing: bool) -> None:
    model = ToyNet()
    with BlockStreamer(model, range(6), "cpu", 1, timing=timing) as streamer, torch.no_grad():
        model(torch.randn(2, 16))
    stats = streamer.read_stats()
    assert stats.forwards == 1 and stats.loads == 7
    assert (stats.copy_s > 0 and stats.stall_s > 0) if timing else (stats.copy_s == 0 and stats.stall_s == 0)


def test_blocks_called_out_of_order_load_on_demand() -> None:
    model = ToyNet()
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
    model = ToyNet()
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
    model = ToyNet()
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
        BlockStreamer(ToyNet(), [0], "cuda")


def test_rejects_meta_and_shared_tensors() -> None:
    with torch.device("meta"):
        meta_model = random_dit(num_layers=2)
    with pytest.raises(InputError, match="meta device"):
        BlockStreamer(meta_model, [0], "cpu")
    model = ToyNet()
    model.blocks[2].lin.bias = model.blocks[1].lin.bias
    with pytest.raises(InputError, match="shared between block"):
        BlockStreamer(model, [1], "cpu")
    model = ToyNet()
    model.head.weight = model.blocks[0].wide if model.blocks[0].wide is not None else model.blocks[1].wide
    with pytest.raises(InputError, match="shared between block"):
        BlockStreamer(model, [0, 1], "cpu")


def test_move_unstreamed_counts_everything_but_streamed_blocks() -> None:
    """The real device move is covered by the CUDA tests; here: what is moved, and identities are kept."""
    model = ToyNet()
    ids = {n: id(t) for n, t in named_tensors(model)}
    moved = move_unstreamed(model, [0, 1], "cpu")
    streamed = [*model.blocks[0].parameters(), *model.blocks[0].buffers(), *model.blocks[1].parameters()]
    streamed += list(model.blocks[1].buffers())
    total = sum(t.numel() * t.element_size() for _, t in named_tensors(model))
    assert moved == total - sum(t.numel() * t.element_size() for t in streamed)
    assert ids == {n: id(t) for n, t in named_tensors(model)}
