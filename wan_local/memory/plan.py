"""The residency plan: which DiT blocks stay in VRAM, which stream from RAM, and what every stage needs.

Everything here is a pure function of byte counts (no device calls), so the plan can be made for any machine and
tested on a CPU. Units are in every name: *_bytes are exact integers, *_gb are GiB (1024**3), as everywhere in
wan_local. Numbers agree with /work/shared/spec/budgets.md (tests check them).

Model of a job (the engine's stages, each freeing the last):
1. encode_text: UMT5-XXL (bf16) on the GPU when it fits the usable VRAM, else on the CPU.
2. denoise: DiT non-block weights + resident blocks + `prefetch_depth + 1` block buffers of the streamer
   (wan_local.memory.streaming) + activations of one forward + one dequantized-weight scratch (quantized Linears
   are dequantized to bf16 per call). The VAE waits in RAM.
3. decode: the VAE on the GPU (DiT released), spatially tiled when the untiled decode does not fit; the video
   accumulates in host RAM. I2V's conditioning encode (whole video, before the DiT loads) uses the same tile.
RAM: the active expert is materialised whole on the host while it loads (the loaders build it before the
streamer moves resident blocks out), so one expert counts in full; the idle A14B expert may stay in RAM; UMT5 is
released before the DiT loads unless RAM holds both. A fixed process overhead (Python, torch, CUDA runtime) is
added to every stage.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from wan_local.errors import CheckpointError, InputError
from wan_local.memory.options import QUANT_MODES, QUANT_SCOPES, MemoryOptions
from wan_local.specs import TaskSpec, check_frames, check_size, get_task

if TYPE_CHECKING:  # torch is imported only where a model config is built, so `wan-local --help` stays instant
    from wan_local.models.dit import DiTConfig

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
BF16_BYTES = 2
#: memory/quant stores one float32 scale per output row of a quantized Linear.
QUANT_SCALE_BYTES = 4
#: Python + torch + CUDA runtime resident set, counted in every stage's RAM.
PROCESS_RAM_BYTES = 2 * GIB
#: Slack kept free before choosing an optional RAM use (idle expert, UMT5 kept alongside the DiT).
RAM_SAFETY_BYTES = 2 * GIB
#: The streamer's two pinned staging chunks for pageable blocks (streaming.DEFAULT_CHUNK_BYTES each).
STAGING_HOST_BYTES = 2 * 64 * MIB
#: UMT5-XXL encoder parameters (fact sheet §3.1: models_t5_umt5-xxl-enc-bf16.pth), stored and run in bf16.
TEXT_ENCODER_PARAMS = 5_680_910_336
#: UMT5 activations of a 512-token encode on the GPU (a few [512, 10240] tensors) plus cuBLAS workspace.
TEXT_ENCODER_WORK_BYTES = 256 * MIB
#: float32 VAE parameters (fact sheet §3.1), encoder and decoder: the whole VAE moves to the GPU.
VAE_PARAMS = {"wan2.1": 126_892_531, "wan2.2": 704_688_668}
#: models.rope.apply_rope_ processes this many tokens at a time (its float64 temporaries scale with it).
ROPE_CHUNK_TOKENS = 8192
#: models.timesteps gathers per-token (TI2V) modulation rows for this many tokens at a time.
MOD_CHUNK_TOKENS = 4096
#: Token chunks tried for the FFN when activations do not fit, largest first.
FFN_CHUNK_CANDIDATES = (16384, 8192, 4096, 2048, 1024)
#: Smallest spatial VAE tile (latent positions) the planner proposes (vae_tiling.MIN_TILE).
VAE_MIN_TILE_LATENT_PX = 8

# Official hyper-parameters per model type (fact sheet §1.1), for estimates made before a checkpoint is read.
_OFFICIAL_DIMS: dict[str, dict[str, int]] = {
    "t2v": {"in_dim": 16, "out_dim": 16, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40},
    "i2v": {"in_dim": 36, "out_dim": 16, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40},
    "ti2v": {"in_dim": 48, "out_dim": 48, "dim": 3072, "ffn_dim": 14336, "num_heads": 24, "num_layers": 30},
}
# The Linears memory/quant quantizes, per scope (quant.numerics.is_quant_target).
_QUANT_LINEARS = {
    "all": {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"} | {"ffn.0", "ffn.2"},
    "ffn": {"ffn.0", "ffn.2"},
}


class PlanError(InputError):
    """The job cannot run within the VRAM / RAM given; the message names what is short and by how much."""


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ------------------------------------------------------------------------------------------------ model bytes


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of one DiT (one A14B expert) in the storage format the engine runs it in.

    block_bytes: one entry per transformer block, in forward order. non_block_bytes: embeddings, time MLP and
    projection, head (always bf16, always resident). dequant_scratch_bytes: bf16 copy of the largest quantized
    Linear weight, materialised while it runs (0 unquantized).
    """

    block_bytes: tuple[int, ...]
    non_block_bytes: int
    params: int
    quant: str = "none"
    dequant_scratch_bytes: int = 0

    @property
    def num_blocks(self) -> int:
        """Transformer blocks (40 for an A14B expert, 30 for the 5B)."""
        return len(self.block_bytes)

    @property
    def blocks_total_bytes(self) -> int:
        """All blocks together."""
        return sum(self.block_bytes)

    @property
    def total_bytes(self) -> int:
        """The whole DiT: blocks + non-block weights."""
        return self.blocks_total_bytes + self.non_block_bytes

    @property
    def largest_block_bytes(self) -> int:
        """The block that sizes the streaming buffers."""
        return max(self.block_bytes)


