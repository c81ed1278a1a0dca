"""Where wan-local keeps its files, outside the project folder so updates never touch them.

With $WAN_LOCAL_HOME set (a portable install, and what tests use) everything lives under that one folder;
otherwise the per-user folders of the OS (platformdirs): data (queue, inputs, videos), config (settings, user
presets) and cache (prompt embeddings, quantized weights — safe to delete).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "WAN_LOCAL_HOME"
APP = "wan-local"


def _home() -> Path | None:
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else None


def data_dir() -> Path:
    """The job queue, its input images, previews and (by default) the finished videos."""
    import platformdirs

    return _home() or Path(platformdirs.user_data_dir(APP, appauthor=False))


def config_dir() -> Path:
    """settings.json and user presets."""
    import platformdirs

    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """Prompt embeddings and quantized weights: rebuilt when missing."""
    import platformdirs

    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP, appauthor=False))
