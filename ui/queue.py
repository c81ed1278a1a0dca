"""Queue tab logic: every job with its state and progress, the running job's latent preview, the worker's health,
the actions a selected row allows (cancel / retry / move / remove / edit / open in the gallery) and "clear
finished". Everything is read from the JobStore, so what it shows survives a restart of the app or of the worker.
The layout and its gr.Timer are `ui.queue_layout`."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.generate_form import FormValues, form_from_settings
from ui.job_view import current_preview, existing, progress_bar, progress_line, reported_fraction
from ui.prediction import format_duration, load_dit_config
from wan_local.errors import WanLocalError
from wan_local.jobs.records import Job

log = logging.getLogger(__name__)

REFRESH_S = 1.5
HEADERS = ["#", "state", "progress", "stage", "left", "seed", "task · preset", "size × frames", "prompt", "note"]
#: Shares of the table's width (a 1400 px window shows every column; long prompts and errors wrap).
COLUMN_WIDTHS = ["4%", "7%", "8%", "7%", "5%", "9%", "11%", "8%", "25%", "16%"]
ACTIONS = ("cancel", "retry", "up", "down", "remove", "edit", "open")
FINISHED = ("done", "failed", "cancelled")
#: How many finished jobs the strip of poster frames under the table shows (newest first), captioned "#id".
THUMBNAILS = 8
NEW_POSTERS_PER_REFRESH = 2
#: At most this many new estimates per refresh (each reads checkpoint headers and plans the job, about 30 ms on
#: 2 cores); the queue's total follows over the next ticks, so a burst of added jobs never stalls a refresh.
NEW_ESTIMATES_PER_REFRESH = 4


#: Settings a job's time does not depend on: a batch of one shape is estimated once.
_NOT_TIMED = frozenset({"prompt", "negative_prompt", "seed", "output", "image_source"})


def estimate_key(job: Job) -> tuple[Any, ...]:
    """What a job's time estimate depends on: every setting but its prompt, seed and output name."""
    data = job.settings.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in data.items() if k not in _NOT_TIMED))


def short_seed(seed: int) -> str:
    """A seed for the table: up to 10 digits as is, longer ones as their first and last 4 digits (the selected
    row shows the whole seed). Text, never a number: 63-bit seeds lose digits as JavaScript numbers."""
    text = str(seed)
    return text if len(text) <= 10 else f"{text[:4]}…{text[-4:]}"


def job_row(job: Job) -> list[Any]:
    """One table row: id, state, progress (the whole job's percent where reported, else denoise steps), stage,
    time left, seed (short), task · preset, size × frames, prompt, note."""
    s, p = job.settings, job.progress
    progress = f"{p.step}/{p.total}" if p.total else ""
    fraction = reported_fraction(job)
    if job.state == "running" and fraction is not None:
        progress = f"{fraction * 100:.0f} %" + (f" ({p.step}/{p.total})" if p.stage == "denoise" and p.total else "")
    if job.state == "done":
        progress = "100 %"
    left = format_duration(p.eta_seconds) if job.state == "running" and p.eta_seconds is not None else ""
    size = f"{s.size[0]}×{s.size[1]}" if s.size else "default"
    shape = f"{size} × {s.frames or 'default'}"
    note = job.error or job.note or ""
    if job.state == "done" and job.output_path:
        note = Path(job.output_path).name
    if job.cancel_requested and job.state == "running":
        note = "cancelling at the next step"
    task = f"{s.task} · {s.preset}" if s.preset else s.task
    stage = p.stage or ""
    return [job.id, job.state, progress, stage, left, short_seed(job.resolved_seed), task, shape, s.prompt, note]


@dataclass(frozen=True)
class Selection:
    """The selected row: a Markdown line about the job, the actions it allows (of ACTIONS), and its video (a
    done job's output, None otherwise)."""

    text: str
    actions: tuple[str, ...]
    video: str | None
    job_id: int | None


def allowed_actions(job: Job) -> tuple[str, ...]:
    """The actions of ACTIONS that apply to `job` in its state."""
    by_state = {
        "queued": ("cancel", "up", "down", "remove", "edit"),
        "running": ("cancel",),
        "done": ("remove", "open") if existing(job.output_path) else ("remove",),
        "failed": ("retry", "remove"),
        "cancelled": ("retry", "remove"),
    }
    return by_state.get(job.state, ())