def _block_linears(cfg: DiTConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of one DiTBlock, by its name inside the block."""
    c, f = cfg.dim, cfg.ffn_dim
    shapes = {f"{a}.{p}": (c, c) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    return {**shapes, "ffn.0": (f, c), "ffn.2": (c, f)}


def dit_bytes(
    cfg: DiTConfig, quant: str = "none", quant_scope: str = "all", *, dense_bytes: int = BF16_BYTES
) -> ModelBytes:
    """Exact bytes of WanDiT(cfg)'s parameters with the block Linears stored per `quant`.

    quant "int8"/"fp8": each targeted Linear weight is 1 byte per element plus one float32 scale per output row;
    biases, norms, modulation and everything outside the blocks stay `dense_bytes` (bf16).
    """
    if quant not in QUANT_MODES:
        raise InputError(f"quant={quant!r} is not one of {', '.join(QUANT_MODES)}")
    if quant_scope not in QUANT_SCOPES:
        raise InputError(f"quant_scope={quant_scope!r} is not one of {', '.join(QUANT_SCOPES)}")
    c = cfg.dim
    targets = set() if quant == "none" else _QUANT_LINEARS[quant_scope]
    linears = _block_linears(cfg)
    block = 0
    for name, (out, inp) in linears.items():
        block += out * inp + out * QUANT_SCALE_BYTES if name in targets else out * inp * dense_bytes
    # Dense per block: Linear biases, RMSNorm q/k weights of both attentions, affine norm3, modulation [1, 6, C].
    small = sum(out for out, _ in linears.values()) + 4 * c + 2 * c + 6 * c
    block += small * dense_bytes
    block_params = sum(out * inp for out, inp in linears.values()) + small
    patch = math.prod(cfg.patch_size)
    non_block_params = (
        c * cfg.in_dim * patch + c  # patch_embedding Conv3d
        + cfg.text_dim * c + c + c * c + c  # text_embedding
        + cfg.freq_dim * c + c + c * c + c  # time_embedding
        + c * 6 * c + 6 * c  # time_projection
        + c * patch * cfg.out_dim + patch * cfg.out_dim + 2 * c  # head Linear + modulation
    )  # fmt: skip
    scratch = max((out * inp * BF16_BYTES for n, (out, inp) in linears.items() if n in targets), default=0)
    return ModelBytes(
        block_bytes=(block,) * cfg.num_layers,
        non_block_bytes=non_block_params * dense_bytes,
        params=block_params * cfg.num_layers + non_block_params,
        quant=quant,
        dequant_scratch_bytes=scratch,
    )


# ------------------------------------------------------------------------------------------------ configs


def official_dit_config(task: str) -> DiTConfig:
    """The DiT config of the official checkpoint of `task` (fact sheet §1.1), for estimates before download."""
    from wan_local.models.dit import DiTConfig

    spec = get_task(task)
    return DiTConfig(
        model_type=spec.model_type,
        freq_dim=256,
        text_len=spec.text_len,
        text_dim=4096,
        eps=1e-6,
        patch_size=spec.patch_size,
        **_OFFICIAL_DIMS[spec.model_type],
    )


def _header_shapes(path: Path) -> dict[str, Any]:
    """{tensor name: object with .shape} from safetensors headers only (a file, or every file of a folder)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    shapes: dict[str, Any] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                shapes.update({k: SimpleNamespace(shape=tuple(f.get_slice(k).get_shape())) for k in f.keys()})  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc
    return shapes


def read_dit_config(path: Path) -> DiTConfig:
    """DiTConfig of a DiT folder (config.json) or single file (header shapes), reading no tensor data."""
    from wan_local.weights import keymaps
    from wan_local.weights.files import read_safetensors_metadata
    from wan_local.weights.loading import (
        dit_config_from_diffusers,
        dit_config_from_official,
        dit_config_from_state_dict,
    )

    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}") from exc
        if config.get("_class_name") == "WanTransformer3DModel":
            return dit_config_from_diffusers(config)
        return dit_config_from_official(config, _header_shapes(path))
    shapes = keymaps.strip_prefix(_header_shapes(path))
    if "condition_embedder.time_proj.weight" in shapes:
        shapes = keymaps.dit_diffusers_to_official(shapes)
    try:
        hints = json.loads(read_safetensors_metadata(path).get("config", "{}"))
    except json.JSONDecodeError:
        hints = {}
    return dit_config_from_state_dict(shapes, hints)


