"""The job queue on disk: one SQLite file that survives crashes, kills and power loss.

Every fact about a job lives in the database, never only in memory: a worker that dies mid-job leaves the job
`running` with its pid and heartbeat, and the next worker puts it back at the front of the queue
(`requeue_stale`). The file itself (schema, connections, durable write transactions, errors that name the file and
the remedy) is `wan_local.jobs.database`.

A job's input image is copied into the store's folder when the job is added, so deleting or editing the
original loses nothing.

States: queued -> running -> done | failed | cancelled; failed/cancelled -> queued (retry);
running -> queued (worker died, stopped, or an out-of-memory retry with a lower preset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wan_local import paths
from wan_local.errors import InputError
from wan_local.jobs.database import DB_NAME, JobDatabase, StoreError, job_from_row
from wan_local.jobs.records import Job, JobSettings

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class WorkerAlreadyRunning(StoreError):
    """A live worker already serves this queue (one GPU, one worker)."""


def default_home() -> Path:
    """The folder of the store: $WAN_LOCAL_HOME if set, else the per-user data folder of wan-local."""
    return paths.data_dir()


def default_store_path() -> Path:
    """<home>/jobs.sqlite3 (see `default_home`)."""
    return default_home() / DB_NAME


# ---------------------------------------------------------------------------------------------------- liveness


def process_alive(pid: int, process_started: float | None = None) -> bool:
    """Whether process `pid` on this machine is running (not a zombie) and, when given, started at
    `process_started` (±1 s; guards against a recycled pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return process_started is None or abs(proc.create_time() - process_started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # AccessDenied only hides details of a live process of another user; that is not our worker.
        return False


def _this_process_started() -> float:
    import psutil

    return psutil.Process(os.getpid()).create_time()


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
            fd, tmp = tempfile.mkstemp(prefix=".copy.", dir=self.inputs_dir)
            try:
                with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                    shutil.copyfileobj(inp, out)
                    out.flush()
                    os.fsync(out.fileno())  # the job row will point at it: it must survive a power loss too
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        return str(target)

    def _prepare(self, settings: JobSettings, validate: bool) -> JobSettings:
        if validate:
            settings.check()
        if settings.image and Path(settings.image).parent != self.inputs_dir:
            settings = dataclasses.replace(
                settings, image=self._copy_image(settings.image), image_source=str(settings.image)
            )
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
            return job_from_row(self._row(conn, cur.lastrowid))

    def get(self, job_id: int) -> Job:
        """The job `job_id`; InputError if there is none."""
        with self._db.errors():
            return job_from_row(self._row(self._db.conn(), job_id))

    def list(self, states: tuple[str, ...] | None = None) -> list[Job]:
        """All jobs (or those in `states`) in queue order: position, then id."""
        query, args = "SELECT * FROM jobs", ()
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = tuple(states)
        with self._db.errors():
            rows = self._db.conn().execute(query + " ORDER BY position, id", args).fetchall()
        return [job_from_row(r) for r in rows]

    def edit(self, job_id: int, *, validate: bool = True, **changes: Any) -> Job:
        """Change settings of a queued job (fields of JobSettings); a new image is copied, a new seed re-drawn."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(JobSettings)}
        if unknown:
            raise InputError(f"unknown job setting(s) {', '.join(sorted(unknown))}")
        current = self.get(job_id)
        if current.state != "queued":  # checked again below, in the transaction; this gives the clear message early
            raise InputError(f"job {job_id} is {current.state}; only queued jobs can be edited")
        settings = dataclasses.replace(current.settings, **changes)
        if "image" in changes and changes["image"] is None:
            settings = dataclasses.replace(settings, image_source=None)
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
            return job_from_row(self._row(conn, job_id))

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
            return job_from_row(self._row(conn, job_id))

    def retry(self, job_id: int) -> Job:
        """Put a failed or cancelled job back at the end of the queue (same settings and seed)."""
        with self._db.write() as conn:
            state = self._row(conn, job_id)["state"]
            if state not in ("failed", "cancelled"):
                raise InputError(f"job {job_id} is {state}; only failed or cancelled jobs can be retried")
            conn.execute(
                "UPDATE jobs SET state = 'queued', position = ?, error = NULL, note = NULL, cancel_requested = 0, "
                "finished_at = NULL, progress_step = 0, progress_stage = NULL, eta_seconds = NULL WHERE id = ?",
                (self._back(conn), job_id),
            )
            return job_from_row(self._row(conn, job_id))

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
        now, host, pid = time.time(), socket.gethostname(), os.getpid()
        with self._db.write() as conn:
            for row in conn.execute("SELECT * FROM workers").fetchall():
                if not self._worker_dead(row, now, stale_after_s):
                    raise WorkerAlreadyRunning(
                        f"a worker (pid {row['pid']} on {row['host']}) is already running the queue {self.path}"
                    )
                conn.execute("DELETE FROM workers WHERE id = ?", (row["id"],))
            conn.execute(
                "INSERT INTO workers (id, pid, host, process_started, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (worker_id, pid, host, _this_process_started(), now, now),
            )

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stops cleanly."""
        with self._db.write() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    @staticmethod
    def _worker_dead(row: sqlite3.Row | None, now: float, stale_after_s: float) -> bool:
        if row is None or row["heartbeat_at"] < now - stale_after_s:
            return True
        if row["host"] == socket.gethostname():
            return not process_alive(row["pid"], row["process_started"])
        return False  # another machine sharing the folder: only its heartbeat can tell

    def requeue_stale(self, now: float | None = None, *, stale_after_s: float = 120.0) -> list[int]:
        """Put `running` jobs whose worker is dead (process gone, or heartbeat older than `stale_after_s`) back
        at the front of the queue, in their old order; return their ids. Called when a worker starts."""
        now = time.time() if now is None else now
        requeued = []
        with self._db.write() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY position DESC, id DESC")
            for job in rows.fetchall():
                worker = conn.execute("SELECT * FROM workers WHERE id = ?", (job["worker_id"],)).fetchone()
                beat = job["heartbeat_at"] or 0.0
                if not (self._worker_dead(worker, now, stale_after_s) or beat < now - stale_after_s):
                    continue
                note = f"the worker (pid {job['worker_pid']}) stopped during this job; re-queued"
                self._to_queue(conn, job["id"], note, self._front(conn))
                requeued.append(job["id"])
        if requeued:
            log.warning("re-queued interrupted job(s) %s", ", ".join(map(str, sorted(requeued))))
        return sorted(requeued)

    @staticmethod
    def _to_queue(conn: sqlite3.Connection, job_id: int, note: str | None, position: int) -> None:
        conn.execute(
            "UPDATE jobs SET state = 'queued', position = ?, note = ?, worker_id = NULL, worker_pid = NULL, "
            "progress_step = 0, progress_stage = NULL, eta_seconds = NULL WHERE id = ?",
            (position, note, job_id),
        )

    def claim_next(self, worker_id: str) -> Job | None:
        """Atomically take the first queued job for `worker_id` (state running, attempts + 1); None if empty."""
        query = "SELECT id FROM jobs WHERE state = 'queued' AND cancel_requested = 0 ORDER BY position, id LIMIT 1"
        with self._db.errors():
            if self._db.conn().execute(query).fetchone() is None:
                return None  # an idle worker polls: only a read, no write lock
        now = time.time()
        with self._db.write() as conn:
            row = conn.execute(query).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ?, attempts = attempts + 1, "
                "worker_id = ?, worker_pid = ?, error = NULL, progress_step = 0, progress_total = 0, "
                "progress_stage = 'starting', eta_seconds = NULL, progress_updated_at = ? WHERE id = ?",
                (now, now, worker_id, os.getpid(), now, row["id"]),
            )
            return job_from_row(self._row(conn, row["id"]))

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
    ) -> bool:
        """Record progress (None keeps a field's value) and the heartbeat; return True when the worker should stop
        (cancel requested, or the job is no longer this worker's)."""
        now = time.time()
        with self._db.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET progress_step = COALESCE(?, progress_step), "
                "progress_total = COALESCE(?, progress_total), progress_stage = COALESCE(?, progress_stage), "
                "eta_seconds = COALESCE(?, eta_seconds), preview_path = COALESCE(?, preview_path), "
                "progress_updated_at = ?, heartbeat_at = ? "
                "WHERE id = ? AND state = 'running' AND worker_id = ?",
                (step, total, stage, eta_seconds, preview_path, now, now, job_id, worker_id),
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
                conn.execute("UPDATE jobs SET progress_step = progress_total WHERE id = ?", (job_id,))
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
