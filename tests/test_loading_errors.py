"""Damaged, incomplete and wrong checkpoints: each raises a CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_local.errors import CheckpointError
from wan_local.specs import get_task
from wan_local.weights.layout import find_checkpoints
from wan_local.weights.loading import load_dit, load_text_encoder, load_vae

DIT_STEM = "diffusion_pytorch_model"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE21_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"


def _raises(call, *fragments: str) -> str:
    """Run `call`, expect a CheckpointError whose message contains every fragment; return the message."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


@pytest.fixture
def sharded_dit(tiny: Path, tmp_path: Path) -> Path:
    """A copy of the two-shard official DiT folder (t2v-A14B/high_noise_model)."""
    return Path(shutil.copytree(tiny / "t2v-A14B" / "high_noise_model", tmp_path / "high_noise_model"))


def _single_dit(tiny: Path, folder: Path, edit) -> Path:
    """An official single-file DiT folder (t2v-A14B/low_noise_model) with its state dict passed through `edit`."""
    src = tiny / "t2v-A14B" / "low_noise_model"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    sd = load_file(str(src / f"{DIT_STEM}.safetensors"))
    save_file(edit(sd), str(folder / f"{DIT_STEM}.safetensors"))
    return folder


# ---------------------------------------------------------------------------------------------- damaged files


def test_truncated_shard(sharded_dit: Path) -> None:
    shard = sharded_dit / f"{DIT_STEM}-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _raises(lambda: load_dit(sharded_dit), str(shard), "re-download")


def test_missing_shard(sharded_dit: Path) -> None:
    shard = sharded_dit / f"{DIT_STEM}-00002-of-00002.safetensors"
    shard.unlink()
    _raises(lambda: load_dit(sharded_dit), str(sharded_dit), shard.name, "missing")


def test_index_key_absent_from_its_shard(sharded_dit: Path) -> None:
    index = sharded_dit / f"{DIT_STEM}.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["blocks.9.modulation"] = f"{DIT_STEM}-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    _raises(lambda: load_dit(sharded_dit), index.name, "blocks.9.modulation")


def test_garbage_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "wan2.2_t2v_high_noise_14B_fp16.safetensors"
    path.write_bytes(os.urandom(4096))
    _raises(lambda: load_dit(path), str(path), "not a readable safetensors file")
    # A folder holding it is reported when the layout is detected, naming the same file.
    _raises(lambda: find_checkpoints(tmp_path, get_task("t2v-A14B")), str(path))


def test_garbage_safetensors_in_dit_folder(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "low_noise_model"
    folder.mkdir()
    shutil.copy(tiny / "t2v-A14B" / "low_noise_model" / "config.json", folder / "config.json")
    weights = folder / f"{DIT_STEM}.safetensors"
    weights.write_bytes(b"\xff" * 8 + b"not a header" * 100)
    _raises(lambda: load_dit(folder), str(weights), "not a readable safetensors file")


@pytest.mark.parametrize("which", ["vae", "t5"])
def test_truncated_pth(which: str, tiny: Path, tmp_path: Path) -> None:
    name = VAE21_FILE if which == "vae" else T5_FILE
    path = tmp_path / name
    data = (tiny / "t2v-A14B" / name).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])

    def load() -> object:
        return load_vae(path, "wan2.1") if which == "vae" else load_text_encoder(path)

    _raises(load, str(path), "re-download")


def test_pickle_with_code_is_refused_not_executed(tmp_path: Path) -> None:
    """A .pth whose pickle would call a function on load (here: create a folder) is refused unexecuted."""
    witness = tmp_path / "code-was-executed"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(witness),))

    path = tmp_path / VAE21_FILE
    torch.save({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "payload": Payload()}, path)
    _raises(lambda: load_vae(path, "wan2.1"), str(path), "refused for safety", "os.makedirs")
    assert not witness.exists()


