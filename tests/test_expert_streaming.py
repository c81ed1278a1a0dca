"""Experts streamed through the pipeline on the CPU: the real plan, slots, buffer reuse and block order.

The CPU has no estimator plan yet, so each test hands `WanPipeline.generate` a ResidencyPlan with streamed blocks
(device "cpu", prefetch 1) through `WanPipeline.estimate`; the streamed run must equal the resident one bit for bit.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from wan_local.memory import experts as experts_module
from wan_local.memory import ledger as ledger_module
from wan_local.memory import pinned
from wan_local.memory import streaming as streaming_module
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import ResidencyPlan
from wan_local.memory.streaming import BlockStreamer
from wan_local.pipeline import GenerationSettings, WanPipeline

NUM_BLOCKS = 2  # every tiny DiT has two blocks

# Three steps at shift 1 put the expert switch of both A14B tasks inside the run (t = 1000, 667, 333).
SETTINGS = {
    "t2v-A14B": dict(size=(32, 32), frames=1, steps=3, shift=1.0),
    "i2v-A14B": dict(image="i2v_input.png", size=(32, 32), frames=5, steps=3, shift=1.0),
    "ti2v-5B": dict(size=(32, 32), frames=1, steps=2),
}


def _settings(tiny: Path, task: str) -> GenerationSettings:
    kw = dict(SETTINGS[task])
    if "image" in kw:
        kw["image"] = str(tiny / "golden" / kw["image"])
    return GenerationSettings(task=task, prompt="A boat on a lake.", guide_scale=(3.0, 4.0), seed=5, **kw)


def cpu_plan(streamed: tuple[int, ...], experts_in_ram: int = 1, pinned_host_bytes: int = 0) -> ResidencyPlan:
    """A CPU plan that streams `streamed` with one load in flight (the estimator does not plan the CPU yet)."""
    return ResidencyPlan(
        device="cpu",
        num_blocks=NUM_BLOCKS,
        resident_blocks=tuple(i for i in range(NUM_BLOCKS) if i not in streamed),
        non_block_bytes=0,
        activation_bytes=0,
        experts_in_ram=experts_in_ram,
        release_text_encoder_before_dit=True,
        encode_ram_bytes=0,
        denoise_ram_bytes=0,
        decode_ram_bytes=0,
        streamed_blocks=streamed,
        prefetch_depth=1,
        pinned_host_bytes=pinned_host_bytes,
    )


def use_plan(monkeypatch, pipe: WanPipeline, plan: ResidencyPlan | None) -> None:
    """Make `pipe.generate` run with `plan`, as the engine's run_job passes the admitted one."""
    monkeypatch.setattr(pipe, "generate", functools.partial(WanPipeline.generate, pipe, plan=plan))


def record_streamers(monkeypatch) -> list[BlockStreamer]:
    """Every BlockStreamer the expert slots create, in order."""
    made: list[BlockStreamer] = []

    class Recording(BlockStreamer):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(experts_module, "BlockStreamer", Recording)
    return made


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Prompt embeddings and quantized weights shared by the tests of this module (they only speed it up)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("quant", ["none", "int8", "fp8"])
@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B", "ti2v-5B"])
def test_streamed_experts_equal_resident_bit_for_bit(tiny, cache_dir, monkeypatch, task, quant):
    streamers = record_streamers(monkeypatch)
    memory = MemoryOptions(quant=quant, keep_idle_expert="drop")
    pipe = WanPipeline(tiny / task, task, "cpu", torch.float32, memory, cache_dir=cache_dir)
    settings = _settings(tiny, task)
    use_plan(monkeypatch, pipe, None)
    resident = pipe.generate(settings)
    assert streamers == []

    experts_used: list[str] = []
    use_plan(monkeypatch, pipe, cpu_plan(streamed=(0, 1)))
    streamed = pipe.generate(settings, on_step=lambda e: experts_used.append(e.expert))
    pipe.close()

    two = task != "ti2v-5B"
    assert sorted(set(experts_used)) == (["high_noise", "low_noise"] if two else ["model"])
    assert len(streamers) == (2 if two else 1), "one streamer per expert placed"
    for streamer, expert in zip(streamers, dict.fromkeys(experts_used), strict=True):
        forwards = 2 * experts_used.count(expert)  # cond + uncond per step
        assert streamer.stats.forwards == forwards and streamer.stats.on_demand_loads == 0
        assert streamer.stats.loads == forwards * NUM_BLOCKS + 1, "every block every forward, one load queued ahead"
    assert torch.equal(streamed.latent, resident.latent)
    assert torch.equal(streamed.video, resident.video)


def fake_pinning(monkeypatch) -> tuple[list[int], list[int]]:
    """Page-lock on the CPU through counting stand-ins for cudaHostRegister / cudaHostUnregister."""
    registered: list[int] = []
    unregistered: list[int] = []
    monkeypatch.setattr(streaming_module, "pinning_available", lambda device: True)
    monkeypatch.setattr(pinned, "_host_register", lambda ptr, nbytes: registered.append(ptr) or 0)
    monkeypatch.setattr(pinned, "_host_unregister", lambda ptr: unregistered.append(ptr) or 0)
    return registered, unregistered


def test_kept_experts_are_packed_and_pinned_once(tiny, cache_dir, monkeypatch):
    """A kept expert keeps its packed, pinned slabs while idle: the next job only re-attaches; release unpins."""
    registered, unregistered = fake_pinning(monkeypatch)
    streamers = record_streamers(monkeypatch)
    ledger = ledger_module.MemoryLedger()
    monkeypatch.setattr(ledger_module, "_PROCESS_LEDGER", ledger)
    memory = MemoryOptions(keep_idle_expert="keep")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=cache_dir)
    settings = _settings(tiny, "t2v-A14B")
    use_plan(monkeypatch, pipe, None)
    resident = pipe.generate(settings)

    use_plan(monkeypatch, pipe, cpu_plan(streamed=(0, 1), experts_in_ram=2, pinned_host_bytes=1 << 30))
    first = pipe.generate(settings)
    assert len(streamers) == 2 and all(s.prepared and not s.installed for s in streamers), "parked, slabs kept"
    assert [(s.stats.packs, s.stats.pins) for s in streamers] == [(NUM_BLOCKS, NUM_BLOCKS)] * 2
    assert len(registered) == 2 * NUM_BLOCKS and unregistered == []
    pinned_bytes = [s.stats.pinned_bytes for s in streamers]
    assert sorted(e.pinned_bytes for e in ledger.entries(kind="dit")) == sorted(pinned_bytes) and all(pinned_bytes)

    second = pipe.generate(settings)
    assert len(streamers) == 2, "the kept experts' streamers were re-attached, not made again"
    assert [(s.stats.packs, s.stats.pins) for s in streamers] == [(NUM_BLOCKS, NUM_BLOCKS)] * 2
    assert len(registered) == 2 * NUM_BLOCKS and unregistered == [], "re-activation packs and pins nothing"
    assert all(s.stats.forwards > 0 and s.stats.on_demand_loads == 0 for s in streamers), "and streams"
    assert sorted(pipe.experts.loads) == ["high_noise", "low_noise"]
    for run in (first, second):
        assert torch.equal(run.latent, resident.latent) and torch.equal(run.video, resident.video)

    pipe.close()
    assert sorted(unregistered) == sorted(registered), "release unpins every slab"
    assert not any(s.prepared for s in streamers) and pipe.experts.held() == [] and ledger.entries() == []
