"""Folders as hobbyists coming from ComfyUI / ComfyUI-GGUF have them, driven as they drive the product: a
relative `--ckpt-dir` queued from one folder and run by a worker started elsewhere, `--file` paths copied from
the candidate list of an error message (relative to the checkpoint folder).

The ComfyUI files are built as the repackaged ones are keyed (fact sheet §3.3, `comfy_files`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_files import write_comfy_dit

from wan_local.errors import CheckpointError
from wan_local.weights.inventory import HIGH


@pytest.fixture(scope="module")
def two_highs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusion_models/ with an fp16 and an fp8_scaled t2v high-noise expert (a choice is needed)."""
    root = tmp_path_factory.mktemp("comfy-models")
    for kind in ("fp16", "fp8_scaled"):
        name = f"wan2.2_t2v_high_noise_14B_{kind}.safetensors"
        write_comfy_dit(root / "diffusion_models" / name, tiny / "t2v-A14B" / "high_noise_model", kind)
    return root


def test_a_queued_job_keeps_its_folder_when_the_worker_runs_elsewhere(two_highs: Path, tmp_path: Path, monkeypatch):
    from wan_local.cli import build_parser
    from wan_local.options import job_settings_from_args

    monkeypatch.chdir(two_highs)
    argv = ["queue", "add", "--task", "t2v-A14B", "--ckpt-dir", ".", "--prompt", "a fox"]
    settings = job_settings_from_args(build_parser().parse_args(argv))
    monkeypatch.chdir(tmp_path)  # the worker's folder
    assert Path(settings.ckpt_dir) == two_highs


def test_a_file_named_as_the_candidate_list_names_it_is_found(two_highs: Path, tmp_path: Path, monkeypatch):
    from wan_local.cli import build_parser
    from wan_local.errors import CheckpointError
    from wan_local.options import job_settings_from_args
    from wan_local.specs import get_task
    from wan_local.weights.choice import resolve_picks
    from wan_local.weights.inventory import scan_folder

    found = scan_folder(two_highs)
    with pytest.raises(CheckpointError) as refused:
        resolve_picks(two_highs, get_task("t2v-A14B"), found, None)
    listed = "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    assert listed in str(refused.value)

    monkeypatch.chdir(tmp_path)  # not the checkpoint folder: the path is relative to --ckpt-dir
    argv = ["generate", "--task", "t2v-A14B", "--ckpt-dir", str(two_highs), "--prompt", "a fox"]
    settings = job_settings_from_args(build_parser().parse_args([*argv, "--file", f"high_noise={listed}"]))
    picks = resolve_picks(two_highs, get_task("t2v-A14B"), found, settings.files)
    assert picks[HIGH] == two_highs / listed


# ------------------------------------------------------------------------------------------------ a ComfyUI models/


