"""The scripting API as a script uses it: the real app (`python app.py`, its worker running jobs on the CPU) on a
free port, driven through gradio_client. view_api() lists exactly the named endpoints; a tiny t2v-A14B job added
without a model folder (the Settings tab's is used) runs to the end, its MP4 comes back through /job_result and
carries the settings it was made with (the negative prompt actually used included); a job that does not fit is
refused with the admission's message and nothing is queued; cancel and retry; a file that was not uploaded is
never read. Also, without a server: an upload's source is recorded by its name, and predictions log no refusal.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from running_app import app_env, free_port, running_app

from wan_local.specs import DEFAULT_NEGATIVE_PROMPT

ENDPOINTS = {"/add_job", "/job_status", "/job_result", "/list_jobs", "/cancel_job", "/retry_job", "/estimate"}
TINY_JOB = {"task": "t2v-A14B", "size": "64*48", "frames": 5, "steps": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny):
    """The app with its worker, a fresh home whose settings point t2v-A14B at the tiny checkpoints and run jobs on
    the CPU; yields (gradio_client.Client, home)."""
    from gradio_client import Client

    root = tmp_path_factory.mktemp("api")
    home = root / "home"
    home.mkdir()
    settings = {"model_dirs": {"t2v-A14B": str(tiny / "t2v-A14B")}, "device": "cpu"}
    (home / "settings.json").write_text(json.dumps(settings))
    port = free_port()
    with running_app(["--home", str(home)], root / "app.log", app_env(), port):
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(root / "downloads")), home


def api_error(client, **params) -> str:
    """The message of the error an endpoint call raises."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        client.predict(**params)
    return str(raised.value)


def test_view_api_lists_only_the_named_endpoints(app):
    client, _ = app
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == ENDPOINTS and not info["unnamed_endpoints"], info
    params = [p["parameter_name"] for p in info["named_endpoints"]["/add_job"]["parameters"]]
    assert params[:11] == [
        "task", "prompt", "negative_prompt", "size", "frames", "steps", "seed", "guidance", "shift", "solver", "image",
    ]  # fmt: skip
    assert {"preset", "model_dir", "device", "dtype", "force", "memory"} <= set(params)