def test_pth_with_non_tensor_values(tmp_path: Path) -> None:
    """Plain data that weights_only accepts (numbers, strings) is still not a state dict of tensors."""
    path = tmp_path / T5_FILE
    torch.save({"token_embedding.weight": torch.zeros(8, 4), "epoch": 3, "note": "trained"}, path)
    _raises(lambda: load_text_encoder(path), str(path), "state dict of tensors")


# ------------------------------------------------------------------------------------------ wrong contents


def test_missing_key(tiny: Path, tmp_path: Path) -> None:
    def drop(sd):
        del sd["blocks.1.cross_attn.k.bias"]
        return sd

    folder = _single_dit(tiny, tmp_path / "dit", drop)
    _raises(lambda: load_dit(folder), str(folder), "missing keys", "blocks.1.cross_attn.k.bias")


def test_wrong_shape(tiny: Path, tmp_path: Path) -> None:
    def reshape(sd):
        sd["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"][:100].contiguous()
        return sd

    folder = _single_dit(tiny, tmp_path / "dit", reshape)
    _raises(lambda: load_dit(folder), str(folder), "wrong shapes", "blocks.0.ffn.0.weight (100, 64)", "(128, 64)")


def test_unexpected_key(tiny: Path, tmp_path: Path) -> None:
    def add(sd):
        sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(64, 64)
        return sd

    folder = _single_dit(tiny, tmp_path / "dit", add)
    _raises(lambda: load_dit(folder), str(folder), "unexpected keys", "blocks.0.cross_attn.k_img.weight")


def test_vae_of_the_other_kind(tiny: Path) -> None:
    path = tiny / "ti2v-5B" / "Wan2.2_VAE.pth"
    _raises(lambda: load_vae(path, "wan2.1"), str(path), "encoder.conv1.weight", "Wan2.1 VAE")


def test_wrong_model_type(tiny: Path, tmp_path: Path) -> None:
    folder = tiny / "i2v-A14B" / "high_noise_model"
    _raises(lambda: load_dit(folder, expected_model_type="t2v"), str(folder), "'i2v'", "'t2v'")
    # The same check for a single file that carries no config at all (type from the input channels).
    path = tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors"
    sd = load_file(str(folder / f"{DIT_STEM}.safetensors"))
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    save_file(prefixed, str(path), metadata={"config": json.dumps({"num_heads": 2})})
    _raises(lambda: load_dit(path, expected_model_type="t2v"), str(path), "'i2v'", "'t2v'")


# ------------------------------------------------------------------------------------------ incomplete folders


