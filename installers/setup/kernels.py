"""The optional kernels (Triton, FlashAttention-2, SageAttention): which to try, and trying them as prebuilt
wheels only."""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .gpus import GpuInfo
from .torch_installed import InstalledTorch
from .versions import version_tuple

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
