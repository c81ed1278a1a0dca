"""NVIDIA's table of CUDA releases and the first driver of each: which CUDA a driver runs, which driver a CUDA
release needs."""

from __future__ import annotations

from dataclasses import dataclass

from .versions import compare_versions, version_tuple

NVIDIA_DRIVERS_URL = "https://www.nvidia.com/drivers"


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
        if compare_versions(have, version_tuple(need)) >= 0:
            return release.cuda
    return None


def format_cuda(cuda: tuple[int, int]) -> str:
    """A CUDA version as people write it: (12, 6) -> "12.6"."""
    return f"{cuda[0]}.{cuda[1]}"
