"""The torch in the venv: what it is (read without importing it), whether it fits the choice, whether it works."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .drivers import NVIDIA_DRIVERS_URL
from .torch_choice import TorchChoice
from .versions import requirement_allows


@dataclass(frozen=True)
class InstalledTorch:
    """The torch in the running environment, read from its files without importing it (importing takes
    seconds and can fail for reasons the installer reports separately). `tag` is "cpu" or "cu126" etc."""

    version: str
    cuda: str | None

    @property
    def tag(self) -> str:
        """The wheel family this torch came from: "cpu" or "cu" + the CUDA digits ("12.6" -> "cu126")."""
        return "cpu" if not self.cuda else "cu" + "".join(self.cuda.split(".")[:2])


def installed_torch() -> InstalledTorch | None:
    """The torch installed for this interpreter, or None."""
    try:
        version = importlib.metadata.version("torch")
        spec = importlib.util.find_spec("torch")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    cuda = None
    if spec is not None and spec.origin:
        version_py = Path(spec.origin).with_name("version.py")
        if version_py.is_file():
            match = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*'([\d.]+)'", version_py.read_text(encoding="utf-8"), re.M)
            cuda = match.group(1) if match else None
    return InstalledTorch(version, cuda)


def torch_action(choice: TorchChoice, have: InstalledTorch | None) -> tuple[str, str]:
    """What the set-up does with torch: ("install" | "reinstall" | "keep", why)."""
    if have is None:
        return "install", "no PyTorch in .venv yet"
    if choice.index_url is not None and have.tag != choice.tag:
        return "reinstall", f"the installed PyTorch {have.version} is the {have.tag} build; {choice.tag} is needed"
    try:
        fits = requirement_allows(choice.requirement, have.version)
    except ValueError:  # a requirement this reader does not understand (e.g. from WAN_LOCAL_TORCH_SPEC): let pip decide
        fits = False
    if not fits:
        return "reinstall", f"the installed PyTorch {have.version} does not satisfy {choice.requirement}"
    return "keep", f"PyTorch {have.version} ({have.tag}) is already installed and fits"


_VERIFY_SCRIPT = """
import json, sys
out = {}
try:
    import torch
    out["version"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["available"] = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if out["available"] else 0
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
    out["capabilities"] = [list(torch.cuda.get_device_capability(i)) for i in range(count)]
    out["arch_list"] = torch.cuda.get_arch_list() if count else []
except Exception as exc:  # report every failure, the installer explains it
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def has_kernels_for(arch_list: Sequence[str], cc: tuple[int, int]) -> bool:
    """Can a torch built for `arch_list` (torch.cuda.get_arch_list(), e.g. ["sm_80", "sm_90", "compute_90"]) run
    on a GPU of compute capability `cc`? Machine code runs on the same major version with an equal or higher
    minor; PTX ("compute_XY") is compiled for any GPU at least as new."""
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+?)(\d)[a-z]?", arch)
        if match is None:
            continue
        kind, major, minor = match.group(1), int(match.group(2)), int(match.group(3))
        if (kind == "sm" and major == cc[0] and minor <= cc[1]) or (kind == "compute" and (major, minor) <= cc):
            return True
    return False


def verify_torch(python: str, platform: str, expected_tag: str) -> tuple[bool, list[str]]:
    """Import torch in a fresh `python` process: (usable, lines to print). Not usable = it does not import."""
    proc = subprocess.run(
        [python, "-c", _VERIFY_SCRIPT], capture_output=True, text=True, errors="replace", timeout=600, check=False
    )
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        info = {"error": (proc.stderr.strip().splitlines() or ["the import crashed"])[-1]}
    if "error" in info:
        lines = [f"PyTorch does not import: {info['error']}"]
        if platform == "windows" and ("DLL" in info["error"] or "WinError" in info["error"]):
            lines.append(
                "Install the Microsoft Visual C++ Redistributable (https://aka.ms/vs/17/release/"
                "vc_redist.x64.exe), restart, and run this again."
            )
        else:
            lines.append("Run this again with --repair; if it fails again, delete the .venv folder and retry.")
        return False, lines
    build = f"CUDA {info['cuda']}" if info["cuda"] else "CPU"
    lines = [f"PyTorch {info['version']} ({build} build) imports."]
    if info["available"]:
        lines.append("GPU usable: " + ", ".join(info["devices"]))
        for name, cc in zip(info["devices"], info["capabilities"], strict=True):
            if not has_kernels_for(info["arch_list"], (cc[0], cc[1])):
                lines.append(
                    f"WARNING: this PyTorch build has no kernels for the {name} (compute capability {cc[0]}.{cc[1]};"
                    f" it has {' '.join(info['arch_list'])}). Run this again with --repair."
                )
    elif expected_tag.startswith("cu"):
        lines.append(
            "WARNING: PyTorch cannot use the GPU (torch.cuda.is_available() is False), so the app would run on the "
            f"CPU. Restart the PC after a driver update; otherwise install the current driver ({NVIDIA_DRIVERS_URL}) "
            "and run this again with --repair."
        )
    return True, lines
