"""Generate tab: the form that describes one video, its prediction, and "Add to queue" / "Update job".

`FormValues` (ui.generate_form) is the form as plain values, in the order of the tab's input components;
`GenerateHandlers` (here) holds the logic (tested directly, no Gradio); `build_generate_tab` (ui.generate_layout)
lays out the components and wires them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ui.batch import batch_forms
from ui.context import AppContext
from ui.generate_form import (
    AUTO,
    SOLVERS,
    FormValues,
    parse_number,
    parse_seed,
    resolve_frames,
    resolve_size,
    resolve_steps,
    task_defaults,
)
from ui.job_view import JobPanel, job_panel
from ui.prediction import Prediction, load_components, load_dit_config, predict
from ui.served import uploaded_source
from wan_local.errors import InputError, WanLocalError
from wan_local.jobs.records import JobSettings
from wan_local.models_hub import folder_status
from wan_local.presets import Preset
from wan_local.specs import TaskSpec, get_task

log = logging.getLogger(__name__)


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
        if shown and folder_status(task, shown, self.ctx.settings.current.model_choice(task, shown)).complete:
            return shown
        return self.model_dir_for(task) or (shown or "")

    def model_status(self, task: str, folder: str) -> str:
        """The model folder line under the form."""
        choice = self.ctx.settings.current.model_choice(get_task(task).name, folder) if folder else {}
        status = folder_status(task, folder, choice)
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
        low = parse_number(form.guide_low, "guidance")
        high = parse_number(form.guide_high, "guidance (high-noise)") if spec.two_experts else low
        shift = parse_number(form.shift, "shift")
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
        folder = str(Path(form.model_dir).expanduser()) if form.model_dir else ""
        return JobSettings(
            task=spec.name,
            ckpt_dir=folder,
            files=self.ctx.settings.current.model_choice(spec.name, folder) if folder else {},
            prompt=form.prompt.strip(),
            negative_prompt=(form.negative_prompt or "").strip(),
            image=str(image) if image else None,
            image_source=uploaded_source(image) if image else None,
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
        return self.ctx.new_video_path(spec.name, size, prompt)

    def prediction(self, form: FormValues) -> Prediction:
        """Estimate and admission for the form's job on this machine now. Raises InputError for a bad form."""
        spec = get_task(form.task)
        size = resolve_size(form, spec)
        frames = resolve_frames(form, spec)
        steps = resolve_steps(form)
        device = self.ctx.settings.current.device
        folder = str(Path(form.model_dir).expanduser()) if form.model_dir else ""
        job = JobSettings(
            task=spec.name,
            ckpt_dir=folder,
            files=self.ctx.settings.current.model_choice(spec.name, folder) if folder else {},
            prompt="",
            size=size,
            frames=frames,
            steps=steps,
            seed=0,
            device=None if device == "auto" else device,
        )
        return predict(
            task=spec.name,
            size=size,
            frames=frames,
            steps=steps,
            requested=self.requested_preset(form.preset),
            presets=self.ctx.presets,
            machine=self.ctx.machine_now(),
            estimator=self.ctx.estimator,
            dit_config=load_dit_config(form.model_dir, spec.name, job.files),
            components=load_components(form.model_dir, spec.name, job.files),
            job=job,
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
        status = folder_status(settings.task, settings.ckpt_dir or None, settings.files)
        if not status.complete:
            raise InputError(f"{status.message} (see the Models tab)")
        pred = self.prediction(form)
        if not pred.admitted:
            raise InputError(pred.message)
        return dataclasses.replace(settings, preset=pred.preset.name), pred

    def add(self, form: FormValues) -> str:
        """Validate, admit and queue the form's job; return the message shown under the button."""
        return self.add_batch(form)[0]

    def add_batch(
        self, form: FormValues, variations: object = 1, prompt_list: str | None = None
    ) -> tuple[str, list[int]]:
        """Queue the form's job, or a batch (`ui.batch.batch_forms`: variations s, s+1, … of each prompt of a
        list); each job is validated and admitted on its own, all before the first is queued, so a batch is queued
        whole or not at all. Return the message shown under the button and the ids queued."""
        try:
            checked = [self._checked(f) for f in batch_forms(form, variations, prompt_list)]
            jobs = [self.ctx.store.add(settings) for settings, _ in checked]
        except WanLocalError as exc:
            log.info("job(s) not queued: %s", exc)  # submitted and turned down (a prediction alone logs nothing)
            return f"✗ Not queued: {exc}", []
        pred = checked[0][1]
        note = f" {pred.message}" if pred.degraded else ""
        waiting = len(self.ctx.store.list(("queued",)))
        if len(jobs) == 1:
            job = jobs[0]
            log.info("queued job %d (%s, seed %d)", job.id, job.settings.task, job.resolved_seed)
            head = f"✓ Queued job #{job.id} (seed {job.resolved_seed}"
        else:
            log.info("queued a batch of %d jobs (#%d-#%d)", len(jobs), jobs[0].id, jobs[-1].id)
            first, last = min(j.resolved_seed for j in jobs), max(j.resolved_seed for j in jobs)
            seeds = f"seed {first}" if first == last else f"seeds {first}…{last}"
            head = f"✓ Queued {len(jobs)} jobs #{jobs[0].id}–#{jobs[-1].id} ({seeds}"
        return f"{head}, preset '{pred.preset.label}'); {waiting} job(s) waiting.{note}", [j.id for j in jobs]

    def panel(self, job_ids: list[int] | None) -> JobPanel:
        """The "your job" panel for the jobs this tab queued (read from the store now)."""
        jobs, missing = [], []
        for job_id in job_ids or []:
            try:
                jobs.append(self.ctx.store.get(int(job_id)))
            except WanLocalError:
                missing.append(int(job_id))
        return job_panel(jobs, missing)

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
