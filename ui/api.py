"""The scripting API: named Gradio endpoints for `gradio_client` and plain HTTP, listed by `view_api()`.

- `/add_job` (the job's settings, below) -> `{"job_id", "seed", "preset", "message", "estimate"}`; a job that does
  not fit this machine raises an error carrying the admission's message, and nothing is queued.
- `/estimate` (the same settings) -> `{"admitted", "preset", "message", "estimate"}`; nothing is queued.
- `/job_status` (job_id) -> `{"job_id", "state", "stage", "step", "steps", "seconds_left", "error", "video", ...}`.
- `/job_result` (job_id) -> the finished MP4 (gradio_client downloads it and returns its local path).
- `/list_jobs` (state: "" for all, or e.g. "queued,running") -> job statuses in queue order.
- `/cancel_job`, `/retry_job` (job_id) -> the job's status afterwards.

The settings are named as the CLI's `generate` options: task, prompt, negative_prompt, size ("W*H"), frames,
steps, seed, guidance (one value or "LOW,HIGH"), shift, solver, image (an uploaded file: `handle_file(path)`),
preset ("auto" or a preset name), model_dir, device, dtype, force, and memory (the CLI's memory flags as an
object, e.g. {"quant": "int8", "vram_budget_gb": 12}; unset ones come from the preset). Unset settings take the
task's official defaults; model_dir and device default to the Settings tab's. Every job goes the one way all entry
points go (`wan_local.jobs.submit`: resolve, admit on this machine now, queue), and the worker runs it as any other.
A job's video is served only from the output folder the served-files policy (`ui.served`) serves.

`ScriptingApi` holds the logic (plain values in, plain values out, WanLocalError for what the caller must fix);
`register_api` turns its methods into Gradio endpoints inside the app's Blocks. Gradio is imported only there.
"""

# No `from __future__ import annotations`: gr.api reads the endpoint functions' return annotations as objects
# (a string would make every result untyped in view_api()).
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.served import real_path, uploaded_source
from wan_local.errors import InputError, WanLocalError
from wan_local.jobs.records import STATES, Job
from wan_local.jobs.submit import judge_job, queue_job

log = logging.getLogger(__name__)

#: The named endpoints, in the order view_api() lists them.
API_NAMES = ("add_job", "job_status", "job_result", "list_jobs", "cancel_job", "retry_job", "estimate")
DEVICES = ("auto", "cuda", "cpu")


def _whole(name: str, value: Any) -> int | None:
    """`value` as an int (None for None or ""); InputError for anything that is not a whole number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InputError(f"{name} {value!r} is not a whole number")


def _number(name: str, value: Any) -> float | None:
    """`value` as a float (None for None or ""); InputError for anything that is not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise InputError(f"{name} {value!r} is not a number")


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} {value!r} is not text")
    return value.strip()


#: Memory options that are numbers (GiB); the others are names (wan_local.memory.options).
NUMERIC_MEMORY = ("vram_budget_gb", "vram_reserve_gb", "pinned_ram_cap_gb")


