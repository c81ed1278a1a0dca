"""The Generate tab's layout: its components, in `FormValues` order, and the events wired to `GenerateHandlers`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.batch import MAX_BATCH
from ui.context import AppContext
from ui.generate import GenerateHandlers
from ui.generate_form import (
    AUTO,
    CUSTOM,
    FRAMES,
    SECONDS,
    SOLVERS,
    FormValues,
    frames_to_seconds,
    length_info,
    resolve_frames,
    size_choices,
)
from wan_local.errors import WanLocalError
from wan_local.specs import TASKS, get_task

#: How often the Generate tab looks at the job it queued (seconds); the Queue tab refreshes as often.
JOB_REFRESH_S = 1.5


@dataclass
class GenerateTab:
    """Handles other tabs need: `inputs` (in FormValues order), the edited job's id, the status line."""

    inputs: list[Any]
    editing: Any
    status: Any
    edit_banner: Any
    prediction: Any
    handlers: GenerateHandlers
    length_info: Any = None

    def fill(self, form: FormValues, editing: int | None, message: str) -> list[Any]:
        """Outputs for `fill_outputs`: the form's values (with the task's choices), the edit state, banner, status,
        and the length line and prediction of the new form (computed here, in the same update: see `task_update`).
        The form's input image (the store's copy) is shown, that file only."""
        if form.image and not self.handlers.ctx.served.show(form.image):
            form = dataclasses.replace(form, image=None)
        return [*form_updates(form), editing, edit_banner(editing), message, *derived_lines(self.handlers, form)]

    @property
    def fill_outputs(self) -> list[Any]:
        """The components `fill` returns values for, in order."""
        return [*self.inputs, self.editing, self.edit_banner, self.status, self.length_info, self.prediction]


def derived_lines(handlers: GenerateHandlers, form: FormValues) -> list[str]:
    """The length line and the prediction panel of `form`."""
    return [length_info(form), handlers.prediction_text(form)]


def task_update(handlers: GenerateHandlers, current: FormValues) -> list[Any]:
    """Everything a task switch changes, as one update: the new task's form (its size choices and size together),
    the model folder line, the length line and the prediction.

    The length line and the prediction must not listen to `task.change` themselves: such an event would send the
    size chosen for the old task while this update swaps the size choices, and Gradio would refuse that value
    ("Value: '1280*720' … not in the list of choices", a red Error toast on every task switch)."""
    new = handlers.defaults(current.task, keep=current)
    return [*form_updates(new), handlers.model_status(new.task, new.model_dir), *derived_lines(handlers, new)]


def edit_banner(editing: int | None) -> Any:
    """The "editing job #N" banner's update (hidden when no job is edited)."""
    import gradio as gr

    if editing is None:
        return gr.update(visible=False, value="")
    return gr.update(visible=True, value=f"✎ **Editing queued job #{editing}.** 'Update job' saves the changes to it.")


def form_updates(form: FormValues) -> list[Any]:
    """gr.update per input component: values, plus the choices and visibility that depend on the task."""
    import gradio as gr

    spec = get_task(form.task)
    two = spec.two_experts
    image_label = "Input image (required" if spec.needs_image else "Input image (optional: image-to-video"
    image_label += "; it sets the aspect ratio, the size sets the area)"
    values = dict(zip(FormValues.names(), form.as_list(), strict=True))
    updates = {name: gr.update(value=value) for name, value in values.items()}
    updates["image"] = gr.update(value=form.image, visible=spec.accepts_image, label=image_label)
    updates["size"] = gr.update(choices=size_choices(spec), value=form.size)
    updates["custom_size"] = gr.update(value=form.custom_size, visible=form.size == CUSTOM)
    updates["guide_low"] = gr.update(
        value=form.guide_low, label="Guidance (low-noise expert)" if two else "Guidance scale"
    )
    updates["guide_high"] = gr.update(value=form.guide_high, visible=two)
    return [updates[name] for name in FormValues.names()]


