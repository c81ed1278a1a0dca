"""Per-task conditioning: output sizes from the fact sheet's worked examples, masks and re-imposition."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2
from PIL import Image

from wan_local.errors import InputError
from wan_local.sampling import conditioning as cond
from wan_local.specs import I2V_A14B, TI2V_5B
from wan_local.video import load_image
from wan_local.weights.loading import load_vae

AREA_720P = 1280 * 720
AREA_480P = 832 * 480
AREA_5B = 1280 * 704


@pytest.mark.parametrize(
    ("image", "area", "pixels"),
    [
        ((1280, 720), AREA_720P, (1280, 720)),
        ((1280, 720), AREA_480P, (832, 464)),  # not 480: the reference floors to whole patches
        ((1024, 768), AREA_720P, (1104, 816)),
        ((1000, 1000), AREA_720P, (960, 960)),
        ((832, 480), AREA_720P, (1248, 720)),
    ],
)
def test_i2v_a14b_grid_matches_reference_examples(image, area, pixels):
    lat_h, lat_w = cond.i2v_a14b_grid(image, area, stride=8, patch=2)
    assert (lat_w * 8, lat_h * 8) == pixels


@pytest.mark.parametrize(
    ("image", "size"),
    [
        ((1280, 720), (1248, 704)),
        ((1920, 1080), (1248, 704)),
        ((720, 1280), (704, 1248)),
        ((1024, 768), (1088, 800)),
        ((1000, 1000), (960, 928)),
        ((832, 480), (1248, 704)),
    ],
)
def test_ti2v_size_matches_reference_examples(image, size):
    assert cond.ti2v_size(image, AREA_5B, 32) == size


def test_i2v_a14b_conditioning_matches_golden(tiny, golden, cases):
    gold = golden("i2v_a14b_unipc")
    vae = load_vae(tiny / "i2v-A14B" / "Wan2.1_VAE.pth", "wan2.1")
    image = load_image(tiny / "golden" / "i2v_input.png")
    seen = {}

    def encode(video):
        seen["video"] = video
        with torch.no_grad():
            return vae.encode(video[None])[0]

    c = cond.i2v_a14b(image, 5, cases["i2v_a14b_unipc"]["args"]["max_area"], (4, 8, 8), (1, 2, 2), encode)
    assert rel_l2(seen["video"][:, 0], gold["image_resized"]) <= 1e-6
    assert torch.equal(seen["video"][:, 1:], torch.zeros_like(seen["video"][:, 1:]))
    assert c.latent_shape == tuple(gold["noise"].shape)
    assert torch.equal(c.y[:4], gold["y"][:4]), "mask channels"
    assert rel_l2(c.y[4:], gold["image_latent"]) <= 1e-5
    assert c.impose(gold["noise"]) is gold["noise"], "I2V-A14B re-imposes nothing"
    assert c.dit_timestep(torch.tensor(900.0), (1, 2, 2)).shape == (1,)


def test_ti2v_image_conditioning_matches_golden(tiny, golden, cases):
    gold = golden("ti2v_5b_i2v")
    vae = load_vae(tiny / "ti2v-5B" / "Wan2.2_VAE.pth", "wan2.2")
    image = load_image(tiny / "golden" / "ti2v_input.png")

    def encode(video):
        with torch.no_grad():
            return vae.encode(video[None])[0]

    c, pixels = cond.ti2v_image(image, 5, cases["ti2v_5b_i2v"]["args"]["max_area"], (4, 16, 16), 32, encode)
    assert rel_l2(pixels, gold["image_tensor"]) <= 1e-6
    assert rel_l2(c.first_frame, gold["image_latent"]) <= 1e-5
    latent = c.impose(gold["noise"])
    assert torch.equal(latent[:, 0:1], c.first_frame)
    assert torch.equal(latent[:, 1:], gold["noise"][:, 1:])
    t = c.dit_timestep(torch.tensor(750.0), (1, 2, 2))
    assert torch.equal(t, gold["dit_timestep"][0] / gold["timesteps"][0] * 750)


def test_text_to_video_shape():
    c = cond.text_to_video(48, 121, (1280, 704), TI2V_5B.vae_stride)
    assert c.latent_shape == (48, 31, 44, 80)
    c = cond.text_to_video(16, 81, (832, 480), I2V_A14B.vae_stride)
    assert c.latent_shape == (16, 21, 60, 104)


def test_elongated_image_is_refused():
    with pytest.raises(InputError, match="too elongated"):
        cond.i2v_a14b_grid((4000, 10), 64 * 48, stride=8, patch=2)
    with pytest.raises(InputError, match="too elongated"):
        cond.ti2v_size((4000, 10), 64 * 64, 32)


def test_image_to_tensor_range():
    img = Image.new("RGB", (4, 2), (255, 0, 128))
    t = cond.image_to_tensor(img)
    assert t.shape == (3, 2, 4)
    assert t[0].eq(1).all() and t[1].eq(-1).all()
    assert abs(float(t[2, 0, 0]) - (128 / 255 - 0.5) / 0.5) < 1e-7
