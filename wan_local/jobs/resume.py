"""Resume points: latent + solver-state checkpoints of running jobs, so a crash or restart costs minutes, not the job.

One file per job (`job<id>.pt`, written atomically at most every `every_s` seconds) holds the latent after a
denoise step, the solver's state and a key of everything that determines the result (settings, seed, device,
dtype, memory options). A job resumes only from a file with its exact key.

A resume point outlives the run that wrote it until the job's outcome is committed: the worker deletes it only
after the job is recorded done (`wan_local.jobs.housekeeping`), so a kill between saving the video and that commit
costs the last steps, not the job. A cancelled or failed job keeps its resume point for a week (a retry continues
from it); a removed job's goes at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from wan_local.memory.options import MemoryOptions
from wan_local.tempfiles import atomic_write

if TYPE_CHECKING:
    from wan_local.jobs.records import Job

log = logging.getLogger(__name__)

_NAME = re.compile(r"^job(\d+)\.pt$")


class ResumePoints:
    """The resume points in `folder`, saved at most every `every_s` seconds per job."""

    def __init__(self, folder: Path, every_s: float = 60.0) -> None:
        self.folder = Path(folder)
        self.every_s = every_s

    def path(self, job_id: int) -> Path:
        return self.folder / f"job{job_id}.pt"

    @staticmethod
    def key(job: Job, device: str, dtype: str, memory: MemoryOptions) -> str:
        recipe = [job.settings.to_dict(), job.resolved_seed, device, dtype, dataclasses.asdict(memory)]
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, job_id: int, key: str):
        """(latent, solver state) saved for this job and key, or None."""
        import torch

        path = self.path(job_id)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            log.warning("job %d: unreadable resume point %s (%s); starting over", job_id, path, exc)
            return None
        if saved.get("key") != key:
            log.info("job %d: resume point is for other settings; starting over", job_id)
            return None
        return saved["latent"], saved["solver"]

    def save(self, job_id: int, key: str, latent, solver_state: dict) -> None:
        """Write the resume point atomically; OSError (a full disk) names the file."""
        import torch

        buffer = io.BytesIO()  # serialised in memory, so a full disk raises a plain OSError naming the file
        torch.save({"key": key, "latent": latent.detach().cpu(), "solver": solver_state}, buffer)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path(job_id), mode=None) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def discard(self, job_id: int) -> None:
        self.path(job_id).unlink(missing_ok=True)

    def saved(self) -> dict[int, float]:
        """{job id: modification time} of the resume points on disk."""
        out = {}
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return {}
        for path in entries:
            match = _NAME.match(path.name)
            if match is not None:
                try:
                    out[int(match.group(1))] = path.stat().st_mtime
                except OSError:
                    continue
        return out
