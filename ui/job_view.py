"""One job as the UI shows it while it waits, runs and finishes: a progress line and bar, its latent preview and
its video. The Queue tab's running panel and the Generate tab's "your job" panel both read it from the JobStore
record (state, progress, preview_path, output_path), so they always agree."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ui.prediction import format_duration
from wan_local.jobs.records import Job

#: A running job whose worker has not reported for this long is shown as such (it may be loading models).
STALE_REPORT_S = 60.0


def reported_fraction(job: Job) -> float | None:
    """The whole job's fraction done as the worker reports it (stages weighted, decode included), or None where
    the store's record has none (a job run by a version that reported denoise steps only)."""
    return getattr(job.progress, "fraction", None)


def progress_fraction(job: Job) -> float:
    """How far the job is, 0..1: 1 when done, the reported fraction, else denoise steps done."""
    if job.state == "done":
        return 1.0
    p, fraction = job.progress, reported_fraction(job)
    if fraction is None:
        fraction = p.step / p.total if p.total else 0.0
    return min(max(float(fraction), 0.0), 1.0)


def progress_line(job: Job, now: float | None = None) -> str:
    """ "denoise · step 12/40 · 30 % · about 4 min left" (plain text) for a running job; the state for others."""
    p = job.progress
    if job.state == "queued":
        return "waiting in the queue"
    if job.state != "running":
        return job.state
    line = p.stage or "starting"
    if p.stage == "denoise" and p.total:
        line += f" · step {p.step}/{p.total}"
    line += f" · {progress_fraction(job) * 100:.0f} %"
    if p.eta_seconds is not None:
        line += f" · about {format_duration(p.eta_seconds)} left"
    now = time.time() if now is None else now
    if p.updated_at is not None and now - p.updated_at > STALE_REPORT_S:
        line += f" · no report for {format_duration(now - p.updated_at)} (loading models?)"
    if job.cancel_requested:
        line += " · cancelling"
    return line


def progress_bar(job: Job) -> str:
    """An HTML <progress> bar of the job's fraction done."""
    return f"<progress value='{progress_fraction(job):.4f}' max='1' style='width:100%'></progress>"


def current_preview(job: Job) -> str | None:
    """The running job's preview PNG, if it was written during this run (not by an earlier attempt of the job)."""
    if job.state != "running" or not job.preview_path:
        return None
    try:
        written = Path(job.preview_path).stat().st_mtime
    except OSError:
        return None
    return job.preview_path if job.started_at is None or written >= job.started_at - 1.0 else None


def existing(path: str | None) -> str | None:
    """`path` when it names a file, else None."""
    return path if path and Path(path).is_file() else None


@dataclass(frozen=True)
class JobPanel:
    """What the Generate tab shows of the job(s) it queued: HTML (progress of the job in focus and a batch line),
    the focused job's preview PNG (running jobs only), the newest finished video, and whether to keep polling."""

    html: str
    preview_path: str | None
    video_path: str | None
    active: bool
    job_id: int | None


def focus(jobs: Sequence[Job]) -> Job | None:
    """The job to show of a batch: the running one, else the first waiting, else the last one queued."""
    for states in (("running",), ("queued",)):
        for job in jobs:
            if job.state in states:
                return job
    return jobs[-1] if jobs else None


def batch_line(jobs: Sequence[Job]) -> str:
    """ "Batch of 4: 1 done, 1 running, 2 waiting" (empty for a single job)."""
    if len(jobs) < 2:
        return ""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    names = {"queued": "waiting"}
    order = ("done", "running", "queued", "failed", "cancelled")
    parts = [f"{counts[s]} {names.get(s, s)}" for s in order if counts.get(s)]
    return f"Batch of {len(jobs)}: {', '.join(parts)}"


def job_panel(jobs: Sequence[Job], missing: Sequence[int] = ()) -> JobPanel:
    """The panel for the jobs the Generate tab queued (in the order queued); `missing`: ids no longer in the store."""
    job = focus(jobs)
    if job is None:
        gone = f" (job(s) {', '.join(f'#{i}' for i in missing)} were removed)" if missing else ""
        return JobPanel(f"<div id='gen-job-line'>No job queued from this tab yet{gone}.</div>", None, None, False, None)
    head = f"<b>Job #{job.id}</b> · {html.escape(job.settings.prompt[:80])}"
    if job.state == "done":
        note = f"done · {html.escape(Path(job.output_path).name)}" if job.output_path else "done"
    elif job.state in ("failed", "cancelled"):
        note = f"{job.state}: {html.escape(job.error or job.note or '')}".rstrip(": ")
    else:
        note = html.escape(progress_line(job))
        if job.note and job.state == "queued":
            note += f" · {html.escape(job.note)}"
    batch = batch_line(jobs)
    extra = f"<br>{html.escape(batch)}" if batch else ""
    if job.state != "running":  # the running job's progress line has the percentage
        note = f"{progress_fraction(job) * 100:.0f} % · {note}"
    body = f"<div id='gen-job-line'>{head}<br>{progress_bar(job)}<br>{note}{extra}</div>"
    preview = current_preview(job)
    done = [j for j in jobs if j.state == "done" and existing(j.output_path)]
    video = max(done, key=lambda j: j.finished_at or 0).output_path if done else None
    active = any(j.state in ("queued", "running") for j in jobs)
    return JobPanel(body, preview, video, active, job.id)
