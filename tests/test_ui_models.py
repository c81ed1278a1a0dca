"""The Models tab's handlers against real folders: the table of files found (format, role, which are used), the pick
among several candidates saved in the settings and carried by the Generate tab's jobs, the variant list with its
recommendation and quality line, and a variant download (fake Hub, as in test_variants) that becomes the task's
folder with its files picked."""

from __future__ import annotations

from pathlib import Path

from test_inventory import comfy  # noqa: F401  (module fixture: a ComfyUI folder with two high-noise experts)
from test_ui import RTX_4090_64, home, make_ctx, presets, t2v_form, with_model_dir  # noqa: F401
from test_variants import HubApi, HubDownload, hub  # noqa: F401

from ui.generate import GenerateHandlers
from ui.models import ModelsHandlers
from ui.prediction import load_dit_config
from wan_local.models_hub import DownloadManager, default_download_dir
from wan_local.weights.inventory import HIGH, LOW, TEXT_ENCODER, VAE

GB = 1_000_000_000


def test_files_table_lists_each_file_with_format_role_and_use(make_ctx, tiny):  # noqa: F811
    models = ModelsHandlers(make_ctx())
    table = models.files_table("t2v-A14B").splitlines()
    assert table[:2] == ["| file | what | format | size | used |", "|---|---|---|---|---|"]
    rows = {row.split(" | ")[0]: row for row in table[2:]}
    assert set(rows) == {
        f"| `{n}`"
        for n in (
            "Wan2.1_VAE.pth",
            "google/umt5-xxl/",
            "high_noise_model/",
            "low_noise_model/",
            "models_t5_umt5-xxl-enc-bf16.pth",
        )
    }
    assert rows["| `high_noise_model/`"].startswith(
        "| `high_noise_model/` | high-noise expert (t2v DiT) | official fp32 | "
    )
    assert rows["| `Wan2.1_VAE.pth`"].startswith("| `Wan2.1_VAE.pth` | VAE (wan2.1) | official fp32 | ")
    assert rows["| `google/umt5-xxl/`"] == "| `google/umt5-xxl/` | tokenizer | — |  | ✓ |"
    assert all(row.endswith(" MB | ✓ |") or row.endswith("|  | ✓ |") for row in rows.values())


def test_picking_among_candidates_is_saved_and_reaches_the_job(make_ctx, comfy):  # noqa: F811
    ctx = make_ctx()
    models = ModelsHandlers(ctx)
    assert models.use_folder("t2v-A14B", str(comfy)).startswith("⚠ t2v-A14B now uses")
    assert "2 candidates for the high-noise expert" in models.status("t2v-A14B")
    table = models.files_table("t2v-A14B")
    assert (
        "| `diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors` | high-noise expert (t2v DiT) " in table
    )
    assert (
        "| `diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors` | low-noise expert (i2v DiT) | comfyui fp16"
        in table
    )
    assert "✓" not in table  # nothing is used while the folder is ambiguous

    options = models.pick_options("t2v-A14B")
    assert set(options) == {HIGH, LOW, TEXT_ENCODER, VAE}
    dm = comfy / "diffusion_models"
    fp8 = str((dm / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors").absolute())
    choices, value = options[HIGH]
    assert value == "" and [c[1] for c in choices] == ["", str(dm / "wan2.2_t2v_high_noise_14B_fp16.safetensors"), fp8]
    assert [c[1] for c in options[LOW][0]] == ["", str(dm / "wan2.2_t2v_low_noise_14B_fp16.safetensors")]

    message = models.save_picks("t2v-A14B", {HIGH: fp8, LOW: "", TEXT_ENCODER: None, VAE: ""})
    assert message.startswith("✓ Saved the files of t2v-A14B (high-noise expert: wan2.2_t2v_high_noise_14B_fp8_scaled")
    assert ctx.settings.current.model_files == {"t2v-A14B": {HIGH: fp8}}
    assert models.status("t2v-A14B").startswith("✓ Complete (comfyui layout)")
    assert models.pick_options("t2v-A14B")[HIGH][1] == fp8
    row = next(r for r in models.files_table("t2v-A14B").splitlines() if "high_noise_14B_fp8_scaled" in r)
    assert row.endswith("| ✓ |")

    gen = GenerateHandlers(ctx)
    job = gen.job_settings(with_model_dir(ctx, t2v_form()))
    assert job.ckpt_dir == str(comfy) and job.files == {HIGH: fp8}
    assert gen.model_status("t2v-A14B", str(comfy)).startswith("✓")
    # The estimate reads the picked expert's header too (without the pick the folder is ambiguous).
    assert load_dit_config(str(comfy), "t2v-A14B") is None
    assert load_dit_config(str(comfy), "t2v-A14B", job.files).model_type == "t2v"


def test_variants_recommendation_and_quality(make_ctx):  # noqa: F811
    models = ModelsHandlers(make_ctx(machine=RTX_4090_64))
    choices = models.variant_choices("t2v-A14B")
    assert [key for _, key in choices][:3] == ["official", "comfy-fp16", "comfy-fp8_scaled"]
    starred = [label for label, _ in choices if label.startswith("★ ")]
    assert starred == ["★ Comfy-Org fp8_scaled — size listed by 'Check size'"]
    assert choices[0][0].startswith("Official Wan-AI/Wan2.2-T2V-A14B (fp32) — ")
    assert choices[0][0].endswith(" GB (size from the fact sheet)")
    assert models.recommendation("t2v-A14B").startswith("Recommended for this PC (24 GiB VRAM, 64 GiB RAM) (preset '")
    info = models.variant_info("t2v-A14B", "gguf-Q4_K_M")
    assert (
        "DiT output rel. L2 at most 2.7e-2" in info
        and "`diffusion_models/Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf`" in info
    )


def test_a_variant_download_becomes_the_folder_with_its_files_picked(make_ctx, hub, tmp_path):  # noqa: F811
    manager = DownloadManager(api=HubApi(hub), file_downloader=HubDownload(hub), disk_free=lambda p: 100 * GB)
    ctx = make_ctx()
    ctx.hub = manager
    models = ModelsHandlers(ctx)
    manager.on_done = models.saved_download
    folder = models.folder("t2v-A14B")
    target = default_download_dir(ctx.store.folder, "t2v-A14B", "comfy-fp8_scaled")
    assert models.target("t2v-A14B", folder, "comfy-fp8_scaled") == target  # never into the official folder
    assert models.target("t2v-A14B", folder, "official") == Path(folder)
    models.download("t2v-A14B", folder, "comfy-fp8_scaled")
    status = manager.wait("t2v-A14B", timeout_s=30)
    assert status.state == "done", status.message
    assert ctx.settings.current.model_dir("t2v-A14B") == str(target.absolute())
    picks = ctx.settings.current.model_files["t2v-A14B"]
    assert Path(picks[HIGH]).name == "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    assert Path(picks[TEXT_ENCODER]).name == "umt5_xxl_fp8_e4m3fn_scaled.safetensors" and set(picks) == {
        HIGH,
        LOW,
        TEXT_ENCODER,
        VAE,
    }
    assert models.download_line("t2v-A14B").startswith("✓ Downloaded Comfy-Org fp8_scaled into")
    assert models.status("t2v-A14B").startswith("✓ Complete (comfyui layout)")
