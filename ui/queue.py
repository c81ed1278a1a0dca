"""Queue tab: every job with its state and progress, the running job's latent preview, the worker's health, and
cancel / retry / move / remove / edit. Refreshed by a gr.Timer; everything is read from the JobStore, so what
it shows survives a restart of the app or of the worker."""

from __future__ import annotations

import dataclasses
import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.generate_form import FormValues, form_from_settings
from ui.generate_layout import GenerateTab
from ui.prediction import format_duration, load_components, load_dit_config
from wan_local.errors import WanLocalError
from wan_local.jobs.records import Job

log = logging.getLogger(__name__)

REFRESH_S = 1.5
HEADERS = ["#", "state", "progress", "stage", "left", "seed", "task", "size × frames", "preset", "prompt", "note"]
ACTIONS = ("cancel", "retry", "up", "down", "remove")
STALE_REPORT_S = 60.0
#: At most this many new estimates per refresh (each reads checkpoint headers and plans the job, about 30 ms on
#: 2 cores); the queue's total follows over the next ticks, so a burst of added jobs never stalls a refresh.
NEW_ESTIMATES_PER_REFRESH = 4


def estimate_key(job: Job) -> tuple[Any, ...]:
    """What a job's time estimate depends on: not its prompt or seed, so a batch of one shape is estimated once."""
    s = job.settings
    return (s.task, s.size, s.frames, s.steps, s.preset, s.ckpt_dir)


def job_row(job: Job) -> list[Any]:
    """One table row: id, state, step/total, stage, time left, seed, task, size × frames, preset, prompt, note."""
    s, p = job.settings, job.progress
    progress = f"{p.step}/{p.total}" if p.total else ""
    if job.state == "running" and p.fraction is not None:
        progress = f"{p.fraction * 100:.0f} %" + (f" ({p.step}/{p.total})" if p.stage == "denoise" and p.total else "")
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
    stage = p.stage or ""
    # Seeds are text: 63-bit numbers lose digits as JavaScript numbers in the browser.
    return [job.id, job.state, progress, stage, left, str(job.resolved_seed), s.task, shape, s.preset or "", s.prompt,
            note]  # fmt: skip


def current_preview(job: Job) -> str | None:
    """The running job's preview PNG, if it was written during this run (not by an earlier attempt of the job)."""
    if job.state != "running" or not job.preview_path:
        return None
    try:
        written = Path(job.preview_path).stat().st_mtime
    except OSError:
        return None
    return job.preview_path if job.started_at is None or written >= job.started_at - 1.0 else None


def progress_line(job: Job) -> tuple[str, str]:
    """(HTML progress bar, stage text) of a running job: the whole job's fraction when the worker reports one
    (stages weighted, decode included), else denoise steps."""
    p = job.progress
    stage = html.escape(p.stage or "starting")
    if p.stage == "denoise" and p.total:
        stage += f" · step {p.step}/{p.total}"
    if p.fraction is not None:
        stage += f" · {p.fraction * 100:.0f} %"
        bar = f"<progress value='{p.fraction:.4f}' max='1' style='width:100%'></progress>"
    else:
        bar = f"<progress value='{p.step}' max='{max(p.total, 1)}' style='width:100%'></progress>"
    if p.eta_seconds is not None:
        stage += f" · about {format_duration(p.eta_seconds)} left"
    return bar, stage


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
        from wan_local.specs import get_task

        if self.ctx.estimator is None:
            return None
        s = job.settings
        preset = self.ctx.presets.get(s.preset or "", self.ctx.pick.preset)
        try:
            spec = get_task(s.task)
            size = s.size or spec.default_size
            est = self.ctx.estimator(
                spec.name, size, s.frames or spec.frames, s.steps or spec.steps, preset.memory, self.ctx.machine,
                load_dit_config(s.ckpt_dir, spec.name, s.files),
                components=load_components(s.ckpt_dir, spec.name, s.files),
            )  # fmt: skip
        except Exception as exc:  # advisory only (a job that does not fit any more is the worker's to refuse)
            log.debug("no estimate for job %d: %s", job.id, exc)
            return None
        return float(est.seconds)

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
        p = job.progress
        parts = [f"<b>Job #{job.id}</b>", html.escape(job.settings.prompt[:80])]
        bar, stage = progress_line(job)
        if p.updated_at is not None and time.time() - p.updated_at > STALE_REPORT_S:
            stage += f" · no report for {format_duration(time.time() - p.updated_at)} (loading models?)"
        if job.cancel_requested:
            stage += " · cancelling"
        more = html.escape(summary.replace("job(s) queued", "more job(s) queued"))
        body = f"<div id='queue-running'>{' · '.join(parts)}<br>{bar}<br>{stage}; {more}</div>"
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


