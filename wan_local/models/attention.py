"""Unmasked multi-head attention with the reference's dtype handling.

The official code always runs FlashAttention on bf16 copies of q, k, v and returns the result in q's dtype
(fp32 for self-attention, whose q comes out of the float64 RoPE). We do the same under an enabled autocast
region (cast to the autocast dtype) with the job's kernel. Outside autocast nothing is cast, so CPU float32 runs
stay float32 end to end.

Wan attention is never masked on a single device (no token padding; cross-attention attends to all
text_len rows on purpose), so no length or mask arguments exist here.

The kernel is the one chosen for the job (`wan_local.kernels.choose_attention`, set with `use_kernel` by the
pipeline for the duration of a job): "sdpa" (PyTorch scaled_dot_product_attention), "flash2" / "flash3"
(FlashAttention-2 / -3) or "sage" (SageAttention, 8-bit, slightly lossy). A call whose tensors the kernel cannot
take (not CUDA, not bf16/fp16, a head dim above the kernel's limit) runs SDPA: the tiny test models on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from wan_local.errors import InputError
from wan_local.kernels import ATTENTION_KERNELS, Choice

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = {"flash2": 256, "flash3": 256, "sage": 128}
_kernel: ContextVar[str] = ContextVar("wan_local_attention_kernel", default="sdpa")


@contextlib.contextmanager
def use_kernel(kernel: str) -> Iterator[None]:
    """Run the enclosed code with attention kernel `kernel` (one of ATTENTION_KERNELS)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    token = _kernel.set(kernel)
    try:
        yield
    finally:
        _kernel.reset(token)


@functools.cache
def kernel_function(kernel: str) -> Callable[..., object]:
    """The attention function of `kernel` ("flash2", "flash3", "sage"), imported on first use; ImportError when
    its package is found but does not import (a wheel built for another torch)."""
    if kernel == "flash3":
        import flash_attn_interface

        return flash_attn_interface.flash_attn_func
    if kernel == "flash2":
        from flash_attn import flash_attn_func

        return flash_attn_func
    if kernel == "sage":
        from sageattention import sageattn

        return functools.partial(sageattn, tensor_layout="NHD", is_causal=False)
    raise ValueError(f"attention kernel {kernel!r} has no function to import")


def load_kernel(choice: Choice, requested: str) -> Choice:
    """`choice` once its package has imported. A package that is found but does not import (a wheel built for
    another torch) gives SDPA when `requested` is "auto" and InputError when that kernel was asked for."""
    if choice.kernel == "sdpa":
        return choice
    try:
        kernel_function(choice.kernel)
    except ImportError as exc:
        if requested == "auto":
            return Choice("sdpa", f"PyTorch SDPA: {choice.kernel} is installed but does not import ({exc})")
        raise InputError(
            f"--attention {requested}: {choice.kernel} is installed but does not import ({exc}); reinstall it with "
            "the setup script or use --attention sdpa"
        ) from exc
    return choice


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

    kernel = _kernel.get()
    if (
        kernel != "sdpa"
        and q.is_cuda
        and q.dtype in _HALF_DTYPES
        and k.dtype == v.dtype == q.dtype
        and q.shape[-1] <= _MAX_HEAD_DIM[kernel]
    ):
        out = kernel_function(kernel)(q, k, v)
        if isinstance(out, tuple):  # some FlashAttention-3 releases also return the softmax LSE
            out = out[0]
    else:
        # SDPA wants [B, N, L, D]; the transposes are views.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    return out.to(out_dtype)
