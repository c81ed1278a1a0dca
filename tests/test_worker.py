"""The worker: queue order, failures, cancel, out-of-memory retries with a fake runner, and a real worker process
running the tiny models that is killed mid-job, restarted, and loses nothing."""

from __future__ import annotations

import itertools
import os
import random
import re
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wan_local.errors import InputError
from wan_local.jobs.runner import JobOutOfMemory, PipelineRunner, Progress
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.jobs.worker import WorkerConfig, run_worker, spawn_worker
from wan_local.pipeline import WanPipeline
from wan_local.video import read_settings


class FakeRunner:
    """Runs `steps` fake steps per job, checking the cancel token before each like the denoise loop.

    A prompt "fail" raises InputError, "oom" a CUDA-style RuntimeError, a job with preset "big" JobOutOfMemory;
    `during(job, step)` is called after each step.
    """

    def __init__(self, tmp: Path, steps: int = 4, during=None) -> None:
        self.tmp, self.steps, self.during = tmp, steps, during
        self.runs: list[tuple[int, str | None]] = []

    def run(self, job, on_progress, cancel) -> Path:
        self.runs.append((job.id, job.settings.preset))
        on_progress(Progress("encode_text"))
        if job.settings.prompt == "fail":
            raise InputError("image /x.png cannot be read")
        if job.settings.prompt == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if job.settings.preset == "big":
            raise JobOutOfMemory(f"out of memory while generating job {job.id}")
        for step in range(self.steps):
            cancel.raise_if_cancelled()
            on_progress(Progress("denoise", step + 1, self.steps, eta_seconds=0.1))
            if self.during is not None:
                self.during(job, step + 1)
        out = self.tmp / f"{job.id}.mp4"
        out.write_bytes(b"video")
        return out


def _add(store: JobStore, prompt: str, **changes):
    base = {"task": "t2v-A14B", "ckpt_dir": "ckpt", "prompt": prompt}
    return store.add(JobSettings(**{**base, **changes}), validate=False)


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_worker_runs_the_queue_in_order_and_carries_on_after_failures(tmp_path, store):
    jobs = [_add(store, p) for p in ("a", "fail", "oom", "b")]
    store.move(jobs[3].id, "up")
    runner = FakeRunner(tmp_path)
    assert run_worker(store, runner, once=True, poll_s=0.01) == 4
    assert [r[0] for r in runner.runs] == [jobs[0].id, jobs[1].id, jobs[3].id, jobs[2].id]
    final = {j.settings.prompt: j for j in store.list()}
    assert final["a"].state == final["b"].state == "done"
    assert final["a"].output_path == str(tmp_path / f"{jobs[0].id}.mp4") and final["a"].progress.step == 4
    assert (final["fail"].state, final["fail"].error) == ("failed", "image /x.png cannot be read")
    assert final["oom"].state == "failed" and "out of memory" in final["oom"].error
    assert store.list(("running",)) == []
    with sqlite3.connect(store.path) as conn:  # unregistered on exit
        assert conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 0


def test_out_of_memory_requeues_once_with_the_lower_preset(tmp_path, store):
    ladder = {"huge": "big", "big": "small", "last": None}
    first = _add(store, "x", preset="huge")
    second = _add(store, "y", preset="last")  # no lower preset: plain failure
    fine = _add(store, "z")

    class Runner(FakeRunner):
        def run(self, job, on_progress, cancel):
            if job.settings.preset in ("huge", "last"):
                self.runs.append((job.id, job.settings.preset))
                raise RuntimeError("CUDA out of memory")
            return super().run(job, on_progress, cancel)

    runner = Runner(tmp_path)
    run_worker(store, runner, once=True, poll_s=0.01, config=WorkerConfig(lower_preset=ladder.get))
    # huge -> OOM -> re-queued at the front with "big" -> OOM again -> failed (only one automatic retry)
    assert runner.runs == [(first.id, "huge"), (first.id, "big"), (second.id, "last"), (fine.id, None)]
    job = store.get(first.id)
    assert (job.state, job.settings.preset, job.oom_retries, job.attempts) == ("failed", "big", 1, 2)
    assert "re-queued once with the lower preset 'big'" in job.note and "out of memory" in job.error
    assert store.get(second.id).state == "failed" and store.get(fine.id).state == "done"

    store.retry(first.id)
    run_worker(store, FakeRunner(tmp_path), once=True, config=WorkerConfig(lower_preset=ladder.get, retry_oom=False))
    assert store.get(first.id).state == "failed"


def test_cancel_and_stop_take_effect_within_one_step(tmp_path, store):
    cancelled, handed_back = _add(store, "cancel me"), _add(store, "stop here")
    stop = threading.Event()
    seen: dict[int, int] = {}

    def during(job, step):
        seen[job.id] = step
        if job.id == cancelled.id and step == 2:
            store.request_cancel(job.id)
        if job.id == handed_back.id and step == 3:
            stop.set()

    run_worker(store, FakeRunner(tmp_path, steps=50, during=during), stop, poll_s=0.01)
    # Both arrive after step 2 / 3 has been reported: the next step (in flight in a real run) is the last one.
    job = store.get(cancelled.id)
    assert (job.state, job.error, seen[cancelled.id]) == ("cancelled", "cancelled by the user", 3)
    job = store.get(handed_back.id)  # stopping the worker is not a user's cancel: the job goes back to the queue
    assert (job.state, job.attempts, seen[handed_back.id]) == ("queued", 1, 4)
    assert "stopped during this job" in job.note


def test_pipeline_runner_turns_oom_into_a_clear_failure(tiny, tmp_path, monkeypatch, store):
    def generate(self, settings, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.99 GiB total)")

    monkeypatch.setattr(WanPipeline, "generate", generate)
    job = _add(store, "a fox", ckpt_dir=str(tiny / "t2v-A14B"), size=(64, 48), frames=5, steps=2, device="cpu")
    runner = PipelineRunner(tmp_path / "out", tmp_path / "previews")
    with pytest.raises(JobOutOfMemory) as info:
        runner.run(store.claim_next("w"), lambda p: None, None)
    message = str(info.value)
    assert "Tried to allocate 20.00 GiB" in message and "lower memory preset" in message and f"job {job.id}" in message


# ---------------------------------------------------------------------------------------------------- real process


