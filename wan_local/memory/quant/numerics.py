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


@functools.lru_cache(maxsize=8)
def _fp8_gemm_kind(device: torch.device) -> str | None:
    """ "rowwise" (sm90+), "tensorwise" (sm89) or None: which torch._scaled_mm scaling the GPU supports."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (9, 0):
        return "rowwise"
    return "tensorwise" if (major, minor) >= (8, 9) else None


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    rowwise: bool,
) -> torch.Tensor:
    """x [..., in] @ (weight · scale)ᵀ + bias with an FP8 GEMM: activations quantized on the fly to float8_e4m3fn.

    rowwise: one activation scale per token and the weight scale per output row. Otherwise one activation scale
    for the whole input, and a per-row weight scale is applied to the output. Accumulation is not "fast" (fp8
    fast accumulation degrades Wan, engine notes §3). weight is float8_e4m3fn [out, in]; in and out must be
    multiples of 16. Returns [..., out] in `out_dtype`.
    """
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    n = weight.shape[0]
    dims = {"dim": 1, "keepdim": True} if rowwise else {}
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dtype=torch.float32, **dims)  # [M, 1] or []
    # The scale is rounded to x's dtype first so that the division and the GEMM use the very same value.
    scale_a = (amax.clamp_min(1e-12) / FP8_MAX).to(x2.dtype).float()
    xq = (x2 / scale_a.to(x2.dtype)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    per_row = scale.dim() > 0
    if rowwise:
        scale_b = scale.float().reshape(1, -1).expand(1, n).contiguous()
    else:
        scale_b = torch.ones((), dtype=torch.float32, device=x.device) if per_row else scale.float().reshape(())
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    out = out[0] if isinstance(out, tuple) else out  # torch 2.4 returned (out, amax)
    if per_row and not rowwise:
        out = out * scale.to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], n)


class QuantLinear(nn.Module):
    """A Linear storing W ≈ weight · scale: weight int8 / float8 [out, in], scale float32 [out] or [] per layer.

    bias [out] stays in a high-precision dtype. forward dequantizes to the compute dtype (the autocast dtype when
    autocast is on for x's device, else x's dtype) and calls F.linear, so output dtypes are those of nn.Linear under
    the same autocast state. compute="scaled_mm" runs float8_e4m3fn layers through torch._scaled_mm on CUDA sm89+
    when the compute dtype is bf16/fp16 and the sizes are multiples of 16; everywhere else it dequantizes.
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
        if self.compute == "scaled_mm" and self._scaled_mm_ok(x, dtype):
            rowwise = _fp8_gemm_kind(x.device) == "rowwise"
            return scaled_mm_linear(x, self.weight, self.scale, self.bias, dtype, rowwise)
        bias = None if self.bias is None else self.bias.to(dtype)
        # Under autocast F.linear casts x to the autocast dtype exactly as it does for nn.Linear.
        return F.linear(x, dequantize(self.weight, self.scale, dtype), bias)

    def _scaled_mm_ok(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (
            self.weight.dtype == torch.float8_e4m3fn
            and dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and _fp8_gemm_kind(x.device) is not None
        )

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
