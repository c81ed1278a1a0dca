"""Schedules and solvers against the official Wan2.2 schedulers (golden pipeline runs + spec §6.1, §6.5, §6.6)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import rel_l2

from wan_local.errors import InputError
from wan_local.sampling.schedule import Schedule, ScheduleError, make_schedule, shift_sigmas
from wan_local.sampling.solvers import SOLVERS, Solver, make_solver

PIPELINE_CASES = ("t2v_a14b_unipc", "t2v_a14b_dpmpp", "i2v_a14b_unipc", "ti2v_5b_t2v", "ti2v_5b_i2v")
# Golden replay bound per step. Measured max 6.6e-8: the reference run's float32 log rounded a few
# near-midpoint values one ulp the other way (one such log per case explains every differing element).
REPLAY_RTOL = 2e-7


def _case_schedule(case: dict) -> Schedule:
    args = case["args"]
    return make_schedule(args["sample_solver"], args["sampling_steps"], args["shift"])


def _guidance(g: dict[str, torch.Tensor], case: dict, i: int) -> float:
    if "guide_scale_per_step" in g:  # A14B: the active expert's scale
        return g["guide_scale_per_step"][i].item()
    return float(case["args"]["guide_scale"])


def _velocity(g: dict[str, torch.Tensor], case: dict, i: int) -> torch.Tensor:
    """CFG as the reference writes it: uncond + g·(cond − uncond), float32, g a Python float."""
    cond, uncond = g["noise_pred_cond"][i], g["noise_pred_uncond"][i]
    return uncond + _guidance(g, case, i) * (cond - uncond)


def _frame0_mask(latent: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(latent)
    mask[:, 0] = 0
    return mask


def _replay(name: str, case: dict, g: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Drive a solver with the golden model outputs; returns (ours, golden) latent after each step."""
    schedule = _case_schedule(case)
    solver = make_solver(case["args"]["sample_solver"], schedule)
    latent, n = g["step_latent_in"][0], schedule.num_steps
    pairs = []
    for i in range(n):
        latent = solver.step(_velocity(g, case, i), latent, i)
        if name == "ti2v_5b_i2v":  # re-impose latent frame 0 AFTER the solver step (spec §6.8)
            mask = _frame0_mask(latent)
            latent = (1.0 - mask) * g["image_latent"] + mask * latent
        expected = g["step_latent_in"][i + 1] if i + 1 < n else g["final_latent"]
        pairs.append((latent, expected))
    return pairs


def test_case_list_covers_every_pipeline_case(cases):
    assert sorted(PIPELINE_CASES) == sorted(k for k, c in cases.items() if c["kind"] == "pipeline")


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_schedule_matches_golden(name, cases, golden):
    g, schedule = golden(name), _case_schedule(cases[name])
    assert schedule.sigmas.dtype == torch.float32 and schedule.timesteps.dtype == torch.int64
    assert torch.equal(schedule.sigmas, g["sigmas"])  # max abs diff 0
    assert torch.equal(schedule.timesteps, g["timesteps"])
    assert schedule.start_index == 0


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_first_latent_is_initial_noise(name, golden):
    g = golden(name)
    expected = g["noise"]
    if name == "ti2v_5b_i2v":  # frame 0 replaced by the image latent before the loop
        mask = _frame0_mask(g["noise"])
        expected = (1.0 - mask) * g["image_latent"] + mask * g["noise"]
    assert torch.equal(g["step_latent_in"][0], expected)


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_replay_matches_golden(name, cases, golden):
    g = golden(name)
    pairs = _replay(name, cases[name], g)
    errors = [rel_l2(ours, expected) for ours, expected in pairs]
    assert max(errors) <= REPLAY_RTOL, f"per-step rel_l2 {errors}"
    assert torch.equal(*pairs[0])  # step 0 is bit-exact in every case
    if name == "ti2v_5b_i2v":
        assert torch.equal(g["final_latent"][:, 0], g["image_latent"][:, 0])


def test_unipc_replay_is_bit_exact(cases, golden):
    """Corrector + 2×2 solve + predictor + last step: no log near a rounding midpoint in this case."""
    name = "t2v_a14b_unipc"
    for i, (ours, expected) in enumerate(_replay(name, cases[name], golden(name))):
        assert torch.equal(ours, expected), f"step {i}: max abs {(ours - expected).abs().max().item()}"


# Full-size defaults, lists from spec §6.1 (computed there with the official scheduler).
# fmt: off
T2V_40_S12 = [
    999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
    922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235,
]
I2V_40_S5 = [
    999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846,
    833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113,
]
TI2V_50_S5 = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
    882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
    555, 522, 487, 448, 405, 356, 302, 241, 172, 92,
]
# fmt: on


