"""Generate tab: the form that describes one video, its prediction, and "Add to queue" / "Update job".

`FormValues` is the form as plain values, in the order of the tab's input components; `GenerateHandlers` holds
the logic (tested directly, no Gradio); `build_generate_tab` lays out the components and wires them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.prediction import Prediction, load_components, load_dit_config, predict
from wan_local.errors import InputError, WanLocalError
from wan_local.jobs.records import JobSettings
from wan_local.models_hub import folder_status
from wan_local.presets import Preset
from wan_local.specs import TASKS, TaskSpec, check_frames, check_size, get_task, parse_size

log = logging.getLogger(__name__)

CUSTOM = "custom"
AUTO = "auto"
RANDOM = "random"
SECONDS, FRAMES = "seconds", "frames"
SOLVERS = ("unipc", "dpm++", "euler")  # wan_local.sampling.schedule.SCHEDULE_SOLVERS (not imported: torch)


@dataclass(frozen=True)
class FormValues:
    """The Generate form as plain values, in the order of `GenerateTab.inputs`.

    size is "W*H" or CUSTOM (then custom_size is "W*H"); length is in `length_unit` (SECONDS or FRAMES); seed is
    text: RANDOM (or empty / -1) or a whole number; guide_high is used by two-expert tasks only; preset is AUTO or
    a preset name; image is a file path or None.
    """

    task: str
    prompt: str = ""
    negative_prompt: str = ""
    image: str | None = None
    size: str = ""
    custom_size: str = ""
    length_unit: str = SECONDS
    length: float | None = None
    steps: float | None = None
    seed: str = RANDOM
    guide_low: float | None = None
    guide_high: float | None = None
    shift: float | None = None
    solver: str = "unipc"
    preset: str = AUTO
    model_dir: str = ""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Field names in component order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_list(self) -> list[Any]:
        """Values in component order (what Gradio passes to a handler)."""
        return [getattr(self, name) for name in self.names()]


# ------------------------------------------------------------------------------------------------- conversions


def size_text(size: tuple[int, int]) -> str:
    """(1280, 720) -> "1280*720"."""
    return f"{size[0]}*{size[1]}"


def size_choices(spec: TaskSpec) -> list[tuple[str, str]]:
    """(label, value) pairs: the task's official sizes, then "custom"."""
    choices = []
    for w, h in spec.official_sizes:
        shape = "landscape" if w > h else "portrait" if h > w else "square"
        choices.append((f"{w}×{h} {shape}", size_text((w, h))))
    return [*choices, ("custom W*H", CUSTOM)]


def seconds_to_frames(spec: TaskSpec, seconds: float) -> int:
    """The 4k+1 frame count closest to `seconds` at the task's fps (at least 1)."""
    t = spec.vae_stride[0]
    return max(0, round(seconds * spec.fps / t)) * t + 1


def frames_to_seconds(spec: TaskSpec, frames: int) -> float:
    """How long `frames` frames play at the task's fps."""
    return (frames - 1) / spec.fps if frames > 1 else 1 / spec.fps


def parse_seed(text: Any) -> int:
    """RANDOM / "" / -1 -> -1; else a whole number >= 0."""
    value = str(text if text is not None else "").strip().lower()
    if value in ("", RANDOM, "-1"):
        return -1
    try:
        seed = int(value)
    except ValueError:
        raise InputError(f"seed {text!r} is not a whole number; type a number or '{RANDOM}'") from None
    if seed < 0:
        raise InputError(f"seed {seed} must be 0 or more (or '{RANDOM}')")
    return seed


def seed_text(seed: int | None) -> str:
    """A seed as the form shows it: RANDOM for None or -1."""
    return RANDOM if seed is None or seed < 0 else str(seed)


