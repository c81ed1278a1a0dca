"""The set-up's log, .venv/install.log: decisions and step results, time-stamped."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

LOG_NAME = "install.log"


def append_log(venv: Path, lines: Sequence[str]) -> None:
    """Append time-stamped lines to .venv/install.log (silently skipped while .venv does not exist)."""
    if not venv.is_dir():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with (venv / LOG_NAME).open("a", encoding="utf-8") as fh:
        fh.writelines(f"{stamp} {line}\n" for line in lines)