def _memory(value: Any) -> dict[str, Any]:
    """The explicit memory options (the CLI's --quant, --offload, ... flags) as field -> value; None values are
    unset. Unknown names and bad values are refused by JobSettings / MemoryOptions with the allowed ones."""
    if value is None or value == "":
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f'memory {value!r} must be an object of option -> value, e.g. {{"quant": "int8"}}')
    from wan_local.memory.options import MemoryOptions

    known = MemoryOptions.field_names()
    unknown = sorted(str(name) for name in value if name not in known)
    if unknown:
        raise InputError(f"unknown memory option(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    options = {}
    for name, option in value.items():
        if option is None:
            continue
        options[str(name)] = _number(str(name), option) if name in NUMERIC_MEMORY else _text(str(name), option)
    return options


def estimate_dict(estimate: Any) -> dict[str, Any] | None:
    """An estimate's figures as plain numbers, or None when there is none."""
    if estimate is None:
        return None
    return {
        "peak_vram_bytes": int(estimate.peak_vram_bytes),
        "peak_ram_bytes": int(estimate.peak_ram_bytes),
        "seconds": round(float(estimate.seconds), 1),
    }


def job_status(job: Job) -> dict[str, Any]:
    """What a script polls: the job's state, its progress (stage, denoise step of steps, estimated seconds left),
    its error, and its video once done."""
    p = job.progress
    return {
        "job_id": job.id,
        "state": job.state,
        "stage": p.stage,
        "step": p.step,
        "steps": p.total or job.settings.steps,
        "seconds_left": p.eta_seconds,
        "error": job.error,
        "note": job.note,
        "video": job.output_path if job.state == "done" else None,
        "seed": job.resolved_seed,
        "preset": job.settings.preset,
        "task": job.settings.task,
        "prompt": job.settings.prompt,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


class ScriptingApi:
    """The endpoints' logic over an AppContext (no Gradio here)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    # ---- settings

    def job_settings(
        self,
        task: str,
        prompt: str = "",
        negative_prompt: str = "",
        size: str = "",
        frames: Any = None,
        steps: Any = None,
        seed: Any = -1,
        guidance: Any = None,
        shift: Any = None,
        solver: str = "unipc",
        image: Any = None,
        preset: str = "auto",
        model_dir: str = "",
        device: str = "",
        dtype: str = "",
        force: bool = False,
        memory: Any = None,
    ):
        """The JobSettings the named parameters describe, with the Settings tab's model folder, model files,
        device and output folder where the caller gives none; InputError naming the first bad value."""
        from wan_local.engine.request import JobSettings
        from wan_local.options import parse_guide_scale
        from wan_local.specs import get_task, parse_size

        spec = get_task(_text("task", task))
        current = self.ctx.settings.current
        folder = _text("model_dir", model_dir) or current.model_dir(spec.name) or ""
        if not folder:
            raise InputError(f"no model folder for {spec.name}: choose one in the Models tab (or pass model_dir)")
        folder = str(Path(folder).expanduser())
        device = _text("device", device) or current.device
        if device not in DEVICES:
            raise InputError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        size_text = _text("size", size)
        guide = guidance if isinstance(guidance, str) else _number("guidance", guidance)
        if isinstance(guide, str):
            guide = guide.strip() or None
        image_path, source = self._image(image)
        parsed_size = parse_size(size_text) if size_text else None
        clean_prompt = _text("prompt", prompt)
        seed_value = _whole("seed", seed)
        return JobSettings(
            task=spec.name,
            prompt=clean_prompt,
            negative_prompt=_text("negative_prompt", negative_prompt),
            image=image_path,
            image_source=source,
            size=parsed_size,
            frames=_whole("frames", frames),
            steps=_whole("steps", steps),
            shift=_number("shift", shift),
            guide_scale=parse_guide_scale(str(guide)) if guide is not None else None,
            solver=_text("solver", solver) or "unipc",
            seed=-1 if seed_value is None else seed_value,
            ckpt_dir=folder,
            files=current.model_choice(spec.name, folder),
            device=None if device == "auto" else device,
            dtype=_text("dtype", dtype) or None,
            preset=_text("preset", preset) or "auto",
            memory=_memory(memory),
            output=self.ctx.new_video_path(spec.name, parsed_size or spec.default_size, clean_prompt),
            force=bool(force),
        )

    def _image(self, image: Any) -> tuple[str | None, str | None]:
        """(path, where it came from) of an uploaded input image; InputError for a path that was not uploaded
        (the API reads no other file of this computer)."""
        if image is None or image == "" or image == {}:
            return None, None
        if isinstance(image, Mapping) and isinstance(image.get("path"), str):
            path, name = image["path"], image.get("orig_name")
        elif isinstance(image, str):
            path, name = image, None
        else:
            raise InputError(f"image {image!r} is not a file; pass handle_file(path) (gradio_client)")
        source = uploaded_source(path, name if isinstance(name, str) else None)
        if source is None or self.ctx.served.private.holds(real_path(path)):
            raise InputError(
                "image must be a file uploaded to the app: handle_file(path) with gradio_client, or the path "
                "POST /gradio_api/upload returned"
            )
        return str(real_path(path)), source

    # ---- endpoints

    def add_job(self, **params: Any) -> dict[str, Any]:
        """Admit and queue a job; its id, seed, preset, the admission message and the estimate."""
        settings = self.job_settings(**params)
        if not settings.prompt:
            raise InputError("the prompt is empty; describe the video you want")
        job, admission = queue_job(self.ctx.store, settings, machine=self.ctx.machine_now(), presets=self.ctx.presets)
        log.info("queued job %d through the API (%s, seed %d)", job.id, settings.task, job.resolved_seed)
        return {
            "job_id": job.id,
            "seed": job.resolved_seed,
            "preset": admission.preset.name,
            "message": admission.message,
            "estimate": estimate_dict(admission.estimate),
        }

    def estimate(self, **params: Any) -> dict[str, Any]:
        """The verdict and estimate a job would get now; nothing is queued."""
        settings = self.job_settings(**params)
        admission = judge_job(settings, machine=self.ctx.machine_now(), presets=self.ctx.presets, need_image=False)
        return {
            "admitted": admission.admitted,
            "preset": admission.preset.name if admission.preset else None,
            "message": admission.message,
            "estimate": estimate_dict(admission.estimate),
        }

    def job_status(self, job_id: Any) -> dict[str, Any]:
        return job_status(self.ctx.store.get(self._id(job_id)))

    def list_jobs(self, state: str = "") -> list[dict[str, Any]]:
        wanted = tuple(s.strip() for s in _text("state", state).split(",") if s.strip())
        unknown = [s for s in wanted if s not in STATES]
        if unknown:
            raise InputError(f"state {unknown[0]!r} is not one of {', '.join(STATES)}")
        return [job_status(job) for job in self.ctx.store.list(wanted or None)]

    def cancel_job(self, job_id: Any) -> dict[str, Any]:
        return job_status(self.ctx.store.request_cancel(self._id(job_id)))

    def retry_job(self, job_id: Any) -> dict[str, Any]:
        return job_status(self.ctx.store.retry(self._id(job_id)))

    def job_result(self, job_id: Any) -> dict[str, Any]:
        """The finished video as a Gradio file (gradio_client downloads it); InputError until it is done, and for
        a video outside the folders the app serves."""
        job = self.ctx.store.get(self._id(job_id))
        if job.state != "done":
            p = job.progress
            what = f"{job.state}" + (f" ({p.stage}, step {p.step}/{p.total})" if job.state == "running" else "")
            raise InputError(f"job {job.id} is {what}, not done: poll /job_status until its state is done")
        path = Path(job.output_path or "")
        if not job.output_path or not path.is_file():
            raise InputError(f"the video of job {job.id} is no longer on disk ({job.output_path})")
        if not self.ctx.served.serves(path):
            raise InputError(
                f"the video of job {job.id} is outside the output folder the app serves now ({path}); "
                "set that folder in the Settings tab to fetch it"
            )
        real = real_path(path)
        return {
            "path": str(real),
            "orig_name": real.name,
            "size": real.stat().st_size,
            "mime_type": "video/mp4",
            "meta": {"_type": "gradio.FileData"},
        }

    @staticmethod
    def _id(job_id: Any) -> int:
        value = _whole("job_id", job_id)
        if value is None:
            raise InputError("job_id is missing")
        return value


def register_api(ctx: AppContext) -> ScriptingApi:
    """Add the named endpoints (API_NAMES) to the gr.Blocks being built; errors reach the caller as gr.Error
    with the one-line message (gradio_client raises it as AppError)."""
    import gradio as gr

    api = ScriptingApi(ctx)

    def call(method, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except WanLocalError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def add_job(
        task: str,
        prompt: str,
        negative_prompt: str = "",
        size: str = "",
        frames: int | None = None,
        steps: int | None = None,
        seed: int = -1,
        guidance: str | float | None = None,
        shift: float | None = None,
        solver: str = "unipc",
        image: dict | None = None,
        preset: str = "auto",
        model_dir: str = "",
        device: str = "",
        dtype: str = "",
        force: bool = False,
        memory: dict | None = None,
    ) -> dict:
        """Queue a video. Unset settings take the task's official defaults; model_dir and device the Settings
        tab's. Returns {"job_id", "seed", "preset", "message", "estimate"}; a job that does not fit this machine
        is refused with the reason and nothing is queued."""
        return call(api.add_job, **_named(locals()))

    def estimate(
        task: str,
        prompt: str = "",
        negative_prompt: str = "",
        size: str = "",
        frames: int | None = None,
        steps: int | None = None,
        seed: int = -1,
        guidance: str | float | None = None,
        shift: float | None = None,
        solver: str = "unipc",
        image: dict | None = None,
        preset: str = "auto",
        model_dir: str = "",
        device: str = "",
        dtype: str = "",
        force: bool = False,
        memory: dict | None = None,
    ) -> dict:
        """The verdict (admitted, preset, message) and the estimate (peak VRAM / RAM bytes, seconds) a job with
        these settings would get now; nothing is queued."""
        return call(api.estimate, **_named(locals()))

    def job_status_(job_id: int) -> dict:
        """state (queued, running, done, failed, cancelled), stage, step, steps, seconds_left, error, video, ..."""
        return call(api.job_status, job_id)

    def job_result(job_id: int) -> dict:
        """The finished MP4 of a done job (gradio_client downloads it and returns the local path)."""
        return call(api.job_result, job_id)

    def list_jobs(state: str = "") -> list:
        """Every job (or those in the comma-separated states) in queue order, as /job_status describes them."""
        return call(api.list_jobs, state)

    def cancel_job(job_id: int) -> dict:
        """Cancel a queued job now, or a running one within a step; returns its status."""
        return call(api.cancel_job, job_id)

    def retry_job(job_id: int) -> dict:
        """Queue a failed or cancelled job again (same settings and seed); returns its status."""
        return call(api.retry_job, job_id)

    endpoints = {
        "add_job": add_job,
        "job_status": job_status_,
        "job_result": job_result,
        "list_jobs": list_jobs,
        "cancel_job": cancel_job,
        "retry_job": retry_job,
        "estimate": estimate,
    }
    for name in API_NAMES:
        gr.api(endpoints[name], api_name=name)
    return api


def _named(values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of an endpoint function (its locals at entry, less the helpers it closes over)."""
    return {k: v for k, v in values.items() if k not in ("api", "call")}
