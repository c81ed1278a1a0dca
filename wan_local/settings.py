"""The app's own settings (output folder, model folder per task, device, port, LAN access), kept as JSON.

Where the file lives: `<home>/settings.json` when a home folder was chosen explicitly (app.py --home or
$WAN_LOCAL_HOME: a self-contained, "portable" install, and what tests use), else `settings.json` in the per-user
config folder (platformdirs user_config_dir("wan-local")).

Writes are atomic (temporary file, fsync, rename), so a crash or a full disk never leaves a half-written file.
A file that cannot be read is never overwritten silently: the app starts with defaults, says so, and the first
save moves the unreadable file aside to `settings.json.broken`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_local.errors import WanLocalError
from wan_local.specs import TASKS

log = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"
DEFAULT_PORT = 7860
DEVICES = ("auto", "cuda", "cpu")


class SettingsError(WanLocalError):
    """A settings file or value cannot be used; the message names the file or field and what is accepted."""


@dataclass(frozen=True)
class AppSettings:
    """What the user chose in the Settings tab. Invariants (checked by `validate`):

    output_dir: folder for new videos; None = `<home>/outputs` (the job store's folder).
    model_dirs: task name (a key of specs.TASKS) -> checkpoint folder of that task.
    model_files: task name -> role (`weights.inventory.PICKABLE`: high_noise, low_noise, model, text_encoder, vae)
        -> the file picked in the Models tab where the folder holds several candidates for that role. Jobs carry
        the picks that lie inside their folder (`model_choice`) to find_checkpoints.
    device: "auto" (CUDA when available), "cuda" or "cpu"; jobs run on it (CPU jobs run in float32).
    port: 1-65535, the first port tried (the next free one is used when it is taken); takes effect on restart.
    listen: False = only this computer can open the app (127.0.0.1); True = the local network too (0.0.0.0).
    """

    output_dir: str | None = None
    model_dirs: Mapping[str, str] = field(default_factory=dict)
    model_files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    device: str = "auto"
    port: int = DEFAULT_PORT
    listen: bool = False

    def validate(self) -> AppSettings:
        """Return self; raise SettingsError naming the first bad field and what it accepts."""
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise SettingsError(f"port {self.port!r} is not allowed; use a whole number from 1 to 65535")
        if not isinstance(self.listen, bool):
            raise SettingsError(f"listen {self.listen!r} is not allowed; use true or false")
        if self.device not in DEVICES:
            raise SettingsError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.output_dir is not None and (not isinstance(self.output_dir, str) or not self.output_dir.strip()):
            raise SettingsError(f"output_dir {self.output_dir!r} must be a folder path or null")
        for task, folder in self.model_dirs.items():
            if task not in TASKS:
                raise SettingsError(f"model_dirs has unknown task {task!r}; tasks are {', '.join(TASKS)}")
            if not isinstance(folder, str) or not folder.strip():
                raise SettingsError(f"model_dirs[{task!r}] = {folder!r} must be a folder path")
        from wan_local.weights.inventory import PICKABLE

        for task, picks in self.model_files.items():
            if task not in TASKS:
                raise SettingsError(f"model_files has unknown task {task!r}; tasks are {', '.join(TASKS)}")
            if not isinstance(picks, Mapping):
                raise SettingsError(f"model_files[{task!r}] must be an object of role -> file, got {picks!r}")
            for role, path in picks.items():
                if role not in PICKABLE:
                    raise SettingsError(
                        f"model_files[{task!r}] has unknown role {role!r}; roles are {', '.join(PICKABLE)}"
                    )
                if not isinstance(path, str) or not path.strip():
                    raise SettingsError(f"model_files[{task!r}][{role!r}] = {path!r} must be a file path")
        return self

    def model_dir(self, task: str) -> str | None:
        """The checkpoint folder set for `task`, or None."""
        return self.model_dirs.get(task) or None

    def with_model_dir(self, task: str, folder: str | None) -> AppSettings:
        """A copy with `task`'s model folder set (None or "" removes it)."""
        dirs = {k: v for k, v in self.model_dirs.items() if k != task}
        if folder:
            dirs[task] = str(folder)
        return dataclasses.replace(self, model_dirs=dirs)

    def model_choice(self, task: str, folder: str | Path | None = None) -> dict[str, str]:
        """The files picked for `task` (role -> path); with `folder`, only those inside it (a pick made for another
        folder does not apply)."""
        picks = dict(self.model_files.get(task) or {})
        if folder:
            root = Path(folder).expanduser().absolute()
            picks = {
                role: path for role, path in picks.items() if Path(path).expanduser().absolute().is_relative_to(root)
            }
        return picks

    def with_model_file(self, task: str, role: str, path: str | None) -> AppSettings:
        """A copy with `path` picked as `task`'s file for `role` (None or "" removes the pick)."""
        picks = {k: v for k, v in (self.model_files.get(task) or {}).items() if k != role}
        if path:
            picks[role] = str(path)
        files = {k: dict(v) for k, v in self.model_files.items() if k != task}
        if picks:
            files[task] = picks
        return dataclasses.replace(self, model_files=files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["model_dirs"] = dict(self.model_dirs)
        data["model_files"] = {task: dict(picks) for task, picks in self.model_files.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "settings") -> AppSettings:
        """Inverse of `to_dict`; unknown keys are ignored with a warning (a newer version may have written them).

        Raises SettingsError (naming `source`) for a value of the wrong kind.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring unknown setting(s) %s", source, ", ".join(unknown))
        values = {k: v for k, v in data.items() if k in known}
        dirs = values.get("model_dirs") or {}
        if not isinstance(dirs, Mapping):
            raise SettingsError(f"{source}: model_dirs must be an object of task -> folder, got {dirs!r}")
        values["model_dirs"] = dict(dirs)
        files = values.get("model_files") or {}
        if not isinstance(files, Mapping):
            raise SettingsError(f"{source}: model_files must be an object of task -> role -> file, got {files!r}")
        values["model_files"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in files.items()}
        try:
            return cls(**values).validate()
        except SettingsError as exc:
            raise SettingsError(f"{source}: {exc}") from exc


def settings_path(home: Path | str | None = None) -> Path:
    """`<home>/settings.json` for an explicitly chosen home folder, else the per-user config folder's file."""
    if home is not None:
        return Path(home).expanduser() / SETTINGS_NAME
    import platformdirs

    return Path(platformdirs.user_config_dir("wan-local", appauthor=False)) / SETTINGS_NAME


def videos_folder() -> Path:
    """Where new videos go, the folder the app's Gallery reads: the Settings tab's output folder, else
    `<data folder>/outputs` (the job store's). The settings are the app's own: `<$WAN_LOCAL_HOME>/settings.json`
    when that is set, else the per-user file; unreadable settings give the default folder, with a warning."""
    from wan_local import paths

    home = os.environ.get(paths.HOME_ENV)
    try:
        chosen = load_settings(settings_path(Path(home).expanduser() if home else None)).output_dir
    except SettingsError as exc:
        log.warning("%s; videos go to the default folder", exc)
        chosen = None
    return Path(chosen).expanduser() if chosen else paths.data_dir() / "outputs"


def load_settings(path: Path | str) -> AppSettings:
    """Read settings from `path`; a missing file gives the defaults. Raises SettingsError for an unreadable file."""
    path = Path(path)
    if not path.is_file():
        return AppSettings()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"the settings file {path} cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"the settings file {path} does not hold a JSON object")
    return AppSettings.from_dict(data, source=str(path))


def save_settings(settings: AppSettings, path: Path | str) -> Path:
    """Write `settings` to `path` atomically (tmp file + fsync + rename); return the path."""
    path = Path(path)
    settings.validate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(settings.to_dict(), out, indent=2, ensure_ascii=False, sort_keys=True)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot save the settings to {path}: {exc}; check that the folder is writable") from exc
    return path


class SettingsStore:
    """The current settings and where they are saved. `problem` is set when the file existed but could not be
    read; the app then runs on defaults, and `save` first moves the unreadable file aside."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.problem: str | None = None
        try:
            self.current = load_settings(self.path)
        except SettingsError as exc:
            self.problem = (
                f"{exc}. Using the defaults; saving the settings keeps the old file as {self.path.name}.broken"
            )
            log.warning("%s", self.problem)
            self.current = AppSettings()

    def save(self, settings: AppSettings) -> AppSettings:
        """Validate, persist and adopt `settings`; return them."""
        settings.validate()
        if self.problem is not None and self.path.is_file():
            os.replace(self.path, self.path.with_name(self.path.name + ".broken"))
        save_settings(settings, self.path)
        self.problem = None
        self.current = settings
        return settings

    def update(self, **changes: Any) -> AppSettings:
        """Save the current settings with `changes` (fields of AppSettings) applied."""
        return self.save(dataclasses.replace(self.current, **changes))
