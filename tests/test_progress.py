"""True progress: the stages of a job weighted into one fraction that moves monotonically to 1 through decode and
save, seconds left that count decode; checked on the tracker with a clock we control and on a real tiny job."""

from __future__ import annotations

import shutil

import pytest

from wan_local.jobs.progress import STAGES, ProgressTracker, expected_stage_seconds
from wan_local.jobs.runner import PipelineRunner
from wan_local.jobs.store import JobSettings, JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_tracker(clock: Clock, tracker: ProgressTracker, step_s: list[float], decode_s: float):
    snaps = [tracker.stage("encode_text")]
    clock.now += 2
    snaps.append(tracker.stage("condition"))
    clock.now += 1
    snaps.append(tracker.stage("denoise"))
    for i, seconds in enumerate(step_s):
        clock.now += seconds
        snaps.append(tracker.step(i + 1, len(step_s)))
    snaps.append(tracker.stage("decode"))
    clock.now += decode_s
    snaps.append(tracker.stage("save"))
    snaps.append(tracker.finish())
    return snaps


def test_the_fraction_is_monotonic_reaches_one_only_at_the_end_and_the_time_left_counts_decode():
    by_stage = {"load_models": 20.0, "encode_text": 4.0, "denoise": 100.0, "decode": 40.0}  # 10 steps of 10 s
    expected = expected_stage_seconds(by_stage, 10)
    assert set(expected) == set(STAGES) and expected["denoise"] == 120.0 and expected["save"] == 4.0
    clock = Clock()
    tracker = ProgressTracker(10, expected, load_seconds=20.0, clock=clock)
    # This machine runs a step in 5 s (half the estimate); the first step also loads the expert (30 s).
    snaps = _run_tracker(clock, tracker, [30.0] + [5.0] * 9, decode_s=20.0)
    fractions = [s.fraction for s in snaps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0
    assert [s.stage for s in snaps][-3:] == ["decode", "save", "save"]
    denoise = [s for s in snaps if s.stage == "denoise" and s.step > 0]
    assert [s.step for s in denoise] == list(range(1, 11))
    # Before any step is measured the estimate is the time left: every stage still to come.
    assert snaps[0].eta_seconds == pytest.approx(sum(expected.values()))
    # After the last step, only decode and save are left, scaled by the measured speed (5 s / 10 s per step).
    assert denoise[-1].eta_seconds == pytest.approx(0.5 * (40.0 + 4.0))
    assert denoise[4].eta_seconds == pytest.approx(5 * 5.0 + 0.5 * 44.0)  # 5 steps of 5 s, then decode + save
    decode = next(s for s in snaps if s.stage == "decode")
    assert decode.step == decode.total == 10, "decode does not show step 0"
    assert decode.eta_seconds == pytest.approx(22.0) and snaps[-2].fraction > decode.fraction >= denoise[-1].fraction
    # The first step carries the weight of loading the experts.
    w = tracker.weights
    first = w["encode_text"] + w["condition"] + w["denoise"] * (20 / 120 + (100 / 120) / 10)
    assert denoise[0].fraction == pytest.approx(first, abs=1e-4)  # reported to 4 decimals


def test_without_an_estimate_the_time_left_is_unknown_until_steps_are_timed_and_then_counts_decode():
    clock = Clock()
    tracker = ProgressTracker(4, clock=clock)
    snaps = _run_tracker(clock, tracker, [9.0, 2.0, 2.0, 2.0], decode_s=3.0)
    fractions = [s.fraction for s in snaps]
    assert fractions == sorted(fractions) and fractions.count(1.0) == 1
    assert snaps[0].eta_seconds is None and snaps[3].eta_seconds is not None  # one step timed (the first)
    last_step = [s for s in snaps if s.stage == "denoise"][-1]
    assert last_step.step == 4 and last_step.eta_seconds > 0, "decode and save are still to come"


def test_a_real_tiny_job_reports_monotonic_progress_through_decode(tiny, tmp_path):
    """The runner of the tiny t2v-A14B models: the fraction never goes back, is 1 only once the MP4 is written,
    decode keeps the steps at their total and its time left is reported, and the last denoise step still counts
    decode; every step writes the preview."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = JobSettings(
        task="t2v-A14B", ckpt_dir=str(tiny / "t2v-A14B"), prompt="a fox", size=(64, 48), frames=5, steps=4,
        device="cpu", dtype="fp32",
    )  # fmt: skip
    store.add(settings, validate=False)
    job = store.claim_next("w")
    runner = PipelineRunner(tmp_path / "out", tmp_path / "previews")
    reports, previews = [], []

    def on_progress(p):
        reports.append(p)
        store.update_progress(
            job.id, "w", step=p.step, total=p.total, stage=p.stage, eta_seconds=p.eta_seconds,
            preview_path=p.preview_path, fraction=p.fraction,
        )  # fmt: skip
        recorded = store.get(job.id).progress
        assert recorded.fraction == p.fraction and recorded.stage == p.stage
        if p.preview_path:
            previews.append(shutil.copy(p.preview_path, tmp_path / f"step{p.step}.png"))

    try:
        video = runner.run(job, on_progress, None)
    finally:
        runner.close()
    assert video.is_file()
    stages = [p.stage for p in reports]
    assert stages[:3] == ["encode_text", "condition", "denoise"] and stages[-3:] == ["decode", "save", "save"]
    fractions = [p.fraction for p in reports]
    assert all(f is not None for f in fractions) and fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0
    steps = [p for p in reports if p.stage == "denoise" and p.step > 0]
    assert [p.step for p in steps] == [1, 2, 3, 4] and len(previews) == 4
    assert steps[-1].eta_seconds is not None and steps[-1].eta_seconds > 0, "the time left counts decode"
    decode = reports[stages.index("decode")]
    assert decode.step == decode.total == 4 and decode.eta_seconds is not None
    store.finish(job.id, "w", "done", output_path=str(video))
    assert store.get(job.id).progress.fraction == 1.0


def test_queue_list_shows_the_whole_jobs_fraction_and_time_left(tmp_path):
    from wan_local.jobs.commands import _describe

    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = JobSettings(task="t2v-A14B", ckpt_dir="ckpt", prompt="a fox", size=(64, 48), frames=5, steps=3)
    job_id = store.add(settings, validate=False).id
    store.claim_next("w")
    assert store.get(job_id).progress.fraction is None  # nothing reported yet
    store.update_progress(job_id, "w", step=3, total=3, stage="decode", eta_seconds=12.3, fraction=0.874)
    assert "  87 % ~12s  t2v-A14B" in _describe(store.get(job_id))
    store.finish(job_id, "w", "done")
    job = store.get(job_id)
    assert job.progress.fraction == 1.0 and "  3/3  " in _describe(job)