def _official_t2v_copy(tiny: Path, root: Path, leave_out: str) -> Path:
    """The t2v-A14B fixture folder as symlinks, without `leave_out` (a top-level name)."""
    root.mkdir()
    for item in (tiny / "t2v-A14B").iterdir():
        if item.name != leave_out:
            (root / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return root


@pytest.mark.parametrize(
    ("leave_out", "reported"),
    [
        (VAE21_FILE, VAE21_FILE),
        (T5_FILE, T5_FILE),
        ("google", "google/umt5-xxl/ (tokenizer)"),
        ("low_noise_model", "low_noise_model/"),
    ],
)
def test_official_folder_missing_component(leave_out: str, reported: str, tiny: Path, tmp_path: Path) -> None:
    root = _official_t2v_copy(tiny, tmp_path / "Wan2.2-T2V-A14B", leave_out)
    message = _raises(
        lambda: find_checkpoints(root, get_task("t2v-A14B")), str(root), reported, "Wan-AI/Wan2.2-T2V-A14B"
    )
    present = {VAE21_FILE, T5_FILE, "low_noise_model/", "high_noise_model/"} - {reported}
    lacks, found = message.split(" Found: ")
    assert not any(name in lacks for name in present), message
    assert all(name in found for name in present), message  # what is there is said too


def test_official_folder_missing_several(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "Wan2.2-TI2V-5B"
    root.mkdir()
    for name in ("config.json", f"{DIT_STEM}.safetensors"):
        (root / name).symlink_to(tiny / "ti2v-5B" / name)
    _raises(
        lambda: find_checkpoints(root, get_task("ti2v-5B")),
        "Wan2.2_VAE.pth",
        T5_FILE,
        "tokenizer",
        "Wan-AI/Wan2.2-TI2V-5B",
    )


def test_diffusers_folder_missing_vae(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    for sub in ("transformer", "transformer_2", "text_encoder"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    shutil.copytree(tiny / "t2v-A14B" / TOKENIZER_DIR, root / "tokenizer")
    message = _raises(lambda: find_checkpoints(root, get_task("t2v-A14B")), str(root), "vae/", "Wan2.2-T2V-A14B")
    assert "transformer" not in message.split("needs:")[1].split(".")[0]


def _comfy_files(tiny: Path, root: Path, task: str, with_t5: bool = True) -> Path:
    """Flat ComfyUI-style single files (official names, no prefix) for the high/low experts of `task`."""
    root.mkdir()
    sd = load_file(str(tiny / f"{task}-A14B" / "low_noise_model" / f"{DIT_STEM}.safetensors"))
    for expert in ("high", "low"):  # the same weights twice: the layout tells experts apart by file name
        save_file(sd, str(root / f"wan2.2_{task}_{expert}_noise_14B_fp16.safetensors"))
    save_file(torch.load(tiny / "t2v-A14B" / VAE21_FILE, weights_only=True), str(root / "wan_2.1_vae.safetensors"))
    if with_t5:
        # Only the key names matter for detection; the layout reads headers, not tensors. UMT5 keeps a relative
        # position bias in every block (a T5 v1.1 in block 0 only).
        rel_bias = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
        save_file({rel_bias.format(i): torch.zeros(32, 2) for i in (0, 1)}, str(root / "umt5_xxl_fp16.safetensors"))
    return root


def test_comfyui_folder_without_tokenizer(tiny: Path, tmp_path: Path) -> None:
    """ComfyUI files carry no tokenizer: the message says to copy google/umt5-xxl/ from the official repo."""
    root = _comfy_files(tiny, tmp_path / "comfy", "t2v")
    message = _raises(lambda: find_checkpoints(root, get_task("t2v-A14B")), str(root), "google/umt5-xxl")
    lacks = message.split(" Found: ")[0]
    assert "VAE" not in lacks and "DiT" not in lacks and "text encoder" not in lacks, message


def test_comfyui_folder_without_t5_and_with_other_task(tiny: Path, tmp_path: Path) -> None:
    """i2v expert files do not count for a t2v task; a missing UMT5 file is listed too."""
    root = _comfy_files(tiny, tmp_path / "comfy", "i2v", with_t5=False)
    shutil.copytree(tiny / "t2v-A14B" / TOKENIZER_DIR, root / TOKENIZER_DIR)
    message = _raises(
        lambda: find_checkpoints(root, get_task("t2v-A14B")),
        str(root),
        "t2v DiT file for the high-noise expert",
        "t2v DiT file for the low-noise expert",
        "UMT5-XXL text encoder",
    )
    lacks, found = message.split(" Found: ")
    assert "VAE" not in lacks and "tokenizer" not in lacks, message
    # The i2v experts that were passed over are named, with the task they serve.
    assert "wan2.2_i2v_high_noise_14B_fp16.safetensors is a DiT of i2v-A14B, not of t2v-A14B" in found


def test_empty_folder(tmp_path: Path) -> None:
    _raises(lambda: find_checkpoints(tmp_path, get_task("i2v-A14B")), str(tmp_path), "Wan-AI/Wan2.2-I2V-A14B")


def test_folder_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    _raises(lambda: find_checkpoints(missing, get_task("t2v-A14B")), str(missing), "does not exist")
    _raises(lambda: load_dit(missing / "high_noise_model"), str(missing / "high_noise_model"), "does not exist")