@dataclass(frozen=True)
class RunningView:
    """The running job's panel: an HTML progress line and the newest preview PNG (None: none yet)."""

    html: str
    preview_path: str | None
    job_id: int | None


class QueueHandlers:
    """The Queue tab's logic over an AppContext. Time estimates are cached by what they depend on (estimate_key)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._seconds: dict[tuple[Any, ...], float | None] = {}

    def _estimate(self, job: Job) -> float | None:
        """The job's time as the engine predicts it: the same resolve + admit as the worker (EngineEstimator.admit),
        or the bare estimator for the preset asked for when the UI runs without the engine."""
        from wan_local.specs import get_task

        estimator = self.ctx.estimator
        if estimator is None:
            return None
        s = job.settings
        preset = self.ctx.presets.get(s.preset or "", self.ctx.pick.preset)
        try:
            if hasattr(estimator, "admit"):
                est = estimator.admit(s, self.ctx.machine, self.ctx.presets).estimate
            else:
                spec = get_task(s.task)
                est = estimator(
                    spec.name, s.size or spec.default_size, s.frames or spec.frames, s.steps or spec.steps,
                    preset.memory, self.ctx.machine, load_dit_config(s.ckpt_dir, spec.name, s.files),
                )  # fmt: skip
        except Exception as exc:  # advisory only (a job that does not fit any more is the worker's to refuse)
            log.debug("no estimate for job %d: %s", job.id, exc)
            return None
        return None if est is None else float(est.seconds)

    def queued_summary(self, queued: list[Job]) -> str:
        """ "3 job(s) queued, about 2.5 h of work" (the time only when every job has an estimate; "so far" while
        more than NEW_ESTIMATES_PER_REFRESH shapes are new)."""
        if not queued:
            return "the queue is empty"
        budget, total, waiting = NEW_ESTIMATES_PER_REFRESH, 0.0, 0
        for job in queued:
            key = estimate_key(job)
            if key not in self._seconds:
                if budget == 0:
                    waiting += 1
                    continue
                budget -= 1
                self._seconds[key] = self._estimate(job)
            seconds = self._seconds[key]
            if seconds is None:
                return f"{len(queued)} job(s) queued"
            total += seconds
        if waiting:
            return f"{len(queued)} job(s) queued, about {format_duration(total)} of work so far ({waiting} to estimate)"
        return f"{len(queued)} job(s) queued, about {format_duration(total)} of work"

    def rows(self) -> list[list[Any]]:
        """All jobs, queue order (running and queued first, then finished ones, newest first)."""
        jobs = self.ctx.store.list()
        active = [j for j in jobs if j.state in ("running", "queued")]
        active.sort(key=lambda j: (j.state != "running", j.position, j.id))
        finished = [j for j in jobs if j.state not in ("running", "queued")]
        finished.sort(key=lambda j: -(j.finished_at or 0))
        return [job_row(j) for j in (*active, *finished)]

    def running(self) -> RunningView:
        """The panel of the running job, or a summary of the queue when nothing runs."""
        running = self.ctx.store.list(("running",))
        summary = self.queued_summary(self.ctx.store.list(("queued",)))
        if not running:
            text = f"Nothing running; {summary}."
            return RunningView(f"<div id='queue-running'>{html.escape(text)}</div>", None, None)
        job = running[0]
        parts = [f"<b>Job #{job.id}</b>", html.escape(job.settings.prompt[:80])]
        more = html.escape(summary.replace("job(s) queued", "more job(s) queued"))
        line = html.escape(progress_line(job))
        body = f"<div id='queue-running'>{' · '.join(parts)}<br>{progress_bar(job)}<br>{line}; {more}</div>"
        return RunningView(body, current_preview(job), job.id)

    def worker_line(self) -> tuple[str, bool]:
        """(Markdown about the worker, whether to offer "Restart worker")."""
        worker = self.ctx.worker
        if worker is None:
            return (
                "ℹ No worker in this session (started with --no-worker): queued jobs wait until "
                "`wan-local worker` runs.",
                False,
            )
        if worker.alive():
            return f"✓ {worker.describe()}", False
        return f"✗ {worker.describe()} Queued jobs wait until it runs again.", True

    def restart_worker(self) -> str:
        """Restart the worker; return what happened."""
        if self.ctx.worker is None:
            return "No worker in this session (--no-worker)."
        return self.ctx.worker.restart()

    def action(self, action: str, job_id: Any) -> str:
        """Apply cancel / retry / up / down / remove to job `job_id`; return the message."""
        if job_id is None or not str(job_id).strip():
            return "Select a job in the table first (click its row)."
        try:
            job_id = int(str(job_id).strip())
        except ValueError:
            return f"✗ {job_id!r} is not a job number; click a row of the table"
        try:
            store = self.ctx.store
            if action == "cancel":
                job = store.request_cancel(job_id)
                if job.state == "running":
                    return f"Job #{job_id} stops at its next step."
                return f"Job #{job_id} cancelled."
            if action == "retry":
                store.retry(job_id)
                return f"Job #{job_id} is queued again (same settings and seed)."
            if action in ("up", "down"):
                moved = store.move(job_id, action)
                return f"Job #{job_id} moved {action}." if moved else f"Job #{job_id} is already at the {action} end."
            if action == "remove":
                store.remove(job_id)
                return f"Job #{job_id} removed from the list (its video, if any, stays on disk)."
        except WanLocalError as exc:
            return f"✗ {exc}"
        return f"✗ unknown action {action!r}; one of {', '.join(ACTIONS)}"

    def clear_finished(self) -> str:
        """Remove every done, failed and cancelled job from the list (their videos stay on disk)."""
        removed = []
        for job in self.ctx.store.list(FINISHED):
            try:
                self.ctx.store.remove(job.id)
            except WanLocalError as exc:  # retried or removed meanwhile (another tab, the CLI)
                log.info("job %d not cleared: %s", job.id, exc)
                continue
            removed.append(job.id)
        if not removed:
            return "No finished jobs to clear."
        return f"Cleared {len(removed)} finished job(s) from the list; their videos stay on disk (see the Gallery)."

    def thumbnails(self) -> list[tuple[int, str, str]]:
        """(job id, poster PNG, caption) of the newest done jobs whose video exists, newest first. At most
        NEW_POSTERS_PER_REFRESH posters are made per call (about 0.1-0.4 s each); the others follow next time."""
        from ui.thumbnails import poster, poster_path

        folder = self.ctx.store.previews_dir / "posters"
        done = sorted(self.ctx.store.list(("done",)), key=lambda j: -(j.finished_at or 0))
        found, budget = [], NEW_POSTERS_PER_REFRESH
        for job in done:
            if len(found) == THUMBNAILS:
                break
            target = poster_path(job.output_path, folder) if job.output_path else None
            if target is None:
                continue
            if not target.is_file():
                if budget == 0:
                    continue
                budget -= 1
            image = poster(job.output_path, folder)
            if image is not None:
                found.append((job.id, image, f"#{job.id}"))
        return found

    def selection(self, job_id: Any) -> Selection:
        """What the selected row shows and allows."""
        if job_id is None or not str(job_id).strip():
            return Selection("Select a job: click its row in the table.", (), None, None)
        try:
            job = self.ctx.store.get(int(str(job_id).strip()))
        except (WanLocalError, ValueError):
            return Selection(f"Job #{job_id} is no longer in the list.", (), None, None)
        s = job.settings
        text = (
            f"**Job #{job.id}** · {job.state} · seed `{job.resolved_seed}` · {s.task} · {html.escape(s.prompt[:120])}"
        )
        if job.state in FINISHED and (job.error or job.note):
            text += f"\n\n{html.escape(job.error or job.note or '')}"
        video = existing(job.output_path) if job.state == "done" else None
        return Selection(text, allowed_actions(job), video, job.id)

    def load_for_edit(self, job_id: Any) -> tuple[FormValues | None, int | None, str]:
        """The form of queued job `job_id` to edit in the Generate tab: (form, job id, message)."""
        if job_id is None or not str(job_id).strip():
            return None, None, "Select a queued job first (click its row)."
        try:
            job = self.ctx.store.get(int(str(job_id).strip()))
        except (WanLocalError, ValueError) as exc:
            return None, None, f"✗ {exc}"
        if job.state != "queued":
            return None, None, f"✗ Job #{job.id} is {job.state}; only queued jobs can be edited (retry it first)."
        data = job.settings.to_dict()
        data["image_source"] = None  # edit the store's own copy, which always exists
        return form_from_settings(data, seed=job.resolved_seed), job.id, f"Editing job #{job.id}."
