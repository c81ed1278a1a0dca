"""The job queue's SQLite file: its schema and migrations, one connection per thread, write transactions, and the
conversion of a `jobs` row into a `Job`.

Commits are durable (WAL journal, `synchronous=FULL`); each write is one short `BEGIN IMMEDIATE` transaction, so
the UI and the worker (separate processes) can both write while a busy timeout absorbs the brief overlaps. Each
thread (and each process) gets its own connection. A database that cannot be read is reported with its path and
what to do; this module never deletes, truncates or rewrites a file it did not create.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wan_local.errors import WanLocalError
from wan_local.jobs.records import Job, JobProgress, JobSettings

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 1

# MIGRATIONS[v] brings a database from schema version v to v + 1; never edit a released entry, append one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            position INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
            settings TEXT NOT NULL,
            resolved_seed INTEGER NOT NULL,
            error TEXT,
            note TEXT,
            output_path TEXT,
            progress_step INTEGER NOT NULL DEFAULT 0,
            progress_total INTEGER NOT NULL DEFAULT 0,
            progress_stage TEXT,
            eta_seconds REAL,
            progress_updated_at REAL,
            preview_path TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            oom_retries INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            worker_id TEXT,
            worker_pid INTEGER,
            heartbeat_at REAL
        )""",
        "CREATE INDEX jobs_queue ON jobs (state, position)",
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            process_started REAL NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )""",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class StoreError(WanLocalError):
    """The job database cannot be used (unreadable, damaged, from a newer version, or not writable)."""


class StoreCorruptError(StoreError):
    """The file is not a wan-local job database, or its pages are damaged. The file is left untouched."""


class StoreBusyError(StoreError):
    """Another connection held the database locked for longer than the busy timeout."""


def job_from_row(row: sqlite3.Row) -> Job:
    """The `Job` a row of the `jobs` table describes."""
    progress = JobProgress(
        row["progress_step"], row["progress_total"], row["progress_stage"], row["eta_seconds"],
        row["progress_updated_at"],
    )  # fmt: skip
    return Job(
        id=row["id"],
        state=row["state"],
        position=row["position"],
        settings=JobSettings.from_dict(json.loads(row["settings"])),
        resolved_seed=row["resolved_seed"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        note=row["note"],
        output_path=row["output_path"],
        progress=progress,
        preview_path=row["preview_path"],
        attempts=row["attempts"],
        oom_retries=row["oom_retries"],
        cancel_requested=bool(row["cancel_requested"]),
        worker_id=row["worker_id"],
        worker_pid=row["worker_pid"],
        heartbeat_at=row["heartbeat_at"],
    )


class JobDatabase:
    """The SQLite file at `path`, created (with its folder) and migrated to `SCHEMA_VERSION` on open; safe to use
    from several threads and processes at once."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder {self.path.parent} for the job queue: {exc}") from exc
        self._initialise()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own; SQLite connections must not cross forks)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            with self.errors():
                conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before add() returns
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn sqlite3 errors into StoreError subclasses whose message names the file and the remedy."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "locked" in text or "busy" in text:
                raise StoreBusyError(
                    f"the job queue {self.path} stayed locked by another program for {self.busy_timeout_s:g} s "
                    f"({exc}); close other wan-local windows or tools that have the file open and try again"
                ) from exc
            raise StoreError(
                f"cannot use the job queue {self.path}: {exc}; check that the folder is writable and the disk "
                "is not full"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(self._corrupt_message(str(exc))) from exc

    def _corrupt_message(self, why: str) -> str:
        return (
            f"the job queue {self.path} cannot be read ({why}). The file was left untouched. Close wan-local, "
            f"move the file aside (for example rename it to {self.path.name}.broken) and start again for an "
            "empty queue; videos already made are not affected"
        )

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (BEGIN IMMEDIATE takes the write lock up front, so no upgrade deadlock)."""
        conn = self.conn()
        with self.errors():
            conn.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                yield conn
                conn.execute("COMMIT")
                committed = True
            finally:
                if not committed and conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _initialise(self) -> None:
        conn = self.conn()
        with self.errors():
            # Read-only checks first: a foreign or damaged file must not be switched to WAL (that writes).
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - {"sqlite_sequence", "schema_version", "jobs", "workers"}:
                raise StoreCorruptError(self._corrupt_message("it is an SQLite file, but not a wan-local queue"))
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreCorruptError(self._corrupt_message(" ".join("; ".join(problems[:3]).split())))
            if "schema_version" in tables and self._version(conn) == SCHEMA_VERSION:
                return  # nothing to write: opening never waits for a busy writer (the worker)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("%s: journal mode is %s, not WAL (network drive?)", self.path, mode)
        with self.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._version(conn)
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for v in range(version or 0, SCHEMA_VERSION):
                log.info("%s: migrating job queue schema %d -> %d", self.path, v, v + 1)
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def _version(self, conn: sqlite3.Connection) -> int | None:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise StoreError(
                f"the job queue {self.path} was written by a newer wan-local (schema {row[0]}, this version "
                f"knows {SCHEMA_VERSION}); update wan-local, or move the file aside for an empty queue"
            )
        return None if row is None else row[0]
