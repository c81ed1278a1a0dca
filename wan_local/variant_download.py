"""Downloading one weight variant (`models_catalog.Variant`) file by file, resumable and hash-checked.

1. `list_variant`: the Hub lists each file's size and, for LFS files, its sha256 (`HfApi.get_paths_info`); a
   required file the Hub does not list is an error, an optional one is skipped.
2. `plan_variant`: bytes still to fetch (files not yet in place) against the free disk, refusing with numbers.
3. `fetch_variant`: each missing file with `hf_hub_download(..., local_dir=folder)`, which keeps its partial
   download under `<folder>/.cache/huggingface/` and resumes it after an interruption; then the sha256 of the file
   is computed and compared with the Hub's: on a mismatch the file is deleted and the error says so; else it is
   moved to its ComfyUI place (`diffusion_models/…`, `text_encoders/…`, `vae/…`). A file already in place with
   the listed size counts as done (it was checked when it was placed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_local.models_catalog import Variant
from wan_local.models_hub import (
    DISK_MARGIN_BYTES,
    DownloadError,
    DownloadPlan,
    existing_ancestor,
    network_errors,
    offline_enabled,
    present_bytes,
)

log = logging.getLogger(__name__)

_CHUNK = 16 * 1024 * 1024


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


@dataclass(frozen=True)
class ListedFile:
    """A variant file as the Hub lists it: size in bytes and the LFS sha256 (None for a small, non-LFS file)."""

    repo_id: str
    path: str
    target: str
    size: int
    sha256: str | None


def unreachable_variant_message(variant: Variant, exc: BaseException | None) -> str:
    """Why the Hub cannot be asked, what the variant is, and how to fetch its files on another computer."""
    if offline_enabled():
        why = "offline mode is on (HF_HUB_OFFLINE=1; unset it to allow downloads)"
    else:
        detail = f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if exc else ""
        why = f"huggingface.co cannot be reached{detail}"
    known = variant.known_bytes()
    size = f" (about {_gb(known)}, size from the fact sheet, not listed now)" if known else ""
    steps = "; ".join(f"`hf download {f.repo_id} {f.path}` → {f.target}" for f in variant.files if not f.optional)
    return (
        f"Cannot download {variant.label} for {variant.task}{size}: {why}. On a computer with internet fetch each file "
        f"and put it where the arrow says, in one folder: {steps}; copy that folder here and choose it with 'Use this "
        "folder', or press Download again later (it resumes)."
    )


def list_variant(variant: Variant, api: Any = None, timeout_s: float = 20.0) -> list[ListedFile]:
    """Sizes and sha256 of the variant's files from the Hub; DownloadError when it cannot be reached or lacks a
    required file."""
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi()
    by_repo: dict[str, list] = {}
    for f in variant.files:
        by_repo.setdefault(f.repo_id, []).append(f)
    listed: list[ListedFile] = []
    for repo_id, files in by_repo.items():
        try:
            infos = api.get_paths_info(repo_id, [f.path for f in files], expand=True)
        except network_errors() as exc:
            raise DownloadError(unreachable_variant_message(variant, exc)) from exc
        known = {info.path: info for info in infos if getattr(info, "size", None) is not None}
        for f in files:
            info = known.get(f.path)
            if info is None:
                if f.optional:
                    continue
                raise DownloadError(
                    f"{repo_id} does not list {f.path}; the repository changed. Choose another variant."
                )
            lfs = getattr(info, "lfs", None)
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            listed.append(ListedFile(repo_id, f.path, f.target, int(info.size), sha))
    return listed


def plan_variant(
    variant: Variant,
    target: Path | str,
    *,
    api: Any = None,
    disk_free: Callable[[Path], int] | None = None,
    margin_bytes: int = DISK_MARGIN_BYTES,
) -> tuple[DownloadPlan, list[ListedFile]]:
    """The variant's listed files and whether the rest fits the target's disk (`ok` False with the numbers)."""
    target = Path(target).expanduser()
    listed = list_variant(variant, api)
    files = {f.target: f.size for f in listed}
    total = sum(files.values())
    present = present_bytes(target, files)
    needed = max(0, total - present)
    where = existing_ancestor(target)
    free = disk_free(where) if disk_free is not None else shutil.disk_usage(where).free
    name = f"{variant.label} for {variant.task}"
    already = f"; {_gb(present)} already there" if present else ""
    if needed == 0:
        message = f"{name} ({_gb(total)}, {len(files)} files) is already complete in {target}."
    elif needed + margin_bytes <= free:
        message = (
            f"{name}: {_gb(total)} in {len(files)} files{already}; {_gb(needed)} to fetch, {_gb(free)} free on the "
            f"disk of {where}."
        )
    else:
        message = (
            f"Not enough disk space for {name}: {_gb(needed)} still to fetch (of {_gb(total)}{already}) plus "
            f"{_gb(margin_bytes)} kept free, but only {_gb(free)} is free on the disk of {where}. Free "
            f"{_gb(needed + margin_bytes - free)}, choose a smaller variant or a folder on another disk."
        )
    ok = needed == 0 or needed + margin_bytes <= free
    repo = variant.repo_id or ", ".join(dict.fromkeys(f.repo_id for f in variant.files))
    return DownloadPlan(repo, str(target), total, present, needed, free, ok, message, files), listed


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_variant(
    listed: list[ListedFile],
    target: Path,
    downloader: Callable[..., Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Fetch every listed file not yet in place into `target`, check its sha256, move it to its place.

    downloader: hf_hub_download-like (repo_id=, filename=, local_dir=) returning the local path. DownloadError on
    a hash mismatch (the bad file is deleted); network errors propagate (the caller says how to resume)."""
    if downloader is None:
        from huggingface_hub import hf_hub_download as downloader
    target.mkdir(parents=True, exist_ok=True)
    for item in listed:
        dest = target / item.target
        if dest.is_file() and dest.stat().st_size == item.size:
            continue
        if on_step is not None:
            on_step(f"Downloading {item.target} ({_gb(item.size)}) from {item.repo_id}")
        path = Path(downloader(repo_id=item.repo_id, filename=item.path, local_dir=str(target)))
        if item.sha256:
            if on_step is not None:
                on_step(f"Checking the sha256 of {item.target}")
            got = sha256_of(path)
            if got != item.sha256.lower():
                path.unlink(missing_ok=True)
                raise DownloadError(
                    f"{item.target} is damaged: its sha256 is {got[:16]}…, but the Hub lists {item.sha256[:16]}… "
                    f"for {item.repo_id}/{item.path}. The file was deleted; press Download again to fetch it anew."
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.absolute() != dest.absolute():
            os.replace(path, dest)
            _remove_empty_parents(path.parent, target)
        log.info("fetched %s/%s into %s", item.repo_id, item.path, dest)


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
