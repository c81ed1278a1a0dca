"""The worker process: takes queued jobs one at a time and runs them, recording everything in the store.

It runs apart from the UI (`spawn_worker`), so closing or crashing the UI never touches a generation, and a
crash of the worker loses nothing: at start it re-queues the jobs a dead worker left `running` (and fails one
that has crashed its worker too often, so the rest of the queue runs). One worker serves a queue (the store
refuses a second live one). A heartbeat thread keeps the job's heartbeat fresh during long stages (model loading)
and turns a cancel request or a stop signal into the job's CancelToken; progress callbacks do the same every
denoise step, so a cancel takes effect before the next step starts.

Stopping (SIGTERM, SIGHUP, Ctrl-C, `stop_event`) interrupts the current job within a step and puts it back at the
front of the queue; a user's cancel marks it cancelled. A store that cannot be written for a while (a full disk,
a lock held too long) does not end the worker: progress goes unrecorded, a job's outcome is written again until it
sticks, and the next job waits for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from wan_local.errors import WanLocalError
from wan_local.jobs.database import StoreCorruptError, StoreError
from wan_local.jobs.runner import JobOutOfMemory, JobRunner, Progress, file_error_message, is_out_of_memory
from wan_local.jobs.store import MAX_CRASHES, Job, JobSettings, JobStore

if TYPE_CHECKING:
    from wan_local.sampling.denoise import CancelToken

log = logging.getLogger(__name__)

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # as wan_local.cli
WORKER_ENTRY = ("-m", "wan_local", "worker")
STORE_RETRY_MAX_S = 30.0  # longest wait between two tries of a write the store refused

LowerPreset = Callable[[str], "str | None"]
T = TypeVar("T")


def new_worker_id() -> str:
    """host-pid-random: unique per worker process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass
class WorkerConfig:
    """Timing and retry policy of a worker. Seconds throughout.

    heartbeat_s: heartbeat period while a job runs (and how
    late a stop signal may be noticed between steps). stale_after_s: a running job whose heartbeat is older is
    considered orphaned at the next worker start. lower_preset(name) -> next lower memory preset or None; with
    retry_oom an out-of-memory job naming a preset is re-queued once with that lower preset. max_crashes: a job
    that was running when this many workers died is failed at the next start instead of re-queued. tidy(store):
    housekeeping run at start, after each job and now and then while idle (`wan_local.jobs.housekeeping`).
    """

    heartbeat_s: float = 2.0
    stale_after_s: float = 120.0
    lower_preset: LowerPreset | None = None
    retry_oom: bool = True
    max_crashes: int = MAX_CRASHES
    tidy: Callable[[JobStore], None] | None = None


def until_recorded(write: Callable[[], T], what: str, stop: threading.Event) -> T:
    """`write()`, tried again (waits doubling up to STORE_RETRY_MAX_S) while the store refuses it (full disk,
    lock held too long). A damaged file, or a stop request, ends the tries with the StoreError."""
    delay = 1.0
    while True:
        try:
            return write()
        except StoreCorruptError:
            raise
        except StoreError as exc:
            if stop.is_set():
                raise
            log.error("%s could not be recorded (%s); trying again in %.0f s", what, exc, delay)
            stop.wait(delay)
            delay = min(2 * delay, STORE_RETRY_MAX_S)


