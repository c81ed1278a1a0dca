"""The job queue on disk: one SQLite file that survives crashes, kills and power loss.

Every fact about a job lives in the database, never only in memory: a worker that dies mid-job leaves the job
`running` with its pid and heartbeat, and the next worker puts it back at the front of the queue
(`requeue_stale`), counting the crash; a job that has crashed its worker `max_crashes` times is failed instead, so
one poisoned job cannot block the queue. The file itself (schema, connections, durable write transactions, errors
that name the file and the remedy) is `wan_local.jobs.database`; which worker serves the queue is
`wan_local.jobs.registry`; what a row means (and how a damaged one is set aside) is `wan_local.jobs.records`.

A job's input image is copied into the store's folder when the job is added, so deleting or editing the
original loses nothing; `image_source` records where it came from (the path given, unless the caller names the
source itself, as the app does for a browser upload).

States: queued -> running -> done | failed | cancelled; failed/cancelled -> queued (retry);
running -> queued (worker died, stopped, or an out-of-memory retry with a lower preset); any -> failed (a damaged
row, set aside by the first reader that finds it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wan_local import paths
from wan_local.errors import InputError
from wan_local.jobs import records, registry
from wan_local.jobs.database import DB_NAME, JobDatabase, StoreError
from wan_local.jobs.records import STATES, Job, JobSettings, MalformedJob
from wan_local.jobs.registry import WorkerInfo
from wan_local.tempfiles import atomic_write

log = logging.getLogger(__name__)

__all__ = ["FINAL_STATES", "MAX_CRASHES", "STATES", "Job", "JobSettings", "JobStore", "WorkerAlreadyRunning"]

FINAL_STATES = ("done", "failed", "cancelled")
MAX_CRASHES = 3  # a job that was running when its worker died this often is failed instead of re-queued


class WorkerAlreadyRunning(StoreError):
    """A live worker already serves this queue (one GPU, one worker)."""


def default_home() -> Path:
    """The folder of the store: $WAN_LOCAL_HOME if set, else the per-user data folder of wan-local."""
    return paths.data_dir()


def default_store_path() -> Path:
    """<home>/jobs.sqlite3 (see `default_home`)."""
    return default_home() / DB_NAME


# ---------------------------------------------------------------------------------------------------- store


class JobStore:
    """The persistent queue in `path` (default `default_store_path()`); safe to use from several threads and
    processes at once. Every method commits before returning."""

    def __init__(self, path: Path | str | None = None, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.folder = self.path.parent
        self.inputs_dir = self.folder / "inputs"
        self.previews_dir = self.folder / "previews"
        self.outputs_dir = self.folder / "outputs"
        self._db = JobDatabase(self.path, busy_timeout_s=busy_timeout_s)

    # ------------------------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        self._db.close()

    def _row(self, conn: sqlite3.Connection, job_id: int) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise InputError(f"there is no job {job_id} in {self.path}")
        return row

    def _job(self, conn: sqlite3.Connection, job_id: int) -> Job:
        """The job `job_id` inside a write transaction; a damaged row is set aside in it (see `_jobs`)."""
        row = self._row(conn, job_id)
        try:
            return records.job_from_row(row)
        except MalformedJob as exc:
            self._quarantine(conn, row, exc.reason)
            return records.quarantined_job(row, exc.reason)

    def _jobs(self, rows: Sequence[sqlite3.Row]) -> list[Job]:
        """Jobs of rows read outside a transaction. A damaged row is listed as a failed stand-in with the reason,
        and marked failed in the file (best effort: a reader never fails because of one row)."""
        jobs, damaged = [], []
        for row in rows:
            try:
                jobs.append(records.job_from_row(row))
            except MalformedJob as exc:
                jobs.append(records.quarantined_job(row, exc.reason))
                damaged.append((row, exc.reason))
        if damaged:
            try:
                with self._db.write() as conn:
                    for row, reason in damaged:
                        self._quarantine(conn, row, reason)
            except StoreError as exc:
                log.warning("damaged job record(s) not marked failed yet: %s", exc)
        return jobs

    @staticmethod
    def _quarantine(conn: sqlite3.Connection, row: sqlite3.Row, reason: str) -> None:
        error = records.quarantine_message(row["id"], reason)
        cur = conn.execute(
            "UPDATE jobs SET state = 'failed', error = ?, finished_at = COALESCE(finished_at, ?), worker_id = NULL, "
            "worker_pid = NULL WHERE id = ? AND (state != 'failed' OR error IS NOT ?)",
            (error, time.time(), row["id"], error),
        )
        if cur.rowcount:
            log.error("job %d: %s", row["id"], error)

    @staticmethod
    def _front(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COALESCE(MIN(position), 1) - 1 FROM jobs").fetchone()[0]

    @staticmethod
    def _back(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]

    # ------------------------------------------------------------------------------------------- queue edits

    def _copy_image(self, source: str) -> str:
        """Copy an input image into <folder>/inputs/<sha256 prefix><suffix> (durably); return the copy's path."""
        src = Path(source)
        if not src.is_file():
            raise InputError(f"image {src} does not exist")
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:24]
        target = self.inputs_dir / f"{digest}{src.suffix.lower()}"
        if not target.is_file():
            self.inputs_dir.mkdir(parents=True, exist_ok=True)
            # durable: the job row will point at it, so it must survive a power loss too
            with atomic_write(target, durable=True, mode=None) as tmp, tmp.open("wb") as out, src.open("rb") as inp:
                shutil.copyfileobj(inp, out)
        return str(target)

    def _prepare(self, settings: JobSettings, validate: bool) -> JobSettings:
        if validate:
            settings.check()
        if settings.image and Path(settings.image).parent != self.inputs_dir:
            source = settings.image_source or str(settings.image)  # where it came from: a caller may know better
            settings = dataclasses.replace(settings, image=self._copy_image(settings.image), image_source=source)
        return settings

    def add(self, settings: JobSettings, *, validate: bool = True) -> Job:
        """Append a job at the end of the queue; copies the image and draws the seed if it is -1."""
        settings = self._prepare(settings, validate)
        seed = settings.seed if settings.seed >= 0 else random.randint(0, sys.maxsize)
        with self._db.write() as conn:
            cur = conn.execute(
                "INSERT INTO jobs (created_at, position, state, settings, resolved_seed) VALUES (?, ?, 'queued', ?, ?)",
                (time.time(), self._back(conn), json.dumps(settings.to_dict()), seed),
            )
            return self._job(conn, cur.lastrowid)

    def get(self, job_id: int) -> Job:
        """The job `job_id`; InputError if there is none."""
        with self._db.errors():
            row = self._row(self._db.conn(), job_id)
        return self._jobs([row])[0]

    def list(self, states: tuple[str, ...] | None = None) -> list[Job]:
        """All jobs (or those in `states`) in queue order: position, then id."""
        query, args = "SELECT * FROM jobs", ()
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = tuple(states)
        with self._db.errors():
            rows = self._db.conn().execute(query + " ORDER BY position, id", args).fetchall()
        return self._jobs(rows)

    def edit(self, job_id: int, *, validate: bool = True, **changes: Any) -> Job:
        """Change settings of a queued job (fields of JobSettings); a new image is copied, a new seed re-drawn."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(JobSettings)}
        if unknown:
            raise InputError(f"unknown job setting(s) {', '.join(sorted(unknown))}")
        current = self.get(job_id)
        if current.state != "queued":  # checked again below, in the transaction; this gives the clear message early
            raise InputError(f"job {job_id} is {current.state}; only queued jobs can be edited")
        settings = dataclasses.replace(current.settings, **changes)
        if "image" in changes and "image_source" not in changes and changes["image"] != current.settings.image:
            settings = dataclasses.replace(settings, image_source=None)  # a new picture: the old source is wrong
        settings = self._prepare(settings, validate)
        seed = current.resolved_seed
        if "seed" in changes:
            seed = settings.seed if settings.seed >= 0 else random.randint(0, sys.maxsize)
        with self._db.write() as conn:
            state = self._row(conn, job_id)["state"]
            if state != "queued":
                raise InputError(f"job {job_id} is {state}; only queued jobs can be edited")
            conn.execute(
                "UPDATE jobs SET settings = ?, resolved_seed = ? WHERE id = ?",
                (json.dumps(settings.to_dict()), seed, job_id),
            )
            return self._job(conn, job_id)

    def move(self, job_id: int, direction: str) -> bool:
        """Swap a queued job with the queued job before ("up") or after ("down") it; False at either end."""
        if direction not in ("up", "down"):
            raise InputError(f"direction {direction!r} is not one of up, down")
        with self._db.write() as conn:
            row = self._row(conn, job_id)
            if row["state"] != "queued":
                raise InputError(f"job {job_id} is {row['state']}; only queued jobs can be moved")
            # Positions are unique (new ones are always below the minimum or above the maximum of all jobs).
            cmp, order = ("<", "DESC") if direction == "up" else (">", "ASC")
            other = conn.execute(
                f"SELECT id, position FROM jobs WHERE state = 'queued' AND position {cmp} ? "
                f"ORDER BY position {order} LIMIT 1",
                (row["position"],),
            ).fetchone()
            if other is None:
                return False
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (other["position"], job_id))
            conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (row["position"], other["id"]))
            return True

    def request_cancel(self, job_id: int) -> Job:
        """Cancel: a queued job becomes cancelled now; a running one is flagged and its worker stops within a step."""
        with self._db.write() as conn:
            state = self._row(conn, job_id)["state"]
            if state == "queued":
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled before it started' "
                    "WHERE id = ?",
                    (time.time(), job_id),
                )
            elif state == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            elif state != "cancelled":
                raise InputError(f"job {job_id} is already {state}; there is nothing to cancel")
            return self._job(conn, job_id)

    def retry(self, job_id: int) -> Job:
        """Put a failed or cancelled job back at the end of the queue (same settings and seed; its crash count
        starts again). A damaged job cannot be retried, only removed."""
        with self._db.write() as conn:
            job = self._job(conn, job_id)
            if job.error is not None and job.error.startswith(records.QUARANTINED):
                raise InputError(f"job {job_id} cannot run again: {job.error}")
            if job.state not in ("failed", "cancelled"):
                raise InputError(f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried")
            conn.execute(
                "UPDATE jobs SET state = 'queued', position = ?, error = NULL, note = NULL, cancel_requested = 0, "
                "finished_at = NULL, progress_step = 0, progress_stage = NULL, eta_seconds = NULL, crashes = 0, "
                "progress_fraction = NULL "
                "WHERE id = ?",
                (self._back(conn), job_id),
            )
            return self._job(conn, job_id)

    def remove(self, job_id: int) -> None:
        """Delete a job that is not running (its video, if any, stays on disk)."""
        with self._db.write() as conn:
            state = self._row(conn, job_id)["state"]
            if state == "running":
                raise InputError(f"job {job_id} is running; cancel it first")
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # ------------------------------------------------------------------------------------------- worker side

    def register_worker(self, worker_id: str, *, stale_after_s: float = 120.0) -> None:
        """Record this process as the queue's worker; WorkerAlreadyRunning if a live one exists (one GPU).

        A worker row whose process is gone (or whose heartbeat is older than `stale_after_s`) is dropped.
        """
        now = time.time()
        with self._db.write() as conn:
            for row in conn.execute("SELECT * FROM workers").fetchall():
                if not registry.worker_dead(row, now, stale_after_s):
                    raise WorkerAlreadyRunning(
                        f"a worker (pid {row['pid']} on {row['host']}) is already running the queue {self.path}"
                    )
                conn.execute("DELETE FROM workers WHERE id = ?", (row["id"],))
            registry.register(conn, worker_id, now)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stops cleanly."""
        with self._db.write() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def serving_worker(self, *, stale_after_s: float = 120.0) -> WorkerInfo | None:
        """The live worker serving this queue (`wan_local.jobs.registry`), or None. Only reads."""
        with self._db.errors():
            live = registry.live_workers(self._db.conn(), time.time(), stale_after_s)
        return live[0] if live else None

    def requeue_stale(
        self, now: float | None = None, *, stale_after_s: float = 120.0, max_crashes: int = MAX_CRASHES
    ) -> list[int]:
        """Handle `running` jobs whose worker is dead (process gone, or heartbeat older than `stale_after_s`):
        count the crash, and put each back at the front of the queue in its old order, or fail it once it has
        crashed its worker `max_crashes` times. Return the ids of both. Called when a worker starts."""
        now = time.time() if now is None else now
        handled, failed = [], []
        with self._db.write() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY position DESC, id DESC")
            for job in rows.fetchall():
                worker = conn.execute("SELECT * FROM workers WHERE id = ?", (job["worker_id"],)).fetchone()
                beat = job["heartbeat_at"] if isinstance(job["heartbeat_at"], (int, float)) else 0.0
                if not (registry.worker_dead(worker, now, stale_after_s) or beat < now - stale_after_s):
                    continue
                crashes = (job["crashes"] if isinstance(job["crashes"], int) else 0) + 1
                conn.execute("UPDATE jobs SET crashes = ? WHERE id = ?", (crashes, job["id"]))
                handled.append(job["id"])
                if crashes < max_crashes:
                    note = f"the worker (pid {job['worker_pid']}) stopped during this job; re-queued"
                    self._to_queue(conn, job["id"], note, self._front(conn))
                    continue
                error = (
                    f"this job crashed the worker {crashes} times (the last was pid {job['worker_pid']}); it was set "
                    "aside so that the rest of the queue can run. Retry it to run it again, perhaps with a lower "
                    "memory preset, fewer frames or a smaller size"
                )
                conn.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, worker_id = NULL, "
                    "worker_pid = NULL, progress_stage = 'failed', eta_seconds = NULL WHERE id = ?",
                    (now, error, job["id"]),
                )
                failed.append(job["id"])
        requeued = sorted(set(handled) - set(failed))
        if requeued:
            log.warning("re-queued interrupted job(s) %s", ", ".join(map(str, requeued)))
        for job_id in failed:
            log.error("job %d crashed the worker %d times: failed, the queue goes on", job_id, max_crashes)
        return sorted(handled)

    @staticmethod
    def _to_queue(conn: sqlite3.Connection, job_id: int, note: str | None, position: int) -> None:
        conn.execute(
            "UPDATE jobs SET state = 'queued', position = ?, note = ?, worker_id = NULL, worker_pid = NULL, "
            "progress_step = 0, progress_stage = NULL, eta_seconds = NULL, progress_fraction = NULL WHERE id = ?",
            (position, note, job_id),
        )

    def claim_next(self, worker_id: str) -> Job | None:
        """Atomically take the first queued job for `worker_id` (state running, attempts + 1); None if empty."""
        query = "SELECT * FROM jobs WHERE state = 'queued' AND cancel_requested = 0 ORDER BY position, id LIMIT 1"
        with self._db.errors():
            if self._db.conn().execute(query).fetchone() is None:
                return None  # an idle worker polls: only a read, no write lock
        now = time.time()
        with self._db.write() as conn:
            while (row := conn.execute(query).fetchone()) is not None:
                try:
                    records.job_from_row(row)
                except MalformedJob as exc:  # set aside (failed), so the next query finds the next job
                    self._quarantine(conn, row, exc.reason)
                    continue
                conn.execute(
                    "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ?, attempts = attempts + 1, "
                    "worker_id = ?, worker_pid = ?, error = NULL, progress_step = 0, progress_total = 0, "
                    "progress_stage = 'starting', eta_seconds = NULL, progress_fraction = NULL, preview_path = NULL, "
                    "progress_updated_at = ? WHERE id = ?",
                    (now, now, worker_id, os.getpid(), now, row["id"]),
                )
                return self._job(conn, row["id"])
            return None

    def update_progress(
        self,
        job_id: int,
        worker_id: str,
        *,
        step: int | None = None,
        total: int | None = None,
        stage: str | None = None,
        eta_seconds: float | None = None,
        preview_path: str | None = None,
        fraction: float | None = None,
    ) -> bool:
        """Record progress (None keeps a field's value; `fraction` is the whole job's, 0..1) and the heartbeat;
        return True when the worker should stop (cancel requested, or the job is no longer this worker's)."""
        now = time.time()
        with self._db.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET progress_step = COALESCE(?, progress_step), "
                "progress_total = COALESCE(?, progress_total), progress_stage = COALESCE(?, progress_stage), "
                "eta_seconds = COALESCE(?, eta_seconds), preview_path = COALESCE(?, preview_path), "
                "progress_fraction = COALESCE(?, progress_fraction), progress_updated_at = ?, heartbeat_at = ? "
                "WHERE id = ? AND state = 'running' AND worker_id = ?",
                (step, total, stage, eta_seconds, preview_path, fraction, now, now, job_id, worker_id),
            )
            if cur.rowcount == 0:
                return True
            conn.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, worker_id))
            return bool(conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    def heartbeat(self, worker_id: str, job_id: int | None = None) -> bool:
        """Refresh the worker's (and its job's) heartbeat; return True when that job should stop."""
        if job_id is not None:
            return self.update_progress(job_id, worker_id)
        with self._db.write() as conn:
            conn.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (time.time(), worker_id))
        return False

    def finish(
        self, job_id: int, worker_id: str, state: str, *, error: str | None = None, output_path: str | None = None
    ) -> bool:
        """End a running job as done, failed or cancelled; False if it was no longer this worker's."""
        if state not in FINAL_STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(FINAL_STATES)}")
        with self._db.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, output_path = COALESCE(?, output_path), "
                "progress_stage = ?, eta_seconds = NULL, worker_pid = NULL "
                "WHERE id = ? AND state = 'running' AND worker_id = ?",
                (state, time.time(), error, output_path, state, job_id, worker_id),
            )
            if state == "done":
                conn.execute(
                    "UPDATE jobs SET progress_step = progress_total, progress_fraction = 1 WHERE id = ?", (job_id,)
                )
            return cur.rowcount == 1

    def requeue(
        self, job_id: int, worker_id: str, *, note: str, settings: JobSettings | None = None, oom: bool = False
    ) -> bool:
        """Give a running job back to the front of the queue (worker stopping, or an out-of-memory retry with
        changed `settings`; `oom` counts it in oom_retries). False if it was no longer this worker's."""
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE id = ? AND state = 'running' AND worker_id = ?", (job_id, worker_id)
            ).fetchone()
            if row is None:
                return False
            self._to_queue(conn, job_id, note, self._front(conn))
            if settings is not None:
                conn.execute("UPDATE jobs SET settings = ? WHERE id = ?", (json.dumps(settings.to_dict()), job_id))
            if oom:
                conn.execute("UPDATE jobs SET oom_retries = oom_retries + 1 WHERE id = ?", (job_id,))
            return True
