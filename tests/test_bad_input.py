"""Bad input gets one clear line, a non-zero exit and no video: `wan-local generate` as a real subprocess.

Non-finite settings and out-of-range seeds are refused when the job is resolved (the same check for the CLI, the
queue, the UI and the API); an image bomb before it is decoded; NaN weights when the checkpoint is loaded; a
result that still turns non-finite before any video is written.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

BASE = ["--prompt", "a fox", "--size", "64*48", "--frames", "5", "--steps", "2", "--device", "cpu", "--seed", "1"]


def _generate(tmp_path: Path, ckpt: Path, *args: str, task: str = "t2v-A14B") -> tuple[int, list[str], Path]:
    output = tmp_path / "out.mp4"
    out = subprocess.run(
        [sys.executable, "-m", "wan_local", "generate", "--task", task, "--ckpt-dir", str(ckpt), *BASE, *args,
         "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, [line for line in out.stderr.splitlines() if line.startswith("error:")], output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--shift", "nan"], "shift must be a finite number"),
        (["--guide-scale", "inf"], "guidance scale must be a finite number"),
        (["--guide-scale", "3,-inf"], "guidance scale must be a finite number"),
        (["--seed", str(2**64)], "seed 18446744073709551616 is out of range"),
        (["--steps", "1000000"], "steps must be from 1 to 1000"),
    ],
)
def test_unusable_settings_are_refused_with_one_line(tiny, tmp_path, args, words):
    rc, errors, output = _generate(tmp_path, tiny / "t2v-A14B", *args)
    assert rc == 2 and len(errors) == 1 and words in errors[0], errors
    assert not output.exists()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (an image bomb needs no more to be refused)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )


def test_an_image_bomb_is_refused_before_it_is_decoded(tiny, tmp_path):
    bomb = tmp_path / "bomb.png"
    for width, height in ((20000, 20000), (9000, 9000)):  # past PIL's own bomb limit, and past ours only
        _png_header_only(bomb, width, height)
        rc, errors, output = _generate(tmp_path, tiny / "i2v-A14B", "--image", str(bomb), task="i2v-A14B")
        assert rc == 2 and len(errors) == 1 and str(bomb) in errors[0] and "scale it down" in errors[0], errors
        assert not output.exists()


def test_nan_weights_fail_the_load_naming_the_tensor(tiny, tmp_path):
    ckpt = tmp_path / "t2v-A14B"
    shutil.copytree(tiny / "t2v-A14B", ckpt)
    shard = next((ckpt / "low_noise_model").glob("*.safetensors"))
    shard.chmod(0o644)
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("ffn.0.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    rc, errors, output = _generate(tmp_path, ckpt, "--steps", "6")  # 6 steps reach the low-noise expert
    assert rc == 2 and len(errors) == 1, errors
    assert "NaN or infinite values" in errors[0] and name in errors[0] and "damaged" in errors[0]
    assert not output.exists()


def test_a_non_finite_result_writes_no_video(tiny, tmp_path, monkeypatch):
    """Whatever makes the latent non-finite (an overflow the checks above cannot foresee), no video is saved."""
    from wan_local import pipeline as pipeline_module
    from wan_local.pipeline import GenerationSettings, NonFiniteResult, WanPipeline

    monkeypatch.setattr(pipeline_module, "denoise", lambda noise, *a, **k: torch.full_like(noise, float("inf")))
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, cache_dir=tmp_path)
    settings = GenerationSettings(task="t2v-A14B", prompt="a fox", size=(64, 48), frames=5, steps=2, seed=1)
    with pytest.raises(NonFiniteResult, match="the denoised latent holds NaN or infinite values"):
        pipe.generate(settings)


def _copy_with(tiny: Path, tmp_path: Path, task: str = "t2v-A14B") -> Path:
    ckpt = tmp_path / task
    shutil.copytree(tiny / task, ckpt)
    for path in ckpt.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return ckpt


def test_an_integer_tensor_of_the_right_shape_is_named(tiny, tmp_path):
    ckpt = _copy_with(tiny, tmp_path)
    shard = next((ckpt / "high_noise_model").glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("norm3.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(shard))
    rc, errors, output = _generate(tmp_path, ckpt)
    assert rc == 2 and len(errors) == 1 and "wrong dtypes" in errors[0] and name in errors[0], errors
    assert not output.exists()


def test_layout_errors_name_the_real_problem(tiny, tmp_path):
    """A stray model_index.json does not make an official folder "diffusers", and a broken config.json is named
    instead of a VAE or text encoder that is really there."""
    from wan_local.errors import CheckpointError
    from wan_local.specs import get_task
    from wan_local.weights.layout import find_checkpoints

    ckpt = _copy_with(tiny, tmp_path, "ti2v-5B")
    (ckpt / "model_index.json").write_text("{}")
    assert find_checkpoints(ckpt, get_task("ti2v-5B")).format == "official"
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json cannot be read"):
        find_checkpoints(ckpt, get_task("ti2v-5B"))


def test_a_busy_port_is_one_line_and_the_queue_is_untouched(tmp_path):
    """A second app on a port already taken says so in one line and exits 2; the queue it opened is intact."""
    import socket

    from running_app import REPO_ROOT, app_env

    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port), "--no-browser", "--no-worker",
             "--home", str(home)],
            capture_output=True, text=True, timeout=120, env=app_env(),
        )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line or line.startswith("error")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and f"port {port} is in use" in errors[0] and "--port" in errors[0]
    from wan_local.jobs.store import JobStore

    assert JobStore(home / "jobs.sqlite3").list() == []
