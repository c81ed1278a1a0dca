"""What a job is: its settings (stored as JSON), its progress and a snapshot of its queue row."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_local.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSettings:
    """Everything needed to run a job, stored as JSON. `None` fields take the task's default at run time.

    size is (width, height); guide_scale is (low-noise, high-noise). seed -1 asks for a random seed, which the
    store draws once on `add` (Job.resolved_seed) so a re-run after a crash gives the same video. image is the
    store's own copy (image_source is where it came from). device None = cuda when available; dtype "bf16" or
    "fp32" (None = bf16 on cuda, fp32 on cpu). preset names a memory preset resolved at run time; memory holds
    explicit MemoryOptions overrides (field -> value). output None = <home>/outputs/<generated name>.mp4.
    """

    task: str
    ckpt_dir: str
    prompt: str
    negative_prompt: str = ""
    image: str | None = None
    image_source: str | None = None
    size: tuple[int, int] | None = None
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: tuple[float, float] | None = None
    solver: str = "unipc"
    seed: int = -1
    device: str | None = None
    dtype: str | None = None
    preset: str | None = None
    memory: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["size"] = list(self.size) if self.size else None
        data["guide_scale"] = list(self.guide_scale) if self.guide_scale else None
        data["memory"] = dict(self.memory)
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
        return cls(**values)

    def generation(self, seed: int):
        """The GenerationSettings of this job with `seed` (the job's resolved seed when it runs)."""
        from wan_local.pipeline import GenerationSettings

        return GenerationSettings(
            task=self.task,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            image=self.image,
            size=self.size,
            frames=self.frames,
            steps=self.steps,
            shift=self.shift,
            guide_scale=self.guide_scale,
            solver=self.solver,
            seed=seed,
        )

    def check(self) -> None:
        """Validate like `wan-local generate` would; raise InputError naming the first bad setting.

        Imports the pipeline module (and torch) on first use; the image is decoded to catch broken files.
        """
        from wan_local.memory.options import MemoryOptions
        from wan_local.video import load_image

        self.generation(max(self.seed, 0)).resolve()
        if not Path(self.ckpt_dir).is_dir():
            raise InputError(f"checkpoint folder {self.ckpt_dir} does not exist")
        if self.device not in (None, "cuda", "cpu"):
            raise InputError(f"device {self.device!r} is not one of cuda, cpu")
        if self.dtype not in (None, "bf16", "fp32"):
            raise InputError(f"dtype {self.dtype!r} is not one of bf16, fp32")
        if self.output is not None and Path(self.output).suffix.lower() != ".mp4":
            raise InputError(f"output {self.output} must end in .mp4")
        unknown = set(self.memory) - set(MemoryOptions.field_names())
        if unknown:
            allowed = ", ".join(MemoryOptions.field_names())
            raise InputError(f"unknown memory option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
        MemoryOptions(**self.memory)
        if self.preset not in (None, "", "auto"):
            from wan_local.presets import load_presets

            presets = load_presets()
            if self.preset not in presets:
                raise InputError(f"unknown preset {self.preset!r}; choose auto or one of {', '.join(presets)}")
        if self.image:
            load_image(Path(self.image))


@dataclass(frozen=True)
class JobProgress:
    """Last reported progress: denoise `step` of `total` (1-based, 0 = not started), the current stage, the
    estimated seconds left; updated_at is the worker's last report (a progress event or a heartbeat)."""

    step: int = 0
    total: int = 0
    stage: str | None = None
    eta_seconds: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class Job:
    """A snapshot of one row of the queue. Times are Unix seconds; position orders the queue (lower first)."""

    id: int
    state: str
    position: int
    settings: JobSettings
    resolved_seed: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    note: str | None
    output_path: str | None
    progress: JobProgress
    preview_path: str | None
    attempts: int
    oom_retries: int
    cancel_requested: bool
    worker_id: str | None
    worker_pid: int | None
    heartbeat_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field, settings and progress nested."""
        data = dataclasses.asdict(self)
        data["settings"] = self.settings.to_dict()
        return data
