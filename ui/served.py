"""What the browser may fetch: the served-files policy of the app.

Gradio serves a file at `/gradio_api/file=<path>` (and the older `/file=<path>`, `/gradio_api/file/<path>`) when
the path lies in the `allowed_paths` given to launch() or in Gradio's own upload and cache folders, and it copies a
file a handler returns into its cache under the same rule. Those lists are fixed at launch, so the policy lives
here and is enforced as it is *now* on every request:

- `ServedFiles` names what is served: the output folder of the current settings and the previews folder, rebuilt
  (never extended) whenever the settings change, plus a few single media files the UI itself chose to show (a
  gallery video from an earlier output folder, the input image of a job being edited). The two lists it hands to
  launch() change in place, so Gradio's own check (and its copy of handler outputs) follows the policy too.
- `ServedFilesGuard`, an ASGI middleware in front of every file route, answers 403 for any path outside the
  policy, and always for the job queue's database and the settings file, whatever Gradio would allow.
- `output_folder_refusal` says why an output folder would expose more than videos (see its docstring); the
  Settings tab refuses such a folder and `ServedFiles.rebuild` never serves one read from a settings file.

Nothing here imports Gradio at module level.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_local import paths

log = logging.getLogger(__name__)

#: The file routes of Gradio (after the app's root path): everything after the prefix is a file path.
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
#: Single files the UI may show besides the served folders: videos and input images only.
MEDIA_SUFFIXES = frozenset({".mp4", ".webm", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_SHOWN_FILES = 32
#: Files next to the database that hold its live state (SQLite's write-ahead log and shared memory).
DB_SIDECARS = ("-wal", "-shm", "-journal")


def real_path(path: Path | str) -> Path:
    """`path` absolute, with `~` expanded and symlinks resolved (what a request for it would really read)."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def is_within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or inside it (both real paths; case-insensitive where the OS is)."""
    p, f = os.path.normcase(str(path)), os.path.normcase(str(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class PrivatePaths:
    """What is never served. data_dir: the queue's folder (database, inputs, previews, worker log); database and
    settings_file: the files the app keeps its state in; app_dirs: wan-local's own config and cache folders;
    home: the user's home folder. All real paths."""

    data_dir: Path
    database: Path
    settings_file: Path
    app_dirs: tuple[Path, ...]
    home: Path

    @classmethod
    def of(cls, database: Path | str, settings_file: Path | str) -> PrivatePaths:
        """The private paths of an app whose queue is `database` and whose settings are `settings_file`."""
        database, settings_file = real_path(database), real_path(settings_file)
        app_dirs = {real_path(paths.config_dir()), real_path(paths.cache_dir())}
        if settings_file.parent != database.parent:  # a per-user config folder, not the portable home
            app_dirs.add(settings_file.parent)
        return cls(database.parent, database, settings_file, tuple(sorted(app_dirs)), real_path(Path.home()))

    def files(self) -> tuple[Path, ...]:
        """The state files: the database with its live sidecars, the settings file and its kept broken copy."""
        db = str(self.database)
        broken = self.settings_file.with_name(self.settings_file.name + ".broken")
        return (self.database, *(Path(db + s) for s in DB_SIDECARS), self.settings_file, broken)

    def holds(self, path: Path) -> bool:
        """Whether the real path `path` is a state file or lies in wan-local's config or cache folder."""
        return any(is_within(path, f) for f in self.files()) or any(is_within(path, d) for d in self.app_dirs)


def output_folder_refusal(folder: Path | str, private: PrivatePaths) -> str | None:
    """Why serving `folder` as the output folder would expose more than videos, or None when it may be served.

    Refused: the root of the file system; the home folder or a folder holding it; a folder holding the queue's
    data folder (its database) or the settings file; wan-local's config or cache folder or a folder in them; a
    hidden folder of the home (`.ssh`, `.config`, ...: keys and settings live there) unless it is inside the data
    folder (the default data folder itself is hidden on Linux).
    """
    path = real_path(folder)
    if path.parent == path:
        return "it is the root of the file system, so every file on this computer could be downloaded"
    if is_within(private.home, path):
        return f"it is or holds your home folder ({private.home}), so all your files could be downloaded"
    for what, target in (("job queue's folder", private.data_dir), ("settings file", private.settings_file)):
        if is_within(target, path):
            return f"it holds wan-local's {what} ({target}), which must never be served"
    for app_dir in private.app_dirs:
        if is_within(path, app_dir) or is_within(app_dir, path):
            return f"it is or holds wan-local's own folder {app_dir}, which must never be served"
    if is_within(path, private.home) and not is_within(path, private.data_dir):
        hidden = [part for part in path.relative_to(private.home).parts if part.startswith(".")]
        if hidden:
            return f"it is a hidden folder of your home ({hidden[0]}), where keys and settings live"
    return None


class ServedFiles:
    """The folders (and a few single files) Gradio may serve now. `allowed_paths` and `blocked_paths` are the
    lists to pass to launch(); they change in place, under a lock, and never hold a private path."""

    def __init__(self, private: PrivatePaths, previews_dir: Path | str) -> None:
        self.private = private
        self.previews_dir = real_path(previews_dir)
        self.allowed_paths: list[str] = [str(self.previews_dir)]
        self.blocked_paths: list[str] = [str(f) for f in private.files()]
        self._folders: list[str] = [str(self.previews_dir)]
        self._shown: list[str] = []
        self._lock = threading.Lock()

    def rebuild(self, output_dir: Path | str) -> str | None:
        """Serve `output_dir` and the previews folder and nothing else (single files shown before included);
        return why `output_dir` is not served (None: it is)."""
        reason = output_folder_refusal(output_dir, self.private)
        if reason is not None:
            log.warning("not serving the output folder %s to the browser: %s", output_dir, reason)
        folders = [self.previews_dir] if reason else [real_path(output_dir), self.previews_dir]
        with self._lock:
            self._folders = list(dict.fromkeys(str(f) for f in folders))
            self._shown.clear()
            self.allowed_paths[:] = self._folders
        return reason

    def show(self, path: Path | str) -> bool:
        """Let the browser see the single media file `path` (a gallery video from an earlier output folder, the
        input image of an edited job); False (nothing changes) for a missing, private or non-media file."""
        real = real_path(path)
        if real.suffix.lower() not in MEDIA_SUFFIXES or not real.is_file() or self.private.holds(real):
            log.info("not showing %s: not a video or image wan-local may serve", path)
            return False
        with self._lock:
            if not any(is_within(real, Path(root)) for root in self.allowed_paths):
                self._shown = [*[s for s in self._shown if s != str(real)], str(real)][-MAX_SHOWN_FILES:]
                self.allowed_paths[:] = [*self._folders, *self._shown]
        return True

    def serves(self, path: Path | str, also: Iterable[Path | str] = ()) -> bool:
        """Whether a request for `path` may be answered: inside a served folder (or one of `also`, Gradio's own
        upload and cache folders) and not private."""
        real = real_path(path)
        if self.private.holds(real):
            return False
        with self._lock:
            roots = [*self.allowed_paths, *also]
        return any(is_within(real, real_path(root)) for root in roots)


class ServedFilesGuard:
    """ASGI middleware: a request on one of Gradio's file routes for a path the policy does not serve is answered
    403 before Gradio sees it. `gradio_dirs` are Gradio's upload and cache folders (its copies of uploads and of
    handler outputs), served as well."""

    def __init__(self, app: Any, served: ServedFiles, gradio_dirs: Sequence[Path | str] = ()) -> None:
        self.app = app
        self.served = served
        self.gradio_dirs = tuple(gradio_dirs)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        target = file_route_target(scope) if scope.get("type") == "http" else None
        if target is not None and not self.served.serves(target, self.gradio_dirs):
            log.info("refused a request for the file %s: not served by wan-local", target)
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"This file is not served by wan-local.\n"})
            return
        await self.app(scope, receive, send)


