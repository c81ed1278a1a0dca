"""Unmasked multi-head attention with the reference's dtype handling.

The official code always runs FlashAttention on bf16 copies of q, k, v and returns the result in q's dtype
(fp32 for self-attention, whose q comes out of the float64 RoPE). We do the same under an enabled autocast
region (cast to the autocast dtype), use flash-attn when it is installed and the tensors allow it, and fall
back to PyTorch SDPA otherwise. Outside autocast nothing is cast, so CPU float32 runs stay float32 end to end.

Wan attention is never masked on a single device (no token padding; cross-attention attends to all
text_len rows on purpose), so no length or mask arguments exist here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


@functools.cache
def _flash_attn_func() -> Callable[..., object] | None:
    """flash_attn_func of FlashAttention-3 or -2 if importable, else None (imported on first CUDA use)."""
    try:
        import flash_attn_interface  # FlashAttention-3 (Hopper)

        logger.info("attention: using FlashAttention-3")
        return flash_attn_interface.flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FlashAttention-2

        logger.info("attention: using FlashAttention-2")
        return flash_attn_func
    except ImportError:
        logger.info("attention: flash-attn not installed, using torch scaled_dot_product_attention")
        return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √D) v per head, unmasked.

    q: [B, Lq, N, D]; k, v: [B, Lk, N, D]. Returns [B, Lq, N, D] in q's dtype at entry (reference behaviour:
    self-attention output stays fp32, cross-attention output follows q). Under an enabled autocast region for
    q's device, q, k, v are first cast to the autocast dtype.
    """
    out_dtype = q.dtype
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    flash = None
    if q.is_cuda and q.dtype in _HALF_DTYPES and k.dtype == v.dtype == q.dtype:
        flash = _flash_attn_func() if q.shape[-1] <= _FLASH_MAX_HEAD_DIM else None
    if flash is not None:
        out = flash(q, k, v)
        if isinstance(out, tuple):  # some FlashAttention-3 releases also return the softmax LSE
            out = out[0]
    else:
        # SDPA wants [B, N, L, D]; the transposes are views.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    return out.to(out_dtype)
