"""The Gradio UI of wan-local: `build_app(...)` lays out the tabs around the objects it is given.

Nothing here holds state at module level and nothing heavy happens at import (Gradio itself is imported inside
`build_app`). One module per tab: generate, queue, gallery, models, settings (generate and queue keep their
layout in *_layout); `api` is the scripting API (named endpoints; every UI callback is private, so `view_api()`
lists only those), `prediction` the estimate adapter, `job_view` one job's progress as both the Generate and Queue
tabs show it, `batch` the jobs of one click, `thumbnails` poster frames, and `context` the bundle of objects the
tabs share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ui.context import AppContext, WorkerControl
from ui.prediction import Estimator, load_estimator

if TYPE_CHECKING:
    import gradio as gr

    from wan_local.jobs.store import JobStore
    from wan_local.machine import MachineInfo
    from wan_local.models_hub import DownloadManager
    from wan_local.presets import Preset
    from wan_local.settings import SettingsStore

__all__ = ["AppContext", "WorkerControl", "build_app", "build_context", "theme"]

_LOAD_ESTIMATOR: Any = object()  # sentinel: "import the real estimator"


def build_context(
    *,
    store: JobStore,
    settings: SettingsStore,
    machine: MachineInfo,
    presets: Mapping[str, Preset],
    worker: WorkerControl | None = None,
    hub: DownloadManager | None = None,
    estimator: Estimator | None = _LOAD_ESTIMATOR,
    measure: Callable[[MachineInfo], MachineInfo] | None = None,
) -> AppContext:
    """The AppContext the tabs share.

    store: the job queue; settings: the app settings and their file; machine: the startup measurement (VRAM is
    never re-measured in the UI process); presets: loaded presets (pick_preset chooses "auto"); worker: the
    worker process handle (None: --no-worker); hub: the download manager (default: a new one whose finished
    downloads become the task's model folder); estimator: estimate_job-like callable (default: imported when
    available; None: "no estimate"); measure: replaces the RAM re-measurement (tests). The context's `served`
    policy serves the output folder of the settings and the previews folder, never the queue's database or the
    settings (its lists and guard go to launch()).
    """
    from ui.served import PrivatePaths, ServedFiles
    from wan_local.models_hub import DownloadManager

    ctx = AppContext(
        store=store,
        settings=settings,
        machine=machine,
        presets=presets,
        worker=worker,
        hub=hub if hub is not None else DownloadManager(),
        estimator=load_estimator() if estimator is _LOAD_ESTIMATOR else estimator,
        served=ServedFiles(PrivatePaths.of(store.path, settings.path), store.previews_dir),
        measure=measure,
    )
    ctx.served.rebuild(ctx.output_dir())
    return ctx


def theme() -> Any:
    """A theme with system fonts only: the app must look right without internet (no web-font downloads)."""
    import gradio as gr

    return gr.themes.Soft(
        font=["system-ui", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


def build_app(ctx: AppContext) -> gr.Blocks:
    """The whole UI as a gr.Blocks (not launched), laid out around the objects of `ctx` (see `build_context`)."""
    import gradio as gr

    from ui.api import register_api
    from ui.gallery import build_gallery_tab
    from ui.generate_form import FormValues
    from ui.generate_layout import build_generate_tab
    from ui.models import build_models_tab
    from ui.queue_layout import build_queue_tab
    from ui.settings import build_settings_tab

    with gr.Blocks(title="wan-local", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(
            f"## wan-local · Wan2.2 video\n{ctx.machine.describe()} · preset: **{ctx.pick.preset.label}**",
            elem_id="app-header",
        )
        with gr.Tabs(selected="generate", elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate_tab:
                gen = build_generate_tab(ctx, generate_tab)
            with gr.Tab("Queue", id="queue", elem_id="tab-queue"):
                queue = build_queue_tab(ctx, gen, tabs)
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery") as gallery_tab:
                gallery = build_gallery_tab(ctx, gen, tabs, gallery_tab)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                build_models_tab(ctx)
            with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
                build_settings_tab(ctx)
        register_api(ctx)  # the scripting API; every UI callback is api_visibility="private", so view_api() lists
        # only these named endpoints
        # "Open in Gallery" on a done job: select its video there first, then show the tab.
        queue.open_button.click(
            lambda job_id: gallery.open(queue.handlers.selection(job_id).video),
            queue.selected,
            gallery.outputs,
            api_visibility="private",
        ).then(lambda: gr.Tabs(selected="gallery"), None, tabs, api_visibility="private")
        model_dir = gen.inputs[FormValues.names().index("model_dir")]
        demo.load(gen.handlers.current_model_dir, [gen.inputs[0], model_dir], model_dir, api_visibility="private")
        demo.load(
            lambda *v: gen.handlers.prediction_text(FormValues(*v)),
            gen.inputs,
            gen.prediction,
            api_visibility="private",
        )
    return demo
