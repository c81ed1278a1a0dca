"""Which tensors a streamed block owns, and how they are packed into a flat byte range and re-pointed into it.

A `BlockLayout` lists every parameter and buffer of a block with its offset in one flat uint8 range; the same
layout is used for the block's host slab and for the device buffers it is copied into, so a block moves with one
contiguous copy. Its tensors keep their Python identity: `point_at` only re-points `.data`. `check_not_shared`
refuses tensors owned by more than one block; `move_unstreamed` places everything the streamed blocks do not own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wan_local.errors import InputError
from wan_local.memory.pinned import ALIGN_BYTES, align


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a block: the object whose `.data` is re-pointed, and where its bytes live in a slab."""

    owner: torch.Tensor  # the nn.Parameter or buffer object registered on a submodule
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int
    device: torch.device  # where it lived before install (restored by uninstall)


class BlockLayout:
    """Every parameter and buffer of one block, packed at aligned offsets of one flat byte range.

    Tensor starts are congruent, modulo ALIGN_BYTES, to where the resident tensor would start, so kernels that pick
    their code path by alignment (cuBLAS; oneDNN/MKL on the CPU) compute the same bits as resident. On CUDA that is
    the caching allocator's alignment (offsets at multiples of ALIGN_BYTES). With keep_alignment (the CPU, where
    resident weights stay where they were loaded, often memory-mapped at any 8-byte offset) each tensor keeps its
    current address modulo ALIGN_BYTES. Slabs and buffers start at multiples of ALIGN_BYTES.
    """

    def __init__(self, block: nn.Module, name: str, keep_alignment: bool = False) -> None:
        self.slots: list[TensorSlot] = []
        seen: set[int] = set()
        end = 0
        for mod_name, module in block.named_modules():
            tensors = [*module._parameters.items(), *module._buffers.items()]
            for t_name, t in tensors:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                check_streamable(t, f"{name}.{mod_name}.{t_name}".replace("..", "."))
                nbytes = t.numel() * t.element_size()
                residue = t.data_ptr() % ALIGN_BYTES if keep_alignment else 0
                offset = end + (residue - end) % ALIGN_BYTES
                self.slots.append(TensorSlot(t, t.dtype, t.shape, offset, nbytes, t.device))
                end = offset + nbytes
        self.nbytes = align(end, ALIGN_BYTES)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of `flat` (uint8, >= self.nbytes) for every slot, in slot order."""
        return [flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots]

    def pack_into(self, flat: torch.Tensor) -> None:
        """Copy the current value of every slot into `flat` at its offset (contiguous, bit exact)."""
        for s in self.slots:
            src = s.owner.detach().contiguous().reshape(-1).view(torch.uint8)
            flat[s.offset : s.offset + s.nbytes].copy_(src)

    def point_at(self, views: list[torch.Tensor]) -> None:
        """Re-point every slot's tensor at the matching view (same Parameter objects, new storage)."""
        for s, v in zip(self.slots, views, strict=True):
            s.owner.data = v


def check_streamable(t: torch.Tensor, name: str) -> None:
    if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        raise InputError(
            f"{name}: a {type(t).__name__} ({t.layout}) cannot be streamed; only plain dense tensors can "
            "(store quantized weights as int8/fp8 tensors plus scale tensors)"
        )
    if t.is_meta:
        raise InputError(f"{name} is on the meta device; load the weights before streaming the block")


def block_nbytes(block: nn.Module, device: torch.device | str = "cuda") -> int:
    """Bytes one streamed block occupies in a device buffer (and its host slab) when streamed to `device`.

    CUDA: its tensors at multiples of ALIGN_BYTES. CPU: each tensor at its current address modulo ALIGN_BYTES.
    The streamer's device cost is `(prefetch_depth + 1) * max(block_nbytes(b, device) for b in streamed blocks)`.
    """
    return BlockLayout(block, "block", keep_alignment=torch.device(device).type == "cpu").nbytes


def check_not_shared(model: nn.Module, blocks: list[nn.Module], indices: list[int]) -> None:
    """A streamed tensor must belong to its block only (re-pointing it would move it for every owner)."""
    owner_of_module = {id(m): i for b, i in zip(blocks, indices, strict=True) for m in b.modules()}
    owner_of_tensor: dict[int, int | None] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        owner = owner_of_module.get(id(module))
        for t_name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            previous = owner_of_tensor.setdefault(id(t), owner)
            if previous != owner:
                raise InputError(
                    f"{mod_name}.{t_name} is shared between block {previous} and {owner}; shared tensors cannot "
                    "be streamed"
                )


def move_unstreamed(
    model: nn.Module, streamed: Sequence[int], device: torch.device | str, *, blocks_attr: str = "blocks"
) -> int:
    """Move every parameter and buffer of `model` except those of the streamed blocks to `device`.

    Returns the bytes now on `device` from this call. Tensors keep their identity (`.data` is re-pointed).
    Call it before `BlockStreamer.install()` or after; never use `model.to(device)` with a streamer.
    """
    blocks = getattr(model, blocks_attr)
    skip = {id(m) for i in streamed for m in blocks[i].modules()}
    dev, moved, seen = torch.device(device), 0, set()
    with torch.no_grad():
        for module in model.modules():
            if id(module) in skip:
                continue
            for t in [*module._parameters.values(), *module._buffers.values()]:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                t.data = t.data.to(dev)
                moved += t.numel() * t.element_size()
    return moved
