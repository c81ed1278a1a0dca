"""Run an admitted job: the one runner behind `wan-local generate` and the worker (which the UI and API feed).

`Pipelines` holds the loaded pipelines of this process (at most `keep`, least recently used dropped first) so
that a worker running several jobs of one model reads it once. `run_job` logs the plan on every device, then
generates with exactly the files, options, plan and kernels the job was resolved and admitted with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wan_local.engine.admit import JobAdmission
from wan_local.engine.resolve import ResolvedJob

if TYPE_CHECKING:
    import torch

    from wan_local.memory.options import MemoryOptions
    from wan_local.pipeline import GenerationResult, WanPipeline
    from wan_local.sampling.denoise import CancelToken, StepEvent

log = logging.getLogger(__name__)


class Pipelines:
    """The pipelines this process keeps loaded, keyed by (checkpoint folder, task, device, dtype, memory)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._pipelines: dict[tuple, WanPipeline] = {}

    def get(self, job: ResolvedJob, memory: MemoryOptions) -> WanPipeline:
        import torch

        from wan_local.pipeline import WanPipeline

        files = repr(job.checkpoint.files) if job.checkpoint is not None else ""  # another pick: another pipeline
        key = (str(Path(job.job.ckpt_dir).resolve()), files, job.spec.name, job.device, job.dtype, memory)
        pipeline = self._pipelines.pop(key, None)
        if pipeline is None:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[job.dtype]
            files = job.checkpoint.files if job.checkpoint is not None else None
            pipeline = WanPipeline(job.job.ckpt_dir, job.spec, job.device, dtype, memory, files=files)
        self._pipelines[key] = pipeline  # most recently used last
        while len(self._pipelines) > self.keep:
            self._pipelines.pop(next(iter(self._pipelines))).close()
        return pipeline

    @property
    def loaded(self) -> bool:
        return bool(self._pipelines)

    def close(self) -> None:
        """Release every model held by the kept pipelines."""
        for pipeline in self._pipelines.values():
            pipeline.close()
        self._pipelines.clear()


def plan_lines(admission: JobAdmission) -> list[str]:
    """The plan as the log shows it before denoising: one line per aspect, white space folded."""
    if admission.estimate is None:
        return ["no plan (the estimate failed; running with the preset's options as they are)"]
    return [" ".join(line.split()) for line in admission.estimate.plan.describe()]


def run_job(
    job: ResolvedJob,
    admission: JobAdmission,
    pipelines: Pipelines,
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
    resume: tuple[torch.Tensor, dict] | None = None,
) -> GenerationResult:
    """Generate `job`'s video with its admitted preset and plan; raises JobRefused when it was not admitted."""
    admission.raise_if_refused()
    preset = admission.preset
    log.info("memory preset %s: %s", preset.name if preset else "-", admission.memory)
    log.info("plan: %s", "; ".join(plan_lines(admission)))
    kernels = job.kernels(admission.memory)
    pipeline = pipelines.get(job, admission.memory)
    plan = admission.estimate.plan if admission.estimate is not None else None
    return pipeline.generate(
        job.settings, on_step=on_step, on_stage=on_stage, cancel=cancel, resume=resume, plan=plan, kernels=kernels
    )
