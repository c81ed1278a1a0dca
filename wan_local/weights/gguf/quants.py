"""The GGML block formats GGUF files store, and their dequantization in torch (fact sheet §3.4).

Each format cuts the flattened tensor into blocks of `block_size` values stored in `type_size` bytes. The maths
follows gguf-py's numpy reference (`gguf.quants`): fp16 block scales are widened to float32 and every product is
taken in float32, in the same order, so a float32 result equals gguf-py's bit for bit; the result is then cast to
the requested dtype. Vectorised over blocks, on whatever device the bytes are (the DiT dequantizes a block's
weights on the GPU right before they are used); `dequantize` works through bounded chunks of blocks so its float32
temporaries stay small next to the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wan_local.weights.gguf.types import CHUNK_VALUES, CUDA_CHUNK_VALUES, GGML_BY_NAME, GGML_TYPES, QK_K, GGMLType

__all__ = ["DENSE", "GGML_BY_NAME", "GGML_TYPES", "GGMLType", "dequantize"]

DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- helpers


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2k] uint8 -> [n, k] float32 (little-endian fp16 fields)."""
    return b.contiguous().view(torch.float16).float()


def _masked(b: torch.Tensor, shift: int, mask: int) -> torch.Tensor:
    """(b >> shift) & mask for every byte of uint8 [n, w], computed on 8 bytes at a time (as int64 words: the
    byte-wise mask drops what the shift carries across bytes or in from the sign)."""
    if b.shape[-1] % 8:
        return (b >> shift) & mask
    flat = b.reshape(-1)
    if flat.storage_offset() % 8:  # a one-row slice is contiguous at any byte offset
        flat = flat.clone()
    words = flat.view(torch.int64)
    return ((words >> shift) & (mask * 0x0101010101010101)).view(torch.uint8).view(b.shape)


def _or_shifted(low: torch.Tensor, high: torch.Tensor, shift: int) -> torch.Tensor:
    """low | (high << shift) for uint8 tensors of one shape whose sums fit a byte, 8 bytes at a time."""
    if low.numel() % 8:
        return low | (high << shift)
    words = low.reshape(-1).view(torch.int64) | (high.reshape(-1).view(torch.int64) << shift)
    return words.view(torch.uint8).view(low.shape)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """uint8 [n, groups*width] -> [n, groups, 2, width]: low nibbles then high nibbles of each group."""
    shape = (qs.shape[0], groups, 1, width)
    return torch.cat((_masked(qs, 0, 0x0F).view(shape), _masked(qs, 4, 0x0F).view(shape)), dim=2)


def _bits(b: torch.Tensor, shifts: int, mask: int) -> torch.Tensor:
    """uint8 [n, g, w] -> [n, g, shifts, w]: (b >> (k * (8 // shifts))) & mask for k < shifts."""
    step, flat = 8 // shifts, b.reshape(b.shape[0], -1)
    return torch.stack([_masked(flat, k * step, mask).view(b.shape) for k in range(shifts)], dim=2)


def _bit_planes(b: torch.Tensor, planes: int) -> torch.Tensor:
    """uint8 [n, g, w] -> [n, g, planes, w]: bit k of every byte for k < planes."""
    flat = b.reshape(b.shape[0], -1)
    return torch.stack([_masked(flat, k, 1).view(b.shape) for k in range(planes)], dim=2)


def _u32_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4] (a little-endian uint32) -> uint8 [n, 32]: bit j of that word for j = 0..31."""
    b = qh.reshape(qh.shape[0], 4, 1)
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8).reshape(1, 1, 8)
    return ((b >> shifts) & 1).reshape(qh.shape[0], 32)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 packed 6-bit (scale, min) pairs of a Q4_K / Q5_K super-block: uint8 [n, 12] -> 2 x float32 [n, 8]."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc.float(), mn.float()


# ------------------------------------------------------------------------------------------ block decoders
# Each takes uint8 [n, type_size] and returns float32 [n, block_size]; products and sums are rounded one at a time in
# gguf-py's order (in place on the fresh float32 codes: no fused multiply-add, which would round differently).


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 1, 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return q.float().mul_(d)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 1, 16).reshape(b.shape[0], 32).float()
    return q.mul_(d).add_(m)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d, qh = _f16(b[:, :2]), _u32_bits(b[:, 2:6])
    ql = _nibbles(b[:, 6:], 1, 16).reshape(b.shape[0], 32)
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return q.float().mul_(d)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qh = _f16(b[:, :2]), _f16(b[:, 2:4]), _u32_bits(b[:, 4:8])
    ql = _nibbles(b[:, 8:], 1, 16).reshape(b.shape[0], 32)
    return (ql | (qh << 4)).float().mul_(d).add_(m)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(d)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 4, 3).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _nibbles(scales[:, :8], 1, 8).reshape(n, 16)
    high = _bits(scales[:, 8:].reshape(n, 1, 4), 4, 3).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 4, 3).reshape(n, 16, 16)
    qh = _bit_planes(hmask.reshape(n, 1, 32), 8).reshape(n, 16, 16) ^ 1  # the offset applies where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return q.mul_(dl).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc).reshape(n, 8, 1)
    ml = (dmin * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4, 32).reshape(n, 8, 32).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc).reshape(n, 8, 1)
    ml = (dmin * mn).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32)
    qh = _bit_planes(b[:, 16:48].reshape(n, 1, 32), 8).reshape(n, 8, 32)
    q = _or_shifted(ql, qh, 4).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 2, 64).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), 4, 3).reshape(n, 8, 32)
    q = _or_shifted(low, high, 4).reshape(n, 16, 16).float().sub_(32)  # codes 0..63 -> -32..31, exact
    return q.mul_(dl).reshape(n, QK_K)


_DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(
    raw: torch.Tensor, ggml: GGMLType, shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored bytes of one tensor (uint8, any shape, on any device) -> values of torch `shape` in `dtype`.

    Dense types are reinterpreted (and cast); block formats are decoded in float32 a chunk of blocks at a time
    straight into the output (`out`, if given, must be contiguous with `shape` and `dtype`).
    """
    flat = raw.reshape(-1)
    numel = 1
    for s in shape:
        numel *= s
    if flat.numel() != ggml.nbytes(numel):
        raise ValueError(f"{flat.numel()} bytes do not hold {numel} {ggml.name} values of shape {tuple(shape)}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    if not ggml.quantized:
        out.copy_(flat.view(DENSE[ggml.name]).reshape(shape))
        return out
    decode = _DECODERS[ggml.name]
    blocks = flat.view(-1, ggml.type_size)
    dst = out.view(-1, ggml.block_size)
    step = max(1, (CHUNK_VALUES if raw.device.type == "cpu" else CUDA_CHUNK_VALUES) // ggml.block_size)
    for start in range(0, blocks.shape[0], step):
        dst[start : start + step].copy_(decode(blocks[start : start + step]))
    return out
