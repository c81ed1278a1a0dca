"""Bytes of a job's parts, as the engine stores and computes them: DiT blocks and non-block weights per quant mode,
activations of one forward, the text encoder and VAE, the decoded video. Pure functions of shapes and dtypes (no
file I/O, no device calls): the planner (plan.py) and the estimator build on them, and tests build the real A14B
and 5B shapes synthetically. Units are in every name: *_bytes are exact integers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wan_local.errors import InputError
from wan_local.memory.options import QUANT_MODES, QUANT_SCOPES
from wan_local.specs import TaskSpec, check_frames, check_size, get_task
from wan_local.weights.gguf.types import DEQUANT_TEMP_BYTES, GGML_BY_NAME

if TYPE_CHECKING:  # torch is imported only where a model config is built, so `wan-local --help` stays instant
    from wan_local.models.dit import DiTConfig

GIB = 1024**3
MIB = 1024**2
BF16_BYTES = 2
#: memory/quant stores one float32 scale per output row of a quantized Linear.
QUANT_SCALE_BYTES = 4
#: Python + torch + CUDA runtime resident set, counted in every stage's RAM.
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
#: Latent-sized float32 tensors the sampler holds around a forward (noise, outputs, guidance, solver history).
SAMPLER_LATENTS = 8
#: Token chunks tried for the FFN when activations do not fit, largest first.

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
    context_bytes        text: two raw contexts (cond, uncond) fp32 [text_len, text_dim] and the embedded bf16
                         [text_len, C] (the padded copy of a context dies once embedded, before the blocks).
    sampler_bytes        latent-sized fp32 tensors of the sampler (noise, outputs, guidance, solver history):
                         SAMPLER_LATENTS; the latent a forward takes is one of them.
    condition_bytes      fp32 conditioning y [in_dim - out_dim, T, H, W] of an i2v model, held through the denoise.
    The phases (bytes alive besides the block input, modulation tables and the persistent terms: rope table,
    context, sampler, conditioning), in units of L·C bytes for the large terms:
    self_attn_norm_bytes    cast input + q + k's projection + its squared fp32 copy + statistic (10·L·C);
    self_attn_rope_bytes    cast input + q + k + RoPE temporaries while k is rotated (6·L·C + rope_temp);
    self_attn_kernel_bytes  cast input + q, k, v + output + log-sum-exp (10·L·C);
    cross_attn_bytes        x + q's projection + its squared fp32 copy + statistic (10·L·C); the context-sized
                            k/v and the kernel (8·L·C) are counted too, for short videos;
    ffn_bytes               x + (1 + scale) table + per chunk of T tokens the largest of: the fp32 modulated chunk
                            and its bf16 cast (6·T·C), the bf16 input chunk with the hidden tensor (2·T·C + 2·T·F),
                            the bf16 output chunk with the gated product (6·T·C).
    Checked against the live tensors of real forwards on fake (meta) tensors (memory.meta_trace): blocks at full
    size in tests/test_plan.py, whole forwards in tests/test_live_bytes.py and benchmarks/bench_activation_meta.py.
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
    condition_bytes: int
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
    def persistent_bytes(self) -> int:
        """What lives through the whole forward besides the residual stream."""
        return self.rope_table_bytes + self.context_bytes + self.sampler_bytes + self.condition_bytes

    @property
    def peak_bytes(self) -> int:
        """Peak of one forward: block input + largest phase + what lives through the whole forward."""
        return self.residual_bytes + self.block_peak_bytes + self.persistent_bytes


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
    context = (2 * 4 * cfg.text_dim + 2 * c) * cfg.text_len
    latent_elements = n * math.prod(cfg.patch_size)  # per channel
    sampler = SAMPLER_LATENTS * 4 * latent_elements * cfg.out_dim
    condition = 4 * latent_elements * (cfg.in_dim - cfg.out_dim) if cfg.model_type == "i2v" else 0
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
        condition_bytes=condition,
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
    """Weights of a checkpoint's text encoder (as run) and VAE (float32), counted from its files.

    text_encoder_encode_bytes: host RAM while UMT5 loads and encodes, when it differs from its weights as run: a
    file converted on load (ComfyUI's fp8 UMT5, or --dtype other than the file's) holds the converted copy and
    the file's mapped pages at once; a file used as stored (the official bf16 .pth) never touches most of its
    token embedding (only the prompt's rows are read).
    """

    text_encoder_bytes: int
    vae_bytes: int
    text_encoder_encode_bytes: int | None = None


@dataclass(frozen=True)
class PipelineBytes:
    """What a job needs besides the DiT's own residency, for the stage-by-stage accounting.

    experts: DiTs of the task (2 for A14B, each `ModelBytes`-sized). text_encoder_bytes: UMT5 weights;
    text_encoder_encode_bytes: host RAM while encoding (ComponentBytes); text_encoder_vram_bytes: what encoding
    on the GPU needs. vae_bytes: VAE weights. vae_in_denoise: whether the VAE's weights are in RAM while
    denoising (on a GPU it comes back from the card into host memory; a CPU job reads its mapped file only to
    encode an input image or to decode). decoded_video_bytes: the float32 video in host RAM. latent_hw: latent
    (h, w), for VAE tile sizes.
    """

    experts: int = 1
    text_encoder_bytes: int = 0
    text_encoder_vram_bytes: int = 0
    vae_bytes: int = 0
    decoded_video_bytes: int = 0
    latent_hw: tuple[int, int] = (1, 1)
    text_encoder_encode_bytes: int | None = None
    vae_in_denoise: bool = True


def pipeline_bytes_for(
    spec: TaskSpec,
    width: int,
    height: int,
    frames: int,
    components: ComponentBytes | None = None,
    *,
    vae_in_denoise: bool = True,
) -> PipelineBytes:
    """PipelineBytes for one video of the given size: the checkpoint's `components`, else the official ones."""
    _, h, w = latent_grid(spec, width, height, frames)
    te = components.text_encoder_bytes if components else text_encoder_bytes()
    return PipelineBytes(
        text_encoder_encode_bytes=components.text_encoder_encode_bytes if components else None,
        vae_in_denoise=vae_in_denoise,
        experts=2 if spec.two_experts else 1,
        text_encoder_bytes=te,
        text_encoder_vram_bytes=te + TEXT_ENCODER_WORK_BYTES,
        vae_bytes=components.vae_bytes if components else vae_weight_bytes(spec.vae),
        decoded_video_bytes=4 * 3 * frames * height * width,
        latent_hw=(h, w),
    )


#: Stored dtypes of weights kept as stored (one byte per element): ComfyUI fp8_scaled, quanto, our int8.
_ONE_BYTE_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "I8", "torch.float8_e4m3fn", "torch.float8_e5m2", "torch.int8"})
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(?:(.+)\.)?(\w+)$")