def test_full_size_t2v_a14b_schedule():
    s = make_schedule("unipc", 40, 12.0)
    assert s.timesteps.tolist() == T2V_40_S12  # 999 first: σ'_0·1000 = 999.917 is truncated, not rounded
    assert int((s.timesteps >= 875).sum()) == 26  # high-noise expert steps
    assert s.sigmas[[0, 1, 38, 39]].tolist() == pytest.approx([0.999917, 0.997783, 0.386847, 0.235110], abs=1e-6)
    assert s.sigmas[-1].item() == 0.0 and s.sigmas.numel() == 41


def test_full_size_i2v_a14b_schedule():
    s = make_schedule("unipc", 40, 5.0)
    assert s.timesteps.tolist() == I2V_40_S5
    assert int((s.timesteps >= 900).sum()) == 15
    assert s.sigmas[[0, 1, 38, 39]].tolist() == pytest.approx([0.999800, 0.994695, 0.208160, 0.113533], abs=1e-6)


def test_full_size_ti2v_5b_schedule():
    assert make_schedule("unipc", 50, 5.0).timesteps.tolist() == TI2V_50_S5


def test_unipc_grid_starts_at_float32_0999():
    s = make_schedule("unipc", 10, 1.0)  # shift 1 = the unshifted grid
    assert s.sigmas[0].item() == 0.9990000128746033
    assert s.timesteps[0].item() == 999


@pytest.mark.parametrize("steps,shift,unipc", [(40, 12.0, T2V_40_S12), (40, 5.0, I2V_40_S5), (50, 5.0, TI2V_50_S5)])
def test_dpmpp_schedule_starts_at_sigma_one(steps, shift, unipc):
    s = make_schedule("dpm++", steps, shift)
    assert s.sigmas[0].item() == 1.0 and s.timesteps[0].item() == 1000  # spec §8 item 20
    assert all(abs(a - b) <= 1 for a, b in zip(s.timesteps[1:].tolist(), unipc[1:], strict=True))
    assert s.start_index == 0


def test_euler_uses_the_unipc_grid():
    e, u = make_schedule("euler", 17, 7.0), make_schedule("unipc", 17, 7.0)
    assert torch.equal(e.sigmas, u.sigmas) and torch.equal(e.timesteps, u.timesteps)


def test_shift_function():
    import numpy as np

    sigma = np.linspace(0, 1, 11)
    assert np.array_equal(shift_sigmas(sigma, 1.0), sigma)
    assert shift_sigmas(np.array([0.0, 1.0]), 12.0).tolist() == [0.0, 1.0]
    assert shift_sigmas(np.array([0.5]), 3.0)[0] == pytest.approx(0.75)  # 1.5 / 2


# --- start-index quirk (spec §6.5, §8 item 18) ---


def _random_velocities(n: int, shape=(4, 2, 3, 3), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(n)]


def test_duplicate_first_timestep_triggers_quirk():
    assert make_schedule("unipc", 91, 12.0).start_index == 0
    s = make_schedule("unipc", 92, 12.0)  # smallest N at shift 12 whose first two timesteps coincide
    assert s.timesteps[:3].tolist() == [999, 999, 998]
    assert s.start_index == 1


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_quirk_starts_at_second_occurrence(name):
    """Loop index i is solved at sigma i+1: identical to the schedule without its first entry; the extra last
    call (σ = 0) returns the latent unchanged."""
    if name == "unipc":
        quirky = make_schedule("unipc", 92, 12.0)
    else:  # never happens on the DPM++ grid in practice; build one by hand
        sig = torch.tensor([0.9999, 0.9995, 0.9, 0.6, 0.3, 0.0])
        quirky = Schedule(sig, torch.tensor([999, 999, 900, 600, 300]))
    trimmed = Schedule(quirky.sigmas[1:].clone(), quirky.timesteps[1:].clone())
    assert trimmed.start_index == 0
    n = quirky.num_steps
    x, vs = _random_velocities(n)
    a, b = make_solver(name, quirky), make_solver(name, trimmed)
    assert a.start_index == 1 and a.position(0) == 1
    xa = xb = x
    for i in range(n - 1):
        xa, xb = a.step(vs[i], xa, i), b.step(vs[i], xb, i)
        assert torch.equal(xa, xb), f"step {i}"
    assert torch.equal(a.step(vs[n - 1], xa, n - 1), xa)


def test_euler_ignores_the_quirk():
    s = make_schedule("euler", 92, 12.0)
    assert make_solver("euler", s).start_index == 0


# --- solver maths ---


def test_euler_step_formula():
    s = make_schedule("euler", 8, 5.0)
    solver = make_solver("euler", s)
    x, vs = _random_velocities(8)
    for i in range(8):
        expected = x + (s.sigmas[i + 1] - s.sigmas[i]) * vs[i]
        x = solver.step(vs[i], x, i)
        assert torch.equal(x, expected)
        ref64 = expected.double()  # same step in float64 with the float32 sigmas
        assert rel_l2(x, ref64) <= 1e-6


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 12.0), (7, 5.0), (20, 12.0)])
def test_straight_flow_lands_on_x0(name, steps, shift):
    """For a constant velocity v = ε − x0 every solver must end exactly on x0 (x0 predictions are all x0)."""
    gen = torch.Generator().manual_seed(steps)
    x0, eps = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    s = make_schedule(name, steps, shift)
    solver, v = make_solver(name, s), eps - x0
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * eps
    for i in range(steps):
        x = solver.step(v, x, i)
        sigma = s.sigmas[i + 1].double()
        assert rel_l2(x, (1 - sigma) * x0.double() + sigma * eps.double()) <= 1e-5
    assert rel_l2(x, x0) <= 1e-6


