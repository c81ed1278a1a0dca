"""UMT5-XXL text encoder (spec §4): transformers ``UMT5EncoderModel`` + the reference's output trimming.

Math only: the weights come in as a transformers-named state dict (see ``wan_local.weights.umt5``), the
module runs in the dtype of its weights (the reference runs everything in bf16, the fixtures in fp32).
Unlike ``from_pretrained``, loading with ``assign=True`` keeps the file dtype for every tensor, ``wo``
included, which is what the reference does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from wan_local.errors import InputError

if TYPE_CHECKING:
    from transformers import UMT5Config

# Transformers' eager path computes the reference's sequence of ops (unscaled q·kᵀ + bias + mask, softmax
# with fp32 accumulation, × v). SDPA fuses them differently. Measured on the tiny fixture: fp32 rel. L2 to
# the golden outputs 1.2e-7 (eager) vs 4.7e-7 (sdpa); in bf16, eager was bit-identical to a from-spec
# re-implementation of the reference maths while sdpa was 1.3e-2 away. The attention is a small part of the
# encoder's cost (L = 512), so numerics win.
ATTN_IMPLEMENTATION = "eager"

_TIED_KEY = "encoder.embed_tokens.weight"


class TextEncoder(nn.Module):
    """UMT5 encoder producing the DiT's text context.

    Construct on the meta device (``with torch.device("meta"): TextEncoder(cfg)``), then ``load_weights``;
    or use ``TextEncoder.from_state_dict``. ``encode(ids, mask)`` returns one [L_i, d_model] tensor per
    prompt, L_i = number of mask-1 tokens (text + EOS).
    """

    def __init__(self, config: UMT5Config) -> None:
        from transformers import UMT5EncoderModel

        super().__init__()
        config = copy.deepcopy(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        config.dropout_rate = 0.0  # inference only; also makes train/eval mode irrelevant
        self.config = config
        self.umt5 = UMT5EncoderModel(config)
        self.eval()

    @classmethod
    def from_state_dict(cls, config: UMT5Config, sd: Mapping[str, torch.Tensor]) -> TextEncoder:
        """Build on the meta device and assign ``sd`` (transformers names, complete; see ``load_weights``)."""
        with torch.device("meta"):
            model = cls(config)
        return model.load_weights(sd)

    def load_weights(self, sd: Mapping[str, torch.Tensor]) -> TextEncoder:
        """Assign a transformers-named state dict (strict; tensors are used as they are, no copy).

        ``shared.weight`` also serves as ``encoder.embed_tokens.weight``; both end up as one Parameter.
        Key problems should be caught before this by ``wan_local.weights.umt5.check_umt5_keys``.
        """
        sd = dict(sd)
        if "shared.weight" in sd:
            sd.setdefault(_TIED_KEY, sd["shared.weight"])
        self.umt5.load_state_dict(sd, strict=True, assign=True)
        # assign=True wraps each key in its own Parameter; restore the tie so there is one tensor.
        self.umt5.encoder.embed_tokens.weight = self.umt5.shared.weight
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (= compute dtype)."""
        return self.umt5.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.umt5.shared.weight.device

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Encode padded token ids; return each sample trimmed to its true length (spec §4.5).

        ids, mask: [B, L] integer tensors (mask 1 on text + EOS, 0 on padding). The encoder runs on the full
        padded sequence with the mask (padding keys are masked; padded rows are computed and then dropped).
        Returns B tensors of shape [mask[b].sum(), d_model] in the weights' dtype (views of the batch output).
        """
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise InputError(
                f"ids and mask must both be [batch, length]; got {tuple(ids.shape)} and {tuple(mask.shape)}."
            )
        if ids.is_floating_point() or mask.is_floating_point():
            raise InputError(f"ids and mask must be integer tensors; got {ids.dtype} and {mask.dtype}.")
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        hidden = self.umt5(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths, strict=True)]
