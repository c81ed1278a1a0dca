"""A real worker process with windows for a test's faults: `python tests/fault_worker.py --store ...` (the worker's
own flags), the code under test unchanged except for these test-only hooks, set by environment variables:

- FAULT_PAUSE_S: seconds to linger after each recorded progress report, before the MP4 encoder runs (its temp
  file already exists) and before the "done" commit (reported as the stage "commit"), so a test that sees the
  stage in the store can SIGKILL the worker inside it.
- A job whose prompt starts with "poison" kills its own worker (SIGKILL) as soon as it is claimed: a job that
  crashes the worker every time, like a driver fault or the kernel's out-of-memory killer would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

from wan_local.jobs import worker
from wan_local.jobs.runner import PipelineRunner
from wan_local.jobs.store import JobStore

PAUSE_S = float(os.environ.get("FAULT_PAUSE_S", "0"))

_update_progress, _finish, _claim_next, _run = (
    JobStore.update_progress, JobStore.finish, JobStore.claim_next, PipelineRunner.run,
)  # fmt: skip


def update_progress(self, *args, **kwargs):
    should_stop = _update_progress(self, *args, **kwargs)
    time.sleep(PAUSE_S)
    return should_stop


def finish(self, job_id, worker_id, state, **kwargs):
    if state == "done":
        self.update_progress(job_id, worker_id, stage="commit")
    return _finish(self, job_id, worker_id, state, **kwargs)


def claim_next(self, worker_id):
    job = _claim_next(self, worker_id)
    if job is not None and job.settings.prompt.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return job


def encode(*args, **kwargs):
    time.sleep(PAUSE_S)
    return subprocess.run(*args, **kwargs)


def run(self, job, on_progress, cancel):
    from wan_local import video  # imports torch: only once a job runs

    video.subprocess = types.SimpleNamespace(run=encode)
    return _run(self, job, on_progress, cancel)


JobStore.update_progress, JobStore.finish, JobStore.claim_next, PipelineRunner.run = (
    update_progress, finish, claim_next, run,
)  # fmt: skip

if __name__ == "__main__":
    sys.exit(worker.main())
