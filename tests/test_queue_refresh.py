"""The Queue tab's refresh stays cheap after a burst of added jobs: a time estimate is computed once per job shape
(not per prompt or seed), and at most NEW_ESTIMATES_PER_REFRESH new ones per refresh; the total follows."""

from __future__ import annotations

from types import SimpleNamespace

from ui import build_context
from ui.queue import NEW_ESTIMATES_PER_REFRESH, QueueHandlers
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.machine import GIB, MachineInfo
from wan_local.presets import BUILTIN_PRESETS_DIR, load_presets
from wan_local.settings import SettingsStore

CPU_BOX = MachineInfo(None, 0, 0, None, 32 * GIB, 28 * GIB, 500 * GIB)


def test_a_burst_of_jobs_is_estimated_once_per_shape_a_few_per_refresh(tmp_path):
    calls = []

    def estimate(task, size, frames, steps, options, machine, dit_config=None, components=None):
        calls.append((frames, steps))
        return SimpleNamespace(peak_vram_bytes=0, peak_ram_bytes=GIB, seconds=30.0)

    store = JobStore(tmp_path / "jobs.sqlite3")
    ctx = build_context(
        store=store, settings=SettingsStore(tmp_path / "settings.json"), machine=CPU_BOX,
        presets=load_presets(BUILTIN_PRESETS_DIR), estimator=estimate, measure=lambda m: m,
    )  # fmt: skip
    queue = QueueHandlers(ctx)
    for i in range(50):  # one shape, fifty prompts and seeds
        store.add(JobSettings(task="t2v-A14B", prompt=f"fox {i}", size=(64, 48), frames=5, steps=3), validate=False)
    assert "50 job(s) queued, about 25 min of work" in queue.running().html and calls == [(5, 3)]
    for steps in range(4, 14):  # ten new shapes
        store.add(JobSettings(task="t2v-A14B", prompt="wolf", size=(64, 48), frames=5, steps=steps), validate=False)
    html = queue.running().html
    assert len(calls) == 1 + NEW_ESTIMATES_PER_REFRESH and "60 job(s) queued" in html
    assert f"so far ({10 - NEW_ESTIMATES_PER_REFRESH} to estimate)" in html
    for _ in range(3):
        html = queue.running().html
    assert len(calls) == 11 and "60 job(s) queued, about 30 min of work." in html


def test_the_time_per_job_is_the_engines_own_estimate_of_that_job(tmp_path):
    """The Queue tab times a queued job through the engine's resolve + admit, as the worker will run it: a job's
    own memory overrides count (bf16 weights streamed on a 24 GB card take longer than the preset's int8)."""
    from ui.prediction import EngineEstimator
    from wan_local.engine.admit import admit_job
    from wan_local.engine.resolve import resolve_job

    box = MachineInfo("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9), 64 * GIB, 60 * GIB, 500 * GIB)
    store = JobStore(tmp_path / "jobs.sqlite3")
    presets = load_presets(BUILTIN_PRESETS_DIR)
    ctx = build_context(
        store=store, settings=SettingsStore(tmp_path / "settings.json"), machine=box,
        presets=presets, estimator=EngineEstimator(), measure=lambda m: m,
    )  # fmt: skip
    queue, seconds = QueueHandlers(ctx), []
    for memory in ({}, {"quant": "none"}):
        job = store.add(JobSettings(task="t2v-A14B", prompt="fox", size=(832, 480), memory=memory), validate=False)
        expected = admit_job(resolve_job(job.settings, machine=box, presets=presets, need_image=False))
        seconds.append(queue._estimate(job))
        assert seconds[-1] == expected.estimate.seconds
    assert seconds[0] < seconds[1]