def model_bytes_from_tensors(
    tensors: Mapping[str, Any], quant: str = "none", quant_scope: str = "all", *, dense_bytes: int = BF16_BYTES
) -> ModelBytes:
    """ModelBytes of a DiT from its file's tensor table (official names -> objects with .shape and .dtype).

    The bytes the engine holds, not the bytes of the file: one-byte weights (fp8_scaled, quanto, int8) stay as
    stored with their float32 scales, and a pre-quantized file keeps its own format whatever `quant` says
    (as quant.load_quantized_dit does); GGUF block formats (dtype "Q4_K", "Q8_0", ...) stay packed as stored, a
    weight dequantized to `dense_bytes` (plus bounded float32 temporaries) while its Linear runs; high-precision
    block Linears are quantized per `quant` / `quant_scope` (1 byte per weight + one float32 scale per row);
    everything else is held at `dense_bytes` (the run dtype).
    """
    if quant not in QUANT_MODES:
        raise InputError(f"quant={quant!r} is not one of {', '.join(QUANT_MODES)}")
    prequantized = any(str(t.dtype) in _ONE_BYTE_DTYPES or ggml_packed(t.dtype) for t in tensors.values())
    targets = _QUANT_LINEARS[quant_scope] if quant != "none" and not prequantized else set()
    blocks: dict[int, int] = {}
    non_block = params = scratch = 0
    for name, info in tensors.items():
        shape = tuple(info.shape)
        n = math.prod(shape)
        match = _BLOCK_KEY.match(name)
        layer, leaf = (match.group(2), match.group(3)) if match else (None, name.rsplit(".", 1)[-1])
        if name.endswith("scaled_fp8"):
            continue  # ComfyUI's marker tensor: not part of the model
        if str(info.dtype) in _ONE_BYTE_DTYPES:
            nbytes = n
            scratch = max(scratch, n * BF16_BYTES)
        elif ggml_packed(info.dtype):
            nbytes = GGML_BY_NAME[str(info.dtype)].nbytes(n)
            scratch = max(scratch, n * dense_bytes + DEQUANT_TEMP_BYTES)
        elif "scale" in leaf:
            nbytes = n * QUANT_SCALE_BYTES
        elif layer in targets and leaf == "weight" and len(shape) == 2:
            nbytes = n + shape[0] * QUANT_SCALE_BYTES
            scratch = max(scratch, n * BF16_BYTES)
        else:
            nbytes = n * dense_bytes
        params += 0 if "scale" in leaf else n
        if match:
            index = int(match.group(1))
            blocks[index] = blocks.get(index, 0) + nbytes
        else:
            non_block += nbytes
    if not blocks:
        raise InputError("the DiT's tensor table has no blocks.<i>.* tensors")
    quantized = "none" if not (prequantized or targets) else (quant if targets else "as stored")
    return ModelBytes(
        block_bytes=tuple(blocks[i] for i in sorted(blocks)),
        non_block_bytes=non_block,
        params=params,
        quant=quantized,
        dequant_scratch_bytes=scratch,
    )


def ggml_packed(dtype: object) -> bool:
    """Whether a tensor-table dtype names a quantized GGML block format (a GGUF tensor kept packed)."""
    ggml = GGML_BY_NAME.get(str(dtype))
    return ggml is not None and ggml.quantized


def default_pinned_cap_bytes(ram_total_bytes: int, os_name: str) -> int:
    """Most page-locked RAM to use: 40 % of RAM on Windows (WDDM); elsewhere max(40 %, min(90 %, RAM - 4 GiB)).

    ComfyUI's rule without the swap term (engine notes §1.4, §2, implication 4).
    """
    if os_name.lower().startswith("win"):
        return int(0.4 * ram_total_bytes)
    return int(max(0.4 * ram_total_bytes, min(0.9 * ram_total_bytes, ram_total_bytes - 4 * GIB)))
