"""BlockStreamer's CUDA path on the CPU, through a stream/event simulator whose copies land late (cuda_simulator.py):
streamed == resident bit for bit over many delay seeds, and the simulator catches a missing wait."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cuda_simulator import CudaSimulator
from streaming_models import golden_model, random_dit, run

from wan_local.memory import experts, pinned, streaming
from wan_local.memory.experts import ExpertSlots
from wan_local.memory.options import MemoryOptions
from wan_local.memory.streaming import BlockStreamer
from wan_local.weights.layout import HIGH, LOW
from wan_local.weights.loading import load_dit

SEEDS = range(10)
DELAYS = (20, 100, 400)  # most ticks a copy may take: shorter than a block's ops, about one, several
PINNED = {"pinned": 1 << 40, "pageable": 0}  # pinned_cap_bytes


@pytest.fixture(scope="module")
def dit_case():
    model = random_dit(num_layers=3, seed=3)
    torch.manual_seed(1)
    g = {"x": torch.randn(4, 2, 4, 4), "t": torch.tensor([500.0]), "context": torch.randn(8, 6)}
    return model, g, run(model, g)


def streamed_runs(model, g, sim: CudaSimulator, depth: int, pin: str, chunk_bytes: int = 4096, **kw) -> list:
    """Two forwards of `model` with all its blocks streamed through `sim` (installed); uninstalled after.

    The default staging chunks are small, so a pageable block goes through both chunks more than once."""
    streamed = range(len(model.blocks))
    streamer = BlockStreamer(model, streamed, "cuda", depth, PINNED[pin], chunk_bytes=chunk_bytes, **kw)
    with streamer, sim.watching():
        return [run(model, g) for _ in range(2)]


@pytest.mark.parametrize("pin", PINNED)
@pytest.mark.parametrize("depth", [1, 2])
def test_streamer_passes_the_simulator(depth, pin, dit_case, monkeypatch) -> None:
    model, g, resident = dit_case
    copies = forced = 0
    for seed in SEEDS:
        with monkeypatch.context() as m:
            sim = CudaSimulator(seed, max_delay=DELAYS[seed % len(DELAYS)])
            sim.install(m)
            outs = streamed_runs(model, g, sim, depth, pin)
        assert sim.violations == [], (seed, sim.violations[:3])
        assert all(torch.equal(out, resident) for out in outs), seed
        assert sim.copies > 0
        copies, forced = copies + sim.copies, forced + sim.forced_copies
    print(f"depth {depth} {pin}: {len(SEEDS)} seeds, {copies} copies, {forced} still pending when a wait needed them")
    assert 0 < forced < copies  # the delays were real: some copies landed by themselves, some had to be waited for


@pytest.mark.parametrize("depth", [1, 2])
def test_tiny_fixture_passes_the_simulator(depth, tiny: Path, cases: dict, golden, monkeypatch) -> None:
    g = golden("dit_t2v")
    model = golden_model(tiny, cases)
    resident = run(model, g)
    for seed in range(3):
        for pin in PINNED:
            with monkeypatch.context() as m:
                sim = CudaSimulator(seed)
                sim.install(m)
                outs = streamed_runs(model, g, sim, depth, pin, timing=True)  # timing events too
            assert sim.violations == [], (seed, pin, sim.violations[:3])
            assert all(torch.equal(out, resident) for out in outs), (seed, pin)


@pytest.mark.parametrize("pin", PINNED)
def test_expert_slots_pass_the_simulator(pin, tiny: Path, cases: dict, golden, monkeypatch) -> None:
    """ExpertSlots switches between two streamed experts and re-attaches an idle one's prepared streamer."""
    g = golden("dit_t2v")
    paths = {HIGH: tiny / "t2v-A14B" / "high_noise_model", LOW: tiny / "t2v-A14B" / "low_noise_model"}
    resident = {e: run(load_dit(p).eval(), g) for e, p in paths.items()}
    plan = SimpleNamespace(
        streamed_blocks=(0, 1), prefetch_depth=1, pinned_host_bytes=PINNED[pin], staging_host_bytes=0,
        ffn_chunk_tokens=None,
    )  # fmt: skip
    made: list[BlockStreamer] = []

    class OnSimulatedCuda(BlockStreamer):  # the slots place on "cpu"; their streamer takes the CUDA path
        def __init__(self, model, streamed, device, *args, **kw) -> None:
            super().__init__(model, streamed, "cuda", *args, **kw)
            made.append(self)

    sim = CudaSimulator(seed=7)
    sim.install(monkeypatch)
    monkeypatch.setattr(experts, "BlockStreamer", OnSimulatedCuda)
    slots = ExpertSlots(paths, "t2v", torch.device("cpu"), torch.float32, MemoryOptions())
    slots.configure(plan, keep_idle=True)
    outs = []
    for expert in (HIGH, LOW, HIGH, LOW):
        with sim.watching():
            outs.append((expert, [run(slots(expert), g) for _ in range(2)]))
    slots.release()
    assert len(made) == 2 and all(s.stats.packs == 2 for s in made)  # the idle expert was re-attached, not re-packed
    assert sim.violations == [], sim.violations[:3]
    assert all(torch.equal(out, resident[e]) for e, pair in outs for out in pair)


