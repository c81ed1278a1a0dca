"""Weight-only int8 / fp8 numerics: which DiT Linears are quantized, how, and the Linear that computes with them.

Which layers: `is_quant_target` (a predicate on module names) picks the q/k/v/o Linears of self- and cross-attention
and the two FFN Linears of every block (`scope="all"`), or the FFN Linears only (`scope="ffn"`: FP8 on attention
hurts long videos, engine notes §3). Embeddings, time/text MLPs, head, norms and modulation stay high precision.
Replace with what: `QuantLinear` (swapped in from outside by `formats.quantize_dit` / `formats.build_quantized_dit`;
the model file knows nothing of it).

Quantization is symmetric, one scale per output row: scale = absmax(row) / qmax with qmax 127 (int8) or 448
(float8_e4m3fn), rounded UP to a bfloat16-representable float32 so that (a) |w / scale| <= qmax still holds and
(b) bf16 dequantization, q.to(bf16) * scale.to(bf16), rounds once (int8 and e4m3 values are exact in bf16).
int8: q = clamp(round_half_to_even(w / scale), -127, 127) (-128 is unused, keeping the range symmetric).
fp8: q = clamp(w / scale, -448, 448) cast to float8_e4m3fn (round to nearest even). All-zero rows get scale 1.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wan_local.errors import CheckpointError, InputError
from wan_local.kernels import current_platform, fp8_gemm_kind
from wan_local.memory.options import QUANT_COMPUTE, QUANT_SCOPES

MODES = ("int8", "fp8")
COMPUTE_MODES = QUANT_COMPUTE
QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANT_DTYPES = frozenset({torch.int8, torch.float8_e4m3fn, torch.float8_e5m2})
FP8_MAX = 448.0
_CHUNK_ELEMENTS = 1 << 24  # rows quantized per step: bounds the float32 temporaries to ~64 MB per layer

_BLOCK_LINEARS = {
    "all": {f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"} | {"ffn.0", "ffn.2"},
    "ffn": {"ffn.0", "ffn.2"},
}
_BLOCK_NAME = re.compile(r"^blocks\.\d+\.(.+)$")


def check_mode(mode: str, scope: str = "all") -> None:
    """Raise InputError unless mode is "int8"/"fp8" and scope is "all"/"ffn"."""
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    if scope not in QUANT_SCOPES:
        raise InputError(f"quantization scope {scope!r} is not one of {', '.join(QUANT_SCOPES)}")


def is_quant_target(name: str, scope: str = "all") -> bool:
    """True for a module name `blocks.<i>.<linear>` whose Linear `scope` stores quantized.

    "all": self_attn/cross_attn q, k, v, o and ffn.0, ffn.2; "ffn": ffn.0 and ffn.2. Everything else (embeddings,
    time/text MLPs, head, norms, modulation) is never a target.
    """
    match = _BLOCK_NAME.match(name)
    return match is not None and match.group(1) in _BLOCK_LINEARS[scope]


# ------------------------------------------------------------------------------------------------ quantizing


def _ceil_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16-representable float32 >= x, for positive finite float32 x (low 16 bits rounded up)."""
    return ((x.view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)


def quantize_weight(weight: torch.Tensor, mode: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] int8 / float8_e4m3fn, scale float32 [out]) with weight ≈ q · scale[:, None] (module doc).

    Works on any device, meta included (no data-dependent checks there). The source is never modified; float32
    temporaries are bounded to ~64 MB by quantizing row chunks.
    """
    check_mode(mode)
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: only 2-D Linear weights are quantized, got shape {tuple(weight.shape)}")
    qmax = QMAX[mode]
    lo, hi = torch.aminmax(weight, dim=1)
    absmax = torch.maximum(-lo.float(), hi.float())  # [out]
    if not weight.is_meta and not bool(torch.isfinite(absmax).all()):
        raise CheckpointError(f"{name} holds inf or NaN values; the checkpoint is damaged")
    scale = torch.where(absmax > 0, _ceil_to_bf16(absmax / qmax), torch.ones_like(absmax))
    q = torch.empty(weight.shape, dtype=STORAGE_DTYPE[mode], device=weight.device)
    if weight.is_meta:
        return q, scale  # shapes and dtypes only (meta ops run through slow Python references)
    rows = max(1, min(weight.shape[0], _CHUNK_ELEMENTS // max(1, weight.shape[1])))
    buf = torch.empty(rows, weight.shape[1], dtype=torch.float32, device=weight.device)  # reused: no page faults
    for start in range(0, weight.shape[0], rows):
        part = buf[: min(rows, weight.shape[0] - start)]
        torch.div(weight[start : start + rows], scale[start : start + rows, None], out=part)  # float32 w / s
        if mode == "int8":
            part.round_()
        q[start : start + rows].copy_(part.clamp_(-qmax, qmax))  # exact for int8 (already integral); fp8 rounds
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight · scale as `dtype` [out, in]; scale is [] (per layer) or [out] (per row).

    bf16 / fp32: cast then multiply in `dtype` (one rounding for our bf16-exact scales); other dtypes go through
    float32 (a float16 scale could underflow).
    """
    s = scale.reshape(-1, 1) if scale.dim() else scale
    if dtype in (torch.bfloat16, torch.float32):
        return weight.to(dtype, copy=True).mul_(s.to(dtype))
    return (weight.to(torch.float32) * s.float()).to(dtype)