def file_route_target(scope: dict[str, Any]) -> str | None:
    """The file path an HTTP request on a Gradio file route asks for, or None for any other route."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    for prefix in FILE_ROUTES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return None


def gradio_folders() -> tuple[Path, ...]:
    """Gradio's upload and cache folders (real paths): where uploads land and handler outputs are copied."""
    from gradio.utils import get_cache_folder, get_upload_folder

    return real_path(get_upload_folder()), real_path(get_cache_folder())


def uploaded_source(path: Path | str, name: str | None = None) -> str | None:
    """Where an uploaded file came from, "<its name> (uploaded)", when `path` lies in Gradio's upload or cache
    folder (name: the name it had on the user's computer, else the file's own name, which Gradio keeps); None for
    any other path. The temporary path itself says nothing once Gradio clears its cache."""
    real = real_path(path)
    if not any(is_within(real, folder) for folder in gradio_folders()):
        return None
    return f"{Path(name).name if name else real.name} (uploaded)"


def guard_middleware(served: ServedFiles) -> Any:
    """The entry for launch(app_kwargs={"middleware": [...]}): ServedFilesGuard with Gradio's own folders."""
    from gradio.utils import get_cache_folder, get_upload_folder
    from starlette.middleware import Middleware

    return Middleware(ServedFilesGuard, served=served, gradio_dirs=(get_upload_folder(), get_cache_folder()))
