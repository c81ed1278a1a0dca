"""Which PyTorch build to install for the detected GPUs and driver, and why."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .drivers import NVIDIA_DRIVERS_URL, cuda_for_driver, format_cuda, min_driver
from .gpus import GpuInfo

TORCH_INDEX = "https://download.pytorch.org/whl/"
PIP_DEFAULT_INDEX = "default"  # value of WAN_LOCAL_TORCH_INDEX_URL meaning "pip's configured index"
ENV_TORCH_SPEC = "WAN_LOCAL_TORCH_SPEC"  # e.g. torch==2.13.0: replaces the torch requirement (tests, pinning)
ENV_TORCH_INDEX = "WAN_LOCAL_TORCH_INDEX_URL"  # replaces the wheel index, or "default"


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
        supports = f"supports CUDA {format_cuda(driver_cuda)}" if driver_cuda else "is older than CUDA 11.4"
        error = (
            f"The NVIDIA driver {gpu.driver_version} {supports}, but PyTorch needs CUDA {format_cuda(oldest.cuda)} "
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
                f"The {gpu.name} (compute capability {cc_text}) needs PyTorch's CUDA {format_cuda(need.cuda)} build, "
                f"but the driver {gpu.driver_version} supports only CUDA {format_cuda(driver_cuda)}. Update the "
                f"driver to {min_driver(need.cuda, platform)} or newer ({NVIDIA_DRIVERS_URL}), then run this again."
            )
        return TorchChoice("none", None, requirement, "No PyTorch CUDA build supports this GPU.", error=error)

    build = usable[0]
    several = f" (the GPU with the most memory of {len(gpus)})" if len(gpus) > 1 else ""
    reason = (
        f"{gpu.describe()}{several}; driver {gpu.driver_version} supports CUDA up to {format_cuda(driver_cuda)}: "
        f"PyTorch's CUDA {format_cuda(build.cuda)} build ({build.tag}) is the newest this driver and GPU can run."
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
            f"PyTorch stopped publishing CUDA {format_cuda(build.cuda)} builds after torch {build.last_torch}, so "
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
