"""Pre-flight estimates: FLOPs against budgets.md and the real models, times, RAM peaks, CPU-only machines, CLI."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from wan_local.cli import build_parser
from wan_local.errors import InputError
from wan_local.machine import MachineInfo
from wan_local.memory import estimate as E
from wan_local.memory.bytes import official_dit_config, tokens_for
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import PlanError
from wan_local.models.dit import DiTBlock
from wan_local.models.vae21 import WanVAE21
from wan_local.models.vae22 import WanVAE22
from wan_local.models.vae_blocks import FeatureCache
from wan_local.specs import get_task

GIB = 1024**3


def machine(gpu: str | None = "NVIDIA GeForce RTX 4090", vram_gib: float = 24, ram_gib: float = 64) -> MachineInfo:
    """A desktop: ~1 GiB of the card and ~3 GiB of RAM taken by the OS and the desktop."""
    has_gpu = gpu is not None
    return MachineInfo(
        gpu_name=gpu,
        vram_total_bytes=int(vram_gib * GIB) if has_gpu else 0,
        vram_free_bytes=int((vram_gib - 1) * GIB) if has_gpu else 0,
        cuda_capability=(8, 9) if has_gpu else None,
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int((ram_gib - 3) * GIB),
        disk_free_bytes=500 * GIB,
    )


# budgets.md's table: (task, width, height, frames, steps, FLOP per forward, 4090 bf16 job floor in seconds)
REFERENCE_JOBS = {
    "a14b-480p": ("t2v-A14B", 832, 480, 81, 40, 1.68e15, 814),
    "a14b-720p": ("t2v-A14B", 1280, 720, 81, 40, 6.52e15, 3163),
    "5b-720p": ("ti2v-5B", 1280, 704, 121, 50, 5.17e14, 313),
}


@pytest.mark.parametrize("job", list(REFERENCE_JOBS))
def test_forward_flops_match_budgets(job):
    task, w, h, f, steps, flops, floor_4090 = REFERENCE_JOBS[job]
    cfg = official_dit_config(task)
    per_forward = E.dit_forward_flops(cfg, tokens_for(get_task(task), w, h, f))
    assert per_forward == pytest.approx(flops, rel=0.02)
    # The job floor: steps x 2 CFG forwards at 100 % of the 4090's 165 TFLOPs.
    assert steps * 2 * per_forward / 165e12 == pytest.approx(floor_4090, rel=0.02)


@pytest.mark.parametrize("task, tokens", [("t2v-A14B", 32_760), ("ti2v-5B", 27_280)])
def test_linear_flops_match_a_counted_block(task, tokens):
    """The Linear part of the formula against torch's FLOP counter on a real block (fake tensors, no memory)."""
    cfg = official_dit_config(task)
    c = cfg.dim
    with FakeTensorMode():
        block = DiTBlock(cfg)
        args = (
            torch.empty(1, tokens, c),
            torch.empty(1, 6, c),
            torch.empty(1, cfg.text_len, c),
            torch.empty(tokens, 1, cfg.head_dim // 2, dtype=torch.complex128),
            torch.zeros(1, 1, dtype=torch.long),
        )
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            block(*args)
    counted = counter.get_flop_counts()["Global"]
    linear = sum(v for k, v in counted.items() if "mm" in str(k)) * cfg.num_layers
    attention = 4.0 * tokens * tokens * c * cfg.num_layers + 4.0 * tokens * cfg.text_len * c * cfg.num_layers
    assert E.dit_forward_flops(cfg, tokens) - attention == pytest.approx(linear, rel=1e-6)


@pytest.mark.parametrize("vae_cls, kind", [(WanVAE21, "wan2.1"), (WanVAE22, "wan2.2")])
def test_vae_decode_flops_per_pixel_match_the_decoder(vae_cls, kind):
    with FakeTensorMode():
        vae = vae_cls()
        cache, hw = FeatureCache(), 16
        with torch.no_grad():
            for _ in range(2):  # the first chunk makes 1 frame; the steady state starts at the second
                vae.decode_chunk(torch.empty(1, vae.z_dim, 1, hw, hw), cache)
            counter = FlopCounterMode(display=False)
            with counter:
                frames = vae.decode_chunk(torch.empty(1, vae.z_dim, 1, hw, hw), cache)
    pixels = frames.shape[2] * frames.shape[3] * frames.shape[4]
    assert E.VAE_DECODE_FLOPS_PER_PIXEL[kind] == pytest.approx(counter.get_total_flops() / pixels, rel=0.01)


def test_a14b_480p_on_a_4090_is_the_floor_over_mfu():
    est = E.estimate_job("t2v-A14B", (832, 480), 81, 40, MemoryOptions(quant="int8"), machine(), os_name="Linux")
    floor_over_mfu = 814 / E.MFU  # budgets.md's 4090 job floor at the assumed utilisation
    stages = dict(est.seconds_by_stage)
    assert stages["denoise"] == pytest.approx(floor_over_mfu, rel=0.02)  # fully resident: nothing exposed
    assert floor_over_mfu <= est.seconds <= 1.1 * floor_over_mfu
    assert est.seconds == pytest.approx(sum(stages.values()), abs=0.01)
    assert est.seconds_per_step * 40 == pytest.approx(stages["denoise"], rel=1e-6)
    assert est.plan.streamed_blocks == () and est.device_name.endswith("RTX 4090")
    assert est.peak_vram_bytes == est.plan.peak_vram_bytes <= 23 * GIB
    assert any("placeholder" in note for note in est.notes)


def test_ram_peak_with_the_idle_expert_dropped():
    options = MemoryOptions(quant="int8", keep_idle_expert="drop")
    for vram in (16, 24):
        est = E.estimate_job("t2v-A14B", (832, 480), 81, 40, options, machine(vram_gib=vram, ram_gib=32))
        assert est.plan.experts_in_ram == 1
        assert est.peak_ram_bytes <= 32e9


def test_streaming_is_hidden_on_a_16gb_4090_class_card():
    est16 = E.estimate_job("t2v-A14B", (832, 480), 81, 40, MemoryOptions(quant="int8"), machine(vram_gib=16))
    est24 = E.estimate_job("t2v-A14B", (832, 480), 81, 40, MemoryOptions(quant="int8"), machine(vram_gib=24))
    assert est16.plan.streamed_blocks and not est24.plan.streamed_blocks
    assert est16.seconds_per_step == pytest.approx(est24.seconds_per_step, rel=1e-9)  # budgets: copies hide


@pytest.mark.parametrize(
    "task, size, frames, quant", [("ti2v-5B", (1280, 704), 121, "none"), ("t2v-A14B", (832, 480), 81, "int8")]
)
def test_cpu_only_machine_gets_a_finite_estimate(task, size, frames, quant):
    est = E.estimate_job(task, size, frames, 4, MemoryOptions(quant=quant), machine(gpu=None, ram_gib=64))
    assert est.plan.device == "cpu" and est.peak_vram_bytes == 0
    assert math.isfinite(est.seconds) and est.seconds > 3600  # slow, but something to show
    assert 0 < est.peak_ram_bytes <= 61 * GIB
    assert any("CPU" in note for note in est.notes)


def test_i2v_peak_includes_the_conditioning_encode():
    options = MemoryOptions(quant="int8")
    i2v = E.estimate_job("i2v-A14B", (1280, 720), 81, 40, options, machine(vram_gib=16), os_name="Linux")
    t2v = E.estimate_job("t2v-A14B", (1280, 720), 81, 40, options, machine(vram_gib=16), os_name="Linux")
    assert i2v.plan.condition_vram_bytes > 0 and t2v.plan.condition_vram_bytes == 0
    assert i2v.plan.vae_tile_latent_px == t2v.plan.vae_tile_latent_px is not None
    assert i2v.peak_vram_bytes <= i2v.plan.usable_vram_bytes


def test_invalid_settings_and_impossible_jobs_raise():
    options = MemoryOptions(quant="int8")
    with pytest.raises(InputError, match="steps"):
        E.estimate_job("t2v-A14B", (832, 480), 81, 0, options, machine())
    with pytest.raises(InputError, match="multiples of 16"):
        E.estimate_job("t2v-A14B", (830, 480), 81, 40, options, machine())
    with pytest.raises(InputError, match="'ti2v'"):
        E.estimate_job("t2v-A14B", (832, 480), 81, 40, options, machine(), official_dit_config("ti2v-5B"))
    with pytest.raises(PlanError, match="VRAM"):
        E.estimate_job("t2v-A14B", (1280, 720), 81, 40, options, machine(vram_gib=6))


def test_vram_budget_option_and_pinned_cap():
    small = MemoryOptions(quant="int8", vram_budget_gb=12)
    est = E.estimate_job("t2v-A14B", (832, 480), 81, 40, small, machine(), os_name="Linux")
    assert est.plan.usable_vram_bytes == 11 * GIB
    too_big = MemoryOptions(quant="int8", vram_budget_gb=40)
    est = E.estimate_job("t2v-A14B", (832, 480), 81, 40, too_big, machine(), os_name="Linux")
    assert est.plan.usable_vram_bytes == 22 * GIB and any("exceeds the free VRAM" in n for n in est.notes)
    capped = MemoryOptions(quant="int8", pinned_ram_cap_gb=2)
    est = E.estimate_job("t2v-A14B", (832, 480), 81, 40, capped, machine(vram_gib=16), os_name="Windows")
    assert est.plan.pinned_host_bytes <= 2 * GIB < est.plan.pinned_host_bytes + est.plan.pageable_host_bytes


def test_exposed_streaming_seconds():
    # Streamed blocks between resident ones, copies shorter than a block's compute: fully hidden.
    assert E.exposed_streaming_seconds([1.0] * 8, {1: 0.5, 4: 0.5, 6: 0.5}, 1) == pytest.approx(0.0)
    # Everything streamed and copy-bound: a forward takes n copies, so n x (copy - compute) is exposed.
    assert E.exposed_streaming_seconds([1.0] * 8, dict.fromkeys(range(8), 1.5), 1) == pytest.approx(8 * 0.5)
    assert E.exposed_streaming_seconds([1.0] * 8, dict.fromkeys(range(8), 1.5), 2) == pytest.approx(8 * 0.5)
    # Everything streamed, copies shorter than compute: hidden once the pipeline is full.
    assert E.exposed_streaming_seconds([1.0] * 8, dict.fromkeys(range(8), 0.9), 1) == pytest.approx(0.0)
    assert E.exposed_streaming_seconds([1.0] * 4, {}, 1) == 0.0


def test_device_speed_lookup():
    assert E.device_speed("NVIDIA GeForce RTX 4090", 24 * GIB).bf16_tflops == pytest.approx(165.2)
    assert E.device_speed("NVIDIA H100 PCIe", 80 * GIB).name == "H100 PCIe"
    assert E.device_speed("NVIDIA H100 80GB HBM3", 80 * GIB).name == "H100"
    assert E.device_speed("NVIDIA GeForce RTX 5060 Ti", 16 * GIB).name == "generic 16 GB GPU"
    assert E.device_speed("Some GPU", 8 * GIB).name == "generic small GPU"
    assert E.device_speed(None, 0) is E.CPU_SPEED


# --------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(monkeypatch):
    """Parse and run `estimate ...` on a fixed machine (the test box's own does not matter)."""
    import wan_local.machine

    monkeypatch.setattr(wan_local.machine, "detect_machine", lambda: machine(gpu=None, ram_gib=64))
    parser = build_parser()

    def run(*argv: str, admitted: bool = True) -> str:
        args = parser.parse_args(["estimate", *argv])
        out = io.StringIO()
        assert args.func(args, out=out) == (0 if admitted else 1)
        return out.getvalue()

    return run


def test_cli_json_for_another_machine(cli):
    text = cli("--task", "t2v-A14B", "--size", "832*480", "--quant", "int8", "--vram-budget-gb", "15",
               "--ram-gb", "32", "--gpu", "RTX 4090", "--json")  # fmt: skip
    data = json.loads(text)
    assert data["task"] == "t2v-A14B" and data["size"] == [832, 480] and data["frames"] == 81
    assert data["machine"]["vram_free_bytes"] == 15 * GIB and data["machine"]["ram_total_bytes"] == 32 * GIB
    assert data["options"]["quant"] == "int8"
    est = data["estimate"]
    # budgets.md says ~25-28 for a 16 GB card with 8-bit A14B, assuming a 4.5 GiB activation peak at 480p; our
    # block frees its temporaries early (2.5 GiB peak, traced in test_plan.py), which leaves room for ~31.
    assert 29 <= len(est["plan"]["resident_blocks"]) <= 32
    assert est["plan"]["peak_vram_bytes"] == est["peak_vram_bytes"] <= 14 * GIB
    assert set(est["seconds_by_stage"]) == {"load_models", "encode_text", "denoise", "decode"}


def test_cli_table_defaults_and_cpu(cli):
    table = cli("--task", "ti2v-5B", "--gpu", "RTX 4080")
    assert "ti2v-5B 1280*704, 121 frames, 50 steps (27,280 tokens)" in table
    assert "peak VRAM" in table and "RTX 4080" in table
    cpu = cli("--task", "ti2v-5B", "--size", "832*480", "--ram-gb", "64", "--cpu", "--steps", "4")
    assert "device          cpu" in cpu and "days" not in cpu.split("time ")[0]


def test_cli_rejects_contradictions(cli):
    with pytest.raises(InputError, match="--cpu"):
        cli("--task", "ti2v-5B", "--cpu", "--gpu", "RTX 4090")
    with pytest.raises(InputError, match="--vram-budget-gb"):
        cli("--task", "ti2v-5B", "--gpu", "Radeon 7900")
    with pytest.raises(InputError, match="--ram-gb"):
        cli("--task", "ti2v-5B", "--ram-gb", "2")
    refused = json.loads(
        cli("--task", "ti2v-5B", "--size", "832*480", "--quant", "int8", "--ram-gb", "12", "--cpu", "--json",
            admitted=False)
    )  # fmt: skip
    assert not refused["admitted"] and re.search(r"RAM for UMT5 .* while encoding the prompt", refused["message"])


def test_components_are_sized_from_the_checkpoint(tiny):
    """A checkpoint's own text encoder and VAE sizes replace the official ones (tiny models -> tiny RAM)."""
    from wan_local.memory.bytes import text_encoder_bytes
    from wan_local.weights.headers import component_bytes_for_checkpoint, dit_config_for_checkpoint

    comp = component_bytes_for_checkpoint(tiny / "t2v-A14B", "t2v-A14B")
    assert 0 < comp.text_encoder_bytes < text_encoder_bytes() / 1000
    assert comp.vae_bytes == 4 * sum(t.numel() for t in torch.load(tiny / "t2v-A14B" / "Wan2.1_VAE.pth").values())
    cpu, cfg = machine(gpu=None, ram_gib=24), dit_config_for_checkpoint(tiny / "t2v-A14B", "t2v-A14B")
    official = E.estimate_job("t2v-A14B", (64, 48), 5, 3, MemoryOptions(), cpu, cfg)
    sized = E.estimate_job("t2v-A14B", (64, 48), 5, 3, MemoryOptions(), cpu, cfg, components=comp)
    assert sized.peak_ram_bytes < official.peak_ram_bytes - 10 * GIB
