"""Timestep conditioning of the Wan DiT: the sinusoidal embedding, TI2V per-token timesteps, and the per-timestep
modulation tables applied per token.

The DiT keeps its time conditioning as a table with one row per distinct timestep ([U, C] fp32) plus an index
tensor t_index [B, 1] (one timestep per sample) or [B, L] (per-token timesteps), gathered where it is used, in
token chunks for per-token timesteps. Every op here is elementwise, so the chunking changes no value.
"""

from __future__ import annotations

import torch

from wan_local.errors import InputError

MOD_CHUNK_TOKENS = 4096  # per-token (TI2V) modulation: tokens per gathered [B, n, C] fp32 slice of a table


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding [U] -> [U, dim] float64: [cos(t·ω_k), sin(t·ω_k)], ω_k = 10000^(-k / (dim/2))."""
    half = dim // 2
    omega = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t.to(torch.float64), omega)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def per_token_timesteps(
    mask_latent: torch.Tensor, t: torch.Tensor | float, patch_size: tuple[int, int, int] = (1, 2, 2)
) -> torch.Tensor:
    """TI2V per-token timesteps [1, L] float32 from a latent mask [C, T, H, W] (channel 0 used) or [T, H, W].

    One mask value per patch (the patch's first element, token order f, h, w), times the timestep t: tokens
    whose mask is 0 (the conditioning frame) get timestep 0.
    """
    mask = mask_latent[0] if mask_latent.dim() == 4 else mask_latent
    if mask.dim() != 3:
        raise InputError(f"mask_latent shape {tuple(mask_latent.shape)}: expected [C, T, H, W] or [T, H, W]")
    if any(n % p for n, p in zip(mask.shape, patch_size, strict=True)):
        raise InputError(f"mask_latent grid {tuple(mask.shape)} is not divisible by patch size {patch_size}")
    pt, ph, pw = patch_size
    t = torch.as_tensor(t, dtype=torch.float32, device=mask.device)
    return (mask[::pt, ::ph, ::pw].float() * t).flatten().unsqueeze(0)


def shared_timestep(t: torch.Tensor) -> torch.Tensor | None:
    """t as [B] if every token of each sample has the same timestep (t is [B] or [B, L]), else None."""
    if t.dim() == 1:
        return t
    return t[:, 0] if bool((t == t[:, :1]).all()) else None


def token_rows(t_index: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """t_index [B, 1] (one timestep per sample) or its tokens start:end of [B, L] (per-token timesteps)."""
    return t_index if t_index.shape[1] == 1 else t_index[:, start:end]


def token_spans(t_index: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """Token ranges for gathering modulation rows: all tokens at once for [B, 1], else MOD_CHUNK_TOKENS slices.

    The ops done per range are elementwise, so the split changes no value; it bounds the gathered per-token
    [B, n, C] fp32 tables.
    """
    step = length if t_index.shape[1] == 1 else MOD_CHUNK_TOKENS
    return [(s, min(s + step, length)) for s in range(0, length, max(step, 1))]


def modulate_(x: torch.Tensor, scale1: torch.Tensor, shift: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """x <- x · scale1[t_index] + shift[t_index] in place; x [B, L, C] fp32, scale1 (= 1 + scale), shift [U, C]."""
    for s, e in token_spans(t_index, x.shape[1]):
        rows = token_rows(t_index, s, e)
        x[:, s:e].mul_(scale1[rows]).add_(shift[rows])
    return x


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """x + y · gate[t_index] as a new tensor (x is left alone); x, y [B, L, C], gate [U, C] fp32.

    The product is written straight into the result and x added to it (addition commutes exactly), so no
    product-sized temporary exists besides the result.
    """
    dtype = torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for s, e in token_spans(t_index, x.shape[1]):
        o = out[:, s:e]
        torch.mul(y[:, s:e], gate[token_rows(t_index, s, e)], out=o)
        o.add_(x[:, s:e])
    return out


def add_gated_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """x += y · gate[t_index] in place; x [B, L, C] (owned by the caller), y [B, L, C], gate [U, C] fp32."""
    for s, e in token_spans(t_index, x.shape[1]):
        x[:, s:e] += y[:, s:e] * gate[token_rows(t_index, s, e)]
    return x