@pytest.fixture(scope="module")
def comfy_models(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models/ folder of someone who also runs Wan2.1 I2V and Flux: the t2v fp8_scaled files, plus
    `clip_vision/clip_vision_h.safetensors` (HF CLIP vision names: `vision_model.embeddings.patch_embedding.weight`
    is a 4-D Conv2d) and Flux's `text_encoders/t5xxl_fp16.safetensors` (HF-T5 names like UMT5's, but a T5 v1.1
    keeps its relative position bias in block 0 only, where UMT5 has one in every block, spec §3.3)."""
    import torch
    from comfy_files import write_comfy_folder
    from safetensors.torch import load_file, save_file

    root = write_comfy_folder(tmp_path_factory.mktemp("models"), tiny, "t2v-A14B", "fp8_scaled", "fp8_scaled")
    umt5 = load_file(str(root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    t5 = {
        k: v.float().half()
        for k, v in umt5.items()
        if k != "spiece_model" and not k.endswith(("scale_weight", "scaled_fp8"))
        and ("relative_attention_bias" not in k or k.startswith("encoder.block.0."))
    }  # fmt: skip
    save_file(t5, str(root / "text_encoders" / "t5xxl_fp16.safetensors"))
    clip = {
        "vision_model.embeddings.patch_embedding.weight": torch.randn(32, 3, 14, 14, dtype=torch.float16),
        "vision_model.embeddings.class_embedding": torch.randn(32, dtype=torch.float16),
        "vision_model.post_layernorm.weight": torch.ones(32, dtype=torch.float16),
        "visual_projection.weight": torch.randn(16, 32, dtype=torch.float16),
    }
    (root / "clip_vision").mkdir()
    save_file(clip, str(root / "clip_vision" / "clip_vision_h.safetensors"))
    return root


def test_other_models_of_a_comfyui_folder_are_not_taken_for_wan_files(comfy_models: Path) -> None:
    from wan_local.specs import get_task
    from wan_local.weights.inventory import TEXT_ENCODER, UNKNOWN, scan_folder
    from wan_local.weights.layout import find_checkpoints

    roles = {f.name(comfy_models): f.role for f in scan_folder(comfy_models)}
    assert roles["clip_vision/clip_vision_h.safetensors"] == UNKNOWN
    assert roles["text_encoders/t5xxl_fp16.safetensors"] == UNKNOWN
    assert roles["text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"] == TEXT_ENCODER
    files = find_checkpoints(comfy_models, get_task("t2v-A14B"))  # one UMT5 candidate: no choice asked
    assert files.text_encoder.name == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"


def test_a_t5_that_is_not_umt5_is_named_as_such(comfy_models: Path, tmp_path: Path) -> None:
    import shutil

    from wan_local.errors import CheckpointError
    from wan_local.specs import get_task
    from wan_local.weights.layout import find_checkpoints

    root = tmp_path / "flux-t5-only"
    shutil.copytree(comfy_models, root, ignore=shutil.ignore_patterns("umt5_*"))
    with pytest.raises(CheckpointError) as refused:
        find_checkpoints(root, get_task("t2v-A14B"))
    message = str(refused.value)
    assert "lacks what t2v-A14B needs: the UMT5-XXL text encoder" in message
    assert "text_encoders/t5xxl_fp16.safetensors: not a Wan2.2 file, fp16 (a T5 text encoder, not UMT5" in message
    assert "tokenizer" not in message
    assert message.endswith(
        "Add the missing files (the Models tab downloads Comfy-Org's and QuantStack's) or "
        "download the complete Wan-AI/Wan2.2-T2V-A14B repository into another folder."
    )


def test_gguf_experts_are_told_apart_by_the_same_names_as_the_run_uses(tiny: Path, tmp_path: Path) -> None:
    """The Models tab's roles are those the run uses: 'high' / 'low' in the name, as for safetensors experts."""
    from gguf_files import write_gguf_dit

    from wan_local.errors import CheckpointError
    from wan_local.specs import get_task
    from wan_local.weights.inventory import LOW, scan_folder
    from wan_local.weights.layout import find_checkpoints

    root = tmp_path / "models"
    (root / "unet").mkdir(parents=True)
    for expert in ("high", "low"):
        path = root / "unet" / f"wan22_t2v_{expert}-Q8_0.gguf"
        write_gguf_dit(path, tiny / "t2v-A14B" / f"{expert}_noise_model", "Q8_0")
    roles = {f.path.name: f.role for f in scan_folder(root)}
    assert roles == {"wan22_t2v_high-Q8_0.gguf": HIGH, "wan22_t2v_low-Q8_0.gguf": LOW}
    with pytest.raises(CheckpointError) as refused:
        find_checkpoints(root, get_task("t2v-A14B"))
    lacks = str(refused.value).split(" Found: ")[0]
    assert "UMT5-XXL text encoder" in lacks and "DiT" not in lacks  # the experts are found, the rest is missing


# ------------------------------------------------------------------------------------------------ reads per job


def test_a_gguf_header_is_parsed_once_per_job_start(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """A job start asks for the GGUF headers from the inventory, the layout, the config reader, the planner and
    the tokenizer: each file's header is parsed once while the file is unchanged, again when it changes."""
    import os

    from gguf_files import write_gguf_umt5

    from wan_local.weights.gguf import reader
    from wan_local.weights.gguf.tokenizer import read_gguf_tokenizer
    from wan_local.weights.inventory import scan_folder
    from wan_local.weights.tokenizer_source import tokenizer_source

    t2v = tiny / "t2v-A14B"
    path = tmp_path / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf"
    path.parent.mkdir()
    write_gguf_umt5(path, t2v / "models_t5_umt5-xxl-enc-bf16.pth", spiece_model=t2v / "google/umt5-xxl/spiece.model")
    parses = []
    monkeypatch.setattr(reader, "_parse", lambda *a, _parse=reader._parse: parses.append(a[1]) or _parse(*a))
    scan_folder(tmp_path)
    source = tokenizer_source(None, path)
    first = source.identity()
    assert source.identity() == first and read_gguf_tokenizer(path) is not None
    assert parses == [path]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))  # a new download
    assert tokenizer_source(None, path).identity() == first
    assert parses == [path, path]


