"""Resolve a job once: settings checked and defaulted, the checkpoint's files and headers read, the memory preset
picked, the machine measured. The result, `ResolvedJob`, is immutable; admission, planning and estimating are
pure functions of it, and the runner loads exactly the files it names.

Every entry point goes through `resolve_job`: `wan-local generate`, `wan-local queue add`, the worker when it
claims a job, the Generate tab and the scripting API, and `wan-local estimate` (which may describe another
machine and may have no checkpoint folder: then the official shapes are assumed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_local.engine.request import GenerationSettings, JobSettings
from wan_local.errors import InputError
from wan_local.kernels import JobKernels, Software, choose_kernels, detect_software
from wan_local.machine import MachineInfo
from wan_local.memory.bytes import BF16_BYTES, ComponentBytes
from wan_local.memory.options import MemoryOptions
from wan_local.presets import Preset
from wan_local.specs import TaskSpec, get_task

if TYPE_CHECKING:
    from wan_local.models.dit import DiTConfig
    from wan_local.weights.headers import TensorInfo
    from wan_local.weights.layout import CheckpointSet

log = logging.getLogger(__name__)

DTYPE_BYTES = {"bf16": BF16_BYTES, "fp32": 4}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a job needs to know about its checkpoint folder, read from config files and headers once.

    files: where each component lives (layout detection). dit_config: the DiT's hyper-parameters. dit_tensors:
    the DiT's tensors (official names, shape and stored dtype; A14B: the high-noise expert, both have the same
    shapes). dit_file_bytes: bytes on disk of one DiT (one expert). text_encoder_params / vae_params: element
    counts of UMT5 and the VAE. text_encoder_file_bytes, text_encoder_dtypes (stored, as "bf16", "fp32", "fp8",
    ...) and text_encoder_embedding_params (the token embedding): what loading UMT5 costs in RAM.
    """

    files: CheckpointSet
    dit_config: DiTConfig
    dit_tensors: Mapping[str, TensorInfo]
    dit_file_bytes: int
    text_encoder_params: int
    vae_params: int
    text_encoder_file_bytes: int = 0
    text_encoder_dtypes: frozenset[str] = frozenset()
    text_encoder_embedding_params: int = 0

    @property
    def layout(self) -> str:
        return self.files.format


_DTYPE_NAMES = {"BF16": "bf16", "torch.bfloat16": "bf16", "F32": "fp32", "torch.float32": "fp32"}


def _dtype_name(stored: str) -> str:
    return _DTYPE_NAMES.get(stored, stored)


def read_checkpoint(ckpt_dir: Path | str, spec: TaskSpec, choice: Mapping[str, str] | None = None) -> CheckpointInfo:
    """Find `spec`'s files under `ckpt_dir` (choice: role -> file where it holds several candidates) and read their
    headers (never tensor data); CheckpointError naming the file for anything missing, unreadable or of the wrong
    task."""
    from wan_local.weights import fp8, headers
    from wan_local.weights.layout import HIGH, SINGLE, find_checkpoints
    from wan_local.weights.tokenizer_source import SPIECE_KEY

    files = find_checkpoints(Path(ckpt_dir), spec, choice)
    dit = Path(files.dit[HIGH if spec.two_experts else SINGLE])
    config = headers.checked_dit_config(dit, spec)
    tensors = headers.dit_tensor_table(dit)
    text_encoder = headers.tensor_table(files.text_encoder)
    # Weights only: not the fp8 scales / markers / `.comfy_quant` blobs, nor the tokenizer a ComfyUI file carries.
    extras = (fp8.COMFY_QUANT, SPIECE_KEY)
    weights = {k: t for k, t in text_encoder.items() if t.shape and "scale" not in k and not k.endswith(extras)}
    return CheckpointInfo(
        files=files,
        dit_config=config,
        dit_tensors=tensors,
        dit_file_bytes=headers.checkpoint_file_bytes(dit),
        text_encoder_params=sum(t.numel for t in weights.values()),
        vae_params=headers.param_count(files.vae),
        text_encoder_file_bytes=headers.checkpoint_file_bytes(files.text_encoder),
        text_encoder_dtypes=frozenset(_dtype_name(t.dtype) for t in weights.values()),
        text_encoder_embedding_params=max((t.numel for t in weights.values()), default=0),
    )


