"""Weight-only int8 / fp8 storage for the DiT blocks' Linears, attached from outside the model.

Which layers: `is_quant_target` (a predicate on module names) picks the q/k/v/o Linears of self- and cross-attention
and the two FFN Linears of every block (`scope="all"`), or the FFN Linears only (`scope="ffn"`: FP8 on attention
hurts long videos, engine notes §3). Embeddings, time/text MLPs, head, norms and modulation stay high precision.
Replace with what: `QuantLinear`, swapped in through the parent's setattr. The model file knows nothing of it.

Quantization is symmetric, one scale per output row: scale = absmax(row) / qmax with qmax 127 (int8) or 448
(float8_e4m3fn), rounded UP to a bfloat16-representable float32 so that (a) |w / scale| <= qmax still holds and
(b) bf16 dequantization, q.to(bf16) * scale.to(bf16), rounds once (int8 and e4m3 values are exact in bf16).
int8: q = clamp(round_half_to_even(w / scale), -127, 127) (-128 is unused, keeping the range symmetric).
fp8: q = clamp(w / scale, -448, 448) cast to float8_e4m3fn (round to nearest even). All-zero rows get scale 1.

Formats read without a detour through bf16: high-precision state dicts (quantized layer by layer), ComfyUI
"fp8_scaled" (fp8 weight + one float32 scale per layer, fact sheet §3.3; kept as they are) and optimum-quanto
qint8 / qfloat8 files (`<layer>.weight._data` + `<layer>.weight._scale` [out, 1]; WanGP stores its map in the
safetensors metadata). `QuantCache` keeps what on-the-fly quantization produced on disk for the next start.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wan_local.errors import CheckpointError, InputError
from wan_local.memory.options import QUANT_COMPUTE, QUANT_SCOPES
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights import fp8, keymaps
from wan_local.weights.files import StateDict, read_safetensors, read_safetensors_metadata, read_state_dict
from wan_local.weights.loading import assign_checked, dit_config_from_state_dict, read_dit

log = logging.getLogger(__name__)

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


def quantize_dit(
    model: WanDiT,
    mode: str,
    scope: str = "all",
    *,
    compute: str = "dequant",
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> WanDiT:
    """Replace the chosen block Linears of `model` by QuantLinear in place (parent setattr) and return it.

    `predicate(name, module)` decides; the default picks nn.Linear modules for which `is_quant_target(name,
    scope)` holds. Works on the meta device (for byte planning) and on any real device.
    """
    check_mode(mode, scope)
    chosen = predicate or (lambda name, module: isinstance(module, nn.Linear) and is_quant_target(name, scope))
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and chosen(name, m)]
    start = time.perf_counter()
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear.from_linear(linear, mode, compute, name))
    log.info("quantized %d Linears to %s (scope %s) in %.2f s", len(targets), mode, scope, time.perf_counter() - start)
    return model


# --------------------------------------------------------------------------------------- state-dict formats


def quantized_state_dict(sd: Mapping[str, torch.Tensor], mode: str, scope: str = "all") -> StateDict:
    """Official-named high-precision state dict -> ours: target `<layer>.weight` quantized, `<layer>.scale` added.

    Layer by layer: every other tensor is passed through untouched (memory-mapped tensors stay unread), so peak
    RAM is the quantized weights plus one layer's float32 temporaries.
    """
    check_mode(mode, scope)
    out: StateDict = {}
    for key, value in sd.items():
        layer, _, leaf = key.rpartition(".")
        if value.dtype in QUANT_DTYPES or leaf == "scale" or key.endswith(fp8.SCALE_SUFFIXES):
            raise CheckpointError(f"{key} is already quantized ({value.dtype}); load the file as it is instead")
        if leaf == "weight" and is_quant_target(layer, scope):
            out[key], out[f"{layer}.scale"] = quantize_weight(value, mode, key)
        else:
            out[key] = value
    return out


def _as_scale(scale: torch.Tensor | None, rows: int, key: str) -> torch.Tensor:
    """A file's weight scale as float32 [] (per layer) or [rows] (per row)."""
    if scale is None:
        return torch.ones((), dtype=torch.float32)
    if scale.numel() == 1:
        return scale.float().reshape(())
    if scale.numel() == rows:
        return scale.float().reshape(rows)
    raise CheckpointError(f"{key}: a scale of shape {tuple(scale.shape)} fits neither one layer nor {rows} rows")


