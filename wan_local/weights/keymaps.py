"""Key maps between the official Wan2.2 names and the diffusers / ComfyUI names (fact sheet §3.2, §3.3).

Our models use the official names. Each foreign format gets one function that renames a state dict into them;
keys no rule matches are left as they are, so the strict key check of the loader reports them as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------- DiT

_DIT_DIFFUSERS_TO_OFFICIAL: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"^condition_embedder\.time_proj\.", "time_projection.1."),
        (r"^scale_shift_table$", "head.modulation"),
        (r"^proj_out\.", "head.head."),
        (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
        (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
        (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
        (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
        (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
        (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
        (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
        # diffusers' norm2 is the affine pre-cross-attention LayerNorm the official code calls norm3.
        (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
        (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
        (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    ]
]


def dit_diffusers_to_official(sd: StateDict) -> StateDict:
    """Rename a diffusers `WanTransformer3DModel` state dict to official WanModel names."""
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _DIT_DIFFUSERS_TO_OFFICIAL:
            new, n = pattern.subn(repl, key)
            if n:
                break
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------------- VAE

_RESIDUAL_RENAMES = [
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]


def _rename_residual(rest: str) -> str:
    for old, new in _RESIDUAL_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _vae_common_to_diffusers(key: str) -> str | None:
    """Renames shared by both VAEs; None when the key is level-specific (down/up sample blocks)."""
    if key.startswith("conv1."):
        return "quant_conv." + key[len("conv1.") :]
    if key.startswith("conv2."):
        return "post_quant_conv." + key[len("conv2.") :]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    if rest.startswith("conv1."):
        return f"{side}.conv_in." + rest[len("conv1.") :]
    if rest.startswith("head.0.gamma"):
        return f"{side}.norm_out.gamma"
    if rest.startswith("head.2."):
        return f"{side}.conv_out." + rest[len("head.2.") :]
    m = re.match(r"middle\.(\d)\.(.*)", rest)
    if m:
        idx, tail = int(m.group(1)), m.group(2)
        if idx == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{idx // 2}.{_rename_residual(tail)}"
    return None


def vae21_official_to_diffusers_key(key: str, res_per_level: int = 2) -> str:
    """Diffusers `AutoencoderKLWan` (Wan2.1 layout) name of an official Wan2.1 VAE key."""
    common = _vae_common_to_diffusers(key)
    if common is not None:
        return common
    m = re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.{_rename_residual(m.group(2))}"
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:
        # The decoder's flat list holds, per level, (res_per_level + 1) residual blocks then one upsampler.
        per_level = res_per_level + 2
        index, tail = int(m.group(1)), m.group(2)
        level, pos = divmod(index, per_level)
        if pos == per_level - 1:
            return f"decoder.up_blocks.{level}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{level}.resnets.{pos}.{_rename_residual(tail)}"
    return key


def vae22_official_to_diffusers_key(key: str, res_per_level: int = 2) -> str:
    """Diffusers `AutoencoderKLWan` (Wan2.2 layout) name of an official Wan2.2 VAE key."""
    common = _vae_common_to_diffusers(key)
    if common is not None:
        return common
    m = re.match(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.*)", key)
    if m:
        level, pos, tail = m.groups()
        if int(pos) == res_per_level:
            return f"encoder.down_blocks.{level}.downsampler.{tail}"
        return f"encoder.down_blocks.{level}.resnets.{pos}.{_rename_residual(tail)}"
    m = re.match(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.*)", key)
    if m:
        level, pos, tail = m.groups()
        if int(pos) == res_per_level + 1:
            return f"decoder.up_blocks.{level}.upsampler.{tail}"
        return f"decoder.up_blocks.{level}.resnets.{pos}.{_rename_residual(tail)}"
    return key


def rename_by_inverse(
    sd: StateDict, official_keys: Iterable[str], official_to_foreign: Callable[[str], str]
) -> StateDict:
    """Rename a foreign-format dict to official names, given the official->foreign name function.

    The official key list comes from the model the dict is meant for (built on the meta device), so the map is
    exact for that model; foreign keys outside it are kept and surface as unexpected keys.
    """
    inverse = {official_to_foreign(k): k for k in official_keys}
    return {inverse.get(k, k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------- ComfyUI

COMFY_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "first_stage_model.",
    "vae.",
    "text_encoders.umt5.transformer.",
    "text_encoders.umt5xxl.transformer.",
)


def strip_prefix(sd: StateDict, prefixes: Iterable[str] = COMFY_PREFIXES) -> StateDict:
    """Drop the first of `prefixes` that every key (marker keys aside) starts with; keep other dicts as they are."""
    keys = [k for k in sd if not k.endswith("scaled_fp8")]
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd
