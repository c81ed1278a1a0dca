"""The adapter between the Generate tab and the pre-flight estimate: peaks, time, and the admission verdict.

The estimator (`wan_local.memory.estimate.estimate_job`) is optional here: when it cannot be imported, or raises
something other than "this does not fit" (PlanError), the prediction says "no estimate" and the job may still be
queued with the preset asked for. Admission follows `presets.admit`: walk the preset's fallback chain and take
the first preset whose predicted peaks fit (VRAM within the card, RAM within what is available minus the margin
that keeps the OS from paging); a PlanError for one preset counts as "does not fit" with the planner's reason.
Nothing here imports Gradio or torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_local.errors import WanLocalError
from wan_local.machine import GIB, MachineInfo
from wan_local.presets import Preset, Verdict, admit

log = logging.getLogger(__name__)

Estimator = Callable[..., Any]
"""estimate_job(task, size, frames, steps, options, machine, dit_config=None) -> JobEstimate-like object with
peak_vram_bytes, peak_ram_bytes and seconds."""


class EngineEstimator:
    """The engine itself as the UI's estimator: `admit(job, machine, presets)` resolves and admits a job exactly as
    `wan-local generate`, `queue add` and the worker do (wan_local.engine); calling it estimates like
    `estimate_job` (the Queue tab's time per job)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from wan_local.memory.estimate import estimate_job

        return estimate_job(*args, **kwargs)

    def admit(self, job: Any, machine: MachineInfo, presets: Mapping[str, Preset]) -> Prediction:
        """The engine's verdict on `job` (JobSettings with the preset asked for). A model folder that cannot be
        read yet (still downloading, wrong task) is judged with the official files' sizes instead."""
        import dataclasses

        from wan_local.engine.admit import admit_job
        from wan_local.engine.resolve import resolve_job
        from wan_local.errors import CheckpointError

        try:
            resolved = resolve_job(job, machine=machine, presets=presets, need_image=False)
        except CheckpointError as exc:
            log.debug("prediction without the model folder (%s)", exc)
            resolved = resolve_job(
                dataclasses.replace(job, ckpt_dir=""), machine=machine, presets=presets, need_image=False
            )
        admission = admit_job(resolved, refused="Not queued")
        return Prediction(resolved.requested, admission.preset, admission.message, admission.estimate)


def load_estimator() -> Estimator | None:
    """The engine's estimator when the engine is installed, else None (the UI then shows "no estimate")."""
    try:
        import wan_local.engine.admit  # noqa: F401
    except ImportError as exc:
        log.info("no job estimates: %s", exc)
        return None
    return EngineEstimator()


def load_dit_config(model_dir: str | Path | None, task: str, choice: Any = None) -> Any:
    """The real DiT config of the checkpoint in `model_dir` (header reads only; choice: the picked files), or None
    when unavailable."""
    if not model_dir:
        return None
    try:
        from wan_local.weights.headers import dit_config_for_checkpoint

        return dit_config_for_checkpoint(model_dir, task, choice)
    except Exception as exc:  # optional refinement: the official config is used instead
        log.debug("no DiT config from %s: %s", model_dir, exc)
        return None


def load_components(model_dir: str | Path | None, task: str, choice: Any = None) -> Any:
    """Text encoder / VAE sizes of the checkpoint in `model_dir`, or None (the official sizes are assumed)."""
    if not model_dir:
        return None
    try:
        from wan_local.weights.headers import component_bytes_for_checkpoint

        return component_bytes_for_checkpoint(model_dir, task, choice)
    except Exception as exc:  # optional refinement, like load_dit_config
        log.debug("no component sizes from %s: %s", model_dir, exc)
        return None


def gib(n_bytes: float) -> str:
    """Bytes as "12.3 GiB"."""
    return f"{n_bytes / GIB:.1f} GiB"


def format_duration(seconds: float) -> str:
    """A duration for people: "40 s", "12 min", "3.4 h", "2.1 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class Prediction(Verdict):
    """The verdict shown before queueing, with `estimate`: the estimate for `preset` (for the leanest preset tried
    when refused; None when there is no estimate)."""

    estimate: Any = None

    def figures(self) -> str:
        """ "peak VRAM 14.2 GiB · peak RAM 30.1 GiB · about 9 min", or "no estimate"."""
        est = self.estimate
        if est is None:
            return "no estimate" if self.admitted else "cannot be planned on this machine"
        shown = self.preset or self.requested
        vram = "none (CPU)" if shown.cpu_only else gib(est.peak_vram_bytes)
        return f"peak VRAM {vram} · peak RAM {gib(est.peak_ram_bytes)} · about {format_duration(est.seconds)}"

    def markdown(self, job: str = "") -> str:
        """The prediction panel: icon, what job (e.g. "64×48, 5 frames, 3 steps"), figures, message."""
        icon = "✗" if not self.admitted else "⚠" if self.degraded else "✓" if self.estimate is not None else "ℹ"
        what = f" ({job})" if job else ""
        return f"{icon} **Prediction{what}:** {self.figures()}\n\n{self.message}"


def predict(
    *,
    task: str,
    size: tuple[int, int],
    frames: int,
    steps: int,
    requested: Preset,
    presets: Mapping[str, Preset],
    machine: MachineInfo,
    estimator: Estimator | None,
    dit_config: Any = None,
    components: Any = None,
    job: Any = None,
) -> Prediction:
    """Estimate the job with `requested`'s memory options, degrading along its fallback chain, or refuse it
    (presets.admit decides; this adds the estimate shown in the panel). With the engine's estimator and `job`
    (its JobSettings), the engine's own resolve + admit decide, as for every other entry point."""
    if estimator is None:
        return Prediction(requested, requested, f"No estimate available; the job runs with '{requested.label}'.")
    if job is not None and hasattr(estimator, "admit"):
        try:
            return estimator.admit(dataclasses.replace(job, preset=requested.name), machine, presets)
        except WanLocalError:
            raise
        except Exception as exc:  # the estimate is advisory: its failure must never block queueing
            log.warning("estimate failed for %s %s: %s", task, size, exc, exc_info=True)
            return Prediction(requested, requested, f"No estimate ({exc}); the job runs with '{requested.label}'.")
    estimates: list[Any] = []

    def estimate(options) -> tuple[int, int]:
        est = estimator(task, size, frames, steps, options, machine, dit_config, components=components)
        estimates.append(est)
        return int(est.peak_vram_bytes), int(est.peak_ram_bytes)

    try:
        admission = admit(estimate, machine, requested, presets, refused="Not queued")
    except Exception as exc:  # the estimate is advisory: its failure must never block queueing
        log.warning("estimate failed for %s %s: %s", task, size, exc, exc_info=True)
        return Prediction(requested, requested, f"No estimate ({exc}); the job runs with '{requested.label}'.")
    return Prediction(requested, admission.preset, admission.message, estimates[-1] if estimates else None)
