"""Per-task conditioning: the latent shape, the DiT's extra inputs and what is re-imposed after each step.

Tasks differ only here; the denoise loop is shared. Everything follows the official pipelines (fact sheet §6.7,
§6.8): I2V-A14B stretches the image (bicubic, no crop) to a grid derived from the area and the image's aspect and
conditions through `y`; TI2V-5B image-to-video resizes (LANCZOS) and centre-crops, pins latent frame 0 to the
image latent and gives its tokens timestep 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wan_local.errors import InputError

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""VAE encode: video [3, F, H, W] in [-1, 1] -> normalised latent [C, T, h, w]."""


@dataclass
class Conditioning:
    """What the denoise loop needs besides the noise.

    latent_shape: [C, T, h, w] of the noise / latent.
    y: extra DiT input channels concatenated after the latent (I2V-A14B), else None.
    first_frame: latent [C, 1, h, w] pinned as frame 0 after every step (TI2V image-to-video), else None; with
        `keep_mask` [C, T, h, w] (1 where the solver's latent is kept, 0 on frame 0).
    size: output video (width, height) in pixels.
    """

    latent_shape: tuple[int, int, int, int]
    size: tuple[int, int]
    y: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None

    def impose(self, latent: torch.Tensor) -> torch.Tensor:
        """Re-impose the pinned first frame: (1 - M) * z + M * latent (identity when nothing is pinned)."""
        if self.first_frame is None or self.keep_mask is None:
            return latent
        return (1.0 - self.keep_mask) * self.first_frame + self.keep_mask * latent

    def dit_timestep(self, t: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
        """The `t` the DiT receives: [1] for one value per sample, [1, L] when tokens differ (frame 0 at 0)."""
        if self.keep_mask is None:
            return t.reshape(1)
        pt, ph, pw = patch_size
        per_token = self.keep_mask[0, ::pt, ::ph, ::pw].flatten() * t
        return per_token.reshape(1, -1)


def latent_grid(frames: int, height: int, width: int, stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, h, w) of the latent of a `frames` x `height` x `width` video."""
    st, sh, sw = stride
    return (frames - 1) // st + 1, height // sh, width // sw


def text_to_video(z_dim: int, frames: int, size: tuple[int, int], stride: tuple[int, int, int]) -> Conditioning:
    """T2V-A14B and TI2V-5B without an image: pure noise of the requested size."""
    width, height = size
    t, h, w = latent_grid(frames, height, width, stride)
    return Conditioning(latent_shape=(z_dim, t, h, w), size=size)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W] in [-1, 1] (to_tensor, then (x - 0.5) / 0.5)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)
    return tensor.sub(0.5).div(0.5)


def i2v_a14b_grid(image_size: tuple[int, int], max_area: int, stride: int, patch: int) -> tuple[int, int]:
    """(lat_h, lat_w) of I2V-A14B: the image's aspect at area <= max_area, floored to whole patches.

    Uses the reference's float floor-divisions (sqrt(area * aspect) // stride // patch * patch), which is why a
    16:9 image at 832*480 gives 464 pixel rows, not 480.
    """
    width, height = image_size
    aspect = height / width
    lat_h = round(np.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(f"image {width}x{height} is too elongated for an area of {max_area} pixels")
    return int(lat_h), int(lat_w)


def i2v_a14b(
    image: Image.Image,
    frames: int,
    max_area: int,
    stride: tuple[int, int, int],
    patch: tuple[int, int, int],
    encode: Encoder,
) -> Conditioning:
    """I2V-A14B: y = [mask (4 channels); VAE latent of (stretched image, F-1 grey frames)]."""
    st, sh, sw = stride
    lat_h, lat_w = i2v_a14b_grid(image.size, max_area, sh, patch[1])
    height, width = lat_h * sh, lat_w * sw
    pixels = image_to_tensor(image)
    resized = F.interpolate(pixels[None], size=(height, width), mode="bicubic")[0]  # CPU fp32, no antialias
    video = torch.cat([resized[:, None], resized.new_zeros(3, frames - 1, height, width)], dim=1)
    latent = encode(video)
    t = latent.shape[1]
    # Mask: 1 on the image frame, repeated st times so that frames group into latent frames; 0 elsewhere.
    mask = torch.zeros(st * t, lat_h, lat_w, dtype=latent.dtype, device=latent.device)
    mask[:st] = 1
    mask = mask.view(t, st, lat_h, lat_w).transpose(0, 1)
    y = torch.cat([mask, latent])
    return Conditioning(latent_shape=(latent.shape[0], t, lat_h, lat_w), size=(width, height), y=y)


def ti2v_size(image_size: tuple[int, int], max_area: int, multiple: int) -> tuple[int, int]:
    """Output (width, height) of TI2V-5B image-to-video: multiples of `multiple`, area <= max_area, the image's
    aspect as closely as the two candidate roundings allow (ties go to the height-first candidate)."""
    iw, ih = image_size
    ratio = iw / ih
    ow_f = math.sqrt(max_area * ratio)
    oh_f = max_area / ow_f
    ow1 = int(ow_f // multiple * multiple)
    oh1 = int(max_area / ow1 // multiple * multiple) if ow1 else 0
    oh2 = int(oh_f // multiple * multiple)
    ow2 = int(max_area / oh2 // multiple * multiple) if oh2 else 0
    candidates = [(w, h) for w, h in ((ow1, oh1), (ow2, oh2)) if w > 0 and h > 0]
    if not candidates:
        raise InputError(f"image {iw}x{ih} is too elongated for an area of {max_area} pixels")

    def deviation(wh: tuple[int, int]) -> float:
        r = wh[0] / wh[1]
        return max(r / ratio, ratio / r)

    if len(candidates) == 1:
        return candidates[0]
    a, b = candidates
    return a if deviation(a) < deviation(b) else b


def ti2v_image(
    image: Image.Image,
    frames: int,
    max_area: int,
    stride: tuple[int, int, int],
    multiple: int,
    encode: Encoder,
) -> tuple[Conditioning, torch.Tensor]:
    """TI2V-5B image-to-video: (conditioning, the cropped image tensor [3, 1, H, W])."""
    ow, oh = ti2v_size(image.size, max_area, multiple)
    iw, ih = image.size
    scale = max(ow / iw, oh / ih)
    resized = image.convert("RGB").resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    left, top = (resized.width - ow) // 2, (resized.height - oh) // 2
    cropped = resized.crop((left, top, left + ow, top + oh))
    pixels = image_to_tensor(cropped)[:, None]  # [3, 1, H, W]
    z = encode(pixels)  # [C, 1, h, w]
    t, h, w = latent_grid(frames, oh, ow, stride)
    keep = torch.ones(z.shape[0], t, h, w, dtype=z.dtype, device=z.device)
    keep[:, 0] = 0
    cond = Conditioning(latent_shape=(z.shape[0], t, h, w), size=(ow, oh), first_frame=z, keep_mask=keep)
    return cond, pixels
