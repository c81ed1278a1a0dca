"""The files a set-up leaves in .venv: the plan it started from and the completed-install marker, and whether the
recorded install still fits this PC."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .torch_installed import InstalledTorch

MARKER_NAME = "wan-local-install.json"
PLAN_NAME = "wan-local-plan.json"
SCHEMA = 1  # bump when the marker's meaning changes: every install then re-runs its set-up once


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when the file is missing, unreadable or not a complete object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping) -> None:
    """Write atomically (temp file + rename), so an interrupted write leaves the old file or none."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def marker_problems(marker: Mapping | None, plan: Mapping, have: InstalledTorch | None) -> tuple[list[str], list[str]]:
    """Compare the completed-install marker with what this PC needs now: (reasons to run the set-up, warnings).

    A missing or incomplete marker means the set-up never finished. A torch build, driver, requirement or
    pyproject.toml that changed means repair. One exception: a CUDA install whose GPU is not detected right now
    (driver being updated, nvidia-smi failing) is kept with a warning rather than swapped for the CPU build.
    """
    if marker is None or not marker.get("completed") or marker.get("schema") != SCHEMA or "torch" not in marker:
        return ["no completed set-up is recorded (first run, or an earlier set-up was interrupted)"], []
    reasons, warnings = [], []
    old, new = marker["torch"], plan["torch"]
    gpu_vanished = not plan["gpus"] and not plan["forced_cpu"] and old["tag"] not in ("cpu", "none")
    if gpu_vanished:
        warnings.append(
            f"No NVIDIA GPU is detected now ({plan['detection']}), but this install was made for "
            f"{old['tag']}; keeping it. Run with --repair to set up again, or --cpu for the CPU build."
        )
    else:
        if old["tag"] != new["tag"] or old["index_url"] != new["index_url"]:
            reasons.append(f"the PyTorch build needed changed: {old['tag']} -> {new['tag']}")
        if marker.get("driver_version") != plan["driver_version"]:
            reasons.append(
                f"the NVIDIA driver changed: {marker.get('driver_version') or 'none'} -> "
                f"{plan['driver_version'] or 'none'}"
            )
    if old["requirement"] != new["requirement"]:
        reasons.append(f"the torch requirement changed: {old['requirement']} -> {new['requirement']}")
    if marker.get("pyproject_sha256") != plan["pyproject_sha256"]:
        reasons.append("pyproject.toml changed (a new version of wan-local?)")
    if have is None or have.version != marker.get("installed_torch"):
        now = have.version if have else "none"
        reasons.append(f"PyTorch in .venv changed: {marker.get('installed_torch')} -> {now}")
    return reasons, warnings
