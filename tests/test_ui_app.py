"""The Gallery and Settings tabs' handlers against a real store and a real MP4 (settings read back and reused,
settings saved atomically), and app.py as users start it (light import, the next free port, the worker process
reported, restarted and stopped). Fixtures from test_ui."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ui import add_direct, home, make_ctx, presets, t2v_form, with_model_dir  # noqa: F401

from ui.gallery import GalleryHandlers, open_folder
from ui.generate_form import CUSTOM
from ui.models import ModelsHandlers
from ui.settings import SettingsHandlers
from wan_local.jobs.store import JobStore
from wan_local.settings import AppSettings, SettingsError, SettingsStore, load_settings, save_settings
from wan_local.video import save_video

# ------------------------------------------------------------------------------------------------ gallery


def test_gallery_reads_settings_back_from_the_mp4_and_reuses_them(make_ctx, tiny):  # noqa: F811
    ctx = make_ctx()
    video = torch.linspace(-1, 1, 3 * 5 * 48 * 64).reshape(3, 5, 48, 64)
    meta = {"task": "t2v-A14B", "prompt": "a red fox in snow", "negative_prompt": "", "size": "64*48", "frames": 5,
            "steps": 3, "shift": 12.0, "guide_scale": [3.0, 4.0], "solver": "dpm++", "seed": 987654, "fps": 16,
            "video_size": "64*48", "job_id": 42, "preset": "cpu"}  # fmt: skip
    save_video(video, ctx.output_dir() / "fox.mp4", 16, meta)
    save_video(video, ctx.output_dir() / ".partial.mp4", 16, meta)  # a file still being written: not listed
    g = GalleryHandlers(ctx)
    items = g.items()
    assert [Path(i.path).name for i in items] == ["fox.mp4"] and items[0].job_id == 42
    (row,) = g.rows(items)
    assert row[0] == "fox.mp4" and row[2:] == ["t2v-A14B", "64×48", 5, "987654", "a red fox in snow"]
    details = g.details(items[0].path)
    assert "a red fox in snow" in details and "987654" in details
    form, message = g.reuse(items[0].path)
    assert (form.task, form.prompt, form.seed, form.solver) == ("t2v-A14B", "a red fox in snow", "987654", "dpm++")
    assert (form.size, form.custom_size, form.length, form.steps) == (CUSTOM, "64*48", 5, 3)
    assert form.model_dir == str(tiny / "t2v-A14B") and "seed 987654" in message

    # A done job's output elsewhere is listed too (newest first).
    other = save_video(video, ctx.store.folder / "elsewhere" / "wolf.mp4", 16, {**meta, "prompt": "wolf"})
    job_id = add_direct(ctx.store, "wolf")
    ctx.store.register_worker("w")
    ctx.store.claim_next("w")
    ctx.store.finish(job_id, "w", "done", output_path=str(other))
    time.sleep(0.01)
    assert [Path(i.path).name for i in g.items()] == ["wolf.mp4", "fox.mp4"]


def test_open_folder_uses_the_file_manager_or_shows_the_path(tmp_path):
    calls = []
    headless = open_folder(tmp_path, platform="linux", env={}, which=lambda _: "/usr/bin/xdg-open", popen=calls.append)
    assert "headless" in headless and str(tmp_path) in headless and calls == []
    desktop = open_folder(
        tmp_path, platform="linux", env={"DISPLAY": ":0"}, which=lambda _: "/usr/bin/xdg-open",
        popen=lambda cmd, **kw: calls.append(cmd),
    )  # fmt: skip
    assert desktop.startswith("Opened") and calls == [["/usr/bin/xdg-open", str(tmp_path)]]
    open_folder(tmp_path, platform="darwin", popen=lambda cmd, **kw: calls.append(cmd))
    assert calls[-1] == ["open", str(tmp_path)]


# ------------------------------------------------------------------------------------------------ settings / models


def test_settings_round_trip_atomically_and_survive_a_broken_file(tmp_path):
    path = tmp_path / "cfg" / "settings.json"
    assert load_settings(path) == AppSettings()
    saved = AppSettings(output_dir="/videos", model_dirs={"ti2v-5B": "/models/5b"}, device="cpu", port=7900)
    save_settings(saved, path)
    assert load_settings(path) == saved and [p.name for p in path.parent.iterdir()] == ["settings.json"]
    with pytest.raises(SettingsError, match="port 0 is not allowed"):
        save_settings(AppSettings(port=0), path)
    with pytest.raises(SettingsError, match="unknown task 'x2v'"):
        AppSettings.from_dict({"model_dirs": {"x2v": "/m"}})
    assert AppSettings.from_dict({"port": 8000, "from_the_future": 1}).port == 8000

    path.write_text("{not json")
    store = SettingsStore(path)
    assert store.current == AppSettings() and "cannot be read" in store.problem
    assert path.read_text() == "{not json"  # nothing is overwritten until the user saves
    store.update(port=7901)
    assert load_settings(path).port == 7901 and (path.parent / "settings.json.broken").read_text() == "{not json"


def test_settings_tab_saves_and_says_what_needs_a_restart(make_ctx, tmp_path):  # noqa: F811
    ctx = make_ctx()
    tab = SettingsHandlers(ctx)
    values = tab.values()
    out = tmp_path / "out"
    message = tab.save(str(out), *values[1:-2], 7999, values[-1])
    assert message.startswith("✓ Saved") and "when wan-local restarts" in message
    saved = json.loads(ctx.settings.path.read_text())
    assert saved["port"] == 7999 and saved["output_dir"] == str(out.absolute()) and out.is_dir()
    assert ctx.served.serves(out / "new.mp4") and not ctx.served.serves(ctx.store.outputs_dir / "old.mp4")
    refused = tab.save(str(ctx.store.folder), *values[1:])
    assert refused.startswith(f"✗ The output folder {ctx.store.folder} is not allowed: it holds"), refused
    assert tab.save("", *values[1:-2], "x", values[-1]).startswith("✗ port 'x'")


def test_models_tab_use_this_folder(make_ctx, tiny, tmp_path):  # noqa: F811
    ctx = make_ctx()
    models = ModelsHandlers(ctx)
    assert models.status("ti2v-5B").startswith("✓ Complete (official layout)")
    assert models.use_folder("ti2v-5B", str(tmp_path)).startswith("⚠ ti2v-5B now uses")
    assert ctx.settings.current.model_dir("ti2v-5B") == str(tmp_path) and models.status("ti2v-5B").startswith("✗")
    assert models.use_folder("ti2v-5B", str(tiny / "ti2v-5B")).startswith("✓")
    assert models.use_folder("ti2v-5B", str(tmp_path / "nope")).startswith("✗")
    assert models.target("ti2v-5B", "") == tiny / "ti2v-5B"


# ------------------------------------------------------------------------------------------------ app.py


def test_importing_the_app_is_light_and_help_is_instant():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, app, ui, ui.generate, ui.generate_form, ui.generate_layout, ui.queue, ui.gallery, ui.models, "
        "ui.settings; "
        "print(sorted(m for m in ('torch', 'gradio', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    started = time.monotonic()
    help_text = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert time.monotonic() - started < 5 and "--listen" in help_text and "--share" not in help_text


def _load_app():
    """app.py is a script at the repository root, not part of the installed package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wan_local_app", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_next_free_port_is_used_when_the_first_is_taken():
    import socket

    app = _load_app()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not app.port_is_free("127.0.0.1", port)
        assert app.find_free_port("127.0.0.1", port) > port
    args = app.build_parser().parse_args(["--port", "7000", "--listen", "--no-browser", "--home", "/x", "--no-worker"])
    assert (args.port, args.listen, args.no_browser, args.home, args.no_worker) == (7000, True, True, Path("/x"), True)


def _registered_workers(store_path: Path) -> int:
    with sqlite3.connect(store_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0]


def test_worker_process_dies_is_reported_restarts_and_stops(tmp_path):
    app = _load_app()
    store = JobStore(tmp_path / "jobs.sqlite3")
    worker = app.WorkerProcess(store.path, env={**os.environ, "WAN_LOCAL_HOME": str(tmp_path)})
    assert worker.describe() == "The worker is not started." and not worker.alive()
    worker.start()
    try:
        assert worker.alive() and worker.describe().startswith(f"Worker running (pid {worker.proc.pid})")
        worker.proc.kill()  # a crash: the UI must say so and offer a restart
        worker.proc.wait(30)
        assert not worker.alive() and "stopped (exit code -9)" in worker.describe()
        assert worker.restart().startswith("Worker restarted") and worker.alive()
        first = worker.proc
        deadline = time.monotonic() + 60  # until it serves the queue (its signal handlers are in place by then)
        while time.monotonic() < deadline and not _registered_workers(store.path):
            time.sleep(0.2)
        worker.stop()  # SIGTERM: the worker unregisters and exits 0
        assert _registered_workers(store.path) == 0
        assert not worker.alive() and first.returncode == 0
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