def run_worker(
    store: JobStore,
    runner: JobRunner,
    stop_event: threading.Event | None = None,
    once: bool = False,
    poll_s: float = 1.0,
    *,
    config: WorkerConfig | None = None,
    worker_id: str | None = None,
) -> int:
    """Serve the queue until `stop_event` is set (or, with `once`, until it is empty); return jobs run.

    `poll_s` is the wait between looks at an empty queue. Raises WorkerAlreadyRunning if another live worker
    serves the store.
    """
    config = config or WorkerConfig()
    stop_event = stop_event or threading.Event()
    worker_id = worker_id or new_worker_id()
    store.register_worker(worker_id, stale_after_s=config.stale_after_s)
    runs, last_beat = 0, time.monotonic()
    idle_beat_s = min(30.0, config.stale_after_s / 4)  # idle: an occasional durable write is enough
    tidy = config.tidy or (lambda _store: None)
    try:
        until_recorded(
            lambda: store.requeue_stale(stale_after_s=config.stale_after_s, max_crashes=config.max_crashes),
            "re-queueing the jobs of a dead worker",
            stop_event,
        )
        tidy(store)
        while not stop_event.is_set():
            job = until_recorded(lambda: store.claim_next(worker_id), "taking the next job", stop_event)
            if job is None:
                if once:
                    break
                if time.monotonic() - last_beat >= idle_beat_s:
                    _idle_beat(store, worker_id)
                    tidy(store)
                    last_beat = time.monotonic()
                stop_event.wait(poll_s)
                continue
            run_job(store, runner, job, worker_id, stop_event, config)
            runs += 1
            tidy(store)
            last_beat = time.monotonic()
    finally:
        try:
            store.unregister_worker(worker_id)
        except StoreError as exc:  # the next worker finds this one dead by its pid
            log.error("worker %s not unregistered: %s", worker_id, exc)
    log.info("worker %s stopped after %d job(s)", worker_id, runs)
    return runs


def _idle_beat(store: JobStore, worker_id: str) -> None:
    try:
        store.heartbeat(worker_id)
    except StoreError as exc:
        log.warning("heartbeat skipped: %s", exc)


