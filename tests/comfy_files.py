"""ComfyUI text-encoder and VAE files as Comfy-Org's repackaged ones are keyed (fact sheet §3.3).

PLACEHOLDER for the GGUF tests until the ComfyUI text-encoder work lands its own version of this module: the text
encoder has bare HF-T5 names (§4.3) but not yet the `spiece_model` tokenizer key (the loader of this branch
refuses it), so a folder built with it still needs the fixture's `google/umt5-xxl/` tokenizer folder beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

# official UMT5 block names -> HF-T5 names (fact sheet §4.3 table)
_UMT5_BLOCK = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_KINDS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_comfy_text_encoder(path: Path, tiny: Path, kind: str = "fp16") -> None:
    """The tiny fixture's UMT5 as a ComfyUI `umt5_xxl_<kind>.safetensors` (bare HF-T5 names)."""
    sd = torch.load(tiny / "t2v-A14B" / T5_FILE, map_location="cpu", weights_only=True)
    out = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            name = "shared.weight"
        elif key == "norm.weight":
            name = "encoder.final_layer_norm.weight"
        else:
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
            name = f"encoder.block.{i}.{_UMT5_BLOCK[rest]}"
        out[name] = value.to(_KINDS[kind]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


def write_comfy_vae(path: Path, official_vae: Path) -> None:
    """An official VAE `.pth` as ComfyUI's `wan_2.1_vae.safetensors` / `wan2.2_vae.safetensors` (official names)."""
    sd = torch.load(official_vae, map_location="cpu", weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
