"""Faults the queue survives, each with a real SQLite file and, where it takes one, a real worker process: a job
that kills its worker every time, a disk that fills up mid-job, damaged job rows, a database from before schema
versions, and what interrupted writes and finished jobs leave behind."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_worker import FAULT_WORKER, FakeRunner, _wait

from wan_local.errors import InputError
from wan_local.jobs.database import MIGRATIONS, SCHEMA_VERSION, StoreError
from wan_local.jobs.housekeeping import prune_resume_points, tidy
from wan_local.jobs.resume import ResumePoints
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.jobs.worker import WorkerConfig, run_worker, spawn_worker


def _t2v(tiny: Path, **changes) -> JobSettings:
    base = {"task": "t2v-A14B", "ckpt_dir": str(tiny / "t2v-A14B"), "size": (64, 48), "frames": 5, "device": "cpu"}
    return JobSettings(**{**base, "steps": 2, **changes})


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "WAN_LOCAL_HOME": str(home), **extra}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------- poison


def test_a_job_that_kills_its_worker_every_time_is_failed_after_three_crashes_and_the_queue_goes_on(tiny, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    poison = store.add(_t2v(tiny, prompt="poison: kills the worker", seed=1))
    fine = store.add(_t2v(tiny, prompt="a fox", seed=2))
    codes = []
    for n in range(1, 7):
        proc = spawn_worker(
            store.path, once=True, entry=FAULT_WORKER, log_path=tmp_path / f"w{n}.log", env=_env(tmp_path)
        )
        codes.append(proc.wait(300))
        if codes[-1] == 0:
            break
    assert codes == [-9, -9, -9, 0], "three SIGKILLs by the job, then the fourth worker fails it and goes on"
    job = store.get(poison.id)
    assert (job.state, job.attempts, job.crashes) == ("failed", 3, 3)
    assert job.error.startswith("this job crashed the worker 3 times")
    assert store.get(fine.id).state == "done"
    assert "crashed the worker 3 times: failed, the queue goes on" in (tmp_path / "w4.log").read_text()
    again = store.retry(poison.id)  # a user's retry starts the count again
    assert (again.state, again.crashes) == ("queued", 0)


def test_crashes_are_counted_per_job_and_a_clean_stop_is_no_crash(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, b = store.add(_t2v(tmp_path, prompt="a"), validate=False), store.add(_t2v(tmp_path, prompt="b"), validate=False)

    def crash_on(job_id: int) -> None:  # the claiming worker dies (a pid that no longer exists)
        store.register_worker("doomed")
        assert store.claim_next("doomed").id == job_id
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE workers SET pid = ?", (_dead_pid(),))

    crash_on(a.id)
    assert store.requeue_stale(max_crashes=2) == [a.id] and store.get(a.id).state == "queued"
    crash_on(a.id)
    assert store.requeue_stale(max_crashes=2) == [a.id] and store.get(a.id).state == "failed"
    assert store.get(a.id).error.startswith("this job crashed the worker 2 times")
    store.register_worker("clean")
    assert store.claim_next("clean").id == b.id  # the poisoned job no longer stands in front
    store.requeue(b.id, "clean", note="stopped")  # a clean stop (SIGTERM) hands back without a crash
    assert (store.get(b.id).state, store.get(b.id).crashes) == ("queued", 0)


# ---------------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.name == "posix" and os.geteuid() == 0
    if mounted:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode == 0
    if not mounted:
        pytest.skip("mounting a small tmpfs needs root (the fake-disk test below covers the logic)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; return the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 14, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_the_job_with_the_reason_and_the_worker_lives_on(tiny, tmp_path, small_disk):
    """The disk of the queue (database, previews, resume points, videos) fills up mid-job: the job fails with "the
    disk is full", the database refuses the outcome until space is freed, the worker waits instead of dying, then
    records it and runs the next job. No temp file is left."""
    store = JobStore(small_disk / "jobs.sqlite3")
    first = store.add(_t2v(tiny, prompt="a red fox", steps=12, seed=3))
    second = store.add(_t2v(tiny, prompt="an owl", seed=4))
    log = tmp_path / "worker.log"  # the log lives on another disk, so it can be read
    env = _env(small_disk, FAULT_PAUSE_S="0.3")
    args = ("--checkpoint-every-s", "0")
    proc = spawn_worker(store.path, once=True, entry=FAULT_WORKER, extra_args=args, log_path=log, env=env)
    try:
        _wait("the first job mid-way", lambda: store.get(first.id).progress.step >= 2, timeout=180, proc=proc)
        filler = _fill(small_disk)
        _wait("the outcome refused by the full disk", lambda: "could not be recorded" in log.read_text(), proc=proc)
        time.sleep(1.0)
        assert proc.poll() is None and store.get(first.id).state == "running", "the worker waits, alive"
        filler.unlink()
        assert proc.wait(180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job = store.get(first.id)
    assert job.state == "failed" and job.error.startswith("the disk is full: cannot write ")
    assert "No space left on device" in job.error and str(small_disk) in job.error
    assert store.get(second.id).state == "done"
    assert [p.name for p in small_disk.rglob(".*")] == []


def test_a_full_disk_seen_through_a_fake_file_system(tmp_path, monkeypatch, caplog):
    """The same without root: the runner's write raises ENOSPC and the database refuses the first two writes of
    the outcome; the job fails with the reason, the worker records it on the third try and goes on."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    full, after = (
        store.add(_t2v(tmp_path, prompt="disk full"), validate=False),
        store.add(_t2v(tmp_path, prompt="b"), validate=False),
    )

    class FullDisk(FakeRunner):
        def run(self, job, on_progress, cancel):
            if job.id == full.id:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "resume" / "job1.pt"))
            return super().run(job, on_progress, cancel)

    refusals = iter([True, True])
    finish = JobStore.finish

    def flaky_finish(self, *args, **kwargs):
        if next(refusals, False):
            raise StoreError(f"cannot use the job queue {self.path}: database or disk is full")
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish", flaky_finish)
    monkeypatch.setattr("wan_local.jobs.worker.STORE_RETRY_MAX_S", 0.01)
    started = time.monotonic()
    assert run_worker(store, FullDisk(tmp_path), once=True, poll_s=0.01) == 2
    assert time.monotonic() - started < 10
    job = store.get(full.id)
    assert job.state == "failed" and job.error.startswith("the disk is full: cannot write ")
    assert store.get(after.id).state == "done"
    assert sum("could not be recorded" in r.message for r in caplog.records) == 2


# ---------------------------------------------------------------------------------------------------- damaged rows


def test_damaged_rows_are_set_aside_listed_and_skipped(tiny, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    not_json, wrong_type, wrong_seed = (store.add(_t2v(tiny, prompt=p)) for p in ("x", "y", "z"))
    good = store.add(_t2v(tiny, prompt="a fox", seed=2))
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE jobs SET settings = '{not json' WHERE id = ?", (not_json.id,))
        conn.execute("UPDATE jobs SET settings = json_set(settings, '$.steps', 'many') WHERE id = ?", (wrong_type.id,))
        conn.execute("UPDATE jobs SET resolved_seed = 'abc' WHERE id = ?", (wrong_seed.id,))
    proc = spawn_worker(store.path, once=True, log_path=tmp_path / "w.log", env=_env(tmp_path))
    assert proc.wait(300) == 0, "the worker takes the damaged rows out of its way"
    assert store.get(good.id).state == "done"

    with sqlite3.connect(store.path) as conn:  # damaged after it ran: readers must survive that too
        conn.execute("UPDATE jobs SET settings = '[]' WHERE id = ?", (good.id,))
    cmd = [sys.executable, "-m", "wan_local", "queue", "list", "--store", str(store.path)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(tmp_path), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("failed") == 4 and out.stdout.count("this job's stored record is damaged") == 4
    assert "not valid JSON" in out.stdout and "setting steps is 'many'" in out.stdout
    assert "column resolved_seed holds 'abc'" in out.stdout and "are a JSON list" in out.stdout
    listed = subprocess.run([*cmd, "--json"], cwd=REPO_ROOT, capture_output=True, text=True, env=_env(tmp_path))
    assert {j["state"] for j in json.loads(listed.stdout)} == {"failed"}
    with pytest.raises(InputError, match="cannot run again"):
        store.retry(not_json.id)
    store.remove(not_json.id)
    assert not_json.id not in [j.id for j in store.list()]


def test_a_database_from_before_schema_versions_is_migrated_or_refused_by_name(tmp_path):
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as conn:  # version 1's tables, but no record of the version
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO jobs (created_at, position, state, settings, resolved_seed) VALUES (1, 1, 'queued', ?, 5)",
            (json.dumps(_t2v(tmp_path, prompt="kept").to_dict()),),
        )
    conn.close()
    (job,) = JobStore(old).list()
    assert (job.settings.prompt, job.resolved_seed, job.crashes) == ("kept", 5, 0)
    with sqlite3.connect(old) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()

    odd = tmp_path / "odd.sqlite3"
    with sqlite3.connect(odd) as conn:
        conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, settings TEXT)")
    conn.close()
    before = odd.read_bytes()
    with pytest.raises(StoreError) as info:
        JobStore(odd)
    message = str(info.value)
    assert str(odd) in message and "jobs.position" in message and "the table workers" in message
    assert "left untouched" in message
    assert "disk" not in message.replace("videos already made", ""), "no disk-full advice for a schema problem"
    assert odd.read_bytes() == before


# ---------------------------------------------------------------------------------------------------- leftovers


def test_interrupted_writes_and_unneeded_resume_points_are_cleaned_up(tiny, tmp_path):
    """SIGKILL inside the MP4 write, then just before the "done" commit: the next worker removes the dead writer's
    temp file, and the job resumes from its last step both times (its resume point outlived the saved video). A
    cancelled job keeps its resume point for a retry until it is removed; then the worker deletes it."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.add(_t2v(tiny, prompt="a red fox", steps=3, seed=5))
    cancelled = store.add(_t2v(tiny, prompt="an owl", steps=3, seed=6))
    env = _env(tmp_path, FAULT_PAUSE_S="0.3")
    args = ("--checkpoint-every-s", "0")
    resume = tmp_path / "resume"

    def start(n: int):
        log = tmp_path / f"w{n}.log"
        return spawn_worker(store.path, once=True, entry=FAULT_WORKER, extra_args=args, log_path=log, env=env)

    first = start(1)
    temp = _wait("the MP4 temp file", lambda: list(store.outputs_dir.glob(f".*.w{first.pid}.*.mp4")), 180, first)
    first.kill()
    first.wait()
    assert temp[0].is_file() and (resume / f"job{job.id}.pt").is_file()
    second = start(2)
    _wait("the commit", lambda: store.get(job.id).progress.stage == "commit", 180, second)
    second.kill()  # the video is saved, the job not yet recorded done
    second.wait()
    assert list(store.outputs_dir.glob("job*.mp4")), "the video was saved before the kill"
    assert store.get(job.id).state == "running"
    third = start(3)
    _wait("the temp file of the killed writer removed", lambda: not temp[0].exists(), 60, third)
    _wait("the owl denoising", lambda: store.get(cancelled.id).progress.step >= 2, 180, third)
    store.request_cancel(cancelled.id)
    assert third.wait(180) == 0

    for n in (2, 3):
        assert f"job {job.id}: resuming after denoise step 2" in (tmp_path / f"w{n}.log").read_text()
    done = store.get(job.id)
    assert (done.state, done.attempts, done.crashes) == ("done", 3, 2)
    assert not (resume / f"job{job.id}.pt").exists(), "deleted once the job is recorded done"
    assert store.get(cancelled.id).state == "cancelled" and (resume / f"job{cancelled.id}.pt").is_file()
    store.remove(cancelled.id)
    assert start(4).wait(180) == 0
    assert list(resume.iterdir()) == [] and [p.name for p in tmp_path.rglob(".*")] == []


def test_housekeeping_rules(tmp_path):
    """Temp files go when their writer is dead (or, for names of older versions, after an hour), never while it
    lives; resume points go when their job is done or removed, or a week after it failed or was cancelled."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    points = ResumePoints(tmp_path / "resume")
    dead, alive = _dead_pid(), os.getpid()
    folders = (store.outputs_dir, store.previews_dir, store.inputs_dir, points.folder)
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / f".job00001_t2v.w{dead}.abcd_123.mp4").touch()
        (folder / f".job1.w{alive}.abcd_123.png").touch()
    legacy_old, legacy_new = (
        store.outputs_dir / ".job00002_x.zz9_aaaa.mp4",
        store.outputs_dir / ".job00003_y.q1w2e3r4.mp4",
    )
    legacy_old.touch()
    legacy_new.touch()
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))

    jobs = {
        state: store.add(_t2v(tmp_path, prompt=state), validate=False) for state in ("done", "old", "new", "queued")
    }
    store.register_worker("w")
    for state in ("done", "old", "new"):
        claimed = store.claim_next("w")
        store.finish(claimed.id, "w", "done" if state == "done" else "cancelled")
    removed = store.add(_t2v(tmp_path, prompt="removed"), validate=False)
    store.remove(removed.id)
    for job in (*jobs.values(), removed):
        points.path(job.id).write_bytes(b"resume")
    week_ago = time.time() - 8 * 24 * 3600
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (week_ago, jobs["old"].id))
    os.utime(points.path(jobs["old"].id), (week_ago, week_ago))

    tidy(store, points)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(".*"))
    assert left == sorted(
        [f"{f.relative_to(tmp_path).as_posix()}/.job1.w{alive}.abcd_123.png" for f in folders]
        + [legacy_new.relative_to(tmp_path).as_posix()]
    )
    assert sorted(points.saved()) == [jobs["new"].id, jobs["queued"].id]
    assert prune_resume_points(store, points, now=time.time() + 8 * 24 * 3600) == [jobs["new"].id]


def test_a_worker_stopped_while_the_disk_is_full_gives_up_cleanly(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add(_t2v(tmp_path, prompt="a"), validate=False)
    stop = threading.Event()

    def refuse(self, *args, **kwargs):
        stop.set()  # the user stops the worker while it waits for space
        raise StoreError("database or disk is full")

    monkeypatch.setattr(JobStore, "finish", refuse)
    with pytest.raises(StoreError, match="disk is full"):
        run_worker(store, FakeRunner(tmp_path, steps=1), stop, once=True, config=WorkerConfig())
    assert store.list()[0].state == "running", "left for the next worker to re-queue"
