"""The app's handle on the worker process: start one, or adopt the one a killed app left running; tell truthfully
which worker serves the queue; restart and stop it.

The worker is a separate process so that a crash of the UI never touches a generation, which also means it
outlives an app that is killed. The next app finds it in the store's worker registry (pid, start time, heartbeat,
parent: `wan_local.jobs.registry`) instead of starting a second worker that would exit at once ("already
running"). An orphan (its parent, the old app, is gone) is adopted: reported as running, restarted on request and
stopped with the app, as if this app had started it. A worker another live program started (`wan-local worker` in
a terminal, a second app window) is reported, never stopped.

Stopping sends SIGTERM (the worker hands its current job back to the front of the queue), waits, then kills.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from wan_local.jobs.database import StoreError
from wan_local.jobs.registry import WorkerInfo
from wan_local.jobs.store import JobStore
from wan_local.jobs.worker import WORKER_ENTRY, spawn_worker
from wan_local.processes import process_alive

log = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 20.0


class WorkerProcess:
    """The queue's worker as the app sees it: its own child process, or an adopted orphan (see the module)."""

    def __init__(
        self,
        store_path: Path,
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        entry: Sequence[str] = WORKER_ENTRY,
    ) -> None:
        self.store_path = Path(store_path)
        self.env = env
        self.entry = tuple(entry)
        self.log_path = Path(log_path) if log_path is not None else self.store_path.parent / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.adopted: WorkerInfo | None = None
        self.started_at: float | None = None
        self._store: JobStore | None = None

    def serving(self) -> WorkerInfo | None:
        """The live worker the store's registry names (None also when the registry cannot be read just now)."""
        try:
            if self._store is None:
                self._store = JobStore(self.store_path)
            return self._store.serving_worker()
        except StoreError as exc:
            log.warning("cannot read the worker registry: %s", exc)
            return None

    def _own_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _adopt_orphan(self) -> WorkerInfo | None:
        """The serving worker, adopted first when it is an orphan of this machine."""
        serving = self.serving()
        if serving is not None and serving.orphaned and (self.adopted is None or self.adopted.id != serving.id):
            self.adopted = serving
            log.info("adopted the worker (pid %d) that an earlier session of the app left running", serving.pid)
        return serving

    def start(self) -> WorkerProcess:
        """Adopt an orphaned worker, leave a worker another program runs alone, or spawn
        `python -m wan_local worker --store <queue>`."""
        serving = self._adopt_orphan()
        if serving is not None:
            if not serving.orphaned:
                log.warning("the queue is served by a worker another program started (pid %d)", serving.pid)
            return self
        self.proc = spawn_worker(self.store_path, log_path=self.log_path, env=self.env, entry=self.entry)
        self.started_at = time.time()
        log.info("worker started (pid %d), log: %s", self.proc.pid, self.log_path)
        return self

    def alive(self) -> bool:
        """Whether a worker serves the queue: this app's child, an adopted one, or another program's."""
        return self._own_alive() or self.serving() is not None

    def _last_log_line(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - 4096))
                lines = [line for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def describe(self) -> str:
        """One line: which worker runs (pid, and whose it is), or that none does with the last log line."""
        if self._own_alive():
            return f"Worker running (pid {self.proc.pid}); log: {self.log_path}"
        serving = self._adopt_orphan()
        if serving is not None and self.adopted is not None and serving.id == self.adopted.id:
            return (
                f"Worker running (pid {serving.pid}, left running by an earlier session of the app and adopted by "
                f"this one); log: {self.log_path}"
            )
        if serving is not None:
            where = "" if serving.local else f" on {serving.host}"
            return (
                f"Worker running (pid {serving.pid}{where}, started by another program, pid {serving.parent_pid}); "
                "this window does not stop or restart it."
            )
        if self.proc is None and self.adopted is None:
            return "The worker is not started."
        if self.proc is not None:
            which = f"The worker stopped (exit code {self.proc.poll()})"
        else:
            which = f"The adopted worker (pid {self.adopted.pid}) stopped"
        return f"{which}. Last log line: {self._last_log_line() or '(none)'} — full log: {self.log_path}."

    def restart(self) -> str:
        """Stop the worker (this app's or an adopted one) if it runs and start a new one."""
        self.stop()
        self.start()
        if self.proc is None:
            return f"Not restarted: {self.describe()}"
        return f"Worker restarted (pid {self.proc.pid})."

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to `timeout_s` for the job to be handed back, then kill; this app's worker and an
        adopted one, never another program's."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not stop within %.0f s; killing it", timeout_s)
                proc.kill()
                proc.wait()
            log.info("worker stopped (exit code %s)", proc.returncode)
        if self.adopted is not None:
            _stop_adopted(self.adopted, timeout_s)
            self.adopted = None


def _stop_adopted(worker: WorkerInfo, timeout_s: float) -> None:
    """SIGTERM an adopted worker (not our child: no wait() for it), then SIGKILL it after `timeout_s`."""
    import psutil

    for action in ("terminate", "kill"):
        if not process_alive(worker.pid, worker.process_started):
            break  # gone (a zombie counts as gone: its new parent reaps it); or the pid was recycled
        try:
            getattr(psutil.Process(worker.pid), action)()
        except psutil.NoSuchProcess:
            break
        if _gone_within(worker, timeout_s):
            break
        log.warning("the adopted worker (pid %d) did not stop within %.0f s", worker.pid, timeout_s)
    log.info("adopted worker (pid %d) stopped", worker.pid)


def _gone_within(worker: WorkerInfo, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while process_alive(worker.pid, worker.process_started):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True
