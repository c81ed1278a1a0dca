"""A generation from settings to video, in stages that each free what they no longer need.

    encode prompts (UMT5 on the CPU, then released) -> build conditioning (VAE encode for image tasks) ->
    draw noise -> denoise (one expert resident at a time) -> VAE decode -> (caller saves)

Numerics follow the official pipelines; on CUDA with bf16 the DiT runs in the reference's bf16 autocast regime
with bf16 weights, the VAE in float32; `dtype=torch.float32` gives the float32 regime the golden tests use.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from wan_local import __version__
from wan_local.errors import InputError
from wan_local.models.dit import WanDiT
from wan_local.prompt import PromptTokenizer
from wan_local.sampling import conditioning as cond
from wan_local.sampling.denoise import CancelToken, Guidance, StepEvent, denoise
from wan_local.sampling.schedule import SCHEDULE_SOLVERS, make_schedule
from wan_local.sampling.solvers import make_solver
from wan_local.specs import TaskSpec, check_frames, check_size, get_task
from wan_local.video import load_image
from wan_local.weights.layout import CheckpointSet, find_checkpoints
from wan_local.weights.loading import load_dit, load_text_encoder, load_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines a video. `None` fields take the task's official default on `resolve`.

    size is (width, height); for image tasks it only gives the area (the image gives the aspect).
    guide_scale is (low-noise expert, high-noise expert). seed -1 means "pick one" (the resolved seed is kept).
    """

    task: str
    prompt: str
    negative_prompt: str = ""
    image: str | None = None
    size: tuple[int, int] | None = None
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: tuple[float, float] | None = None
    solver: str = "unipc"
    seed: int = -1

    def resolve(self) -> GenerationSettings:
        """Fill defaults, pick a seed, validate; raise InputError naming the first bad setting."""
        spec = get_task(self.task)
        size = tuple(self.size) if self.size is not None else spec.default_size
        frames = self.frames if self.frames is not None else spec.frames
        check_size(spec, *size)
        check_frames(spec, frames)
        if spec.needs_image and not self.image:
            raise InputError(f"{spec.name} needs an input image (--image)")
        if self.image and not spec.accepts_image:
            raise InputError(f"{spec.name} takes no image; use i2v-A14B or ti2v-5B for image-to-video")
        if self.solver not in SCHEDULE_SOLVERS:
            raise InputError(f"unknown solver {self.solver!r}; choose one of {', '.join(SCHEDULE_SOLVERS)}")
        steps = self.steps if self.steps is not None else spec.steps
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        shift = self.shift if self.shift is not None else spec.shift
        if shift <= 0:
            raise InputError(f"shift must be > 0, got {shift}")
        seed = self.seed if self.seed >= 0 else random.randint(0, sys.maxsize)
        return dataclasses.replace(
            self,
            task=spec.name,
            size=(int(size[0]), int(size[1])),
            frames=int(frames),
            steps=int(steps),
            shift=float(shift),
            guide_scale=tuple(float(g) for g in (self.guide_scale or spec.guide_scale)),
            seed=int(seed),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["size"] = f"{self.size[0]}*{self.size[1]}" if self.size else None
        data["guide_scale"] = list(self.guide_scale) if self.guide_scale else None
        return data


@dataclass
class GenerationResult:
    """The outcome of `WanPipeline.generate`: video [3, F, H, W] float32 in [-1, 1] and the final latent."""

    settings: GenerationSettings
    video: torch.Tensor
    latent: torch.Tensor
    fps: int
    timings_s: dict[str, float] = field(default_factory=dict)

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


class ExpertSlots:
    """Loads DiT experts on first use and keeps only the one in use: switching releases the other.

    The denoise loop asks for an expert every step; with timesteps decreasing there is one switch, so each
    expert is loaded once and at most one is ever held (RAM and VRAM).
    """

    def __init__(self, paths: dict[str, Path], model_type: str, device: torch.device, dtype: torch.dtype) -> None:
        self._paths = paths
        self._model_type = model_type
        self._device = device
        self._dtype = dtype
        self._active: tuple[str, WanDiT] | None = None
        self.loads: list[str] = []

    def __call__(self, expert: str) -> WanDiT:
        if self._active is not None and self._active[0] == expert:
            return self._active[1]
        if expert not in self._paths:
            raise InputError(f"no checkpoint for the {expert} expert")
        self.release()
        model = load_dit(self._paths[expert], dtype=self._dtype, expected_model_type=self._model_type)
        self._active = (expert, model.to(self._device))
        self.loads.append(expert)
        return self._active[1]

    def release(self) -> None:
        if self._active is not None:
            self._active = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()


class WanPipeline:
    """Generates videos for one task from one checkpoint folder (official, diffusers or ComfyUI layout)."""

    def __init__(
        self,
        ckpt_dir: Path,
        task: str | TaskSpec,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.spec = task if isinstance(task, TaskSpec) else get_task(task)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("CUDA was requested but no CUDA device is available; use --device cpu")
        self.dtype = dtype
        self.files: CheckpointSet = find_checkpoints(Path(ckpt_dir), self.spec)

    # ------------------------------------------------------------------------------------------------ stages

    def encode_prompts(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """UMT5 on the CPU (the encoder is dropped afterwards): trimmed contexts [L, text_dim] on the device."""
        tokenizer = PromptTokenizer.from_dir(self.files.tokenizer)
        encoder = load_text_encoder(self.files.text_encoder, dtype=self.dtype)
        ids, mask = tokenizer([prompt, negative_prompt], max_length=self.spec.text_len)
        with torch.no_grad():
            # One prompt at a time, as the reference (batch 1 each).
            context = encoder.encode(ids[:1], mask[:1])[0]
            negative = encoder.encode(ids[1:], mask[1:])[0]
        del encoder
        return context.to(self.device), negative.to(self.device)

    def build_conditioning(self, s: GenerationSettings, image: Image.Image | None, vae) -> cond.Conditioning:
        """The task's conditioning; image tasks encode the image with `vae` (on the run device, float32)."""
        spec = self.spec
        stride = spec.vae_stride
        if image is None:
            return cond.text_to_video(vae.z_dim, s.frames, s.size, stride)
        max_area = s.size[0] * s.size[1]

        def encode(video: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return vae.encode(video[None].to(self.device, torch.float32))[0]

        if spec.mode == "i2v":
            return cond.i2v_a14b(image, s.frames, max_area, stride, spec.patch_size, encode)
        conditioning, _ = cond.ti2v_image(image, s.frames, max_area, stride, spec.size_multiple, encode)
        return conditioning

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
    ) -> GenerationResult:
        """Run all stages; `on_stage(name)` is told when each starts, `on_step` after every denoise step."""
        s = settings.resolve()
        if s.task != self.spec.name:
            raise InputError(f"this pipeline runs {self.spec.name}, not {s.task}")
        timings: dict[str, float] = {}

        def stage(name: str) -> None:
            if cancel is not None:
                cancel.raise_if_cancelled()
            log.info("stage: %s", name)
            timings[name] = time.perf_counter()
            if on_stage is not None:
                on_stage(name)

        image = load_image(Path(s.image)) if s.image else None  # a bad image fails before any model loads
        stage("encode_text")
        context, negative = self.encode_prompts(s.prompt, s.negative_prompt or self.spec.negative_prompt)
        stage("load_vae")
        vae = load_vae(self.files.vae, self.spec.vae).to(self.device)
        stage("condition")
        conditioning = self.build_conditioning(s, image, vae)
        noise = self.noise(conditioning.latent_shape, s.seed)
        if conditioning.y is not None:
            conditioning.y = conditioning.y.to(self.device)

        stage("denoise")
        schedule = make_schedule(s.solver, s.steps, s.shift, self.spec.num_train_timesteps)
        experts = ExpertSlots(self.files.dit, self.spec.model_type, self.device, self.dtype)
        guidance = Guidance(
            models=experts,
            context=context,
            negative_context=negative,
            guide_scale=s.guide_scale,
            boundary_timestep=self.spec.boundary_timestep,
            conditioning=conditioning,
            autocast_dtype=self.dtype if self.dtype != torch.float32 else None,
        )
        with torch.no_grad():
            latent = denoise(noise, schedule, make_solver(s.solver, schedule), guidance, on_step=on_step, cancel=cancel)
        experts.release()

        stage("decode")
        with torch.no_grad():
            video = vae.decode(latent[None])[0].float().cpu()
        del vae
        timings = _durations(timings)
        return GenerationResult(s, video, latent.cpu(), self.spec.fps, timings)


def _durations(starts: dict[str, float]) -> dict[str, float]:
    names = list(starts)
    now = time.perf_counter()
    ends = [starts[n] for n in names[1:]] + [now]
    return {n: round(e - starts[n], 3) for n, e in zip(names, ends, strict=True)}
