"""A GGUF DiT file as official-named tensors (city96/ComfyUI-GGUF conventions, fact sheet §3.4).

Names: bare official `WanModel` names; a `model.diffusion_model.` (or other ComfyUI) prefix is stripped if every
tensor has it. Shapes: the file's dims reversed, replaced by `comfy.gguf.orig_shape.<name>` (an INT32 array) where
the converter stored a tensor reshaped to (numel/256, 256). Config: an optional string key `config` holding the
official config.json (our converters write it; QuantStack's files carry none, so the config is inferred from the
shapes with head_dim 128).

Quantized tensors are handed on as their stored bytes (`PackedTensor`) so that the DiT keeps them packed until a
block runs; dense ones (F32 / F16 / BF16) become plain tensors viewing the mapped file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_local.errors import CheckpointError
from wan_local.weights import keymaps
from wan_local.weights.gguf import umt5
from wan_local.weights.gguf.quants import DENSE
from wan_local.weights.gguf.reader import GGUFFile, read_gguf
from wan_local.weights.gguf.types import GGMLType
from wan_local.weights.headers import TensorInfo

log = logging.getLogger(__name__)

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


@dataclass(frozen=True)
class PackedTensor:
    """A tensor kept as stored: uint8 bytes (1-D), its GGML type and its torch shape."""

    raw: torch.Tensor
    ggml: GGMLType
    shape: tuple[int, ...]


def _shapes_and_names(gf: GGUFFile) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{official name: (stored name, torch shape)} with orig_shape applied and a common prefix stripped."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in gf.tensors.items():
        shape = info.shape
        orig = gf.kv.get(ORIG_SHAPE_KEY + name)
        if orig is not None:
            if not isinstance(orig, list) or not all(isinstance(d, int) and d >= 0 for d in orig):
                raise CheckpointError(f"{gf.path}: {ORIG_SHAPE_KEY}{name} is not a list of sizes ({orig!r})")
            shape = tuple(orig)
            if info.numel != _prod(shape):
                raise CheckpointError(
                    f"{gf.path}: {ORIG_SHAPE_KEY}{name} = {list(shape)} does not fit the {info.numel} values stored"
                )
        shapes[name] = shape
    if gf.architecture == umt5.ARCHITECTURE:  # a UMT5 encoder: transformers' names, as its loader uses them
        return {name: (stored, shapes[stored]) for stored, name in umt5.transformers_names(gf).items()}
    renamed = keymaps.strip_prefix({name: name for name in shapes})  # type: ignore[arg-type]
    return {official: (stored, shapes[stored]) for official, stored in renamed.items()}  # type: ignore[misc]


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gguf_tensor_table(gf: GGUFFile) -> dict[str, TensorInfo]:
    """{official name: TensorInfo(torch shape, GGML type name)} of a parsed GGUF file (header only): a DiT's
    official names, or a UMT5 encoder's transformers names."""
    return {
        official: TensorInfo(shape, gf.tensors[stored].ggml_type.name)
        for official, (stored, shape) in _shapes_and_names(gf).items()
    }


def gguf_config_hints(gf: GGUFFile) -> dict[str, Any]:
    """The official config.json stored under the key `config`, if the file has one (else {})."""
    raw = gf.kv.get("config")
    if not isinstance(raw, str):
        return {}
    try:
        hints = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("%s: the 'config' key is not JSON; inferring the DiT config from shapes", gf.path)
        return {}
    return hints if isinstance(hints, dict) else {}


def read_gguf_dit(path: Path) -> tuple[GGUFFile, dict[str, torch.Tensor | PackedTensor]]:
    """(parsed file, {official name: dense tensor or PackedTensor}) of a GGUF DiT; no tensor data is read here
    (dense tensors and packed bytes view the mapped file)."""
    gf = read_gguf(path)
    names = _shapes_and_names(gf)
    if "patch_embedding.weight" not in names:
        arch = gf.architecture or "unknown"
        raise CheckpointError(
            f"{path} is not a Wan DiT GGUF (architecture {arch!r}, no patch_embedding.weight); "
            "diffusion_models/ needs a Wan2.2 DiT such as Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf"
        )
    out: dict[str, torch.Tensor | PackedTensor] = {}
    for official, (stored, shape) in names.items():
        info = gf.tensors[stored]
        raw = gf.raw(stored)
        if info.ggml_type.quantized:
            out[official] = PackedTensor(raw, info.ggml_type, shape)
        else:
            out[official] = raw.view(DENSE[info.ggml_type.name]).reshape(shape)
    return gf, out
