"""Unmasked multi-head attention with the reference's dtype handling.

The official code always runs FlashAttention on bf16 copies of q, k, v and returns the result in q's dtype
(fp32 for self-attention, whose q comes out of the float64 RoPE). We do the same under an enabled autocast
region (cast to the autocast dtype), use flash-attn when it is installed and the tensors allow it, and fall
back to PyTorch SDPA otherwise. Outside autocast nothing is cast, so CPU float32 runs stay float32 end to end.

Wan attention is never masked on a single device (no token padding; cross-attention attends to all
text_len rows on purpose), so no length or mask arguments exist here.

The kernel is chosen per call from the backend in effect (`use_backend`, a context variable the pipeline sets
for the duration of a job): "auto" (flash-attn when installed, else SDPA), "sdpa", "flash" (SDPA with a warning
when flash-attn is missing) or "sage" (SageAttention's quantized kernel when installed; faster, slightly lossy).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
BACKENDS = ("auto", "sdpa", "flash", "sage")
_backend: ContextVar[str] = ContextVar("wan_local_attention_backend", default="auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with attention backend `name` (one of BACKENDS)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


@functools.cache
def _sage_attn_func() -> Callable[..., object] | None:
    """SageAttention's sageattn if importable, else None (logged once)."""
    try:
        from sageattention import sageattn

        logger.info("attention: using SageAttention")
        return sageattn
    except ImportError:
        logger.warning("attention: SageAttention is not installed, using the default kernel")
        return None


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

    backend = _backend.get()
    kernel, sage = None, False
    if backend != "sdpa" and q.is_cuda and q.dtype in _HALF_DTYPES and k.dtype == v.dtype == q.dtype:
        if backend == "sage":
            kernel = _sage_attn_func()
            sage = kernel is not None
        if kernel is None and q.shape[-1] <= _FLASH_MAX_HEAD_DIM:
            kernel = _flash_attn_func()
    if sage:
        out = kernel(q, k, v, tensor_layout="NHD", is_causal=False)
    elif kernel is not None:
        out = kernel(q, k, v)
        if isinstance(out, tuple):  # some FlashAttention-3 releases also return the softmax LSE
            out = out[0]
    else:
        # SDPA wants [B, N, L, D]; the transposes are views.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    return out.to(out_dtype)
