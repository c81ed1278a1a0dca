"""Pre-flight estimate of a job: the residency plan, peak VRAM and RAM, and how long it will take.

Time = model loads from disk + text encode + steps x 2 CFG passes x (one DiT forward's FLOPs / effective
throughput + streaming time not hidden behind compute) + VAE decode. FLOPs per forward follow budgets.md;
throughputs come from a small per-GPU table (`GPU_SPEEDS`) times an assumed model-FLOPs utilisation (`MFU`).
The table, MFU, disk and PCIe speeds are PLACEHOLDERS until the GPU benchmarks (benchmarks/results/) replace them.

`wan-local estimate` (cli.py) resolves and admits a job like every other entry point and prints this module's
table or JSON, for this machine or one described by flags ("a 16 GB card with 32 GB of RAM": `machine_for`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wan_local.errors import InputError
from wan_local.machine import MachineInfo
from wan_local.memory.bytes import (
    BF16_BYTES,
    GIB,
    TEXT_ENCODER_PARAMS,
    ComponentBytes,
    ModelBytes,
    activation_bytes,
    default_pinned_cap_bytes,
    dit_bytes,
    ggml_packed,
    latent_grid,
    model_bytes_from_tensors,
    official_dit_config,
    pipeline_bytes_for,
    tokens_for,
    vae_weight_bytes,
)
from wan_local.memory.options import (
    MemoryOptions,
)
from wan_local.memory.plan import ResidencyPlan, plan_cpu, plan_residency
from wan_local.specs import TaskSpec, get_task

if TYPE_CHECKING:
    from wan_local.models.dit import DiTConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpeed:
    """Throughput figures of one device class (placeholders until benchmarks/results/ replaces them).

    bf16_tflops: dense bf16 tensor-core peak with fp32 accumulation (what cuBLAS uses for bf16 GEMMs).
    tf32_tflops: dense TF32 peak (the float32 VAE's convolutions run on TF32 tensor cores under cuDNN defaults).
    pcie_gb_per_s: pinned host->device copy rate (decimal GB/s). vram_gb: typical total VRAM of the card.
    """

    name: str
    bf16_tflops: float
    tf32_tflops: float
    pcie_gb_per_s: float
    vram_gb: float


# PLACEHOLDERS until the GPU benchmarks (benchmarks/results/) replace them. Peaks are the vendors' dense figures
# (GeForce bf16 with fp32 accumulation runs at half the fp16-accumulate rate); PCIe 4.0 x16 ≈ 25 GB/s and PCIe 5.0
# ≈ 50 GB/s host->device as measured in the engine notes §2. First match of `name` in the GPU name wins.
GPU_SPEEDS: tuple[DeviceSpeed, ...] = (
    DeviceSpeed("RTX 4090", 165.2, 82.6, 25.0, 24),
    DeviceSpeed("RTX 4080", 97.5, 48.7, 25.0, 16),
    DeviceSpeed("RTX 3090", 35.6, 35.6, 25.0, 24),
    DeviceSpeed("A100", 312.0, 156.0, 25.0, 80),
    DeviceSpeed("H100 PCIe", 756.0, 378.0, 50.0, 80),
    DeviceSpeed("H100", 989.0, 494.7, 50.0, 80),
)
#: Unknown GPUs, by total VRAM (GiB, descending): a guess of the class of card that has that much memory.
GENERIC_GPU_SPEEDS: tuple[tuple[float, DeviceSpeed], ...] = (
    (40, DeviceSpeed("generic data-centre GPU", 300.0, 150.0, 25.0, 48)),
    (20, DeviceSpeed("generic 24 GB GPU", 80.0, 40.0, 25.0, 24)),
    (14, DeviceSpeed("generic 16 GB GPU", 45.0, 22.0, 25.0, 16)),
    (0, DeviceSpeed("generic small GPU", 20.0, 10.0, 16.0, 8)),
)
#: A desktop CPU (AVX2/AVX-512, no bf16 matrix units): the app must show something without a GPU.
CPU_SPEED = DeviceSpeed("CPU", 0.5, 0.5, 0.0, 0)
#: Assumed share of the bf16 peak a DiT forward reaches (budgets.md: real runs reach 40-65 %).
MFU = 0.5
#: Assumed share of the TF32 peak the VAE decode's 3D convolutions reach.
VAE_EFFICIENCY = 0.3
#: Sequential read of checkpoints (engine notes §1.6: ~2 GB/s observed from a fast NVMe).
DISK_READ_GB_PER_S = 2.0
#: Pageable blocks go through pinned staging by a host memcpy: assume half the pinned copy rate.
PAGEABLE_BANDWIDTH_FRACTION = 0.5
#: The official DiT shards are float32 (fact sheet §3.1); the loaders convert / quantize while reading.
CHECKPOINT_BYTES_PER_PARAM = 4
#: Tokens of a UMT5 encode (the reference pads every prompt to text_len = 512).
TEXT_ENCODE_TOKENS = 512
#: UMT5-XXL: 24 layers, d_model 4096, vocab 256384 (its embedding does no FLOPs).
_UMT5_EMBEDDING_PARAMS = 256_384 * 4096
#: float32 video decode FLOPs per output pixel per frame, counted with torch.utils.flop_counter on the real
#: decoders (steady-state chunk; tests/test_estimate.py re-counts them).
VAE_DECODE_FLOPS_PER_PIXEL = {"wan2.1": 8.445e6, "wan2.2": 1.839e7}


@dataclass(frozen=True)
class JobEstimate:
    """Peaks (bytes), duration (seconds) and the plan of one job, with the assumptions made as notes.

    seconds_by_stage: (stage, seconds) pairs summing to `seconds`; seconds_per_step: one denoise step
    (2 CFG forwards + exposed streaming).
    """

    peak_vram_bytes: int
    peak_ram_bytes: int
    seconds: float
    seconds_per_step: float
    plan: ResidencyPlan
    notes: tuple[str, ...]
    seconds_by_stage: tuple[tuple[str, float], ...] = ()
    device_name: str = ""
    tokens: int = 0
    flops_per_forward: float = 0.0


def device_speed(gpu_name: str | None, vram_total_bytes: int) -> DeviceSpeed:
    """Throughput of the named GPU (table, else by VRAM size), or CPU_SPEED when there is no GPU."""
    if gpu_name is None:
        return CPU_SPEED
    lowered = gpu_name.lower()
    for speed in GPU_SPEEDS:
        if speed.name.lower() in lowered:
            return speed
    return next(speed for vram_gb, speed in GENERIC_GPU_SPEEDS if vram_total_bytes >= vram_gb * GIB)


def dit_forward_flops(cfg: DiTConfig, tokens: int) -> float:
    """FLOPs of one DiT forward (one expert, one CFG branch), budgets.md's formula.

    tokens x (2 x linear params per token + 4·tokens·C per layer (self-attention) + 4·text_len·C per layer
    (cross-attention)); per-token linears are self q/k/v/o, cross q/o and the FFN (6C² + 2CF per layer); the
    cross-attention k/v projections run once on the text_len context tokens.
    """
    c, f, layers, text = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len
    linear_per_token = layers * (6 * c * c + 2 * c * f)
    per_token = 2 * linear_per_token + 4 * tokens * c * layers + 4 * text * c * layers
    return float(tokens) * per_token + 2.0 * layers * 2 * text * c * c


def text_encode_flops(prompts: int = 2, tokens: int = TEXT_ENCODE_TOKENS) -> float:
    """FLOPs of encoding `prompts` prompts (positive + negative) with UMT5-XXL at `tokens` tokens each."""
    dense = TEXT_ENCODER_PARAMS - _UMT5_EMBEDDING_PARAMS
    return prompts * (2.0 * dense * tokens + 4.0 * tokens * tokens * 4096 * 24)


def vae_decode_flops(vae: str, width: int, height: int, frames: int) -> float:
    """FLOPs of decoding a `frames` x `height` x `width` video with the "wan2.1" / "wan2.2" VAE."""
    return VAE_DECODE_FLOPS_PER_PIXEL[vae] * width * height * frames


def exposed_streaming_seconds(block_compute_s: Sequence[float], copy_s: dict[int, float], prefetch_depth: int) -> float:
    """Copy time per forward NOT hidden behind compute, simulating the streamer in steady state.

    block_compute_s: compute time of each block in forward order; copy_s: copy time of each streamed block.
    The streamer holds prefetch_depth + 1 buffers used round-robin: the copy of the q-th streamed load can start
    once the copy engine is free and the compute that last read its buffer (load q - depth - 1) has finished; a
    streamed block starts computing when its copy is done. Three forwards are simulated; the last one's
    duration minus its compute is returned.
    """
    if not copy_s:
        return 0.0
    slots = prefetch_depth + 1
    t = copy_free = 0.0
    compute_end: dict[int, float] = {}
    load = 0
    durations = []
    for _ in range(3):
        start = t
        for i, compute in enumerate(block_compute_s):
            if i in copy_s:
                copy_start = max(copy_free, compute_end.get(load - slots, 0.0))
                copy_free = copy_start + copy_s[i]
                t = max(t, copy_free) + compute
                compute_end[load] = t
                load += 1
            else:
                t += compute
        durations.append(t - start)
    return max(0.0, durations[-1] - sum(block_compute_s))


def _vae_vram_fn(spec: TaskSpec, latent_shape: tuple[int, ...], mode: str) -> Callable[[int | None], int]:
    """VRAM of a VAE decode / encode (weights + headroom x traced working set) as a function of the tile side;
    the video itself stays in host RAM (vae_tiling.tiled_decode / tiled_encode)."""
    from wan_local.memory import vae_tiling

    weights = vae_tiling.weight_bytes(spec.vae)
    estimate = vae_tiling.decode_bytes_estimate if mode == "decode" else vae_tiling.encode_bytes_estimate

    def vram_bytes(tile: int | None) -> int:
        return weights + math.ceil(vae_tiling.DEFAULT_HEADROOM * estimate(spec.vae, latent_shape, tile))

    return vram_bytes


def _plan(
    spec: TaskSpec,
    cfg: DiTConfig,
    model: ModelBytes,
    size: tuple[int, int],
    frames: int,
    options: MemoryOptions,
    machine: MachineInfo,
    os_name: str,
    notes: list[str],
    components: ComponentBytes | None = None,
    with_image: bool = False,
) -> ResidencyPlan:
    from wan_local.presets import ram_safety_margin_bytes

    width, height = size
    tokens = tokens_for(spec, width, height, frames)
    # A CPU job's VAE stays a mapped file until it decodes, unless it encodes an input image first.
    pipe = pipeline_bytes_for(spec, width, height, frames, components, vae_in_denoise=machine.has_gpu or with_image)
    safety = ram_safety_margin_bytes(machine)  # the margin admission keeps: optional RAM uses stay within it
    latent_shape = (1, 1, *latent_grid(spec, width, height, frames))
    if not machine.has_gpu:
        from wan_local.memory import vae_tiling

        work = vae_tiling.decode_bytes_estimate(spec.vae, latent_shape)
        return plan_cpu(
            model,
            activation_bytes(cfg, tokens),
            machine.ram_available_bytes,
            options,
            work,
            pipe,
            ram_safety_bytes=safety,
        )
    budget = machine.vram_free_bytes
    if options.vram_budget_gb is not None:
        budget = int(options.vram_budget_gb * GIB)
        if budget > machine.vram_free_bytes:
            notes.append(
                f"the VRAM budget {options.vram_budget_gb:g} GiB exceeds the free VRAM "
                f"({machine.vram_free_bytes / GIB:.1f} GiB): planning with the free VRAM"
            )
            budget = machine.vram_free_bytes
    cap = default_pinned_cap_bytes(machine.ram_total_bytes, os_name)
    if options.pinned_ram_cap_gb is not None:
        cap = int(options.pinned_ram_cap_gb * GIB)
    return plan_residency(
        model,
        lambda chunk: activation_bytes(cfg, tokens, chunk),
        budget,
        int(options.vram_reserve_gb * GIB),
        machine.ram_available_bytes,
        min(cap, machine.ram_available_bytes),
        options,
        _vae_vram_fn(spec, latent_shape, "decode"),
        pipe,
        # I2V encodes the whole conditioning video (image + zero frames); TI2V only its first frame.
        vae_encode_bytes_fn=_vae_vram_fn(spec, latent_shape, "encode") if spec.mode == "i2v" else None,
        ram_safety_bytes=safety,
    )


def estimate_job(
    task: str,
    size: tuple[int, int],
    frames: int,
    steps: int,
    options: MemoryOptions,
    machine: MachineInfo,
    dit_config: DiTConfig | None = None,
    *,
    os_name: str | None = None,
    components: ComponentBytes | None = None,
    dit_tensors: Mapping[str, Any] | None = None,
    dense_bytes: int = BF16_BYTES,
    dit_file_bytes: int | None = None,
    with_image: bool | None = None,
) -> JobEstimate:
    """Plan `task` at `size` (width, height) x `frames` for `steps` steps on `machine` and estimate its cost.

    dit_config: the real config when a checkpoint exists (plan.dit_config_for_checkpoint), else the official
    one. components: the checkpoint's text encoder / VAE sizes (plan.component_bytes_for_checkpoint), else the
    official ones. dit_tensors: the checkpoint's DiT tensor table (shapes and stored dtypes), so the bytes are those
    of the weights as stored and as computed (a ComfyUI fp8 file stays fp8); else they follow `dit_config`.
    dense_bytes: bytes per element of unquantized weights (the run dtype: 2 for bf16, 4 for fp32). dit_file_bytes:
    one DiT's size on disk, for the load time. os_name: for the default pinned-memory cap ("Windows", "Linux";
    default: this machine's). with_image: the job encodes an input image (default: the task needs one). Raises
    InputError for unusable settings and PlanError when the job cannot fit.
    """
    spec = get_task(task)
    if steps < 1:
        raise InputError(f"steps={steps} must be >= 1")
    width, height = size
    tokens = tokens_for(spec, width, height, frames)
    cfg = dit_config or official_dit_config(spec.name)
    if cfg.model_type != spec.model_type:
        raise InputError(f"the DiT config is for a {cfg.model_type!r} model; {spec.name} needs {spec.model_type!r}")
    if dit_tensors is not None:
        model = model_bytes_from_tensors(dit_tensors, options.quant, options.quant_scope, dense_bytes=dense_bytes)
    else:
        model = dit_bytes(cfg, options.quant, options.quant_scope, dense_bytes=dense_bytes)
    notes: list[str] = []
    image = spec.needs_image if with_image is None else with_image
    plan = _plan(
        spec, cfg, model, size, frames, options, machine, os_name or platform.system(), notes, components, image
    )
    speed = device_speed(machine.gpu_name, machine.vram_total_bytes)
    gpu = plan.device == "cuda"
    flops = dit_forward_flops(cfg, tokens)
    forward_s = flops / (speed.bf16_tflops * 1e12 * MFU)
    exposed_s = 0.0
    if gpu and plan.streamed_blocks:
        pinned = set(plan.pinned_blocks)
        rate = speed.pcie_gb_per_s * 1e9
        copy_s = {
            i: model.block_bytes[i] / (rate if i in pinned else rate * PAGEABLE_BANDWIDTH_FRACTION)
            for i in plan.streamed_blocks
        }
        exposed_s = exposed_streaming_seconds(
            [forward_s / model.num_blocks] * model.num_blocks, copy_s, plan.prefetch_depth
        )
    step_s = 2 * (forward_s + exposed_s)
    disk = DISK_READ_GB_PER_S * 1e9
    te_bytes = components.text_encoder_bytes if components else TEXT_ENCODER_PARAMS * 2
    te_speed = speed if plan.text_encoder_on_gpu else CPU_SPEED
    te_flops = text_encode_flops() * te_bytes / (TEXT_ENCODER_PARAMS * 2)  # FLOPs scale with the weights
    te_s = te_bytes / disk + te_flops / (te_speed.bf16_tflops * 1e12 * MFU)
    experts = 2 if spec.two_experts else 1
    load_s = experts * (dit_file_bytes or model.params * CHECKPOINT_BYTES_PER_PARAM) / disk
    if gpu:
        te_s += te_bytes / (speed.pcie_gb_per_s * 1e9) if plan.text_encoder_on_gpu else 0.0
        load_s += experts * (plan.resident_block_bytes + model.non_block_bytes) / (speed.pcie_gb_per_s * 1e9)
    vae_s = (components.vae_bytes if components else vae_weight_bytes(spec.vae)) / disk
    vae_s += vae_decode_flops(spec.vae, width, height, frames) / (speed.tf32_tflops * 1e12 * VAE_EFFICIENCY)
    stages = (("load_models", load_s), ("encode_text", te_s), ("denoise", steps * step_s), ("decode", vae_s))
    gguf = dit_tensors is not None and any(ggml_packed(getattr(t, "dtype", "")) for t in dit_tensors.values())
    notes += _notes(options, plan, speed, exposed_s, forward_s, gguf)
    log.debug(
        "estimate %s %sx%s x%d: %.0f s on %s", spec.name, width, height, frames, sum(s for _, s in stages), speed.name
    )
    return JobEstimate(
        peak_vram_bytes=plan.peak_vram_bytes,
        peak_ram_bytes=plan.peak_ram_bytes,
        seconds=sum(s for _, s in stages),
        seconds_per_step=step_s,
        plan=plan,
        notes=tuple(notes) + plan.notes,
        seconds_by_stage=tuple((name, round(s, 3)) for name, s in stages),
        device_name=machine.gpu_name or "CPU",
        tokens=tokens,
        flops_per_forward=flops,
    )


def _notes(
    options: MemoryOptions, plan: ResidencyPlan, speed: DeviceSpeed, exposed_s: float, forward_s: float, gguf: bool
) -> list[str]:
    notes = [
        f"times assume {speed.name} at {speed.bf16_tflops:g} bf16 TFLOPs x {MFU:.0%} utilisation, "
        f"{DISK_READ_GB_PER_S:g} GB/s disk reads and float32 official checkpoints (placeholders until GPU "
        "benchmarks replace them)",
    ]
    if gguf:
        notes.append(
            "the GGUF experts stay in their own quantization (dequantized per layer as they run); "
            f"--quant {options.quant} does not apply to them"
            if options.quant != "none"
            else "the GGUF experts stay in their own quantization (dequantized per layer as they run)"
        )
    elif options.quant != "none":
        notes.append(f"{options.quant} is weight storage only: it saves memory, not compute time")
    if exposed_s > 1e-3 * forward_s:  # below 0.1 % it is float noise of the simulation
        notes.append(f"streaming adds {exposed_s:.2f} s per forward not hidden behind {forward_s:.2f} s of compute")
    if plan.device == "cpu":
        notes.append("CPU estimate assumes --dtype bf16 weights; float32 doubles the RAM")
    return notes


# ---------------------------------------------------------------------------------------------------- CLI

#: RAM the OS and desktop keep for themselves when --ram-gb describes a machine's total RAM.
OS_BASELINE_RAM_BYTES = 3 * GIB
#: VRAM a desktop session and the CUDA context take from a card named by --gpu alone.
DESKTOP_VRAM_BYTES = 1 * GIB


def machine_for(
    base: MachineInfo,
    *,
    gpu: str | None = None,
    vram_gb: float | None = None,
    ram_gb: float | None = None,
    cpu_only: bool = False,
) -> MachineInfo:
    """`base` with its GPU, VRAM or RAM replaced, to plan for another machine.

    vram_gb: the VRAM the job may use (free = total = vram_gb GiB). gpu alone: that card's typical VRAM minus
    DESKTOP_VRAM_BYTES is free. ram_gb: total RAM in GiB; OS_BASELINE_RAM_BYTES of it is not available.
    cpu_only: no GPU at all.
    """
    changes: dict[str, object] = {}
    if cpu_only:
        if gpu is not None or vram_gb is not None:
            raise InputError("--cpu cannot be combined with --gpu or --vram-budget-gb")
        changes.update(gpu_name=None, vram_total_bytes=0, vram_free_bytes=0, cuda_capability=None)
    elif vram_gb is not None:
        if vram_gb <= 0:
            raise InputError(f"--vram-budget-gb must be > 0, got {vram_gb}")
        vram = int(vram_gb * GIB)
        name = gpu or base.gpu_name or f"GPU with {vram_gb:g} GB"
        changes.update(gpu_name=name, vram_total_bytes=vram, vram_free_bytes=vram)
    elif gpu is not None:
        known = next((s for s in GPU_SPEEDS if s.name.lower() in gpu.lower()), None)
        if known is None:
            names = ", ".join(s.name for s in GPU_SPEEDS)
            raise InputError(f"--gpu {gpu!r} is not one of {names}; give its VRAM with --vram-budget-gb")
        total = int(known.vram_gb * GIB)
        changes.update(gpu_name=gpu, vram_total_bytes=total, vram_free_bytes=total - DESKTOP_VRAM_BYTES)
    if ram_gb is not None:
        if ram_gb * GIB <= OS_BASELINE_RAM_BYTES:
            raise InputError(f"--ram-gb {ram_gb:g} leaves nothing after the OS's {OS_BASELINE_RAM_BYTES / GIB:g} GiB")
        total = int(ram_gb * GIB)
        changes.update(ram_total_bytes=total, ram_available_bytes=total - OS_BASELINE_RAM_BYTES)
    return dataclasses.replace(base, **changes)


def estimate_to_dict(
    est: JobEstimate,
    spec: TaskSpec,
    size: tuple[int, int],
    frames: int,
    steps: int,
    options: MemoryOptions,
    machine: MachineInfo,
) -> dict[str, object]:
    """JSON-ready description of a job, its machine, options, plan and estimate (bytes and seconds)."""
    plan = dataclasses.asdict(est.plan)
    plan.update(peak_vram_bytes=est.plan.peak_vram_bytes, peak_ram_bytes=est.plan.peak_ram_bytes)
    estimate = dataclasses.asdict(est)
    estimate["plan"] = plan
    estimate["seconds_by_stage"] = dict(est.seconds_by_stage)
    return {
        "task": spec.name,
        "size": list(size),
        "frames": frames,
        "steps": steps,
        "machine": dataclasses.asdict(machine),
        "options": dataclasses.asdict(options),
        "estimate": estimate,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_estimate(
    est: JobEstimate, spec: TaskSpec, size: tuple[int, int], frames: int, steps: int, machine: MachineInfo
) -> str:
    """The human table `wan-local estimate` prints."""
    lines = [
        f"job             {spec.name} {size[0]}*{size[1]}, {frames} frames, {steps} steps ({est.tokens:,} tokens)",
        f"machine         {machine.describe()}",
        *est.plan.describe(),
        f"peak VRAM       {est.peak_vram_bytes / GIB:.1f} GiB",
        f"peak RAM        {est.peak_ram_bytes / GIB:.1f} GiB",
        f"time            {_duration(est.seconds)} ({est.seconds_per_step:.1f} s per step on {est.device_name})",
        "time by stage   " + ", ".join(f"{name} {_duration(s)}" for name, s in est.seconds_by_stage),
    ]
    lines += [f"note            {note}" for note in est.notes]
    return "\n".join(lines)
