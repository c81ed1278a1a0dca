"""The plan: every decision of a set-up as one JSON-able dict, described in words and passed to the shell
scripts."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .drivers import format_cuda
from .errors import SetupError
from .gpus import GpuInfo
from .marker import SCHEMA
from .torch_choice import apply_overrides, choose_torch
from .torch_installed import InstalledTorch, torch_action


def current_platform() -> str:
    """This OS as the tables name it: windows, macos or linux (anything else is treated like Linux)."""
    if os.name == "nt":
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes ("" if it is missing)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def build_plan(
    gpus: Sequence[GpuInfo],
    detection: str,
    platform: str,
    *,
    force_cpu: bool,
    requirement: str,
    env: Mapping[str, str],
    have: InstalledTorch | None,
    pyproject_sha256: str,
    python: tuple[int, int, int],
) -> dict:
    """Every decision of a set-up as a JSON-able dict (printed, logged, and stored in the marker)."""
    choice = apply_overrides(
        choose_torch(gpus, platform, force_cpu=force_cpu, requirement=requirement, detection=detection), env
    )
    action, action_reason = torch_action(choice, have)
    return {
        "schema": SCHEMA,
        "platform": platform,
        "python": ".".join(map(str, python)),
        "detection": detection,
        "gpus": [dataclasses.asdict(g) for g in gpus],
        "driver_version": gpus[0].driver_version if gpus else "",
        "forced_cpu": force_cpu,
        "torch": dataclasses.asdict(choice),
        "torch_action": action,
        "torch_action_reason": action_reason,
        "installed_torch": have.version if have else None,
        "pyproject_sha256": pyproject_sha256,
    }


def gpus_from_plan(plan: Mapping) -> list[GpuInfo]:
    """The GpuInfo list stored in a plan dict (JSON turns tuples into lists)."""
    out = []
    for g in plan.get("gpus", []):
        cuda, cc = g.get("cuda_version"), g.get("compute_capability")
        out.append(
            GpuInfo(
                g["name"],
                g["driver_version"],
                tuple(cuda) if cuda else None,
                g["memory_total_mib"],
                tuple(cc) if cc else None,
            )
        )
    return out


def describe_plan(plan: Mapping) -> list[str]:
    """The plan in plain words, one line per decision (ASCII)."""
    torch = plan["torch"]
    lines = [f"Python:   {plan['python']} ({plan['platform']})"]
    gpus = gpus_from_plan(plan)
    if gpus:
        cuda = gpus[0].cuda_version
        lines.append(
            f"Driver:   NVIDIA {gpus[0].driver_version}"
            + (f", supports CUDA up to {format_cuda(cuda)}" if cuda else "")
        )
        lines += [f"GPU {i}:    {g.describe()}" for i, g in enumerate(gpus)]
    else:
        lines.append(f"GPU:      none ({plan['detection']})")
    if torch["error"] is None:
        index = torch["index_url"] or "pip's configured index"
        lines.append(f"PyTorch:  {torch['requirement']}, {torch['tag']} build, from {index}")
        lines.append(f"          why: {torch['reason']}")
        lines.append(f"          now: {plan['torch_action']} - {plan['torch_action_reason']}")
    if torch["tag"].startswith("cu"):
        lines.append("Kernels:  flash-attn, SageAttention, Triton: prebuilt wheels only, tried after PyTorch")
    else:
        lines.append("Kernels:  none (they need a CUDA build of PyTorch)")
    if torch["warning"]:
        lines.append(f"WARNING:  {torch['warning']}")
    if torch["error"]:
        lines.append(f"ERROR:    {torch['error']}")
    return lines


def plan_env_lines(plan: Mapping) -> list[str]:
    """KEY=VALUE lines the shell scripts read (bash `read`, cmd `for /f`): no quotes, no newlines."""
    torch = plan["torch"]
    values = {
        "TORCH_TAG": torch["tag"],
        "TORCH_INDEX_URL": torch["index_url"] or "",
        "TORCH_REQUIREMENT": torch["requirement"],
        "TORCH_ACTION": plan["torch_action"],
    }
    for key, value in values.items():
        if re.search(r"[\"'\r\n%!^&|]", value):
            raise SetupError(f"{key}={value!r} contains a character the shell scripts cannot pass on safely")
    return [f"{key}={value}" for key, value in values.items()]
