"""ComfyUI / diffusers "scaled fp8" weights: W = float(W_fp8) x scale (fact sheet §3.3).

One reader for every model: a per-layer scale (`.scale_weight`, legacy ComfyUI; `.weight_scale`, newer ComfyUI and
diffusers), a 0-dim / one-element scale or one value per output row; a `scaled_fp8` marker (under the weights'
prefix) and activation scales are dropped. Newer ComfyUI marks each quantised layer with `<layer>.comfy_quant`, the
uint8 bytes of a JSON object such as `{"format": "float8_e4m3fn"}`: the format is checked (only float8 formats are
scaled fp8) and the blob dropped. fp8 weights without a scale are plain casts (scale 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from wan_local.errors import CheckpointError

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
COMFY_QUANT = ".comfy_quant"
DROPPED_SUFFIXES = (".scale_input", ".input_scale", COMFY_QUANT)
MARKER = "scaled_fp8"
#: `.comfy_quant` formats that are a float8 weight times a scale (what this module reads).
FP8_FORMATS = frozenset({"float8_e4m3fn", "float8_e5m2"})
FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def is_fp8_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when any tensor is float8 or a marker / weight scale is present."""
    return any(k.endswith(MARKER) or k.endswith(SCALE_SUFFIXES) or v.dtype in FP8_DTYPES for k, v in sd.items())


def check_comfy_quant(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless every `.comfy_quant` blob of `sd` is JSON naming a float8 format."""
    for key, blob in sd.items():
        if not key.endswith(COMFY_QUANT):
            continue
        try:
            conf = json.loads(blob.contiguous().numpy().tobytes().decode("utf-8"))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: {key} is not a ComfyUI quantization blob (JSON bytes): {exc}") from exc
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FP8_FORMATS:
            raise CheckpointError(
                f"{source}: {key} says the layer is stored as {fmt!r}; only scaled float8 "
                f"({', '.join(sorted(FP8_FORMATS))}) is supported: use the fp16 or fp8_scaled file instead"
            )


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, key: str) -> torch.Tensor:
    """float(weight) x scale computed in float32, stored in `dtype`; scale per layer or per output row."""
    w = weight.to(torch.float32)
    if scale is not None:
        s = scale.to(torch.float32)
        if s.numel() == 1:
            s = s.reshape(())
        elif s.numel() == w.shape[0]:
            s = s.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            raise CheckpointError(
                f"{key}: scale of shape {tuple(scale.shape)} fits neither a per-layer nor a per-row scale "
                f"for a weight of shape {tuple(weight.shape)}"
            )
        w = w * s
    return w.to(dtype)


def dequantize_state_dict(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """A copy of `sd` with every fp8 / scaled weight in `dtype` and the format's extra keys removed.

    Unquantised tensors are passed through without a copy.
    """
    check_comfy_quant(sd, source)
    scales: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(SCALE_SUFFIXES):
            scales[key.rsplit(".", 1)[0] + ".weight"] = value
        elif not (key.endswith(MARKER) or key.endswith(DROPPED_SUFFIXES)):
            rest[key] = value
    orphans = sorted(scales.keys() - rest.keys())
    if orphans:
        raise CheckpointError(f"{source}: weight scales without a weight: {', '.join(orphans[:5])}")
    return {
        key: dequantize_weight(t, scales.get(key), dtype, key) if (t.dtype in FP8_DTYPES or key in scales) else t
        for key, t in rest.items()
    }
