"""Which worker serves the queue: the `workers` table of the store, and how a worker's liveness is judged.

A worker registers itself when it starts (pid, host, the process's start time, and its parent: the app or shell
that started it) and refreshes its heartbeat while it runs. A registered worker is alive when its heartbeat is
recent and, on this machine, its process still runs with the same start time (a recycled pid is not it). A live
worker whose parent is gone is an orphan: the app that started it was killed, and the next app adopts it
(`wan_local.jobs.supervisor`).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from dataclasses import dataclass

from wan_local.processes import process_alive, process_started


@dataclass(frozen=True)
class WorkerInfo:
    """A live registered worker. Times are Unix seconds; orphaned: on this machine, and its parent is gone."""

    id: str
    pid: int
    host: str
    process_started: float
    started_at: float
    heartbeat_at: float
    parent_pid: int | None
    orphaned: bool

    @property
    def local(self) -> bool:
        """Whether it runs on this machine (a queue folder may be shared over the network)."""
        return self.host == socket.gethostname()


def worker_dead(row: sqlite3.Row | None, now: float, stale_after_s: float) -> bool:
    """Whether the worker of a `workers` row is gone: no row, a heartbeat older than `stale_after_s`, or (on this
    machine) no process with its pid and start time. A row with values of the wrong type counts as gone."""
    if row is None:
        return True
    beat = row["heartbeat_at"]
    if not isinstance(beat, (int, float)) or beat < now - stale_after_s:
        return True
    if row["host"] == socket.gethostname():
        return not process_alive(row["pid"], row["process_started"])
    return False  # another machine sharing the folder: only its heartbeat can tell


def register(conn: sqlite3.Connection, worker_id: str, now: float) -> None:
    """Insert this process as worker `worker_id`, with its parent (inside the caller's write transaction)."""
    parent = os.getppid()
    conn.execute(
        "INSERT INTO workers (id, pid, host, process_started, started_at, heartbeat_at, parent_pid, parent_started) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (worker_id, os.getpid(), socket.gethostname(), process_started(), now, now, parent, process_started(parent)),
    )


def live_workers(conn: sqlite3.Connection, now: float, stale_after_s: float) -> list[WorkerInfo]:
    """The registered workers that are alive, oldest first."""
    out = []
    for row in conn.execute("SELECT * FROM workers ORDER BY started_at").fetchall():
        if worker_dead(row, now, stale_after_s):
            continue
        local = row["host"] == socket.gethostname()
        parent = row["parent_pid"]
        orphaned = local and parent is not None and not process_alive(parent, row["parent_started"])
        info = WorkerInfo(
            row["id"], row["pid"], row["host"], row["process_started"], row["started_at"], row["heartbeat_at"],
            parent, orphaned,
        )  # fmt: skip
        out.append(info)
    return out
