"""The Queue tab's layout: the running job with its preview, the job table, the selected row with the actions its
state allows, "clear finished", and the gr.Timer that refreshes it all from the JobStore (`ui.queue`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.generate_layout import GenerateTab
from ui.queue import ACTIONS, COLUMN_WIDTHS, HEADERS, REFRESH_S, THUMBNAILS, QueueHandlers

BUTTONS = {
    "cancel": ("Cancel", "stop"),
    "retry": ("Retry", "secondary"),
    "up": ("Move up", "secondary"),
    "down": ("Move down", "secondary"),
    "remove": ("Delete from list", "secondary"),
    "edit": ("Edit in Generate tab", "secondary"),
    "open": ("Open in Gallery", "primary"),
}
assert tuple(BUTTONS) == ACTIONS


@dataclass
class QueueTab:
    """Handles build_app wires to other tabs: the selected job's id and the "Open in Gallery" button."""

    handlers: QueueHandlers
    selected: Any
    open_button: Any


def build_queue_tab(ctx: AppContext, gen: GenerateTab, tabs: Any) -> QueueTab:
    """Lay out the Queue tab inside the current gr.Tab and wire its events (the timer included)."""
    import gradio as gr

    handlers = QueueHandlers(ctx)
    line, show_restart = handlers.worker_line()
    with gr.Row():
        worker_md = gr.Markdown(line, elem_id="queue-worker")
        restart_btn = gr.Button("Restart worker", visible=show_restart, size="sm", elem_id="queue-restart")
    with gr.Row():
        with gr.Column(scale=4):
            # Both start empty and the timer's first tick (within REFRESH_S) fills them, so a fresh page never shows
            # the running line or preview of when the app started (a callable value would also be a public API
            # endpoint of its own).
            running_html = gr.HTML("", elem_id="queue-running-box")
            table = gr.Dataframe(
                value=handlers.rows(), headers=HEADERS, interactive=False, wrap=True, max_height=520,
                column_widths=COLUMN_WIDTHS, elem_id="queue-table",
            )  # fmt: skip
        with gr.Column(scale=1, min_width=240):
            preview = gr.Image(
                value=None, label="Latent preview of the running job", interactive=False, height=200,
                elem_id="queue-preview",
            )  # fmt: skip
            video = gr.Video(label="Selected job's video", interactive=False, visible=False, elem_id="queue-video")
    thumbs = handlers.thumbnails()
    strip = gr.Gallery(
        value=[(image, caption) for _, image, caption in thumbs], label="Finished videos (click one to select it)",
        columns=THUMBNAILS, rows=1, height=170, fit_columns=False, object_fit="contain", allow_preview=False,
        visible=bool(thumbs), elem_id="queue-thumbs",
    )  # fmt: skip
    strip_ids = gr.State([job_id for job_id, _, _ in thumbs])
    pick = handlers.selection(None)
    selected_md = gr.Markdown(pick.text, elem_id="queue-selected")
    with gr.Row():
        buttons = {
            name: gr.Button(label, variant=variant, visible=False, size="sm", elem_id=f"queue-{name}")
            for name, (label, variant) in BUTTONS.items()
        }
        clear_btn = gr.Button("Clear finished", size="sm", elem_id="queue-clear")
    message = gr.Markdown(elem_id="queue-message")
    selected = gr.State(None)
    last_preview = gr.State(None)
    timer = gr.Timer(REFRESH_S)

    def selection_updates(job_id: Any) -> list[Any]:
        pick = handlers.selection(job_id)
        return [pick.text, *[gr.update(visible=name in pick.actions) for name in BUTTONS]]

    selection_outputs = [selected_md, *buttons.values()]

    def refresh(last_key: Any, job_id: Any = None, shown_ids: list[int] | None = None) -> list[Any]:
        thumbs = handlers.thumbnails()
        ids = [i for i, _, _ in thumbs]
        strip_update: Any = gr.skip()
        if ids != shown_ids:
            strip_update = gr.update(value=[(image, caption) for _, image, caption in thumbs], visible=bool(ids))
        view = handlers.running()
        line, show = handlers.worker_line()
        key = None
        if view.preview_path:
            try:
                key = (view.preview_path, Path(view.preview_path).stat().st_mtime_ns)
            except OSError:  # replaced by the worker just now: the next tick sends it
                key = last_key
        # Only send a new preview when the file changed: each send copies it into Gradio's cache.
        image = gr.skip() if key == last_key else view.preview_path
        return [handlers.rows(), view.html, image, line, gr.update(visible=show), *selection_updates(job_id),
                strip_update, ids, key]  # fmt: skip

    timer.tick(
        refresh, [last_preview, selected, strip_ids],
        [table, running_html, preview, worker_md, restart_btn, *selection_outputs, strip, strip_ids, last_preview],
        show_progress="hidden",
    api_visibility="private")  # fmt: skip

    def choose(job_id: Any) -> list[Any]:
        pick = handlers.selection(job_id)
        shown = pick.video if pick.video and ctx.served.show(pick.video) else None
        return [pick.job_id, gr.update(value=shown, visible=shown is not None), *selection_updates(pick.job_id)]

    def select(evt: gr.SelectData) -> list[Any]:
        row = getattr(evt, "row_value", None)
        return choose(row[0]) if row else [gr.skip()] * (2 + len(selection_outputs))

    def select_thumb(ids: list[int], evt: gr.SelectData) -> list[Any]:
        index = evt.index if isinstance(evt.index, int) else None
        return (
            choose(ids[index]) if index is not None and index < len(ids) else [gr.skip()] * (2 + len(selection_outputs))
        )

    for fn in (select, select_thumb):  # Gradio reads the real class; postponed annotations are text
        fn.__annotations__["evt"] = gr.SelectData

    table.select(select, None, [selected, video, *selection_outputs], api_visibility="private")
    strip.select(select_thumb, strip_ids, [selected, video, *selection_outputs], api_visibility="private")

    for name in ("cancel", "retry", "up", "down", "remove"):
        buttons[name].click(
            lambda j, _name=name: [handlers.action(_name, j), handlers.rows(), *selection_updates(j)],
            selected, [message, table, *selection_outputs],
        api_visibility="private")  # fmt: skip

    def clear() -> list[Any]:
        return [handlers.clear_finished(), handlers.rows()]

    clear_btn.click(clear, None, [message, table], api_visibility="private")

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

    buttons["edit"].click(edit, selected, [message, tabs, *gen.fill_outputs], api_visibility="private")
    return QueueTab(handlers, selected, buttons["open"])
