"""ComfyUI / diffusers "scaled fp8" weights: W = float(W_fp8) x scale (fact sheet §3.3).

One reader for every model: a per-layer scale (`.scale_weight`, legacy ComfyUI; `.weight_scale`, newer ComfyUI and
diffusers), a 0-dim / one-element scale or one value per output row; a `scaled_fp8` marker, activation scales and
`.comfy_quant` blobs are dropped. fp8 weights without a scale are plain casts (scale 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from wan_local.errors import CheckpointError

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def is_fp8_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when any tensor is float8 or a marker / weight scale is present."""
    return any(k.endswith(MARKER) or k.endswith(SCALE_SUFFIXES) or v.dtype in FP8_DTYPES for k, v in sd.items())


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
