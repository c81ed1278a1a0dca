"""The job queue's SQLite file: its schema and migrations, one connection per thread, and write transactions.

Commits are durable (WAL journal, `synchronous=FULL`); each write is one short `BEGIN IMMEDIATE` transaction, so
the UI and the worker (separate processes) can both write while a busy timeout absorbs the brief overlaps. Each
thread (and each process) gets its own connection. A database that cannot be read is reported with its path and
what to do; this module never deletes, truncates or rewrites a file it did not create. A file from before the schema
was versioned is adopted when its tables hold every column of a known version, and refused by name otherwise.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wan_local.errors import WanLocalError

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 3

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
    (
        "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",  # workers that died while running it
        "ALTER TABLE workers ADD COLUMN parent_pid INTEGER",  # who started the worker (an app, a terminal)
        "ALTER TABLE workers ADD COLUMN parent_started REAL",
    ),
    ("ALTER TABLE jobs ADD COLUMN progress_fraction REAL",),  # the whole job's fraction done (jobs.progress)
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class StoreError(WanLocalError):
    """The job database cannot be used (unreadable, damaged, from a newer version, or not writable)."""


class StoreCorruptError(StoreError):
    """The file is not a wan-local job database, or its pages are damaged. The file is left untouched."""


class StoreBusyError(StoreError):
    """Another connection held the database locked for longer than the busy timeout."""


def _advice(error_text: str) -> str:
    """What to do about an SQLite error, by its (lower-case) text; nothing when the text names no known cause."""
    if "full" in error_text:
        return "; the disk is full: free some space and try again"
    if any(word in error_text for word in ("readonly", "read-only", "unable to open", "permission")):
        return "; check that the folder is writable"
    if "disk i/o" in error_text:
        return "; the drive reported an input/output error: check that it is still connected and healthy"
    return ""


def _columns_by_version() -> dict[int, dict[str, set[str]]]:
    """{version: {table: columns}} of every schema version, built by running the migrations in memory."""
    conn = sqlite3.connect(":memory:")
    out = {}
    try:
        for version, statements in enumerate(MIGRATIONS, start=1):
            for statement in statements:
                conn.execute(statement)
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            out[version] = {
                t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")}
                for t in tables
                if not t.startswith("sqlite_")
            }
    finally:
        conn.close()
    return out


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
            raise StoreError(f"cannot use the job queue {self.path}: {exc}{_advice(text)}") from exc
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
            recorded = "schema_version" in tables and self._version(conn) is not None
            unversioned = self._unversioned(conn) if "jobs" in tables and not recorded else None
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("%s: journal mode is %s, not WAL (network drive?)", self.path, mode)
        with self.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._version(conn)
            if version is None:
                version = unversioned or 0
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            for v in range(version, SCHEMA_VERSION):
                log.info("%s: migrating job queue schema %d -> %d", self.path, v, v + 1)
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def _unversioned(self, conn: sqlite3.Connection) -> int:
        """The schema version of a queue written before versions were recorded: the newest version whose tables
        and columns it all has. StoreError naming what is missing (the file untouched) when none fits."""
        have = {
            table: {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        }
        missing: list[str] = []  # what the oldest version needs (newer ones need more)
        for version, tables in sorted(_columns_by_version().items(), reverse=True):
            lacking = [
                f"the table {t}" if t not in have else ", ".join(f"{t}.{c}" for c in sorted(cols - have[t]))
                for t, cols in tables.items()
                if cols - have.get(t, set())
            ]
            if not lacking:
                log.warning("%s: no schema version recorded; its tables are those of version %d", self.path, version)
                return version
            missing = lacking
        raise StoreError(
            f"the job queue {self.path} comes from a development version of wan-local that did not record its "
            f"schema, and it lacks what every released version has: {'; '.join(missing)}. The file was left "
            f"untouched. Move it aside (for example rename it to {self.path.name}.old) and start again for an "
            "empty queue; videos already made are not affected"
        )

    def _version(self, conn: sqlite3.Connection) -> int | None:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise StoreError(
                f"the job queue {self.path} was written by a newer wan-local (schema {row[0]}, this version "
                f"knows {SCHEMA_VERSION}); update wan-local, or move the file aside for an empty queue"
            )
        return None if row is None else row[0]
