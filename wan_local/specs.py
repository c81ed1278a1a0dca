"""The three Wan2.2 tasks and their official defaults.

A spec says how a task is *run* (steps, shift, guidance, expert boundary, frames, fps, VAE, sizes). It never says
how big a model is: a loaded model's hyper-parameters come from its config.json and tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from wan_local.errors import InputError

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


#: Latent channels of each VAE architecture.
VAE_Z_DIM = {"wan2.1": 16, "wan2.2": 48}


@dataclass(frozen=True)
class TaskSpec:
    """Official defaults of one Wan2.2 task (Wan-Video/Wan2.2 `wan/configs`, fact sheet §1.2)."""

    name: str
    #: "t2v" (text only), "i2v" (image required), "ti2v" (image optional).
    mode: str
    #: Model type the DiT checkpoint(s) must declare in config.json.
    model_type: str
    #: Two experts (high-noise, low-noise) switched at `boundary`, or one model.
    two_experts: bool
    #: Fraction of num_train_timesteps at which the expert switches: t >= boundary * 1000 -> high-noise expert.
    boundary: float | None
    steps: int
    shift: float
    #: Guidance scales as (low-noise expert, high-noise expert); equal for single-model tasks.
    guide_scale: tuple[float, float]
    frames: int
    fps: int
    #: "wan2.1" (16 latent channels, stride 4x8x8) or "wan2.2" (48 channels, stride 4x16x16).
    vae: str
    vae_stride: tuple[int, int, int]
    #: Pixel sizes must be multiples of this (VAE stride x DiT patch).
    size_multiple: int
    default_size: tuple[int, int]
    #: Sizes the official CLI accepts, (width, height); others meeting `size_multiple` are allowed too.
    official_sizes: tuple[tuple[int, int], ...]
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    #: DiT patch (t, h, w); the same for every Wan model (not stored in config.json).
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_train_timesteps: int = 1000
    text_len: int = 512

    @property
    def boundary_timestep(self) -> float | None:
        """Integer timesteps >= this run the high-noise expert (875.0 / 900.0)."""
        return None if self.boundary is None else self.boundary * self.num_train_timesteps

    @property
    def needs_image(self) -> bool:
        return self.mode == "i2v"

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latent (z_dim): fixed by the VAE architecture, 16 (Wan2.1) or 48 (Wan2.2)."""
        return VAE_Z_DIM[self.vae]

    @property
    def accepts_image(self) -> bool:
        return self.mode in ("i2v", "ti2v")


T2V_A14B = TaskSpec(
    name="t2v-A14B",
    mode="t2v",
    model_type="t2v",
    two_experts=True,
    boundary=0.875,
    steps=40,
    shift=12.0,
    guide_scale=(3.0, 4.0),
    frames=81,
    fps=16,
    vae="wan2.1",
    vae_stride=(4, 8, 8),
    size_multiple=16,
    default_size=(1280, 720),
    official_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
)

I2V_A14B = TaskSpec(
    name="i2v-A14B",
    mode="i2v",
    model_type="i2v",
    two_experts=True,
    boundary=0.900,
    steps=40,
    shift=5.0,
    guide_scale=(3.5, 3.5),
    frames=81,
    fps=16,
    vae="wan2.1",
    vae_stride=(4, 8, 8),
    size_multiple=16,
    default_size=(1280, 720),
    official_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
)

TI2V_5B = TaskSpec(
    name="ti2v-5B",
    mode="ti2v",
    model_type="ti2v",
    two_experts=False,
    boundary=None,
    steps=50,
    shift=5.0,
    guide_scale=(5.0, 5.0),
    frames=121,
    fps=24,
    vae="wan2.2",
    vae_stride=(4, 16, 16),
    size_multiple=32,
    default_size=(1280, 704),
    official_sizes=((1280, 704), (704, 1280)),
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (T2V_A14B, I2V_A14B, TI2V_5B)}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively ("t2v-A14B", "i2v-a14b", "ti2v-5B")."""
    for key, spec in TASKS.items():
        if key.lower() == name.lower():
            return spec
    raise InputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def parse_size(text: str) -> tuple[int, int]:
    """Parse "W*H" or "WxH" into (width, height)."""
    normalized = text.strip().lower().replace("x", "*")
    parts = normalized.split("*")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"size {text!r} is not of the form WIDTH*HEIGHT (e.g. 1280*720 or 832x480)")
    width, height = (int(p) for p in parts)
    if width <= 0 or height <= 0:
        raise InputError(f"size {text!r} must be positive")
    return width, height


def check_size(spec: TaskSpec, width: int, height: int) -> None:
    """Raise InputError unless (width, height) is usable for `spec` (multiples of spec.size_multiple)."""
    m = spec.size_multiple
    if width % m or height % m:
        raise InputError(
            f"size {width}*{height} is not usable for {spec.name}: width and height must be multiples of {m} "
            f"(official sizes: {', '.join(f'{w}*{h}' for w, h in spec.official_sizes)})"
        )


def check_frames(spec: TaskSpec, frames: int) -> None:
    """Raise InputError unless frames = 4k + 1 (the VAE's causal chunking drops any other tail)."""
    t = spec.vae_stride[0]
    if frames < 1 or (frames - 1) % t:
        lower = max(1, (frames - 1) // t * t + 1)
        raise InputError(
            f"frames={frames} is not usable for {spec.name}: it must be {t}k+1 (e.g. {lower} or {lower + t})"
        )
