"""Flow-matching ODE solvers: FlowUniPC (default), FlowDPM++ and plain Euler, step for step as Wan2.2.

Every solver maps (velocity v_i, latent x_i, step index i) → x_{i+1} on a fixed Schedule. Numerics follow the
official schedulers (spec §6.5, §6.6):
- sample maths in float32 (inputs are upcast; the result is float32 on the sample's device);
- every scalar coefficient (α, λ, h, φ, ρ, ...) is a float32 0-dim tensor on the CPU, computed with the
  reference's operation order. (The same maths in float64 drifts from the golden outputs from the second
  step on; float32 replays them bit for bit, up to the platform's float32 ``log`` rounding.)
- the 2×2 UniC system the reference hands to torch.linalg.solve is solved by an explicit float32 LU with
  partial pivoting and reciprocal pivots (LAPACK getf2/getrs order, no fused multiply-add). LAPACK builds
  round differently (x86 MKL differs from the golden run by ulps); the explicit form is the same everywhere
  and matches the golden run.

The caller owns the loop. A solver keeps references to tensors it was given or produced (its history), so do
not modify ``sample`` in place after passing it to ``step``; modifying the returned tensor is fine: the TI2V
image-to-video loop re-imposes latent frame 0 on it, and the reference's solver history never sees that.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from wan_local.sampling.schedule import Schedule, ScheduleError

__all__ = ["SOLVERS", "DPMPlusPlusSolver", "EulerSolver", "Solver", "UniPCSolver", "make_solver"]

logger = logging.getLogger(__name__)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR λ(σ) = ln(1 − σ) − ln σ on a float32 0-dim tensor (−inf at σ = 1, +inf at σ = 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _solve_2x2(
    a11: torch.Tensor, a12: torch.Tensor, a21: torch.Tensor, a22: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve [[a11, a12], [a21, a22]]·x = [b1, b2] on float32 0-dim tensors the way LAPACK sgesv does.

    LU with partial pivoting, pivots applied as reciprocals, every product and difference rounded separately.
    """
    if bool(a21.abs() > a11.abs()):  # row swap; the unknowns keep their order
        a11, a12, a21, a22, b1, b2 = a21, a22, a11, a12, b2, b1
    inv_11 = 1 / a11
    l21 = a21 * inv_11
    u22 = a22 - l21 * a12
    x2 = (b2 - l21 * b1) * (1 / u22)
    x1 = (b1 - a12 * x2) * inv_11
    return x1, x2


