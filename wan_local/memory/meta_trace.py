"""The real model code run at real size without memory: a WanDiT forward and a VAE decode on fake tensors.

Fake tensors (torch's FakeTensorMode) are meta tensors that carry a device: every op runs only its shape function,
nothing is materialised, and the device makes the code take the path it takes there. Under
`live_bytes.LiveStorageTracker` this measures a job's working memory at its real size on any machine, in seconds and
a few hundred MB of RAM. It checks the activation formula of memory.bytes (tests/test_live_bytes.py,
benchmarks/bench_activation_meta.py) and the VAE decode estimate of memory.vae_tiling.

DiT: run as the pipeline runs it on CUDA, bf16 weights under bf16 autocast. Torch has no autocast for the meta
device (and `torch.is_autocast_enabled("meta")`, which the model asks, raises), and on a fake CUDA device SDPA
cannot pick a fused kernel and takes its math path ([L, L] scores), so the DiT runs on a fake CPU device under CPU
bf16 autocast. That autocast casts the ops this model leaves to it (Linear, Conv3d, SDPA) to bf16 as CUDA's does;
every other dtype in the forward is explicit in the model. SDPA runs the fused CPU flash kernel, which returns the
output and an fp32 log-sum-exp [B, N, L] as FlashAttention does on CUDA; the kernel's own tiles are not seen.
Data-dependent ops have no value to read on fake tensors: `torch.unique` of the timesteps and the "one timestep for
every token" test are answered from `distinct_timesteps`.

VAE: it runs in float32 with autocast off, on a fake CPU device too (a fake CUDA device needs a CUDA build to
index a tensor); the video, which the pipeline assembles in host RAM, is subtracted from the peak. Its mid-block
attention runs SDPA's fused CPU kernel (no [HW, HW] scores, as CUDA's fused float32 kernel), where the meta-device
estimate of vae_tiling counts the math path's scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from wan_local.errors import InputError
from wan_local.memory.live_bytes import LiveStorageTracker
from wan_local.models.dit import DiTConfig, WanDiT

#: Phase a block enters when its submodule starts (forward pre-hooks); a block starts in "modulate".
DIT_PHASES = {
    "self_attn.q": "self_attn.norm_rope",  # q, k projections, their RMSNorm and RoPE
    "self_attn.k": "self_attn.norm_rope",
    "self_attn.v": "self_attn.kernel",  # v projection and the attention kernel
    "self_attn.o": "self_attn.out",  # o projection and the gated residual add
    "cross_attn": "cross_attn",
    "norm2": "ffn",
}


@dataclass(frozen=True)
class DiTTrace:
    """Live bytes of one traced WanDiT forward at batch 1: inputs included, weights excluded.

    peak_bytes: the forward's peak, with what the caller holds for it (latent, both raw text contexts, y for i2v).
    peak_phase: where: "embed" (before the blocks), "head" (head and unpatchify) or "blocks.<i>.<phase>".
    input_bytes: a block's input residual (block 1's: block 0 takes the bf16 patch embedding).
    persistent_bytes: what lives through the blocks besides their input (live at block 1's entry minus its input):
        the caller's inputs, the padded and embedded text, time tables, RoPE table.
    phase_bytes: per phase of DIT_PHASES (and "modulate"), the most it holds on top of its block's entry, over the
        blocks after the first (the block's modulation tables included).
    block_bytes: the most such a block holds on top of its entry. head_bytes: the head on top of its entry.
    peak_tensors: the storages alive at the peak, largest first.
    """

    tokens: int
    ffn_chunk_tokens: int | None
    peak_bytes: int
    peak_phase: str
    input_bytes: int
    persistent_bytes: int
    phase_bytes: dict[str, int]
    block_bytes: int
    head_bytes: int
    peak_tensors: tuple[str, ...]


class _TimestepAnswers(TorchDispatchMode):
    """Answers WanDiT's data-dependent ops on fake tensors: `torch.unique` of the timesteps gives
    `distinct` values (the inverse index all zeros: only its shape matters), and reading a scalar (the "every token
    has the same timestep" test) says whether there is one distinct timestep."""

    def __init__(self, distinct: int) -> None:
        super().__init__()
        self.distinct = distinct

    def __torch_dispatch__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        if func is torch.ops.aten._unique2.default:
            t = args[0]
            return (
                torch.empty(self.distinct, dtype=t.dtype, device=t.device),
                torch.zeros(t.shape, dtype=torch.long, device=t.device),
                torch.empty(0, dtype=torch.long, device=t.device),
            )
        if func is torch.ops.aten._local_scalar_dense.default:
            return self.distinct == 1
        return func(*args, **(kwargs or {}))


def _fake_params(module: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """`module` with every parameter replaced by a frozen empty one on `device` in `dtype` (values do not matter on
    fake tensors; converting them in place does not work, nor does random init on a fake CUDA device)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
    return module


def _phase_hooks(model: WanDiT, tracker: LiveStorageTracker, entry: dict, inputs: dict) -> list:
    """Forward pre-hooks that set `tracker.phase` to (scope, phase) and record each scope's live bytes at entry
    (`entry`) and each block's input bytes (`inputs`); scopes are "embed", the block index and "head"."""

    def enter(scope, phase: str, block_input: bool = False) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if block_input or scope in ("embed", "head"):
                entry[scope] = tracker.live_bytes()
            if block_input:
                inputs[scope] = args[0].untyped_storage().nbytes()
            tracker.phase = (scope, phase)

        return hook

    hooks = [
        model.register_forward_pre_hook(enter("embed", "embed")),
        model.head.register_forward_pre_hook(enter("head", "head")),
    ]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(enter(i, "modulate", block_input=True)))
        for name, phase in DIT_PHASES.items():
            hooks.append(block.get_submodule(name).register_forward_pre_hook(enter(i, phase)))
    return hooks


def trace_dit_forward(
    cfg: DiTConfig,
    grid: tuple[int, int, int],
    ffn_chunk_tokens: int | None = None,
    *,
    distinct_timesteps: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> DiTTrace:
    """Trace one forward of WanDiT(cfg) over a patch grid (F', H', W') with `dtype` weights under `dtype` autocast.

    ffn_chunk_tokens: every block's `ffn_chunk_tokens`. distinct_timesteps: 1 (t is [1]) or more (per-token
    timesteps [1, L], as TI2V image-to-video: 2). The inputs are made as the pipeline holds them: the float32
    latent, both raw text contexts (cond and uncond, full text_len rows, float32), y for an i2v model; the forward
    gets the cond context as a list (padded inside, as the pipeline's call).
    """
    if distinct_timesteps < 1 or len(grid) != 3 or min(grid) < 1:
        raise InputError(f"grid {grid} must be 3 positive ints and distinct_timesteps={distinct_timesteps} >= 1")
    tokens = grid[0] * grid[1] * grid[2]
    video = tuple(n * p for n, p in zip(grid, cfg.patch_size, strict=True))
    tracker, entry, inputs = LiveStorageTracker(), {}, {}
    with FakeTensorMode():
        model = _fake_params(WanDiT(cfg), "cpu", dtype)
        for block in model.blocks:
            block.ffn_chunk_tokens = ffn_chunk_tokens
        hooks = _phase_hooks(model, tracker, entry, inputs)
        try:
            with torch.no_grad(), tracker, _TimestepAnswers(distinct_timesteps), torch.autocast("cpu", dtype):
                latent = torch.empty(cfg.out_dim, *video)
                t = torch.empty(1) if distinct_timesteps == 1 else torch.empty(1, tokens)
                contexts = [torch.empty(cfg.text_len, cfg.text_dim) for _ in range(2)]
                y = torch.empty(cfg.in_dim - cfg.out_dim, *video) if cfg.model_type == "i2v" else None
                model(latent[None], t, contexts[:1], y=None if y is None else y[None])
        finally:
            for hook in hooks:
                hook.remove()
    steady = 1 if cfg.num_layers > 1 else 0  # block 0 takes the bf16 patch embedding as its input
    phase_bytes: dict[str, int] = {}
    for (scope, phase), peak in tracker.phase_peak_bytes.items():
        if isinstance(scope, int) and scope >= steady:
            phase_bytes[phase] = max(phase_bytes.get(phase, 0), peak - entry[scope])
    scope, phase = tracker.peak_phase
    return DiTTrace(
        tokens=tokens,
        ffn_chunk_tokens=ffn_chunk_tokens,
        peak_bytes=tracker.peak_bytes,
        peak_phase=f"blocks.{scope}.{phase}" if isinstance(scope, int) else phase,
        input_bytes=inputs[steady],
        persistent_bytes=entry[steady] - inputs[steady],
        phase_bytes=phase_bytes,
        block_bytes=max(phase_bytes.values()),
        head_bytes=tracker.phase_peak_bytes[("head", "head")] - entry["head"],
        peak_tensors=tuple(tracker.peak_tensors),
    )


# ------------------------------------------------------------------------------------------------------- VAE


@dataclass(frozen=True)
class VaeTrace:
    """Device bytes of one traced VAE decode, weights and the host-side video excluded: the peak, and the storages
    alive at the peak (largest first)."""

    peak_bytes: int
    peak_tensors: tuple[str, ...]


def trace_vae_decode(kind: str, latent_shape: Sequence[int], tile: int | tuple[int, int] | None = None) -> VaeTrace:
    """Trace the pipeline's decode of a latent [B, z, T, h, w] with the "wan2.1" / "wan2.2" VAE (float32).

    As `WanPipeline.decode`: `tiled_decode` with `tile` (latent positions) and the default overlap, or one tile
    covering the latent when `tile` is None, the video assembled in host RAM (not counted).
    """
    from wan_local.memory import vae_tiling

    model_cls, cfg = vae_tiling.resolve_kind(kind)
    tile = tile or (int(latent_shape[-2]), int(latent_shape[-1]))
    tracker = LiveStorageTracker()
    with FakeTensorMode():
        vae = _fake_params(model_cls(cfg), "cpu", torch.float32).eval()
        latent = torch.empty(*latent_shape)
        with torch.no_grad(), tracker:
            video = vae_tiling.tiled_decode(vae, latent, tile, vae_tiling.default_overlap(tile), "cpu", "cpu")
        # The host video is alive from the start to the end of the decode: without it, the device's peak remains.
        return VaeTrace(tracker.peak_bytes - video.untyped_storage().nbytes(), tuple(tracker.peak_tensors))