def _keep_or_dequantize(out: StateDict, layer: str, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Keep a quantized block Linear as weight + scale; dequantize anything else (it must stay high precision)."""
    if is_quant_target(layer, "all") and weight.dtype in QUANT_DTYPES:
        out[f"{layer}.weight"], out[f"{layer}.scale"] = weight, scale
    else:
        out[f"{layer}.weight"] = dequantize(weight, scale, torch.float32)


def scaled_fp8_state_dict(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> StateDict:
    """ComfyUI / diffusers scaled-fp8 state dict (official names) -> ours, fp8 weights kept as they are.

    `.scale_weight` / `.weight_scale` become `.scale` (float32, per layer or per row); the `scaled_fp8` marker,
    activation scales and `.comfy_quant` blobs are dropped; an fp8 weight without a scale gets scale 1. fp8 tensors
    outside the block Linears are dequantized to float32.
    """
    scales = {k.rsplit(".", 1)[0]: v for k, v in sd.items() if k.endswith(fp8.SCALE_SUFFIXES)}
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith((fp8.MARKER, *fp8.DROPPED_SUFFIXES, *fp8.SCALE_SUFFIXES)):
            continue
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and (value.dtype in fp8.FP8_DTYPES or layer in scales):
            _keep_or_dequantize(out, layer, value, _as_scale(scales.pop(layer, None), value.shape[0], key))
        else:
            out[key] = value
    if scales:
        raise CheckpointError(f"{source}: weight scales without a weight: {', '.join(sorted(scales)[:5])}")
    return out


QUANTO_DATA, QUANTO_SCALE = ".weight._data", ".weight._scale"
_QUANTO_QTYPES = {"qint8", "qfloat8", "qfloat8_e4m3fn", "qfloat8_e5m2"}


def is_quanto_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict holds optimum-quanto serialized weights (`<layer>.weight._data`)."""
    return any(k.endswith(QUANTO_DATA) for k in sd)


def quanto_state_dict(
    sd: Mapping[str, torch.Tensor], qmap: Mapping[str, Any] | None = None, source: str = "checkpoint"
) -> StateDict:
    """optimum-quanto qint8 / qfloat8 weights -> ours (block Linears kept quantized, others dequantized).

    quanto writes `<layer>.weight._data` (int8 or float8 [out, in]), `<layer>.weight._scale` ([out, 1] in the
    model dtype) and the activation scales `<layer>.input_scale` / `.output_scale` (dropped: only weight-only
    quantization is accepted). `qmap` (layer -> {"weights": qtype, "activations": qtype}) is checked if given.
    4-/2-bit quanto weights (packed uint8 data with a `._shift`) are refused.
    """
    for layer, entry in (qmap or {}).items():
        if entry.get("weights", "none") not in _QUANTO_QTYPES | {"none"} or entry.get("activations", "none") != "none":
            raise CheckpointError(
                f"{source}: layer {layer} uses quanto {entry}; only weight-only qint8 / qfloat8 files are supported"
            )
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith((QUANTO_SCALE, ".input_scale", ".output_scale")):
            continue
        if key.endswith(".weight._shift") or (key.endswith(QUANTO_DATA) and value.dtype not in QUANT_DTYPES):
            raise CheckpointError(f"{source}: {key} is a 4-/2-bit quanto weight; only qint8 / qfloat8 are supported")
        if key.endswith(QUANTO_DATA):
            layer = key[: -len(QUANTO_DATA)]
            scale = sd.get(layer + QUANTO_SCALE)
            if scale is None:
                raise CheckpointError(f"{source}: {key} has no {layer + QUANTO_SCALE}")
            _keep_or_dequantize(out, layer, value, _as_scale(scale, value.shape[0], key))
        else:
            out[key] = value
    return out


def read_quanto_map(path: Path) -> dict[str, Any] | None:
    """The quanto layer map of a file: safetensors metadata ("quantization_map", plain or `_base64` JSON, as WanGP
    writes it) or a `<stem>_map.json` / `quanto_qmap.json` beside it. None when there is none."""
    path = Path(path)
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    try:
        if "quantization_map_base64" in meta:
            return json.loads(base64.b64decode(meta["quantization_map_base64"]))
        if "quantization_map" in meta:
            return json.loads(meta["quantization_map"])
        for side in (path.with_name(path.stem + "_map.json"), path.with_name("quanto_qmap.json")):
            if side.is_file():
                return json.loads(side.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable quanto quantization map ({exc})") from exc
    return None


def as_quantized_state_dict(
    sd: Mapping[str, torch.Tensor], mode: str, scope: str = "all", source: str = "checkpoint"
) -> StateDict:
    """Our quantized state dict from any official-named DiT state dict.

    quanto and scaled-fp8 contents are converted as stored (their format wins over `mode` / `scope`), ours
    (`<layer>.scale` keys) passes through, anything else is high precision and quantized per `mode` / `scope`.
    """
    if any(k.endswith(".scale") for k in sd):
        return dict(sd)
    if is_quanto_checkpoint(sd):
        qsd = quanto_state_dict(sd, source=source)
    elif fp8.is_fp8_checkpoint(sd):
        qsd = scaled_fp8_state_dict(sd, source)
    else:
        return quantized_state_dict(sd, mode, scope)
    kept = sorted({str(v.dtype) for k, v in qsd.items() if k.endswith(".weight") and v.dtype in QUANT_DTYPES})
    log.info("%s is pre-quantized (%s): kept as stored instead of %s / %s", source, ", ".join(kept), mode, scope)
    return qsd


# ------------------------------------------------------------------------------------------------- building


def _quant_layers(qsd: Mapping[str, torch.Tensor], source: str) -> dict[str, tuple[torch.dtype, bool]]:
    """layer -> (weight dtype, per-row scale) for every `<layer>.scale` of a quantized state dict."""
    layers = {}
    for key, scale in qsd.items():
        if not key.endswith(".scale"):
            continue
        layer = key[: -len(".scale")]
        weight = qsd.get(f"{layer}.weight")
        if weight is None or weight.dtype not in QUANT_DTYPES or not is_quant_target(layer, "all"):
            raise CheckpointError(f"{source}: {key} does not belong to a quantized block Linear weight")
        if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != weight.shape[0]):
            raise CheckpointError(f"{source}: {key} has shape {tuple(scale.shape)} for a weight {tuple(weight.shape)}")
        layers[layer] = (weight.dtype, scale.dim() == 1)
    return layers


def build_quantized_dit(
    cfg: DiTConfig,
    sd: Mapping[str, torch.Tensor],
    mode: str,
    scope: str = "all",
    dtype: torch.dtype = torch.bfloat16,
    *,
    compute: str = "dequant",
    source: str = "checkpoint",
) -> WanDiT:
    """WanDiT built on meta with QuantLinear in place of the quantized layers, then assigned from `sd`.

    `sd` uses official names and may be high precision (quantized here, layer by layer), ours, ComfyUI scaled-fp8
    or quanto. High-precision tensors become `dtype`; quantized weights and float32 scales keep their dtypes. Keys
    and shapes are checked strictly (CheckpointError listing the differences).
    """
    check_mode(mode, scope)
    qsd = as_quantized_state_dict(sd, mode, scope, source)
    layers = _quant_layers(qsd, source)

    def skeleton() -> WanDiT:
        model = WanDiT(cfg)  # runs under the meta device (assign_checked)
        for name, (weight_dtype, per_row) in layers.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{source}: {name} is quantized but is not a Linear of this model")
            parent, _, child = name.rpartition(".")
            layer = QuantLinear(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                weight_dtype=weight_dtype,
                per_channel=per_row,
                bias_dtype=dtype,
                compute=compute,
            )
            setattr(model.get_submodule(parent), child, layer)
        return model

    stored = {f"{layer}.{leaf}" for layer in layers for leaf in ("weight", "scale")}
    converted = {k: v if k in stored or not v.is_floating_point() else v.to(dtype) for k, v in qsd.items()}
    return assign_checked(skeleton, converted, source, None)


def _read_single_file(path: Path) -> tuple[DiTConfig, StateDict, str]:
    """(config, official-named state dict with quantized tensors as stored, format) of a one-file DiT."""
    sd = keymaps.strip_prefix(read_state_dict(path))
    meta = read_safetensors_metadata(path)
    hints: dict[str, Any] = {}
    with contextlib.suppress(ValueError):  # a foreign or broken config blob only loses the hints
        hints = json.loads(meta["config"]) if "config" in meta else {}
        hints = json.loads(base64.b64decode(meta["config_base64"])) if "config_base64" in meta else hints
    if "condition_embedder.time_proj.weight" in sd or "condition_embedder.time_proj.weight._data" in sd:
        sd = keymaps.dit_diffusers_to_official(sd)
    fmt = "comfyui"
    if is_quanto_checkpoint(sd):
        sd, fmt = quanto_state_dict(sd, read_quanto_map(path), str(path)), "quanto"
    elif fp8.is_fp8_checkpoint(sd):
        sd, fmt = scaled_fp8_state_dict(sd, str(path)), "comfyui-fp8"
    if "patch_embedding.weight" not in sd:
        raise CheckpointError(f"{path} is not a Wan DiT file (it has no patch_embedding.weight)")
    return dit_config_from_state_dict(sd, hints if isinstance(hints, dict) else {}), sd, fmt


def source_files(path: Path) -> list[Path]:
    """The files a DiT checkpoint consists of (what a cache key must cover): the file, or a folder's
    safetensors shards and json files."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return [path]


def load_quantized_dit(
    path: Path,
    mode: str,
    scope: str = "all",
    dtype: torch.dtype = torch.bfloat16,
    *,
    cache: QuantCache | None = None,
    expected_model_type: str | None = None,
    compute: str = "dequant",
) -> WanDiT:
    """Load a DiT with quantized block Linears, never materializing it in bf16.

    Folders (official / diffusers) and high-precision single files are quantized layer by layer, through `cache`
    when given (the second start reads the quantized file). ComfyUI fp8_scaled and quanto files are used as
    stored (their format wins over mode/scope). Raises CheckpointError like `load_dit`.
    """
    check_mode(mode, scope)
    path = Path(path)
    if cache is not None and path.is_dir():
        # Cache hit: the config comes from config.json and headers; the source weights are never opened (reading
        # an fp32 A14B expert's 57 GB just to find the cached int8 copy would dominate every start).
        cached = cache.load(source_files(path), mode, scope)
        if cached is not None:
            from wan_local.weights.headers import read_dit_config

            cfg = read_dit_config(path)
            if expected_model_type is not None and cfg.model_type != expected_model_type:
                raise CheckpointError(
                    f"{path} holds a {cfg.model_type!r} model but this task needs {expected_model_type!r}"
                )
            log.info("loading cached %s weights of %s (scope %s)", mode, path, scope)
            return build_quantized_dit(cfg, cached, mode, scope, dtype, compute=compute, source=str(path))
    try:
        if path.is_file() and path.suffix == ".safetensors":
            cfg, raw, fmt = _read_single_file(path)
        else:
            cfg, raw, fmt = read_dit(path, dtype)  # folders hold plain weights: nothing is dequantized
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing tensor or config field {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model configuration ({exc})") from exc
    if expected_model_type is not None and cfg.model_type != expected_model_type:
        raise CheckpointError(f"{path} holds a {cfg.model_type!r} model but this task needs {expected_model_type!r}")
    sd = raw
    if cache is not None and fmt not in ("comfyui-fp8", "quanto"):  # pre-quantized files load as fast as a cache
        sd = cache.get_or_create(source_files(path), mode, scope, lambda: quantized_state_dict(raw, mode, scope))
    log.info("loading %s DiT from %s with %s weights (scope %s)", fmt, path, mode, scope)
    return build_quantized_dit(cfg, sd, mode, scope, dtype, compute=compute, source=str(path))


# ---------------------------------------------------------------------------------------------------- cache

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file one tensor at a time (RAM stays flat: no serialized copy of the whole dict), and
    fsync it. Key order is sorted; the header is space-padded to 8 bytes as the format allows."""
    keys = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in keys:
        t = tensors[key]
        if t.dtype not in _ST_DTYPES:
            raise InputError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in keys:
            t = tensors[key].detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data)  # zero-copy view of a CPU tensor's bytes
        f.flush()
        os.fsync(f.fileno())