def dit_config_for_checkpoint(ckpt_dir: Path | str, task: str) -> DiTConfig:
    """The real DiT config of the checkpoint of `task` under `ckpt_dir` (any of the three layouts).

    Reads config.json and safetensors headers only, never tensor data. For A14B the high-noise expert is read
    (both experts have the same shapes).
    """
    from wan_local.weights.layout import HIGH, SINGLE, find_checkpoints

    spec = get_task(task)
    files = find_checkpoints(Path(ckpt_dir), spec)
    path = files.dit[HIGH if spec.two_experts else SINGLE]
    try:
        cfg = read_dit_config(Path(path))
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing tensor or config field {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model configuration ({exc})") from exc
    if cfg.model_type != spec.model_type:
        raise CheckpointError(f"{path} holds a {cfg.model_type!r} DiT but {spec.name} needs {spec.model_type!r}")
    return cfg


# -------------------------------------------------------------------------------------------- tokens, latents


def latent_grid(spec: TaskSpec, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """Latent (T, h, w) of a `frames` x `height` x `width` video; raises InputError for unusable sizes."""
    check_size(spec, width, height)
    check_frames(spec, frames)
    ts, s, _ = spec.vae_stride
    return (frames - 1) // ts + 1, height // s, width // s


def tokens_for(spec: TaskSpec, width: int, height: int, frames: int) -> int:
    """DiT tokens per forward: T·(H/s/2)·(W/s/2) (VAE stride s, patch 1x2x2)."""
    t, h, w = latent_grid(spec, width, height, frames)
    pt, ph, pw = spec.patch_size
    return (t // pt) * (h // ph) * (w // pw)


# -------------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationTerms:
    """Activation memory of one DiT forward at batch 1 under bf16 autocast, term by term (bytes).

    L tokens, C = dim, F = ffn_dim, N heads, T = FFN token chunk (L when unchunked). The tensors, as dit.py
    creates them (every temporary is freed as soon as it is dead; see the dit module docstring):
    residual_bytes       fp32 [L, C] residual stream. Two are alive in a block: its input (still held by the
                         caller's loop) and the block's own `x`, created by the self-attention's gated add.
    fp32_copy_bytes      one fp32 [L, C] temporary: the modulated input before its bf16 cast, a norm3 output, the
                         squared / normalised copy of a projection inside RMSNorm, a gated product.
    projection_bytes     one bf16 [L, C]: the cast modulated input, a q/k/v projection, the attention output.
    qkv_bytes            q, k, v bf16 [L, C] (3 projections).
    attention_out_bytes  bf16 [L, C] attention kernel output (kept in bf16: o would cast an fp32 copy back).
    ffn_hidden_bytes     bf16 [T, F]: the FFN hidden tensor (GELU runs in place, so only one exists).
    row_stat_bytes       fp32 [L, 1]: an RMSNorm statistic (LayerNorm keeps two while it runs).
    attention_lse_bytes  fp32 [N, L]: the attention kernel's log-sum-exp.
    modulation_bytes     fp32 [U, 6, C] modulation tables, alive through the block (U = 2 distinct timesteps
                         for TI2V image-to-video, else 1).
    gather_bytes         one gathered modulation row block: fp32 [min(L, 4096), C] with per-token timesteps (TI2V
                         models are assumed to use them), else fp32 [1, C].
    rope_table_bytes     complex128 [L, D/2] RoPE multipliers, built once per forward.
    rope_temp_bytes      one RoPE chunk: float64 copy (rotated in place) + its fp32 rounding, 12 · min(L, 8192) · C.
    context_bytes        text: two raw contexts (cond, uncond) fp32 [text_len, text_dim], the padded copy, the
                         embedded bf16 [text_len, C].
    sampler_bytes        latent-sized fp32 tensors of the sampler (noise, outputs, guidance, solver history): 8.
    The phases (bytes alive besides the block input, modulation tables, rope table, context and sampler), in
    units of L·C bytes for the large terms:
    self_attn_norm_bytes    cast input + q + k's projection + its squared fp32 copy + statistic (10·L·C);
    self_attn_rope_bytes    cast input + q + k + RoPE temporaries while k is rotated (6·L·C + rope_temp);
    self_attn_kernel_bytes  cast input + q, k, v + output + log-sum-exp (10·L·C);
    cross_attn_bytes        x + q's projection + its squared fp32 copy + statistic (10·L·C); the context-sized
                            k/v and the kernel (8·L·C) are counted too, for short videos;
    ffn_bytes               x + (1 + scale) table + per chunk of T tokens the largest of: the fp32 modulated chunk
                            and its bf16 cast (6·T·C), the bf16 input chunk with the hidden tensor (2·T·C + 2·T·F),
                            the bf16 output chunk with the gated product (6·T·C).
    Checked against the live tensors of a real DiTBlock forward in tests/test_plan.py.
    """

    tokens: int
    ffn_chunk_tokens: int | None
    residual_bytes: int
    fp32_copy_bytes: int
    projection_bytes: int
    qkv_bytes: int
    attention_out_bytes: int
    ffn_hidden_bytes: int
    row_stat_bytes: int
    attention_lse_bytes: int
    modulation_bytes: int
    gather_bytes: int
    rope_table_bytes: int
    rope_temp_bytes: int
    context_bytes: int
    sampler_bytes: int
    self_attn_norm_bytes: int
    self_attn_rope_bytes: int
    self_attn_kernel_bytes: int
    cross_attn_bytes: int
    ffn_bytes: int

    @property
    def block_peak_bytes(self) -> int:
        """What a block adds on top of its input at its largest phase (modulation tables included)."""
        phases = (
            self.self_attn_norm_bytes,
            self.self_attn_rope_bytes,
            self.self_attn_kernel_bytes,
            self.cross_attn_bytes,
            self.ffn_bytes,
        )
        return self.modulation_bytes + max(phases)

    @property
    def peak_bytes(self) -> int:
        """Peak of one forward: block input + largest phase + what lives through the whole forward."""
        persistent = self.rope_table_bytes + self.context_bytes + self.sampler_bytes
        return self.residual_bytes + self.block_peak_bytes + persistent


def activation_terms(cfg: DiTConfig, tokens: int, ffn_chunk_tokens: int | None = None) -> ActivationTerms:
    """Term-by-term activation bytes of one forward of `cfg` over `tokens` tokens (see ActivationTerms).

    ffn_chunk_tokens: the `DiTBlock.ffn_chunk_tokens` the blocks run with (None: the FFN over all tokens).
    """
    if tokens < 1:
        raise InputError(f"tokens={tokens} must be >= 1")
    if ffn_chunk_tokens is not None and ffn_chunk_tokens < 1:
        raise InputError(f"ffn_chunk_tokens={ffn_chunk_tokens} must be >= 1 (or None)")
    n, c, f = tokens, cfg.dim, cfg.ffn_dim
    per_token = cfg.model_type == "ti2v"
    chunk = n if ffn_chunk_tokens is None else min(n, ffn_chunk_tokens)
    lc = n * c
    residual, fp32_copy, half = 4 * lc, 4 * lc, 2 * lc
    hidden = 2 * chunk * f
    stat, lse = 4 * n, 4 * cfg.num_heads * n
    rope_temp = 12 * min(n, ROPE_CHUNK_TOKENS) * c
    rope_table = 16 * n * (cfg.head_dim // 2)
    context = (3 * 4 * cfg.text_dim + 2 * c) * cfg.text_len
    sampler = 8 * 4 * n * math.prod(cfg.patch_size) * cfg.out_dim
    tables = 4 * (2 if per_token else 1) * c  # one [U, C] fp32 table, e.g. 1 + scale

    def gather(rows: int) -> int:  # one gathered [rows or 1, C] fp32 block of a modulation table
        return 4 * (min(rows, MOD_CHUNK_TOKENS) if per_token else 1) * c

    # Cross-attention: context-sized k (projection + squared copy + statistic), then the kernel with k, v.
    ctx = cfg.text_len * c
    cross_k = residual + half + 6 * ctx + 4 * cfg.text_len
    cross_kernel = residual + 2 * half + 4 * ctx + 4 * cfg.num_heads * n
    # FFN per chunk of T tokens: the LayerNorm output with its two statistics, the modulated chunk (while one
    # row block is gathered), its bf16 cast, the hidden tensor, and the gated add (product + gathered rows).
    t_c = chunk * c
    gated = 2 * t_c + 4 * min(chunk, MOD_CHUNK_TOKENS if per_token else chunk) * c + gather(chunk)
    ffn_chunk = max(4 * t_c + 8 * chunk, 4 * t_c + gather(chunk), 6 * t_c, 2 * t_c + hidden, gated)
    return ActivationTerms(
        tokens=n,
        ffn_chunk_tokens=ffn_chunk_tokens,
        residual_bytes=residual,
        fp32_copy_bytes=fp32_copy,
        projection_bytes=half,
        qkv_bytes=3 * half,
        attention_out_bytes=half,
        ffn_hidden_bytes=hidden,
        row_stat_bytes=stat,
        attention_lse_bytes=lse,
        modulation_bytes=6 * tables,
        gather_bytes=gather(n),
        rope_table_bytes=rope_table,
        rope_temp_bytes=rope_temp,
        context_bytes=context,
        sampler_bytes=sampler,
        self_attn_norm_bytes=3 * half + fp32_copy + stat,
        self_attn_rope_bytes=3 * half + rope_temp,
        self_attn_kernel_bytes=5 * half + lse,
        cross_attn_bytes=max(residual + half + fp32_copy + stat, cross_k, cross_kernel),
        ffn_bytes=residual + tables + ffn_chunk,
    )


def activation_bytes(cfg: DiTConfig, tokens: int, ffn_chunk_tokens: int | None = None) -> int:
    """Peak activation bytes of one DiT forward at batch 1 (bf16 autocast); see ActivationTerms."""
    return activation_terms(cfg, tokens, ffn_chunk_tokens).peak_bytes


# ---------------------------------------------------------------------------------------------- other parts


def text_encoder_bytes() -> int:
    """UMT5-XXL encoder weights in bf16 (≈11.4 GB)."""
    return TEXT_ENCODER_PARAMS * BF16_BYTES


def vae_weight_bytes(vae: str) -> int:
    """float32 weights of the "wan2.1" or "wan2.2" VAE."""
    if vae not in VAE_PARAMS:
        raise InputError(f"unknown VAE {vae!r}; expected one of {', '.join(VAE_PARAMS)}")
    return VAE_PARAMS[vae] * 4


@dataclass(frozen=True)
class ComponentBytes:
    """Weights of a checkpoint's text encoder (as run: bf16) and VAE (float32), counted from its files."""

    text_encoder_bytes: int
    vae_bytes: int


def _param_count(path: Path) -> int:
    """Number of tensor elements in a safetensors file/folder (headers only) or a .pth (memory-mapped)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return sum(math.prod(v.shape) for v in _header_shapes(path).values())
    from wan_local.weights.files import read_pth

    return sum(t.numel() for t in read_pth(path).values())


def component_bytes_for_checkpoint(ckpt_dir: Path | str, task: str) -> ComponentBytes:
    """ComponentBytes of the checkpoint of `task` under `ckpt_dir`, so estimates fit the files really used."""
    from wan_local.weights.layout import find_checkpoints

    files = find_checkpoints(Path(ckpt_dir), get_task(task))
    return ComponentBytes(_param_count(files.text_encoder) * BF16_BYTES, _param_count(files.vae) * 4)


@dataclass(frozen=True)
class PipelineBytes:
    """What a job needs besides the DiT's own residency, for the stage-by-stage accounting.

    experts: DiTs of the task (2 for A14B, each `ModelBytes`-sized). text_encoder_bytes: UMT5 weights;
    text_encoder_vram_bytes: what encoding on the GPU needs. vae_bytes: VAE weights (RAM during denoise).
    decoded_video_bytes: the float32 video in host RAM. latent_hw: latent (h, w), for VAE tile sizes.
    """

    experts: int = 1
    text_encoder_bytes: int = 0
    text_encoder_vram_bytes: int = 0
    vae_bytes: int = 0
    decoded_video_bytes: int = 0
    latent_hw: tuple[int, int] = (1, 1)


def pipeline_bytes_for(
    spec: TaskSpec, width: int, height: int, frames: int, components: ComponentBytes | None = None
) -> PipelineBytes:
    """PipelineBytes for one video of the given size: the checkpoint's `components`, else the official ones."""
    _, h, w = latent_grid(spec, width, height, frames)
    te = components.text_encoder_bytes if components else text_encoder_bytes()
    return PipelineBytes(
        experts=2 if spec.two_experts else 1,
        text_encoder_bytes=te,
        text_encoder_vram_bytes=te + TEXT_ENCODER_WORK_BYTES,
        vae_bytes=components.vae_bytes if components else vae_weight_bytes(spec.vae),
        decoded_video_bytes=4 * 3 * frames * height * width,
        latent_hw=(h, w),
    )


def default_pinned_cap_bytes(ram_total_bytes: int, os_name: str) -> int:
    """Most page-locked RAM to use: 40 % of RAM on Windows (WDDM); elsewhere max(40 %, min(90 %, RAM - 4 GiB)).

    ComfyUI's rule without the swap term (engine notes §1.4, §2, implication 4).
    """
    if os_name.lower().startswith("win"):
        return int(0.4 * ram_total_bytes)
    return int(max(0.4 * ram_total_bytes, min(0.9 * ram_total_bytes, ram_total_bytes - 4 * GIB)))


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class ResidencyPlan:
    """Where every part of a job lives, and the peaks that follow. Block indices are in forward order.

    prefetch_depth: loads in flight ahead of the running block (the streamer allocates prefetch_depth + 1
    buffers of the largest streamed block: gpu_buffer_bytes); 0 when nothing streams. Pinned blocks hold their
    host slab page-locked; the others are pageable and go through staging_host_bytes of pinned chunks.
    experts_in_ram: A14B experts held in host RAM while denoising (2 = the idle one is kept).
    *_vram_bytes / *_ram_bytes per stage; peak_* are their maxima (RAM includes the process overhead).
    condition_vram_bytes: the VAE encode of I2V's conditioning video (81 frames at full size), tiled like the
    decode.
    """

    device: str
    num_blocks: int
    resident_blocks: tuple[int, ...]
    non_block_bytes: int
    activation_bytes: int
    experts_in_ram: int
    release_text_encoder_before_dit: bool
    encode_ram_bytes: int
    denoise_ram_bytes: int
    decode_ram_bytes: int
    streamed_blocks: tuple[int, ...] = ()
    prefetch_depth: int = 0
    gpu_buffer_bytes: int = 0
    resident_block_bytes: int = 0
    dequant_scratch_bytes: int = 0
    ffn_chunk_tokens: int | None = None
    usable_vram_bytes: int = 0
    streamed_bytes_per_forward: int = 0
    pinned_blocks: tuple[int, ...] = ()
    pinned_host_bytes: int = 0
    pageable_host_bytes: int = 0
    staging_host_bytes: int = 0
    text_encoder_on_gpu: bool = False
    vae_tile_latent_px: int | None = None
    encode_vram_bytes: int = 0
    condition_vram_bytes: int = 0
    denoise_vram_bytes: int = 0
    decode_vram_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def peak_vram_bytes(self) -> int:
        """Largest VRAM of any stage (encode, condition, denoise, decode), reserve excluded."""
        stages = (self.encode_vram_bytes, self.condition_vram_bytes, self.denoise_vram_bytes, self.decode_vram_bytes)
        return max(stages)

    @property
    def peak_ram_bytes(self) -> int:
        """Largest RAM of any stage, process overhead included."""
        return max(self.encode_ram_bytes, self.denoise_ram_bytes, self.decode_ram_bytes)

    def describe(self) -> list[str]:
        """Human-readable lines (GiB) summarising the plan."""
        n, s = self.num_blocks, len(self.streamed_blocks)
        lines = [f"device          {self.device}"]
        if self.device == "cuda":
            buffers = f"{self.prefetch_depth + 1} x {_gib(self.gpu_buffer_bytes / (self.prefetch_depth + 1))}"
            stream = f"{s} streamed (prefetch {self.prefetch_depth}, buffers {buffers})" if s else "none streamed"
            pinned = f"{len(self.pinned_blocks)} blocks / {_gib(self.pinned_host_bytes)}"
            lines += [
                f"DiT blocks      {n - s} of {n} resident, {stream}",
                f"streamed        {list(self.streamed_blocks)}" if s else "streamed        []",
                f"VRAM weights    {_gib(self.resident_block_bytes)} blocks + {_gib(self.non_block_bytes)} non-block",
                f"pinned host     {pinned}, pageable {_gib(self.pageable_host_bytes)}",
            ]
        lines += [
            f"activations     {_gib(self.activation_bytes)} "
            + (f"(FFN in chunks of {self.ffn_chunk_tokens} tokens)" if self.ffn_chunk_tokens else "(FFN unchunked)"),
            f"experts in RAM  {self.experts_in_ram}; UMT5 on {'GPU' if self.text_encoder_on_gpu else 'CPU'}, "
            f"{'released before the DiT loads' if self.release_text_encoder_before_dit else 'kept in RAM'}",
            f"VAE tile        {self.vae_tile_latent_px or 'untiled'}"
            + (" latent px" if self.vae_tile_latent_px else ""),
        ]
        if self.device == "cuda":
            lines.append(
                f"VRAM by stage   encode {_gib(self.encode_vram_bytes)}, "
                + (f"condition {_gib(self.condition_vram_bytes)}, " if self.condition_vram_bytes else "")
                + f"denoise {_gib(self.denoise_vram_bytes)}, decode {_gib(self.decode_vram_bytes)} "
                f"(usable {_gib(self.usable_vram_bytes)})"
            )
        lines += [
            f"RAM by stage    encode {_gib(self.encode_ram_bytes)}, denoise {_gib(self.denoise_ram_bytes)}, "
            f"decode {_gib(self.decode_ram_bytes)}",
        ]
        return lines


ActivationFn = Callable[[int | None], int]
VaeDecodeFn = Callable[[int | None], int]


def _spread(n: int, count: int) -> tuple[int, ...]:
    """`count` indices spread evenly over range(n), centred ((2i+1)·n / 2count): never 0 unless count > n/2."""
    return tuple((2 * i + 1) * n // (2 * count) for i in range(count))


def _split(n: int, resident: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(resident, streamed) indices with the smaller set spread evenly, so streamed blocks interleave.

    With at most n/2 streamed, no two streamed blocks are adjacent (wrap-around included: the first streamed
    index is >= 1), so every copy overlaps at least one resident block's compute (mmgp's insight).
    """
    streamed_count = n - resident
    if streamed_count <= resident:
        streamed = _spread(n, streamed_count) if streamed_count else ()
        return tuple(i for i in range(n) if i not in streamed), streamed
    kept = _spread(n, resident) if resident else ()
    return kept, tuple(i for i in range(n) if i not in kept)


@dataclass(frozen=True)
class _VramChoice:
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    depth: int
    buffer_bytes: int
    chunk: int | None
    activation_bytes: int
    denoise_bytes: int


def _leanest_chunk(act: ActivationFn) -> int | None:
    """The largest FFN chunk reaching the smallest activation peak (below some chunk attention dominates)."""
    sizes = {chunk: act(chunk) for chunk in (None, *FFN_CHUNK_CANDIDATES)}
    least = min(sizes.values())
    return next(chunk for chunk, size in sizes.items() if size <= least)


def _vram_short_error(model: ModelBytes, act_bytes: int, usable: int, budget: int, quant_hint: bool) -> PlanError:
    need = model.non_block_bytes + model.dequant_scratch_bytes + act_bytes + 2 * model.largest_block_bytes
    hint = "lower the resolution or frames" + (", or use --quant int8" if quant_hint else "")
    return PlanError(
        f"needs {_gib(need - usable)} more VRAM than the {_gib(usable)} usable ({_gib(budget)} budget minus the "
        f"reserve) even with every block streamed: {_gib(model.non_block_bytes)} non-block weights, "
        f"{_gib(act_bytes)} activations, 2 block buffers of {_gib(model.largest_block_bytes)}; {hint}"
    )


def _plan_vram(model: ModelBytes, act: ActivationFn, usable: int, budget: int, offload: str) -> _VramChoice:
    """Fewest streamed blocks that fit (offload "auto"/"blocks"), all resident ("none"), or all streamed ("full")."""
    n, fixed = model.num_blocks, model.non_block_bytes + model.dequant_scratch_bytes
    chunks = (None, *FFN_CHUNK_CANDIDATES)
    if offload != "full":
        for chunk in chunks:
            a = act(chunk)
            need = fixed + model.blocks_total_bytes + a
            if need <= usable:
                return _VramChoice(tuple(range(n)), (), 0, 0, chunk, a, need)
        if offload == "none":
            a = act(_leanest_chunk(act))
            need = fixed + model.blocks_total_bytes + a
            raise PlanError(
                f"offload='none' needs {_gib(need)} of VRAM for all {n} blocks but {_gib(usable)} is usable "
                f"({_gib(need - usable)} short); use --offload auto to stream some blocks"
            )
    lean = _leanest_chunk(act)
    # Streaming: the leanest activations leave the most room for resident blocks; "full" keeps chunking optional.
    candidates = [c for c in chunks if c is None or act(c) < act(None)] if offload == "full" else [lean]
    for chunk in candidates:
        a = act(chunk)
        for resident in range(0 if offload == "full" else n - 1, -1, -1):
            kept, streamed = _split(n, resident)
            buf = max(model.block_bytes[i] for i in streamed)
            base = fixed + a + sum(model.block_bytes[i] for i in kept)
            if base + 2 * buf <= usable:
                # With resident blocks between the streamed ones, each copy overlaps resident compute and one load
                # in flight (2 buffers) suffices; a third buffer would cost a resident block. Streaming everything,
                # a second load in flight absorbs jitter and costs nothing when VRAM is left.
                depth = 2 if resident == 0 and base + 3 * buf <= usable else 1
                return _VramChoice(kept, streamed, depth, (depth + 1) * buf, chunk, a, base + (depth + 1) * buf)
    raise _vram_short_error(model, act(lean), usable, budget, model.quant == "none")


def _plan_pinning(
    model: ModelBytes, streamed: tuple[int, ...], cap: int, staging: int
) -> tuple[tuple[int, ...], int, int, int]:
    """(pinned blocks, pinned bytes, pageable bytes, staging bytes), as the streamer pins: all if they fit the
    cap, else greedily in order within cap - staging; pageable blocks need the pinned staging chunks."""
    sizes = [model.block_bytes[i] for i in streamed]
    if sum(sizes) <= cap:
        return streamed, sum(sizes), 0, 0
    budget, pinned = max(0, cap - staging), []
    for i, size in zip(streamed, sizes, strict=True):
        if size <= budget:
            pinned.append(i)
            budget -= size
    pinned_bytes = sum(model.block_bytes[i] for i in pinned)
    return tuple(pinned), pinned_bytes + staging, sum(sizes) - pinned_bytes, staging


def _plan_ram(
    expert_bytes: int,
    pipe: PipelineBytes,
    staging: int,
    available: int,
    policy: str,
    process: int,
    safety: int,
    extra: tuple[int, int, int] = (0, 0, 0),
) -> dict[str, Any]:
    """Idle-expert and UMT5 decisions, then RAM per stage (encode, denoise, decode) including `process`:
    the ResidencyPlan fields they fill.

    Steady state of repeated jobs: what is kept (idle expert, UMT5) is counted in every stage. `extra` adds
    per-stage working memory (activations on a CPU-only plan).
    """
    te, vae = pipe.text_encoder_bytes, pipe.vae_bytes

    def stages(keep_idle: bool, keep_te: bool) -> tuple[int, int, int]:
        held = (pipe.experts * expert_bytes if keep_idle else 0) + (te if keep_te else 0)
        active = 0 if keep_idle else expert_bytes
        encode = held + (0 if keep_te else te) + extra[0]
        denoise = held + active + vae + staging + extra[1]
        decode = held + vae + pipe.decoded_video_bytes + extra[2]
        return process + encode, process + denoise, process + decode

    two = pipe.experts > 1
    if two and policy == "keep":
        keep_idle = True
    elif two and policy == "auto":
        keep_idle = max(stages(True, True)) + safety <= available
    else:
        keep_idle = False
    keep_te = max(stages(keep_idle, True)) + safety <= available
    result = stages(keep_idle, keep_te)
    if max(result) > available:
        dit = "both DiT experts (keep_idle_expert='keep')" if keep_idle else "one DiT expert"
        held = f" with {dit} held" if keep_idle else ""
        what = (f"UMT5 ({_gib(te)}) while encoding the prompt{held}", f"{dit} while denoising", f"the VAE decode{held}")
        hint = "use keep_idle_expert='drop', " if keep_idle else ""
        raise PlanError(
            f"needs {_gib(max(result))} of RAM for {what[result.index(max(result))]} but only {_gib(available)} "
            f"is available ({_gib(max(result) - available)} short); {hint}close other programs or use --quant int8"
        )
    return {
        "experts_in_ram": pipe.experts if keep_idle else 1,
        "release_text_encoder_before_dit": not keep_te,
        **dict(zip(("encode_ram_bytes", "denoise_ram_bytes", "decode_ram_bytes"), result, strict=True)),
    }


def _plan_vae_tile(
    fn: VaeDecodeFn | None, usable: int, tiling: str, latent_hw: tuple[int, int]
) -> tuple[int | None, int]:
    """(tile side in latent px or None, decode VRAM bytes): untiled when it fits (unless tiling "on"), else the
    largest square tile that fits (fn is monotone in the tile side)."""
    if fn is None:
        return None, 0
    full = fn(None)
    if tiling != "on" and full <= usable:
        return None, full
    if tiling == "off":
        raise PlanError(
            f"the untiled VAE decode needs {_gib(full)} of VRAM but {_gib(usable)} is usable; enable VAE tiling"
        )
    longest = max(latent_hw)
    lo = min(VAE_MIN_TILE_LATENT_PX, longest)
    if fn(lo) > usable:
        raise PlanError(
            f"the VAE decode needs {_gib(fn(lo))} of VRAM even with {lo}x{lo} latent tiles but {_gib(usable)} is "
            "usable; free VRAM or lower the resolution"
        )
    hi = longest if tiling == "auto" else max(lo + 1, math.ceil(longest / 2) + 1)
    while hi - lo > 1:  # invariant: fn(lo) fits, hi does not fit (or is excluded)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fn(mid) <= usable else (lo, mid)
    return lo, fn(lo)


def plan_residency(
    model: ModelBytes,
    activation_bytes: int | ActivationFn,
    budget_vram_bytes: int,
    reserve_vram_bytes: int,
    ram_available_bytes: int,
    pinned_cap_bytes: int,
    options: MemoryOptions,
    vae_decode_bytes_fn: VaeDecodeFn | None = None,
    pipeline: PipelineBytes | None = None,
    *,
    vae_encode_bytes_fn: VaeDecodeFn | None = None,
    process_ram_bytes: int = PROCESS_RAM_BYTES,
    ram_safety_bytes: int = RAM_SAFETY_BYTES,
    staging_host_bytes: int = STAGING_HOST_BYTES,
) -> ResidencyPlan:
    """Plan a GPU job: residency of the DiT blocks, pinning, idle expert, UMT5 placement and VAE tiling.

    activation_bytes: peak activations of one forward, or a function of the FFN token chunk (None = unchunked)
    so the planner can chunk when that avoids streaming. budget_vram_bytes - reserve_vram_bytes is usable.
    pinned_cap_bytes: page-locked RAM allowed (resolved by the caller, e.g. default_pinned_cap_bytes).
    vae_decode_bytes_fn(tile) -> decode VRAM incl. weights and headroom (tile side in latent px, None =
    untiled); None skips the decode stage. vae_encode_bytes_fn: the same for the I2V conditioning encode, which
    uses the decode's tile (encoding needs less per pixel than decoding). Raises PlanError naming what is short.
    """
    pipe = pipeline or PipelineBytes()
    act: ActivationFn = activation_bytes if callable(activation_bytes) else (lambda _chunk, a=activation_bytes: a)
    usable = budget_vram_bytes - reserve_vram_bytes
    if usable <= 0:
        raise PlanError(
            f"the VRAM budget {_gib(budget_vram_bytes)} leaves nothing after the {_gib(reserve_vram_bytes)} reserve"
        )
    notes = []
    vram = _plan_vram(model, act, usable, budget_vram_bytes, options.offload)
    pinned, pinned_bytes, pageable, staging = _plan_pinning(model, vram.streamed, pinned_cap_bytes, staging_host_bytes)
    if pageable:
        notes.append(
            f"pinned-memory cap {_gib(pinned_cap_bytes)} reached: {len(vram.streamed) - len(pinned)} streamed "
            f"blocks ({_gib(pageable)}) stay pageable and are copied through pinned staging (slower)"
        )
    if vram.chunk is not None:
        notes.append(f"FFN computed in chunks of {vram.chunk} tokens to fit the activations")
    ram = _plan_ram(
        model.total_bytes,
        pipe,
        staging,
        ram_available_bytes,
        options.keep_idle_expert,
        process_ram_bytes,
        ram_safety_bytes,
    )
    if pipe.experts > 1 and ram["experts_in_ram"] == 1:
        notes.append("the idle expert is dropped from RAM and read from disk again at the switch")
    # UMT5 runs on the CPU (the pipeline's policy): its 11 GB never compete with the DiT for VRAM, and the
    # prompt cache makes repeated prompts free.
    te_on_gpu = False
    tile, decode_vram = _plan_vae_tile(vae_decode_bytes_fn, usable, options.vae_tiling, pipe.latent_hw)
    if tile is not None:
        notes.append(f"VAE decode tiled: {tile}x{tile} latent px per tile")
    condition_vram = 0 if vae_encode_bytes_fn is None else vae_encode_bytes_fn(tile)
    if condition_vram > usable:
        raise PlanError(
            f"the VAE encode of the conditioning video needs {_gib(condition_vram)} of VRAM but {_gib(usable)} is "
            "usable; lower the resolution or frames"
        )
    log.debug(
        "plan: %d resident / %d streamed blocks, chunk %s, tile %s, denoise %.2f of %.2f GiB usable",
        len(vram.resident),
        len(vram.streamed),
        vram.chunk,
        tile,
        vram.denoise_bytes / GIB,
        usable / GIB,
    )
    return ResidencyPlan(
        device="cuda",
        num_blocks=model.num_blocks,
        resident_blocks=vram.resident,
        non_block_bytes=model.non_block_bytes,
        activation_bytes=vram.activation_bytes,
        streamed_blocks=vram.streamed,
        prefetch_depth=vram.depth,
        gpu_buffer_bytes=vram.buffer_bytes,
        resident_block_bytes=sum(model.block_bytes[i] for i in vram.resident),
        dequant_scratch_bytes=model.dequant_scratch_bytes,
        ffn_chunk_tokens=vram.chunk,
        usable_vram_bytes=usable,
        streamed_bytes_per_forward=sum(model.block_bytes[i] for i in vram.streamed),
        pinned_blocks=pinned,
        pinned_host_bytes=pinned_bytes,
        pageable_host_bytes=pageable,
        staging_host_bytes=staging,
        text_encoder_on_gpu=te_on_gpu,
        vae_tile_latent_px=tile,
        encode_vram_bytes=pipe.text_encoder_vram_bytes if te_on_gpu else 0,
        condition_vram_bytes=condition_vram,
        denoise_vram_bytes=vram.denoise_bytes,
        decode_vram_bytes=decode_vram,
        notes=tuple(notes),
        **ram,
    )


def plan_cpu(
    model: ModelBytes,
    activation_bytes: int,
    ram_available_bytes: int,
    options: MemoryOptions,
    vae_decode_bytes: int = 0,
    pipeline: PipelineBytes | None = None,
    *,
    process_ram_bytes: int = PROCESS_RAM_BYTES,
    ram_safety_bytes: int = RAM_SAFETY_BYTES,
) -> ResidencyPlan:
    """Plan a CPU-only job: every block "resident" in RAM, activations and the VAE decode working set in RAM.

    vae_decode_bytes: decode working memory (weights excluded). Raises PlanError when RAM is short.
    """
    pipe = pipeline or PipelineBytes()
    extra = (TEXT_ENCODER_WORK_BYTES, activation_bytes, vae_decode_bytes)
    ram = _plan_ram(
        model.total_bytes,
        pipe,
        0,
        ram_available_bytes,
        options.keep_idle_expert,
        process_ram_bytes,
        ram_safety_bytes,
        extra,
    )
    return ResidencyPlan(
        device="cpu",
        num_blocks=model.num_blocks,
        resident_blocks=tuple(range(model.num_blocks)),
        non_block_bytes=model.non_block_bytes,
        activation_bytes=activation_bytes,
        resident_block_bytes=model.blocks_total_bytes,
        dequant_scratch_bytes=model.dequant_scratch_bytes,
        notes=("no CUDA GPU: everything runs on the CPU (very slow at real sizes)",),
        **ram,
    )
