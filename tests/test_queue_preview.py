"""The Queue tab's preview belongs to the running job only: a page opened after that job finished shows none, a
retried job does not show its earlier attempt's preview, and the progress line is the whole job's fraction."""

from __future__ import annotations

import os
import time

import gradio as gr
import pytest

from ui import build_app, build_context
from ui.queue import QueueHandlers, job_row
from wan_local.jobs.store import JobSettings, JobStore
from wan_local.machine import GIB, MachineInfo
from wan_local.presets import BUILTIN_PRESETS_DIR, load_presets
from wan_local.settings import SettingsStore

CPU_BOX = MachineInfo(None, 0, 0, None, 32 * GIB, 28 * GIB, 500 * GIB)


@pytest.fixture
def ctx(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    return build_context(
        store=store, settings=SettingsStore(tmp_path / "settings.json"), machine=CPU_BOX,
        presets=load_presets(BUILTIN_PRESETS_DIR), worker=None, estimator=None,
    )  # fmt: skip


def _run_with_preview(ctx, prompt: str) -> tuple[int, str]:
    settings = JobSettings(task="t2v-A14B", ckpt_dir="ckpt", prompt=prompt, size=(64, 48), frames=5, steps=3)
    job_id = ctx.store.add(settings, validate=False).id
    ctx.store.register_worker("w1")
    ctx.store.claim_next("w1")
    preview = ctx.store.previews_dir / f"job{job_id}.png"
    preview.parent.mkdir(parents=True, exist_ok=True)
    preview.write_bytes(b"png")
    ctx.store.update_progress(
        job_id, "w1", step=2, total=3, stage="denoise", eta_seconds=9, preview_path=str(preview), fraction=0.5
    )
    return job_id, str(preview)


def _refresh(demo):
    """The Queue tab's timer callback (rows, running html, preview, worker line, restart button, preview key)."""
    fns = [f for f in demo.fns.values() if getattr(f.fn, "__qualname__", "") == "build_queue_tab.<locals>.refresh"]
    assert len(fns) == 1
    return fns[0].fn


def test_a_page_opened_after_the_job_finished_shows_no_preview(ctx):
    job_id, preview = _run_with_preview(ctx, "a whale")
    demo = build_app(ctx)  # the app starts while the job runs
    image = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "queue-preview")
    assert image.value is None, "the layout carries no preview: the timer brings the running job's"
    _, html, shown, *_, key = _refresh(demo)(None)  # a page opened now, while the job runs
    assert shown == preview and key[0] == preview and "Job #" in html
    ctx.store.finish(job_id, "w1", "done", output_path="/x.mp4")
    _, html, shown, *_, key = _refresh(demo)(None)  # a fresh page, long after
    assert shown is None or isinstance(shown, type(gr.skip())), "no preview of a finished job"
    assert key is None and "Nothing running" in html
    _, _, shown, *_ = _refresh(demo)(("old", 1))  # a page that showed it: cleared
    assert shown is None
    assert QueueHandlers(ctx).running().preview_path is None


def test_a_retried_job_does_not_show_its_earlier_attempts_preview(ctx):
    job_id, preview = _run_with_preview(ctx, "a whale")
    ctx.store.finish(job_id, "w1", "failed", error="boom")
    past = time.time() - 600
    os.utime(preview, (past, past))
    ctx.store.retry(job_id)
    ctx.store.claim_next("w1")
    view = QueueHandlers(ctx).running()
    assert view.job_id == job_id and view.preview_path is None
    # An old file named in the record is not shown either (a record written by an older version).
    ctx.store.update_progress(job_id, "w1", stage="encode_text", preview_path=preview)
    assert QueueHandlers(ctx).running().preview_path is None
    os.utime(preview)  # written during this run
    assert QueueHandlers(ctx).running().preview_path == preview


def test_the_progress_line_is_the_whole_jobs_fraction_with_decode_counted(ctx):
    job_id, _ = _run_with_preview(ctx, "a whale")
    q = QueueHandlers(ctx)
    assert "step 2/3 · 50 % · about 9 s left" in q.running().html
    ctx.store.update_progress(job_id, "w1", stage="decode", step=3, total=3, eta_seconds=4, fraction=0.8)
    html = q.running().html
    assert "decode · 80 % · about 4 s left" in html and "step" not in html.split("decode")[1]
    assert "<progress value='0.8000' max='1'" in html
    assert job_row(ctx.store.get(job_id))[2:5] == ["80 %", "decode", "4 s"]
