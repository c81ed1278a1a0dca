"""Folders of GGUF experts (Q8_0, Q4_K_M) with a ComfyUI text encoder and VAE, run through the pipeline on the CPU.

For every task: the GGUF run equals a run on the same weights dequantized offline (by gguf-py, saved as a
ComfyUI safetensors file); streamed GGUF equals resident GGUF bit for bit, and the streamed blocks carry their
packed bytes; the resolver finds the files and counts their weights as stored. The error against the official
float32 weights (what the quantization costs) is printed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from comfy_files import write_comfy_text_encoder, write_comfy_vae
from conftest import rel_l2
from gguf_files import write_gguf_dit
from safetensors.torch import save_file
from test_expert_streaming import _settings, cpu_plan, record_streamers

from wan_local.engine.resolve import read_checkpoint
from wan_local.memory.bytes import model_bytes_from_tensors
from wan_local.memory.options import MemoryOptions
from wan_local.memory.quant.gguf import GGUFLinear
from wan_local.pipeline import WanPipeline
from wan_local.specs import get_task
from wan_local.weights.layout import HIGH, LOW, SINGLE, find_checkpoints

FTYPES = ("Q8_0", "Q4_K_M")
TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
# QuantStack's file names (fact sheet §3.4); experts told apart by HighNoise / LowNoise.
GGUF_NAMES = {
    ("t2v-A14B", HIGH): "Wan2.2-T2V-A14B-HighNoise-{q}.gguf",
    ("t2v-A14B", LOW): "Wan2.2-T2V-A14B-LowNoise-{q}.gguf",
    ("i2v-A14B", HIGH): "Wan2.2-I2V-A14B-HighNoise-{q}.gguf",
    ("i2v-A14B", LOW): "Wan2.2-I2V-A14B-LowNoise-{q}.gguf",
    ("ti2v-5B", SINGLE): "Wan2.2-TI2V-5B-{q}.gguf",
}
OFFICIAL = {HIGH: "high_noise_model", LOW: "low_noise_model", SINGLE: "."}
# GGUF vs the same weights dequantized offline: the same float32 values in the same float32 maths; only the
# weights' addresses differ (mapped file vs freshly dequantized), which steers the CPU GEMM's blocking.
# Measured at most 4.5e-7 (latent) / 1.2e-6 (video) rel. L2.
OFFLINE_TOL = 1e-5


def _common_files(root: Path, tiny: Path) -> None:
    write_comfy_text_encoder(root / "text_encoders" / "umt5_xxl_fp16.safetensors", tiny)
    write_comfy_vae(root / "vae" / "wan_2.1_vae.safetensors", tiny / "t2v-A14B" / "Wan2.1_VAE.pth")
    write_comfy_vae(root / "vae" / "wan2.2_vae.safetensors", tiny / "ti2v-5B" / "Wan2.2_VAE.pth")


@pytest.fixture(scope="module")
def folders(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{ftype: (GGUF folder, offline-dequantized folder)}: every task's DiTs, a text encoder and both VAEs."""
    out = {}
    for ftype in FTYPES:
        gguf_root = tmp_path_factory.mktemp(f"gguf-{ftype}")
        offline = tmp_path_factory.mktemp(f"offline-{ftype}")
        for root in (gguf_root, offline):
            _common_files(root, tiny)
            (root / "diffusion_models").mkdir()
        for (task, role), pattern in GGUF_NAMES.items():
            source = tiny / task / OFFICIAL[role]
            name = pattern.format(q=ftype)
            prefix = "model.diffusion_model." if role == LOW else ""  # both spellings occur
            values = write_gguf_dit(gguf_root / "diffusion_models" / name, source, ftype, prefix=prefix)
            config = json.loads((source / "config.json").read_text())
            save_file(
                {f"model.diffusion_model.{k}": v.contiguous() for k, v in values.items()},
                str(offline / "diffusion_models" / name.replace(".gguf", ".safetensors")),
                metadata={"config": json.dumps(config)},
            )
        out[ftype] = (gguf_root, offline)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt embeddings shared by the runs (they only speed them up)."""
    return tmp_path_factory.mktemp("gguf-cache")


def _run(monkeypatch, root: Path, task: str, tiny: Path, cache: Path, plan=None):
    pipe = WanPipeline(root, task, "cpu", torch.float32, MemoryOptions(keep_idle_expert="drop"), cache_dir=cache)
    monkeypatch.setattr(pipe, "generate", functools.partial(WanPipeline.generate, pipe, plan=plan))
    try:
        return pipe.generate(_settings(tiny, task))
    finally:
        pipe.close()


def test_gguf_folder_layout_and_bytes(folders, tiny: Path) -> None:
    """find_checkpoints picks each task's GGUF experts by input channels and HighNoise / LowNoise; the resolver
    reads their headers and the byte accounting counts the packed blocks as stored."""
    root = folders["Q4_K_M"][0]
    for task in TASKS:
        spec = get_task(task)
        found = find_checkpoints(root, spec)
        roles = (HIGH, LOW) if spec.two_experts else (SINGLE,)
        assert found.format == "comfyui"
        assert found.dit == {r: root / "diffusion_models" / GGUF_NAMES[(task, r)].format(q="Q4_K_M") for r in roles}
        assert found.text_encoder.name == "umt5_xxl_fp16.safetensors"
        info = read_checkpoint(root, spec)
        assert info.dit_config.model_type == spec.model_type and info.dit_config.num_heads == 2
        model = model_bytes_from_tensors(info.dit_tensors, "int8", dense_bytes=4)  # GGUF wins over --quant int8
        packed = {k: t for k, t in info.dit_tensors.items() if t.dtype in ("Q4_K", "Q6_K")}
        assert len(packed) == 2 * 10 and model.quant == "as stored"
        # a block: 10 packed Linears as stored (144 / 210 bytes per 256 values) + its dense tensors in float32
        dense = sum(t.numel * 4 for k, t in info.dit_tensors.items() if k.startswith("blocks.0.") and k not in packed)
        stored = sum(
            t.numel // 256 * (144 if t.dtype == "Q4_K" else 210) for k, t in packed.items() if k.startswith("blocks.0.")
        )
        assert model.block_bytes[0] == dense + stored


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("task", TASKS)
def test_gguf_runs_equal_offline_dequantized_and_stream_bit_exact(
    folders, tiny: Path, cache: Path, monkeypatch, task: str, ftype: str
) -> None:
    gguf_root, offline = folders[ftype]
    streamers = record_streamers(monkeypatch)
    resident = _run(monkeypatch, gguf_root, task, tiny, cache)
    reference = _run(monkeypatch, offline, task, tiny, cache)
    assert streamers == []
    streamed = _run(monkeypatch, gguf_root, task, tiny, cache, cpu_plan(streamed=(0, 1)))

    err_offline = rel_l2(resident.latent, reference.latent)
    print(f"{task} {ftype}: latent rel. L2 vs offline-dequantized {err_offline:.2e}")
    assert err_offline <= OFFLINE_TOL and rel_l2(resident.video, reference.video) <= OFFLINE_TOL

    assert torch.equal(streamed.latent, resident.latent) and torch.equal(streamed.video, resident.video)
    assert streamers and all(s.stats.on_demand_loads == 0 for s in streamers)
    for streamer in streamers:
        # the streamed blocks' Linears are GGUFLinear: their slabs hold the packed bytes, not float32 weights
        linears = [m for b in streamer._blocks for m in b.modules() if isinstance(m, GGUFLinear)]
        assert len(linears) == 2 * 10
        packed = sum(m.weight.numel() for m in linears)
        assert packed <= sum(m.in_features * m.out_features for m in linears) * (34 / 32) / 1  # ≤ 8.5 bits / weight
        assert streamer.buffer_bytes < sum(4 * m.in_features * m.out_features for m in linears) / 2


def test_a14b_q4_k_m_experts_are_planned_as_stored(tiny: Path, tmp_path: Path) -> None:
    """Two I2V-A14B Q4_K_M experts of the published size (headers with the real 1095 tensors, data sections sparse
    holes) with a ComfyUI text encoder and VAE: on a 16 GB card with 32 GB of RAM the plan holds each expert's
    9.65 GB resident, where the same tensors stored in bf16 (quantized to int8 by that preset) must stream."""
    import dataclasses

    from gguf_files import a14b_i2v_q4_k_m_tensors, write_gguf_header_only

    from wan_local.engine.admit import estimate_for
    from wan_local.engine.request import JobSettings
    from wan_local.engine.resolve import resolve_job
    from wan_local.machine import GIB, MachineInfo
    from wan_local.memory.estimate import machine_for
    from wan_local.weights.headers import TensorInfo

    tensors = a14b_i2v_q4_k_m_tensors()
    (tmp_path / "diffusion_models").mkdir()
    for role in ("HighNoise", "LowNoise"):
        write_gguf_header_only(tmp_path / "diffusion_models" / f"Wan2.2-I2V-A14B-{role}-Q4_K_M.gguf", tensors, "Q4_K_M")
    _common_files(tmp_path, tiny)
    machine = machine_for(
        MachineInfo("GPU", 80 * GIB, 80 * GIB, (8, 9), 256 * GIB, 250 * GIB, 10**12), vram_gb=16, ram_gb=32
    )
    request = JobSettings(task="i2v-A14B", ckpt_dir=str(tmp_path), prompt="", size=(832, 480), seed=1)
    job = resolve_job(request, machine=machine, need_image=False)
    assert job.checkpoint.dit_file_bytes == 9_651_728_896 and job.requested.name == "gpu16-ram32"
    estimate = estimate_for(job, job.memory(job.requested))
    plan = estimate.plan
    weights = plan.resident_block_bytes + plan.non_block_bytes
    print(f"GGUF Q4_K_M: {weights / 1e9:.2f} GB of weights resident, peak VRAM {estimate.peak_vram_bytes / 1e9:.2f} GB")
    assert plan.streamed_blocks == () and 9.6e9 < weights < 9_651_728_896
    # The preset's int8 does not apply to GGUF experts, and the estimate says so instead of promising int8.
    assert job.memory(job.requested).quant == "int8"
    assert any("--quant int8 does not apply to them" in n for n in estimate.notes)
    assert not any("int8 is weight storage only" in n for n in estimate.notes)

    as_bf16 = {k: TensorInfo(t.shape, "BF16") for k, t in job.checkpoint.dit_tensors.items()}
    bf16_job = dataclasses.replace(job, checkpoint=dataclasses.replace(job.checkpoint, dit_tensors=as_bf16))
    assert len(estimate_for(bf16_job, job.memory(job.requested)).plan.streamed_blocks) > 0