def _skip_compute_wait(self, load) -> None:
    load.wait_issued()  # BlockStreamer._wait_ready without compute.wait_event(load.ready)


@pytest.mark.parametrize("pin", PINNED)
def test_missing_ready_wait_is_caught(pin, dit_case, monkeypatch) -> None:
    model, g, resident = dit_case
    wrong = 0
    for seed in range(5):
        with monkeypatch.context() as m:
            m.setattr(BlockStreamer, "_wait_ready", _skip_compute_wait)
            sim = CudaSimulator(seed)
            sim.install(m)
            outs = streamed_runs(model, g, sim, 1, pin, chunk_bytes=1 << 20)  # one chunk: no staging syncs
        assert any(v.startswith("read before ready") for v in sim.violations), seed
        wrong += any(not torch.equal(out, resident) for out in outs)
    print(f"missing ready wait ({pin}): 5/5 seeds flagged, {wrong}/5 with NaN or wrong output")
    assert wrong > 0 or pin == "pageable"  # pinned runs have no thread: deterministic, and the poison shows


def test_missing_free_wait_is_caught(dit_case, monkeypatch) -> None:
    model, g, _ = dit_case
    real_issue = pinned.issue_copy
    for pin in PINNED:
        for seed in range(3):
            with monkeypatch.context() as m:
                sim = CudaSimulator(seed)
                sim.install(m)

                def issue_without_free_wait(load, stream, staging):
                    load.free = streaming.torch.cuda.Event()  # never recorded: the copy stream waits for nothing
                    real_issue(load, stream, staging)

                m.setattr(pinned, "issue_copy", issue_without_free_wait)
                m.setattr(streaming, "issue_copy", issue_without_free_wait)
                streamed_runs(model, g, sim, 1, pin)
            assert any(v.startswith("early reuse") for v in sim.violations), (pin, seed)


def test_missing_issue_wait_is_caught(dit_case, monkeypatch) -> None:
    """The compute waits `ready` without first waiting for the copy thread to record it: the thread is held
    until the compute has waited (at most 0.2 s, for the loads still queued at detach)."""
    model, g, _ = dit_case
    real_issue = pinned.issue_copy
    waited: dict[int, threading.Event] = {}  # id(load) -> set once the compute waited

    def late_issue(load, stream, staging) -> None:
        waited.setdefault(id(load), threading.Event()).wait(timeout=0.2)
        real_issue(load, stream, staging)

    def wait_without_issue(self, load) -> None:
        streaming.torch.cuda.current_stream(self.device).wait_event(load.ready)
        waited.setdefault(id(load), threading.Event()).set()

    for seed in range(2):
        waited.clear()
        with monkeypatch.context() as m:
            m.setattr(pinned, "issue_copy", late_issue)
            m.setattr(BlockStreamer, "_wait_ready", wait_without_issue)
            sim = CudaSimulator(seed)
            sim.install(m)
            streamed_runs(model, g, sim, 1, "pageable")
        assert sim.violations, seed


def _copy_without_chunk_sync(self, src, dst, stream) -> None:
    size = self.chunks[0].numel()  # Staging.copy without events[i].synchronize() before reusing chunk i
    for k, start in enumerate(range(0, src.numel(), size)):
        i, n = k % 2, min(size, src.numel() - start)
        self.chunks[i][:n].copy_(src[start : start + n])
        dst[start : start + n].copy_(self.chunks[i][:n], non_blocking=True)
        self.events[i].record(stream)


def test_missing_staging_sync_is_caught(dit_case, monkeypatch) -> None:
    model, g, _ = dit_case
    for seed in range(3):
        with monkeypatch.context() as m:
            m.setattr(pinned.Staging, "copy", _copy_without_chunk_sync)
            sim = CudaSimulator(seed)
            sim.install(m)
            streamed_runs(model, g, sim, 1, "pageable")
        assert any(v.startswith("source overwritten") for v in sim.violations), seed


def test_the_simulator_poisons_until_the_wait(monkeypatch) -> None:
    sim = CudaSimulator(seed=0, max_delay=10**6)  # nothing lands by itself
    sim.install(monkeypatch)
    cuda = streaming.torch.cuda
    buf = streaming.torch.empty(8, dtype=torch.uint8, device="cuda")
    copy, ready = cuda.Stream(), cuda.Event()
    with cuda.stream(copy):
        buf.copy_(torch.arange(8, dtype=torch.uint8), non_blocking=True)
        ready.record(copy)
    assert torch.equal(buf, torch.full((8,), 0xFF, dtype=torch.uint8)) and not ready.query()
    cuda.current_stream().wait_event(ready)
    assert torch.equal(buf, torch.arange(8, dtype=torch.uint8)) and ready.query()
    assert buf.view(torch.float32).isnan().sum() == 0
