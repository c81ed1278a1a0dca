"""The Models tab's backend: where each task's checkpoint folder is, whether it is complete, and downloads.

Completeness is `weights.layout.find_checkpoints` (any of the three layouts: official, diffusers, ComfyUI). A
download fetches one variant of `models_catalog`: the official repository (`OFFICIAL_REPOS`) with
`huggingface_hub.snapshot_download`, or the single files of a repackaged / GGUF variant, hash-checked, with
`variant_download`; both resume where an interrupted one stopped. Before any byte is fetched the total size is
listed (`repo_size`, `variant_download.list_variant`) and the free disk checked (`plan_download`, `plan_variant`),
refusing with the numbers when it is short.
Downloads run in a background thread (`DownloadManager`) and report progress as bytes on disk, so the UI never
waits on the network. Without internet (or with HF_HUB_OFFLINE=1) every error says what is missing and how to
get it on another computer.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_local.errors import CheckpointError, WanLocalError
from wan_local.machine import GIB
from wan_local.models_catalog import OFFICIAL_REPOS, get_variant
from wan_local.specs import get_task

log = logging.getLogger(__name__)

#: Kept free on the target disk beyond the download itself (the OS, temporary files, videos).
DISK_MARGIN_BYTES = 2 * GIB
_HUB_CACHE = Path(".cache") / "huggingface"  # snapshot_download's bookkeeping inside the target folder


class DownloadError(WanLocalError):
    """A model download cannot start or failed; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class FolderStatus:
    """Whether `folder` holds everything `task` needs. layout: "official" / "diffusers" / "comfyui" when complete;
    message: one line for the UI (what is there, or what is missing and where to get it)."""

    task: str
    folder: str | None
    complete: bool
    layout: str | None
    message: str


def folder_status(task: str, folder: Path | str | None, choice: Mapping[str, str] | None = None) -> FolderStatus:
    """Check `folder` for `task` with find_checkpoints (choice: role -> picked file); never raises for a missing,
    incomplete or ambiguous folder."""
    from wan_local.weights.layout import find_checkpoints

    spec = get_task(task)
    repo = OFFICIAL_REPOS[spec.name]
    if not folder or not str(folder).strip():
        return FolderStatus(
            spec.name, None, False, None, f"No model folder set for {spec.name}: download {repo} or choose a folder."
        )
    path = Path(folder).expanduser()
    try:
        found = find_checkpoints(path, spec, choice)
    except CheckpointError as exc:
        return FolderStatus(spec.name, str(path), False, None, str(exc))
    return FolderStatus(spec.name, str(path), True, found.format, f"Complete ({found.format} layout): {path}")


def default_download_dir(home: Path | str, task: str, variant: str = "official") -> Path:
    """Where a download of `task` goes unless the user picks a folder: <home>/models/<repository name>, with the
    variant's name appended for the non-official ones (e.g. Wan2.2-T2V-A14B-comfy-fp8_scaled)."""
    return Path(home) / "models" / get_variant(get_task(task).name, variant).folder_name()


