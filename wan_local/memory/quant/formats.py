"""Quantized DiT state dicts in every format we read, and building / loading a DiT with QuantLinear layers.

Ours: official names, `<layer>.weight` int8 / float8 [out, in] plus `<layer>.scale` float32 [out] or [] for the
block Linears `numerics.is_quant_target` picks, everything else high precision. Read without a detour through
bf16: high-precision state dicts (quantized layer by layer), ComfyUI "fp8_scaled" (fp8 weight + one float32 scale
per layer, fact sheet §3.3; kept as they are) and optimum-quanto qint8 / qfloat8 files (`<layer>.weight._data` +
`<layer>.weight._scale` [out, 1]; WanGP stores its map in the safetensors metadata). `load_quantized_dit` keeps
what on-the-fly quantization produced in a `cache.QuantCache` for the next start.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wan_local.errors import CheckpointError
from wan_local.memory.quant.numerics import (
    QUANT_DTYPES,
    QuantLinear,
    check_mode,
    dequantize,
    is_quant_target,
    quantize_weight,
)
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights import fp8, keymaps
from wan_local.weights.convert import Progress, as_tensor, read_copy
from wan_local.weights.files import StateDict, StoredTensor, open_safetensors, read_safetensors_metadata
from wan_local.weights.loading import assign_checked, check_model_type, dit_config_from_state_dict, read_dit

if TYPE_CHECKING:
    from wan_local.memory.quant.cache import QuantCache

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- state-dict formats


def quantized_state_dict(sd: Mapping[str, Any], mode: str, scope: str = "all", source: str = "") -> dict[str, Any]:
    """Official-named high-precision state dict -> ours: target `<layer>.weight` quantized, `<layer>.scale` added.

    Layer by layer: a `files.StoredTensor` target is read into its own memory with plain reads (nothing stays
    mapped), quantized and dropped; every other entry is passed through untouched (StoredTensors stay unread), so
    peak RAM is the quantized weights plus one layer in its stored dtype and its float32 temporaries.
    """
    check_mode(mode, scope)
    out: dict[str, Any] = {}
    targets = {}
    for key, value in sd.items():
        layer, _, leaf = key.rpartition(".")
        if value.dtype in QUANT_DTYPES or leaf == "scale" or key.endswith(fp8.SCALE_SUFFIXES):
            raise CheckpointError(f"{key} is already quantized ({value.dtype}); load the file as it is instead")
        if leaf == "weight" and is_quant_target(layer, scope):
            targets[key] = layer
    stored_bytes = sum(sd[k].nbytes for k in targets if isinstance(sd[k], StoredTensor))
    progress = Progress(stored_bytes, f"quantizing {source or 'the DiT'} to {mode} layer by layer")
    done = made = 0
    for key, value in sd.items():
        layer = targets.get(key)
        if layer is None:
            out[key] = value
            continue
        weight = read_copy(value)  # the stored bytes of one layer, read now and dropped after quantizing
        out[key], out[f"{layer}.scale"] = quantize_weight(weight, mode, key)
        if isinstance(value, StoredTensor):
            done += value.nbytes
            made += out[key].numel() * out[key].element_size()
            progress.update(done)
        del weight
    progress.finish(done, made)
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
    activation scales and `.comfy_quant` blobs (their float8 format checked) are dropped; an fp8 weight without a
    scale gets scale 1. fp8 tensors outside the block Linears are dequantized to float32.
    """
    fp8.check_comfy_quant(sd, source)
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
        qsd = quanto_state_dict({k: as_tensor(v) for k, v in sd.items()}, source=source)
    elif fp8.is_fp8_checkpoint(sd):
        qsd = scaled_fp8_state_dict({k: as_tensor(v) for k, v in sd.items()}, source)
    else:
        return quantized_state_dict(sd, mode, scope, source)
    kept = sorted({str(v.dtype) for k, v in qsd.items() if k.endswith(".weight") and v.dtype in QUANT_DTYPES})
    log.info("%s is pre-quantized (%s): kept as stored instead of %s / %s", source, ", ".join(kept), mode, scope)
    return qsd


# ------------------------------------------------------------------------------------------------- building


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


def quantized_layers(qsd: Mapping[str, torch.Tensor], source: str) -> dict[str, tuple[torch.dtype, bool]]:
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
    layers = quantized_layers(qsd, source)

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
    return assign_checked(skeleton, qsd, source, dtype, keep_dtype=stored)


def _read_single_file(path: Path) -> tuple[DiTConfig, StateDict, str]:
    """(config, official-named state dict with quantized tensors as stored, format) of a one-file DiT."""
    sd = keymaps.strip_prefix(open_safetensors(path))
    meta = read_safetensors_metadata(path)
    hints: dict[str, Any] = {}
    with contextlib.suppress(ValueError):  # a foreign or broken config blob only loses the hints
        hints = json.loads(meta["config"]) if "config" in meta else {}
        hints = json.loads(base64.b64decode(meta["config_base64"])) if "config_base64" in meta else hints
    if "condition_embedder.time_proj.weight" in sd or "condition_embedder.time_proj.weight._data" in sd:
        sd = keymaps.dit_diffusers_to_official(sd)
    fmt = "comfyui"
    if is_quanto_checkpoint(sd):
        sd, fmt = (
            quanto_state_dict({k: as_tensor(v) for k, v in sd.items()}, read_quanto_map(path), str(path)),
            "quanto",
        )
    elif fp8.is_fp8_checkpoint(sd):
        sd, fmt = scaled_fp8_state_dict({k: as_tensor(v) for k, v in sd.items()}, str(path)), "comfyui-fp8"
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
            check_model_type(cfg, expected_model_type, path)
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
    check_model_type(cfg, expected_model_type, path)
    sd = raw
    if cache is not None and fmt not in ("comfyui-fp8", "quanto"):  # pre-quantized files load as fast as a cache
        sd = cache.get_or_create(
            source_files(path), mode, scope, lambda: quantized_state_dict(raw, mode, scope, str(path))
        )
    log.info("loading %s DiT from %s with %s weights (scope %s)", fmt, path, mode, scope)
    return build_quantized_dit(cfg, sd, mode, scope, dtype, compute=compute, source=str(path))