def task_defaults(spec: TaskSpec, model_dir: str = "", keep: FormValues | None = None) -> FormValues:
    """The form for `spec` with its official defaults; prompt, negative prompt, image, unit, seed and preset are
    kept from `keep` (a task switch should not erase what was typed)."""
    keep = keep or FormValues(task=spec.name)
    unit = keep.length_unit if keep.length_unit in (SECONDS, FRAMES) else SECONDS
    return FormValues(
        task=spec.name,
        prompt=keep.prompt,
        negative_prompt=keep.negative_prompt,
        image=keep.image if spec.accepts_image else None,
        size=size_text(spec.default_size),
        custom_size="",
        length_unit=unit,
        length=round(frames_to_seconds(spec, spec.frames), 2) if unit == SECONDS else spec.frames,
        steps=spec.steps,
        seed=keep.seed,
        guide_low=spec.guide_scale[0],
        guide_high=spec.guide_scale[1],
        shift=spec.shift,
        solver=keep.solver if keep.solver in SOLVERS else "unipc",
        preset=keep.preset,
        model_dir=model_dir,
    )


def form_from_settings(data: Mapping[str, Any], model_dir: str = "", seed: int | None = None) -> FormValues:
    """The form that reproduces a job or a video: `data` is JobSettings.to_dict() or the settings embedded in one
    of our MP4s (size "W*H" or [W, H]). `seed` overrides data["seed"] (a job's resolved seed)."""
    spec = get_task(str(data.get("task")))
    size = data.get("size")
    if isinstance(size, str):
        size = parse_size(size)
    size = tuple(size) if size else spec.default_size
    official = {size_text(s) for s in spec.official_sizes}
    text = size_text(size)
    guide = data.get("guide_scale") or spec.guide_scale
    # The store's own copy first (it is served from the app's folder), else the original file.
    candidates = [data.get("image"), data.get("image_source")]
    image = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    return FormValues(
        task=spec.name,
        prompt=str(data.get("prompt") or ""),
        negative_prompt=str(data.get("negative_prompt") or ""),
        image=image if spec.accepts_image else None,
        size=text if text in official else CUSTOM,
        custom_size="" if text in official else text,
        length_unit=FRAMES,
        length=int(data.get("frames") or spec.frames),
        steps=int(data.get("steps") or spec.steps),
        seed=seed_text(seed if seed is not None else data.get("seed")),
        guide_low=float(guide[0]),
        guide_high=float(guide[1]),
        shift=float(data.get("shift") or spec.shift),
        solver=str(data.get("solver") or "unipc"),
        preset=str(data["preset"]) if data.get("preset") else AUTO,
        model_dir=str(data.get("ckpt_dir") or model_dir),
    )


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r} is not a number") from None
    if math.isnan(number):
        raise InputError(f"{name} is empty; type a number")
    return number