class QuantCache:
    """Quantized DiT state dicts on disk, keyed by their source files, so a later start skips quantization.

    key = sha256 of (resolved source paths, sizes, mtimes; mode; scope; FORMAT_VERSION). A file is written to a
    temporary name and renamed into place (atomic); older versions for the same sources are then removed. On load,
    a file whose header, size, metadata or scales do not check out is deleted and None returned (the caller
    rebuilds). The tensor bytes themselves are not hashed (that would read the whole file at every start).
    """

    FORMAT_VERSION = 1

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _ident(self, sources: Sequence[Path], mode: str, scope: str, with_stat: bool) -> str:
        files = []
        for p in sorted(Path(s).resolve() for s in sources):
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns] if with_stat else [str(p)])
        blob = json.dumps({"v": self.FORMAT_VERSION, "mode": mode, "scope": scope, "files": files})
        return hashlib.sha256(blob.encode()).hexdigest()

    def key(self, sources: Sequence[Path], mode: str, scope: str) -> str:
        """The cache key of a source set (64 hex digits)."""
        return self._ident(sources, mode, scope, with_stat=True)

    def path(self, sources: Sequence[Path], mode: str, scope: str) -> Path:
        """Where the entry for these sources lives: `dit-<mode>-<scope>-<sources id>-<key>.safetensors`."""
        group = self._ident(sources, mode, scope, with_stat=False)[:12]
        return self.cache_dir / f"dit-{mode}-{scope}-{group}-{self.key(sources, mode, scope)[:16]}.safetensors"

    def load(self, sources: Sequence[Path], mode: str, scope: str) -> StateDict | None:
        """The cached state dict (memory-mapped), or None when absent or found broken (then it is deleted)."""
        path = self.path(sources, mode, scope)
        if not path.is_file():
            return None
        try:
            meta = read_safetensors_metadata(path)
            if meta.get("wan_local.key") != self.key(sources, mode, scope):
                raise CheckpointError(f"metadata does not match (format {meta.get('wan_local.format')!r})")
            sd = read_safetensors(path)
            if len(sd) != int(meta.get("wan_local.tensors", -1)):
                raise CheckpointError(f"{len(sd)} tensors instead of {meta.get('wan_local.tensors')}")
            _quant_layers(sd, str(path))
            scales = [v for k, v in sd.items() if k.endswith(".scale")]
            if not all(bool(torch.isfinite(s).all()) and bool((s > 0).all()) for s in scales):
                raise CheckpointError("a scale is not finite and positive")
        except (CheckpointError, ValueError) as exc:
            log.warning("quantization cache %s is damaged (%s); deleting it and quantizing again", path, exc)
            sd = None  # drop the memory maps before deleting (Windows cannot delete a mapped file)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as unlink_error:
                log.warning("cannot delete %s (%s)", path, unlink_error)
            return None
        log.info("loaded quantized weights from cache %s", path)
        return sd

    def store(self, sources: Sequence[Path], mode: str, scope: str, sd: Mapping[str, torch.Tensor]) -> Path | None:
        """Write `sd` atomically; returns the path, or None (logged) when the disk is full or not writable."""
        path = self.path(sources, mode, scope)
        size = sum(t.numel() * t.element_size() for t in sd.values())
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        meta = {"wan_local.key": self.key(sources, mode, scope), "wan_local.tensors": str(len(sd))}
        meta.update({"wan_local.format": str(self.FORMAT_VERSION), "wan_local.mode": mode, "wan_local.scope": scope})
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.cache_dir).free < size + (256 << 20):
                raise OSError(f"needs {size / 2**30:.1f} GiB free")
            write_safetensors(tmp, sd, meta)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write quantization cache %s (%s); the next start quantizes again", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        for old in self.cache_dir.glob(path.name.rsplit("-", 1)[0] + "-*.safetensors"):
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()  # an older key of the same sources (file changed since)
        log.info("stored quantized weights (%.2f GiB) in %s", size / 2**30, path)
        return path

    def get_or_create(
        self, sources: Sequence[Path], mode: str, scope: str, build: Callable[[], StateDict]
    ) -> StateDict:
        """The cached state dict, or `build()` stored for next time and read back from the cache file.

        The first start computes with the very tensors later starts read (the memory-mapped cache file), not with
        the in-memory result: a GEMM's bits depend on where its weights lie in memory (the kernel picks its code
        path by alignment), so a first start computing from other addresses would differ from every later one.
        Reading back also frees the quantized copy in anonymous memory (the mapped pages are reclaimable).
        """
        cached = self.load(sources, mode, scope)
        if cached is not None:
            return cached
        sd = build()
        if self.store(sources, mode, scope, sd) is None:
            return sd  # disk full or read-only: this start computes from memory (logged by store)
        stored = self.load(sources, mode, scope)
        return sd if stored is None else stored
