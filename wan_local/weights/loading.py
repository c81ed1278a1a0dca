"""Build models on the meta device and assign checkpoint tensors to them, in any of the three formats.

The format of a DiT / VAE / text-encoder source is recognised from what is on disk (config.json class names, file
types, key names), never from a file name. Each load checks every key and shape against the model it is meant for
and raises a CheckpointError listing what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from wan_local.errors import CheckpointError
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.models.text_encoder import TextEncoder
from wan_local.models.vae21 import VAE21Config, WanVAE21
from wan_local.models.vae22 import VAE22Config, WanVAE22
from wan_local.weights import fp8, keymaps
from wan_local.weights.convert import as_tensor, load_state_dict
from wan_local.weights.files import (
    open_safetensors,
    open_sharded_safetensors,
    read_safetensors_metadata,
    read_state_dict,
)
from wan_local.weights.umt5 import prepare_umt5_state_dict

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

DIT_STEM = "diffusion_pytorch_model"
_MODEL_TYPE_BY_IN_DIM = {16: "t2v", 36: "i2v", 48: "ti2v"}


def _list_some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}{f', … ({len(keys)} in all)' if len(keys) > n else ''}"


#: float8 bytes that are NaN (e4m3fn has no inf; e5m2's 0x7C-0x7F are inf/NaN, with the sign bit as well).
_FP8_BAD = {torch.float8_e4m3fn: (0x7F,), torch.float8_e5m2: (0x7C, 0x7D, 0x7E, 0x7F)}


def non_finite_tensors(sd: Mapping[str, torch.Tensor], rows_per_chunk: int = 1 << 22) -> list[str]:
    """Names of floating-point tensors holding NaN or inf, checked in bounded chunks (one pass over the data)."""
    bad = []
    for name, t in sd.items():
        if not t.is_floating_point() or t.is_meta or t.numel() == 0:
            continue
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), rows_per_chunk):
            part = flat[start : start + rows_per_chunk]
            if t.dtype in _FP8_BAD:
                finite = not bool(torch.isin(part.view(torch.uint8) & 0x7F, torch.tensor(_FP8_BAD[t.dtype])).any())
            else:
                finite = bool(torch.isfinite(part).all())
            if not finite:
                bad.append(name)
                break
    return bad


def assign_checked(
    factory: Callable[[], M],
    sd: Mapping[str, Any],
    source: str,
    dtype: torch.dtype | None,
    keep_dtype: Collection[str] = (),
) -> M:
    """Build `factory()` on the meta device, check `sd` against it key by key and assign its tensors.

    `sd` holds tensors or `files.StoredTensor`s (checked from their headers before any data is read).
    Floating-point tensors are converted to `dtype` (None keeps the file's dtype), except those named in `keep_dtype`
    (quantized weights and their scales). Nothing is copied when the file
    dtype already matches: the parameters stay memory-mapped views of the file until moved to a device. StoredTensors
    in another dtype are read and converted chunk by chunk (`weights.convert`): the peak is the converted model plus
    a few chunk buffers, never the mapped source and its copy together.
    """
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_some(unexpected)}")
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if wrong:
        problems.append(f"wrong shapes: {_list_some(wrong, 3)}")
    kinds = [
        f"{k} is {sd[k].dtype} (expected floating point)"
        for k, v in expected.items()
        if k in sd and v.is_floating_point() and not (sd[k].is_floating_point() or sd[k].dtype == torch.int8)
    ]
    if kinds:
        problems.append(f"wrong dtypes: {_list_some(kinds, 3)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: {'; '.join(problems)}. "
            "The file is probably for a different model or task, or damaged."
        )
    converted, bad = load_state_dict(sd, dtype, check=non_finite_tensors, keep=keep_dtype)
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or infinite values in {_list_some(bad, 3)}: the file is damaged; download it again"
        )
    model.load_state_dict(converted, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------- DiT


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def dit_config_from_official(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> DiTConfig:
    """DiTConfig from an official `WanModel` config.json (text_dim: config if present, else the weight shape)."""
    text_dim = config.get("text_dim") or int(sd["text_embedding.0.weight"].shape[1])
    try:
        return DiTConfig(
            model_type=config["model_type"],
            in_dim=int(config["in_dim"]),
            out_dim=int(config["out_dim"]),
            dim=int(config["dim"]),
            ffn_dim=int(config["ffn_dim"]),
            freq_dim=int(config["freq_dim"]),
            num_heads=int(config["num_heads"]),
            num_layers=int(config["num_layers"]),
            text_len=int(config.get("text_len", 512)),
            text_dim=int(text_dim),
            eps=float(config.get("eps", 1e-6)),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc}") from exc


def dit_config_from_diffusers(config: Mapping[str, Any]) -> DiTConfig:
    """DiTConfig from a diffusers `WanTransformer3DModel` config.json."""
    in_dim = int(config["in_channels"])
    return DiTConfig(
        model_type=_MODEL_TYPE_BY_IN_DIM.get(in_dim, "ti2v" if config.get("expand_timesteps") else "t2v"),
        in_dim=in_dim,
        out_dim=int(config["out_channels"]),
        dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
        ffn_dim=int(config["ffn_dim"]),
        freq_dim=int(config["freq_dim"]),
        num_heads=int(config["num_attention_heads"]),
        num_layers=int(config["num_layers"]),
        text_dim=int(config["text_dim"]),
        eps=float(config.get("eps", 1e-6)),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
    )


def dit_config_from_state_dict(sd: Mapping[str, torch.Tensor], hints: Mapping[str, Any]) -> DiTConfig:
    """DiTConfig from tensor shapes alone (single-file checkpoints carry no config).

    The head count is not in any shape: it comes from `hints["num_heads"]` (a config stored in the file's
    metadata) or else from the head dimension 128 that every Wan DiT uses.
    """
    patch = sd["patch_embedding.weight"]
    dim, in_dim = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])
    out_dim = int(sd["head.head.weight"].shape[0]) // (patch_size[0] * patch_size[1] * patch_size[2])
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    model_type = hints.get("model_type") or _MODEL_TYPE_BY_IN_DIM.get(in_dim)
    if model_type is None:
        raise CheckpointError(f"cannot tell the model type of a DiT with {in_dim} input channels")
    return DiTConfig(
        model_type=model_type,
        in_dim=in_dim,
        out_dim=out_dim,
        dim=dim,
        ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]),
        freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
        num_heads=int(hints.get("num_heads") or dim // 128),
        num_layers=num_layers,
        text_dim=int(sd["text_embedding.0.weight"].shape[1]),
        eps=float(hints.get("eps", 1e-6)),
        patch_size=patch_size,
    )


def _metadata_hints(path: Path) -> dict[str, Any]:
    """A model config embedded in safetensors metadata under "config" (written by our own converters)."""
    meta = read_safetensors_metadata(path)
    try:
        return json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        return {}


def read_dit(path: Path, compute_dtype: torch.dtype) -> tuple[DiTConfig, dict[str, Any], str]:
    """(config, official-named state dict, format name) of a DiT folder or single file.

    Values are `files.StoredTensor`s (headers only; `assign_checked` reads them), or tensors where a format is
    converted on reading (scaled fp8, dequantized to `compute_dtype`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DiT checkpoint {path} does not exist")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json; is this a DiT folder?")
        config = _read_json(config_path)
        sd = open_sharded_safetensors(path, DIT_STEM)
        class_name = config.get("_class_name", "")
        if class_name == "WanTransformer3DModel":
            return dit_config_from_diffusers(config), keymaps.dit_diffusers_to_official(sd), "diffusers"
        if class_name in ("WanModel", ""):
            return dit_config_from_official(config, sd), sd, "official"
        raise CheckpointError(f"{config_path}: {class_name!r} is not a Wan DiT (WanModel)")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: a single-file DiT must be .safetensors")
    sd = keymaps.strip_prefix(open_safetensors(path))
    if fp8.is_fp8_checkpoint(sd):
        sd = fp8.dequantize_state_dict({k: as_tensor(v) for k, v in sd.items()}, compute_dtype, source=str(path))
    if "condition_embedder.time_proj.weight" in sd:
        sd = keymaps.dit_diffusers_to_official(sd)
    if "patch_embedding.weight" not in sd:
        raise CheckpointError(f"{path} is not a Wan DiT file (it has no patch_embedding.weight)")
    return dit_config_from_state_dict(sd, _metadata_hints(path)), sd, "comfyui"


def check_model_type(config: DiTConfig, expected_model_type: str | None, path: Path | str) -> None:
    """CheckpointError when the DiT at `path` is another task's ("t2v", "i2v", "ti2v"); None expects any."""
    if expected_model_type is not None and config.model_type != expected_model_type:
        raise CheckpointError(
            f"{path} holds a {config.model_type!r} model but this task needs {expected_model_type!r}; "
            "point --ckpt-dir at the checkpoint of the task you chose"
        )


def load_dit(path: Path, dtype: torch.dtype = torch.float32, expected_model_type: str | None = None) -> WanDiT:
    """Load a Wan DiT from an official or diffusers folder, or a ComfyUI single file (fp8_scaled included).

    `expected_model_type` ("t2v", "i2v", "ti2v") guards against loading the wrong task's checkpoint. A GGUF file
    loads with its quantized Linears kept packed (`wan_local.memory.quant.gguf`).
    """
    if Path(path).suffix == ".gguf":
        from wan_local.memory.quant.gguf import load_gguf_dit

        return load_gguf_dit(Path(path), dtype, expected_model_type)
    try:
        config, sd, fmt = read_dit(Path(path), dtype)
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing tensor or config field {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model configuration ({exc})") from exc
    check_model_type(config, expected_model_type, path)
    log.info("loading %s DiT from %s (%d layers, dim %d)", fmt, path, config.num_layers, config.dim)
    return assign_checked(lambda: WanDiT(config), sd, str(path), dtype)


# ---------------------------------------------------------------------------------------------------- VAE

_VAE_KINDS = {
    "wan2.1": (WanVAE21, VAE21Config, keymaps.vae21_official_to_diffusers_key),
    "wan2.2": (WanVAE22, VAE22Config, keymaps.vae22_official_to_diffusers_key),
}


def load_vae(path: Path, kind: str) -> WanVAE21 | WanVAE22:
    """Load the Wan2.1 or Wan2.2 VAE (float32, as the reference runs it).

    `path` is the official `.pth`, a ComfyUI `.safetensors` (official names, maybe prefixed) or a diffusers `vae/`
    folder (`AutoencoderKLWan`).
    """
    if kind not in _VAE_KINDS:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {sorted(_VAE_KINDS)}")
    model_cls, config_cls, to_diffusers = _VAE_KINDS[kind]
    path = Path(path)
    if path.is_dir():
        sd = read_state_dict(path)
        # diffusers' names -> official: the config comes from the three tensors whose shapes define it, then
        # the official key list of that config gives the exact inverse name map.
        shape_keys = {
            "encoder.conv1.weight": "encoder.conv_in.weight",
            "decoder.conv1.weight": "decoder.conv_in.weight",
            "conv2.weight": "post_quant_conv.weight",
        }
        if any(k not in sd for k in shape_keys.values()):
            raise CheckpointError(
                f"{path} is not a diffusers AutoencoderKLWan folder (no {shape_keys['conv2.weight']})"
            )
        config = _vae_config(kind, config_cls, {ours: sd[theirs] for ours, theirs in shape_keys.items()}, path)
        with torch.device("meta"):
            official_keys = list(model_cls(config).state_dict())
        sd = keymaps.rename_by_inverse(sd, official_keys, to_diffusers)
    else:
        sd = keymaps.strip_prefix(read_state_dict(path))
        config = _vae_config(kind, config_cls, sd, path)
    return assign_checked(lambda: model_cls(config), sd, str(path), torch.float32)


def _vae_config(kind: str, config_cls: Any, sd: Mapping[str, torch.Tensor], path: Path) -> Any:
    try:
        return config_cls.from_state_dict(sd)
    except (CheckpointError, KeyError, ValueError, IndexError) as exc:
        # The config readers raise CheckpointErrors that name tensors, not the file: add it.
        raise CheckpointError(f"{path} does not look like a {kind} VAE: {exc}") from exc


# ---------------------------------------------------------------------------------------------------- UMT5


def load_text_encoder(path: Path, dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """Load the UMT5-XXL encoder: official `.pth`, diffusers `text_encoder/` folder, ComfyUI file (fp8_scaled
    included) or GGUF (`t5encoder`), as a transformers UMT5EncoderModel in `dtype` (the reference runs it in bf16)."""
    path = Path(path)
    if path.suffix == ".gguf":  # city96's GGUF encoders: dequantized on load
        from wan_local.weights.gguf.umt5 import read_gguf_umt5

        raw = read_gguf_umt5(path, dtype)
    else:
        raw = read_state_dict(path)
    config, sd = prepare_umt5_state_dict(raw, dtype, source=str(path))
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return TextEncoder.from_state_dict(config, sd)