def _whole(value: Any, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise InputError(f"{name} {value!r} must be a whole number")
    return int(number)


def resolve_size(form: FormValues, spec: TaskSpec) -> tuple[int, int]:
    """(width, height) from the form; InputError naming the value and what the task accepts."""
    text = form.custom_size if form.size == CUSTOM else form.size
    if not text or not str(text).strip():
        raise InputError("type a custom size as W*H (e.g. 832*480)")
    size = parse_size(str(text))
    check_size(spec, *size)
    return size


def resolve_frames(form: FormValues, spec: TaskSpec) -> int:
    """The frame count (4k+1) from a length in seconds or frames."""
    if form.length_unit == SECONDS:
        seconds = _number(form.length, "length (seconds)")
        if seconds <= 0:
            raise InputError(f"length {seconds:g} s must be more than 0")
        return seconds_to_frames(spec, seconds)
    frames = _whole(form.length, "length (frames)")
    check_frames(spec, frames)
    return frames


def resolve_steps(form: FormValues) -> int:
    """The number of sampling steps (at least 1)."""
    steps = _whole(form.steps, "steps")
    if steps < 1:
        raise InputError(f"steps {steps} must be at least 1")
    return steps


def length_info(form: FormValues) -> str:
    """ "81 frames = 5.06 s at 16 fps", or what is wrong with the length."""
    try:
        spec = get_task(form.task)
        frames = resolve_frames(form, spec)
    except WanLocalError as exc:
        return f"⚠ {exc}"
    return f"{frames} frames = {frames_to_seconds(spec, frames):.2f} s at {spec.fps} fps"


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two files hold the same bytes (False when either is missing)."""
    try:
        pa, pb = Path(a), Path(b)
        return pa.stat().st_size == pb.stat().st_size and pa.read_bytes() == pb.read_bytes()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- handlers


class GenerateHandlers:
    """The Generate tab's logic over an AppContext."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    # ---- form state

    def model_dir_for(self, task: str) -> str:
        """The task's model folder from the settings ("" when unset)."""
        return self.ctx.settings.current.model_dir(get_task(task).name) or ""

    def defaults(self, task: str, keep: FormValues | None = None) -> FormValues:
        """The form after choosing `task` (its defaults and its model folder from the settings)."""
        spec = get_task(task)
        return task_defaults(spec, self.model_dir_for(spec.name), keep)

    def current_model_dir(self, task: str, shown: str | None) -> str:
        """The folder to show after the settings may have changed (Models / Settings tab, another browser tab):
        the settings' folder, unless the one shown is complete (the user may have typed it for this job)."""
        if shown and folder_status(task, shown).complete:
            return shown
        return self.model_dir_for(task) or (shown or "")

    def model_status(self, task: str, folder: str) -> str:
        """The model folder line under the form."""
        status = folder_status(task, folder)
        return f"✓ {status.message}" if status.complete else f"✗ {status.message} (see the Models tab)"

    def preset_info(self, choice: str) -> str:
        """What "auto" picked and why, or the chosen preset's description."""
        pick = self.ctx.pick
        if choice in (AUTO, "", None):
            prefix = "⚠ " if pick.warning else ""
            return f"{prefix}**auto → {pick.preset.label}.** {pick.reason}"
        preset = self.ctx.presets.get(choice)
        if preset is None:
            return f"✗ unknown preset {choice!r}"
        return f"**{preset.label}** ({preset.range_text()}): {preset.description}"

    def requested_preset(self, choice: str) -> Preset:
        """The preset the form asks for: the automatic pick for AUTO, else the named one."""
        if choice in (AUTO, "", None):
            return self.ctx.pick.preset
        if choice not in self.ctx.presets:
            raise InputError(f"preset {choice!r} is not one of {', '.join(self.ctx.presets)}")
        return self.ctx.presets[choice]

    # ---- settings and prediction

    def job_settings(self, form: FormValues) -> JobSettings:
        """The job the form describes; InputError naming the first bad value. The model folder and the memory
        preset are checked by `add`, not here."""
        spec = get_task(form.task)
        size = resolve_size(form, spec)
        frames = resolve_frames(form, spec)
        steps = resolve_steps(form)
        low = _number(form.guide_low, "guidance")
        high = _number(form.guide_high, "guidance (high-noise)") if spec.two_experts else low
        shift = _number(form.shift, "shift")
        if shift <= 0:
            raise InputError(f"shift {shift:g} must be more than 0")
        if form.solver not in SOLVERS:
            raise InputError(f"solver {form.solver!r} is not one of {', '.join(SOLVERS)}")
        if not form.prompt or not form.prompt.strip():
            raise InputError("the prompt is empty; describe the video you want")
        image = form.image or None
        if spec.needs_image and not image:
            raise InputError(f"{spec.name} needs an input image; upload one")
        if image and not spec.accepts_image:
            image = None  # the field is hidden for text-to-video; a stale upload must not break the job
        device = self.ctx.settings.current.device
        return JobSettings(
            task=spec.name,
            ckpt_dir=str(Path(form.model_dir).expanduser()) if form.model_dir else "",
            prompt=form.prompt.strip(),
            negative_prompt=(form.negative_prompt or "").strip(),
            image=str(image) if image else None,
            size=size,
            frames=frames,
            steps=steps,
            shift=shift,
            guide_scale=(low, high),
            solver=form.solver,
            seed=parse_seed(form.seed),
            device=None if device == "auto" else device,
            output=self._output_path(spec, size, form.prompt),
        )

    def _output_path(self, spec: TaskSpec, size: tuple[int, int], prompt: str) -> str | None:
        """None (the worker names the file in <home>/outputs) unless the Settings tab chose another folder."""
        folder = self.ctx.output_dir()
        if folder.absolute() == self.ctx.store.outputs_dir.absolute():
            return None
        words = "".join(c if c.isalnum() or c in "-_" else "_" for c in prompt.strip())[:40].strip("_") or "video"
        stamp = time.strftime("%Y%m%d_%H%M%S")
        name = f"{stamp}_{spec.name}_{size[0]}x{size[1]}_{words}_{uuid.uuid4().hex[:6]}.mp4"
        return str((folder / name).absolute())

    def prediction(self, form: FormValues) -> Prediction:
        """Estimate and admission for the form's job on this machine now. Raises InputError for a bad form."""
        spec = get_task(form.task)
        size = resolve_size(form, spec)
        frames = resolve_frames(form, spec)
        steps = resolve_steps(form)
        return predict(
            task=spec.name,
            size=size,
            frames=frames,
            steps=steps,
            requested=self.requested_preset(form.preset),
            presets=self.ctx.presets,
            machine=self.ctx.machine_now(),
            estimator=self.ctx.estimator,
            dit_config=load_dit_config(form.model_dir, spec.name),
            components=load_components(form.model_dir, spec.name),
        )

    def prediction_text(self, form: FormValues) -> str:
        """The prediction panel (or what is wrong with the form)."""
        try:
            pred = self.prediction(form)
            spec = get_task(form.task)
            (w, h), frames = resolve_size(form, spec), resolve_frames(form, spec)
            return pred.markdown(f"{w}×{h}, {frames} frames, {resolve_steps(form)} steps")
        except WanLocalError as exc:
            return f"✗ {exc}"

    # ---- queue

    def _checked(self, form: FormValues) -> tuple[JobSettings, Prediction]:
        settings = self.job_settings(form)
        status = folder_status(settings.task, settings.ckpt_dir or None)
        if not status.complete:
            raise InputError(f"{status.message} (see the Models tab)")
        pred = self.prediction(form)
        if not pred.admitted:
            raise InputError(pred.message)
        return dataclasses.replace(settings, preset=pred.preset.name), pred

    def add(self, form: FormValues) -> str:
        """Validate, admit and queue the form's job; return the message shown under the button."""
        try:
            settings, pred = self._checked(form)
            job = self.ctx.store.add(settings)
        except WanLocalError as exc:
            return f"✗ Not queued: {exc}"
        note = f" {pred.message}" if pred.degraded else ""
        log.info("queued job %d (%s, seed %d)", job.id, settings.task, job.resolved_seed)
        return (
            f"✓ Queued job #{job.id} (seed {job.resolved_seed}, preset '{pred.preset.label}'); "
            f"{len(self.ctx.store.list(('queued',)))} job(s) waiting.{note}"
        )

    def update(self, job_id: int | None, form: FormValues) -> str:
        """Replace the settings of queued job `job_id` with the form's; return the message."""
        if job_id is None:
            return "✗ No job is being edited; use 'Add to queue'."
        try:
            settings, pred = self._checked(form)
            current = self.ctx.store.get(int(job_id))
            changes = {
                f.name: getattr(settings, f.name)
                for f in dataclasses.fields(JobSettings)
                if f.name not in ("image_source", "output")
            }
            if settings.seed == current.settings.seed:
                changes.pop("seed")  # keep the seed already drawn for a random-seed job
            if changes.get("image") and current.settings.image and _same_file(changes["image"], current.settings.image):
                changes.pop("image")  # the same picture came back from the browser: keep its recorded source
            job = self.ctx.store.edit(int(job_id), **changes)
        except WanLocalError as exc:
            return f"✗ Not updated: {exc}"
        return f"✓ Updated job #{job.id} (seed {job.resolved_seed}, preset '{pred.preset.label}')."


# ------------------------------------------------------------------------------------------------- layout


@dataclass
class GenerateTab:
    """Handles other tabs need: `inputs` (in FormValues order), the edited job's id, the status line."""

    inputs: list[Any]
    editing: Any
    status: Any
    edit_banner: Any
    prediction: Any
    handlers: GenerateHandlers

    def fill(self, form: FormValues, editing: int | None, message: str) -> list[Any]:
        """Outputs for `fill_outputs`: the form's values (with the task's choices), the edit state, banner, status."""
        return [*form_updates(form), editing, edit_banner(editing), message]

    @property
    def fill_outputs(self) -> list[Any]:
        """The components `fill` returns values for, in order."""
        return [*self.inputs, self.editing, self.edit_banner, self.status]


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
    editing = gr.State(None)

    inputs = [
        task, prompt, negative, image, size, custom_size, length_unit, length, steps, seed, guide_low, guide_high,
        shift, solver, preset, model_dir,
    ]  # fmt: skip
    assert len(inputs) == len(FormValues.names())
    tab = GenerateTab(inputs, editing, status, edit_md, prediction_md, handlers)

    def on_task(*values: Any) -> list[Any]:
        current = FormValues(*values)
        new = handlers.defaults(current.task, keep=current)
        return [*form_updates(new), handlers.model_status(new.task, new.model_dir)]

    task.input(on_task, inputs, [*inputs, model_md])
    size.change(lambda choice: gr.update(visible=choice == CUSTOM), size, custom_size)
    length_triggers = [task.change, length_unit.change, length.change]
    gr.on(length_triggers, lambda *v: length_info(FormValues(*v)), inputs, length_md)
    preset.change(handlers.preset_info, preset, preset_md)
    model_dir.change(handlers.model_status, [task, model_dir], model_md)
    predict_triggers = [
        task.change, size.change, custom_size.change, length_unit.change, length.change, steps.change, preset.change,
        model_dir.change,
    ]  # fmt: skip
    gr.on(
        predict_triggers, lambda *v: handlers.prediction_text(FormValues(*v)), inputs, prediction_md,
        trigger_mode="always_last",
    )  # fmt: skip

    def on_unit(unit: str, *values: Any) -> Any:
        # Converting the number keeps the length the same when the unit flips.
        current = FormValues(*values)
        spec_now = get_task(current.task)
        try:
            old = dataclasses.replace(current, length_unit=FRAMES if unit == SECONDS else SECONDS)
            frames = resolve_frames(old, spec_now)
        except WanLocalError:
            return gr.update()
        return round(frames_to_seconds(spec_now, frames), 2) if unit == SECONDS else frames

    length_unit.input(on_unit, [length_unit, *inputs], length)

    def on_add(*values: Any) -> str:
        return handlers.add(FormValues(*values))

    add_btn.click(on_add, inputs, status)

    def on_update(job_id: int | None, *values: Any) -> list[Any]:
        message = handlers.update(job_id, FormValues(*values))
        done = message.startswith("✓")
        keep = None if done else job_id
        return [None if done else job_id, edit_banner(keep), *_edit_buttons(keep), message]

    update_btn.click(on_update, [editing, *inputs], [editing, edit_md, add_btn, update_btn, cancel_edit_btn, status])

    def stop_editing() -> list[Any]:
        return [None, edit_banner(None), *_edit_buttons(None), "Stopped editing; the job is unchanged."]

    cancel_edit_btn.click(stop_editing, None, [editing, edit_md, add_btn, update_btn, cancel_edit_btn, status])
    editing.change(lambda e: _edit_buttons(e), editing, [add_btn, update_btn, cancel_edit_btn])
    if page is not None:  # coming back from the Models or Settings tab: pick up a newly chosen model folder
        page.select(handlers.current_model_dir, [task, model_dir], model_dir)
    return tab


def _edit_buttons(editing: int | None) -> list[Any]:
    import gradio as gr

    on = editing is not None
    return [gr.update(visible=not on), gr.update(visible=on), gr.update(visible=on)]
