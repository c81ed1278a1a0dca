"""What this machine has: GPU (name, total/free VRAM, compute capability), RAM and free disk.

Detection is cheap and safe on a CPU-only machine; CUDA is only queried when torch reports it available.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class MachineInfo:
    """A snapshot of the resources a job can use. Byte counts are exact integers; None means "no GPU"."""

    gpu_name: str | None
    vram_total_bytes: int
    vram_free_bytes: int
    cuda_capability: tuple[int, int] | None
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    def describe(self) -> str:
        gpu = (
            f"{self.gpu_name}, {self.vram_free_bytes / GIB:.1f} of {self.vram_total_bytes / GIB:.1f} GiB VRAM free"
            if self.gpu_name
            else "no CUDA GPU"
        )
        return (
            f"{gpu}; RAM {self.ram_available_bytes / GIB:.1f} of {self.ram_total_bytes / GIB:.1f} GiB available; "
            f"disk {self.disk_free_bytes / GIB:.0f} GiB free"
        )


def detect_machine(disk_path: Path | str = ".", device_index: int = 0) -> MachineInfo:
    """Measure the machine now. `disk_path` is where outputs/models go (its filesystem's free space counts)."""
    vm = psutil.virtual_memory()
    try:
        disk_free = shutil.disk_usage(Path(disk_path).expanduser().resolve()).free
    except OSError:
        disk_free = 0
    gpu_name, total, free, capability = None, 0, 0, None
    try:
        import torch

        if torch.cuda.is_available():
            gpu_name = torch.cuda.get_device_name(device_index)
            free, total = torch.cuda.mem_get_info(device_index)
            capability = tuple(torch.cuda.get_device_capability(device_index))
    except (ImportError, RuntimeError) as exc:  # a broken driver must not stop the app from starting
        log.warning("CUDA is unusable, continuing without a GPU: %s", exc)
        gpu_name, total, free, capability = None, 0, 0, None
    return MachineInfo(
        gpu_name=gpu_name,
        vram_total_bytes=int(total),
        vram_free_bytes=int(free),
        cuda_capability=capability,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        disk_free_bytes=int(disk_free),
    )
