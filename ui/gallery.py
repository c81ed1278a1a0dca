"""Gallery tab: finished videos (outputs of done jobs, plus any MP4 of ours in the output folders) with the
settings read back from the MP4 itself, "reuse these settings", and "open folder"."""

from __future__ import annotations

import html
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.generate_form import FormValues, form_from_settings
from ui.generate_layout import GenerateTab
from wan_local.errors import WanLocalError

log = logging.getLogger(__name__)

MAX_ITEMS = 300
HEADERS = ["video", "made", "task", "size", "frames", "seed", "prompt"]


@dataclass(frozen=True)
class GalleryItem:
    """One finished video: its path, the settings embedded in it (None: none readable), the job that made it
    (None: found in a folder), and when it was made (Unix seconds)."""

    path: str
    settings: Mapping[str, Any] | None
    job_id: int | None
    made_at: float

    @property
    def label(self) -> str:
        """File name and the start of the prompt, for the video picker."""
        prompt = str((self.settings or {}).get("prompt", ""))[:50]
        return f"{Path(self.path).name} — {prompt}" if prompt else Path(self.path).name


def open_folder(
    folder: Path | str,
    *,
    platform: str = sys.platform,
    env: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    popen: Callable[..., Any] = subprocess.Popen,
) -> str:
    """Open `folder` in the OS file manager (os.startfile / open / xdg-open) on the computer running wan-local;
    on a machine without a desktop, return the path to copy instead."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ if env is None else env
    try:
        if platform == "win32":
            os.startfile(str(folder))  # type: ignore[attr-defined]  # Windows only
        elif platform == "darwin":
            popen(["open", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            opener = which("xdg-open")
            if opener is None or not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
                return f"No desktop to open a folder on (headless); the videos are in: {folder}"
            popen([opener, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return f"Could not open the folder ({exc}); the videos are in: {folder}"
    return f"Opened {folder} on the computer running wan-local."


class GalleryHandlers:
    """The Gallery tab's logic. Metadata read from MP4s is cached by (path, size, mtime)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._meta: dict[tuple[str, int, int], Mapping[str, Any] | None] = {}

    def folders(self) -> list[Path]:
        """The folders scanned for videos: the chosen output folder and <home>/outputs."""
        found: list[Path] = []
        for folder in (self.ctx.output_dir(), self.ctx.store.outputs_dir):
            if folder.absolute() not in [f.absolute() for f in found]:
                found.append(folder)
        return found

    def read_settings(self, path: Path) -> Mapping[str, Any] | None:
        """The settings embedded in `path` (cached), None when it has none or cannot be read."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._meta:
            from wan_local.video import read_settings

            try:
                self._meta[key] = read_settings(path)
            except WanLocalError as exc:
                log.info("no settings in %s: %s", path, exc)
                self._meta[key] = None
        return self._meta[key]

    def items(self) -> list[GalleryItem]:
        """Finished videos, newest first: done jobs' outputs, then our MP4s in the output folders."""
        items: dict[str, GalleryItem] = {}
        for job in self.ctx.store.list(("done",)):
            if job.output_path and Path(job.output_path).is_file():
                path = Path(job.output_path)
                key = str(path.absolute())
                items[key] = GalleryItem(key, self.read_settings(path), job.id, job.finished_at or path.stat().st_mtime)
        for folder in self.folders():
            if not folder.is_dir():
                continue
            for path in folder.glob("*.mp4"):
                key = str(path.absolute())
                if key in items or path.name.startswith("."):  # dot files: videos still being written
                    continue
                settings = self.read_settings(path)
                if settings is not None:  # only our videos: others carry no settings to show
                    items[key] = GalleryItem(key, settings, settings.get("job_id"), path.stat().st_mtime)
        return sorted(items.values(), key=lambda item: -item.made_at)[:MAX_ITEMS]

    @staticmethod
    def rows(items: list[GalleryItem]) -> list[list[Any]]:
        """Table rows: file name, when, task, size, frames, seed, prompt."""
        rows = []
        for item in items:
            s = item.settings or {}
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.made_at))
            size = str(s.get("video_size") or s.get("size") or "").replace("*", "×")
            seed = str(s.get("seed", ""))  # text: 63-bit seeds lose digits as JavaScript numbers
            rows.append([Path(item.path).name, made, s.get("task", ""), size, s.get("frames", ""), seed,
                         s.get("prompt", "")])  # fmt: skip
        return rows

    def details(self, path: str | None) -> str:
        """Markdown with the settings of the video at `path`."""
        if not path:
            return "No video selected."
        settings = self.read_settings(Path(path))
        if settings is None:
            return f"`{path}` carries no wan-local settings."
        order = ("prompt", "negative_prompt", "seed", "task", "video_size", "frames", "fps", "steps", "guide_scale",
                 "shift", "solver", "preset", "device", "dtype", "image_source", "job_id", "generator")  # fmt: skip
        lines = [f"**File:** `{path}`"]
        for key in order:
            value = settings.get(key)
            if value in (None, "", []):
                continue
            lines.append(f"- **{key.replace('_', ' ')}:** {html.escape(str(value))}")
        return "\n".join(lines)

    def reuse(self, path: str | None) -> tuple[FormValues | None, str]:
        """The Generate form that reproduces the video at `path` (same seed), and a message."""
        if not path:
            return None, "Select a video first."
        settings = self.read_settings(Path(path))
        if settings is None:
            return None, f"✗ {Path(path).name} carries no wan-local settings to reuse."
        try:
            task = str(settings.get("task"))
            model_dir = self.ctx.settings.current.model_dir(task) or ""
            form = form_from_settings(settings, model_dir=model_dir)
        except WanLocalError as exc:
            return None, f"✗ cannot reuse {Path(path).name}: {exc}"
        return form, f"Settings of {Path(path).name} loaded (seed {form.seed}); change what you like and add it."

    def open_output_folder(self) -> str:
        """Open the output folder in the file manager (or say where it is)."""
        return open_folder(self.ctx.output_dir())


