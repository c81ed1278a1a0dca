"""End to end: `python app.py` as a user starts it, driven by a real (headless) Chromium through Playwright.

The app runs with its own home folder whose settings point t2v-A14B at the tiny checkpoints and run jobs on the
CPU (fp32). The browser fills the Generate form (size 64*48, 5 frames, 3 steps), queues the job, waits in the Queue
tab until the worker process finishes it, and finds the video with its prompt and seed in the Gallery. A
screenshot of each tab goes to tests/artifacts/. Stopping the app stops its worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest
from running_app import app_env, free_port, running_app

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("WAN_LOCAL_CHROMIUM", "/usr/bin/chromium"))  # Debian's; override for other systems
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


def skip_without_browser() -> None:
    """Skip the calling test, saying what to install, when Chromium or Playwright is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (Debian), or set WAN_LOCAL_CHROMIUM")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture
def app_server(tmp_path, tiny):
    """The app on a free port with a fresh home; yields (url, home, process); stops it (and its worker) after."""
    skip_without_browser()
    home = tmp_path / "home"
    home.mkdir()
    settings = {"model_dirs": {"t2v-A14B": str(tiny / "t2v-A14B")}, "device": "cpu"}
    (home / "settings.json").write_text(json.dumps(settings))
    port = free_port()
    with running_app(["--home", str(home)], tmp_path / "app.log", app_env(), port) as proc:
        yield f"http://127.0.0.1:{port}/", home, proc


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page (1400x1000, 30 s timeouts) opened at `url`; the browser is closed after. Screenshots
    go to ARTIFACTS."""
    from playwright import sync_api

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def _field(page, elem_id: str):
    """The text input inside a Gradio component (Textbox: textarea or input; Number: input)."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def test_queue_a_job_in_the_browser_and_find_it_in_the_gallery(app_server):
    from playwright import sync_api

    from wan_local.jobs.store import JobStore
    from wan_local.video import read_settings

    url, home, _ = app_server
    started = time.monotonic()
    with browser_page(url) as page:
        expect = sync_api.expect
        expect(page.locator("#gen-prediction")).to_contain_text("Prediction", timeout=30_000)

        page.locator("#gen-size").get_by_text("custom W*H").click()
        _field(page, "gen-custom-size").fill("64*48")
        page.locator("#gen-unit").get_by_text("frames", exact=True).click()
        expect(_field(page, "gen-length")).to_have_value("81")  # 5 s converted; now type the frame count
        _field(page, "gen-length").fill("5")
        _field(page, "gen-steps").fill("3")
        _field(page, "gen-prompt").fill("a red fox in snow")
        _field(page, "gen-prompt").blur()
        expect(page.locator("#gen-length-info")).to_contain_text("5 frames")
        prediction = page.locator("#gen-prediction")
        expect(prediction).to_contain_text("64×48, 5 frames, 3 steps")  # the prediction of this very job
        if "does not fit" in prediction.inner_text():
            pytest.skip(
                "the pre-flight estimate refuses even the tiny job on this machine (it sizes the text encoder and "
                f"VAE as the official ones): {prediction.inner_text()[:300]}"
            )
        page.locator("#gen-add").click()
        status = page.locator("#gen-status")
        expect(status).to_contain_text("Queued job #1", timeout=30_000)
        seed = re.search(r"seed (\d+)", status.inner_text()).group(1)
        page.screenshot(path=str(ARTIFACTS / "app_generate.png"), full_page=True)

        page.get_by_role("tab", name="Queue").click()
        table = page.locator("#queue-table")
        expect(table).to_contain_text("a red fox in snow")
        expect(table).to_contain_text("100 %", timeout=60_000)  # the progress of a done job
        expect(page.locator("#queue-worker")).to_contain_text("Worker running")
        page.screenshot(path=str(ARTIFACTS / "app_queue.png"), full_page=True)

        page.get_by_role("tab", name="Gallery").click()
        gallery = page.locator("#gallery-table")
        expect(gallery).to_contain_text("a red fox in snow")
        expect(gallery).to_contain_text(seed)
        expect(page.locator("#gallery-details")).to_contain_text(f"seed: {seed}")
        expect(page.locator("#gallery-video video")).to_have_count(1)
        page.screenshot(path=str(ARTIFACTS / "app_gallery.png"), full_page=True)
    elapsed = time.monotonic() - started

    (job,) = JobStore(home / "jobs.sqlite3").list()
    assert job.state == "done" and str(job.resolved_seed) == seed
    meta = read_settings(Path(job.output_path))
    assert (meta["prompt"], meta["seed"], meta["size"], meta["frames"], meta["steps"]) == (
        "a red fox in snow", int(seed), "64*48", 5, 3,
    )  # fmt: skip
    assert (meta["device"], meta["dtype"], meta["preset"]) == ("cpu", "bf16", "cpu")  # bf16 is the CPU default too
    assert elapsed < 90, f"the browser part took {elapsed:.0f} s"
