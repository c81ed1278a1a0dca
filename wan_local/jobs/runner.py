"""The engine boundary the worker calls: run one job, report progress, return the video's path.

`JobRunner` is the protocol (tests use a fake); `PipelineRunner` runs the real `WanPipeline`, saves the MP4 with
the settings embedded, writes a small latent preview PNG while denoising and turns an out-of-memory error into
`JobOutOfMemory` with a message a user can act on (a file it cannot write, on a full disk, raises OSError naming
the file: `file_error_message` words it). Resume points (`wan_local.jobs.resume`) are saved while denoising and
left for the worker to delete once the job's outcome is committed.

Latent previews (`wan_local.preview`) are written every `preview_every` denoise steps, in colour for the Wan2.1 and
Wan2.2 latent spaces; progress goes through `wan_local.jobs.progress`, which weights the stages so the fraction
and the time left move to 100 % through decode and save.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from wan_local.errors import WanLocalError
from wan_local.jobs.progress import ProgressTracker, Snapshot, expected_stage_seconds
from wan_local.jobs.resume import ResumePoints
from wan_local.jobs.store import Job
from wan_local.preview import write_preview

if TYPE_CHECKING:
    from wan_local.sampling.denoise import CancelToken, StepEvent

log = logging.getLogger(__name__)


class JobOutOfMemory(WanLocalError):
    """The GPU (or host) ran out of memory while running a job."""


def file_error_message(exc: OSError) -> str:
    """What went wrong with a file of a job, in words a user can act on (a full disk says so)."""
    name = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"the disk is full: cannot write {name} ({exc.strerror}); free some space and retry the job"
    return f"cannot use {name}: {exc.strerror or exc}"


@dataclass(frozen=True)
class Progress:
    """What a runner reports: the stage ("encode_text", "denoise", "decode", "save", ...), denoise step
    (1-based, 0 = none yet; total once denoising is over) of total, seconds left of the whole job (None until
    measurable), the newest preview PNG and the fraction of the whole job done (0..1, see jobs.progress)."""

    stage: str
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    preview_path: str | None = None
    fraction: float | None = None


class JobRunner(Protocol):
    """Runs one job to completion and returns the video path; raises Cancelled (see sampling.denoise) when
    `cancel` fires, JobOutOfMemory on OOM, WanLocalError for bad input."""

    def run(self, job: Job, on_progress: Callable[[Progress], None], cancel: CancelToken) -> Path:
        """Run `job`, calling `on_progress` at each stage and denoise step."""
        ...


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM (torch.cuda.OutOfMemoryError or its RuntimeError text) and host allocation failures."""
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def progress_tracker(steps: int, estimate: Any) -> ProgressTracker:
    """The tracker of a job of `steps` denoise steps, weighted by its estimate (None: typical shares)."""
    if estimate is None or not estimate.seconds_by_stage:
        return ProgressTracker(steps)
    by_stage = dict(estimate.seconds_by_stage)
    return ProgressTracker(
        steps, expected_stage_seconds(by_stage, steps), load_seconds=float(by_stage.get("load_models", 0.0))
    )


def reported(snapshot: Snapshot, preview_path: str | None = None) -> Progress:
    """The Progress a runner reports for a tracker's snapshot."""
    return Progress(
        snapshot.stage, snapshot.step, snapshot.total, snapshot.eta_seconds, preview_path, snapshot.fraction
    )


def default_output_name(job: Job, task: str, size: tuple[int, int]) -> str:
    """job<id>_<task>_<W>x<H>_<first words of the prompt>.mp4"""
    words = re.sub(r"[^\w-]+", "_", job.settings.prompt.strip())[:40].strip("_") or "video"
    return f"job{job.id:05d}_{task}_{size[0]}x{size[1]}_{words}.mp4"