@dataclass
class GalleryTab:
    """Handles other tabs need: `open(path)` gives the updates of `outputs` that list the videos and select one."""

    handlers: GalleryHandlers
    outputs: list[Any]
    open: Callable[[str | None], list[Any]]


def build_gallery_tab(ctx: AppContext, gen: GenerateTab, tabs: Any, tab: Any) -> GalleryTab:
    """Lay out the Gallery tab inside the current gr.Tab `tab` and wire its events."""
    import gradio as gr

    handlers = GalleryHandlers(ctx)
    with gr.Row():
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="gallery-refresh")
        open_btn = gr.Button("Open folder", size="sm", elem_id="gallery-open")
        folder_md = gr.Markdown(f"Videos go to `{ctx.output_dir()}`", elem_id="gallery-folder")
    table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, max_height=320, elem_id="gallery-table")
    with gr.Row():
        with gr.Column(scale=3):
            choice = gr.Dropdown(label="Video", choices=[], elem_id="gallery-choice")
            video = gr.Video(label="Video", interactive=False, elem_id="gallery-video")
        with gr.Column(scale=2):
            details = gr.Markdown(elem_id="gallery-details")
            reuse_btn = gr.Button("Reuse these settings", variant="primary", elem_id="gallery-reuse")
            message = gr.Markdown(elem_id="gallery-message")

    def refresh(current: str | None) -> list[Any]:
        items = handlers.items()
        paths = [item.path for item in items]
        selected = current if current in paths else (paths[0] if paths else None)
        choices = [(item.label, item.path) for item in items]
        note = f"Videos go to `{ctx.output_dir()}`; {len(items)} video(s)."
        return [handlers.rows(items), gr.update(choices=choices, value=selected), note]

    outputs = [table, choice, folder_md]
    refresh_btn.click(refresh, choice, outputs, api_visibility="private")
    tab.select(refresh, choice, outputs, api_visibility="private")

    def show(path: str | None) -> list[Any]:
        shown = bool(path) and ctx.served.show(path)  # a video of an earlier output folder: that file only
        return [path if shown else None, handlers.details(path)]

    choice.change(show, choice, [video, details], api_visibility="private")

    def select_row(evt: gr.SelectData) -> Any:
        row = getattr(evt, "row_value", None)
        if not row:
            return gr.skip()
        match = [item.path for item in handlers.items() if Path(item.path).name == row[0]]
        return match[0] if match else gr.skip()

    select_row.__annotations__["evt"] = gr.SelectData  # Gradio reads the real class; postponed annotations are text

    table.select(select_row, None, choice, api_visibility="private")
    open_btn.click(handlers.open_output_folder, None, message, api_visibility="private")

    def reuse(path: str | None) -> list[Any]:
        form, text = handlers.reuse(path)
        if form is None:
            return [text, gr.skip(), *[gr.skip()] * len(gen.fill_outputs)]
        return [text, gr.Tabs(selected="generate"), *gen.fill(form, None, text)]

    reuse_btn.click(reuse, choice, [message, tabs, *gen.fill_outputs], api_visibility="private")
    return GalleryTab(handlers, outputs, refresh)
