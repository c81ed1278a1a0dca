"""GPU detection: run nvidia-smi and read the NVIDIA GPUs, the driver and the CUDA version it supports."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .drivers import cuda_for_driver

ENV_NVIDIA_SMI = "WAN_LOCAL_NVIDIA_SMI"  # path of the nvidia-smi to run (tests, unusual installs)


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
