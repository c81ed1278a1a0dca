"""GGUF DiTs with their quantized Linears kept packed: `GGUFLinear` and building / loading a DiT with it.

A GGUF expert stays in the format it was stored in (Q8_0, Q4_K, Q6_K ...): each quantized Linear holds its
stored bytes as one uint8 tensor, so a streamed block's slab and its copy to the GPU carry the packed bytes, not
bf16. The weight is dequantized on the device the bytes are on, each time the Linear runs, into the compute dtype
(float32 maths as gguf-py, then one rounding), and freed right after. Dense tensors of the file (F32 norms and
modulation, F16/BF16 embeddings, the 5-D F32 patch embedding) are held in the run dtype like any other DiT.
Swapped in from outside the model (the DiT file knows nothing of it), as `numerics.QuantLinear` is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wan_local.errors import CheckpointError
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.gguf.dit import PackedTensor, gguf_config_hints, gguf_tensor_table, read_gguf_dit
from wan_local.weights.gguf.quants import dequantize
from wan_local.weights.gguf.types import GGMLType
from wan_local.weights.loading import assign_checked, check_model_type, dit_config_from_state_dict

log = logging.getLogger(__name__)


class GGUFLinear(nn.Module):
    """A Linear whose weight [out, in] is stored as GGML blocks: `weight` is the stored bytes (uint8 [nbytes]).

    forward dequantizes the weight to the compute dtype (the autocast dtype when autocast is on for x's device,
    else x's dtype) on x's device and calls F.linear, so outputs match nn.Linear holding the dequantized weight
    under the same autocast state. `bias` [out] stays high precision. State-dict keys: `weight`, `bias`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ggml: GGMLType,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not ggml.quantized or (in_features * out_features) % ggml.block_size:
            raise CheckpointError(f"a {out_features}x{in_features} Linear cannot be stored as {ggml.name} blocks")
        self.in_features, self.out_features, self.ggml = in_features, out_features, ggml
        nbytes = ggml.nbytes(in_features * out_features)
        self.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`, on the device its bytes are on."""
        return dequantize(self.weight, self.ggml, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml.name}, bias={self.bias is not None}"


def build_gguf_dit(
    cfg: DiTConfig, sd: dict[str, torch.Tensor | PackedTensor], dtype: torch.dtype, source: str
) -> WanDiT:
    """WanDiT on meta with GGUFLinear wherever a Linear's weight is stored quantized, then assigned from `sd`.

    Packed weights keep their bytes; quantized tensors that are not Linear weights (none in the converter's files)
    are dequantized here; dense tensors become `dtype`. Keys and shapes are checked strictly.
    """
    with torch.device("meta"):
        probe = WanDiT(cfg)
    modules = dict(probe.named_modules())
    packed: dict[str, PackedTensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        layer = key.removesuffix(".weight")
        if isinstance(value, PackedTensor):
            module = modules.get(layer)
            if key.endswith(".weight") and isinstance(module, nn.Linear) and len(value.shape) == 2:
                if value.shape != (module.out_features, module.in_features):
                    raise CheckpointError(
                        f"{source}: {key} has shape {value.shape}, expected {(module.out_features, module.in_features)}"
                    )
                packed[layer] = value
                tensors[key] = value.raw
            else:
                tensors[key] = dequantize(value.raw, value.ggml, value.shape, torch.float32)
        else:
            tensors[key] = value

    def skeleton() -> WanDiT:
        model = WanDiT(cfg)  # under the meta device (assign_checked)
        for name, p in packed.items():
            linear = model.get_submodule(name)
            parent, _, child = name.rpartition(".")
            layer = GGUFLinear(
                linear.in_features, linear.out_features, linear.bias is not None, ggml=p.ggml, bias_dtype=dtype
            )
            setattr(model.get_submodule(parent), child, layer)
        return model

    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return assign_checked(skeleton, converted, source, None)


def load_gguf_dit(path: Path, dtype: torch.dtype, expected_model_type: str | None = None) -> WanDiT:
    """Load a GGUF DiT (any quantization in `quants`) with its quantized Linears kept packed."""
    path = Path(path)
    gf, sd = read_gguf_dit(path)
    try:
        cfg = dit_config_from_state_dict(gguf_tensor_table(gf), gguf_config_hints(gf))
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing tensor {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model configuration ({exc})") from exc
    check_model_type(cfg, expected_model_type, path)
    kinds = sorted({v.ggml.name for v in sd.values() if isinstance(v, PackedTensor)})
    log.info(
        "loading GGUF DiT %s (%s; %d layers, dim %d), quantized Linears kept packed",
        path.name,
        ", ".join(kinds) or "unquantized",
        cfg.num_layers,
        cfg.dim,
    )
    return build_gguf_dit(cfg, sd, dtype, str(path))
