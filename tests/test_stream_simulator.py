"""BlockStreamer's CUDA path on the CPU, through a stream/event simulator whose copies land late (cuda_simulator.py):
streamed == resident bit for bit over many delay seeds, and the simulator catches a missing wait."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cuda_simulator import CudaSimulator
from streaming_models import golden_model, random_dit, run

from wan_local.memory import pinned, streaming
from wan_local.memory.streaming import BlockStreamer

SEEDS = range(12)
PINNED = {"pinned": 1 << 40, "pageable": 0}  # pinned_cap_bytes


@pytest.fixture(scope="module")
def dit_case():
    model = random_dit(num_layers=3, seed=3)
    torch.manual_seed(1)
    g = {"x": torch.randn(4, 2, 4, 4), "t": torch.tensor([500.0]), "context": torch.randn(8, 6)}
    return model, g, run(model, g)


def streamed_runs(model, g, sim: CudaSimulator, depth: int, pin: str, chunk_bytes: int = 4096) -> list[torch.Tensor]:
    """Two forwards of `model` with all its blocks streamed through `sim` (installed); uninstalled after.

    The default staging chunks are small, so a pageable block goes through both chunks more than once."""
    streamed = range(len(model.blocks))
    streamer = BlockStreamer(model, streamed, "cuda", depth, PINNED[pin], chunk_bytes=chunk_bytes)
    with streamer, sim.watching():
        return [run(model, g) for _ in range(2)]


@pytest.mark.parametrize("pin", PINNED)
@pytest.mark.parametrize("depth", [1, 2])
def test_streamer_passes_the_simulator(depth, pin, dit_case, monkeypatch) -> None:
    model, g, resident = dit_case
    late = forced = 0
    for seed in SEEDS:
        with monkeypatch.context() as m:
            sim = CudaSimulator(seed)
            sim.install(m)
            outs = streamed_runs(model, g, sim, depth, pin)
        assert sim.violations == [], (seed, sim.violations[:3])
        assert all(torch.equal(out, resident) for out in outs), seed
        assert sim.copies > 0
        late, forced = late + sim.late_copies, forced + sim.forced_ops
    print(f"depth {depth} {pin}: {len(SEEDS)} seeds, copies that landed late {late}, ops forced by a wait {forced}")
    assert late > 0 and forced > 0  # the delays were real: copies did land after their issue


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
                outs = streamed_runs(model, g, sim, depth, pin)
            assert sim.violations == [], (seed, pin, sim.violations[:3])
            assert all(torch.equal(out, resident) for out in outs), (seed, pin)


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
    assert wrong > 0


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
