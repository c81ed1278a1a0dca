"""Shifted flow-matching sigma / timestep schedules, computed exactly as the official Wan2.2 schedulers do.

Convention (rectified flow): x_σ = (1 − σ)·x0 + σ·ε with σ ∈ [0, 1]; the DiT predicts v = ε − x0.

Two grids exist in the reference, and both are reproduced bit for bit:

- UniPC (default; also used for our Euler): σ_k = linspace(σ_max, 0, N+1)[:N] in float64 with
  σ_max = float32(1 − 1/T) (= 0.9990000128746033 for T = 1000), then shifted.
- DPM++: σ_k = linspace(1, 0, N+1)[:N] (starts at exactly 1.0), then shifted.

In both, the integer model timesteps are t_k = int64(σ'_k · T) — truncation, not rounding — while the
solver works on float32(σ'_k) followed by a final 0. The DiT therefore sees the truncated integer while the
solver uses the unrounded sigma (spec §6.1, §8 items 3 and 20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from wan_local.errors import InputError

__all__ = ["SCHEDULE_SOLVERS", "Schedule", "ScheduleError", "make_schedule", "shift_sigmas"]

# Solver names make_schedule understands (the grid depends on the solver).
SCHEDULE_SOLVERS = ("unipc", "dpm++", "euler")


class ScheduleError(InputError, ValueError):
    """A sampling setting (solver name, step count, shift) cannot be used.

    Subclasses both InputError (shown to the user as is) and ValueError (so plain ``except ValueError`` works).
    """


@dataclass(frozen=True, eq=False)
class Schedule:
    """The sigma and timestep lists of one sampling run.

    Invariants (checked on construction):
    - ``sigmas``: float32 [N+1], CPU, non-increasing, in [0, 1], last entry exactly 0. ``sigmas[i]`` is the
      noise level the solver assigns to the latent entering step i.
    - ``timesteps``: int64 [N], CPU: the integer timestep the DiT (and the expert switch) sees at step i.

    Treat both tensors as read-only; they are shared, not copied.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self) -> None:
        s, t = self.sigmas, self.timesteps
        if s.dtype != torch.float32 or s.dim() != 1 or s.device.type != "cpu":
            raise ScheduleError(f"sigmas must be 1-D float32 on the CPU, got {s.dtype} {tuple(s.shape)} {s.device}")
        if t.dtype != torch.int64 or t.dim() != 1 or t.device.type != "cpu":
            raise ScheduleError(f"timesteps must be 1-D int64 on the CPU, got {t.dtype} {tuple(t.shape)} {t.device}")
        if t.numel() < 1 or s.numel() != t.numel() + 1:
            raise ScheduleError(f"need N >= 1 timesteps and N+1 sigmas, got {t.numel()} and {s.numel()}")
        if s[-1].item() != 0.0:
            raise ScheduleError(f"the last sigma must be exactly 0, got {s[-1].item()}")
        if not (bool((s[1:] <= s[:-1]).all()) and s[0].item() <= 1.0):  # last sigma is 0 (checked above)
            raise ScheduleError(f"sigmas must be non-increasing within [0, 1], got {s.tolist()}")

    @property
    def num_steps(self) -> int:
        """N: the number of model evaluations (loop iterations)."""
        return int(self.timesteps.numel())

    @property
    def start_index(self) -> int:
        """Schedule position at which the reference UniPC / DPM++ schedulers start stepping.

        The reference locates its first step by searching the timestep list for the first timestep value and
        takes the SECOND match when there are several (spec §6.5, §8 item 18). So this is 1 when
        ``timesteps[0] == timesteps[1]`` (e.g. UniPC with N >= 92 at shift 12) and 0 otherwise.
        """
        matches = (self.timesteps == self.timesteps[0]).nonzero().flatten()
        return int(matches[1]) if matches.numel() > 1 else 0


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Timestep shift σ' = s·σ / (1 + (s − 1)·σ), elementwise in float64 (operation order as the reference).

    Maps [0, 1] onto [0, 1] monotonically; s > 1 moves steps toward high noise.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_schedule(solver: str, steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    """Build the schedule the official Wan2.2 code uses for ``solver`` with ``steps`` steps and ``shift``.

    Args:
        solver: "unipc" (FlowUniPCMultistepScheduler grid), "dpm++" (get_sampling_sigmas grid, first t = T) or
            "euler" (not in the reference; uses the UniPC grid).
        steps: N >= 1, the number of model evaluations.
        shift: the timestep shift s > 0 (12.0 for T2V-A14B, 5.0 for I2V-A14B and TI2V-5B).
        num_train_timesteps: T, the training timestep count (1000 for every Wan2.2 model).

    Returns:
        Schedule with float32 sigmas [N+1] (ending in 0) and int64 timesteps [N] = int(σ'·T), truncated.
    """
    if solver not in SCHEDULE_SOLVERS:
        raise ScheduleError(f"unknown solver {solver!r}; allowed: {', '.join(SCHEDULE_SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ScheduleError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) or shift <= 0:
        raise ScheduleError(f"shift must be a finite number > 0, got {shift!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, Integral):
        raise ScheduleError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    if num_train_timesteps < 2:
        raise ScheduleError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    steps, shift, n_train = int(steps), float(shift), int(num_train_timesteps)

    if solver == "dpm++":
        # wan.utils.fm_solvers.get_sampling_sigmas; set_timesteps then re-applies a shift of 1, an exact identity.
        base = np.linspace(1, 0, steps + 1)[:steps]
    else:
        # The training grid is 1 − linspace(1, 1/T, T) reversed, stored as float32: σ_max = float32(1 − 1/T),
        # σ_min = 0 (linspace's endpoint 1/T is exact).
        sigma_max = float(np.float32(1.0 - 1 / n_train))
        base = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    shifted = shift_sigmas(base, shift)  # float64 [N]

    # float64 → int64 truncates toward zero, like the reference's torch .to(int64).
    timesteps = torch.from_numpy(shifted * n_train).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    return Schedule(sigmas=sigmas, timesteps=timesteps)