def test_a_job_queued_through_the_api_runs_and_its_video_comes_back_with_its_settings(app, tiny):
    from gradio_client import handle_file

    from wan_local.jobs.store import JobStore
    from wan_local.video import read_settings

    client, home = app
    added = client.predict(**TINY_JOB, prompt="a red fox in snow", seed=42, api_name="/add_job")
    assert isinstance(added["job_id"], int) and added["seed"] == 42 and added["preset"] == "cpu", added
    assert added["estimate"]["peak_ram_bytes"] > 0 and "Fits with" in added["message"], added
    job_id = added["job_id"]

    # An image job behind it (cancelled before it starts: one worker runs the queue in order), retried, cancelled.
    image = tiny / "golden" / "ti2v_input.png"
    spare = client.predict(
        task="ti2v-5B", prompt="a grey wolf", size="64*64", frames=5, steps=2, model_dir=str(tiny / "ti2v-5B"),
        image=handle_file(str(image)), api_name="/add_job",
    )["job_id"]  # fmt: skip
    assert client.predict(spare, api_name="/cancel_job")["state"] == "cancelled"
    assert client.predict(spare, api_name="/retry_job")["state"] == "queued"
    assert client.predict(spare, api_name="/cancel_job")["state"] == "cancelled"
    assert "not done" in api_error(client, job_id=spare, api_name="/job_result")
    stored = JobStore(home / "jobs.sqlite3").get(spare).settings
    assert stored.image_source == "ti2v_input.png (uploaded)"  # not the temporary path of the upload
    assert Path(stored.image).parent == home / "inputs" and Path(stored.image).read_bytes() == image.read_bytes()

    deadline, seen = time.monotonic() + 90, []
    while (status := client.predict(job_id, api_name="/job_status"))["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {status}"
        seen.append((status["state"], status["stage"], status["step"], status["steps"]))
        time.sleep(0.5)
    assert status["state"] == "done" and status["error"] is None, status
    assert (status["step"], status["steps"], status["seed"]) == (2, 2, 42), status
    assert all(state in ("queued", "running") and steps == 2 for state, _, _, steps in seen), seen

    video = Path(client.predict(job_id, api_name="/job_result"))
    assert video.read_bytes() == Path(status["video"]).read_bytes()
    assert Path(status["video"]).parent == home / "outputs"  # the folder the Gallery reads
    meta = read_settings(video)
    assert (meta["prompt"], meta["seed"], meta["size"], meta["frames"], meta["steps"], meta["job_id"]) == (
        "a red fox in snow", 42, "64*48", 5, 2, job_id,
    )  # fmt: skip
    assert meta["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT  # what the job ran with, not ""
    assert (meta["device"], meta["preset"], meta["image_source"]) == ("cpu", "cpu", None)

    jobs = client.predict("", api_name="/list_jobs")
    assert [(j["job_id"], j["state"]) for j in jobs] == [(job_id, "done"), (spare, "cancelled")]
    assert [j["job_id"] for j in client.predict("cancelled", api_name="/list_jobs")] == [spare]


def test_a_job_that_does_not_fit_is_refused_with_the_admission_message(app):
    client, _ = app
    before = client.predict("", api_name="/list_jobs")
    # The lowest GPU preset has no CPU fallback: on the CPU it cannot run at all.
    job = {**TINY_JOB, "prompt": "a red fox in snow", "preset": "gpu16-ram32"}
    message = api_error(client, **job, api_name="/add_job")
    assert message.startswith("Not queued: this job does not fit this machine") and "needs a CUDA GPU" in message
    verdict = client.predict(**job, api_name="/estimate")
    assert verdict["admitted"] is False and verdict["preset"] is None and verdict["message"] == message
    assert "4k+1" in api_error(client, **{**job, "frames": 6}, api_name="/add_job")
    assert "quant='int4' is not one of" in api_error(
        client, **{**job, "memory": {"quant": "int4"}}, api_name="/add_job"
    )
    assert "unknown memory option(s) turbo" in api_error(
        client, **{**job, "memory": {"turbo": 1}}, api_name="/estimate"
    )
    assert "prompt is empty" in api_error(client, **{**TINY_JOB, "prompt": " "}, api_name="/add_job")
    assert "uploaded" in api_error(client, **{**job, "image": "/etc/passwd"}, api_name="/add_job")
    assert "no job 999" in api_error(client, job_id=999, api_name="/job_status")
    assert client.predict("", api_name="/list_jobs") == before  # nothing was queued


# ------------------------------------------------------------------------------------------------ no server


def test_an_uploaded_image_is_recorded_by_its_name_not_its_temporary_path(tmp_path, tiny):
    from gradio.utils import get_upload_folder

    from ui.served import uploaded_source

    upload = Path(get_upload_folder()) / "test-api-upload" / "my cat.png"
    assert uploaded_source(upload) == "my cat.png (uploaded)"
    assert uploaded_source(upload, "cat.png") == "cat.png (uploaded)"  # the name gradio_client sent
    assert uploaded_source(tiny / "golden" / "ti2v_input.png") is None  # a path of this computer is its own source


def test_a_prediction_logs_no_refusal_and_a_refused_submission_does(caplog, tiny, tmp_path):
    from wan_local.engine.admit import JobRefused
    from wan_local.engine.request import JobSettings
    from wan_local.jobs.store import JobStore
    from wan_local.jobs.submit import judge_job, queue_job

    job = JobSettings(task="t2v-A14B", prompt="p", ckpt_dir=str(tiny / "t2v-A14B"), size=(64, 48), frames=5,
                      steps=2, device="cpu", preset="gpu16-ram32")  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="wan_local"):
        assert not judge_job(job).admitted
    assert "job refused" not in caplog.text
    store = JobStore(tmp_path / "jobs.sqlite3")
    with caplog.at_level(logging.INFO, logger="wan_local"), pytest.raises(JobRefused):
        queue_job(store, job)
    assert "job refused: Not queued" in caplog.text and store.list() == []