def test_a_saved_error_page_or_a_cut_download_says_to_download_again(comfy_models: Path, tmp_path: Path) -> None:
    """A browser's '404' page saved under the GGUF name, a safetensors cut in the middle: one line naming the
    file and what to do, before any model loads."""
    import shutil

    from wan_local.errors import CheckpointError
    from wan_local.specs import get_task
    from wan_local.weights.layout import find_checkpoints

    root = tmp_path / "models"
    shutil.copytree(comfy_models, root, ignore=shutil.ignore_patterns("t5xxl*", "clip_vision*"))
    low = root / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    with low.open("r+b") as f:
        f.truncate(low.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"low_noise_14B_fp8_scaled.safetensors .*download it again"):
        find_checkpoints(root, get_task("t2v-A14B"))
    low.unlink()
    (root / "unet").mkdir()
    page = root / "unet" / "Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf"
    page.write_text("<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>")
    with pytest.raises(CheckpointError, match=r"LowNoise-Q4_K_M.gguf is not a GGUF file .*download it again"):
        find_checkpoints(root, get_task("t2v-A14B"))


def test_an_embedded_tokenizer_is_read_once_per_job(comfy_models: Path, monkeypatch) -> None:
    """The prompt-cache key needs the tokenizer's identity and a cache miss then loads it: one read of the
    `spiece_model` bytes (a GGUF file's proto is rebuilt from 256,384 pieces), never of the encoder's weights."""
    from wan_local.weights import tokenizer_source as ts

    path = comfy_models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    kind = ts.EMBEDDED_TOKENIZERS[".safetensors"]
    reads = []
    counted = ts.EmbeddedTokenizer(kind.what, kind.carries, lambda p: reads.append(p) or kind.read(p))
    monkeypatch.setitem(ts.EMBEDDED_TOKENIZERS, ".safetensors", counted)
    source = ts.tokenizer_source(None, path)
    identity = source.identity()
    ids, _ = source.load()(["a fox"], max_length=8)
    assert reads == [path] and len(identity) == 64 and ids[0, 0] != 0


def test_files_sorted_into_sub_folders_of_comfyui_model_folders_are_found(comfy_models: Path, tmp_path: Path):
    """ComfyUI lists `diffusion_models/Wan2.2/…` as it lists `diffusion_models/…`; so does the layout."""
    import shutil

    from wan_local.specs import get_task
    from wan_local.weights.inventory import scan_folder
    from wan_local.weights.layout import find_checkpoints

    root = tmp_path / "models"
    shutil.copytree(comfy_models, root, ignore=shutil.ignore_patterns("t5xxl*"))
    (root / "diffusion_models" / "Wan2.2").mkdir()
    for path in (root / "diffusion_models").glob("*.safetensors"):
        path.rename(root / "diffusion_models" / "Wan2.2" / path.name)
    roles = {f.name(root): f.role for f in scan_folder(root)}
    assert roles["diffusion_models/Wan2.2/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"] == HIGH
    files = find_checkpoints(root, get_task("t2v-A14B"))
    assert files.dit[HIGH] == root / "diffusion_models" / "Wan2.2" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "high_noise"),
        ("Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf", "low_noise"),
        ("wan2.2_i2v_high_noise_14B_Q4_K_M.gguf", "high_noise"),
        ("Wan2_2-T2V-A14B_HIGH_fp16.safetensors", "high_noise"),
        ("wan22_t2v_low.safetensors", "low_noise"),
        ("wan2.2_t2v_flow_14B_fp16.safetensors", "expert"),  # "flow" is not "low"
        ("wan2.2_t2v_highres_14B_fp16.safetensors", "expert"),
        ("wan2.2_t2v_high_to_low_14B.safetensors", "expert"),  # both words: the name says nothing
    ],
)
def test_experts_are_told_apart_by_whole_words_of_the_file_name(tiny: Path, tmp_path: Path, name: str, role: str):
    """The layout and the inventory agree on the expert a file name states, and read it from whole words only; a
    name that states neither is found as an unnamed expert, not run as the low-noise one."""
    from wan_local.specs import get_task
    from wan_local.weights.inventory import expert_from_name, scan_folder
    from wan_local.weights.layout import find_checkpoints

    assert expert_from_name(name) == role
    path = tmp_path / "diffusion_models" / name.replace(".gguf", ".safetensors")
    write_comfy_dit(path, tiny / "t2v-A14B" / "high_noise_model", "fp16")
    (found,) = [f for f in scan_folder(tmp_path) if f.path == path]
    assert found.role == role
    if role == "expert":
        with pytest.raises(CheckpointError, match="high-noise expert"):
            find_checkpoints(tmp_path, get_task("t2v-A14B"))
        with pytest.raises(CheckpointError, match="rename it with the word high in its name"):
            find_checkpoints(tmp_path, get_task("t2v-A14B"), {"high_noise": str(path)})
