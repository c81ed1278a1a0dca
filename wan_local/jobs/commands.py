"""`wan-local worker` and `wan-local queue add|list|cancel|retry|move|remove`.

`register(subparsers)` adds them to the main CLI parser; every command's `func(args)` returns an exit code and
raises WanLocalError for problems the user can fix (the CLI's main prints those).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wan_local.jobs.store import STATES, Job, JobStore
from wan_local.jobs.worker import add_worker_options
from wan_local.options import add_force_option, add_generation_options, add_memory_options, job_settings_from_args


def _describe(job: Job) -> str:
    p = job.progress
    progress = f"{p.step}/{p.total}" if p.total else "-"
    if job.state == "running" and p.fraction is not None:  # the whole job, decode included (jobs.progress)
        progress = f"{p.fraction * 100:.0f} %"
        if p.eta_seconds is not None:
            progress += f" ~{p.eta_seconds:.0f}s"
    text = f"{job.id:>5}  {job.state:<9}  {progress:>7}  {job.settings.task:<9}  {job.settings.prompt[:50]}"
    if job.error:
        text += f"\n       error: {job.error}"
    if job.output_path and job.state == "done":
        text += f"\n       video: {job.output_path}"
    return text


def _queue_add(args: argparse.Namespace) -> int:
    """Resolve and admit the job as the worker will (refused: nothing is queued), then queue it with the preset
    it was admitted with."""
    from wan_local.jobs.submit import queue_job

    job, admission = queue_job(JobStore(args.store), job_settings_from_args(args))
    if admission.degraded or admission.forced:
        print(admission.message, file=sys.stderr, flush=True)
    print(f"queued job {job.id} (seed {job.resolved_seed}, preset {admission.preset.name})", flush=True)
    return 0


def _queue_list(args: argparse.Namespace) -> int:
    jobs = JobStore(args.store).list(tuple(args.state) if args.state else None)
    if args.json:
        print(json.dumps([job.to_dict() for job in jobs], ensure_ascii=False, indent=1), flush=True)
    else:
        print("\n".join(_describe(job) for job in jobs) or "the queue is empty", flush=True)
    return 0


def _queue_cancel(args: argparse.Namespace) -> int:
    store = JobStore(args.store)
    for job_id in args.ids:
        job = store.request_cancel(job_id)
        print(f"job {job_id}: {'cancel requested' if job.state == 'running' else job.state}", flush=True)
    return 0


def _queue_retry(args: argparse.Namespace) -> int:
    store = JobStore(args.store)
    for job_id in args.ids:
        store.retry(job_id)
        print(f"job {job_id}: queued again", flush=True)
    return 0


def _queue_move(args: argparse.Namespace) -> int:
    moved = JobStore(args.store).move(args.id, args.direction)
    print(f"job {args.id}: {'moved' if moved else 'cannot move'} {args.direction}", flush=True)
    return 0


def _queue_remove(args: argparse.Namespace) -> int:
    store = JobStore(args.store)
    for job_id in args.ids:
        store.remove(job_id)
        print(f"job {job_id}: removed", flush=True)
    return 0


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, help="job database (default: $WAN_LOCAL_HOME or the user data folder)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `worker` and `queue` (with add, list, cancel, retry, move, remove) to the CLI's subparsers."""
    worker = subparsers.add_parser(
        "worker", help="run queued jobs", description="Run queued jobs one at a time (one worker per queue)."
    )
    add_worker_options(worker)

    queue = subparsers.add_parser("queue", help="manage the job queue", description="Manage the job queue.")
    sub = queue.add_subparsers(dest="queue_command", required=True)

    add = sub.add_parser("add", help="queue a generation", description="Queue a generation for the worker.")
    add_generation_options(add)
    add_memory_options(add)
    add_force_option(add)
    _store_option(add)
    add.set_defaults(func=_queue_add)

    ls = sub.add_parser("list", help="show the queue", description="Show all jobs in queue order.")
    ls.add_argument("--json", action="store_true", help="print a JSON list of jobs (id, state, settings, ...)")
    ls.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    _store_option(ls)
    ls.set_defaults(func=_queue_list)

    for name, func, text in (
        ("cancel", _queue_cancel, "cancel queued or running jobs"),
        ("retry", _queue_retry, "queue failed or cancelled jobs again"),
        ("remove", _queue_remove, "delete jobs that are not running"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("ids", nargs="+", type=int, metavar="ID")
        _store_option(p)
        p.set_defaults(func=func)

    move = sub.add_parser("move", help="move a queued job", description="Move a queued job up or down.")
    move.add_argument("id", type=int, metavar="ID")
    move.add_argument("direction", choices=["up", "down"])
    _store_option(move)
    move.set_defaults(func=_queue_move)