# --------------------------------------------------------------------------------------------- QuantLinear


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_EPILOGUE_BYTES = 1 << 28  # tensor-wise path: fp32 accumulator rows per step (bounded to 256 MiB)


@functools.lru_cache(maxsize=16)
def fp8_gemm(device: torch.device, dtype: torch.dtype) -> str:
    """ "rowwise", "tensorwise" or "dequant": how FP8 weights multiply on `device` at compute `dtype` (the pure
    `wan_local.kernels.fp8_gemm_kind` of this device's capability, this torch and this platform)."""
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    name = _DTYPE_NAMES.get(dtype, "fp32")
    return fp8_gemm_kind(capability, torch.__version__, current_platform(), name).kernel


@functools.lru_cache(maxsize=16)
def _ones(device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ones, made once per device and shape (unit scales for torch._scaled_mm)."""
    return torch.ones(shape, dtype=torch.float32, device=device)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [M, K], float32 [M, 1]) with x ≈ q · scale, one scale per row (token).

    The scale is absmax / 448 rounded to x's dtype (at least its smallest normal, so fp16 never divides by zero),
    so that the division runs in x's dtype (no float32 copy of x) and the GEMM uses the very value divided by.
    """
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    scale = (amax / FP8_MAX).clamp_min_(torch.finfo(x.dtype).tiny).to(x.dtype)
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()  # row-major for _scaled_mm
    return q, scale.float()


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    gemm: str,
) -> torch.Tensor:
    """x [..., in] @ (weight · scale)ᵀ + bias with an FP8 GEMM; returns [..., out] in `dtype` (bf16 / fp16).

    x is cast to `dtype` (as F.linear under autocast does) and quantized on the fly to float8_e4m3fn with one
    scale per token. weight is float8_e4m3fn [out, in] (in and out multiples of 16), scale float32 [out] or [].
    gemm "rowwise": torch._scaled_mm applies the token and weight-row scales and the bias in its fp32 epilogue.
    gemm "tensorwise" (GPUs and torch builds without row-wise scales): torch._scaled_mm with unit scales
    accumulates in fp32; the token and row scales and the bias are applied to that fp32 result, a bounded number
    of tokens at a time. Either way the result is rounded to `dtype` once. Accumulation is not "fast" (fp8 fast
    accumulation degrades Wan, engine notes §3).
    """
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # [M, in]
    m, n = x2.shape[0], weight.shape[0]
    w = weight.t()  # [in, out], column-major as _scaled_mm wants it
    b = None if bias is None else bias.to(dtype)  # rounded as nn.Linear's bias is under autocast
    if gemm == "rowwise":
        xq, scale_a = _quantize_rows(x2)
        if scale.dim():
            scale_b = scale.reshape(1, n)
        else:
            scale_a, scale_b = scale_a * scale, _ones(x.device, (1, n))
        out = torch._scaled_mm(xq, w, scale_a=scale_a, scale_b=scale_b, bias=b, out_dtype=dtype)
        out = out[0] if isinstance(out, tuple) else out  # torch 2.4 returned (out, amax)
        return out.reshape(*x.shape[:-1], n)
    if gemm != "tensorwise":
        raise ValueError(f"gemm {gemm!r} is not rowwise or tensorwise")
    unit = _ones(x.device, ())
    out = torch.empty(m, n, dtype=dtype, device=x.device)
    rows = max(16, _EPILOGUE_BYTES // (4 * n))
    for start in range(0, m, rows):
        xq, scale_a = _quantize_rows(x2[start : start + rows])
        acc = torch._scaled_mm(xq, w, scale_a=unit, scale_b=unit, out_dtype=torch.float32)
        acc = acc[0] if isinstance(acc, tuple) else acc
        acc.mul_(scale_a).mul_(scale)  # per token, per output row (or per layer)
        if b is not None:
            acc.add_(b)
        out[start : start + rows].copy_(acc)
    return out.reshape(*x.shape[:-1], n)


class QuantLinear(nn.Module):
    """A Linear storing W ≈ weight · scale: weight int8 / float8 [out, in], scale float32 [out] or [] per layer.

    bias [out] stays in a high-precision dtype. forward dequantizes to the compute dtype (the autocast dtype when
    autocast is on for x's device, else x's dtype) and calls F.linear, so output dtypes are those of nn.Linear under
    the same autocast state. compute="scaled_mm" runs float8_e4m3fn layers with sizes that are multiples of 16
    through `scaled_mm_linear` wherever `fp8_gemm` finds an FP8 GEMM (CUDA sm89+, bf16/fp16 compute); everywhere
    else (the CPU) it dequantizes, bit for bit as compute="dequant". A job asking for scaled_mm where no FP8 GEMM
    exists is refused before it loads (`wan_local.kernels.choose_fp8_gemm`).
    State-dict keys: `weight`, `scale`, `bias`. `.to(dtype)` / `.half()` move the storage but keep its dtypes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_dtype: torch.dtype = torch.int8,
        per_channel: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        compute: str = "dequant",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if weight_dtype not in QUANT_DTYPES:
            raise InputError(f"QuantLinear weight dtype {weight_dtype} is not one of {sorted(map(str, QUANT_DTYPES))}")
        if compute not in COMPUTE_MODES:
            raise InputError(f"compute={compute!r} is not one of {', '.join(COMPUTE_MODES)}")
        self.in_features, self.out_features, self.compute = in_features, out_features, compute
        empty = functools.partial(torch.empty, device=device)
        self.weight = nn.Parameter(empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        scale_shape = (out_features,) if per_channel else ()
        self.scale = nn.Parameter(empty(scale_shape, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, compute: str = "dequant", name: str = "linear") -> QuantLinear:
        """Quantize `linear` per output row (`quantize_weight`); the bias tensor is reused as it is."""
        q, scale = quantize_weight(linear.weight.detach(), mode, f"{name}.weight")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_dtype=q.dtype,
            bias_dtype=linear.weight.dtype if linear.bias is None else linear.bias.dtype,
            compute=compute,
            device="meta",
        )
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if self.compute == "scaled_mm" and self._fp8_sizes_ok():
            gemm = fp8_gemm(x.device, dtype)
            if gemm != "dequant":
                return scaled_mm_linear(x, self.weight, self.scale, self.bias, dtype, gemm)
        bias = None if self.bias is None else self.bias.to(dtype)
        # Under autocast F.linear casts x to the autocast dtype exactly as it does for nn.Linear.
        return F.linear(x, dequantize(self.weight, self.scale, dtype), bias)

    def _fp8_sizes_ok(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn and self.in_features % 16 == 0 and self.out_features % 16 == 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # Module.to(dtype), .half(), .float() convert every floating tensor, float8 weights and the float32 scale
        # included, which would silently undo the quantization: for those two only the device change is applied.
        stored = (self.weight, self.scale)

        def keep_storage_dtype(t: torch.Tensor) -> torch.Tensor:
            if any(t is s for s in stored):
                probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
                if probe.dtype != t.dtype:
                    return t.detach().to(device=probe.device)
            return fn(t)

        return super()._apply(keep_storage_dtype, recurse)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.weight.dtype:
            # copy_ would convert int8 codes into float8 values (or back) without complaint.
            error_msgs.append(f"{prefix}weight is {weight.dtype}; this QuantLinear stores {self.weight.dtype}")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        per = "row" if self.scale.dim() else "layer"
        return f"{self.in_features}, {self.out_features}, {self.weight.dtype}, scale per {per}, {self.compute}"
