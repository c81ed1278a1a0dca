"""What a job is: its settings (stored as JSON), its progress and a snapshot of its queue row; and how a row of the
`jobs` table becomes a `Job`, or is recognised as damaged.

A row that does not describe a job (settings that are not JSON or do not fit `JobSettings`, a column of the wrong
type: a hand-edited file, a bug of another version) raises `MalformedJob` naming what is wrong. The store then sets
it aside (`quarantined_job`: failed, with the reason) instead of letting one row break every reader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wan_local.engine.request import JobSettings

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
QUARANTINED = "this job's stored record is damaged"


class MalformedJob(ValueError):
    """A row of the jobs table that does not describe a job; `reason` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JobProgress:
    """Last reported progress: denoise `step` of `total` (1-based, 0 = not started), the current stage, the
    estimated seconds left of the whole job; updated_at is the worker's last report (a progress event or a
    heartbeat); `fraction` is the whole job's fraction done (0..1, stages weighted: wan_local.jobs.progress; None
    for a job run by an older version)."""

    step: int = 0
    total: int = 0
    stage: str | None = None
    eta_seconds: float | None = None
    updated_at: float | None = None
    fraction: float | None = None


@dataclass(frozen=True)
class Job:
    """A snapshot of one row of the queue. Times are Unix seconds; position orders the queue (lower first).
    attempts counts claims by a worker, crashes the workers that died while running it."""

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
    crashes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field, settings and progress nested."""
        data = dataclasses.asdict(self)
        data["settings"] = self.settings.to_dict()
        return data


# Column -> (allowed Python types of its value, whether NULL is allowed); SQLite itself accepts any type anywhere.
_NUMBER = (int, float)
_COLUMNS: dict[str, tuple[tuple[type, ...], bool]] = {
    **{c: ((int,), False) for c in ("position", "resolved_seed", "attempts", "oom_retries", "progress_step")},
    **{c: ((int,), False) for c in ("progress_total", "cancel_requested")},
    "created_at": (_NUMBER, False),
    **{c: (_NUMBER, True) for c in ("started_at", "finished_at", "eta_seconds", "progress_updated_at")},
    "progress_fraction": (_NUMBER, True),
    "heartbeat_at": (_NUMBER, True),
    **{c: ((str,), True) for c in ("error", "note", "output_path", "progress_stage", "preview_path", "worker_id")},
    "worker_pid": ((int,), True),
    "crashes": ((int,), True),  # NULL only where the column is missing (a row read before the migration)
}
# Job fields that hold their column's value as it is.
_AS_STORED = (
    "id", "state", "position", "resolved_seed", "created_at", "started_at", "finished_at", "error", "note",
    "output_path", "preview_path", "attempts", "oom_retries", "worker_id", "worker_pid", "heartbeat_at",
)  # fmt: skip
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": _NUMBER, "bool": (bool, int), "None": (type(None),), "tuple": (tuple,),
    "Mapping": (Mapping,), "dict": (Mapping,),
}  # fmt: skip


def _get(row: Mapping[str, Any], column: str) -> Any:
    """The column's value, None when the row has no such column (sqlite3.Row: `in` looks at values, not names)."""
    return row[column] if column in set(row.keys()) else None


def _check_columns(row: Mapping[str, Any]) -> None:
    if row["state"] not in STATES:
        raise MalformedJob(f"its state {row['state']!r} is not one of {', '.join(STATES)}")
    for column, (types, nullable) in _COLUMNS.items():
        value = _get(row, column)
        if value is None and nullable:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise MalformedJob(f"its column {column} holds {value!r}, not {' or '.join(t.__name__ for t in types)}")


def _check_setting_types(settings: JobSettings) -> None:
    """Each setting has a type its annotation allows (numbers inside tuples); unknown annotations are skipped."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        names = [alt.strip().split("[")[0] for alt in str(f.type).split("|")]
        if not all(name in _SETTING_TYPES for name in names):
            continue
        allowed = tuple(t for name in names for t in _SETTING_TYPES[name])
        bad = not isinstance(value, allowed)
        if isinstance(value, tuple):
            bad = bad or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in value)
        if bad:
            raise MalformedJob(f"its setting {f.name} is {value!r}, not {f.type!s}")


def settings_from_json(text: Any) -> JobSettings:
    """The JobSettings stored as `text`; MalformedJob when they are not JSON or do not fit."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise MalformedJob(f"its settings are not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MalformedJob(f"its settings are a JSON {type(data).__name__}, not an object")
    try:
        settings = JobSettings.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise MalformedJob(f"its settings do not fit this version of wan-local ({exc})") from exc
    _check_setting_types(settings)
    return settings


def job_from_row(row: Mapping[str, Any]) -> Job:
    """The `Job` a row of the `jobs` table describes; MalformedJob when it does not describe one."""
    _check_columns(row)
    progress = JobProgress(
        row["progress_step"], row["progress_total"], row["progress_stage"], row["eta_seconds"],
        row["progress_updated_at"], _get(row, "progress_fraction"),
    )  # fmt: skip
    return Job(
        **{name: row[name] for name in _AS_STORED},
        settings=settings_from_json(row["settings"]),
        progress=progress,
        cancel_requested=bool(row["cancel_requested"]),
        crashes=_get(row, "crashes") or 0,
    )


def quarantine_message(job_id: int, reason: str) -> str:
    """The error a damaged job is failed with."""
    return (
        f"{QUARANTINED} ({reason}); it was set aside and will not run. Remove it "
        f"(`wan-local queue remove {job_id}` or the Queue tab) and queue the video again"
    )


def quarantined_job(row: Mapping[str, Any], reason: str) -> Job:
    """A stand-in for a damaged row, enough to list and remove it: failed, with the reason as its error."""

    def number(column: str, default: float | None) -> Any:
        value = _get(row, column)
        return value if isinstance(value, _NUMBER) and not isinstance(value, bool) else default

    try:
        task = str(json.loads(row["settings"]).get("task", "unknown"))
    except (TypeError, ValueError, AttributeError):
        task = "unknown"
    return Job(
        id=row["id"], state="failed", position=int(number("position", 0)),
        settings=JobSettings(task=task, prompt="(damaged job record)"), resolved_seed=0,
        created_at=number("created_at", 0.0), started_at=None, finished_at=number("finished_at", None),
        error=quarantine_message(row["id"], reason), note=None, output_path=None, progress=JobProgress(),
        preview_path=None, attempts=int(number("attempts", 0)), oom_retries=0, cancel_requested=False,
        worker_id=None, worker_pid=None, heartbeat_at=None, crashes=int(number("crashes", 0)),
    )  # fmt: skip
