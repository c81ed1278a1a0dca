"""Folders as hobbyists coming from ComfyUI / ComfyUI-GGUF have them, driven as they drive the product: a
relative `--ckpt-dir` queued from one folder and run by a worker started elsewhere, `--file` paths copied from
the candidate list of an error message (relative to the checkpoint folder).

The ComfyUI files are built as the repackaged ones are keyed (fact sheet §3.3, `comfy_files`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_files import write_comfy_dit

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
