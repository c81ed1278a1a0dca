"""The app and a worker it did not start: a killed app's worker keeps running its job and the next app adopts it
(no second worker, the Queue tab says which worker runs, Restart stops the orphan and starts a fresh one); a worker
that another live program runs is reported and left alone. Real processes, a real SQLite file, SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

from test_worker import FAULT_WORKER, _wait

from ui.queue import QueueHandlers
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.jobs.supervisor import WorkerProcess
from wan_local.processes import process_alive

_APP = (
    "import sys, time; from wan_local.jobs.supervisor import WorkerProcess; "
    "w = WorkerProcess(sys.argv[1], entry=(sys.argv[2],)).start(); print(w.proc.pid, flush=True); time.sleep(600)"
)


def _tab_line(worker: WorkerProcess) -> tuple[str, bool]:
    return QueueHandlers(types.SimpleNamespace(worker=worker)).worker_line()


def test_a_killed_apps_worker_is_adopted_reported_restarted_and_stopped(tiny, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = {"task": "t2v-A14B", "ckpt_dir": str(tiny / "t2v-A14B"), "size": (64, 48), "frames": 5, "device": "cpu"}
    job = store.add(JobSettings(prompt="a long fox", steps=12, seed=1, **settings))
    env = {**os.environ, "WAN_LOCAL_HOME": str(tmp_path), "FAULT_PAUSE_S": "0.4"}
    app = subprocess.Popen(
        [sys.executable, "-c", _APP, str(store.path), FAULT_WORKER[0]], stdout=subprocess.PIPE, text=True, env=env
    )
    orphan = int(app.stdout.readline())
    ui = WorkerProcess(store.path, env=env, entry=FAULT_WORKER)
    try:
        _wait("the job to progress", lambda: store.get(job.id).progress.step >= 1, timeout=180)
        app.kill()  # SIGKILL: the app gets no chance to stop its worker
        app.wait()
        assert process_alive(orphan), "the worker outlives the app"

        ui.start()  # the next app
        assert ui.proc is None and ui.adopted is not None and ui.adopted.pid == orphan, "adopted, no second worker"
        line, offer_restart = _tab_line(ui)
        assert line.startswith(f"✓ Worker running (pid {orphan}, left running by an earlier session")
        assert not offer_restart
        step = store.get(job.id).progress.step
        _wait("progress under the adopted worker", lambda: store.get(job.id).progress.step > step, timeout=60)

        message = ui.restart()  # the orphan hands the job back; a fresh worker of this app continues it
        assert message == f"Worker restarted (pid {ui.proc.pid})." and not process_alive(orphan)
        lines = []
        for _ in range(10):  # no flipping between ✓ and ✗
            lines.append(_tab_line(ui))
            time.sleep(0.2)
        assert set(lines) == {(f"✓ Worker running (pid {ui.proc.pid}); log: {ui.log_path}", False)}
        _wait("the job done", lambda: store.get(job.id).state == "done", timeout=300)
        ui.stop()
        assert ui.proc.returncode == 0 and store.serving_worker() is None
    finally:
        for pid in (orphan, ui.proc.pid if ui.proc else None):
            if pid is not None and process_alive(pid):
                os.kill(pid, 9)
        if app.poll() is None:
            app.kill()
    done = store.get(job.id)
    assert (done.state, done.attempts, done.crashes) == ("done", 2, 0), "handed back by SIGTERM: no crash"


def test_a_worker_another_program_runs_is_reported_and_left_alone(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.register_worker("terminal")  # this test process, as if `wan-local worker` ran in a terminal
    ui = WorkerProcess(store.path).start()
    assert ui.proc is None and ui.adopted is None and ui.alive()
    line, offer_restart = _tab_line(ui)
    assert line.startswith(f"✓ Worker running (pid {os.getpid()}, started by another program, pid {os.getppid()})")
    assert not offer_restart and ui.restart().startswith("Not restarted: Worker running")
    ui.stop()  # leaves it alone (it is this very process)
    store.unregister_worker("terminal")
    assert not ui.alive() and ui.describe() == "The worker is not started."
