"""What a job is: its settings (stored as JSON), its progress and a snapshot of its queue row."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from wan_local.engine.request import JobSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobProgress:
    """Last reported progress: denoise `step` of `total` (1-based, 0 = not started), the current stage, the
    estimated seconds left; updated_at is the worker's last report (a progress event or a heartbeat)."""

    step: int = 0
    total: int = 0
    stage: str | None = None
    eta_seconds: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class Job:
    """A snapshot of one row of the queue. Times are Unix seconds; position orders the queue (lower first)."""

    id: int
    state: str
    position: int
    settings: JobSettings
    resolved_seed: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    note: str | None
    output_path: str | None
    progress: JobProgress
    preview_path: str | None
    attempts: int
    oom_retries: int
    cancel_requested: bool
    worker_id: str | None
    worker_pid: int | None
    heartbeat_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field, settings and progress nested."""
        data = dataclasses.asdict(self)
        data["settings"] = self.settings.to_dict()
        return data
