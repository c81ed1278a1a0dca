"""A generation from settings to video, in stages that each free what they no longer need.

    the plan it is given (wan_local.engine: what stays resident, what streams, VAE tile) -> encode prompts
    (cache, else UMT5 on the CPU, then released) -> build conditioning (VAE encode for image tasks) -> draw noise
    -> denoise (one expert on the device at a time; the next one prefetched when RAM allows) -> VAE decode (tiled
    when the plan says so) -> (caller saves)

Numerics follow the official pipelines; on CUDA with bf16 the DiT runs in the reference's bf16 autocast regime
with bf16 weights, the VAE in float32; `dtype=torch.float32` gives the float32 regime the golden tests use.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from wan_local import __version__, paths
from wan_local.engine.request import GenerationSettings
from wan_local.errors import InputError, WanLocalError
from wan_local.kernels import JobKernels, choose_kernels, detect_software
from wan_local.memory.experts import ExpertSlots
from wan_local.memory.ledger import process_ledger, tensor_bytes
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import ResidencyPlan
from wan_local.memory.vae_tiling import choose_tile, default_overlap, tiled_decode, tiled_encode
from wan_local.models.attention import load_kernel as load_attention_kernel
from wan_local.models.attention import use_kernel as use_attention_kernel
from wan_local.sampling import conditioning as cond
from wan_local.sampling.denoise import LOW_NOISE, CancelToken, Guidance, StepEvent, denoise
from wan_local.sampling.schedule import make_schedule
from wan_local.sampling.solvers import make_solver
from wan_local.specs import TaskSpec, get_task
from wan_local.text_cache import PromptCache, cache_key
from wan_local.video import load_image
from wan_local.weights.layout import CheckpointSet, find_checkpoints
from wan_local.weights.loading import load_text_encoder, load_vae
from wan_local.weights.tokenizer_source import tokenizer_source

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """The outcome of `WanPipeline.generate`: video [3, F, H, W] float32 in [-1, 1] and the final latent."""

    settings: GenerationSettings
    video: torch.Tensor
    latent: torch.Tensor
    fps: int
    timings_s: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """What is embedded in the MP4: the resolved settings plus provenance."""
        _, frames, height, width = self.video.shape
        return {
            **self.settings.to_dict(),
            "fps": self.fps,
            "video_size": f"{width}*{height}",
            "video_frames": frames,
            "generator": f"wan-local {__version__}",
        }


class WanPipeline:
    """Generates videos for one task from one checkpoint folder (official, diffusers or ComfyUI layout).

    A pipeline object can run many jobs: the VAE stays loaded (on the CPU between its uses), prompt embeddings are
    cached on disk, and an expert is kept in RAM between jobs when the plan allows it.
    """

    def __init__(
        self,
        ckpt_dir: Path,
        task: str | TaskSpec,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        memory: MemoryOptions | None = None,
        cache_dir: Path | None = None,
        files: CheckpointSet | None = None,
    ) -> None:
        self.spec = task if isinstance(task, TaskSpec) else get_task(task)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("CUDA was requested but no CUDA device is available; use --device cpu")
        self.dtype = dtype
        self.memory = memory or MemoryOptions()
        self.ckpt_dir = Path(ckpt_dir)
        self.files: CheckpointSet = files if files is not None else find_checkpoints(self.ckpt_dir, self.spec)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
        self.prompt_cache = PromptCache(self.cache_dir / "prompt-embeddings")
        self.experts = ExpertSlots(
            self.files.dit, self.spec.model_type, self.device, dtype, self.memory, self.cache_dir / "quantized"
        )
        self._vae = None
        self._vae_key: int | None = None
        self.ledger = process_ledger()  # the experts record themselves there too (ExpertSlots)

    # ------------------------------------------------------------------------------------------------ stages

    def kernels(self) -> JobKernels:
        """The attention kernel and FP8 GEMM for this pipeline's device, dtype and memory options."""
        capability = tuple(torch.cuda.get_device_capability(self.device)) if self.device.type == "cuda" else None
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        return choose_kernels(self.memory.attention, self.memory.quant_compute, capability, detect_software(), dtype)

    def encode_prompts(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Trimmed UMT5 contexts [L, text_dim] on the device, from the prompt cache or from UMT5 on the CPU.

        The encoder is loaded only on a cache miss and released right after (11 GB at full size). The tokenizer is
        the checkpoint's folder or the one the text-encoder file carries (`wan_local.weights.tokenizer_source`).
        """
        source = tokenizer_source(self.files.tokenizer, self.files.text_encoder)
        identity = source.identity()
        keys = [
            cache_key(self.files.text_encoder, identity, text, self.dtype, self.spec.text_len)
            for text in (prompt, negative_prompt)
        ]
        contexts = [self.prompt_cache.get(key) for key in keys]
        missing = [i for i, c in enumerate(contexts) if c is None]
        if missing:
            tokenizer = source.load()
            encoder = load_text_encoder(self.files.text_encoder, dtype=self.dtype)
            key = self.ledger.register(f"{self.spec.name} UMT5", "text_encoder", host_bytes=tensor_bytes(encoder)[0])
            try:
                ids, mask = tokenizer([prompt, negative_prompt], max_length=self.spec.text_len)
                with torch.no_grad():
                    for i in missing:  # one prompt at a time, as the reference (batch 1 each)
                        contexts[i] = encoder.encode(ids[i : i + 1], mask[i : i + 1])[0]
                        self.prompt_cache.put(keys[i], contexts[i])
            finally:
                del encoder
                self.ledger.release(key)
        return contexts[0].to(self.device), contexts[1].to(self.device)

    @property
    def vae(self):
        """The task's VAE, loaded once (float32); it lives on the CPU between its uses, recorded in the ledger as
        evictable (dropped and read again later when another job needs the RAM)."""
        if self._vae is None:
            vae = load_vae(self.files.vae, self.spec.vae)
            name = f"{self.spec.name} VAE"
            self._vae_key = self.ledger.register(name, "vae", host_bytes=tensor_bytes(vae)[0], evict=self._drop_vae)
            weakref.finalize(vae, self.ledger.release, self._vae_key)  # dropped without close(): not counted on
            self._vae = vae
        elif self._vae_key is not None:
            self.ledger.touch(self._vae_key)
        return self._vae

    def _drop_vae(self) -> bool:
        key, self._vae, self._vae_key = self._vae_key, None, None
        if key is not None:
            self.ledger.release(key)
        return True

    def _vae_tile(self, plan: ResidencyPlan | None, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
        """Spatial tile (latent positions) for the VAE, or None for an untiled decode."""
        tiling = self.memory.vae_tiling
        if tiling == "off":
            return None
        if plan is not None and plan.vae_tile_latent_px:
            return (plan.vae_tile_latent_px, plan.vae_tile_latent_px)
        if tiling == "on":
            return choose_tile(self.spec.vae, latent_hw, _free_device_bytes(self.device))
        return None

    def build_conditioning(
        self, s: GenerationSettings, image: Image.Image | None, plan: ResidencyPlan | None = None
    ) -> cond.Conditioning:
        """The task's conditioning; image tasks encode the image with the VAE (on the run device, float32)."""
        spec = self.spec
        stride = spec.vae_stride
        if image is None:
            return cond.text_to_video(spec.latent_channels, s.frames, s.size, stride)  # the VAE loads at decode
        max_area = s.size[0] * s.size[1]
        vae = self.vae.to(self.device)

        def encode(video: torch.Tensor) -> torch.Tensor:
            tile = self._vae_tile(plan, (video.shape[-2] // stride[1], video.shape[-1] // stride[2]))
            with torch.no_grad():
                if tile is None:
                    return vae.encode(video[None].to(self.device, torch.float32))[0]
                return tiled_encode(vae, video[None], tile, default_overlap(tile), self.device, self.device)[0]

        try:
            if spec.mode == "i2v":
                return cond.i2v_a14b(image, s.frames, max_area, stride, spec.patch_size, encode)
            conditioning, _ = cond.ti2v_image(image, s.frames, max_area, stride, spec.size_multiple, encode)
            return conditioning
        finally:
            vae.to("cpu")

    def decode(self, latent: torch.Tensor, plan: ResidencyPlan | None = None) -> torch.Tensor:
        """Final latent [C, T, h, w] -> video [3, F, H, W] float32 on the CPU, tiled when the plan says so.

        Untiled is one tile covering the latent (exactly `vae.decode`): either way the video is assembled in host
        RAM chunk by chunk, as the planner's VAE budget assumes, instead of 0.4-1.3 GB more on the device.
        """
        vae = self.vae.to(self.device)
        try:
            with torch.no_grad():
                tile = self._vae_tile(plan, tuple(latent.shape[-2:])) or tuple(latent.shape[-2:])
                return tiled_decode(vae, latent[None], tile, default_overlap(tile), self.device, "cpu")[0]
        finally:
            vae.to("cpu")

    def noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """One float32 randn of the latent shape from a generator on the run device seeded with `seed`."""
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(shape, dtype=torch.float32, generator=generator, device=self.device)

    # ------------------------------------------------------------------------------------------------ run

    def generate(
        self,
        settings: GenerationSettings,
        *,
        on_step: Callable[[StepEvent], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        cancel: CancelToken | None = None,
        resume: tuple[torch.Tensor, dict] | None = None,
        plan: ResidencyPlan | None = None,
        kernels: JobKernels | None = None,
    ) -> GenerationResult:
        """Run all stages; `on_stage(name)` is told when each starts, `on_step` after every denoise step.

        resume: (latent, solver state) taken from a StepEvent of an earlier, interrupted run of the same settings;
        denoising continues after that step and the result equals an uninterrupted run.
        plan: the admitted residency plan (wan_local.engine plans every job); None runs every block resident,
        the VAE untiled unless memory.vae_tiling says "on".
        kernels: the job's resolved kernels (wan_local.engine); None chooses them here (`kernels`), raising
        InputError for an explicit kernel this machine cannot run before anything loads.
        """
        s = settings.resolve()
        if s.task != self.spec.name:
            raise InputError(f"this pipeline runs {self.spec.name}, not {s.task}")
        kernels = kernels or self.kernels()
        kernels = dataclasses.replace(
            kernels, attention=load_attention_kernel(kernels.attention, self.memory.attention)
        )
        log.info("kernels: %s", kernels.describe())
        timings: dict[str, float] = {}

        def stage(name: str) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            log.info("stage: %s", name)
            timings[name] = time.perf_counter()
            if on_stage is not None:
                on_stage(name)

        image = load_image(Path(s.image)) if s.image else None  # a bad image fails before any model loads
        keep_idle = plan.experts_in_ram > 1 if plan is not None else self.memory.keep_idle_expert == "keep"
        self.experts.configure(plan, keep_idle)
        try:
            stage("encode_text")
            context, negative = self.encode_prompts(s.prompt, s.negative_prompt)
            stage("condition")
            conditioning = self.build_conditioning(s, image, plan)
            noise = resume[0].to(self.device) if resume else self.noise(conditioning.latent_shape, s.seed)
            if conditioning.y is not None:
                conditioning.y = conditioning.y.to(self.device)

            stage("denoise")
            schedule = make_schedule(s.solver, s.steps, s.shift, self.spec.num_train_timesteps)
            guidance = Guidance(
                models=self.experts,
                context=context,
                negative_context=negative,
                guide_scale=s.guide_scale,
                boundary_timestep=self.spec.boundary_timestep,
                conditioning=conditioning,
                autocast_dtype=self.dtype if self.dtype != torch.float32 else None,
            )
            if self.spec.two_experts:
                self.experts.prefetch(LOW_NOISE)  # read while the high-noise expert computes, if RAM allows
            with torch.no_grad(), use_attention_kernel(kernels.attention.kernel):
                solver = make_solver(s.solver, schedule)
                resume_state = resume[1] if resume else None
                latent = denoise(
                    noise, schedule, solver, guidance, on_step=on_step, cancel=cancel, resume_state=resume_state
                )
            self.experts.park()
            _check_finite(latent, "the denoised latent")

            stage("decode")
            video = self.decode(latent, plan)
            _check_finite(video, "the decoded video")
        except BaseException:
            self.experts.release()
            raise
        timings = _durations(timings)
        return GenerationResult(s, video, latent.cpu(), self.spec.fps, timings, _peaks(self.device))

    def close(self) -> None:
        """Release every model this pipeline holds."""
        self.experts.release()
        self._drop_vae()


class NonFiniteResult(WanLocalError):
    """A generation produced NaN or inf values: no video is written."""


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteResult(
            f"{what} holds NaN or infinite values, so no video was written: a damaged model file, an extreme "
            "guidance scale or shift, or a numeric overflow (try --dtype bf16 on the GPU or other settings)"
        )


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _peaks(device: torch.device) -> dict[str, int]:
    """Peak VRAM allocated by torch and peak RSS of this process so far, in bytes."""
    peaks = {}
    if device.type == "cuda":
        peaks["vram_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
        peaks["ram_peak_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except ImportError:  # Windows
        import psutil

        peaks["ram_peak_bytes"] = int(psutil.Process().memory_info().peak_wset)
    return peaks


def _durations(starts: dict[str, float]) -> dict[str, float]:
    names = list(starts)
    now = time.perf_counter()
    ends = [starts[n] for n in names[1:]] + [now]
    return {n: round(e - starts[n], 3) for n, e in zip(names, ends, strict=True)}
