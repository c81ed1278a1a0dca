"""Atomic file writes through a temp file named after its writer, so that what a killed writer left behind can be
told apart from a write in progress.

`atomic_write(path)` yields `.<stem>.w<pid>.<random><suffix>` in the target's folder (the same file system, so
the final `os.replace` is atomic) and replaces the target with it when the block ends without an error; on an
error the temp file is removed. A SIGKILL or a power loss skips that cleanup: `remove_orphans(folder)` deletes
the temp files whose writer process no longer runs, and is safe to call at any time from any process.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wan_local.processes import process_alive

log = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"^\..*\.w(?P<pid>\d+)\.[a-z0-9_]{8}(\.[^.]+)?$")
# Temp names of versions before the writer's pid was part of them (videos and previews of jobs, resume points):
# removed once older than LEGACY_AGE_S, by which time no write is still going on.
_LEGACY_NAME = re.compile(r"^(\.job\d+.*\.[a-z0-9_]{8}\.(mp4|png)|job\d+\.tmp)$")
LEGACY_AGE_S = 3600.0


@contextmanager
def atomic_write(
    path: Path, *, durable: bool = False, mode: int | None = 0o644, suffix: str | None = None
) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it replaces `path` (fsynced first when `durable`,
    given `mode` unless None: mkstemp makes files 0600). The temp name ends in `suffix` (default: the target's,
    which tools that pick the format by extension need)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.w{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file; the target is the one a user knows
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(folder: Path, *, now: float | None = None) -> list[Path]:
    """Delete the temp files of `atomic_write` in `folder` whose writer is gone; return what was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder yet, or unreadable: nothing of ours to remove
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        try:
            if match is not None:
                orphan = not process_alive(int(match["pid"]))
            else:
                orphan = _LEGACY_NAME.match(entry.name) is not None and now - entry.stat().st_mtime > LEGACY_AGE_S
            if orphan and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as exc:
            log.warning("cannot remove the leftover temp file %s: %s", entry.path, exc)
    if removed:
        log.info("removed %d temp file(s) of interrupted writes in %s", len(removed), folder)
    return removed
