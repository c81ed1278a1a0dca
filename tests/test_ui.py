"""The UI's handlers, run directly against a real JobStore and the tiny checkpoints: adding a job stores exactly
the form's settings; admission degrades or refuses with its reason; queue actions. Also: build_app constructs the
whole Blocks without launching it. The gallery, settings and app.py: test_ui_app."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ui import build_app, build_context
from ui.generate import GenerateHandlers
from ui.generate_form import CUSTOM, FRAMES, RANDOM, SECONDS, FormValues, parse_seed, seconds_to_frames
from ui.prediction import format_duration
from ui.queue import QueueHandlers
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.machine import GIB, MachineInfo
from wan_local.presets import BUILTIN_PRESETS_DIR, load_presets
from wan_local.settings import AppSettings, SettingsStore
from wan_local.specs import TASKS

CPU_BOX = MachineInfo(None, 0, 0, None, 32 * GIB, 28 * GIB, 500 * GIB)
RTX_4090_64 = MachineInfo("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9), 64 * GIB, 60 * GIB, 500 * GIB)


def fixed_estimate(vram_gib: float = 0.0, ram_gib: float = 1.0, seconds: float = 30.0):
    """An estimator that returns the same peaks for every preset, recording its calls."""
    calls = []

    def estimate(task, size, frames, steps, options, machine, dit_config=None, components=None):
        calls.append((task, size, frames, steps, options))
        return SimpleNamespace(peak_vram_bytes=int(vram_gib * GIB), peak_ram_bytes=int(ram_gib * GIB), seconds=seconds)

    estimate.calls = calls
    return estimate


class FakeWorker:
    def __init__(self, alive: bool = True) -> None:
        self.is_alive, self.restarts = alive, 0

    def alive(self) -> bool:
        return self.is_alive

    def describe(self) -> str:
        return "Worker running (pid 1)" if self.is_alive else "The worker stopped (exit code 1)."

    def restart(self) -> str:
        self.restarts += 1
        self.is_alive = True
        return "Worker restarted (pid 2)."


@pytest.fixture(scope="module")
def presets():
    return load_presets(BUILTIN_PRESETS_DIR)  # shipped presets only: no per-user overrides in tests


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def make_ctx(home, tiny, presets):
    def make(machine: MachineInfo = CPU_BOX, estimator=None, worker=None, **settings):
        store = JobStore(home / "jobs.sqlite3")
        app_settings = SettingsStore(home / "settings.json")
        model_dirs = {name: str(tiny / name) for name in TASKS}
        app_settings.save(AppSettings(model_dirs=model_dirs, **settings))
        return build_context(
            store=store, settings=app_settings, machine=machine, presets=presets, worker=worker,
            estimator=estimator if estimator is not None else fixed_estimate(), measure=lambda m: m,
        )  # fmt: skip

    return make


def t2v_form(**changes) -> FormValues:
    base = FormValues(
        task="t2v-A14B", prompt="a red fox in snow", size=CUSTOM, custom_size="64*48", length_unit=FRAMES, length=5,
        steps=3, seed=RANDOM, guide_low=3.0, guide_high=4.0, shift=12.0, solver="unipc",
    )  # fmt: skip
    return FormValues(**{**base.__dict__, **changes})


def with_model_dir(ctx, form: FormValues) -> FormValues:
    return FormValues(**{**form.__dict__, "model_dir": ctx.settings.current.model_dir(form.task)})


# ------------------------------------------------------------------------------------------------ construction


def test_build_app_constructs_every_tab_without_launching(home, tiny, presets):
    store = JobStore(home / "jobs.sqlite3")
    settings = SettingsStore(home / "settings.json")
    ctx = build_context(store=store, settings=settings, machine=CPU_BOX, presets=presets, worker=FakeWorker(),
                        estimator=None)  # fmt: skip
    demo = build_app(ctx)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for elem in ("gen-prompt", "gen-add", "gen-prediction", "queue-table", "queue-preview", "queue-restart",
                 "gallery-table", "gallery-reuse", "models-download-t2v-a14b", "settings-save"):  # fmt: skip
        assert elem in ids, elem
    assert ctx.served.allowed_paths == [str(d.resolve()) for d in (store.outputs_dir, store.previews_dir)]
    assert not ctx.served.serves(store.path)  # the queue database is not served


# ------------------------------------------------------------------------------------------------ generate


def test_add_to_queue_stores_the_form_settings(make_ctx, tiny):
    ctx = make_ctx(device="cpu")
    gen = GenerateHandlers(ctx)
    form = with_model_dir(ctx, t2v_form(negative_prompt="blurry"))
    message = gen.add(form)
    assert message.startswith("✓ Queued job #1"), message
    (job,) = ctx.store.list()
    s = job.settings
    assert (s.task, s.prompt, s.negative_prompt, s.size, s.frames, s.steps) == (
        "t2v-A14B", "a red fox in snow", "blurry", (64, 48), 5, 3,
    )  # fmt: skip
    assert (s.guide_scale, s.shift, s.solver, s.seed) == ((3.0, 4.0), 12.0, "unipc", -1)
    assert (s.ckpt_dir, s.device, s.preset, s.output) == (str(tiny / "t2v-A14B"), "cpu", "cpu", None)
    assert job.resolved_seed >= 0 and f"seed {job.resolved_seed}" in message
    # A fixed seed is kept as typed; the estimator saw the job's shape with the CPU preset's options.
    gen.add(with_model_dir(ctx, t2v_form(seed="1234")))
    assert ctx.store.get(2).resolved_seed == 1234
    assert ctx.estimator.calls[-1][:4] == ("t2v-A14B", (64, 48), 5, 3)
    assert ctx.estimator.calls[-1][4] == ctx.presets["cpu"].memory


def test_seconds_become_4k_plus_1_frames_and_the_output_folder_setting_names_the_file(make_ctx, tmp_path):
    spec = TASKS["t2v-A14B"]
    assert seconds_to_frames(spec, 5) == 81 and seconds_to_frames(spec, 0.1) == 1
    assert seconds_to_frames(TASKS["ti2v-5B"], 5) == 121
    out = tmp_path / "my videos"
    ctx = make_ctx(output_dir=str(out))
    gen = GenerateHandlers(ctx)
    assert gen.add(with_model_dir(ctx, t2v_form(length_unit=SECONDS, length=0.3))).startswith("✓")
    job = ctx.store.get(1)
    assert job.settings.frames == 5  # 0.3 s x 16 fps = 4.8 -> 4k+1 = 5
    assert Path(job.settings.output).parent == out and job.settings.output.endswith(".mp4")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"custom_size": "65*48"}, "multiples of 16"),
        ({"length": 6}, "4k+1"),
        ({"steps": 0}, "steps 0 must be at least 1"),
        ({"seed": "abc"}, "seed 'abc' is not a whole number"),
        ({"prompt": "  "}, "the prompt is empty"),
        ({"task": "i2v-A14B", "guide_high": 3.5}, "i2v-A14B needs an input image"),
    ],
)
def test_bad_forms_are_refused_with_the_value_named(make_ctx, changes, expected):
    ctx = make_ctx()
    message = GenerateHandlers(ctx).add(with_model_dir(ctx, t2v_form(**changes)))
    assert message.startswith("✗ Not queued") and expected in message, message
    assert ctx.store.list() == []


def test_missing_model_files_are_named(make_ctx, tmp_path):
    ctx = make_ctx()
    message = GenerateHandlers(ctx).add(t2v_form(model_dir=str(tmp_path)))
    assert "✗ Not queued" in message and "Wan-AI/Wan2.2-T2V-A14B" in message and "Models tab" in message, message
    assert ctx.store.list() == []


def test_image_is_copied_into_the_store_and_ignored_for_text_to_video(make_ctx, tiny, tmp_path):
    ctx = make_ctx()
    gen = GenerateHandlers(ctx)
    image = tiny / "golden" / "ti2v_input.png"
    form = with_model_dir(
        ctx,
        t2v_form(task="ti2v-5B", image=str(image), custom_size="64*64", guide_low=5.0, guide_high=5.0, shift=5.0),
    )
    message = gen.add(form)
    assert message.startswith("✓"), message
    job = ctx.store.get(1)
    assert Path(job.settings.image).parent == ctx.store.inputs_dir and job.settings.image_source == str(image)
    assert job.settings.guide_scale == (5.0, 5.0)
    gen.add(with_model_dir(ctx, t2v_form(image=str(image))))  # a stale upload on a text-to-video form
    assert ctx.store.get(2).settings.image is None


def test_admission_degrades_along_the_fallback_chain_with_the_reason(make_ctx, presets):
    peaks = {  # (VRAM GiB, RAM GiB) per preset: the picked one would page, its fallback fits
        presets["gpu24-ram64"].memory: (20, 80),
        presets["gpu24-ram32"].memory: (22, 30),
        presets["gpu16-ram32"].memory: (14, 20),
    }
    assert len(peaks) == 3

    def estimate(task, size, frames, steps, options, machine, dit_config=None, components=None):
        vram, ram = peaks[options]
        return SimpleNamespace(peak_vram_bytes=vram * GIB, peak_ram_bytes=ram * GIB, seconds=540.0)

    ctx = make_ctx(machine=RTX_4090_64, estimator=estimate)
    gen = GenerateHandlers(ctx)
    assert ctx.pick.preset.name == "gpu24-ram64"
    form = with_model_dir(ctx, t2v_form())
    text = gen.prediction_text(form)
    assert text.startswith("⚠ **Prediction (64×48, 5 frames, 3 steps):**"), text
    assert "peak VRAM 22.0 GiB · peak RAM 30.0 GiB · about 9 min" in text
    assert "Runs with '24 GB VRAM · 32 GB RAM' instead of '24 GB VRAM · 64 GB RAM'" in text
    assert "would need 80.0 GiB RAM" in text and "page to disk" in text
    message = gen.add(form)
    assert message.startswith("✓ Queued") and "instead of" in message
    assert ctx.store.get(1).settings.preset == "gpu24-ram32"

    # Asking for a preset explicitly starts the chain there.
    assert "Fits with '16 GB VRAM · 32 GB RAM'" in gen.prediction_text(
        FormValues(**{**form.__dict__, "preset": "gpu16-ram32"})
    )


def test_admission_refuses_a_job_that_fits_no_preset_and_reports_planner_errors(make_ctx, presets):
    from wan_local.memory.plan import PlanError

    def estimate(task, size, frames, steps, options, machine, dit_config=None, components=None):
        if options == presets["gpu24-ram64"].memory:
            raise PlanError("needs 90.0 GiB of RAM for one DiT expert while denoising but only 60.0 GiB is available")
        return SimpleNamespace(peak_vram_bytes=30 * GIB, peak_ram_bytes=20 * GIB, seconds=1.0)

    ctx = make_ctx(machine=RTX_4090_64, estimator=estimate)
    gen = GenerateHandlers(ctx)
    form = with_model_dir(ctx, t2v_form())
    text = gen.prediction_text(form)
    assert text.startswith("✗") and "Not queued: this job does not fit" in text, text
    assert "with '24 GB VRAM · 64 GB RAM': needs 90.0 GiB of RAM for one DiT expert" in text
    assert "with '16 GB VRAM · 32 GB RAM' it would need 30.0 GiB VRAM, more than the card's 24.0 GiB" in text
    assert "page to disk" in text  # the RAM reason explains why RAM is kept free
    message = gen.add(form)
    assert message.startswith("✗ Not queued") and "does not fit" in message
    assert ctx.store.list() == []


def test_the_tab_gives_the_engines_own_verdict(make_ctx):
    """With the real estimator the Generate tab's verdict is the one `wan-local generate` / `queue add` / the
    worker reach for the same job on the same machine (wan_local.engine), word for word."""
    from ui.prediction import EngineEstimator
    from wan_local.engine.admit import admit_job
    from wan_local.engine.resolve import resolve_job

    ctx = make_ctx(machine=CPU_BOX, estimator=EngineEstimator())
    gen = GenerateHandlers(ctx)
    for size in ("64*48", "8192*8192"):
        form = with_model_dir(ctx, t2v_form(custom_size=size))
        job = JobSettings(
            task="t2v-A14B",
            ckpt_dir=form.model_dir,
            prompt=form.prompt,
            size=tuple(int(v) for v in size.split("*")),
            frames=5,
            steps=3,
            seed=1,
            preset=ctx.pick.preset.name,
        )
        expected = admit_job(resolve_job(job, machine=CPU_BOX, presets=ctx.presets), refused="Not queued")
        text = gen.prediction_text(form)
        assert expected.message in text
        assert text.startswith("✓" if expected.admitted else "✗"), text
        message = gen.add(form)
        assert message.startswith("✓ Queued" if expected.admitted else "✗ Not queued"), message
    assert len(ctx.store.list()) == 1, "only the job that fits was queued"


def test_a_missing_or_broken_estimator_never_blocks_queueing(make_ctx):
    def broken(*args, **kwargs):
        raise RuntimeError("estimator bug")

    ctx = make_ctx()
    for estimator, expected in ((broken, "No estimate (estimator bug)"), (None, "No estimate available")):
        ctx.estimator = estimator
        gen = GenerateHandlers(ctx)
        form = with_model_dir(ctx, t2v_form())
        assert expected in gen.prediction_text(form)
        assert gen.add(form).startswith("✓")


def test_auto_preset_shows_the_pick_and_its_reason(make_ctx):
    gen = GenerateHandlers(make_ctx(machine=RTX_4090_64))
    info = gen.preset_info("auto")
    assert "auto → 24 GB VRAM · 64 GB RAM" in info and "fits this machine" in info
    assert "CPU only" in GenerateHandlers(make_ctx()).preset_info("auto")


def test_generate_tab_picks_up_a_model_folder_chosen_later(make_ctx, tiny, tmp_path):
    ctx = make_ctx()
    gen = GenerateHandlers(ctx)
    ctx.settings.save(ctx.settings.current.with_model_dir("ti2v-5B", None))
    assert gen.current_model_dir("ti2v-5B", "") == ""
    ctx.settings.save(ctx.settings.current.with_model_dir("ti2v-5B", str(tiny / "ti2v-5B")))  # e.g. Models tab
    assert gen.current_model_dir("ti2v-5B", "") == str(tiny / "ti2v-5B")
    assert gen.current_model_dir("ti2v-5B", str(tmp_path)) == str(tiny / "ti2v-5B")  # incomplete: replaced
    other = tmp_path / "copy"
    shutil.copytree(tiny / "ti2v-5B", other)
    assert gen.current_model_dir("ti2v-5B", str(other)) == str(other)  # a complete folder typed for this job stays


def test_seed_text_and_durations():
    assert parse_seed("random") == parse_seed("") == parse_seed("-1") == -1
    assert parse_seed(" 42 ") == 42
    assert [format_duration(s) for s in (40, 540, 4 * 3600, 3 * 86400)] == ["40 s", "9 min", "4.0 h", "3.0 days"]


# ------------------------------------------------------------------------------------------------ queue


def add_direct(store: JobStore, prompt: str, **changes) -> int:
    settings = JobSettings(task="t2v-A14B", ckpt_dir="ckpt", prompt=prompt, size=(64, 48), frames=5, steps=3)
    return store.add(JobSettings(**{**settings.__dict__, **changes}), validate=False).id


def test_queue_actions_cancel_retry_move_remove(make_ctx):
    ctx = make_ctx()
    q = QueueHandlers(ctx)
    a, b, c = (add_direct(ctx.store, p) for p in "abc")
    assert [r[0] for r in q.rows()] == [a, b, c]
    assert q.action("up", c) == f"Job #{c} moved up."
    assert [r[0] for r in q.rows()] == [a, c, b]
    assert "already at the up end" in q.action("up", a)
    assert q.action("cancel", b) == f"Job #{b} cancelled."
    assert ctx.store.get(b).state == "cancelled"
    assert [r[0] for r in q.rows()][-1] == b  # finished jobs go below the queue
    assert "queued again" in q.action("retry", b) and ctx.store.get(b).state == "queued"
    assert "removed" in q.action("remove", a) and {j.id for j in ctx.store.list()} == {b, c}
    assert q.action("retry", c).startswith("✗")  # only failed / cancelled jobs
    assert q.action("cancel", None).startswith("Select a job") and "not a job number" in q.action("up", "x")
    assert q.action("remove", 999).startswith("✗ there is no job 999")


def test_running_job_shows_progress_eta_and_preview(make_ctx, tmp_path):
    ctx = make_ctx()
    q = QueueHandlers(ctx)
    job_id = add_direct(ctx.store, "a whale", seed=7)
    add_direct(ctx.store, "next")
    assert "2 job(s) queued, about 60 s of work" in q.running().html  # 2 x 30 s (the fake estimator)
    ctx.store.register_worker("w1")
    ctx.store.claim_next("w1")
    preview = tmp_path / "p.png"
    preview.write_bytes(b"png")
    ctx.store.update_progress(
        job_id, "w1", step=12, total=40, stage="denoise", eta_seconds=250, preview_path=str(preview)
    )
    view = q.running()
    assert view.job_id == job_id and view.preview_path == str(preview)
    assert "step 12/40" in view.html and "about 4 min left" in view.html and "1 more job(s) queued" in view.html
    row = q.rows()[0]
    assert row[:6] == [job_id, "running", "12/40", "denoise", "4 min", "7"]
    ctx.store.request_cancel(job_id)
    assert "stops at its next step" in q.action("cancel", job_id) and "cancelling" in q.running().html


def test_edit_a_queued_job_in_the_generate_tab(make_ctx):
    ctx = make_ctx()
    gen, q = GenerateHandlers(ctx), QueueHandlers(ctx)
    assert gen.add(with_model_dir(ctx, t2v_form())).startswith("✓")
    seed = ctx.store.get(1).resolved_seed
    form, editing, _ = q.load_for_edit(1)
    assert editing == 1 and form.prompt == "a red fox in snow" and form.seed == str(seed)
    assert (form.size, form.custom_size, form.length_unit, form.length, form.steps) == (CUSTOM, "64*48", FRAMES, 5, 3)
    changed = FormValues(**{**form.__dict__, "prompt": "a grey wolf", "steps": 4})
    assert gen.update(editing, changed).startswith("✓ Updated job #1")
    job = ctx.store.get(1)
    assert (job.settings.prompt, job.settings.steps, job.resolved_seed) == ("a grey wolf", 4, seed)
    ctx.store.request_cancel(1)
    assert q.load_for_edit(1)[0] is None and "only queued jobs" in q.load_for_edit(1)[2]
    assert gen.update(1, changed).startswith("✗ Not updated")


def test_editing_an_image_job_keeps_the_picture_and_where_it_came_from(make_ctx, tiny, tmp_path):
    ctx = make_ctx()
    gen, q = GenerateHandlers(ctx), QueueHandlers(ctx)
    image = tmp_path / "mine.png"
    shutil.copy(tiny / "golden" / "ti2v_input.png", image)
    form = t2v_form(task="ti2v-5B", image=str(image), custom_size="64*64", guide_low=5.0, guide_high=5.0, shift=5.0)
    assert gen.add(with_model_dir(ctx, form)).startswith("✓")
    edit_form, editing, _ = q.load_for_edit(1)
    assert Path(edit_form.image).parent == ctx.store.inputs_dir  # the store's copy, which the app may serve
    browser_copy = tmp_path / "gradio-cache" / "mine.png"  # what Gradio hands back: same bytes, another path
    browser_copy.parent.mkdir()
    shutil.copy(edit_form.image, browser_copy)
    changed = FormValues(**{**edit_form.__dict__, "image": str(browser_copy), "prompt": "changed"})
    assert gen.update(editing, changed).startswith("✓")
    job = ctx.store.get(1)
    assert (job.settings.prompt, job.settings.image_source) == ("changed", str(image))
    assert job.settings.image == edit_form.image


def test_worker_status_and_restart(make_ctx):
    worker = FakeWorker(alive=False)
    q = QueueHandlers(make_ctx(worker=worker))
    line, offer_restart = q.worker_line()
    assert line.startswith("✗") and "exit code 1" in line and offer_restart
    assert q.restart_worker() == "Worker restarted (pid 2)." and worker.restarts == 1
    assert q.worker_line() == ("✓ Worker running (pid 1)", False)
    assert "--no-worker" in QueueHandlers(make_ctx()).worker_line()[0]
