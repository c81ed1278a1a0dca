"""Admit a resolved job: one verdict, the same for the CLI, the queue, the worker, the UI and the API.

`admit_job` walks the requested preset's fallback chain (presets.admit) with the estimator's predicted peaks and
returns the first preset that fits, or a refusal whose message says what is short, by how much and what to
change. It is a pure function of the ResolvedJob (which holds the machine facts and the checkpoint's byte
counts), so the same job on the same machine always gets the same verdict, and more RAM or VRAM never turns an
admission into a refusal. `force=True` runs a refused job with the requested preset anyway (the message says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from wan_local.engine.resolve import ResolvedJob
from wan_local.errors import InputError, WanLocalError
from wan_local.memory.estimate import JobEstimate, estimate_job
from wan_local.memory.options import MemoryOptions
from wan_local.presets import Admission, Preset, admit

log = logging.getLogger(__name__)


class JobRefused(InputError):
    """A job does not fit this machine; the message is the admission's (what is short, what to change)."""


def estimate_for(job: ResolvedJob, options: MemoryOptions) -> JobEstimate:
    """The plan and predicted peaks / time of `job` run with `options` (pure: no file or device access)."""
    s, info = job.settings, job.checkpoint
    return estimate_job(
        s.task,
        s.size,
        s.frames,
        s.steps,
        options,
        job.machine,
        info.dit_config if info else None,
        components=job.components(),
        dit_tensors=info.dit_tensors if info else None,
        dense_bytes=job.dtype_bytes,
        dit_file_bytes=info.dit_file_bytes if info else None,
        with_image=bool(s.image),
    )


@dataclass(frozen=True)
class JobAdmission:
    """The verdict on a resolved job. `preset` / `memory`: what to run with (None: refused, unless forced);
    `estimate`: the estimate for `preset` (for the leanest preset tried when refused; None when none could be
    made). `forced`: refused, but run anyway on request."""

    verdict: Admission
    estimate: JobEstimate | None
    memory: MemoryOptions | None
    forced: bool = False

    @property
    def admitted(self) -> bool:
        return self.memory is not None

    @property
    def preset(self) -> Preset | None:
        return self.verdict.requested if self.forced else self.verdict.preset

    @property
    def degraded(self) -> bool:
        return self.verdict.degraded

    @property
    def message(self) -> str:
        return self.verdict.message

    def raise_if_refused(self) -> None:
        """JobRefused with the admission's message when the job is refused (and that is logged: a job that was
        submitted is refused here, while a prediction only asks for the verdict and logs nothing)."""
        if not self.admitted:
            log.info("job refused: %s", self.message)
            raise JobRefused(self.message)


def admit_job(job: ResolvedJob, *, force: bool = False, refused: str = "Not started") -> JobAdmission:
    """Admit, degrade or refuse `job` on its machine (see the module doc). `refused` starts a refusal's message
    ("Not started", "Not queued")."""
    estimates: dict[str, JobEstimate] = {}

    def estimate(options: MemoryOptions) -> tuple[int, int]:
        est = estimate_for(job, _with_overrides(job, options))
        estimates["last"] = est
        return est.peak_vram_bytes, est.peak_ram_bytes

    verdict = admit(estimate, job.machine, job.requested, job.presets, refused=refused)
    if verdict.preset is not None:
        memory = job.memory(verdict.preset)
        return JobAdmission(verdict, estimate_for(job, memory), memory)
    if force:
        memory = job.memory(job.requested)
        log.warning("running a refused job because --force was given: %s", verdict.message)
        try:
            forced_estimate = estimate_for(job, memory)
        except WanLocalError:
            forced_estimate = None
        return JobAdmission(verdict, forced_estimate, memory, forced=True)
    return JobAdmission(verdict, estimates.get("last"), None)


def _with_overrides(job: ResolvedJob, options: MemoryOptions) -> MemoryOptions:
    import dataclasses

    return dataclasses.replace(options, **job.overrides)