def test_last_unipc_step_returns_x0_prediction():
    s = make_schedule("unipc", 3, 5.0)
    solver = make_solver("unipc", s)
    x, vs = _random_velocities(3)
    for i in range(2):
        x = solver.step(vs[i], x, i)
    # Step N−1 is first order to σ = 0: exactly m = x − σ·v of the latent it was given (spec §6.5 item 7).
    assert torch.equal(solver.step(vs[2], x, 2), x - s.sigmas[2] * vs[2])


def test_dtype_and_device_of_result():
    s = make_schedule("unipc", 4, 5.0)
    solver = make_solver("unipc", s)
    x, vs = _random_velocities(4)
    out = solver.step(vs[0].bfloat16(), x, 0)
    assert out.dtype == torch.float32 and out.device == x.device


# --- resume from a checkpoint ---


def _save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_state_dict_round_trip_is_bit_identical(name, cases, golden):
    case_name = "t2v_a14b_dpmpp" if name == "dpm++" else "t2v_a14b_unipc"
    case, g = cases[case_name], golden(case_name)
    s = make_schedule(name, case["args"]["sampling_steps"], case["args"]["shift"])
    n = s.num_steps
    vs = [_velocity(g, case, i) for i in range(n)]

    reference: list[torch.Tensor] = []
    solver, x = make_solver(name, s), g["step_latent_in"][0]
    for i in range(n):
        x = solver.step(vs[i], x, i)
        reference.append(x)

    for k in range(n + 1):  # interrupt after k steps
        first, x = make_solver(name, s), g["step_latent_in"][0]
        for i in range(k):
            x = first.step(vs[i], x, i)
        resumed: Solver = make_solver(name, s)
        resumed.load_state_dict(_save_load(first.state_dict()))
        assert resumed.next_index == k
        for i in range(k, n):
            x = resumed.step(vs[i], x, i)
            assert torch.equal(x, reference[i]), f"resume after {k}, step {i}"


# --- errors ---


@pytest.mark.parametrize(
    "solver,steps,shift",
    [("ddim", 10, 5.0), ("unipc", 0, 5.0), ("unipc", 2.5, 5.0), ("unipc", True, 5.0), ("unipc", 10, 0.0),
     ("dpm++", 10, -1.0), ("euler", 10, math.nan), ("unipc", 10, math.inf)],
)  # fmt: skip
def test_make_schedule_rejects_bad_settings(solver, steps, shift):
    with pytest.raises(ScheduleError) as info:
        make_schedule(solver, steps, shift)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)


def test_make_solver_rejects_unknown_name():
    with pytest.raises(ValueError, match="allowed: unipc, dpm\\+\\+, euler"):
        make_solver("heun", make_schedule("unipc", 4, 5.0))


def test_schedule_validates_its_tensors():
    with pytest.raises(ValueError, match="last sigma"):
        Schedule(torch.tensor([0.9, 0.1]), torch.tensor([900]))
    with pytest.raises(ValueError, match="N\\+1 sigmas"):
        Schedule(torch.tensor([0.9, 0.0]), torch.tensor([900, 100]))
    with pytest.raises(ValueError, match="non-increasing"):
        Schedule(torch.tensor([0.5, 0.9, 0.0]), torch.tensor([500, 900]))
    with pytest.raises(ValueError, match="int64"):
        Schedule(torch.tensor([0.9, 0.0]), torch.tensor([900.0]))


def test_steps_must_run_in_order():
    solver = make_solver("unipc", make_schedule("unipc", 3, 5.0))
    x, vs = _random_velocities(3)
    with pytest.raises(ValueError, match="expected step index 0"):
        solver.step(vs[1], x, 1)
    x = solver.step(vs[0], x, 0)
    with pytest.raises(ValueError, match="expected step index 1"):
        solver.step(vs[0], x, 0)
    with pytest.raises(ValueError, match="shape"):
        solver.step(vs[1][:1], x, 1)


def test_load_state_dict_rejects_mismatches():
    s = make_schedule("unipc", 4, 5.0)
    state = make_solver("unipc", s).state_dict()
    with pytest.raises(ValueError, match="'unipc'"):
        make_solver("euler", make_schedule("euler", 4, 5.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="different schedule"):
        make_solver("unipc", make_schedule("unipc", 4, 3.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys \\['last_sample'\\]"):
        make_solver("unipc", s).load_state_dict({k: v for k, v in state.items() if k != "last_sample"})
