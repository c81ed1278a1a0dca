"""The Generate form as plain values (`FormValues`) and its conversions: a task's defaults, the form that
reproduces a job or a video, and the form's text and numbers as a size, a frame count, steps and a seed.

Nothing here imports Gradio or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_local.errors import InputError, WanLocalError
from wan_local.specs import TaskSpec, check_frames, check_size, get_task, parse_size

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


def parse_number(value: Any, name: str) -> float:
    """`value` as a float; InputError naming `name` when it is not a number or is empty."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r} is not a number") from None
    if math.isnan(number):
        raise InputError(f"{name} is empty; type a number")
    return number


def _whole(value: Any, name: str) -> int:
    number = parse_number(value, name)
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
        seconds = parse_number(form.length, "length (seconds)")
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
