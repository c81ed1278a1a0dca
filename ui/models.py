"""Models tab: per task, where its model folder is and whether it is complete; "use this folder" for files the
user already has; size check and background download of the official repository (wan_local.models_hub)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ui.context import AppContext
from wan_local.models_hub import OFFICIAL_REPOS, DownloadError, default_download_dir, folder_status, plan_download
from wan_local.settings import SettingsError
from wan_local.specs import TASKS, get_task

log = logging.getLogger(__name__)

REFRESH_S = 2.0


class ModelsHandlers:
    """The Models tab's logic over an AppContext."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def loaded(self) -> str:
        """The Models tab's "Loaded in the worker" table."""
        from wan_local.jobs.worker import LOADED_MODELS_NAME

        return loaded_models_markdown(self.ctx.store.folder / LOADED_MODELS_NAME)

    def folder(self, task: str) -> str:
        """The task's model folder from the settings ("" when unset)."""
        return self.ctx.settings.current.model_dir(get_task(task).name) or ""

    def status(self, task: str) -> str:
        """Markdown: the set folder and whether it is complete."""
        status = folder_status(task, self.folder(task) or None)
        return f"✓ {status.message}" if status.complete else f"✗ {status.message}"

    def target(self, task: str, folder: str | None) -> Path:
        """Where a download goes: the typed folder, else the set folder, else <home>/models/<repository>."""
        chosen = (folder or "").strip() or self.folder(task)
        return Path(chosen).expanduser() if chosen else default_download_dir(self.ctx.store.folder, task)

    def use_folder(self, task: str, folder: str | None) -> str:
        """Make `folder` the task's model folder (any layout); say whether it is complete."""
        spec = get_task(task)
        if not folder or not folder.strip():
            return "✗ Type the folder that holds the model files first."
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            return f"✗ {path} is not a folder on this computer."
        try:
            self.ctx.settings.save(self.ctx.settings.current.with_model_dir(spec.name, str(path.absolute())))
        except SettingsError as exc:
            return f"✗ {exc}"
        status = folder_status(spec.name, path)
        if status.complete:
            return f"✓ {spec.name} now uses {path} ({status.layout} layout)."
        return f"⚠ {spec.name} now uses {path}, but it is incomplete: {status.message}"

    def check_size(self, task: str, folder: str | None) -> str:
        """The repository's size against the free disk (contacts the Hub; fails fast when offline)."""
        try:
            plan = plan_download(task, self.target(task, folder))
        except DownloadError as exc:
            return f"✗ {exc}"
        return f"{'✓' if plan.ok else '✗'} {plan.message}"

    def download(self, task: str, folder: str | None) -> str:
        """Start the background download of `task`'s official repository."""
        target = self.target(task, folder)
        status = self.ctx.hub.start(task, target)
        return status.describe()

    def download_line(self, task: str) -> str:
        """The task's download state (empty when none was started)."""
        status = self.ctx.hub.status(task)
        if status.state == "idle":
            return ""
        icon = {"done": "✓", "failed": "✗", "refused": "✗"}.get(status.state, "…")
        return f"{icon} {status.describe()}"

    def saved_download(self, task: str, folder: Path) -> None:
        """DownloadManager.on_done: a complete download becomes the task's model folder."""
        try:
            self.ctx.settings.save(self.ctx.settings.current.with_model_dir(task, str(Path(folder).absolute())))
        except SettingsError as exc:
            log.error("could not save the model folder of %s: %s", task, exc)


def loaded_models_markdown(path: Path) -> str:
    """What the worker holds (its memory ledger, as `PipelineRunner.publish_loaded` writes it) as a table."""
    import json

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "Nothing loaded yet: the worker loads models when it runs a job."
    except (OSError, ValueError) as exc:
        return f"Cannot read {path.name} ({exc})."
    entries = data.get("entries") or []
    if not entries:
        return "Nothing is loaded (the last job's models were released)."
    rows = ["| model | RAM | pinned | VRAM | |", "|---|---|---|---|---|"]
    for e in entries:
        idle = "idle, freed when RAM is needed" if e.get("evictable") else e.get("state", "")
        rows.append(
            f"| {e.get('name', '?')} | {_gb(e.get('host_bytes', 0))} | {_gb(e.get('pinned_bytes', 0))} "
            f"| {_gb(e.get('vram_bytes', 0))} | {idle} |"
        )
    total = sum(int(e.get("host_bytes", 0)) for e in entries)
    return "\n".join([*rows, "", f"{len(entries)} loaded, {_gb(total)} of RAM in all."])


def _gb(n_bytes: int) -> str:
    return f"{int(n_bytes) / 2**30:.1f} GiB"


def build_models_tab(ctx: AppContext) -> ModelsHandlers:
    """Lay out the Models tab inside the current gr.Tab and wire its events."""
    import gradio as gr

    handlers = ModelsHandlers(ctx)
    if ctx.hub.on_done is None:
        ctx.hub.on_done = handlers.saved_download
    gr.Markdown(
        "Each task needs its own model folder: the official repository (`hf download <repo> --local-dir DIR`), its "
        "`-Diffusers` version, or ComfyUI single files plus the tokenizer folder. Downloads resume when restarted."
    )
    status_boxes, line_boxes, tasks = [], [], list(TASKS)
    for task in tasks:
        slug = task.lower()
        with gr.Group():
            gr.Markdown(f"### {task} · [{OFFICIAL_REPOS[task]}](https://huggingface.co/{OFFICIAL_REPOS[task]})")
            status = gr.Markdown(handlers.status(task), elem_id=f"models-status-{slug}")
            folder = gr.Textbox(
                value=handlers.folder(task), label="Folder", elem_id=f"models-folder-{slug}",
                placeholder=f"empty: download into {default_download_dir(ctx.store.folder, task)}",
            )  # fmt: skip
            with gr.Row():
                use_btn = gr.Button("Use this folder", size="sm", elem_id=f"models-use-{slug}")
                size_btn = gr.Button("Check size", size="sm", elem_id=f"models-size-{slug}")
                download_btn = gr.Button("Download", size="sm", variant="primary", elem_id=f"models-download-{slug}")
            message = gr.Markdown(elem_id=f"models-message-{slug}")
            line = gr.Markdown(handlers.download_line(task), elem_id=f"models-line-{slug}")
        use_btn.click(lambda f, _t=task: [handlers.use_folder(_t, f), handlers.status(_t)], folder, [message, status])
        size_btn.click(lambda f, _t=task: handlers.check_size(_t, f), folder, message)
        download_btn.click(lambda f, _t=task: handlers.download(_t, f), folder, line)
        status_boxes.append(status)
        line_boxes.append(line)

    gr.Markdown("### Loaded in the worker")
    loaded = gr.Markdown(handlers.loaded(), elem_id="models-loaded")
    timer = gr.Timer(REFRESH_S)

    def refresh() -> list[Any]:
        # Folder checks read file headers: only repeat them while a download can change the answer.
        busy = [ctx.hub.status(t).state != "idle" for t in tasks]
        lines = [handlers.download_line(t) if b else gr.skip() for t, b in zip(tasks, busy, strict=True)]
        statuses = [handlers.status(t) if b else gr.skip() for t, b in zip(tasks, busy, strict=True)]
        return [*lines, *statuses, handlers.loaded()]

    timer.tick(refresh, None, [*line_boxes, *status_boxes, loaded])
    return handlers
