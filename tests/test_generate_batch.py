"""Batches and the "your job" panel of the Generate tab, and the Queue tab's per-row actions, run directly against
a real JobStore and the tiny checkpoints: a batch queues one admitted job per prompt and seed (s, s+1, …) or
nothing at all; the panel follows the store's record of those jobs from waiting to running (with its preview) to
done (with its video); a selected row offers the actions its state allows; "clear finished" keeps the queue."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ui import build_context
from ui.batch import MAX_BATCH, batch_forms
from ui.generate import GenerateHandlers
from ui.generate_form import CUSTOM, FRAMES, RANDOM, FormValues
from ui.queue import QueueHandlers, allowed_actions, job_row, short_seed
from ui.thumbnails import poster
from wan_local.engine.request import MAX_SEED
from wan_local.errors import InputError
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.machine import GIB, MachineInfo
from wan_local.presets import BUILTIN_PRESETS_DIR, load_presets
from wan_local.settings import AppSettings, SettingsStore
from wan_local.video import save_video

CPU_BOX = MachineInfo(None, 0, 0, None, 32 * GIB, 28 * GIB, 500 * GIB)


def estimator(ram_gib: float = 1.0):
    """Same peaks for every job, recording the shapes it was asked about."""
    calls = []

    def estimate(task, size, frames, steps, options, machine, dit_config=None, components=None):
        calls.append((task, size, frames, steps))
        return SimpleNamespace(peak_vram_bytes=0, peak_ram_bytes=int(ram_gib * GIB), seconds=30.0)

    estimate.calls = calls
    return estimate


@pytest.fixture
def make_ctx(tmp_path, tiny):
    def make(ram_gib: float = 1.0):
        home = tmp_path / "home"
        settings = SettingsStore(home / "settings.json")
        settings.save(AppSettings(model_dirs={"t2v-A14B": str(tiny / "t2v-A14B")}, device="cpu"))
        return build_context(
            store=JobStore(home / "jobs.sqlite3"), settings=settings, machine=CPU_BOX,
            presets=load_presets(BUILTIN_PRESETS_DIR), estimator=estimator(ram_gib), measure=lambda m: m,
        )  # fmt: skip

    return make


def fox_form(ctx, **changes) -> FormValues:
    base = FormValues(
        task="t2v-A14B", prompt="a red fox in snow", size=CUSTOM, custom_size="64*48", length_unit=FRAMES, length=5,
        steps=3, seed=RANDOM, guide_low=3.0, guide_high=4.0, shift=12.0, solver="unipc",
        model_dir=ctx.settings.current.model_dir("t2v-A14B"),
    )  # fmt: skip
    return FormValues(**{**base.__dict__, **changes})


# ------------------------------------------------------------------------------------------------ batches


def test_variations_of_one_prompt_are_jobs_with_seeds_s_s1_s2_each_admitted(make_ctx):
    ctx = make_ctx()
    gen = GenerateHandlers(ctx)
    message, ids = gen.add_batch(fox_form(ctx, seed="41"), 3, "")
    assert message.startswith("✓ Queued 3 jobs #1–#3 (seeds 41…43"), message
    jobs = [ctx.store.get(i) for i in ids]
    assert [j.resolved_seed for j in jobs] == [41, 42, 43]
    assert {(j.settings.prompt, j.settings.size, j.settings.frames, j.settings.preset) for j in jobs} == {
        ("a red fox in snow", (64, 48), 5, "cpu")
    }
    assert len(ctx.estimator.calls) >= 3  # admission ran for every job, not once for the batch
    # One job: the form as it is, the store draws a random seed.
    message, (one,) = gen.add_batch(fox_form(ctx), 1, "  \n")
    assert message.startswith(f"✓ Queued job #{one} (seed {ctx.store.get(one).resolved_seed},")


def test_a_prompt_list_gets_every_variation_with_one_drawn_seed(make_ctx):
    ctx = make_ctx()
    message, ids = GenerateHandlers(ctx).add_batch(fox_form(ctx), 2, "a wolf at dusk\n\n  an owl in rain  \n")
    assert message.startswith("✓ Queued 4 jobs #1–#4"), message
    jobs = [ctx.store.get(i) for i in ids]
    assert [j.settings.prompt for j in jobs] == ["a wolf at dusk", "a wolf at dusk", "an owl in rain", "an owl in rain"]
    s = jobs[0].resolved_seed
    assert [j.resolved_seed for j in jobs] == [s, s + 1, s, s + 1]
    assert [j.settings.seed for j in jobs] == [s, s + 1, s, s + 1]  # fixed in the job: a retry repeats it


def test_a_batch_is_queued_whole_or_not_at_all(make_ctx):
    ctx = make_ctx(ram_gib=1000.0)  # fits no preset on a 32 GiB machine
    message, ids = GenerateHandlers(ctx).add_batch(fox_form(ctx), 3, "")
    assert message.startswith("✗ Not queued:") and "does not fit" in message and ids == []
    assert ctx.store.list() == []
    ctx = make_ctx()
    gen = GenerateHandlers(ctx)
    message, ids = gen.add_batch(fox_form(ctx), MAX_BATCH + 1, "")
    assert ids == [] and f"{MAX_BATCH + 1} jobs; at most {MAX_BATCH}" in message
    assert "is not a whole number" in gen.add_batch(fox_form(ctx), "x", "")[0]
    assert "must be at least 1" in gen.add_batch(fox_form(ctx), 0, "")[0]
    assert "the prompt is empty" in gen.add_batch(fox_form(ctx, prompt=""), 2, "")[0]
    assert ctx.store.list() == []
    with pytest.raises(InputError, match="past the largest seed"):
        batch_forms(fox_form(ctx, seed=str(MAX_SEED)), 2)


# ------------------------------------------------------------------------------------------------ the panel


def test_the_generate_panel_follows_its_jobs_from_queue_to_video(make_ctx, tmp_path):
    ctx = make_ctx()
    gen = GenerateHandlers(ctx)
    assert "No job queued from this tab yet" in gen.panel([]).html
    _, ids = gen.add_batch(fox_form(ctx, seed="7"), 2, "")
    view = gen.panel(ids)
    assert view.active and view.job_id == ids[0] and view.video_path is None
    assert "waiting in the queue" in view.html and "Batch of 2: 2 waiting" in view.html and "0 %" in view.html

    store = ctx.store
    store.register_worker("w1")
    job = store.claim_next("w1")
    preview = tmp_path / "preview.png"
    Image.new("RGB", (8, 6), (200, 40, 10)).save(preview)
    store.update_progress(job.id, "w1", step=2, total=3, stage="denoise", eta_seconds=20, preview_path=str(preview))
    view = gen.panel(ids)
    assert view.job_id == ids[0] and view.preview_path == str(preview)
    assert "denoise · step 2/3 · 67 % · about 20 s left" in view.html and "value='0.6667' max='1'" in view.html
    assert "1 running, 1 waiting" in view.html

    video = save_video(torch.zeros(3, 5, 48, 64), ctx.output_dir() / "fox.mp4", 16, {"prompt": "a red fox in snow"})
    store.finish(job.id, "w1", "done", output_path=str(video))
    view = gen.panel(ids)
    assert view.job_id == ids[1] and view.preview_path is None  # the next one waits; no stale preview
    assert view.video_path == str(video) and view.active
    second = store.claim_next("w1")
    store.finish(second.id, "w1", "failed", error="out of memory while decoding")
    view = gen.panel(ids)
    assert not view.active and view.video_path == str(video)  # polling stops; the finished video stays
    assert "failed: out of memory while decoding" in view.html and "1 done, 1 failed" in view.html
    store.remove(ids[1])
    store.remove(ids[0])
    assert "were removed" in gen.panel(ids).html and not gen.panel(ids).active


# ------------------------------------------------------------------------------------------------ the queue tab


def add(store: JobStore, prompt: str, seed: int) -> int:
    settings = JobSettings(task="t2v-A14B", ckpt_dir="ckpt", prompt=prompt, size=(64, 48), frames=5, steps=3, seed=seed)
    return store.add(settings, validate=False).id


def test_a_selected_row_offers_what_its_state_allows_and_clear_finished_keeps_the_queue(make_ctx):
    ctx = make_ctx()
    store, q = ctx.store, QueueHandlers(ctx)
    big = 8_215_603_913_874_190_193
    done_id, failed_id, cancelled_id, running_id, queued_id = (add(store, p, big) for p in "abcde")
    store.register_worker("w1")
    video = save_video(torch.zeros(3, 5, 48, 64), ctx.output_dir() / "a.mp4", 16, {"prompt": "a"})
    assert store.claim_next("w1").id == done_id and store.finish(done_id, "w1", "done", output_path=str(video))
    assert store.claim_next("w1").id == failed_id and store.finish(failed_id, "w1", "failed", error="boom")
    store.request_cancel(cancelled_id)
    assert store.claim_next("w1").id == running_id
    by_state = {j.state: j.id for j in store.list()}
    assert by_state == {"done": done_id, "failed": failed_id, "cancelled": cancelled_id, "running": running_id,
                        "queued": queued_id}  # fmt: skip
    assert allowed_actions(store.get(queued_id)) == ("cancel", "up", "down", "remove", "edit")
    assert allowed_actions(store.get(running_id)) == ("cancel",)
    assert allowed_actions(store.get(done_id)) == ("remove", "open")
    assert q.selection(done_id).video == str(video)
    assert allowed_actions(store.get(failed_id)) == allowed_actions(store.get(cancelled_id)) == ("retry", "remove")
    video.unlink()  # a video deleted from disk can no longer be opened
    assert allowed_actions(store.get(done_id)) == ("remove",) and q.selection(done_id).video is None

    pick = q.selection(by_state["failed"])
    assert pick.job_id == by_state["failed"] and str(big) in pick.text and "boom" in pick.text
    assert q.selection(None).actions == () and "no longer in the list" in q.selection(999).text

    row = job_row(store.get(by_state["queued"]))
    assert row[5] == short_seed(big) == "8215…0193" and short_seed(1234567890) == "1234567890"
    assert "Cleared 3 finished job(s)" in q.clear_finished()
    assert sorted(j.state for j in store.list()) == ["queued", "running"]
    assert q.clear_finished() == "No finished jobs to clear."
    assert {j.id for j in store.list()} == {queued_id, running_id}


def test_finished_jobs_get_a_poster_of_their_first_frame_made_once(make_ctx):
    ctx = make_ctx()
    store, q = ctx.store, QueueHandlers(ctx)
    frames = torch.full((3, 5, 48, 64), -1.0)
    frames[0, 0] = 1.0  # the first frame red, the others black
    video = save_video(frames, ctx.output_dir() / "red.mp4", 16, {"prompt": "red"})
    job_id = add(store, "red", 5)
    add(store, "waiting", 6)
    store.register_worker("w1")
    store.claim_next("w1")
    store.finish(job_id, "w1", "done", output_path=str(video))
    ((shown_id, path, caption),) = q.thumbnails()  # the waiting job has no video yet
    assert (shown_id, caption) == (job_id, f"#{job_id}")
    assert Path(path).parent == store.previews_dir / "posters" and ctx.served.serves(path)
    with Image.open(path) as image:
        assert image.size == (64, 48)  # smaller than POSTER_SIZE: kept
        r, g, b = image.convert("RGB").getpixel((32, 24))
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    made = Path(path).stat().st_mtime_ns
    assert q.thumbnails()[0][1] == path and Path(path).stat().st_mtime_ns == made  # made once
    with Image.open(poster(video, store.previews_dir / "posters", size=32)) as small:
        assert small.size == (32, 24)  # scaled to the longest side, aspect kept
    video.unlink()
    assert q.thumbnails() == []
