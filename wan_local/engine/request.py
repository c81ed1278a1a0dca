"""What a user asks for: one video (`GenerationSettings`) and one job (`JobSettings`: the video plus where its
checkpoint is, which device, dtype and memory preset, where the MP4 goes).

Plain data, shared by the CLI, the queue, the worker, the UI and the pipeline; this module imports no torch.
Every value a user can type is checked here, at the edge, for all of them alike: finite shift and guidance, a
seed that fits a signed 64-bit integer (SQLite's INTEGER), steps and frames within sane bounds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wan_local.errors import InputError
from wan_local.specs import check_frames, check_size, get_task

log = logging.getLogger(__name__)

SOLVERS = ("unipc", "dpm++", "euler")
DEVICES = ("cuda", "cpu")
DTYPES = ("bf16", "fp32")
#: Largest seed: SQLite stores integers as signed 64-bit, and torch.Generator.manual_seed takes them.
MAX_SEED = 2**63 - 1
#: More steps than this only burn hours: the official defaults are 40-50.
MAX_STEPS = 1000


def _finite(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


def check_seed(seed: int) -> int:
    """`seed` as an int when it is -1 (random) or in [0, 2^63 - 1]; InputError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed {seed!r} is not a whole number")
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed {seed} is out of range: use -1 (random) or 0 to {MAX_SEED}")
    return seed


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines a video. `None` fields take the task's official default on `resolve`, and so does
    an empty negative prompt (the official code's rule), so a resolved job records the negative prompt it runs with.

    size is (width, height); for image tasks it only gives the area (the image gives the aspect).
    guide_scale is (low-noise expert, high-noise expert). seed -1 means "pick one" (the resolved seed is kept).
    """

    task: str
    prompt: str
    negative_prompt: str = ""
    image: str | None = None
    size: tuple[int, int] | None = None
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: tuple[float, float] | None = None
    solver: str = "unipc"
    seed: int = -1

    def resolve(self, *, need_image: bool = True) -> GenerationSettings:
        """Fill defaults, pick a seed, validate; raise InputError naming the first bad setting. need_image False
        lets an estimate of an image task go without its image."""
        spec = get_task(self.task)
        size = tuple(self.size) if self.size is not None else spec.default_size
        frames = self.frames if self.frames is not None else spec.frames
        check_size(spec, *size)
        check_frames(spec, frames)
        if spec.needs_image and not self.image and need_image:
            raise InputError(f"{spec.name} needs an input image (--image)")
        if self.image and not spec.accepts_image:
            raise InputError(f"{spec.name} takes no image; use i2v-A14B or ti2v-5B for image-to-video")
        if self.solver not in SOLVERS:
            raise InputError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        steps = self.steps if self.steps is not None else spec.steps
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")
        shift = _finite("shift", self.shift if self.shift is not None else spec.shift)
        if shift <= 0:
            raise InputError(f"shift must be > 0, got {shift}")
        guide = tuple(_finite("guidance scale", g) for g in (self.guide_scale or spec.guide_scale))
        if len(guide) != 2:
            raise InputError(f"guidance scale takes (low-noise, high-noise), got {len(guide)} values")
        seed = check_seed(self.seed)
        seed = seed if seed >= 0 else random.randint(0, MAX_SEED)
        return dataclasses.replace(
            self,
            task=spec.name,
            negative_prompt=self.negative_prompt or spec.negative_prompt,
            size=(int(size[0]), int(size[1])),
            frames=int(frames),
            steps=int(steps),
            shift=shift,
            guide_scale=guide,
            seed=int(seed),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["size"] = f"{self.size[0]}*{self.size[1]}" if self.size else None
        data["guide_scale"] = list(self.guide_scale) if self.guide_scale else None
        return data


@dataclass(frozen=True)
class JobSettings(GenerationSettings):
    """A video's settings plus everything needed to run it as a job, stored as JSON. `None` fields take the task's
    default at run time.

    seed -1 asks for a random seed, which the store draws once on `add` (Job.resolved_seed) so a re-run after a
    crash gives the same video. ckpt_dir: the checkpoint folder ("" for an estimate without one); files: role ->
    file where the folder holds several candidates (find_checkpoints' choice: the Models tab's pick, --file).
    image is the store's own copy (image_source is where it came from). device None = cuda when available; dtype
    "bf16" or "fp32" (None = bf16). preset names a memory preset resolved at run time; memory holds explicit
    MemoryOptions overrides (field -> value). output None = <home>/outputs/<generated name>.mp4. force: run even
    when admission refuses the job (an expert's override of the memory check).
    """

    ckpt_dir: str = ""
    files: Mapping[str, str] = field(default_factory=dict)
    image_source: str | None = None
    device: str | None = None
    dtype: str | None = None
    preset: str | None = None
    memory: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["size"] = list(self.size) if self.size else None
        data["guide_scale"] = list(self.guide_scale) if self.guide_scale else None
        data["memory"] = dict(self.memory)
        data["files"] = dict(self.files)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSettings:
        """Inverse of `to_dict`; keys this version does not know are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            log.warning("ignoring unknown job settings %s", ", ".join(sorted(unknown)))
        values = {k: v for k, v in data.items() if k in known}
        for key in ("size", "guide_scale"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        values["memory"] = dict(values.get("memory") or {})
        values["files"] = dict(values.get("files") or {})
        return cls(**values)

    def generation(self, seed: int) -> GenerationSettings:
        """The GenerationSettings of this job with `seed` (the job's resolved seed when it runs)."""
        names = (f.name for f in dataclasses.fields(GenerationSettings))
        return GenerationSettings(**{**{name: getattr(self, name) for name in names}, "seed": seed})

    def check_fields(self, *, need_image: bool = True) -> None:
        """Validate the job's own fields (not its files); InputError naming the first bad one."""
        from wan_local.memory.options import MemoryOptions

        check_seed(self.seed)
        self.generation(max(self.seed, 0)).resolve(need_image=need_image)
        if self.device not in (None, *DEVICES):
            raise InputError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in (None, *DTYPES):
            raise InputError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.output is not None and not str(self.output).lower().endswith(".mp4"):
            raise InputError(f"output {self.output} must end in .mp4")
        unknown = set(self.memory) - set(MemoryOptions.field_names())
        if unknown:
            allowed = ", ".join(MemoryOptions.field_names())
            raise InputError(f"unknown memory option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        MemoryOptions(**self.memory)

    def check(self) -> None:
        """`check_fields`, then that the checkpoint folder exists, the preset is known and the image decodes."""
        from pathlib import Path

        self.check_fields()
        if not Path(self.ckpt_dir).is_dir():
            raise InputError(f"checkpoint folder {self.ckpt_dir} does not exist")
        if self.preset not in (None, "", "auto"):
            from wan_local.presets import load_presets

            presets = load_presets()
            if self.preset not in presets:
                raise InputError(f"unknown preset {self.preset!r}; choose auto or one of {', '.join(presets)}")
        if self.image:
            from wan_local.video import load_image

            load_image(Path(self.image))