def _watch(
    store: JobStore, job: Job, worker_id: str, token: CancelToken, stop: threading.Event, finished: threading.Event,
    heartbeat_s: float,
) -> None:  # fmt: skip
    """Heartbeat thread: refresh the heartbeat, and cancel the token on a cancel request or a stop signal."""
    ticks = max(1, round(heartbeat_s / 0.2))
    tick = 0
    while not finished.wait(0.2):
        if stop.is_set():
            token.cancel()
        tick += 1
        if tick % ticks:
            continue
        try:
            if store.heartbeat(worker_id, job.id):
                token.cancel()
        except StoreError as exc:  # busy or full: the job goes on; its outcome is recorded with retries
            log.warning("heartbeat of job %d skipped: %s", job.id, exc)
    store.close()  # this thread's connection


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended, to be recorded: a final state (with its error or video), or "queued" (handed back, with a
    note, and for an out-of-memory retry the lowered settings)."""

    state: str
    error: str | None = None
    output_path: str | None = None
    note: str | None = None
    settings: JobSettings | None = None
    oom: bool = False


def run_job(
    store: JobStore, runner: JobRunner, job: Job, worker_id: str, stop: threading.Event, config: WorkerConfig
) -> str:
    """Run one claimed job and record its outcome; return the final state ("queued" when handed back)."""
    from wan_local.sampling.denoise import CancelToken  # torch: not at import time

    token = CancelToken()
    finished = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(store, job, worker_id, token, stop, finished, config.heartbeat_s), daemon=True
    )
    log.info("job %d: start (attempt %d) %s", job.id, job.attempts, job.settings.prompt[:60])

    def on_progress(p: Progress) -> None:
        try:
            should_stop = store.update_progress(
                job.id, worker_id, step=p.step, total=p.total, stage=p.stage, eta_seconds=p.eta_seconds,
                preview_path=p.preview_path, fraction=p.fraction,
            )  # fmt: skip
        except StoreError as exc:  # the next step reports again; a busy UI or a full disk must not fail the job
            log.warning("progress of job %d not recorded: %s", job.id, exc)
            should_stop = False
        if should_stop or stop.is_set():
            token.cancel()

    watcher.start()
    try:
        outcome = _run(store, runner, job, on_progress, token, stop, config)
    except KeyboardInterrupt:
        try:
            store.requeue(job.id, worker_id, note="the worker was interrupted during this job; re-queued")
        except StoreError as exc:
            log.error("job %d not handed back (the next worker will): %s", job.id, exc)
        raise
    finally:
        finished.set()
        watcher.join()
        gc.collect()
    return _record(store, job, worker_id, outcome, stop)


def _run(
    store: JobStore, runner: JobRunner, job: Job, on_progress: Callable[[Progress], None], token: CancelToken,
    stop: threading.Event, config: WorkerConfig,
) -> Outcome:  # fmt: skip
    """Run the job; how it ended, as an Outcome (nothing recorded yet)."""
    from wan_local.sampling.denoise import Cancelled

    try:
        return Outcome("done", output_path=str(runner.run(job, on_progress, token)))
    except Cancelled:
        if stop.is_set() and not _cancel_requested(store, job):
            return Outcome("queued", note="the worker was stopped during this job; re-queued")
        return Outcome("cancelled", error="cancelled by the user")
    except JobOutOfMemory as exc:
        return _out_of_memory(job, str(exc), config)
    except WanLocalError as exc:
        return Outcome("failed", error=str(exc))
    except OSError as exc:  # a file it could not write: the disk is full, a folder is read-only
        return Outcome("failed", error=file_error_message(exc))
    except Exception as exc:  # a bug or engine error in one job must not stop the whole queue
        if is_out_of_memory(exc):
            return _out_of_memory(job, f"out of memory: {exc}", config)
        log.exception("job %d failed with an unexpected error", job.id)
        return Outcome("failed", error=f"unexpected error: {type(exc).__name__}: {exc}")


def _cancel_requested(store: JobStore, job: Job) -> bool:
    try:
        return store.get(job.id).cancel_requested
    except StoreError:  # unreadable for now: a stop is the likelier cause; the job goes back to the queue
        return False


def _out_of_memory(job: Job, message: str, config: WorkerConfig) -> Outcome:
    """Fail the job, or re-queue it once with the next lower preset when the job names one and a hook exists."""
    lower = None
    if config.retry_oom and config.lower_preset is not None and job.oom_retries == 0:
        lower = config.lower_preset(job.settings.preset)
    if not lower:
        return Outcome("failed", error=message)
    log.warning("job %d: out of memory with preset %s; retrying with %s", job.id, job.settings.preset, lower)
    note = f"{message} — re-queued once with the lower preset {lower!r} (was {job.settings.preset!r})"
    return Outcome("queued", note=note, settings=dataclasses.replace(job.settings, preset=lower), oom=True)


def _record(store: JobStore, job: Job, worker_id: str, outcome: Outcome, stop: threading.Event) -> str:
    """Write the outcome (again and again while the store refuses it); return the job's state."""
    if outcome.state == "queued":
        until_recorded(
            lambda: store.requeue(job.id, worker_id, note=outcome.note, settings=outcome.settings, oom=outcome.oom),
            f"handing job {job.id} back",
            stop,
        )
        log.info("job %d: handed back to the queue (%s)", job.id, outcome.note)
        return "queued"
    until_recorded(
        lambda: store.finish(job.id, worker_id, outcome.state, error=outcome.error, output_path=outcome.output_path),
        f"the outcome of job {job.id} ({outcome.state})",
        stop,
    )
    if outcome.state == "done":
        log.info("job %d: done -> %s", job.id, outcome.output_path)
    elif outcome.state == "cancelled":
        log.info("job %d: cancelled", job.id)
    else:
        log.error("job %d failed: %s", job.id, outcome.error)
    return outcome.state


# ---------------------------------------------------------------------------------------------------- process


