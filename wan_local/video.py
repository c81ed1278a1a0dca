"""Media I/O: input images, MP4 output with the generation settings embedded, and reading them back.

MP4s are written with the ffmpeg binary that imageio-ffmpeg ships (libx264, CRF 10, yuv420p — the reference's
`quality=8`), to a temporary file that replaces the target only once complete (`wan_local.tempfiles`), so a full
disk or a crash never leaves a half-written video under the final name. The settings travel as JSON in the MP4
`comment` tag.
"""

from __future__ import annotations

import json
import logging
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from wan_local.errors import InputError, WanLocalError
from wan_local.tempfiles import atomic_write

log = logging.getLogger(__name__)

METADATA_PREFIX = "wan-local:"
CRF = 10  # the reference's imageio quality=8
#: Largest input image accepted (pixels): 64 MP, far above any video size, far below a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: Path) -> Image.Image:
    """Open an image file as RGB; a missing, unreadable or broken file raises InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"image {path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS // 10**6} "
                        "megapixels accepted; scale it down (the video is at most 1280x720 anyway)"
                    )
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image {path} is too large to open safely ({exc}); scale it down") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"image {path} cannot be read ({exc}); use a PNG, JPEG or WebP file") from exc


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]: clamp, (x + 1) / 2 * 255, truncated as the reference."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W], got {tuple(video.shape)}")
    scaled = video.detach().float().clamp(-1, 1).add(1).div(2).mul(255)
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def save_video(video: torch.Tensor, path: Path, fps: int, settings: Mapping[str, Any] | None = None) -> Path:
    """Encode `video` ([3, F, H, W] in [-1, 1]) as H.264 MP4 at `fps`, with `settings` embedded; return the path."""
    frames = to_uint8_frames(video)
    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise InputError(f"video size {width}x{height} must be even for yuv420p")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = METADATA_PREFIX + json.dumps(dict(settings or {}), ensure_ascii=False, sort_keys=True)
    with atomic_write(path) as tmp:
        cmd = [
            _ffmpeg(), "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
            "-an", "-c:v", "libx264", "-crf", str(CRF), "-pix_fmt", "yuv420p",
            "-metadata", f"comment={comment}",
            str(tmp),
        ]  # fmt: skip
        proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, check=False)
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip().splitlines()
            raise WanLocalError(
                f"writing {path} failed: {message[-1] if message else 'ffmpeg exited with ' + str(proc.returncode)}"
                " (is the disk full or the folder read-only?)"
            )
    log.info("saved %d frames %dx%d at %d fps to %s", count, width, height, fps, path)
    return path


def _unescape_ffmetadata(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings embedded by `save_video`, or None for an MP4 without them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video {path} does not exist")
    proc = subprocess.run(
        [_ffmpeg(), "-loglevel", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise InputError(f"cannot read {path}: {proc.stderr.decode(errors='replace').strip()}")
    text = proc.stdout.decode("utf-8", errors="replace")
    # ffmetadata escapes '=', ';', '#', '\' and newlines with a backslash; a value may span escaped newlines.
    lines = text.split("\n")
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\") and not joined[-1].endswith("\\\\"):
            joined[-1] = joined[-1][:-1] + "\n" + line
        else:
            joined.append(line)
    for line in joined:
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "comment":
            value = _unescape_ffmetadata(value)
            if value.startswith(METADATA_PREFIX):
                try:
                    return json.loads(value[len(METADATA_PREFIX) :])
                except json.JSONDecodeError:
                    return None
    return None


def read_frames(path: Path) -> np.ndarray:
    """Decode an MP4 to uint8 [F, H, W, 3] (used by tests and the gallery)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames)
