"""Queue a job the one way every entry point does: resolve it, admit it on the machine as it is now, and add it to
the store only when admitted, with the preset it was admitted with (`wan-local queue add`, the scripting API).
A refused job raises `JobRefused` carrying the admission's message and nothing is queued.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wan_local.engine.admit import JobAdmission
    from wan_local.engine.request import JobSettings
    from wan_local.jobs.store import Job, JobStore
    from wan_local.machine import MachineInfo
    from wan_local.presets import Preset


def judge_job(
    settings: JobSettings,
    *,
    machine: MachineInfo | None = None,
    presets: Mapping[str, Preset] | None = None,
    need_image: bool = True,
    refused: str = "Not queued",
) -> JobAdmission:
    """The engine's verdict on `settings` (resolve_job, then admit_job) for `machine` (default: measured now);
    InputError / CheckpointError for bad settings or model files. need_image False: an estimate of an image task
    without its image."""
    from wan_local.engine.admit import admit_job
    from wan_local.engine.resolve import resolve_job

    resolved = resolve_job(settings, machine=machine, presets=presets, need_image=need_image)
    return admit_job(resolved, force=settings.force, refused=refused)


def queue_job(
    store: JobStore,
    settings: JobSettings,
    *,
    machine: MachineInfo | None = None,
    presets: Mapping[str, Preset] | None = None,
) -> tuple[Job, JobAdmission]:
    """Admit `settings` (see `judge_job`) and queue it with the preset it was admitted with; return the job and
    the admission. JobRefused (nothing queued) when it does not fit and `settings.force` is not set."""
    admission = judge_job(settings, machine=machine, presets=presets)
    admission.raise_if_refused()
    job = store.add(dataclasses.replace(settings, preset=admission.preset.name))
    return job, admission
