"""Colour latent previews: the published linear factors of both Wan latent spaces, a preview PNG whose colours
follow them, and a real tiny job writing one per step from the latent it is denoising."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import wan_local.jobs.runner as runner_module
from wan_local.jobs.runner import PipelineRunner
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.preview import LATENT_SPACES, factors_for, write_preview
from wan_local.sampling.denoise import denoise
from wan_local.sampling.schedule import make_schedule
from wan_local.sampling.solvers import make_solver


def _expected_pixel(values: np.ndarray) -> tuple[int, ...]:
    """[-1, 1] RGB -> 8-bit, as a preview PNG stores it."""
    return tuple(int(v) for v in np.round((np.clip(values, -1, 1) + 1) * 127.5))


def test_factor_shapes_per_latent_space():
    assert {name: (f.channels, len(f.bias)) for name, f in LATENT_SPACES.items()} == {
        "wan2.1": (16, 3), "wan2.2": (48, 3)
    }  # fmt: skip
    assert all(len(row) == 3 for f in LATENT_SPACES.values() for row in f.factors)
    assert factors_for(16).latent_space == "wan2.1" and factors_for(48).latent_space == "wan2.2"
    assert factors_for(12) is None
    # Spot checks against the source (ComfyUI comfy/latent_formats.py, Wan21 / Wan22), first and last rows.
    assert LATENT_SPACES["wan2.1"].factors[0] == (-0.1299, -0.1692, 0.2932)
    assert LATENT_SPACES["wan2.1"].factors[15] == (0.1984, 0.0913, 0.1861)
    assert LATENT_SPACES["wan2.1"].bias == (-0.1835, -0.0868, -0.3360)
    assert LATENT_SPACES["wan2.2"].factors[39] == (-0.3441, -0.3543, -0.2008)
    assert LATENT_SPACES["wan2.2"].factors[47] == (-0.0837, 0.0168, 0.0055)
    assert LATENT_SPACES["wan2.2"].bias == (0.0317, -0.0878, -0.1388)


@pytest.mark.parametrize("space", ["wan2.1", "wan2.2"])
def test_a_unit_latent_of_one_channel_shows_that_channels_colour(tmp_path, space):
    """Columns of the first latent frame hold 3 x the unit vector of channel 0, 1, 2, ...: each column of the
    preview has that channel's colour (its factor row times 3, plus the bias); a zero latent shows the bias."""
    linear = LATENT_SPACES[space]
    channels, width = linear.channels, 8
    latent = torch.zeros(channels, 2, 4, width)
    picks = [(i * 5) % channels for i in range(width - 1)]
    for column, channel in enumerate(picks):
        latent[channel, 0, :, column] = 3.0
    latent[:, 1] = 100.0  # later frames are not shown
    path = write_preview(latent, tmp_path / "p.png")
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    factor = pixels.shape[1] // width
    assert pixels.shape[:2] == (4 * factor, width * factor) and factor * width >= 320
    bias = np.array(linear.bias)
    for column, channel in enumerate(picks):
        colour = tuple(int(v) for v in pixels[0, column * factor])
        assert colour == _expected_pixel(3.0 * np.array(linear.factors[channel]) + bias), (space, channel)
    assert tuple(int(v) for v in pixels[-1, -1]) == _expected_pixel(bias)


def test_a_tiny_job_writes_a_colour_preview_per_step_from_its_latent(tiny, tmp_path, monkeypatch):
    """Every denoise step of a real tiny t2v-A14B job writes a PNG whose pixels are the Wan2.1 factors applied to
    the middle frame of that step's clean-latent prediction (computed here with numpy, upscaled by the same
    integer factor); the last step's prediction is the final latent (Euler: x - sigma * v at the last sigma)."""
    latents, frames = [], []
    write = runner_module.write_preview

    def recording(latent, path, frame=0):
        latents.append(latent.clone())
        frames.append(frame)
        return write(latent, path, frame)

    monkeypatch.setattr(runner_module, "write_preview", recording)
    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = JobSettings(
        task="t2v-A14B", ckpt_dir=str(tiny / "t2v-A14B"), prompt="a fox", size=(64, 48), frames=5, steps=3,
        device="cpu", dtype="fp32", solver="euler",
    )  # fmt: skip
    store.add(settings, validate=False)
    runner = PipelineRunner(tmp_path / "out", tmp_path / "previews")
    pngs = []

    def on_progress(p):
        if p.preview_path:
            with Image.open(p.preview_path) as img:
                pngs.append(np.asarray(img.convert("RGB")).copy())

    try:
        runner.run(store.claim_next("w"), on_progress, None)
    finally:
        runner.close()
    assert len(latents) == len(pngs) == 3 and frames == [1, 1, 1]  # 5 frames: 2 latent frames, the middle is 1
    linear = LATENT_SPACES["wan2.1"]
    weights, bias = np.array(linear.factors), np.array(linear.bias)
    for latent, index, png in zip(latents, frames, pngs, strict=True):
        frame = latent[:, index].double().numpy()  # [16, h, w]
        rgb = np.einsum("chw,cr->hwr", frame, weights) + bias
        expected = np.round((np.clip(rgb, -1, 1) + 1) * 127.5)
        factor = png.shape[0] // frame.shape[1]
        shown = png[::factor, ::factor].astype(np.float64)
        assert shown.shape == expected.shape
        assert np.abs(shown - expected).max() <= 1  # float32 vs float64 rounding at .5
    assert not np.array_equal(pngs[0], pngs[-1]), "the preview follows the denoising"


class _ExactX0:
    """A guidance that knows the clean latent: v = (x - x0) / sigma, so x - sigma * v = x0 at every step."""

    def __init__(self, x0: torch.Tensor, schedule) -> None:
        self.x0, self.schedule = x0, schedule
        self.conditioning = SimpleNamespace(impose=lambda latent: latent)

    def __call__(self, latent, timestep):
        index = int((self.schedule.timesteps == timestep).nonzero()[0, 0])
        sigma = float(self.schedule.sigmas[index])
        return (latent - self.x0) / sigma, "model", 1.0


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
def test_the_step_event_predicts_the_clean_latent(solver):
    """StepEvent.denoised() is x - sigma * v at the sigma the step is solved at: with a model that predicts the
    clean latent exactly, every step's prediction is that latent (while the noisy latent is not)."""
    schedule = make_schedule(solver, 5, 5.0)
    x0 = torch.randn(16, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    events = []
    noise = torch.randn(16, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    denoise(noise, schedule, make_solver(solver, schedule), _ExactX0(x0, schedule), on_step=events.append)
    assert len(events) == 5
    for event in events:
        torch.testing.assert_close(event.denoised(), x0, rtol=1e-5, atol=1e-5)
    assert (events[0].latent - x0).abs().max() > 0.1