def spawn_worker(
    store_path: Path | str,
    *,
    once: bool = False,
    extra_args: Sequence[str] = (),
    entry: Sequence[str] = WORKER_ENTRY,
    log_path: Path | str | None = None,
    env: dict[str, str] | None = None,
    detach: bool = False,
) -> subprocess.Popen:
    """Start `python -m wan_local worker --store <store_path>` as a separate process and return it.

    Output goes to `log_path` (default <store folder>/worker.log, appended). `env` is the child's whole
    environment (default: this process's). `entry` is what follows the interpreter (`-m wan_local.jobs.worker`
    works without the CLI). `detach` puts the worker in its own
    session / process group so it keeps running when the UI's console is closed or interrupted.
    """
    store_path = Path(store_path)
    cmd = [sys.executable, *entry, "--store", str(store_path), *(["--once"] if once else []), *extra_args]
    log_path = Path(log_path) if log_path is not None else store_path.parent / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {}
    if detach:
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
    with log_path.open("ab") as out:  # the child keeps its own handle
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"},
            **kwargs,
        )


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `wan-local worker` (shared by the CLI and `python -m wan_local.jobs.worker`)."""
    parser.add_argument("--store", type=Path, help="job database (default: $WAN_LOCAL_HOME or the user data folder)")
    parser.add_argument("--once", action="store_true", help="exit when the queue is empty instead of waiting")
    parser.add_argument("--poll-s", type=float, default=1.0, help="seconds between looks at an empty queue")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="heartbeat period while a job runs")
    parser.add_argument(
        "--stale-after-s", type=float, default=120.0, help="a running job without heartbeat this long is re-queued"
    )
    parser.add_argument("--no-oom-retry", action="store_true", help="never re-queue a job after out of memory")
    parser.add_argument(
        "--max-crashes",
        type=int,
        default=MAX_CRASHES,
        help="fail a job (instead of re-queueing it) once this many workers died while running it",
    )
    parser.add_argument("--preview-every", type=int, default=1, help="write a latent preview every N steps")
    parser.add_argument(
        "--checkpoint-every-s",
        type=float,
        default=60.0,
        help="save a resume point (latent + solver state) at most this often; a restarted job continues from it",
    )
    parser.set_defaults(func=worker_command)


def fallback_preset(name: str | None) -> str | None:
    """The preset to retry with after an out-of-memory failure: the fallback of `name` ("auto": of the preset
    picked for this machine), or None at the bottom of the chain."""
    from wan_local.machine import detect_machine
    from wan_local.presets import load_presets, pick_preset

    presets = load_presets()
    if name in (None, "", "auto"):
        name = pick_preset(detect_machine(), presets).preset.name
    preset = presets.get(name)
    return preset.fallback if preset is not None else None


#: The worker's account of the models it holds (its memory ledger), next to the queue, for the Models tab.
LOADED_MODELS_NAME = "loaded-models.json"


def worker_command(args: argparse.Namespace, lower_preset: LowerPreset | None = fallback_preset) -> int:
    """Run the worker for parsed `args`; SIGTERM, SIGHUP or the first Ctrl-C stop it gracefully (the job is
    re-queued)."""
    from wan_local.jobs.housekeeping import tidy
    from wan_local.jobs.resume import ResumePoints
    from wan_local.jobs.runner import PipelineRunner

    store = JobStore(args.store)
    resume_points = ResumePoints(store.folder / "resume", every_s=args.checkpoint_every_s)
    runner = PipelineRunner(
        store.outputs_dir,
        store.previews_dir,
        preview_every=args.preview_every,
        resume_points=resume_points,
        loaded_path=store.folder / LOADED_MODELS_NAME,
    )
    stop = threading.Event()

    def handle(signum: int, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after handing the current job back", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # SIGHUP: the terminal it ran in was closed (not on Windows)
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handle)
    config = WorkerConfig(
        heartbeat_s=args.heartbeat_s,
        stale_after_s=args.stale_after_s,
        lower_preset=lower_preset,
        retry_oom=not args.no_oom_retry,
        max_crashes=args.max_crashes,
        tidy=lambda s: tidy(s, resume_points),
    )
    run_worker(store, runner, stop, once=args.once, poll_s=args.poll_s, config=config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m wan_local.jobs.worker [--once] [--store PATH]`: the worker without the full CLI."""
    parser = argparse.ArgumentParser(prog="wan-local worker", description="Run queued wan-local jobs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    add_worker_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except WanLocalError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.warning("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
