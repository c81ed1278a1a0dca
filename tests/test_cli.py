"""The command-line contract: argument parsing, clear errors for bad input, cancel, the bf16 regime."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, rel_l2
from PIL import Image

from wan_local import cli
from wan_local.errors import InputError
from wan_local.options import parse_guide_scale
from wan_local.pipeline import GenerationSettings, WanPipeline
from wan_local.sampling.denoise import Cancelled, CancelToken
from wan_local.specs import DEFAULT_NEGATIVE_PROMPT, parse_size


def test_parse_size_and_guide_scale():
    assert parse_size("1280*720") == (1280, 720)
    assert parse_size("832x480") == (832, 480)
    assert parse_guide_scale("3.5") == (3.5, 3.5)
    assert parse_guide_scale("3,4") == (3.0, 4.0)
    for bad in ("1280", "a*b", "0*16", "16*16*16"):
        with pytest.raises(InputError):
            parse_size(bad)
    for bad in ("x", "1,2,3"):
        with pytest.raises(InputError):
            parse_guide_scale(bad)


def test_defaults_are_the_official_ones():
    s = GenerationSettings(task="t2v-a14b", prompt="p").resolve()
    assert (s.task, s.size, s.frames, s.steps, s.shift, s.guide_scale) == (
        "t2v-A14B", (1280, 720), 81, 40, 12.0, (3.0, 4.0),
    )  # fmt: skip
    assert s.seed >= 0
    assert s.negative_prompt == DEFAULT_NEGATIVE_PROMPT  # empty means the official one, as the reference does
    assert GenerationSettings(task="t2v-A14B", prompt="p", negative_prompt="blur").resolve().negative_prompt == "blur"
    s = GenerationSettings(task="ti2v-5B", prompt="p", seed=5).resolve()
    assert (s.size, s.frames, s.steps, s.shift, s.guide_scale, s.seed) == ((1280, 704), 121, 50, 5.0, (5.0, 5.0), 5)
    s = GenerationSettings(task="i2v-A14B", prompt="p", image="x.png").resolve()
    assert (s.steps, s.shift, s.guide_scale) == (40, 5.0, (3.5, 3.5))


def _generate(tiny, tmp_path, *extra):
    return [
        "generate", "--task", "t2v-A14B", "--ckpt-dir", str(tiny / "t2v-A14B"), "--prompt", "a fox",
        "--size", "64*48", "--frames", "5", "--steps", "2", "--device", "cpu", "--output", str(tmp_path / "o.mp4"),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "60*48"], "multiples of 16"),
        (["--frames", "6"], "4k+1"),
        (["--task", "i2v-A14B"], "needs an input image"),
        (["--image", "missing.png", "--task", "ti2v-5B", "--ckpt-dir", "TI2V", "--size", "64*64"], "does not exist"),
        (["--image", "IMG"], "takes no image"),
        (["--guide-scale", "1,2,3"], "one value or two"),
        (["--output", "video.avi"], "must end in .mp4"),
        (["--ckpt-dir", "/nonexistent/folder"], "does not exist"),
    ],
)
def test_bad_input_gives_a_clear_error(tiny, tmp_path, capsys, extra, message):
    names = {"IMG": str(tmp_path / "i.png"), "TI2V": str(tiny / "ti2v-5B")}
    extra = [names.get(e, e) for e in extra]
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    assert cli.main(_generate(tiny, tmp_path, *extra)) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o.mp4").exists()


def test_broken_image_is_named(tiny, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    argv = _generate(tiny, tmp_path, "--task", "ti2v-5B", "--ckpt-dir", str(tiny / "ti2v-5B"), "--size", "64*64")
    assert cli.main([*argv, "--image", str(broken)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "broken.png" in err and "cannot be read" in err


def test_python_dash_m_runs_the_cli(tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "wan_local", *_generate(tiny, tmp_path, "--frames", "4")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == cli.EXIT_ERROR
    assert "frames=4" in proc.stderr and "4k+1" in proc.stderr


def test_cancel_stops_between_steps(tiny):
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", device="cpu", dtype=torch.float32)
    token = CancelToken()
    steps = []

    def on_step(event):
        steps.append(event.index)
        if event.index == 1:
            token.cancel()

    settings = GenerationSettings(task="t2v-A14B", prompt="a fox", size=(64, 48), frames=5, steps=6, seed=1)
    with pytest.raises(Cancelled):
        pipe.generate(settings, on_step=on_step, cancel=token)
    assert steps == [0, 1]


def test_bf16_regime_stays_close_to_fp32(tiny, golden):
    """The bf16 weights + autocast path (the CUDA regime) runs on the CPU and lands near the fp32 result."""
    gold = golden("t2v_a14b_unipc")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", device="cpu", dtype=torch.bfloat16)
    settings = GenerationSettings(
        task="t2v-A14B",
        prompt="A red fox runs through fresh snow at sunrise, cinematic lighting.",
        size=(64, 48),
        frames=5,
        steps=6,
        guide_scale=(3.0, 4.0),
        seed=42,
    )
    result = pipe.generate(settings)
    assert result.latent.dtype == torch.float32
    error = rel_l2(result.latent, gold["final_latent"])
    assert 0 < error < 0.02, f"bf16 run is {error:.3g} away from the fp32 golden latent"


def test_generate_writes_to_the_folder_the_gallery_reads(monkeypatch, tmp_path, caplog):
    """Without --output the video goes where the app's Gallery looks: the Settings tab's output folder, else the
    job store's <home>/outputs (not ./outputs of wherever the command ran)."""
    import json

    from wan_local.jobs.store import JobStore

    monkeypatch.setenv("WAN_LOCAL_HOME", str(tmp_path))
    path = cli.default_output_path("t2v-A14B", (64, 48), "a red fox, in snow")
    assert path.parent == JobStore().outputs_dir == tmp_path / "outputs"
    assert path.name.startswith("t2v-A14B_64x48_a_red_fox_in_snow_") and path.suffix == ".mp4"
    (tmp_path / "settings.json").write_text(json.dumps({"output_dir": str(tmp_path / "videos")}))
    assert cli.default_output_path("t2v-A14B", (64, 48), "p").parent == tmp_path / "videos"
    (tmp_path / "settings.json").write_text("{broken")
    assert cli.default_output_path("t2v-A14B", (64, 48), "p").parent == tmp_path / "outputs"
    assert "cannot be read" in caplog.text