# ---------------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class RepoSize:
    """The files of a repository (path -> bytes) and their total."""

    repo_id: str
    files: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes."""
        return sum(self.files.values())


@dataclass(frozen=True)
class DownloadPlan:
    """What a download into `target` needs: bytes still to fetch (files not yet complete there) plus the margin,
    against the free space of the target's disk. `ok` False means refused; `message` says why, with numbers."""

    repo_id: str
    target: str
    total_bytes: int
    present_bytes: int
    needed_bytes: int
    free_bytes: int
    ok: bool
    message: str
    files: dict[str, int] = field(default_factory=dict)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub cannot be reached" for the installed huggingface_hub (httpx, httpx2 or
    requests underneath, depending on its version)."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, ConnectionError]
    found += [errors.HfHubHTTPError, TimeoutError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def offline_enabled() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def unreachable_message(task: str, target: Path | str | None, exc: BaseException | None, total_bytes: int = 0) -> str:
    """What to tell a user whose download cannot reach the Hub: why, what the folder lacks, and how to get it."""
    spec = get_task(task)
    repo = OFFICIAL_REPOS[spec.name]
    if offline_enabled():
        why = "offline mode is on (HF_HUB_OFFLINE=1; unset it to allow downloads)"
    else:
        detail = f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if exc else ""
        why = f"huggingface.co cannot be reached{detail}"
    status = folder_status(spec.name, target) if target else None
    lacks = status.message if status and not status.complete else f"{spec.name} needs the files of {repo}."
    size = f" (about {_gb(total_bytes)})" if total_bytes else ""
    name = repo.split("/", 1)[1]
    return (
        f"Cannot download {repo}: {why}. {lacks} To get it: on a computer with internet run "
        f"`hf download {repo} --local-dir {name}`{size} (or download the files from https://huggingface.co/{repo}), "
        "copy that folder to this computer and choose it with 'Use this folder'; or connect this computer and press "
        "Download again (it resumes where it stopped)."
    )


def repo_size(repo_id: str, api: Any = None, timeout_s: float = 20.0) -> RepoSize:
    """List the files of `repo_id` with their sizes (HfApi.model_info with file metadata, else list_repo_tree).

    Raises DownloadError when the Hub cannot be reached or does not know the repository.
    """
    from huggingface_hub import HfApi, errors

    api = api if api is not None else HfApi()
    try:
        info = api.model_info(repo_id, files_metadata=True, timeout=timeout_s)
        files = {s.rfilename: s.size for s in (info.siblings or [])}
        if not files or any(size is None for size in files.values()):
            tree = api.list_repo_tree(repo_id, recursive=True)
            files = {f.path: f.size for f in tree if getattr(f, "size", None) is not None and hasattr(f, "blob_id")}
    except errors.RepositoryNotFoundError as exc:
        raise DownloadError(f"{repo_id} is not a repository the Hub knows ({exc})") from exc
    except network_errors() as exc:
        task = next((t for t, r in OFFICIAL_REPOS.items() if r == repo_id), None)
        if task is None:
            raise DownloadError(f"cannot list {repo_id}: {exc}") from exc
        raise DownloadError(unreachable_message(task, None, exc)) from exc
    return RepoSize(repo_id, {path: int(size) for path, size in files.items()})


def existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def present_bytes(target: Path | str, files: dict[str, int]) -> int:
    """Bytes of `files` already complete in `target` (a file counts when its size matches)."""
    root = Path(target)
    done = 0
    for name, size in files.items():
        path = root / name
        if path.is_file() and path.stat().st_size == size:
            done += size
    return done


def _partial_bytes(target: Path) -> int:
    """Bytes of the files snapshot_download is still writing (<target>/.cache/huggingface/**/*.incomplete)."""
    cache = target / _HUB_CACHE
    if not cache.is_dir():
        return 0
    total = 0
    for path in cache.rglob("*.incomplete"):
        try:
            total += path.stat().st_size
        except OSError:  # finished and renamed between listing and stat
            continue
    return total


def plan_download(
    task: str,
    target: Path | str,
    *,
    api: Any = None,
    disk_free: Callable[[Path], int] | None = None,
    margin_bytes: int = DISK_MARGIN_BYTES,
) -> DownloadPlan:
    """List the repository of `task` and check the target's disk; `ok` False (with the numbers) when it is short.

    disk_free(path) -> free bytes of the disk holding `path` (default shutil.disk_usage). Raises DownloadError
    when the Hub cannot be reached.
    """
    repo = OFFICIAL_REPOS[get_task(task).name]
    target = Path(target).expanduser()
    size = repo_size(repo, api)
    present = present_bytes(target, size.files)
    needed = max(0, size.total_bytes - present)
    where = existing_ancestor(target)
    free = disk_free(where) if disk_free is not None else shutil.disk_usage(where).free
    already = f"; {_gb(present)} already there" if present else ""
    if needed == 0:
        message = f"{repo} ({_gb(size.total_bytes)}, {len(size.files)} files) is already complete in {target}."
        return DownloadPlan(repo, str(target), size.total_bytes, present, 0, free, True, message, size.files)
    ok = needed + margin_bytes <= free
    if ok:
        message = (
            f"{repo}: {_gb(size.total_bytes)} in {len(size.files)} files{already}; {_gb(needed)} to fetch, "
            f"{_gb(free)} free on the disk of {where}."
        )
    else:
        message = (
            f"Not enough disk space for {repo}: {_gb(needed)} still to fetch (of {_gb(size.total_bytes)}{already}) "
            f"plus {_gb(margin_bytes)} kept free, but only {_gb(free)} is free on the disk of {where}. Free "
            f"{_gb(needed + margin_bytes - free)} or choose a folder on another disk."
        )
    return DownloadPlan(repo, str(target), size.total_bytes, present, needed, free, ok, message, size.files)


# ---------------------------------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class DownloadStatus:
    """A snapshot of one task's download. state: "idle", "checking", "downloading", "done", "failed", "refused".
    done_bytes counts complete files plus partial ones on disk; total_bytes is 0 until the size is known."""

    task: str
    state: str = "idle"
    target: str | None = None
    total_bytes: int = 0
    done_bytes: int = 0
    message: str = ""
    started_at: float | None = None
    variant: str = "official"

    @property
    def active(self) -> bool:
        """True while the size check or the download runs."""
        return self.state in ("checking", "downloading")

    def describe(self) -> str:
        """One line for the UI."""
        if self.state == "downloading" and self.total_bytes:
            pct = 100.0 * self.done_bytes / self.total_bytes
            rate = ""
            if self.started_at and time.time() > self.started_at + 1:
                rate = f", {_gb(self.done_bytes / (time.time() - self.started_at))}/s since start"
            return (
                f"Downloading into {self.target}: {_gb(self.done_bytes)} of {_gb(self.total_bytes)} ({pct:.0f} %{rate})"
            )
        return self.message or self.state


Downloader = Callable[..., Any]


class DownloadManager:
    """Runs at most one download per task, each in a daemon thread; `status(task)` is safe from any thread.

    api: an HfApi-like object (model_info / list_repo_tree / get_paths_info); downloader: snapshot_download-like
    callable (the official repositories); file_downloader: hf_hub_download-like (the other variants); all default
    to huggingface_hub's. on_done(task, folder) is called once a download finished and the folder is complete
    (the UI saves it as the task's model folder, and the variant's files as its picks).
    """

    def __init__(
        self,
        *,
        api: Any = None,
        downloader: Downloader | None = None,
        disk_free: Callable[[Path], int] | None = None,
        on_done: Callable[[str, Path], None] | None = None,
        file_downloader: Downloader | None = None,
    ) -> None:
        self._api = api
        self._downloader = downloader
        self._file_downloader = file_downloader
        self._disk_free = disk_free
        self.on_done = on_done
        self._lock = threading.Lock()
        self._status: dict[str, DownloadStatus] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._files: dict[str, dict[str, int]] = {}

    def status(self, task: str) -> DownloadStatus:
        """The current state of `task`'s download (with fresh byte counts while it runs)."""
        name = get_task(task).name
        with self._lock:
            status = self._status.get(name, DownloadStatus(name))
            files = self._files.get(name)
        if status.state == "downloading" and files and status.target:
            target = Path(status.target)
            done = present_bytes(target, files) + _partial_bytes(target)
            status = replace(status, done_bytes=min(done, status.total_bytes))
        return status

    def statuses(self, tasks: Iterable[str]) -> list[DownloadStatus]:
        """`status` of each task."""
        return [self.status(t) for t in tasks]

    def start(self, task: str, target: Path | str, variant: str = "official") -> DownloadStatus:
        """Start downloading `variant` of `task` into `target` in the background (no-op if one is running)."""
        name = get_task(task).name
        chosen = get_variant(name, variant)
        target = Path(target).expanduser()
        with self._lock:
            current = self._status.get(name)
            if current is not None and current.active:
                return current
            checking = f"Checking the size of {chosen.label}..."
            status = DownloadStatus(name, "checking", str(target), message=checking, variant=variant)
            self._status[name] = status
            run = self._run if variant == "official" else self._run_variant
            thread = threading.Thread(target=run, args=(name, target), name=f"download-{name}", daemon=True)
            self._threads[name] = thread
        thread.start()
        return status

    def wait(self, task: str, timeout_s: float | None = None) -> DownloadStatus:
        """Block until `task`'s download thread ends (tests and the CLI); return its status."""
        thread = self._threads.get(get_task(task).name)
        if thread is not None:
            thread.join(timeout_s)
        return self.status(task)

    def _set(self, task: str, **changes: Any) -> None:
        with self._lock:
            self._status[task] = replace(self._status[task], **changes)

    def _run(self, task: str, target: Path) -> None:
        try:
            self._download(task, target)
        except Exception as exc:  # a thread's error must reach the UI, not vanish with the thread
            log.exception("download of %s failed unexpectedly", task)
            self._set(task, state="failed", message=f"Downloading {OFFICIAL_REPOS[task]} failed: {exc}")

    def _run_variant(self, task: str, target: Path) -> None:
        variant = get_variant(task, self.status(task).variant)
        try:
            self._download_variant(task, target, variant)
        except Exception as exc:  # a thread's error must reach the UI, not vanish with the thread
            log.exception("download of %s failed unexpectedly", variant.label)
            self._set(task, state="failed", message=f"Downloading {variant.label} failed: {exc}")

    def _download_variant(self, task: str, target: Path, variant: Any) -> None:
        from wan_local.variant_download import fetch_variant, plan_variant, unreachable_variant_message

        try:
            plan, listed = plan_variant(variant, target, api=self._api, disk_free=self._disk_free)
        except DownloadError as exc:
            self._set(task, state="failed", message=str(exc))
            return
        if not self._begin(task, plan):
            return
        try:
            fetch_variant(listed, target, self._file_downloader, on_step=lambda line: self._set(task, message=line))
        except DownloadError as exc:
            self._set(task, state="failed", message=str(exc))
            return
        except network_errors() as exc:
            self._set(task, state="failed", message=unreachable_variant_message(variant, exc))
            return
        except OSError as exc:  # disk full, permission denied
            self._set(task, state="failed", message=f"Downloading {variant.label} into {target} failed: {exc}")
            return
        status = folder_status(task, target)
        if not status.complete:
            self._set(task, state="failed", message=f"{variant.label} was downloaded, but {status.message}")
            return
        self._finish(task, target, plan.total_bytes, f"Downloaded {variant.label} into {target}.")

    def _download(self, task: str, target: Path) -> None:
        repo = OFFICIAL_REPOS[task]
        try:
            plan = plan_download(task, target, api=self._api, disk_free=self._disk_free)
        except DownloadError as exc:
            self._set(task, state="failed", message=str(exc))
            return
        if plan.ok and plan.needed_bytes == 0 and folder_status(task, target).complete:
            self._finish(task, target, plan.total_bytes, plan.message)
            return
        if not self._begin(task, plan):
            return
        log.info("downloading %s into %s (%s)", repo, target, plan.message)
        try:
            download = self._downloader
            if download is None:
                from huggingface_hub import snapshot_download as download
            target.mkdir(parents=True, exist_ok=True)
            download(repo, local_dir=str(target))
        except network_errors() as exc:
            log.warning("download of %s failed: %s", repo, exc)
            self._set(task, state="failed", message=unreachable_message(task, target, exc, plan.total_bytes))
            return
        except OSError as exc:  # disk full, permission denied
            self._set(task, state="failed", message=f"Downloading {repo} into {target} failed: {exc}")
            return
        status = folder_status(task, target)
        if not status.complete:
            # snapshot_download returns an existing local_dir as is when the Hub cannot be reached.
            if offline_enabled():
                message = unreachable_message(task, target, None, plan.total_bytes)
            else:
                message = (
                    f"The download of {repo} ended, but the folder is incomplete: {status.message} If huggingface.co "
                    "could not be reached, press Download again later: it resumes where it stopped."
                )
            self._set(task, state="failed", message=message)
            return
        self._finish(task, target, plan.total_bytes, f"Downloaded {repo} into {target}.")

    def _begin(self, task: str, plan: DownloadPlan) -> bool:
        """Record a planned download as started; False (recorded as refused, with the numbers) when it does not
        fit the disk."""
        if not plan.ok:
            self._set(task, state="refused", total_bytes=plan.total_bytes, message=plan.message)
            return False
        with self._lock:
            self._files[task] = plan.files
        self._set(
            task, state="downloading", total_bytes=plan.total_bytes, done_bytes=plan.present_bytes,
            started_at=time.time(), message=plan.message,
        )  # fmt: skip
        return True

    def _finish(self, task: str, target: Path, total_bytes: int, message: str) -> None:
        """Record a complete download and hand the folder to `on_done` (the Models tab makes it the task's)."""
        self._set(task, state="done", total_bytes=total_bytes, done_bytes=total_bytes, message=message)
        if self.on_done is not None:
            self.on_done(task, target)
