"""A job's progress as one number: the stages of a job (encode_text, condition, denoise, decode, save) weighted
by their expected seconds, so the fraction done moves monotonically from 0 to 1 through decode and save, and the
seconds left count every stage still to come.

Expected seconds come from the job's estimate (`JobEstimate.seconds_by_stage`: load_models, encode_text,
denoise, decode); the experts load during the first denoise step, so load_models is weighted there. Stages the
estimate does not time (condition, save) get a small share of decode's time. Without an estimate the weights are
typical shares (DEFAULT_SHARES) and the seconds left are unknown until the first steps are timed.

The seconds left are calibrated on this machine as soon as denoise steps are measured: the measured time per
step (the mean of the last 8 steps; the first step, which loads an expert, left out once there are others) over
the expected one scales the expected decode and save times. Pure logic over a clock; no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

STAGES = ("encode_text", "condition", "denoise", "decode", "save")
#: Shares of a job's time by stage when it has no estimate (a typical A14B job on a consumer GPU).
DEFAULT_SHARES = {"encode_text": 0.04, "condition": 0.01, "denoise": 0.8, "decode": 0.12, "save": 0.03}
CONDITION_SHARE_OF_DECODE = 0.25  # VAE-encoding an image (i2v, ti2v) or building the noise: a part of a decode
SAVE_SHARE_OF_DECODE = 0.1  # writing the MP4


@dataclass(frozen=True)
class Snapshot:
    """One progress report: the stage, the denoise step of total (steps stay at total after denoise), the fraction
    of the whole job done (0..1, 1 only once the video is written) and the seconds left (None: not known yet)."""

    stage: str
    step: int
    total: int
    fraction: float
    eta_seconds: float | None


def expected_stage_seconds(seconds_by_stage: Mapping[str, float], steps: int) -> dict[str, float]:
    """Seconds expected per stage of STAGES from an estimate's seconds_by_stage (see the module docstring)."""
    decode = max(0.0, float(seconds_by_stage.get("decode", 0.0)))
    return {
        "encode_text": max(0.0, float(seconds_by_stage.get("encode_text", 0.0))),
        "condition": CONDITION_SHARE_OF_DECODE * decode,
        "denoise": max(0.0, float(seconds_by_stage.get("denoise", 0.0)))
        + max(0.0, float(seconds_by_stage.get("load_models", 0.0))),
        "decode": decode,
        "save": SAVE_SHARE_OF_DECODE * decode,
    }


class ProgressTracker:
    """Turns stage starts and denoise steps into Snapshots. `stage_seconds`: expected seconds per stage of STAGES
    (expected_stage_seconds); None uses DEFAULT_SHARES and leaves the time unknown until steps are measured.
    `load_seconds`: the part of denoise's expected seconds spent loading (weighted on the first step)."""

    def __init__(
        self,
        steps: int,
        stage_seconds: Mapping[str, float] | None = None,
        *,
        load_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.steps = max(1, int(steps))
        self.known = stage_seconds is not None and sum(stage_seconds.values()) > 0
        expected = dict(stage_seconds) if self.known else {k: 100.0 * v for k, v in DEFAULT_SHARES.items()}
        self.expected = {name: max(0.0, float(expected.get(name, 0.0))) for name in STAGES}
        total = sum(self.expected.values()) or 1.0
        self.weights = {name: s / total for name, s in self.expected.items()}
        self.load_share = (
            min(1.0, max(0.0, load_seconds) / self.expected["denoise"]) if self.expected["denoise"] else 0.0
        )
        self.clock = clock
        self._stage = "encode_text"
        self._stage_started = clock()
        self._step = 0
        self._fraction = 0.0
        self._step_times: list[float] = []
        self._last_step_at: float | None = None

    # ------------------------------------------------------------------------------------------------ events

    def stage(self, name: str) -> Snapshot:
        """A stage of STAGES starts (another name is reported as is, weighted as the stage it follows)."""
        now = self.clock()
        self._stage, self._stage_started = name, now
        if name == "denoise":
            self._last_step_at = now
        return self._snapshot(self._start_of(name))

    def step(self, done: int, total: int) -> Snapshot:
        """Denoise step `done` (1-based) of `total` finished."""
        now = self.clock()
        if self._last_step_at is not None:
            self._step_times.append(now - self._last_step_at)
        self._last_step_at = now
        self.steps = max(1, int(total))
        self._step = min(int(done), self.steps)
        return self._snapshot(self._start_of("denoise") + self.weights["denoise"] * self._denoise_share(self._step))

    def finish(self) -> Snapshot:
        """The video is written: fraction 1, nothing left."""
        self._stage, self._step = "save", self.steps
        self._fraction = 1.0
        return Snapshot("save", self.steps, self.steps, 1.0, 0.0)

    # ------------------------------------------------------------------------------------------------ internals

    def _start_of(self, name: str) -> float:
        if name not in STAGES:
            return self._fraction
        return sum(self.weights[s] for s in STAGES[: STAGES.index(name)])

    def _denoise_share(self, done: int) -> float:
        """Share of the denoise stage's weight done after `done` steps (loading counts with the first step)."""
        if done <= 0:
            return 0.0
        return self.load_share + (1.0 - self.load_share) * done / self.steps

    def _measured_step_s(self) -> float | None:
        times = self._step_times[1:] if len(self._step_times) > 1 else self._step_times
        times = times[-8:]
        return sum(times) / len(times) if times else None

    def _speed_ratio(self) -> float | None:
        """Measured over expected time per step (1.0 while nothing is measured and the estimate is known)."""
        measured = self._measured_step_s()
        expected_step = self.expected["denoise"] * (1.0 - self.load_share) / self.steps
        if measured is not None and expected_step > 0:
            return measured / expected_step
        return 1.0 if self.known else None

    def _eta(self) -> float | None:
        ratio = self._speed_ratio()
        if ratio is None:
            return None
        stage = self._stage if self._stage in STAGES else "save"
        later = sum(self.expected[s] for s in STAGES[STAGES.index(stage) + 1 :]) * ratio
        if stage == "denoise":
            measured = self._measured_step_s()
            left = self.steps - self._step
            if measured is not None:
                current = left * measured
            else:
                current = self.expected["denoise"] * ratio * (1.0 - self._denoise_share(self._step))
        else:
            current = max(0.0, self.expected[stage] * ratio - (self.clock() - self._stage_started))
        return round(current + later, 1)

    def _snapshot(self, fraction: float) -> Snapshot:
        self._fraction = min(max(self._fraction, fraction), 0.999)  # 1.0 only from finish()
        step = self.steps if self._stage in ("decode", "save") else self._step
        return Snapshot(self._stage, step, self.steps, round(self._fraction, 4), self._eta())
