"""Whether a process on this machine still runs: by pid and start time, so a recycled pid is not mistaken for it."""

from __future__ import annotations

import os


def process_alive(pid: int, process_started: float | None = None) -> bool:
    """Whether process `pid` is running (not a zombie) and, when given, started at `process_started` (±1 s)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return process_started is None or abs(proc.create_time() - process_started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        # AccessDenied only hides details of a live process of another user; that is not one of ours.
        return False


def process_started(pid: int | None = None) -> float | None:
    """The start time (Unix seconds) of process `pid` (default: this one); None if it is gone."""
    import psutil

    try:
        return psutil.Process(os.getpid() if pid is None else pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
