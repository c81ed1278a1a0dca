"""One engine path: every entry point resolves, admits and runs a job through wan_local.engine.

Admission is checked the way users meet it: `wan-local generate` / `queue add` as real subprocesses refusing an
impossible job before anything large is allocated, `wan-local estimate --preset auto --json` for the official
default jobs on the PCs we target, and the verdict's properties (deterministic, monotonic in RAM and VRAM, pure).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from wan_local.cli import build_parser
from wan_local.engine.admit import admit_job
from wan_local.engine.request import JobSettings
from wan_local.engine.resolve import resolve_job
from wan_local.machine import GIB, MachineInfo
from wan_local.memory.estimate import machine_for

# Reports the largest RSS (KiB) of the command it runs, then exits with the command's code.
MAX_RSS = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)
IMPOSSIBLE = ["--task", "t2v-A14B", "--prompt", "a fox", "--size", "8192*8192", "--frames", "1001", "--device", "cpu"]


def _run_measured(*args: str, timeout: float = 120) -> tuple[int, str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MAX_RSS, sys.executable, "-m", "wan_local", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    rss_kib = int(out.stderr.rsplit("maxrss_kib", 1)[1].split()[0])
    return out.returncode, out.stderr.rsplit("maxrss_kib", 1)[0], rss_kib * 1024


@pytest.mark.parametrize("command", [["generate"], ["queue", "add"]])
def test_an_impossible_job_is_refused_before_anything_large_is_allocated(tiny, tmp_path, command):
    store = ["--store", str(tmp_path / "q.sqlite3")] if command[0] == "queue" else []
    output = tmp_path / "out.mp4"
    rc, stderr, peak_rss = _run_measured(
        *command, *IMPOSSIBLE, "--ckpt-dir", str(tiny / "t2v-A14B"), *store,
        *(["--output", str(output)] if command[0] == "generate" else []),
    )  # fmt: skip
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2, stderr
    assert len(errors) == 1 and "Traceback" not in stderr
    assert "does not fit this machine" in errors[0] and "RAM" in errors[0]
    assert peak_rss < 1.5 * GIB, f"peak RSS {peak_rss / GIB:.2f} GiB"
    assert not output.exists()
    if store:
        listed = subprocess.run(
            [sys.executable, "-m", "wan_local", "queue", "list", "--json", *store],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert json.loads(listed.stdout) == [], "nothing was queued"


def _estimate(*argv: str, machine: MachineInfo, monkeypatch) -> tuple[int, dict]:
    import wan_local.machine

    monkeypatch.setattr(wan_local.machine, "detect_machine", lambda: machine)
    args = build_parser().parse_args(["estimate", *argv, "--json"])
    out = io.StringIO()
    rc = args.func(args, out=out)
    return rc, json.loads(out.getvalue())


BARE = MachineInfo("GPU", 80 * GIB, 80 * GIB, (8, 9), 256 * GIB, 250 * GIB, 10**12)


@pytest.mark.parametrize(
    ("task", "size", "frames", "vram_gb", "ram_gb"),
    [
        ("t2v-A14B", "832*480", 81, 16, 32),
        ("i2v-A14B", "832*480", 81, 16, 32),
        ("t2v-A14B", "1280*720", 81, 24, 32),
        ("ti2v-5B", "1280*704", 121, 16, 32),
    ],
)
def test_official_default_jobs_are_admitted_on_the_target_pcs(monkeypatch, task, size, frames, vram_gb, ram_gb):
    """`wan-local estimate --preset auto --json` on the PCs the product is for (the card as the driver reports
    it, the RAM as installed): admitted, peaks inside the card and the RAM, and still admitted with more RAM."""
    job = ["--task", task, "--size", size, "--frames", str(frames), "--preset", "auto"]
    for ram in (ram_gb, 64):
        rc, data = _estimate(*job, "--vram-budget-gb", str(vram_gb), "--ram-gb", str(ram), machine=BARE,
                             monkeypatch=monkeypatch)  # fmt: skip
        assert rc == 0 and data["admitted"] is True, data["message"]
        est = data["estimate"]
        assert 0 < est["peak_vram_bytes"] <= vram_gb * GIB
        assert 0 < est["peak_ram_bytes"] <= (ram - 3) * GIB  # the OS keeps ~3 GiB of the installed RAM
        assert est["seconds"] > 0 and data["preset"]


def _machine(vram_gib: float, ram_gib: float) -> MachineInfo:
    return machine_for(BARE, vram_gb=vram_gib, ram_gb=ram_gib) if vram_gib else machine_for(BARE, ram_gb=ram_gib)


def _verdict(job: JobSettings, vram_gib: float, ram_gib: float):
    admission = admit_job(resolve_job(job, machine=_machine(vram_gib, ram_gib)))
    peaks = (
        None if admission.estimate is None else (admission.estimate.peak_vram_bytes, admission.estimate.peak_ram_bytes)
    )
    return admission.admitted, admission.message, peaks


@pytest.mark.parametrize(
    "job",
    [
        JobSettings(task="t2v-A14B", ckpt_dir="", prompt="", size=(832, 480), seed=1),
        JobSettings(task="ti2v-5B", ckpt_dir="", prompt="", size=(1280, 704), seed=1, memory={"quant": "int8"}),
        JobSettings(task="t2v-A14B", ckpt_dir="", prompt="", size=(1280, 720), seed=1, preset="gpu24-ram64"),
    ],
)
def test_verdicts_are_deterministic_and_monotonic_in_ram_and_vram(job):
    rams, vrams = (12, 16, 23.5, 24, 32, 48, 64, 128), (8, 12, 16, 24, 48)
    for vram in vrams:
        admitted = []
        for ram in rams:
            first = _verdict(job, vram, ram)
            assert first == _verdict(job, vram, ram), "the same job on the same machine: the same verdict"
            admitted.append(first[0])
        assert admitted == sorted(admitted), f"{vram} GiB VRAM: admitted at less RAM but refused at more: {admitted}"
    for ram in rams:
        admitted = [_verdict(job, vram, ram)[0] for vram in vrams]
        assert admitted == sorted(admitted), f"{ram} GiB RAM: refused with more VRAM: {admitted}"


def test_admission_reads_no_files(tiny, monkeypatch):
    """Planning and admission are pure functions of the resolved job: its files were read once, by resolve."""
    from wan_local.weights import headers, layout

    request = JobSettings(task="t2v-A14B", ckpt_dir=str(tiny / "t2v-A14B"), prompt="", seed=1, device="cpu")
    job = resolve_job(request, machine=_machine(0, 32))
    assert job.checkpoint is not None and job.checkpoint.layout == "official"
    admit_job(job)  # lets torch import what it imports lazily on first use (its own files, not the checkpoint's)

    def no_io(*args, **kwargs):
        raise AssertionError("admission read a file")

    for module, name in ((headers, "tensor_table"), (headers, "read_dit_config"), (layout, "find_checkpoints")):
        monkeypatch.setattr(module, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)
    first, second = admit_job(job), admit_job(dataclasses.replace(job))
    assert first.admitted and first.message == second.message
    assert first.estimate.peak_ram_bytes == second.estimate.peak_ram_bytes


def test_offload_blocks_streams_on_the_cpu_and_changes_no_bit(tiny, tmp_path):
    """`--offload blocks --device cpu` logs a plan with every block streamed and gives the resident result bit for
    bit (the same planner, ExpertSlots and BlockStreamer as on a GPU; copies are synchronous)."""
    from safetensors.torch import load_file

    results, plans = {}, {}
    for offload in ("none", "blocks"):
        out = subprocess.run(
            [sys.executable, "-m", "wan_local", "generate", "--task", "t2v-A14B", "--ckpt-dir", str(tiny / "t2v-A14B"),
             "--prompt", "a fox", "--size", "64*48", "--frames", "5", "--steps", "4", "--seed", "3", "--device", "cpu",
             "--dtype", "fp32", "--offload", offload, "--output", str(tmp_path / f"{offload}.mp4"),
             "--save-latents", str(tmp_path / f"{offload}.safetensors")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        plans[offload] = next(line for line in out.stderr.splitlines() if " plan: " in line)
        results[offload] = load_file(str(tmp_path / f"{offload}.safetensors"))
    resident, total = map(int, re.search(r"DiT blocks (\d+) of (\d+) resident, none streamed", plans["none"]).groups())
    assert resident == total > 0
    assert f"DiT blocks 0 of {total} resident, {total} streamed" in plans["blocks"]
    assert all(torch.equal(results["none"][k], results["blocks"][k]) for k in ("latents", "video"))


def _real_shape_checkpoint(task: str, linear_dtype: str, other_dtype: str):
    """A CheckpointInfo of the real shapes as resolve reads it from a file's header (no file is written): the
    official key names of a meta-built DiT, block Linear weights in `linear_dtype` (with ComfyUI's 0-dim float32
    `scale_weight` when that is fp8), everything else in `other_dtype`."""
    from pathlib import Path
    from types import SimpleNamespace

    from torch import nn

    from wan_local.engine.resolve import CheckpointInfo
    from wan_local.memory.bytes import TEXT_ENCODER_PARAMS, VAE_PARAMS, official_dit_config
    from wan_local.memory.quant.numerics import is_quant_target
    from wan_local.models.dit import WanDiT
    from wan_local.specs import get_task
    from wan_local.weights.layout import CheckpointSet

    cfg = official_dit_config(task)
    with torch.device("meta"):
        model = WanDiT(cfg)
    table = {k: SimpleNamespace(shape=tuple(v.shape), dtype=other_dtype) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_quant_target(name, "all"):
            table[f"{name}.weight"].dtype = linear_dtype
            if linear_dtype == "F8_E4M3":
                table[f"{name}.scale_weight"] = SimpleNamespace(shape=(), dtype="F32")
    file_bytes = sum(torch.Size(t.shape).numel() * (1 if t.dtype == "F8_E4M3" else 2) for t in table.values())
    files = CheckpointSet("comfyui", {}, Path("vae"), Path("umt5"), Path("tokenizer"))
    vae = VAE_PARAMS[get_task(task).vae]
    return CheckpointInfo(files, cfg, table, file_bytes, TEXT_ENCODER_PARAMS, vae)


def test_a_comfyui_fp8_checkpoint_is_planned_as_stored():
    """T2V-A14B from ComfyUI's fp8_scaled files with --quant none is planned at fp8 size, not at bf16 size (the
    earlier estimate said 29 GiB for what measured 15 GiB); a bf16 file of the same shapes plans at bf16."""
    base = JobSettings(task="t2v-A14B", ckpt_dir="", prompt="", size=(832, 480), seed=1, device="cpu",
                       preset="cpu", memory={"quant": "none"})  # fmt: skip
    job = resolve_job(base, machine=_machine(0, 64))
    peaks = {}
    for name, dtypes in (("fp8", ("F8_E4M3", "BF16")), ("bf16", ("BF16", "BF16"))):
        resolved = dataclasses.replace(job, checkpoint=_real_shape_checkpoint("t2v-A14B", *dtypes))
        admission = admit_job(resolved, force=True)
        plan = admission.estimate.plan
        peaks[name] = (admission.estimate.peak_ram_bytes, plan.denoise_ram_bytes)
    expert_bf16 = 2 * 14.3e9
    saved = peaks["bf16"][1] - peaks["fp8"][1]  # the same job but the expert's Linear weights at 1 byte, not 2
    assert 0.45 * expert_bf16 < saved < 0.55 * expert_bf16, peaks
