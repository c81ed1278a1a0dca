"""What the worker tidies up, at start and after each job: temp files that interrupted writes left behind, and
resume points that no job needs any more.

Temp files are named after their writer's pid (`wan_local.tempfiles`), so removing those of dead writers is safe
at any time, even while the UI copies an input image into the same folder. Resume points go once their job is
done (only after the "done" commit: a kill just before it resumes from the last step), or removed from the queue;
those of failed and cancelled jobs are kept for `keep_s` (a retry continues where the job stopped), then expire.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from wan_local import paths
from wan_local.errors import WanLocalError
from wan_local.jobs.resume import ResumePoints
from wan_local.jobs.store import JobStore
from wan_local.tempfiles import remove_orphans

log = logging.getLogger(__name__)

RESUME_KEEP_S = 7 * 24 * 3600.0


def job_folders(store: JobStore, resume_points: ResumePoints | None) -> set[Path]:
    """Every folder a job writes to: the store's inputs, previews and outputs, the resume points, the caches (the
    prompt embeddings' among them), and the folders of jobs' own output paths."""
    cache = paths.cache_dir()
    folders = {store.inputs_dir, store.previews_dir, store.outputs_dir, cache}
    with contextlib.suppress(OSError):
        folders.update(p for p in cache.iterdir() if p.is_dir())
    if resume_points is not None:
        folders.add(resume_points.folder)
    folders.update(Path(job.settings.output).parent for job in store.list() if job.settings.output)
    return folders


def prune_resume_points(
    store: JobStore, resume_points: ResumePoints, *, now: float | None = None, keep_s: float = RESUME_KEEP_S
) -> list[int]:
    """Delete the resume points of jobs that are done or gone, and of failed or cancelled jobs that ended (and
    whose file was written) more than `keep_s` ago; return their job ids."""
    now = time.time() if now is None else now
    saved = resume_points.saved()
    if not saved:
        return []
    jobs = {job.id: job for job in store.list()}
    pruned = []
    for job_id, written_at in sorted(saved.items()):
        job = jobs.get(job_id)
        ended = job is not None and job.state in ("failed", "cancelled")
        if job is None or job.state == "done" or (ended and now - max(job.finished_at or 0.0, written_at) > keep_s):
            pruned.append(job_id)
    for job_id in pruned:
        resume_points.discard(job_id)
    if pruned:
        log.info("deleted the resume points of job(s) %s (done, removed or expired)", ", ".join(map(str, pruned)))
    return pruned


def tidy(store: JobStore, resume_points: ResumePoints | None) -> None:
    """Remove temp files of dead writers from every job folder, then resume points no job needs. Problems are
    logged, never raised: tidying must not stop the worker."""
    try:
        for folder in sorted(job_folders(store, resume_points)):
            remove_orphans(folder)
        if resume_points is not None:
            prune_resume_points(store, resume_points)
    except (OSError, WanLocalError) as exc:
        log.warning("tidying up the job folders failed: %s", exc)