class PipelineRunner:
    """Runs queued jobs through the engine: resolve (with the job's drawn seed), admit on the machine as it is
    now (RAM changes overnight), run, save the MP4 with its settings embedded.

    output_dir is used for jobs without an explicit output; previews go to preview_dir/job<id>.png and are
    written every `preview_every` steps. The loaded models live in `pipelines` between jobs, each recorded in the
    process's memory ledger, whose contents are written to `loaded_path` (JSON) for the app after each job.
    """

    def __init__(
        self,
        output_dir: Path,
        preview_dir: Path,
        *,
        preview_every: int = 1,
        resume_points: ResumePoints | None = None,
        loaded_path: Path | None = None,
    ) -> None:
        from wan_local.engine.run import Pipelines

        self.output_dir = Path(output_dir)
        self.preview_dir = Path(preview_dir)
        self.preview_every = max(1, preview_every)
        self.resume_points = resume_points
        self.loaded_path = Path(loaded_path) if loaded_path is not None else None
        self.pipelines = Pipelines(keep=2)

    def close(self) -> None:
        """Release every model this runner's pipelines hold."""
        self.pipelines.close()

    def admit(self, job: Job):
        """(resolved job, admission) for `job` on this machine now. Weights kept from earlier jobs (idle experts,
        VAEs: the process's memory ledger) count as free RAM: when the job is refused, the least recently used
        are evicted until it would fit, and it is judged again."""
        from wan_local.engine.admit import admit_job
        from wan_local.engine.resolve import resolve_job
        from wan_local.memory.ledger import process_ledger
        from wan_local.presets import ram_safety_margin_bytes

        resolved = resolve_job(job.settings, seed=job.resolved_seed)
        admission = admit_job(resolved, force=job.settings.force)
        ledger = process_ledger()
        held = ledger.total("host")
        if not admission.admitted and held:
            machine = resolved.machine
            usable = machine.ram_available_bytes - ram_safety_margin_bytes(machine)
            short = admission.estimate.peak_ram_bytes - usable if admission.estimate is not None else held
            evicted = ledger.make_room(max(1, short), held)
            log.info("job %d: evicted %d idle model(s) to make room; judging it again", job.id, len(evicted))
            gc.collect()
            resolved = resolve_job(job.settings, seed=job.resolved_seed)
            admission = admit_job(resolved, force=job.settings.force)
        self.publish_loaded()
        admission.raise_if_refused()
        if admission.degraded or admission.forced:
            log.warning("job %d: %s", job.id, admission.message)
        return resolved, admission

    def publish_loaded(self) -> None:
        """Write what this process holds (the memory ledger) to `loaded_path` for the app's Models tab."""
        if self.loaded_path is None:
            return
        import json

        from wan_local.memory.ledger import process_ledger
        from wan_local.tempfiles import atomic_write

        entries = [dataclasses.asdict(e) for e in process_ledger().entries()]
        try:
            with atomic_write(self.loaded_path) as tmp:
                tmp.write_text(json.dumps({"updated_at": time.time(), "entries": entries}))
        except OSError as exc:  # a full disk must not fail the job for a status file
            log.warning("cannot write %s: %s", self.loaded_path, exc)

    def run(self, job: Job, on_progress: Callable[[Progress], None], cancel: CancelToken) -> Path:
        """Generate `job`'s video, save it with its settings embedded, return the path."""
        import torch

        s = job.settings
        resolved, admission = self.admit(job)
        settings = resolved.settings
        resume_key = ResumePoints.key(job, resolved.device, resolved.dtype, admission.memory)
        oom: str | None = None
        tracker = progress_tracker(settings.steps, admission.estimate)
        try:
            result = self._generate(resolved, admission, job, on_progress, cancel, resume_key, tracker)
            on_progress(reported(tracker.stage("save")))
            output = Path(s.output) if s.output else self.output_dir / default_output_name(job, s.task, settings.size)
            metadata: dict[str, Any] = {
                **result.metadata(),
                "dtype": resolved.dtype,
                "device": resolved.device,
                "job_id": job.id,
                "preset": admission.preset.name,
                "memory": dict(s.memory),
                "image_source": s.image_source,
            }
            from wan_local.video import save_video

            saved = save_video(result.video, output, result.fps, metadata)  # the resume point stays: see resume.py
            self.publish_loaded()
            on_progress(reported(tracker.finish()))
            return saved
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                self._discard_resume_point(job)
                raise
            self._discard_resume_point(job)  # the retry runs with other memory options: a different key
            oom = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Out of the except block, so the failed frames (and the tensors they hold) can be freed first.
        self.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise JobOutOfMemory(
            f"out of memory while generating job {job.id} ({oom}). Try a lower memory preset, a smaller size or "
            "fewer frames, or close other programs that use the GPU"
        )

    def _discard_resume_point(self, job: Job) -> None:
        if self.resume_points is not None:
            self.resume_points.discard(job.id)

    def _generate(
        self,
        resolved,
        admission,
        job: Job,
        on_progress: Callable[[Progress], None],
        cancel: CancelToken,
        resume_key: str,
        tracker: ProgressTracker,
    ):
        from wan_local.engine.run import run_job

        preview = self.preview_dir / f"job{job.id}.png"
        points = self.resume_points
        resume = points.load(job.id, resume_key) if points is not None else None
        if resume is not None:
            log.info("job %d: resuming after denoise step %d", job.id, int(resume[1]["next_index"]))
        last_saved = time.monotonic()

        def on_stage(name: str) -> None:
            on_progress(reported(tracker.stage(name)))

        def on_step(event: StepEvent) -> None:
            done = event.index + 1
            snapshot = tracker.step(done, event.total)
            path = None
            if done % self.preview_every == 0 or done == event.total:
                shown = event.denoised() if event.denoised is not None else event.latent
                path = str(write_preview(shown, preview, frame=shown.shape[1] // 2))
                del shown
            nonlocal last_saved
            if points is not None and done < event.total and time.monotonic() - last_saved >= points.every_s:
                points.save(job.id, resume_key, event.latent, event.solver_state())
                last_saved = time.monotonic()
            on_progress(reported(snapshot, path))

        return run_job(
            resolved, admission, self.pipelines, on_step=on_step, on_stage=on_stage, cancel=cancel, resume=resume
        )