def build_queue_tab(ctx: AppContext, gen: GenerateTab, tabs: Any) -> QueueHandlers:
    """Lay out the Queue tab inside the current gr.Tab and wire its events (the timer included)."""
    import gradio as gr

    handlers = QueueHandlers(ctx)
    line, show_restart = handlers.worker_line()
    with gr.Row():
        worker_md = gr.Markdown(line, elem_id="queue-worker")
        restart_btn = gr.Button("Restart worker", visible=show_restart, size="sm", elem_id="queue-restart")
    with gr.Row():
        with gr.Column(scale=3):
            # Both start empty and the timer's first tick (within REFRESH_S) fills them, so a fresh page never shows
            # the running line or preview of when the app started (a callable value would also be a public API
            # endpoint of its own).
            running_html = gr.HTML("", elem_id="queue-running-box")
            table = gr.Dataframe(
                value=handlers.rows(), headers=HEADERS, interactive=False, wrap=True, max_height=520,
                elem_id="queue-table",
            )  # fmt: skip
        with gr.Column(scale=1, min_width=240):
            preview = gr.Image(
                value=None, label="Latent preview of the running job", interactive=False,
                height=240, elem_id="queue-preview",
            )  # fmt: skip
    with gr.Row():
        job_id = gr.Textbox(label="Job #", placeholder="click a row", elem_id="queue-job-id", scale=1)
        buttons = {
            "cancel": gr.Button("Cancel", variant="stop", elem_id="queue-cancel"),
            "retry": gr.Button("Retry", elem_id="queue-retry"),
            "up": gr.Button("Move up", elem_id="queue-up"),
            "down": gr.Button("Move down", elem_id="queue-down"),
            "remove": gr.Button("Remove", elem_id="queue-remove"),
        }
        edit_btn = gr.Button("Edit in Generate tab", elem_id="queue-edit")
    message = gr.Markdown(elem_id="queue-message")
    last_preview = gr.State(None)
    timer = gr.Timer(REFRESH_S)

    def refresh(last_key: Any) -> list[Any]:
        view = handlers.running()
        line, show = handlers.worker_line()
        key = None
        if view.preview_path:
            try:
                key = (view.preview_path, Path(view.preview_path).stat().st_mtime_ns)
            except OSError:  # replaced or removed since
                view = dataclasses.replace(view, preview_path=None)
        # Only send a new preview when the file changed: each send copies it into Gradio's cache.
        image = gr.skip() if key == last_key else view.preview_path
        return [handlers.rows(), view.html, image, line, gr.update(visible=show), key]

    timer.tick(
        refresh,
        last_preview,
        [table, running_html, preview, worker_md, restart_btn, last_preview],
        api_visibility="private",
    )

    def select(evt: gr.SelectData) -> Any:
        row = getattr(evt, "row_value", None)
        return row[0] if row else gr.skip()

    select.__annotations__["evt"] = gr.SelectData  # Gradio reads the real class; postponed annotations are text

    table.select(select, None, job_id, api_visibility="private")

    for name, button in buttons.items():
        button.click(
            lambda j, _name=name: [handlers.action(_name, j), handlers.rows()],
            job_id,
            [message, table],
            api_visibility="private",
        )

    def restart() -> list[Any]:
        text = handlers.restart_worker()
        line, show = handlers.worker_line()
        return [text, line, gr.update(visible=show)]

    restart_btn.click(restart, None, [message, worker_md, restart_btn], api_visibility="private")

    def edit(j: Any) -> list[Any]:
        form, editing, text = handlers.load_for_edit(j)
        if form is None:
            return [text, gr.skip(), *[gr.skip()] * len(gen.fill_outputs)]
        return [text, gr.Tabs(selected="generate"), *gen.fill(form, editing, text)]

    edit_btn.click(edit, job_id, [message, tabs, *gen.fill_outputs], api_visibility="private")
    return handlers