def build_generate_tab(ctx: AppContext, page: Any = None) -> GenerateTab:
    """Lay out the Generate tab inside the current gr.Tab `page` and wire its events."""
    import gradio as gr

    handlers = GenerateHandlers(ctx)
    first_task = next((t for t in TASKS if handlers.model_dir_for(t)), next(iter(TASKS)))
    form = handlers.defaults(first_task)
    spec = get_task(form.task)
    preset_choices = [(f"auto ({ctx.pick.preset.label})", AUTO)] + [(p.label, p.name) for p in ctx.presets.values()]

    edit_md = gr.Markdown(visible=False, elem_id="gen-editing")
    with gr.Row():
        with gr.Column(scale=3):
            task = gr.Radio(
                [(f"{name} ({TASKS[name].mode.upper()})", name) for name in TASKS],
                value=form.task, label="Task", elem_id="gen-task",
            )  # fmt: skip
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the video", elem_id="gen-prompt")
            negative = gr.Textbox(
                label="Negative prompt", lines=2, placeholder="empty: the official default", elem_id="gen-negative"
            )
            # image_mode None: the uploaded file is passed on as is, never re-encoded (webp would be lossy).
            image = gr.Image(
                type="filepath", image_mode=None, label="Input image", sources=["upload", "clipboard"], height=240,
                visible=spec.accepts_image, elem_id="gen-image",
            )  # fmt: skip
            with gr.Row():
                size = gr.Radio(size_choices(spec), value=form.size, label="Size (width × height)", elem_id="gen-size")
                custom_size = gr.Textbox(
                    label="Custom size W*H", placeholder="e.g. 832*480", visible=False, elem_id="gen-custom-size"
                )
            with gr.Row():
                length_unit = gr.Radio([SECONDS, FRAMES], value=form.length_unit, label="Length in", elem_id="gen-unit")
                length = gr.Number(value=form.length, label="Length", elem_id="gen-length")
                steps = gr.Number(value=form.steps, label="Steps", precision=0, minimum=1, elem_id="gen-steps")
                seed = gr.Textbox(value=form.seed, label="Seed ('random' or a number)", elem_id="gen-seed")
            length_md = gr.Markdown(length_info(form), elem_id="gen-length-info")
            with gr.Accordion("Guidance, shift and solver", open=False), gr.Row():
                guide_low = gr.Number(value=form.guide_low, label="Guidance (low-noise expert)", elem_id="gen-gl")
                guide_high = gr.Number(
                    value=form.guide_high, label="Guidance (high-noise expert)", visible=spec.two_experts,
                    elem_id="gen-gh",
                )  # fmt: skip
                shift = gr.Number(value=form.shift, label="Shift", elem_id="gen-shift")
                solver = gr.Radio(list(SOLVERS), value=form.solver, label="Solver", elem_id="gen-solver")
            with gr.Accordion("Batch: variations and a prompt list", open=False, elem_id="gen-batch"), gr.Row():
                variations = gr.Number(
                    value=1, label="Variations (seeds s, s+1, …)", precision=0, minimum=1, maximum=MAX_BATCH,
                    elem_id="gen-variations",
                )  # fmt: skip
                prompt_list = gr.Textbox(
                    label="Prompt list, one per line (replaces the prompt; each gets every variation)", lines=3,
                    elem_id="gen-prompt-list",
                )  # fmt: skip
        with gr.Column(scale=2):
            preset = gr.Dropdown(preset_choices, value=AUTO, label="Memory preset", elem_id="gen-preset")
            preset_md = gr.Markdown(handlers.preset_info(AUTO), elem_id="gen-preset-info")
            prediction_md = gr.Markdown(elem_id="gen-prediction")
            model_dir = gr.Textbox(value=form.model_dir, label="Model folder for this task", elem_id="gen-model-dir")
            model_md = gr.Markdown(handlers.model_status(form.task, form.model_dir), elem_id="gen-model-status")
            add_btn = gr.Button("Add to queue", variant="primary", elem_id="gen-add")
            with gr.Row():
                update_btn = gr.Button("Update job", visible=False, elem_id="gen-update")
                cancel_edit_btn = gr.Button("Stop editing", visible=False, elem_id="gen-stop-edit")
            status = gr.Markdown(elem_id="gen-status")
            job_html = gr.HTML(elem_id="gen-job")
            with gr.Row():
                job_preview = gr.Image(
                    label="Latent preview", interactive=False, height=200, visible=False, elem_id="gen-preview"
                )
                job_video = gr.Video(label="Result", interactive=False, visible=False, height=240, elem_id="gen-video")
    editing = gr.State(None)
    watching = gr.State([])  # ids of the jobs this tab queued last (one, or a batch)
    shown = gr.State(None)  # (preview path, mtime, video path) last sent: each send copies the file
    job_timer = gr.Timer(JOB_REFRESH_S, active=False)

    inputs = [
        task, prompt, negative, image, size, custom_size, length_unit, length, steps, seed, guide_low, guide_high,
        shift, solver, preset, model_dir,
    ]  # fmt: skip
    assert len(inputs) == len(FormValues.names())
    tab = GenerateTab(inputs, editing, status, edit_md, prediction_md, handlers, length_md)

    def on_task(*values: Any) -> list[Any]:
        return task_update(handlers, FormValues(*values))

    task.input(on_task, inputs, [*inputs, model_md, length_md, prediction_md], api_visibility="private")
    size.input(lambda choice: gr.update(visible=choice == CUSTOM), size, custom_size, api_visibility="private")
    # Only what the user does triggers the length line and the prediction (`.input`, never `.change`): a
    # `.change` also fires for values that an update of several fields sets, and would send the form half-updated
    # (see task_update). Updates that change the form compute those lines themselves (task_update, fill, on_unit).
    gr.on([length.input], lambda *v: length_info(FormValues(*v)), inputs, length_md, api_visibility="private")
    preset.change(handlers.preset_info, preset, preset_md, api_visibility="private")
    model_dir.change(handlers.model_status, [task, model_dir], model_md, api_visibility="private")
    predict_triggers = [size.input, custom_size.input, length.input, steps.input, preset.input, model_dir.input]
    gr.on(
        predict_triggers, lambda *v: handlers.prediction_text(FormValues(*v)), inputs, prediction_md,
        trigger_mode="always_last", api_visibility="private",
    )  # fmt: skip

    def on_unit(unit: str, *values: Any) -> list[Any]:
        # Converting the number keeps the length the same when the unit flips.
        current = FormValues(*values)
        spec_now = get_task(current.task)
        try:
            old = dataclasses.replace(current, length_unit=FRAMES if unit == SECONDS else SECONDS)
            frames = resolve_frames(old, spec_now)
        except WanLocalError:
            return [gr.update(), *derived_lines(handlers, current)]
        length_now = round(frames_to_seconds(spec_now, frames), 2) if unit == SECONDS else frames
        return [length_now, *derived_lines(handlers, dataclasses.replace(current, length=length_now))]

    length_unit.input(on_unit, [length_unit, *inputs], [length, length_md, prediction_md], api_visibility="private")

    def on_add(count: Any, prompts: str, *values: Any) -> list[Any]:
        message, ids = handlers.add_batch(FormValues(*values), count, prompts)
        if not ids:
            return [message, gr.skip(), gr.skip()]
        return [message, ids, gr.Timer(active=True)]

    add_btn.click(on_add, [variations, prompt_list, *inputs], [status, watching, job_timer], api_visibility="private")

    def on_tick(ids: list[int], last: Any) -> list[Any]:
        view = handlers.panel(ids)
        served = view.video_path if view.video_path and ctx.served.show(view.video_path) else None
        key = (_file_key(view.preview_path), served)
        media: list[Any] = [gr.skip(), gr.skip()]
        if key != last:
            media = [
                gr.update(value=view.preview_path, visible=view.preview_path is not None),
                gr.update(value=served, visible=served is not None),
            ]
        return [view.html, *media, gr.Timer(active=view.active), key]

    panel_outputs = [job_html, job_preview, job_video, job_timer, shown]
    job_timer.tick(on_tick, [watching, shown], panel_outputs, show_progress="hidden", api_visibility="private")
    watching.change(on_tick, [watching, shown], panel_outputs, show_progress="hidden", api_visibility="private")

    def on_update(job_id: int | None, *values: Any) -> list[Any]:
        message = handlers.update(job_id, FormValues(*values))
        done = message.startswith("✓")
        keep = None if done else job_id
        return [None if done else job_id, edit_banner(keep), *_edit_buttons(keep), message]

    update_btn.click(
        on_update,
        [editing, *inputs],
        [editing, edit_md, add_btn, update_btn, cancel_edit_btn, status],
        api_visibility="private",
    )

    def stop_editing() -> list[Any]:
        return [None, edit_banner(None), *_edit_buttons(None), "Stopped editing; the job is unchanged."]

    cancel_edit_btn.click(
        stop_editing, None, [editing, edit_md, add_btn, update_btn, cancel_edit_btn, status], api_visibility="private"
    )
    editing.change(
        lambda e: _edit_buttons(e), editing, [add_btn, update_btn, cancel_edit_btn], api_visibility="private"
    )
    if page is not None:  # coming back from the Models or Settings tab: pick up a newly chosen model folder
        page.select(handlers.current_model_dir, [task, model_dir], model_dir, api_visibility="private").then(
            lambda *v: handlers.prediction_text(FormValues(*v)), inputs, prediction_md, api_visibility="private"
        )
    return tab


def _file_key(path: str | None) -> tuple[str, int] | None:
    """(path, mtime) of a file that may be replaced at any moment (the worker rewrites the preview), None if gone."""
    try:
        return (path, Path(path).stat().st_mtime_ns) if path else None
    except OSError:
        return None


def _edit_buttons(editing: int | None) -> list[Any]:
    import gradio as gr

    on = editing is not None
    return [gr.update(visible=not on), gr.update(visible=on), gr.update(visible=on)]
