"""Small poster frames of finished videos (the first frame, scaled down) for the Queue tab's strip of finished
jobs. Made once per video file (keyed by its path, size and mtime) into a folder the browser may fetch."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

#: The longest side of a poster, in pixels.
POSTER_SIZE = 160


def poster_path(video: Path | str, folder: Path | str, size: int = POSTER_SIZE) -> Path | None:
    """Where the poster of `video` goes (None when the video is gone): named by its path, size and mtime."""
    video = Path(video)
    try:
        stat = video.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{video.absolute()}|{stat.st_size}|{stat.st_mtime_ns}|{size}".encode()).hexdigest()[:20]
    return Path(folder) / f"poster_{key}.png"


def poster(video: Path | str, folder: Path | str, size: int = POSTER_SIZE) -> str | None:
    """The poster PNG of `video` in `folder` (made now if missing); None when the video cannot be read."""
    out = poster_path(video, folder, size)
    if out is None:
        return None
    if out.is_file():
        return str(out)
    import imageio_ffmpeg

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.png")  # renamed into place: a reader never sees half a file
    # ffmpeg decodes the first frame only and scales it (longest side `size`, never enlarged).
    scale = f"scale='min({size},iw)':'min({size},ih)':force_original_aspect_ratio=decrease"
    try:
        proc = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video), "-frames:v", "1",
             "-vf", scale, str(tmp)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            log.info("no poster for %s: %s", video, proc.stderr.strip()[-300:])
            return None
        os.replace(tmp, out)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("no poster for %s: %s", video, exc)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)
