"""The Models tab in a real (headless) Chromium, as a ComfyUI user meets it: `python app.py` started with its own
home, a ComfyUI `models/` folder built as Comfy-Org's files are keyed (tests/comfy_files.py) holding the fp16 and
the fp8_scaled high-noise experts side by side and no tokenizer folder. The user types the folder, is told that two
files fit the high-noise role, picks the fp8 one in the dropdown, and the task is complete with that file used;
the pick is in the saved settings (where the worker's jobs take it from).
"""

from __future__ import annotations

import json

import pytest
from comfy_files import write_comfy_dit, write_comfy_folder
from running_app import app_env, free_port, running_app
from test_app_e2e import ARTIFACTS, _field, browser_page, skip_without_browser


@pytest.fixture
def comfy_app(tmp_path, tiny):
    skip_without_browser()
    models = write_comfy_folder(tmp_path / "ComfyUI" / "models", tiny, "t2v-A14B", dit="fp16")
    fp8 = models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    write_comfy_dit(fp8, tiny / "t2v-A14B" / "high_noise_model", "fp8_scaled")
    home = tmp_path / "home"
    home.mkdir()
    (home / "settings.json").write_text(json.dumps({"device": "cpu"}))
    port = free_port()
    with running_app(["--home", str(home)], tmp_path / "app.log", app_env(), port):
        yield f"http://127.0.0.1:{port}/", home, models, fp8


def test_a_comfyui_folder_with_two_high_noise_experts_is_picked_in_the_models_tab(comfy_app):
    from playwright import sync_api

    url, home, models, fp8 = comfy_app
    with browser_page(url) as page:
        expect = sync_api.expect
        page.get_by_role("tab", name="Models").click()
        _field(page, "models-folder-t2v-a14b").fill(str(models))
        page.locator("#models-use-t2v-a14b").click()
        status = page.locator("#models-status-t2v-a14b")
        expect(status).to_contain_text("2 candidates for the high-noise expert")
        files = page.locator("#models-files-t2v-a14b")
        expect(files).to_contain_text("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
        expect(files).to_contain_text("carries its tokenizer")  # no google/umt5-xxl/ folder needed

        page.locator("#models-picks-t2v-a14b").get_by_text("Which file for which role").click()
        page.locator("#models-pick-t2v-a14b-high_noise input").click()
        page.get_by_role("option", name="wan2.2_t2v_high_noise_14B_fp8_scaled").click()
        page.locator("#models-pick-save-t2v-a14b").click()
        expect(page.locator("#models-message-t2v-a14b")).to_contain_text("Saved the files of t2v-A14B")
        expect(status).to_contain_text("✓")
        expect(files).to_contain_text("✓")
        page.screenshot(path=str(ARTIFACTS / "app_models.png"), full_page=True)

    settings = json.loads((home / "settings.json").read_text())
    assert settings["model_dirs"]["t2v-A14B"] == str(models)
    assert settings["model_files"]["t2v-A14B"] == {"high_noise": str(fp8.absolute())}