def _wait(what, predicate, timeout: float = 60.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_process_survives_sigkill(tiny, tmp_path, capsys):
    """Real tiny models on the CPU: SIGKILL mid-job, restart, nothing lost; a broken image fails alone; cancel
    stops within a step. Prints how long the restart took until the interrupted job ran again."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    t2v = {"task": "t2v-A14B", "ckpt_dir": str(tiny / "t2v-A14B"), "size": (64, 48), "frames": 5, "device": "cpu"}
    killed = store.add(JobSettings(prompt="a red fox in snow", steps=30, seed=5, **t2v))
    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(image)
    i2v = {**t2v, "task": "i2v-A14B", "ckpt_dir": str(tiny / "i2v-A14B"), "steps": 2}
    broken = store.add(JobSettings(prompt="a cat", image=str(image), **i2v))
    Path(broken.settings.image).write_bytes(b"\x89PNG\r\n\x1a\n damaged on disk")  # the stored copy breaks
    after = store.add(JobSettings(prompt="an owl", steps=3, seed=1, **t2v))
    cancel = store.add(JobSettings(prompt="a whale", steps=40, seed=2, **t2v))

    env = {**os.environ, "WAN_LOCAL_HOME": str(tmp_path)}
    entry = ("-m", "wan_local.jobs.worker")
    every_step = ("--checkpoint-every-s", "0")  # a resume point after every step
    first = spawn_worker(
        store.path, once=True, entry=entry, extra_args=every_step, log_path=tmp_path / "w1.log", env=env
    )
    try:
        _wait("job 1 mid-way", lambda: store.get(killed.id).progress.step >= 3, proc=first)
        first.kill()  # SIGKILL: no cleanup of any kind
        first.wait()
        killed_at = time.monotonic()
        assert store.get(killed.id).state == "running"  # what a crash leaves behind

        second = spawn_worker(
            store.path, once=True, entry=entry, extra_args=every_step, log_path=tmp_path / "w2.log", env=env
        )
        _wait("the re-run", lambda: store.get(killed.id).attempts == 2, proc=second)
        claimed_s = time.monotonic() - killed_at
        _wait("its first step", lambda: store.get(killed.id).progress.step >= 1, proc=second)
        first_step_s = time.monotonic() - killed_at

        def whale_running():
            job = store.get(cancel.id)
            return job.state == "running" and job.progress.step >= 2

        _wait("the job to cancel", whale_running, proc=second)
        store.request_cancel(cancel.id)
        step_at_cancel = store.get(cancel.id).progress.step
        assert second.wait(60) == 0
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    jobs = {j.id: j for j in store.list()}
    assert set(jobs) == {killed.id, broken.id, after.id, cancel.id}  # nothing lost
    resumed = re.search(rf"job {killed.id}: resuming after denoise step (\d+)", (tmp_path / "w2.log").read_text())
    assert resumed and int(resumed.group(1)) >= 3, "the killed job continues from its last resume point"
    assert not (tmp_path / "resume" / f"job{killed.id}.pt").exists(), "a finished job's resume point is removed"
    done = jobs[killed.id]
    assert (done.state, done.attempts, done.error) == ("done", 2, None)
    meta = read_settings(Path(done.output_path))
    assert meta["job_id"] == killed.id and meta["prompt"] == "a red fox in snow"
    assert (meta["seed"], meta["steps"], meta["size"], meta["frames"], meta["task"]) == (5, 30, "64*48", 5, "t2v-A14B")
    assert Path(done.preview_path).is_file()

    failed = jobs[broken.id]
    assert failed.state == "failed" and "cannot be read" in failed.error and broken.settings.image in failed.error
    assert jobs[after.id].state == "done" and jobs[after.id].started_at > failed.finished_at
    whale = jobs[cancel.id]
    assert (whale.state, whale.error) == ("cancelled", "cancelled by the user")
    assert whale.progress.step <= step_at_cancel + 1, "cancel must take effect within one step"
    with capsys.disabled():
        print(f"\nrestart after SIGKILL: job re-claimed after {claimed_s:.2f} s, first step after {first_step_s:.2f} s")


def test_out_of_memory_retries_follow_the_preset_fallback_chain():
    from wan_local.jobs.worker import fallback_preset

    assert fallback_preset("gpu24-ram64") == "gpu24-ram32"
    assert fallback_preset("gpu16-ram32") is None, "the bottom of the GPU chain never falls back to the CPU"
    assert fallback_preset("no-such-preset") is None
    assert fallback_preset("auto") is None  # this test machine has no GPU: the CPU preset, which has no fallback


def test_the_worker_admits_each_job_again_when_it_claims_it(tiny, tmp_path, store, monkeypatch):
    """RAM changes between queueing and running (overnight): a job that no longer fits fails with the admission's
    message before anything loads, and the queue goes on with the next job."""
    import dataclasses

    import wan_local.machine

    fits = dict(ckpt_dir=str(tiny / "t2v-A14B"), size=(64, 48), frames=5, steps=2, device="cpu")
    _add(store, "a fox", **fits)
    _add(store, "an owl", **fits)
    import wan_local.engine.resolve as resolve_module
    from wan_local.memory import ledger as ledger_module

    # A ledger of its own: models other tests left loaded would be evicted and the job admitted on the second try.
    monkeypatch.setattr(ledger_module, "_PROCESS_LEDGER", ledger_module.MemoryLedger())

    real = wan_local.machine.detect_machine()
    starved = dataclasses.replace(real, ram_available_bytes=2**30)  # 1 GiB left: less than the margin kept free
    machines = iter([starved])  # the first job's claim sees the starved machine, everything after the real one
    resolve = resolve_module.resolve_job
    monkeypatch.setattr(
        resolve_module, "resolve_job", lambda job, **kw: resolve(job, **{"machine": next(machines, real), **kw})
    )
    loads = []
    monkeypatch.setattr(WanPipeline, "__init__", lambda self, *a, **k: loads.append(a) or _no_pipeline())
    runner = PipelineRunner(tmp_path / "out", tmp_path / "previews")
    assert run_worker(store, runner, once=True, poll_s=0.01) == 2
    fox, owl = store.list()
    assert fox.state == "failed" and fox.error.startswith("Not started: this job does not fit this machine")
    assert "RAM" in fox.error
    assert owl.state == "failed" and "no pipeline in this test" in owl.error, "the next job was admitted and ran"
    assert len(loads) == 1, "nothing was loaded for the refused job"


def _no_pipeline():
    raise InputError("no pipeline in this test")


def test_the_runner_accounts_what_it_holds_and_evicts_it_for_a_job_that_needs_the_room(tiny, tmp_path, monkeypatch):
    """Models kept from a job are in the process's memory ledger (and its snapshot for the Models tab); a later job
    that fits only without them evicts them (least recently used first) instead of being refused."""
    import dataclasses
    import json

    import wan_local.machine
    from wan_local.engine.admit import admit_job
    from wan_local.engine.resolve import resolve_job
    from wan_local.memory.ledger import process_ledger
    from wan_local.presets import ram_safety_margin_bytes

    store = JobStore(tmp_path / "jobs.sqlite3")
    ledger = process_ledger()
    earlier = {e.key for e in ledger.entries()}  # what other tests in this process may still hold
    fits = dict(ckpt_dir=str(tiny / "t2v-A14B"), size=(64, 48), frames=5, steps=6, device="cpu", dtype="fp32")
    first = _add(store, "a fox", memory={"keep_idle_expert": "keep"}, **fits)
    runner = PipelineRunner(tmp_path / "out", tmp_path / "previews", loaded_path=tmp_path / "loaded.json")
    runner.run(store.claim_next("w"), lambda p: None, None)
    store.finish(first.id, "w", "done")
    held = ledger.total("host")
    snapshot = json.loads((tmp_path / "loaded.json").read_text())["entries"]
    kinds = sorted(e["kind"] for e in snapshot if e["key"] not in earlier)
    assert kinds == ["dit", "dit", "vae"] and held > 0

    second = _add(store, "an owl", **fits)
    real = dataclasses.replace(wan_local.machine.detect_machine(), ram_total_bytes=8 * 2**30)
    peak = admit_job(resolve_job(second.settings, machine=real)).estimate.peak_ram_bytes
    free_when_empty = ram_safety_margin_bytes(real) + peak  # the job just fits once nothing else is held
    monkeypatch.setattr(
        wan_local.machine, "detect_machine",
        lambda *a, **k: dataclasses.replace(real, ram_available_bytes=free_when_empty - ledger.total("host")),
    )  # fmt: skip
    _, admission = runner.admit(store.claim_next("w"))
    assert admission.admitted and ledger.total("host") < held, "idle models were evicted to make room"
    assert not [e for e in ledger.entries() if e.kind == "dit" and e.key not in earlier], "kept experts went first"
    runner.close()


# ---------------------------------------------------------------------------------------------------- many kills

FAULT_WORKER = (str(Path(__file__).with_name("fault_worker.py")),)
KILL_POINTS = ("load", "denoise", "decode", "mp4", "commit")


def _temp_files(root: Path) -> list[Path]:
    """Temp files of interrupted writes anywhere under `root` (hidden files, *.tmp, *.part)."""
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix in (".tmp", ".part"))]


def _runs(log: str) -> list[tuple[int, str]]:
    """(job id, its lines) for each run of a job in a worker's log."""
    parts = re.split(r"job (\d+): start", log)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


def _kill_at(point: str, store: JobStore, proc, rng, steps: int, max_kills_per_job: int) -> int | None:
    """SIGKILL the worker `proc` at the first `point` reached by a job it has crashed fewer than
    `max_kills_per_job` times; return that job's id, or None when the worker ended first."""
    target_step = rng.randint(1, steps - 1)

    def reached() -> int | None:
        for job in store.list(("running",)):
            if job.crashes >= max_kills_per_job or job.worker_pid != proc.pid:
                continue
            stage, step = job.progress.stage, job.progress.step
            mp4 = any(f".w{proc.pid}." in p.name for p in store.outputs_dir.glob(".*.mp4"))
            if {
                "load": stage in ("starting", "encode_text", "condition"),
                "denoise": stage == "denoise" and step >= target_step,
                "decode": stage == "decode",
                "mp4": stage == "save" and mp4,
                "commit": stage == "commit",
            }[point]:
                return job.id
        return None

    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        job_id = reached()
        if job_id is not None:
            if point == "load":
                time.sleep(rng.uniform(0.0, 1.0))  # anywhere in loading (imports, admission, weights, text encoder)
            proc.kill()
            proc.wait()
            return job_id
        time.sleep(0.01)
    return None


@pytest.mark.slow
def test_twenty_sigkills_at_random_points_lose_nothing_run_nothing_twice_leave_no_temp_files(tiny, tmp_path, capsys):
    """The worker SIGKILLed 22 times, at random points of 12 real tiny jobs (loading, denoise step k, decode, inside
    the MP4 write, just before the "done" commit), restarted after each kill. Every job ends done exactly once; a
    re-run resumes from its last resume point (no denoise step that was saved runs again); every video equals an
    uninterrupted run's frame for frame; no temp file and no resume point is left. Prints the numbers."""
    from wan_local.jobs.store import MAX_CRASHES
    from wan_local.video import read_frames

    started = time.monotonic()
    rng = random.Random(int(os.environ.get("WAN_LOCAL_KILL_SEED", "2207")))
    steps, kill_count = 3, 22
    plan = [*KILL_POINTS * (kill_count // len(KILL_POINTS)), *rng.sample(KILL_POINTS, kill_count % len(KILL_POINTS))]
    rng.shuffle(plan)
    store = JobStore(tmp_path / "jobs.sqlite3")
    t2v = {"task": "t2v-A14B", "ckpt_dir": str(tiny / "t2v-A14B"), "size": (64, 48), "frames": 5, "device": "cpu"}
    variants = [("a red fox in snow", 5), ("an owl at night", 6), ("a whale", 7)]
    jobs = [store.add(JobSettings(prompt=p, seed=s, steps=steps, **t2v)) for p, s in variants * 4]

    env = {**os.environ, "WAN_LOCAL_HOME": str(tmp_path), "FAULT_PAUSE_S": "0.15"}
    args = ("--checkpoint-every-s", "0", "--poll-s", "0.05")
    kills: list[tuple[int | None, str, int, int]] = []  # (job hit, point, denoise step seen, worker number)
    for n in itertools.count(1):
        proc = spawn_worker(
            store.path, once=True, entry=FAULT_WORKER, extra_args=args, log_path=tmp_path / f"w{n}.log", env=env
        )
        try:
            if len(kills) == len(plan):
                assert proc.wait(300) == 0, (tmp_path / f"w{n}.log").read_text()[-3000:]
                break
            job_id = _kill_at(plan[len(kills)], store, proc, rng, steps, MAX_CRASHES - 1)
            assert job_id is not None, f"worker {n} ended before reaching {plan[len(kills)]}"
            job = store.get(job_id)  # a kill that came just after the "done" commit hit no job
            kills.append((job_id if job.state == "running" else None, plan[len(kills)], job.progress.step, n))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {n: (tmp_path / f"w{n}.log").read_text() for n in range(1, n + 1)}

    final = {job.id: job for job in store.list()}
    lost = [job.id for job in jobs if job.id not in final or final[job.id].state != "done"]
    done_lines = {job.id: sum(log.count(f"job {job.id}: done ->") for log in logs.values()) for job in jobs}
    twice = [job_id for job_id, count in done_lines.items() if count != 1]
    for job_id, point, seen, n in kills:  # each later run of the job that denoises resumes from the step seen
        for later in range(n + 1, len(logs) + 1):
            for run_of, lines in _runs(logs[later]):
                resumed = re.search(rf"job {job_id}: resuming after denoise step (\d+)", lines)
                if run_of != job_id or not seen or "stage: denoise" not in lines:
                    continue
                if resumed is None or int(resumed.group(1)) < min(seen, steps - 1):
                    twice.append((job_id, point, later))
    leftovers = _temp_files(tmp_path)
    resume_left = sorted(p.name for p in (tmp_path / "resume").glob("*"))
    per_job = {job.id: sum(k[0] == job.id for k in kills) for job in jobs}

    references = {}  # an uninterrupted run of each variant, in this process
    reference_store = JobStore(tmp_path / "reference" / "jobs.sqlite3")
    for prompt, seed in variants:
        reference_store.add(JobSettings(prompt=prompt, seed=seed, steps=steps, **t2v))
    run_worker(reference_store, PipelineRunner(tmp_path / "reference" / "out", tmp_path / "reference" / "p"), once=True)
    for job in reference_store.list():
        references[job.settings.prompt] = read_frames(Path(job.output_path))
    different = [
        j.id
        for j in final.values()
        if not np.array_equal(read_frames(Path(j.output_path)), references[j.settings.prompt])
    ]

    seconds = time.monotonic() - started
    with capsys.disabled():
        points = {p: sum(k[1] == p for k in kills) for p in KILL_POINTS}
        print(
            f"\n{len(kills)} SIGKILLs over {len(jobs)} jobs ({points}; per job {sorted(per_job.values())}): lost "
            f"{len(lost)}, ran twice {len(twice)}, temp files left {len(leftovers)}, resume points left "
            f"{len(resume_left)}, videos differing from an uninterrupted run {len(different)}; {seconds:.0f} s"
        )
    assert len(kills) >= 20 and all(count >= 4 for count in points.values())
    assert (lost, twice, leftovers, resume_left, different) == ([], [], [], [], [])
    assert all(final[j].attempts == per_job[j] + 1 and final[j].crashes == per_job[j] for j in per_job)