@dataclass(frozen=True)
class ResolvedJob:
    """One job with everything decided that does not depend on the memory options.

    job: the request as given (its preset and memory overrides as the user set them). settings: the video's
    settings with defaults filled and the seed drawn. device "cuda" or "cpu"; dtype "bf16" or "fp32" (the DiT's
    and UMT5's run dtype). requested: the preset asked for ("auto" resolved for this machine); presets: all
    loaded presets (for the fallback chain). overrides: the memory options the user set explicitly, kept on top
    of whichever preset runs. machine: the facts every verdict about this job uses (for a CPU job, with no GPU).
    checkpoint: None when no folder was given (estimates then assume the official files). software: the torch
    version, platform and attention packages the kernel choices depend on.
    """

    job: JobSettings
    settings: GenerationSettings
    spec: TaskSpec
    device: str
    dtype: str
    requested: Preset
    presets: Mapping[str, Preset]
    overrides: Mapping[str, Any]
    machine: MachineInfo
    checkpoint: CheckpointInfo | None = None
    software: Software = field(default_factory=Software)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def memory(self, preset: Preset) -> MemoryOptions:
        """`preset`'s memory options with the user's explicit overrides on top."""
        return dataclasses.replace(preset.memory, **self.overrides)

    def kernels(self, memory: MemoryOptions) -> JobKernels:
        """The attention kernel and FP8 GEMM this job runs with `memory`'s options on its machine (InputError for
        an explicit kernel the machine cannot run)."""
        capability = self.machine.cuda_capability if self.device == "cuda" else None
        return choose_kernels(memory.attention, memory.quant_compute, capability, self.software, self.dtype)

    def components(self) -> ComponentBytes | None:
        """UMT5 (at the run dtype) and VAE (float32) bytes of the checkpoint, None without one."""
        if self.checkpoint is None:
            return None
        info = self.checkpoint
        run = info.text_encoder_params * self.dtype_bytes
        if info.text_encoder_dtypes and info.text_encoder_dtypes != {self.dtype}:
            encode = run + info.text_encoder_file_bytes  # the converted copy next to the file's mapped pages
        else:
            encode = run - info.text_encoder_embedding_params * self.dtype_bytes  # untouched embedding rows
        return ComponentBytes(run, info.vae_params * 4, encode)


def cpu_view(machine: MachineInfo) -> MachineInfo:
    """`machine` as a CPU-only job sees it: no GPU."""
    return dataclasses.replace(machine, gpu_name=None, vram_total_bytes=0, vram_free_bytes=0, cuda_capability=None)


def resolve_job(
    job: JobSettings,
    *,
    seed: int | None = None,
    machine: MachineInfo | None = None,
    presets: Mapping[str, Preset] | None = None,
    need_image: bool = True,
) -> ResolvedJob:
    """Resolve `job` for `machine` (default: this machine, measured now). seed: the seed already drawn for a
    queued job (else the job's own, -1 drawing one). need_image False: an estimate of an image task without
    its image. Raises InputError / CheckpointError naming the problem."""
    from wan_local.machine import detect_machine
    from wan_local.presets import load_presets, pick_preset

    job.check_fields(need_image=need_image)
    settings = job.generation(job.seed if seed is None else seed).resolve(need_image=need_image)
    spec = get_task(settings.task)
    if settings.image:
        from wan_local.video import load_image

        load_image(Path(settings.image))  # a broken or oversized image fails here, before anything large loads
    machine = machine or detect_machine()
    device = job.device or ("cuda" if machine.has_gpu else "cpu")
    if device == "cuda" and not machine.has_gpu:
        raise InputError("CUDA was requested but no CUDA device is available; use --device cpu")
    if device == "cpu":
        machine = cpu_view(machine)
    presets = presets if presets is not None else load_presets()
    if job.preset in (None, "", "auto"):
        requested = pick_preset(machine, presets).preset
    elif job.preset in presets:
        requested = presets[job.preset]
    else:
        raise InputError(f"unknown preset {job.preset!r}; choose auto or one of {', '.join(presets)}")
    checkpoint = read_checkpoint(job.ckpt_dir, spec, job.files) if job.ckpt_dir else None
    resolved = ResolvedJob(
        job=job,
        settings=settings,
        spec=spec,
        device=device,
        dtype=job.dtype or "bf16",
        requested=requested,
        presets=presets,
        overrides=dict(job.memory),
        machine=machine,
        checkpoint=checkpoint,
        software=detect_software(),
    )
    memory = resolved.memory(requested)  # an override that no preset can take fails here
    if device == "cpu" or machine.cuda_capability is not None:  # (an estimate for a GPU named only by its VRAM)
        resolved.kernels(memory)  # an explicit kernel this machine cannot run (--attention flash ...) fails here
    return resolved
