"""The one denoise loop every task runs, with expert choice, classifier-free guidance, progress and cancel."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wan_local.errors import WanLocalError
from wan_local.sampling.conditioning import Conditioning
from wan_local.sampling.schedule import Schedule

HIGH_NOISE, LOW_NOISE, SINGLE = "high_noise", "low_noise", "model"


class Cancelled(WanLocalError):
    """The job was cancelled through its CancelToken; raised between two steps."""


class CancelToken:
    """Thread-safe flag checked once per denoise step (and between pipeline stages)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


@dataclass(frozen=True)
class StepEvent:
    """Reported after every solver step: `index` counts from 0; `latent` is the new latent (do not modify).

    `solver_state()` returns what, with `latent`, resumes the loop after this step (see `denoise`); the tensors
    are shared with the solver, so save them before the next step if you keep them. `denoised()` computes this
    step's prediction of the clean latent, x0 = x - sigma * v (what previews show: the noisy `latent` is mostly
    noise early on); it allocates one latent-sized tensor, only when called.
    """

    index: int
    total: int
    timestep: int
    expert: str
    guide_scale: float
    latent: torch.Tensor
    solver_state: Callable[[], dict] = dict
    denoised: Callable[[], torch.Tensor] | None = None


def expert_for(timestep: int, boundary_timestep: float | None) -> str:
    """Which expert runs at integer `timestep`: high-noise while t >= boundary (875 / 900), else low-noise."""
    if boundary_timestep is None:
        return SINGLE
    return HIGH_NOISE if timestep >= boundary_timestep else LOW_NOISE


def guide_scale_for(expert: str, guide_scale: tuple[float, float]) -> float:
    """Guidance of `expert` from a (low-noise, high-noise) pair, the reference's order."""
    return guide_scale[1] if expert == HIGH_NOISE else guide_scale[0]


Model = Callable[..., torch.Tensor]
"""A DiT: model(x [B, C, T, h, w], t, context, y=...) -> velocity [B, C, T, h, w]."""


@dataclass
class Guidance:
    """Computes the guided velocity uncond + g * (cond - uncond) with the expert that owns the timestep.

    `models(expert)` returns the DiT for an expert name; it is called every step, so whoever provides it decides
    what stays loaded (the pipeline releases an expert once the loop has moved past it).
    """

    models: Callable[[str], Model]
    context: torch.Tensor
    negative_context: torch.Tensor
    guide_scale: tuple[float, float]
    boundary_timestep: float | None
    conditioning: Conditioning
    autocast_dtype: torch.dtype | None = None

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, str, float]:
        expert = expert_for(int(timestep), self.boundary_timestep)
        scale = guide_scale_for(expert, self.guide_scale)
        model = self.models(expert)
        t = self.conditioning.dit_timestep(timestep.to(latent.device, torch.float32), model.cfg.patch_size)
        y = None if self.conditioning.y is None else self.conditioning.y[None]
        with torch.autocast(
            latent.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            cond = model(latent[None], t, [self.context], y=y)[0]
            uncond = model(latent[None], t, [self.negative_context], y=y)[0]
        cond, uncond = cond.float(), uncond.float()
        return uncond + scale * (cond - uncond), expert, scale


def denoise(
    latent: torch.Tensor,
    schedule: Schedule,
    solver,
    guidance: Guidance,
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    cancel: CancelToken | None = None,
    resume_state: dict | None = None,
) -> torch.Tensor:
    """Run the steps of `schedule` from `latent` (the noise); return the final latent (float32).

    The conditioning's pinned frame (TI2V image-to-video) is imposed on the initial latent and after every step;
    the solver sees the full model output, as the reference does. With `resume_state` (a StepEvent's
    `solver_state()`) and that event's latent as `latent`, the loop continues after the saved step and ends
    bit-identical to an uninterrupted run.
    """
    conditioning = guidance.conditioning
    latent = conditioning.impose(latent.float())
    start = 0
    if resume_state is not None:
        solver.load_state_dict(resume_state)
        start = solver.next_index
    total = len(schedule.timesteps)
    for index in range(start, total):
        timestep = schedule.timesteps[index]
        if cancel is not None:
            cancel.raise_if_cancelled()
        velocity, expert, scale = guidance(latent, timestep)
        before = latent
        latent = conditioning.impose(solver.step(velocity, latent, index))
        if on_step is not None:
            sigma = float(schedule.sigmas[min(solver.position(index), total)])

            def denoised(x: torch.Tensor = before, v: torch.Tensor = velocity, s: float = sigma) -> torch.Tensor:
                return conditioning.impose(x - s * v)

            on_step(StepEvent(index, total, int(timestep), expert, scale, latent, solver.state_dict, denoised))
    return latent
