"""3D rotary position embedding of the Wan DiT (official numerics: float64 maths, float32 result).

Shapes: L = F'·H'·W' tokens of the patch grid (token order f, h, w), N heads, D head dim.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0
ROPE_CHUNK_TOKENS = 8192  # bounds the float64 RoPE temporaries (a 14B q at 720p is 3 GB in float64)


def rope_table(grid: tuple[int, int, int], head_dim: int, device: torch.device | str) -> torch.Tensor:
    """3D RoPE multipliers for a patch grid (F', H', W'): complex128 [L, 1, head_dim / 2], token order f,h,w.

    The c = head_dim/2 complex slots (adjacent real pairs) are split c - 2·(c//3), c//3, c//3 over frame,
    height, width (22/21/21 for D = 128); an axis with 2·p real dims uses ω_j = 1 / 10000^(2j / (2p)), and
    positions start at 0.
    """
    c = head_dim // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)
    parts = []
    for axis, (size, p) in enumerate(zip(grid, pairs, strict=True)):
        omega = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * p, 2, dtype=torch.float64, device=device) / (2 * p))
        angles = torch.outer(torch.arange(size, dtype=torch.float64, device=device), omega)  # [size, p]
        shape = [1, 1, 1, p]
        shape[axis] = size
        parts.append(torch.polar(torch.ones_like(angles), angles).view(shape).expand(*grid, p))
    return torch.cat(parts, dim=-1).reshape(-1, 1, c)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, N, D] by `rope_table` output [L, 1, D/2]; float64 maths, float32 result.

    Processed in token chunks so the float64 copies stay small; elementwise, so chunking changes no bits.
    """
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[1], ROPE_CHUNK_TOKENS):
        e = s + ROPE_CHUNK_TOKENS
        xc = torch.view_as_complex(x[:, s:e].to(torch.float64).unflatten(-1, (-1, 2)))  # [B, l, N, D/2]
        out[:, s:e] = torch.view_as_real(xc * rope[s:e]).flatten(-2)
    return out


def apply_rope_(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope` written back into x [B, L, N, D] (float32, or the autocast dtype the attention casts to).

    Each token chunk is copied to float64, rotated in place, rounded to float32 (the reference's RoPE output) and
    then, for a half-precision x, to x's dtype: the same two roundings as apply_rope followed by the attention's
    cast. Only one chunk's float64 copy (and its float32 rounding) exists at a time.
    """
    for s in range(0, x.shape[1], ROPE_CHUNK_TOKENS):
        e = s + ROPE_CHUNK_TOKENS
        xc = torch.view_as_complex(x[:, s:e].to(torch.float64).unflatten(-1, (-1, 2)))  # [B, l, N, D/2]
        xc.mul_(rope[s:e])
        rotated = torch.view_as_real(xc).flatten(-2)
        del xc
        x[:, s:e] = rotated if x.dtype == torch.float32 else rotated.to(torch.float32)
        del rotated
    return x
