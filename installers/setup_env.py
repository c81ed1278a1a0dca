"""What the wan-local installers decide, written once: which PyTorch build, which optional kernels, and why.

run.sh (Linux) and run.bat (Windows) call this file for every decision and keep only the steps a shell must do
itself (find a Python, run pip, launch the app), so both platforms decide the same way and the decisions are
unit-tested (tests/test_installers.py). Standard library only: it runs before anything is installed, first under
the Python that creates `.venv`, then under the venv's own Python. Printed text is ASCII so a Windows console in
any code page shows it.

Subcommands (`python installers/setup_env.py SUBCOMMAND --help`):

- ``ensure-venv``  check this Python (3.10-3.14, 64-bit) and create or repair ``.venv``
- ``plan``         detect the NVIDIA GPU and driver, choose PyTorch (and kernels, once torch is installed); print
                   the decisions, or ``--json``; changes nothing
- ``start``        the same, at the start of a set-up: forgets the completed-install marker, logs the plan and writes
                   it as KEY=VALUE lines (``--env-file``) that the shell scripts read; exit 3 when no build can work
- ``verify``       import the installed torch in a fresh process and say what it can use
- ``kernels``      try the optional kernels, prebuilt wheels only; never fails
- ``mark``         record the completed install (marker file) - the last step of a set-up
- ``check``        is the recorded install still right for this PC (driver, torch build, pyproject)? exit 0 yes,
                   1 when the set-up must run (again)
- ``log``          append a line to ``.venv/install.log``

The marker (``.venv/wan-local-install.json``) is written only after every step succeeded, so an interrupted
set-up leaves none and the next launch repairs it. Decisions and step results go to ``.venv/install.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MARKER_NAME = "wan-local-install.json"
PLAN_NAME = "wan-local-plan.json"
LOG_NAME = "install.log"
SCHEMA = 1  # bump when the marker's meaning changes: every install then re-runs its set-up once

PYTHON_MIN = (3, 10)  # pyproject.toml's requires-python
PYTHON_MAX = (3, 14)  # newest Python the PyTorch releases allowed by pyproject.toml publish wheels for
TORCH_INDEX = "https://download.pytorch.org/whl/"
PIP_DEFAULT_INDEX = "default"  # value of WAN_LOCAL_TORCH_INDEX_URL meaning "pip's configured index"
ENV_TORCH_SPEC = "WAN_LOCAL_TORCH_SPEC"  # e.g. torch==2.13.0: replaces the torch requirement (tests, pinning)
ENV_TORCH_INDEX = "WAN_LOCAL_TORCH_INDEX_URL"  # replaces the wheel index, or "default"
ENV_NVIDIA_SMI = "WAN_LOCAL_NVIDIA_SMI"  # path of the nvidia-smi to run (tests, unusual installs)
EXIT_BLOCKED = 3  # `start`: no PyTorch build can work here (e.g. driver too old); the message says what to do
WINDOWS_MAX_PATH = 260
LONGEST_TORCH_FILE = 172  # longest path inside a torch 2.13 wheel, relative to site-packages (measured)
NVIDIA_DRIVERS_URL = "https://www.nvidia.com/drivers"


class SetupError(Exception):
    """A problem the user must fix; the message says what and how. Exit status 1 unless `exit_code` says."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------- versions


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted numbers of a version: "560.35.03" -> (560, 35, 3); "2.13.0+cu126" -> (2, 13, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def requirement_allows(requirement: str, version: str) -> bool:
    """Does `version` satisfy a simple requirement such as "torch>=2.4,<2.15" or "torch==2.13.0"?

    Handles ==, !=, >=, <=, >, <, ~= and trailing ".*" on release numbers; a local label ("+cu126") and
    pre-release suffixes are ignored, as pip does for a specifier without them. Markers and extras are not
    expected here (this only reads torch requirements).
    """
    spec = re.sub(r"^\s*[A-Za-z0-9_.\-]+\s*", "", requirement.split(";")[0])
    have = version_tuple(version.split("+")[0])
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.fullmatch(r"(==|!=|>=|<=|~=|>|<)\s*([0-9][0-9.]*)(\.\*)?", clause)
        if match is None:
            raise ValueError(f"cannot read the version clause {clause!r} of {requirement!r}")
        op, text, wildcard = match.groups()
        want = version_tuple(text)
        if wildcard:
            equal = have[: len(want)] == want
            ok = equal if op == "==" else not equal
        elif op == "~=":
            ok = _cmp(have, want) >= 0 and have[: len(want) - 1] == want[:-1]
        else:
            c = _cmp(have, want)
            ok = {"==": c == 0, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0}[op]
        if not ok:
            return False
    return True


def torch_requirement(pyproject: Path) -> str:
    """The torch requirement of pyproject.toml's dependencies (e.g. "torch>=2.4,<2.15"); "torch" if none."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the one line we need
        match = re.search(r"""["'](torch\s*(?:[<>=!~][^"']*)?)["']""", text)
        return match.group(1).replace(" ", "") if match else "torch"
    for dep in tomllib.loads(text).get("project", {}).get("dependencies", []):
        if re.match(r"torch\s*(?:[<>=!~;]|$)", dep):
            return dep.split(";")[0].replace(" ", "")
    return "torch"


# ------------------------------------------------------------------------------------------ GPU detection


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as nvidia-smi reports it.

    `cuda_version` is the newest CUDA the installed driver supports (the "CUDA Version" of nvidia-smi's header,
    the same for every GPU of one driver), not a CUDA toolkit. `compute_capability` is None when this driver's
    nvidia-smi cannot report it (before R510).
    """

    name: str
    driver_version: str
    cuda_version: tuple[int, int] | None
    memory_total_mib: int
    compute_capability: tuple[int, int] | None = None

    def describe(self) -> str:
        """One line, e.g. NVIDIA GeForce RTX 4090, 24.0 GiB, compute capability 8.9."""
        text = f"{self.name}, {self.memory_total_mib / 1024:.1f} GiB"
        if self.compute_capability:
            text += f", compute capability {self.compute_capability[0]}.{self.compute_capability[1]}"
        return text


_HEADER_DRIVER = re.compile(r"Driver Version:\s*(\d+(?:\.\d+)+)")
_HEADER_CUDA = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")
# A GPU row of the table: index, name (long names are cut to "NVIDIA GeForce ..."), persistence or driver model.
_TABLE_ROW = re.compile(r"^\|\s+(\d+)\s+(.+?)\s+(?:On|Off|WDDM|TCC|MCDM|N/A)\s*\|")
_TABLE_MEMORY = re.compile(r"(\d+)\s*MiB\s*/\s*(\d+)\s*MiB")


def _table_rows(text: str) -> list[tuple[str, int]]:
    """(name, memory total MiB) per GPU row of the plain `nvidia-smi` table, before its process list."""
    rows: list[tuple[str, int]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Processes:" in line:  # process rows can end in "N/A |" like a GPU row
            break
        match = _TABLE_ROW.match(line)
        if match is None:
            continue
        memory = _TABLE_MEMORY.search(lines[i + 1]) if i + 1 < len(lines) else None
        rows.append((match.group(2).strip(), int(memory.group(2)) if memory else 0))
    return rows


def _query_rows(text: str) -> list[tuple[str, str, int, tuple[int, int] | None]]:
    """(name, driver, memory MiB, compute capability) per line of `--query-gpu=name,driver_version,memory.total
    [,compute_cap] --format=csv,noheader`; error lines and headers are skipped."""
    rows = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3 or not re.fullmatch(r"\d+(?:\.\d+)+", parts[1]):
            continue
        memory = re.match(r"(\d+)", parts[2])
        cc = re.fullmatch(r"(\d+)\.(\d+)", parts[3]) if len(parts) > 3 else None
        rows.append(
            (parts[0], parts[1], int(memory.group(1)) if memory else 0, (int(cc[1]), int(cc[2])) if cc else None)
        )
    return rows


def parse_nvidia_smi(text: str, query: str | None = None) -> list[GpuInfo]:
    """The GPUs in nvidia-smi output; [] when there are none or nvidia-smi failed ("NVIDIA-SMI has failed ...",
    "No devices were found", "command not found").

    `text` is the output of plain `nvidia-smi` (its header holds the driver version and the CUDA version the
    driver supports); `query` is the output of `nvidia-smi --query-gpu=name,driver_version,memory.total
    [,compute_cap] --format=csv,noheader`, whose names are never cut short and which adds the compute
    capability. Either may be given alone (`text` may also be the CSV); with only the CSV, the CUDA version is
    derived from the driver version with NVIDIA's table (`cuda_for_driver`).
    """
    driver = _HEADER_DRIVER.search(text)
    cuda_match = _HEADER_CUDA.search(text)
    cuda = (int(cuda_match.group(1)), int(cuda_match.group(2))) if cuda_match else None
    rows = _query_rows(query) if query is not None else []
    if not rows and driver is None:
        rows = _query_rows(text)
    if rows:
        return [GpuInfo(name, drv, cuda or cuda_for_driver(drv), memory, cc) for name, drv, memory, cc in rows]
    if driver is None:
        return []
    return [GpuInfo(name, driver.group(1), cuda, memory) for name, memory in _table_rows(text)]


Runner = Callable[[Sequence[str]], "tuple[int, str]"]


def _run_command(args: Sequence[str]) -> tuple[int, str]:
    """Run a command, return (exit status, stdout + stderr); FileNotFoundError when it does not exist."""
    proc = subprocess.run(list(args), capture_output=True, text=True, errors="replace", timeout=60, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def nvidia_smi_path(env: Mapping[str, str], platform: str) -> str | None:
    """Where nvidia-smi is: $WAN_LOCAL_NVIDIA_SMI, PATH, then the driver's usual install folders."""
    if env.get(ENV_NVIDIA_SMI):
        return env[ENV_NVIDIA_SMI]
    found = shutil.which("nvidia-smi")
    if found:
        return found
    if platform == "windows":
        candidates = [
            Path(env.get("SystemRoot", r"C:\Windows")) / "System32" / "nvidia-smi.exe",
            Path(env.get("ProgramFiles", r"C:\Program Files")) / "NVIDIA Corporation" / "NVSMI" / "nvidia-smi.exe",
        ]
    else:
        candidates = [Path("/usr/bin/nvidia-smi"), Path("/usr/lib/wsl/lib/nvidia-smi")]  # WSL2 puts it here
    return next((str(path) for path in candidates if path.is_file()), None)


def detect_gpus(env: Mapping[str, str], platform: str, run: Runner = _run_command) -> tuple[list[GpuInfo], str]:
    """Run nvidia-smi (table, then the CSV query) and parse it: (GPUs, what happened in words)."""
    exe = nvidia_smi_path(env, platform)
    if exe is None:
        return [], "nvidia-smi not found: no NVIDIA driver is installed"
    try:
        status, table = run([exe])
        if status != 0 and not _HEADER_DRIVER.search(table):
            first = next((line.strip() for line in table.splitlines() if line.strip()), f"exit status {status}")
            return [], f"nvidia-smi failed: {first}"
        fields = "name,driver_version,memory.total"
        status, query = run([exe, f"--query-gpu={fields},compute_cap", "--format=csv,noheader"])
        if status != 0:  # drivers before R510 do not know compute_cap
            status, query = run([exe, f"--query-gpu={fields}", "--format=csv,noheader"])
    except FileNotFoundError:
        return [], f"nvidia-smi was not found at {exe}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi could not run: {exc}"
    gpus = parse_nvidia_smi(table, query if status == 0 else None)
    return gpus, f"nvidia-smi found {len(gpus)} NVIDIA GPU(s)" if gpus else "nvidia-smi reported no GPU"


# ----------------------------------------------------------------------------------------- torch choice


@dataclass(frozen=True)
class CudaRelease:
    """The first driver of a CUDA release, per OS (a driver supports every CUDA release up to its own)."""

    cuda: tuple[int, int]
    linux_driver: str
    windows_driver: str


# NVIDIA, CUDA Toolkit release notes, Table 3 "CUDA Toolkit and Corresponding Driver Versions" (GA releases).
# For 13.x the table gives Windows "N/A" (the toolkit no longer bundles a Windows driver); 580.88 is the first
# R580 Windows driver.
CUDA_RELEASES = (
    CudaRelease((13, 0), "580.65.06", "580.88"),
    CudaRelease((12, 9), "575.51.03", "576.02"),
    CudaRelease((12, 8), "570.26", "570.65"),
    CudaRelease((12, 6), "560.28.03", "560.76"),
    CudaRelease((12, 5), "555.42.02", "555.85"),
    CudaRelease((12, 4), "550.54.14", "551.61"),
    CudaRelease((12, 3), "545.23.06", "545.84"),
    CudaRelease((12, 2), "535.54.03", "536.25"),
    CudaRelease((12, 1), "530.30.02", "531.14"),
    CudaRelease((12, 0), "525.60.13", "527.41"),
    CudaRelease((11, 8), "520.61.05", "520.06"),
    CudaRelease((11, 7), "515.43.04", "516.01"),
    CudaRelease((11, 6), "510.39.01", "511.23"),
    CudaRelease((11, 5), "495.29.05", "496.04"),
    CudaRelease((11, 4), "470.42.01", "471.11"),
)


def min_driver(cuda: tuple[int, int], platform: str) -> str:
    """The oldest driver that runs `cuda` on this OS, from NVIDIA's table."""
    release = next(r for r in CUDA_RELEASES if r.cuda == cuda)
    return release.windows_driver if platform == "windows" else release.linux_driver


def cuda_for_driver(driver_version: str, platform: str = "linux") -> tuple[int, int] | None:
    """The newest CUDA a driver supports, from NVIDIA's table; None for drivers older than the table."""
    have = version_tuple(driver_version)
    for release in CUDA_RELEASES:
        need = release.windows_driver if platform == "windows" else release.linux_driver
        if _cmp(have, version_tuple(need)) >= 0:
            return release.cuda
    return None


@dataclass(frozen=True)
class TorchBuild:
    """One family of PyTorch CUDA wheels on download.pytorch.org/whl/<tag>.

    `min_cc`/`max_cc` bound the GPU architectures (compute capability) the newest torch of that family ships
    kernels for; `last_torch` is set for families PyTorch stopped building (their newest torch is old).
    """

    tag: str
    cuda: tuple[int, int]
    min_cc: tuple[int, int]
    max_cc: tuple[int, int] | None
    last_torch: str | None = None

    def supports(self, cc: tuple[int, int]) -> bool:
        """Does this build carry kernels for a GPU of compute capability `cc`?"""
        return cc >= self.min_cc and (self.max_cc is None or cc <= self.max_cc)


# Newest first; `choose_torch` takes the first one the driver and the GPU can run. CUDA 13 builds dropped
# Maxwell/Pascal/Volta (< 7.5); PyTorch's CUDA 12.8 builds since 2.8 dropped Pascal; Blackwell (RTX 50xx,
# compute capability 10.0/12.0) needs CUDA 12.8 or newer. The pip requirement still comes from pyproject.toml:
# pip takes the newest torch it allows that exists for the chosen tag.
TORCH_CUDA_BUILDS = (
    TorchBuild("cu130", (13, 0), min_cc=(7, 5), max_cc=None),
    TorchBuild("cu128", (12, 8), min_cc=(7, 5), max_cc=None),
    TorchBuild("cu126", (12, 6), min_cc=(5, 0), max_cc=(9, 0)),
    TorchBuild("cu124", (12, 4), min_cc=(5, 0), max_cc=(9, 0), last_torch="2.6"),
    TorchBuild("cu121", (12, 1), min_cc=(5, 0), max_cc=(9, 0), last_torch="2.5"),
    TorchBuild("cu118", (11, 8), min_cc=(5, 0), max_cc=(9, 0), last_torch="2.7"),
)


@dataclass(frozen=True)
class TorchChoice:
    """Which PyTorch to install and why.

    `tag` is the wheel family ("cu126", "cpu"), which is also the local label of the installed torch version;
    `index_url` None means pip's configured index. `warning` is shown but does not stop the set-up; `error`
    does: no build can work here and the message says what to do (e.g. update the driver).
    """

    tag: str
    index_url: str | None
    requirement: str
    reason: str
    warning: str | None = None
    error: str | None = None


def _fmt_cuda(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


def _cpu_choice(platform: str, requirement: str, reason: str, warning: str | None) -> TorchChoice:
    # PyPI's Linux torch is a multi-GB CUDA build, so the CPU build comes from PyTorch's CPU index; on macOS
    # PyPI's build is the only one (it uses the Apple GPU through MPS).
    index = None if platform == "macos" else TORCH_INDEX + "cpu"
    return TorchChoice("cpu", index, requirement, reason, warning)


def choose_torch(
    gpus: Sequence[GpuInfo],
    platform: str,
    *,
    force_cpu: bool = False,
    requirement: str = "torch",
    detection: str = "",
) -> TorchChoice:
    """Pick the PyTorch build for these GPUs on `platform` ("linux", "windows" or "macos").

    The GPU with the most memory decides (the app runs on one GPU). The build is the newest in
    TORCH_CUDA_BUILDS whose CUDA version the driver supports and which carries kernels for that GPU. No GPU
    (or `force_cpu`) gives the CPU build with a warning; a driver older than the oldest build's CUDA, or a GPU
    no build supports, gives an `error` naming the fix.
    """
    slow = "Generating video on the CPU takes hours; the app is meant for an NVIDIA GPU."
    if force_cpu:
        return _cpu_choice(platform, requirement, "CPU build, because --cpu was given.", slow)
    if platform == "macos":
        return _cpu_choice(platform, requirement, "macOS: PyTorch from PyPI (no CUDA on macOS).", slow)
    if not gpus:
        why = f" ({detection})" if detection else ""
        warning = (
            f"No NVIDIA GPU was found{why}. Installing the CPU build of PyTorch: the app starts, but generating "
            f"a video on the CPU takes hours. If this PC has an NVIDIA GPU, install its driver from "
            f"{NVIDIA_DRIVERS_URL} and run this again: the set-up notices the driver and switches to the GPU build."
        )
        return _cpu_choice(platform, requirement, "CPU build: no NVIDIA GPU found.", warning)

    gpu = max(gpus, key=lambda g: g.memory_total_mib)  # max() keeps the first of equals
    driver_cuda = gpu.cuda_version or cuda_for_driver(gpu.driver_version, platform)
    oldest = TORCH_CUDA_BUILDS[-1]
    newest = TORCH_CUDA_BUILDS[0]
    if driver_cuda is None or driver_cuda < oldest.cuda:
        supports = f"supports CUDA {_fmt_cuda(driver_cuda)}" if driver_cuda else "is older than CUDA 11.4"
        error = (
            f"The NVIDIA driver {gpu.driver_version} {supports}, but PyTorch needs CUDA {_fmt_cuda(oldest.cuda)} "
            f"or newer: the minimum driver is {min_driver(oldest.cuda, platform)}. Install the current driver for "
            f"your {gpu.name} from {NVIDIA_DRIVERS_URL} ({min_driver(newest.cuda, platform)} or newer gets the "
            "newest PyTorch builds), then run this again. To install without the GPU instead, run with --cpu "
            f"({slow[0].lower()}{slow[1:]})"
        )
        return TorchChoice("none", None, requirement, "No PyTorch CUDA build runs on this driver.", error=error)

    runnable = [b for b in TORCH_CUDA_BUILDS if b.cuda <= driver_cuda]
    cc = gpu.compute_capability
    usable = [b for b in runnable if cc is None or b.supports(cc)]
    if not usable:
        cc_text = f"{cc[0]}.{cc[1]}" if cc else "?"
        if cc is not None and cc < min(b.min_cc for b in TORCH_CUDA_BUILDS):
            error = (
                f"The {gpu.name} (compute capability {cc_text}) is older than any GPU current PyTorch builds "
                "support. Run with --cpu to install without the GPU."
            )
        else:
            need = next((b for b in reversed(TORCH_CUDA_BUILDS) if cc is not None and b.supports(cc)), newest)
            error = (
                f"The {gpu.name} (compute capability {cc_text}) needs PyTorch's CUDA {_fmt_cuda(need.cuda)} build, "
                f"but the driver {gpu.driver_version} supports only CUDA {_fmt_cuda(driver_cuda)}. Update the "
                f"driver to {min_driver(need.cuda, platform)} or newer ({NVIDIA_DRIVERS_URL}), then run this again."
            )
        return TorchChoice("none", None, requirement, "No PyTorch CUDA build supports this GPU.", error=error)

    build = usable[0]
    several = f" (the GPU with the most memory of {len(gpus)})" if len(gpus) > 1 else ""
    reason = (
        f"{gpu.describe()}{several}; driver {gpu.driver_version} supports CUDA up to {_fmt_cuda(driver_cuda)}: "
        f"PyTorch's CUDA {_fmt_cuda(build.cuda)} build ({build.tag}) is the newest this driver and GPU can run."
    )
    if build is not runnable[0] and cc is not None:
        reason += f" (Newer builds have no kernels for compute capability {cc[0]}.{cc[1]}.)"
    warnings = []
    if build.last_torch:
        # the oldest build PyTorch still publishes, hence the lowest driver that gets a current torch
        current = next(
            b for b in reversed(TORCH_CUDA_BUILDS) if b.last_torch is None and (cc is None or b.supports(cc))
        )
        warnings.append(
            f"PyTorch stopped publishing CUDA {_fmt_cuda(build.cuda)} builds after torch {build.last_torch}, so "
            f"this install gets an old PyTorch. Updating the NVIDIA driver to {min_driver(current.cuda, platform)} "
            f"or newer ({NVIDIA_DRIVERS_URL}) lets the next run switch to current builds."
        )
    unusable = [g for g in gpus if g is not gpu and g.compute_capability and not build.supports(g.compute_capability)]
    if unusable:
        names = ", ".join(g.name for g in unusable)
        warnings.append(f"This PyTorch build cannot use {names}; the app runs on {gpu.name}.")
    return TorchChoice(build.tag, TORCH_INDEX + build.tag, requirement, reason, " ".join(warnings) or None)


def apply_overrides(choice: TorchChoice, env: Mapping[str, str]) -> TorchChoice:
    """Apply $WAN_LOCAL_TORCH_SPEC (the requirement) and $WAN_LOCAL_TORCH_INDEX_URL (the index, or "default"
    for pip's configured one). Tests use them to take a local torch 2.13.0 CPU wheel in seconds."""
    spec, index = env.get(ENV_TORCH_SPEC, "").strip(), env.get(ENV_TORCH_INDEX, "").strip()
    if spec:
        choice = dataclasses.replace(
            choice, requirement=spec, reason=f"{choice.reason} Requirement from {ENV_TORCH_SPEC}."
        )
    if index:
        url = None if index == PIP_DEFAULT_INDEX else index
        choice = dataclasses.replace(choice, index_url=url, reason=f"{choice.reason} Index from {ENV_TORCH_INDEX}.")
    return choice


# ------------------------------------------------------------------------------------ the installed torch


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


# --------------------------------------------------------------------------------------------- kernels

# torch minor -> triton minor. Each PyTorch minor release works with one Triton minor release (triton-windows
# README; torch's own "Requires-Dist: triton==..." on Linux).
TRITON_FOR_TORCH = {
    (2, 4): (3, 1), (2, 5): (3, 1), (2, 6): (3, 2), (2, 7): (3, 3), (2, 8): (3, 4), (2, 9): (3, 5),
    (2, 10): (3, 6), (2, 11): (3, 6), (2, 12): (3, 7), (2, 13): (3, 7), (2, 14): (3, 8),
}  # fmt: skip


@dataclass(frozen=True)
class Kernel:
    """An optional attention/compile kernel. The engine falls back to PyTorch SDPA when it is missing."""

    name: str  # pip distribution name
    import_name: str
    platforms: tuple[str, ...]
    python: tuple[tuple[int, int], tuple[int, int]]  # oldest, newest Python with wheels
    min_cc: tuple[int, int]
    needs_triton: bool
    what: str


# What the installers try, per platform. Each is installed with `pip install --only-binary=:all: --no-deps`, so
# pip never compiles (a failed build of these on Windows is the most common install failure in this field) and
# never swaps torch; a kernel without a prebuilt wheel for this exact platform/Python/torch/CUDA is skipped.
# Ampere (compute capability 8.0) or newer: FlashAttention-2 and SageAttention need it, and Triton >= 3.3
# dropped Turing.
KERNELS = (
    Kernel("triton-windows", "triton", ("windows",), ((3, 10), (3, 14)), (8, 0), False,
           "Triton compiler for Windows (torch.compile, SageAttention)"),
    Kernel("flash-attn", "flash_attn", ("linux", "windows"), ((3, 10), (3, 14)), (8, 0), False,
           "FlashAttention-2 (the engine's fast attention path)"),
    Kernel("sageattention", "sageattention", ("linux", "windows"), ((3, 10), (3, 14)), (8, 0), True,
           "SageAttention 1 (Triton kernels)"),
)  # fmt: skip


@dataclass(frozen=True)
class KernelChoice:
    """A decision about one kernel: `spec` is the pip requirement to try, None when it is not tried."""

    name: str
    import_name: str
    spec: str | None
    reason: str
    needs_triton: bool = False


def choose_kernels(
    platform: str,
    python: tuple[int, int],
    torch: InstalledTorch | None,
    gpus: Sequence[GpuInfo],
) -> list[KernelChoice]:
    """Which optional kernels to try for this platform, Python, installed torch and GPU (the largest one)."""
    gpu = max(gpus, key=lambda g: g.memory_total_mib) if gpus else None
    cc = gpu.compute_capability if gpu else None
    triton = TRITON_FOR_TORCH.get(version_tuple(torch.version)[:2]) if torch else None
    choices = []
    if platform == "linux" and torch is not None and torch.cuda:
        choices.append(KernelChoice("triton", "triton", None, "comes with PyTorch's Linux CUDA build"))
    for k in KERNELS:
        skip = None
        if platform not in k.platforms:
            if k.name == "triton-windows":
                continue  # Linux gets triton with torch; no triton on macOS
            skip = f"no builds for {platform}"
        elif torch is None or not torch.cuda:
            skip = "needs a CUDA build of PyTorch"
        elif not k.python[0] <= python <= k.python[1]:
            skip = f"no wheels for Python {python[0]}.{python[1]}"
        elif cc is not None and cc < k.min_cc:
            skip = f"needs compute capability {k.min_cc[0]}.{k.min_cc[1]}+ (RTX 30xx or newer); {gpu.describe()}"
        elif k.name == "triton-windows" and triton is None:
            skip = f"no triton-windows release is known to match torch {torch.version} (see TRITON_FOR_TORCH)"
        if skip:
            choices.append(KernelChoice(k.name, k.import_name, None, skip))
            continue
        if k.name == "triton-windows":
            spec = f"triton-windows>={triton[0]}.{triton[1]},<{triton[0]}.{triton[1] + 1}"
        else:
            spec = k.name
        choices.append(KernelChoice(k.name, k.import_name, spec, k.what, k.needs_triton))
    return choices


# ------------------------------------------------------------------------------------ plan, marker, log


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
            f"Driver:   NVIDIA {gpus[0].driver_version}" + (f", supports CUDA up to {_fmt_cuda(cuda)}" if cuda else "")
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


def append_log(venv: Path, lines: Sequence[str]) -> None:
    """Append time-stamped lines to .venv/install.log (silently skipped while .venv does not exist)."""
    if not venv.is_dir():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with (venv / LOG_NAME).open("a", encoding="utf-8") as fh:
        fh.writelines(f"{stamp} {line}\n" for line in lines)


# ------------------------------------------------------------------------------------------ Python & venv


def python_problems(
    version: tuple[int, int, int], pointer_bits: int, executable: str, platform: str
) -> tuple[list[str], list[str]]:
    """Can this interpreter host the venv? (errors, warnings)."""
    errors, warnings = [], []
    have = ".".join(map(str, version))
    wanted = f"Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]} to {PYTHON_MAX[0]}.{PYTHON_MAX[1]} (64-bit; 3.12 recommended)"
    get = "https://www.python.org/downloads/" + ("windows/" if platform == "windows" else "")
    if version[:2] < PYTHON_MIN:
        errors.append(f"Python {have} ({executable}) is too old: wan-local needs {wanted}. Get one from {get}.")
    elif version[:2] > PYTHON_MAX:
        errors.append(
            f"Python {have} ({executable}) is newer than PyTorch's builds support: wan-local needs {wanted}. "
            f"Install Python 3.12 from {get} and run this again with it (set WAN_LOCAL_PYTHON to its path)."
        )
    if pointer_bits != 64:
        errors.append(f"Python {have} ({executable}) is a 32-bit build; PyTorch needs 64-bit Python ({get}).")
    if platform == "windows" and "WindowsApps" in executable:
        warnings.append(
            "This Python comes from the Microsoft Store, which redirects some file writes; if the set-up fails, "
            f"install Python from {get} instead."
        )
    return errors, warnings


def windows_long_paths_enabled() -> bool:
    """Is the Windows 260-character path limit lifted (LongPathsEnabled = 1)?"""
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except OSError:
        return False


def path_length_warning(root: Path, long_paths: bool) -> str | None:
    """Warn when PyTorch's deepest files would pass Windows' 260-character limit inside root/.venv."""
    venv_site = len(str(root)) + len("\\.venv\\Lib\\site-packages\\")
    if long_paths or venv_site + LONGEST_TORCH_FILE < WINDOWS_MAX_PATH:
        return None
    return (
        f"The folder path {root} is {len(str(root))} characters long; some PyTorch files would pass Windows' "
        f"260-character path limit and the install would fail with 'No such file or directory'. Move the folder "
        r"somewhere shorter (e.g. C:\wan-local), or enable long paths (Windows setting 'LongPathsEnabled')."
    )


def venv_python(venv: Path, platform: str) -> Path:
    """The venv's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    return venv / "Scripts" / "python.exe" if platform == "windows" else venv / "bin" / "python"


def _venv_state(python: Path) -> str:
    """ "ok", "missing", "no-pip" (Python runs, pip does not import) or "broken" (the Python does not start)."""
    if not python.exists():
        return "missing"
    for code, failure in (("import sys", "broken"), ("import pip", "no-pip")):
        try:
            proc = subprocess.run([str(python), "-c", code], capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:  # slow, not broken (antivirus scans): never delete the venv for it
            raise SetupError(f"{python} did not answer within {exc.timeout:.0f} s; run this again.") from exc
        except OSError:
            return "broken"
        if proc.returncode != 0:
            return failure
    return "ok"


def ensure_venv(venv: Path, platform: str) -> str:
    """Make `venv` usable and say what was done. A venv whose pip is missing (e.g. an interrupted pip upgrade)
    gets pip back with ensurepip and keeps its packages; a venv whose Python no longer starts (e.g. the Python it
    was made from was uninstalled) or that never got pip (a creation that failed half-way) is made anew."""
    python = venv_python(venv, platform)
    state = _venv_state(python)
    if state == "ok":
        return f"using the virtual environment {venv}"
    if state == "no-pip":
        subprocess.run([str(python), "-m", "ensurepip", "--upgrade", "--default-pip"], capture_output=True, check=False)
        if _venv_state(python) == "ok":
            return f"restored pip in the virtual environment {venv}"
    if venv.exists():
        print(f"The virtual environment {venv} is broken (its Python or pip does not start); re-creating it.")
        try:
            shutil.rmtree(venv)
        except OSError as exc:
            raise SetupError(
                f"Could not delete the broken {venv} ({exc}). Close wan-local, delete it by hand, and run this again."
            ) from exc
    print(f"Creating the virtual environment {venv} with Python {sys.version.split()[0]} ...", flush=True)
    import venv as venv_module

    hint = (
        "On Debian/Ubuntu install the venv module first: sudo apt install python3-venv"
        if (platform == "linux")
        else "Reinstall Python from https://www.python.org/downloads/ (with pip)."
    )
    try:
        venv_module.EnvBuilder(with_pip=True).create(venv)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise SetupError(f"Could not create {venv}: {exc}. {hint}") from exc
    if _venv_state(python) != "ok":
        shutil.rmtree(venv, ignore_errors=True)
        raise SetupError(f"The new {venv} has no working pip. {hint}")
    return f"created the virtual environment {venv}"


# ------------------------------------------------------------------------------------------ subprocesses


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


def _pip(python: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, errors="replace", check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _imports(python: str, module: str) -> tuple[bool, str]:
    proc = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, errors="replace", timeout=600, check=False
    )
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode == 0, last


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_kernels(
    choices: Sequence[KernelChoice],
    python: str,
    combo: str,
    log: Callable[[str], None],
    *,
    pip: Callable[..., tuple[int, str]] = _pip,
    imports: Callable[[str, str], tuple[bool, str]] = _imports,
    installed_version: Callable[[str], str | None] = _installed_version,
) -> list[str]:
    """Try each kernel that has a spec as a prebuilt wheel into `python`'s environment; one line per kernel.
    Never raises for a kernel (`pip`, `imports`, `installed_version` are replaceable for tests).

    A wheel that installs but does not import (built for another torch, missing DLL) is uninstalled again, so
    the engine never meets a broken kernel. A kernel not tried this time but installed earlier (e.g. before a
    driver change swapped torch) is kept only while it still imports.
    """
    lines = []
    triton_ok = None
    for k in choices:
        if k.spec is None:
            if k.name == "triton":
                triton_ok = imports(python, "triton")[0]
                lines.append(f"triton: {'ready' if triton_ok else 'missing'} - {k.reason}")
            elif installed_version(k.name) and not imports(python, k.import_name)[0]:
                pip(python, "uninstall", "-y", k.name)
                lines.append(f"{k.name}: removed an earlier install that no longer imports")
            else:
                lines.append(f"{k.name}: skipped - {k.reason}")
            continue
        if k.needs_triton:
            if triton_ok is None:
                triton_ok = imports(python, "triton")[0]
            if not triton_ok:
                lines.append(f"{k.name}: skipped - needs Triton, which is not available")
                continue
        status, output = pip(python, "install", "--only-binary=:all:", "--no-deps", k.spec)
        log(f"pip install --only-binary=:all: --no-deps {k.spec} -> exit {status}\n{output.strip()}")
        if status != 0:
            lines.append(f"{k.name}: skipped - no prebuilt wheel for {combo}")
            continue
        ok, error = imports(python, k.import_name)
        if not ok:
            pip(python, "uninstall", "-y", k.name)
            lines.append(f"{k.name}: skipped - the prebuilt wheel does not import here ({error}); removed")
            continue
        if k.import_name == "triton":
            triton_ok = True
        lines.append(f"{k.name}: installed {installed_version(k.name) or '?'} - {k.reason}")
    return lines


# ------------------------------------------------------------------------------------------------- CLI


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _current_plan(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> dict:
    gpus, detection = detect_gpus(env, platform)
    return build_plan(
        gpus,
        detection,
        platform,
        force_cpu=args.cpu,
        requirement=torch_requirement(args.project / "pyproject.toml"),
        env=env,
        have=installed_torch(),
        pyproject_sha256=file_sha256(args.project / "pyproject.toml"),
        python=tuple(sys.version_info[:3]),
    )


def _kernel_choices_now(plan: Mapping, platform: str) -> list[KernelChoice]:
    return choose_kernels(platform, tuple(sys.version_info[:2]), installed_torch(), gpus_from_plan(plan))


def cmd_ensure_venv(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    errors, warnings = python_problems(tuple(sys.version_info[:3]), struct.calcsize("P") * 8, sys.executable, platform)
    _print([f"WARNING: {w}" for w in warnings])
    if errors:
        raise SetupError("\n".join(errors))
    if platform == "windows":
        warning = path_length_warning(args.project, windows_long_paths_enabled())
        if warning:
            print(f"WARNING: {warning}")
    print(ensure_venv(args.venv, platform))
    return 0


def cmd_plan(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = _current_plan(args, env, platform)
    have = installed_torch()
    kernels = _kernel_choices_now(plan, platform) if have else None
    if args.json:
        plan["kernels"] = [dataclasses.asdict(k) for k in kernels] if kernels is not None else None
        print(json.dumps(plan, indent=2))
        return 0
    _print(describe_plan(plan))
    for k in kernels or []:
        print(f"          {k.name}: " + (f"try {k.spec}" if k.spec else f"skip - {k.reason}"))
    return 0


def cmd_start(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    args.venv.mkdir(parents=True, exist_ok=True)
    (args.venv / MARKER_NAME).unlink(missing_ok=True)  # from here on, an interruption means "not installed"
    plan = _current_plan(args, env, platform)
    lines = describe_plan(plan)
    print("== What this set-up will do")
    _print(lines)
    append_log(args.venv, ["set-up started", *lines])
    write_json(args.venv / PLAN_NAME, plan)
    if plan["torch"]["error"]:
        return EXIT_BLOCKED
    if args.env_file:
        Path(args.env_file).write_text("\n".join(plan_env_lines(plan)) + "\n", encoding="utf-8")
    return 0


def cmd_verify(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME) or {}
    tag = plan.get("torch", {}).get("tag", "")
    ok, lines = verify_torch(sys.executable, platform, tag)
    _print(lines)
    append_log(args.venv, lines)
    return 0 if ok else 1


def cmd_kernels(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME) or {}
    have = installed_torch()
    choices = _kernel_choices_now(plan, platform)
    combo = f"{platform} / Python {sys.version_info[0]}.{sys.version_info[1]} / torch {have.version if have else '-'}"
    print("== Optional speed-ups (prebuilt wheels only; without them the app uses PyTorch's SDPA attention)")
    lines = install_kernels(choices, sys.executable, combo, lambda text: append_log(args.venv, [text]))
    _print(["   " + line for line in lines])
    append_log(args.venv, lines)
    return 0


def cmd_mark(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME)
    if plan is None:
        raise SetupError(f"{args.venv / PLAN_NAME} is missing: run the whole set-up (run.sh / run.bat --repair).")
    have = installed_torch()
    plan.update(completed=True, installed_torch=have.version if have else None, completed_at=time.time())
    write_json(args.venv / MARKER_NAME, plan)
    append_log(args.venv, ["set-up completed"])
    version = have.version if have else "?"
    print(f"Set-up complete: PyTorch {version} ({plan['torch']['tag']} build).")
    if plan["torch"]["warning"]:  # repeated once at the end, where it is not lost among pip's output
        print(f"WARNING: {plan['torch']['warning']}")
    return 0


def cmd_check(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = _current_plan(args, env, platform)
    have = installed_torch()
    reasons, warnings = marker_problems(read_json(args.venv / MARKER_NAME), plan, have)
    _print([f"WARNING: {w}" for w in warnings])
    if reasons:
        print("Set-up needed: " + "; ".join(reasons) + ".")
        append_log(args.venv, ["set-up needed: " + "; ".join(reasons)])
        return 1
    print(f"Set-up is complete and fits this PC (PyTorch {have.version if have else '?'}).")
    return 0


def cmd_log(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    append_log(args.venv, [" ".join(args.message)])
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failure or set-up needed, 3 blocked)."""
    if hasattr(sys.stdout, "reconfigure"):  # never die on a character the console cannot show
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = argparse.ArgumentParser(prog="setup_env.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help="project folder (default: this checkout)")
    parser.add_argument("--venv", type=Path, default=None, help="virtual environment (default: PROJECT/.venv)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "ensure-venv": (cmd_ensure_venv, "check this Python and create or repair the venv"),
        "plan": (cmd_plan, "print the decisions for this PC (changes nothing)"),
        "start": (cmd_start, "begin a set-up: forget the marker, log and write the plan"),
        "verify": (cmd_verify, "import the installed torch and report what it can use"),
        "kernels": (cmd_kernels, "try the optional prebuilt kernels (never fails)"),
        "mark": (cmd_mark, "record a completed set-up"),
        "check": (cmd_check, "exit 0 if the recorded set-up fits this PC, 1 if it must run"),
        "log": (cmd_log, "append a line to .venv/install.log"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        if name in ("plan", "start", "check"):
            p.add_argument("--cpu", action="store_true", help="choose the CPU build of PyTorch")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        if name == "start":
            p.add_argument("--env-file", help="write KEY=VALUE lines for the shell scripts here")
        if name == "log":
            p.add_argument("message", nargs="+")
    args = parser.parse_args(argv)
    args.project = args.project.resolve()
    args.venv = (args.venv or args.project / ".venv").absolute()
    try:
        return args.func(args, os.environ if env is None else env, current_platform())
    except SetupError as exc:
        print(f"ERROR: {exc}", flush=True)
        append_log(args.venv, [f"ERROR: {exc}"])
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
