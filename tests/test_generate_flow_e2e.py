"""End to end in Chromium (as tests/test_app_e2e.py): the Generate tab as a hobbyist uses it without leaving it.

Switching tasks updates the form, the length line and the prediction with no error toast; a batch of two
variations (seeds 41, 42) of the tiny t2v-A14B job is queued from the Generate tab and followed there to the end
(progress to 100 %, then the video inline); the Queue tab's row of job #1 offers "Open in Gallery", which shows
that very video (seed 41) in the Gallery. A screenshot of every tab goes to tests/artifacts/flow_*.png.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from test_app_e2e import ARTIFACTS, _field, app_server, browser_page  # noqa: F401  (a fixture)

TOAST = ".toast-body"  # Gradio's error / warning / info toasts
SWITCHES = (  # task, the length line its defaults give (81 frames at 16 fps for A14B, 121 at 24 for TI2V-5B)
    ("ti2v-5B", "121 frames = 5.00 s at 24 fps"),
    ("i2v-A14B", "81 frames = 5.00 s at 16 fps"),
    ("t2v-A14B", "81 frames = 5.00 s at 16 fps"),
)


def test_generate_tab_switches_tasks_quietly_and_follows_its_batch_to_the_video(app_server, tmp_path):  # noqa: F811
    from playwright import sync_api

    from wan_local.jobs.store import JobStore
    from wan_local.video import read_settings

    url, home, _ = app_server
    with browser_page(url) as page:
        expect = sync_api.expect
        prediction = page.locator("#gen-prediction")
        expect(prediction).to_contain_text("Prediction", timeout=30_000)

        # Task switches: one update each, and never a red toast.
        for task, length_line in SWITCHES:
            page.locator("#gen-task").get_by_text(task).click()
            expect(page.locator("#gen-length-info")).to_contain_text(length_line)
            time.sleep(0.5)  # the prediction and any refused event would answer within this
            expect(page.locator(TOAST)).to_have_count(0)
        expect(page.locator("#gen-model-status")).to_contain_text("✓ Complete")  # t2v-A14B's folder is back
        assert "not in the list of choices" not in (tmp_path / "app.log").read_text()

        # A batch of two variations of the tiny job, followed on this tab.
        page.locator("#gen-size").get_by_text("custom W*H").click()
        _field(page, "gen-custom-size").fill("64*48")
        page.locator("#gen-unit").get_by_text("frames", exact=True).click()
        expect(_field(page, "gen-length")).to_have_value("81")
        _field(page, "gen-length").fill("5")
        _field(page, "gen-steps").fill("3")
        _field(page, "gen-seed").fill("41")
        _field(page, "gen-prompt").fill("a red fox in snow")
        _field(page, "gen-prompt").blur()
        expect(prediction).to_contain_text("64×48, 5 frames, 3 steps")
        page.locator("#gen-batch").get_by_text("Batch").click()
        _field(page, "gen-variations").fill("2")
        _field(page, "gen-variations").blur()
        expect(_field(page, "gen-variations")).to_have_value("2")
        page.locator("#gen-add").click()
        expect(page.locator("#gen-status")).to_contain_text("Queued 2 jobs #1–#2 (seeds 41…42")

        panel = page.locator("#gen-job")
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Batch of 2: 2 done" not in (text := panel.inner_text()):
            if not seen or seen[-1] != text:
                seen.append(text)
            time.sleep(0.1)
        assert "Batch of 2: 2 done" in panel.inner_text(), seen[-5:]
        percents = [int(p) for text in seen for p in re.findall(r"(\d+) %", text)]
        assert any("denoise" in t for t in seen) or any("running" in t for t in seen), seen  # seen while it ran
        expect(panel).to_contain_text("100 %")
        expect(panel).to_contain_text("done · job00002_t2v-A14B_64x48_a_red_fox_in_snow.mp4")
        expect(page.locator("#gen-video video")).to_have_count(1)
        assert percents and max(percents) <= 100
        expect(page.locator(TOAST)).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "flow_generate.png"), full_page=True)

        # The Queue tab: select job #1's row, then open its video in the Gallery.
        page.get_by_role("tab", name="Queue").click()
        page.locator("#queue-table [role=gridcell]", has_text="job00001").first.click()
        selected = page.locator("#queue-selected")
        expect(selected).to_contain_text("Job #1 · done · seed 41")
        expect(page.locator("#queue-open")).to_be_visible()
        expect(page.locator("#queue-retry")).to_be_hidden()
        expect(page.locator("#queue-video video")).to_have_count(1)
        expect(page.locator("#queue-thumbs img")).to_have_count(2)  # poster frames of the two videos
        time.sleep(0.5)  # the selected video fades in
        page.screenshot(path=str(ARTIFACTS / "flow_queue.png"), full_page=True)
        page.locator("#queue-open").click()
        expect(page.locator("#gallery-details")).to_contain_text("seed: 41")  # job #1's, not the newest
        expect(page.locator("#gallery-video video")).to_have_count(1)
        page.screenshot(path=str(ARTIFACTS / "flow_gallery.png"), full_page=True)

        page.get_by_role("tab", name="Models").click()
        expect(page.locator("#models-download-t2v-a14b")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "flow_models.png"), full_page=True)
        page.get_by_role("tab", name="Settings").click()
        expect(page.locator("#settings-save")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "flow_settings.png"), full_page=True)
        expect(page.locator(TOAST)).to_have_count(0)

    jobs = JobStore(home / "jobs.sqlite3").list()
    assert [(j.state, j.resolved_seed, j.settings.prompt) for j in jobs] == [
        ("done", 41, "a red fox in snow"), ("done", 42, "a red fox in snow"),
    ]  # fmt: skip
    assert [read_settings(Path(j.output_path))["seed"] for j in jobs] == [41, 42]
