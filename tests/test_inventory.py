"""Layout detection that explains itself: the inventory of a folder (format, precision and role of every file),
several candidates for one role refused with all of them named until one is chosen, a choice honoured by
find_checkpoints and checked (wrong task, not in the folder), and ambiguous or broken official folders (stray
model_index.json, broken config.json, the experts of another task) named as such.

The ComfyUI files are built as the repackaged ones are keyed (fact sheet §3.3): DiT under `model.diffusion_model.`,
fp8_scaled with per-layer `scale_weight`, UMT5 with bare HF-T5 names plus `spiece_model`; the GGUF file is written
by gguf-py with Q8_0 block weights, as city96's converter names and stores them (§3.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from comfy_files import official_dit_sd, write_comfy_dit, write_comfy_text_encoder, write_comfy_vae

from wan_local.errors import CheckpointError, InputError
from wan_local.specs import get_task
from wan_local.weights.inventory import EXPERT, HIGH, INDEX, LOW, SINGLE, TEXT_ENCODER, TOKENIZER, VAE, scan_folder
from wan_local.weights.layout import find_checkpoints

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T2V, I2V, TI2V = get_task("t2v-A14B"), get_task("i2v-A14B"), get_task("ti2v-5B")


def _gguf_dit(path: Path, official: Path) -> None:
    """A GGUF DiT as city96's converter writes it: arch "wan", bare official names, 2-D block weights in Q8_0,
    the rest F32."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "wan")
    for name, tensor in official_dit_sd(official).items():
        data = tensor.float().numpy()
        if name.startswith("blocks.") and data.ndim == 2 and name.endswith("weight"):
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def comfy(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models folder as users have it: fp16 and fp8_scaled t2v high-noise experts, an fp16 low-noise
    one, an i2v expert, a 5B GGUF, both VAEs and the UMT5 file carrying its tokenizer."""
    root = tmp_path_factory.mktemp("comfy-models")
    dm, te, vae = root / "diffusion_models", root / "text_encoders", root / "vae"
    for folder in (dm, te, vae, root / "unet"):
        folder.mkdir()
    t2v = tiny / "t2v-A14B"
    write_comfy_dit(dm / "wan2.2_t2v_high_noise_14B_fp16.safetensors", t2v / "high_noise_model", "fp16")
    write_comfy_dit(dm / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", t2v / "high_noise_model", "fp8_scaled")
    write_comfy_dit(dm / "wan2.2_t2v_low_noise_14B_fp16.safetensors", t2v / "low_noise_model", "fp16")
    write_comfy_dit(dm / "wan2.2_i2v_low_noise_14B_fp16.safetensors", tiny / "i2v-A14B" / "low_noise_model", "fp16")
    _gguf_dit(root / "unet" / "Wan2.2-TI2V-5B-Q8_0.gguf", tiny / "ti2v-5B")
    write_comfy_vae(vae / "wan_2.1_vae.safetensors", t2v / "Wan2.1_VAE.pth")
    write_comfy_vae(vae / "wan2.2_vae.safetensors", tiny / "ti2v-5B" / "Wan2.2_VAE.pth")
    write_comfy_text_encoder(te / "umt5_xxl_fp16.safetensors", tiny)
    return root


def test_inventory_names_format_precision_and_role_of_every_file(comfy: Path) -> None:
    found = {f.name(comfy): (f.layout, f.precision, f.role, f.kind) for f in scan_folder(comfy)}
    assert found == {
        "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors": ("comfyui", "fp16", LOW, "i2v"),
        "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors": ("comfyui", "fp16", HIGH, "t2v"),
        "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("comfyui", "fp8_scaled", HIGH, "t2v"),
        "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors": ("comfyui", "fp16", LOW, "t2v"),
        "text_encoders/umt5_xxl_fp16.safetensors": ("comfyui", "fp16", TEXT_ENCODER, "umt5"),
        "unet/Wan2.2-TI2V-5B-Q8_0.gguf": ("gguf", "Q8_0", SINGLE, "ti2v"),
        "vae/wan2.2_vae.safetensors": ("comfyui", "fp32", VAE, "wan2.2"),
        "vae/wan_2.1_vae.safetensors": ("comfyui", "fp32", VAE, "wan2.1"),
    }
    te = next(f for f in scan_folder(comfy) if f.role == TEXT_ENCODER)
    assert te.describe(comfy) == (
        "text_encoders/umt5_xxl_fp16.safetensors: text encoder, comfyui fp16 (carries its tokenizer (spiece_model))"
    )


def test_official_and_diffusers_components_are_listed_as_folders(tiny: Path) -> None:
    found = {f.name(tiny / "t2v-A14B"): (f.layout, f.precision, f.role, f.kind) for f in scan_folder(tiny / "t2v-A14B")}
    assert found == {
        "Wan2.1_VAE.pth": ("official", "fp32", VAE, "wan2.1"),
        "google/umt5-xxl/": ("", "", TOKENIZER, "umt5"),
        "high_noise_model/": ("official", "fp32", HIGH, "t2v"),
        "low_noise_model/": ("official", "fp32", LOW, "t2v"),
        T5_FILE: ("official", "bf16", TEXT_ENCODER, "umt5"),
    }
    five = {f.name(tiny / "ti2v-5B"): f.role for f in scan_folder(tiny / "ti2v-5B")}
    assert five == {".": SINGLE, "Wan2.2_VAE.pth": VAE, "google/umt5-xxl/": TOKENIZER, T5_FILE: TEXT_ENCODER}


def test_several_candidates_are_named_until_one_is_chosen(comfy: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(comfy, T2V)
    message = str(info.value)
    assert message.startswith(f"{comfy} holds 2 candidates for the high-noise expert of t2v-A14B: ")
    assert (
        "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors: high-noise expert (t2v DiT), comfyui fp16"
        in message
    )
    assert (
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors: high-noise expert (t2v DiT), comfyui fp8_scaled" in message
    )
    assert "Models tab" in message and "--file ROLE=PATH" in message and "i2v" not in message

    dm = comfy / "diffusion_models"
    for pick in ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_high_noise_14B_fp16.safetensors"):
        found = find_checkpoints(comfy, T2V, {HIGH: str(dm / pick)})
        assert found.dit == {HIGH: dm / pick, LOW: dm / "wan2.2_t2v_low_noise_14B_fp16.safetensors"}
        assert found.vae == comfy / "vae" / "wan_2.1_vae.safetensors"
    # A relative path is taken inside the folder; a pick for a role the task does not use changes nothing.
    found = find_checkpoints(comfy, T2V, {HIGH: f"diffusion_models/{pick}", SINGLE: "unet/Wan2.2-TI2V-5B-Q8_0.gguf"})
    assert found.dit[HIGH] == dm / pick


def test_a_choice_that_does_not_fit_is_refused_with_the_candidates(comfy: Path, tmp_path: Path) -> None:
    dm = comfy / "diffusion_models"
    wrong = {
        HIGH: str(dm / "wan2.2_t2v_high_noise_14B_fp16.safetensors"),
        LOW: str(dm / "wan2.2_i2v_low_noise_14B_fp16.safetensors"),
    }
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(comfy, T2V, wrong)
    assert str(info.value) == (
        "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors cannot be the low-noise expert of t2v-A14B: it is "
        "a low-noise expert (i2v DiT), comfyui fp16; candidates: "
        "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors"
    )
    elsewhere = tmp_path / "x.safetensors"
    elsewhere.write_bytes((comfy / "vae" / "wan_2.1_vae.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="is not a model file of"):
        find_checkpoints(comfy, T2V, {**wrong, LOW: str(elsewhere)})
    with pytest.raises(CheckpointError, match="unknown file role"):
        find_checkpoints(comfy, T2V, {"transformer": str(elsewhere)})


def test_the_dit_of_another_task_is_named_as_such(tiny: Path, tmp_path: Path) -> None:
    # An official i2v folder chosen for t2v: the experts are there, but of the other task.
    with pytest.raises(CheckpointError, match=r"high_noise_model/ holds a DiT of i2v-A14B \(i2v\), but t2v-A14B"):
        find_checkpoints(tiny / "i2v-A14B", T2V)
    # A ComfyUI folder with only i2v experts: what is missing, and why the i2v files do not count.
    root = tmp_path / "comfy"
    (root / "diffusion_models").mkdir(parents=True)
    write_comfy_dit(
        root / "diffusion_models" / "wan2.2_i2v_high_noise_14B_fp16.safetensors", tiny / "i2v-A14B" / "high_noise_model"
    )
    write_comfy_vae(root / "wan_2.1_vae.safetensors", tiny / "t2v-A14B" / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(root, T2V)
    message = str(info.value)
    assert "a t2v DiT file for the high-noise expert" in message
    assert (
        "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors is a DiT of i2v-A14B, not of t2v-A14B" in message
    )
    assert "wan_2.1_vae.safetensors: VAE (wan2.1), comfyui fp32" in message


def _linked_copy(src: Path, dst: Path, leave_out: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        if item.name not in leave_out:
            (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return dst


def test_stray_model_index_in_an_official_folder_is_explained(tiny: Path, tmp_path: Path) -> None:
    root = _linked_copy(tiny / "t2v-A14B", tmp_path / "t2v", leave_out=("Wan2.1_VAE.pth",))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert next(f.role for f in scan_folder(root) if f.name(root) == "model_index.json") == INDEX
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(root, T2V)
    message = str(info.value)
    assert message.startswith(f"{root} (official layout) lacks what t2v-A14B needs: Wan2.1_VAE.pth. Found: ")
    assert "model_index.json is ignored: there is no transformer/ folder next to it" in message
    assert "transformer/" not in message.split(" Found: ")[0]


def test_broken_config_of_an_expert_is_named(tiny: Path, tmp_path: Path) -> None:
    root = _linked_copy(tiny / "t2v-A14B", tmp_path / "t2v", leave_out=("high_noise_model",))
    _linked_copy(tiny / "t2v-A14B" / "high_noise_model", root / "high_noise_model", leave_out=("config.json",))
    (root / "high_noise_model" / "config.json").write_text('{"_class_name": "WanModel", "dim": ')  # cut short
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(root, T2V)
    message = str(info.value)
    assert message.startswith("high_noise_model/ (high-noise expert of t2v-A14B): config.json cannot be read")
    assert message.endswith("download it again")


def test_an_expert_whose_name_says_neither_high_nor_low_is_explained(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    write_comfy_dit(root / "wan2.2_t2v_14B_fp16.safetensors", tiny / "t2v-A14B" / "high_noise_model")
    assert [f.role for f in scan_folder(root)] == [EXPERT]
    with pytest.raises(CheckpointError, match="says neither high nor low noise in its name: rename it"):
        find_checkpoints(root, T2V)


# ------------------------------------------------------------------------------------------------ the pick, end to end


def test_the_pick_travels_from_the_settings_and_the_cli_to_the_resolved_job(comfy: Path, tmp_path: Path) -> None:
    from wan_local.cli import build_parser
    from wan_local.engine.request import JobSettings
    from wan_local.engine.resolve import resolve_job
    from wan_local.machine import GIB, MachineInfo
    from wan_local.options import job_settings_from_args
    from wan_local.settings import AppSettings, SettingsError, SettingsStore

    fp8 = comfy / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    store = SettingsStore(tmp_path / "settings.json")
    store.save(AppSettings(model_dirs={"t2v-A14B": str(comfy)}).with_model_file("t2v-A14B", HIGH, str(fp8)))
    saved = SettingsStore(tmp_path / "settings.json").current  # read back from the file
    assert saved.model_choice("t2v-A14B", comfy) == {HIGH: str(fp8)}
    assert saved.model_choice("t2v-A14B", tmp_path / "elsewhere") == {}  # a pick for another folder does not apply
    assert saved.with_model_file("t2v-A14B", HIGH, None).model_files == {}
    with pytest.raises(SettingsError, match="unknown role 'transformer'"):
        AppSettings(model_files={"t2v-A14B": {"transformer": str(fp8)}}).validate()

    cpu = MachineInfo(None, 0, 0, None, 32 * GIB, 28 * GIB, 500 * GIB)
    job = JobSettings(task="t2v-A14B", prompt="a fox", ckpt_dir=str(comfy), device="cpu", size=(64, 48), frames=5)
    with pytest.raises(CheckpointError, match="2 candidates for the high-noise expert"):
        resolve_job(job, machine=cpu)
    picked = JobSettings.from_dict({**job.to_dict(), "files": saved.model_choice("t2v-A14B", comfy)})  # the queue
    assert resolve_job(picked, machine=cpu).checkpoint.files.dit[HIGH] == fp8

    argv = ["generate", "--task", "t2v-A14B", "--ckpt-dir", str(comfy), "--prompt", "a fox", "--file"]
    args = build_parser().parse_args([*argv, f"high_noise={fp8}"])
    assert job_settings_from_args(args).files == {HIGH: str(fp8)}
    with pytest.raises(InputError, match="--file 'dit=x' must be ROLE=PATH"):
        job_settings_from_args(build_parser().parse_args([*argv, "dit=x"]))
