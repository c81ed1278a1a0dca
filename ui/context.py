"""What every tab works with: the objects app.py built, handed down explicitly (no module-level state)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ui.prediction import Estimator
from ui.served import ServedFiles
from wan_local.jobs.store import JobStore
from wan_local.machine import MachineInfo
from wan_local.models_hub import DownloadManager
from wan_local.presets import Pick, Preset, pick_preset
from wan_local.settings import SettingsStore

log = logging.getLogger(__name__)


class WorkerControl(Protocol):
    """The worker process as the UI sees it (app.WorkerProcess; tests use a fake)."""

    def alive(self) -> bool:
        """Whether the worker process is running."""
        ...

    def describe(self) -> str:
        """One line: running (pid), or stopped with its exit code and last log line."""
        ...

    def restart(self) -> str:
        """Start the worker again (stopping a live one first); return what happened."""
        ...


def refresh_ram(machine: MachineInfo, disk_path: Path | None = None) -> MachineInfo:
    """`machine` with RAM available (and free disk) measured now. VRAM is not re-measured here: that would
    create a CUDA context in the UI process, costing VRAM the worker needs."""
    import psutil

    changes: dict[str, int] = {"ram_available_bytes": int(psutil.virtual_memory().available)}
    if disk_path is not None:
        with contextlib.suppress(OSError):
            changes["disk_free_bytes"] = int(shutil.disk_usage(disk_path).free)
    return dataclasses.replace(machine, **changes)


@dataclass
class AppContext:
    """The app's objects. `machine` is the startup snapshot; `machine_now()` re-measures RAM for admission.
    `pick` is the automatic preset choice for this machine; `served` says which files the browser may fetch."""

    store: JobStore
    settings: SettingsStore
    machine: MachineInfo
    presets: Mapping[str, Preset]
    worker: WorkerControl | None
    hub: DownloadManager
    estimator: Estimator | None
    #: What the browser may fetch (the output and previews folders); rebuilt when the settings change.
    served: ServedFiles
    pick: Pick = field(init=False)
    measure: Callable[[MachineInfo], MachineInfo] | None = None

    def __post_init__(self) -> None:
        self.pick = pick_preset(self.machine, self.presets)

    def machine_now(self) -> MachineInfo:
        """The machine with RAM measured now (or as `measure` says, in tests)."""
        if self.measure is not None:
            return self.measure(self.machine)
        return refresh_ram(self.machine, self.store.folder)

    def output_dir(self) -> Path:
        """Where new videos go: the Settings tab's folder, else <home>/outputs."""
        chosen = self.settings.current.output_dir
        return Path(chosen).expanduser() if chosen else self.store.outputs_dir

    def new_video_path(self, task: str, size: tuple[int, int], prompt: str) -> str | None:
        """Where a new job's video goes: None (the worker names the file in <home>/outputs) unless the Settings
        tab chose another folder, then a new file there named after the time, task, size and prompt."""
        folder = self.output_dir()
        if folder.absolute() == self.store.outputs_dir.absolute():
            return None
        words = "".join(c if c.isalnum() or c in "-_" else "_" for c in prompt.strip())[:40].strip("_") or "video"
        stamp = time.strftime("%Y%m%d_%H%M%S")
        name = f"{stamp}_{task}_{size[0]}x{size[1]}_{words}_{uuid.uuid4().hex[:6]}.mp4"
        return str((folder / name).absolute())
