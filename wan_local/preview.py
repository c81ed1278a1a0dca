"""Latent previews: one frame of a latent [C, T, h, w], mapped to RGB by a linear projection, as a PNG. The job
runner previews the middle latent frame of each step's clean-latent prediction (`StepEvent.denoised`: the noisy
latent itself is mostly noise in early steps, and ti2v image-to-video pins the first frame to the input image).

Colour previews use the published linear latent -> RGB factors of the two Wan latent spaces, a [C, 3] matrix and
an RGB bias applied to the normalized latent the DiT denoises (the latent mean/std already taken out), so that
`rgb = latent @ factors + bias` lands in [-1, 1]:

- "wan2.1": the 16-channel latent of the Wan2.1 VAE (t2v-A14B, i2v-A14B);
- "wan2.2": the 48-channel latent of the Wan2.2 VAE (ti2v-5B).

Source of the numbers: ComfyUI (github.com/Comfy-Org/ComfyUI, GPL-3.0), file comfy/latent_formats.py, classes
`Wan21` and `Wan22`, attributes `latent_rgb_factors` and `latent_rgb_factors_bias`, at commit
9a9a69fd745de98e89b0f1a629cd3bc43d513a42. Only the numbers are carried over (factual data: a fitted projection).

A latent of any other channel count gets a structure preview: the channels averaged in three contiguous groups and
stretched by their own mean and standard deviation (composition and motion, no true colours).

Cost: the clean-latent prediction is one latent-sized tensor made for the preview (A14B 832x480 81 frames: 8 MB;
1280x720: 19 MB; ti2v-5B 1280x704 121 frames: 21 MB; up to three alive at once while the pinned frame is
imposed) and freed after it. Only the previewed latent frame is made contiguous on the device (a [C, h, w] copy:
0.4 MB for A14B 832x480, 0.9 MB for 1280x720, 0.7 MB for ti2v-5B 1280x704) and copied to the CPU, where it is
projected; no model code is involved and no GPU memory of note is used. Measured on a shared 2-core CPU (noisy):
projection 1-18 ms, projection + nearest upscale + PNG 14 ms (A14B 832x480), 16 ms (ti2v-5B 1280x704), 75 ms
(A14B 1280x720), against denoise steps of seconds each on a GPU: under 1 % of a step, once per `preview_every`
steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wan_local.tempfiles import atomic_write

if TYPE_CHECKING:
    import torch

PREVIEW_LONG_SIDE = 320  # preview PNGs are upscaled (integer factor, nearest) to at least this long side


@dataclass(frozen=True)
class LinearFactors:
    """A linear latent -> RGB projection: `factors[c]` is channel c's (R, G, B) weight, `bias` the RGB offset;
    the result is in [-1, 1] for a typical latent."""

    latent_space: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]

    @property
    def channels(self) -> int:
        return len(self.factors)


# fmt: off
WAN21 = LinearFactors(
    "wan2.1",
    (
        (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
    ),
    (-0.1835, -0.0868, -0.3360),
)

WAN22 = LinearFactors(
    "wan2.2",
    (
        (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
        (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
        (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
        (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
        (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
        (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
        (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
        (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
        (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
        (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
        (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
        (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
    ),
    (0.0317, -0.0878, -0.1388),
)
# fmt: on

#: Linear factors by latent space name.
LATENT_SPACES: dict[str, LinearFactors] = {f.latent_space: f for f in (WAN21, WAN22)}


def factors_for(channels: int) -> LinearFactors | None:
    """The colour factors of a latent with `channels` channels (16: Wan2.1 VAE, 48: Wan2.2 VAE), else None."""
    return next((f for f in LATENT_SPACES.values() if f.channels == channels), None)


def latent_to_rgb(latent: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """Latent frame `frame` of a latent [C, T, h, w] -> uint8 RGB image [h, w, 3] (see the module docstring)."""
    import torch

    # [C, h, w]: only this frame leaves the device (contiguous first: a strided copy is slow on the CPU side)
    picked = latent[:, frame].detach().contiguous().to("cpu", torch.float32)
    linear = factors_for(picked.shape[0])
    if linear is not None:
        weights = torch.tensor(linear.factors, dtype=torch.float32)  # [C, 3]
        rgb = torch.einsum("chw,cr->rhw", picked, weights) + torch.tensor(linear.bias)[:, None, None]
    else:
        if picked.shape[0] >= 3:
            rgb = torch.stack([g.mean(0) for g in torch.tensor_split(picked, 3, dim=0)])
        else:
            rgb = picked.mean(0, keepdim=True).expand(3, -1, -1)
        rgb = (rgb - rgb.mean()) / (2.5 * rgb.std().clamp_min(1e-6))  # ±2.5 std -> [-1, 1]
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def write_preview(latent: torch.Tensor, path: Path, frame: int = 0) -> Path:
    """Write the preview of latent frame `frame` as a PNG, upscaled by nearest-neighbour, atomically (tmp file +
    replace)."""
    from PIL import Image

    image = latent_to_rgb(latent, frame).numpy()
    height, width = image.shape[:2]
    factor = max(1, -(-PREVIEW_LONG_SIDE // max(height, width)))
    picture = Image.fromarray(image).resize((width * factor, height * factor), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:  # 0644: the UI (maybe another user's web server) reads it
        picture.save(tmp, format="PNG")
    return path