class Solver(ABC):
    """Common interface: ``step`` once per schedule entry, in order; checkpoint with ``state_dict``.

    ``index`` is the loop position i in [0, N): the model output belongs to ``schedule.timesteps[i]``. The
    sigma a step is solved at is ``schedule.sigmas[position(i)]``; position(i) = i except under the reference
    schedulers' start-index quirk (see ``start_index``).

    State: ``_history`` holds the tensors carried between steps (None until set), ``_counters`` the integers;
    both go through ``state_dict`` unchanged, so a restored solver continues bit-identically.
    """

    name: ClassVar[str]
    # Whether loop index 0 starts where the reference scheduler starts (Schedule.start_index) rather than at 0.
    reference_start: ClassVar[bool] = False
    _history_keys: ClassVar[tuple[str, ...]] = ()
    _counter_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._sigmas = schedule.sigmas  # float32 [N+1] on the CPU: coefficient maths stays there
        self._next_index = 0
        self._history: dict[str, torch.Tensor | None] = dict.fromkeys(self._history_keys)
        self._counters: dict[str, int] = dict.fromkeys(self._counter_keys, 0)

    @property
    def next_index(self) -> int:
        """The index the next ``step`` call must pass (0 for a fresh solver, N when finished)."""
        return self._next_index

    @property
    def start_index(self) -> int:
        """Schedule position of loop index 0.

        The reference UniPC / DPM++ schedulers start at the second occurrence of the first timestep when it is
        duplicated (``Schedule.start_index`` = 1, e.g. UniPC with N >= 92 at shift 12). Loop index i is then
        solved at sigma i+1, and the last loop index lands one past the final step (position N, σ = 0), where
        the reference aborts (UniPC: ``assert self.this_order > 0``; DPM++: index error). There these solvers
        return the latent that step would start from (σ = 0: it is already clean; UniPC applies its corrector
        first), so a loop over all N timesteps ends with the reference's values of its N−1 real steps.
        """
        return self.schedule.start_index if self.reference_start else 0

    def position(self, index: int) -> int:
        """Index into ``schedule.sigmas`` of the sigma that loop index ``index`` is solved at."""
        return index + self.start_index

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """Advance ``sample`` (x_i, any shape) by one step using the model velocity ``model_output`` (same shape).

        ``model_output`` is the CFG-combined DiT output at ``schedule.timesteps[index]``. Returns x_{i+1} in
        float32 on the sample's device. Steps must be taken in order 0, 1, ..., N−1.
        """
        n = self.schedule.num_steps
        if index != self._next_index or index >= n:
            raise ValueError(
                f"{self.name} solver expected step index {self._next_index} (of {n}), got {index}; steps run in "
                "order, use load_state_dict to resume"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
        for key, value in self._history.items():  # a restored state may live on another device
            if value is not None and value.device != sample.device:
                self._history[key] = value.to(sample.device)
        out = self._step(model_output.float(), sample.float(), self.position(index))
        self._next_index += 1
        return out

    @abstractmethod
    def _step(self, v: torch.Tensor, x: torch.Tensor, pos: int) -> torch.Tensor:
        """One step at schedule position ``pos`` on float32 tensors."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: schedule, step counter, history tensors, counters.

        Values are str, int, None or tensors, so ``torch.load(..., weights_only=True)`` reads a saved copy.
        History tensors are shared with the solver, not copied; the solver never modifies them in place.
        """
        return {
            "solver": self.name,
            "next_index": self._next_index,
            "sigmas": self.schedule.sigmas,
            "timesteps": self.schedule.timesteps,
            **self._history,
            **self._counters,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` taken from a solver of the same kind on an identical schedule."""
        required = ("solver", "next_index", "sigmas", "timesteps", *self._history_keys, *self._counter_keys)
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"{self.name} solver state is missing keys {missing}")
        if state["solver"] != self.name:
            raise ValueError(f"solver state is for {state['solver']!r}, this solver is {self.name!r}")
        same_schedule = torch.equal(state["sigmas"].cpu(), self.schedule.sigmas) and torch.equal(
            state["timesteps"].cpu(), self.schedule.timesteps
        )
        if not same_schedule:
            raise ValueError("solver state was saved for a different schedule (sigmas/timesteps differ)")
        next_index = int(state["next_index"])
        if not 0 <= next_index <= self.schedule.num_steps:
            raise ValueError(f"solver state next_index {next_index} outside [0, {self.schedule.num_steps}]")
        self._next_index = next_index
        self._history = {key: state[key] for key in self._history_keys}
        self._counters = {key: int(state[key]) for key in self._counter_keys}


class EulerSolver(Solver):
    """Plain flow-matching Euler: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i (not offered by the reference CLI)."""

    name = "euler"

    def _step(self, v: torch.Tensor, x: torch.Tensor, pos: int) -> torch.Tensor:
        dt = self._sigmas[pos + 1] - self._sigmas[pos]  # float32 0-dim, negative
        return x + dt * v


class UniPCSolver(Solver):
    """FlowUniPCMultistepScheduler: order 2, predict_x0, bh2, lower_order_final, UniC corrector on every step.

    Per step (spec §6.5): m_i = x_i − σ_i·v_i; for i > 0 correct x_i with UniC of the previous predictor's
    order, starting again from the sample that predictor started from; then predict x_{i+1} with UniP of order
    min(2, N − i, steps done + 1). The last step (σ = 0) returns m_{N−1} exactly.
    History: ``m_prev``/``m_last`` the last two x0 predictions, ``last_sample`` the (corrected) sample the
    last predictor started from. Counters: ``last_order`` (order of that predictor = order of the next
    corrector) and ``lower_order_nums`` (steps done, capped at 2).
    """

    name = "unipc"
    reference_start = True
    _history_keys = ("m_prev", "m_last", "last_sample")
    _counter_keys = ("last_order", "lower_order_nums")
    _ORDER = 2

    def _step(self, v: torch.Tensor, x: torch.Tensor, pos: int) -> torch.Tensor:
        n, hist, count = self.schedule.num_steps, self._history, self._counters
        m = x - self._sigmas[pos] * v  # x0 prediction, like x
        if pos > 0 and hist["last_sample"] is not None:
            x = self._correct(m, pos)
        hist["m_prev"], hist["m_last"] = hist["m_last"], m
        hist["last_sample"] = x
        if pos >= n:  # only through the start-index quirk, see Solver.start_index
            logger.warning("UniPC start-index quirk: the extra step at sigma 0 returns the corrected sample")
            return x
        order = min(self._ORDER, n - pos, count["lower_order_nums"] + 1)
        count["last_order"] = order
        out = self._predict(x, pos, order)
        count["lower_order_nums"] = min(count["lower_order_nums"] + 1, self._ORDER)
        return out

    def _predict(self, x: torch.Tensor, pos: int, order: int) -> torch.Tensor:
        """UniP-bh2 from σ_pos to σ_pos+1; for order 2 ρ is fixed at 0.5 (the reference skips the solve)."""
        sig, m0 = self._sigmas, self._history["m_last"]
        sigma_s0, sigma_t = sig[pos], sig[pos + 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1 = torch.expm1(-h)  # also B(h) for bh2
        out = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (_lambda(sig[pos - 1]) - lambda_s0) / h
            d1 = (self._history["m_prev"] - m0) / rk
            out = out - alpha_t * h_phi_1 * (0.5 * d1)
        return out

    def _correct(self, m: torch.Tensor, pos: int) -> torch.Tensor:
        """UniC-bh2 of order ``last_order``: redo σ_pos−1 → σ_pos with the new x0 prediction ``m``."""
        sig, m0 = self._sigmas, self._history["m_last"]
        sigma_s0, sigma_t = sig[pos - 1], sig[pos]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        d1_t = m - m0
        if self._counters["last_order"] == 1:
            corr = 0.5 * d1_t  # ρ = [0.5]
        else:
            rk = (_lambda(sig[pos - 2]) - lambda_s0) / h
            d1 = (self._history["m_prev"] - m0) / rk
            # ρ = R⁻¹b with R rows r^0 = [1, 1], r^1 = [rk, 1] and b_j = g_j·j!/B(h), float32 on the CPU.
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k * 1 / b_h
            h_phi_k = h_phi_k / hh - 1 / 2
            b2 = h_phi_k * 2 / b_h
            one = torch.ones_like(rk)
            rho_1, rho_2 = _solve_2x2(one, one, rk, one, b1, b2)
            corr = rho_1 * d1 + rho_2 * d1_t
        return sigma_t / sigma_s0 * self._history["last_sample"] - alpha_t * h_phi_1 * m0 - alpha_t * b_h * corr


class DPMPlusPlusSolver(Solver):
    """FlowDPMSolverMultistepScheduler: dpmsolver++, order 2 midpoint, first order on the first and last step.

    With σ_0 = 1 (the DPM++ grid) λ_0 = −inf, so step 0 gives x_1 = σ_1·x + α_1·x0_0 and step 1's correction
    term is multiplied by 1/r₀ = 0; both fall out of the reference formulas evaluated as written.
    History: ``m_prev``/``m_last`` the last two x0 predictions; counter ``lower_order_nums`` (steps done, ≤ 2).
    """

    name = "dpm++"
    reference_start = True
    _history_keys = ("m_prev", "m_last")
    _counter_keys = ("lower_order_nums",)

    def _step(self, v: torch.Tensor, x: torch.Tensor, pos: int) -> torch.Tensor:
        n, hist, count = self.schedule.num_steps, self._history, self._counters
        hist["m_prev"], hist["m_last"] = hist["m_last"], x - self._sigmas[pos] * v
        if pos >= n:  # only through the start-index quirk, see Solver.start_index
            logger.warning("DPM++ start-index quirk: the extra step at sigma 0 returns the sample")
            return x
        # First order to start the multistep history, and on the last step: final_sigmas_type "zero" forces
        # it whatever N is (the reference's N < 15 "lower_order_second" rule only matters for order 3).
        first_order = count["lower_order_nums"] < 1 or pos == n - 1
        out = self._first_order(x, pos) if first_order else self._second_order(x, pos)
        count["lower_order_nums"] = min(count["lower_order_nums"] + 1, 2)
        return out

    def _first_order(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        sigma_s, sigma_t = self._sigmas[pos], self._sigmas[pos + 1]
        alpha_t = 1 - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s)
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * self._history["m_last"]

    def _second_order(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        sigma_s1, sigma_s0, sigma_t = self._sigmas[pos - 1], self._sigmas[pos], self._sigmas[pos + 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h, h_0 = _lambda(sigma_t) - lambda_s0, lambda_s0 - _lambda(sigma_s1)
        r0 = h_0 / h
        m0 = self._history["m_last"]
        d1 = (1.0 / r0) * (m0 - self._history["m_prev"])
        coef = alpha_t * (torch.exp(-h) - 1.0)
        return (sigma_t / sigma_s0) * x - coef * m0 - 0.5 * coef * d1


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (UniPCSolver, DPMPlusPlusSolver, EulerSolver)}


def make_solver(name: str, schedule: Schedule) -> Solver:
    """A fresh solver ``name`` ("unipc", "dpm++" or "euler") on ``schedule`` (made for the same solver name)."""
    if name not in SOLVERS:
        raise ScheduleError(f"unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    return SOLVERS[name](schedule)
