"""GGUF DiT files written the way city96's converter plus llama-quantize write them (fact sheet §3.4).

`general.architecture` "wan", `general.quantization_version` 2, `general.file_type` (llama ftype), bare official
tensor names. Only the 2-D block Linear weights are quantized (Q8_0; Q4_K_M = Q4_K with `.v.weight` and
`ffn.2.weight` in Q6_K); F32 for 1-D tensors, tensors of at most 1024 values and every `modulation`; F16 (or BF16
for bf16 sources) for the other 2-D weights; `patch_embedding.weight` F32 with its full 5-D shape. The tiny
fixtures' rows (64, 128 values) are not multiples of 256, so K-quant tensors are stored reshaped to (numel/256,
256) with `comfy.gguf.orig_shape.<name>` (an INT32 array), as the converter does for such architectures.

Written with gguf-py's GGUFWriter; Q8_0 with gguf-py's own quantizer. gguf-py has no K-quant encoder, so Q4_K and
Q6_K are encoded here (simple min/max scales, not llama.cpp's search) and checked against gguf-py's decoder in
tests/test_gguf.py. Every writer returns the official-named float32 values the file stores, decoded by gguf-py (the
weights "dequantized offline").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from comfy_files import official_dit_sd, proto_fields
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight|blocks\.\d+\.ffn\.[02]\.weight")
Q6_K_IN_K_M = re.compile(r".*\.v\.weight|.*ffn\.2\.weight")  # the _M recipes keep these in Q6_K
FILE_TYPES = {
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
}
QK_K = 256


# ------------------------------------------------------------------------------------------------ K-quants


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _scale_min_codes(values: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The part Q4_K and Q5_K share: 8 sub-blocks of 32 values per 256, each w = d·sc·q − dmin·m with 6-bit sc, m
    and codes q in 0..qmax. Returns (the 16 header bytes: fp16 d, fp16 dmin, 12 packed scale/min bytes;
    q uint8 [n, 8, 32])."""
    x = values.astype(np.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    lo = np.minimum(x.min(axis=2), 0.0)  # [n, 8]
    scale = (x.max(axis=2) - lo) / qmax
    mins = -lo
    d = _f16(scale.max(axis=1) / 63.0)
    dmin = _f16(mins.max(axis=1) / 63.0)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(np.round(scale / df), 0, 63), 0).astype(np.uint8)
        mn = np.where(dminf > 0, np.clip(np.round(mins / dminf), 0, 63), 0).astype(np.uint8)
        step = (df * sc)[:, :, None]
        q = np.where(step > 0, np.round((x + (dminf * mn)[:, :, None]) / step), 0)
    q = np.clip(q, 0, qmax).astype(np.uint8)  # [n, 8, 32]
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] & 0x30) << 2)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] & 0x30) << 2)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    head = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales], axis=1)
    return head, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of codes [n, 8, 32] packed two sub-blocks per 32 bytes: uint8 [n, 128]."""
    low = q & 0x0F
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(q.shape[0], 128)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 256) -> Q4_K blocks, uint8 [n, 144]: w = d·sc·q − dmin·m per 32 values."""
    head, q = _scale_min_codes(values, 15)
    return np.concatenate([head, _nibbles(q)], axis=1)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 256) -> Q5_K blocks, uint8 [n, 176]: as Q4_K with 5-bit codes, the fifth bit
    of sub-block i's value l stored as bit i of qh[l]."""
    head, q = _scale_min_codes(values, 31)
    qh = np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _nibbles(q)], axis=1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 256) -> Q6_K blocks, uint8 [n, 210]: w = d·sc·(q − 32) per 16 values."""
    x = values.astype(np.float32).reshape(-1, 16, 16)
    n = x.shape[0]
    sub = np.abs(x).max(axis=2) / 31.0  # [n, 16]
    d = _f16(sub.max(axis=1) / 127.0)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(np.round(sub / df), -128, 127), 0).astype(np.int8)
        step = (df * sc)[:, :, None]
        q = np.where(step != 0, np.round(x / step), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    h = high.reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)


_ENCODERS = {
    Q.Q8_0: lambda v: gguf.quants.quantize(v.reshape(-1, 32), Q.Q8_0),
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
}


# --------------------------------------------------------------------------------------------- DiT files


def block_type(name: str, ftype: str) -> Q:
    """The GGML type llama-quantize gives a block Linear weight in a `ftype` file (§3.4)."""
    if ftype == "Q8_0":
        return Q.Q8_0
    if ftype == "Q6_K":
        return Q.Q6_K
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return Q.Q6_K if Q6_K_IN_K_M.fullmatch(name) else Q.Q4_K if ftype == "Q4_K_M" else Q.Q5_K
    raise ValueError(f"no quantization recipe for {ftype}")


def dense_type(name: str, value: torch.Tensor) -> Q:
    """The converter's type for a tensor it does not quantize."""
    if value.dim() <= 1 or value.numel() <= 1024 or "modulation" in name or name == "patch_embedding.weight":
        return Q.F32
    return Q.BF16 if value.dtype == torch.bfloat16 else Q.F16


def write_gguf_dit(
    path: Path, official: Path, ftype: str, *, config: bool = True, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Write the official DiT folder `official` as a GGUF file of `ftype` ("Q8_0" or "Q4_K_M").

    config: store the folder's config.json under the key `config` (the tiny DiT's 2 heads are not dim / 128).
    prefix: prepended to every tensor name (`model.diffusion_model.` files exist too). Returns {official name:
    float32 values as stored}, decoded by gguf-py.
    """
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[ftype])
    if config:
        writer.add_string("config", (official / "config.json").read_text())
    stored: dict[str, torch.Tensor] = {}
    for name, value in official_dit_sd(official).items():
        full = prefix + name
        if BLOCK_LINEAR.fullmatch(name) and value.dim() == 2:
            qtype = block_type(name, ftype)
            data = value.float().numpy()
            if qtype != Q.Q8_0 and data.shape[-1] % QK_K:
                writer.add_array(f"comfy.gguf.orig_shape.{full}", [int(d) for d in data.shape])
                data = data.reshape(-1, QK_K)
            blocks = _ENCODERS[qtype](data.reshape(-1)).reshape(data.shape[0], -1)
            writer.add_tensor(full, blocks, raw_dtype=qtype)
            decoded = gguf.quants.dequantize(blocks, qtype)
        else:
            qtype = dense_type(name, value)
            if qtype == Q.F32:
                data = value.float().numpy()
                writer.add_tensor(full, data)
                decoded = data
            elif qtype == Q.F16:
                data = value.to(torch.float16).numpy()
                writer.add_tensor(full, data)
                decoded = data.astype(np.float32)
            else:
                raw = gguf.quants.quantize(value.float().numpy(), Q.BF16)
                writer.add_tensor(full, raw, raw_dtype=Q.BF16)
                decoded = gguf.quants.dequantize(raw, Q.BF16)
        stored[name] = torch.from_numpy(np.ascontiguousarray(decoded)).reshape(value.shape).float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def a14b_i2v_q4_k_m_tensors() -> dict[str, tuple[tuple[int, ...], Q]]:
    """Every tensor of a QuantStack I2V-A14B Q4_K_M expert: shapes of fact sheet §2.8, block Linears as §3.4 says
    (Q4_K, `.v` and `ffn.2` Q6_K), `patch_embedding.weight` F32. Every other tensor is stored in 2 bytes per value
    here: with that, the file has exactly the published size (9,651,728,896 B); with §3.4's F32 for the 1-D tensors
    and modulation it would be 9,840,768 B (= 2 bytes x their 4,920,384 values) larger. Whether F16 or BF16 does not
    change the size; BF16 is used."""
    c, f = 5120, 13824
    tensors: dict[str, tuple[tuple[int, ...], Q]] = {
        "patch_embedding.weight": ((c, 36, 1, 2, 2), Q.F32),
        "patch_embedding.bias": ((c,), Q.BF16),
        "text_embedding.0.weight": ((c, 4096), Q.BF16),
        "text_embedding.0.bias": ((c,), Q.BF16),
        "text_embedding.2.weight": ((c, c), Q.BF16),
        "text_embedding.2.bias": ((c,), Q.BF16),
        "time_embedding.0.weight": ((c, 256), Q.BF16),
        "time_embedding.0.bias": ((c,), Q.BF16),
        "time_embedding.2.weight": ((c, c), Q.BF16),
        "time_embedding.2.bias": ((c,), Q.BF16),
        "time_projection.1.weight": ((6 * c, c), Q.BF16),
        "time_projection.1.bias": ((6 * c,), Q.BF16),
        "head.modulation": ((1, 2, c), Q.BF16),
        "head.head.weight": ((64, c), Q.BF16),
        "head.head.bias": ((64,), Q.BF16),
    }
    for i in range(40):
        b = f"blocks.{i}."
        t = {b + "modulation": ((1, 6, c), Q.BF16)}
        t.update({b + "norm3.weight": ((c,), Q.BF16), b + "norm3.bias": ((c,), Q.BF16)})
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                t[f"{b}{attn}.{p}.weight"] = ((c, c), Q.Q6_K if p == "v" else Q.Q4_K)
                t[f"{b}{attn}.{p}.bias"] = ((c,), Q.BF16)
            t[f"{b}{attn}.norm_q.weight"] = ((c,), Q.BF16)
            t[f"{b}{attn}.norm_k.weight"] = ((c,), Q.BF16)
        t[b + "ffn.0.weight"] = ((f, c), Q.Q4_K)
        t[b + "ffn.0.bias"] = ((f,), Q.BF16)
        t[b + "ffn.2.weight"] = ((c, f), Q.Q6_K)
        t[b + "ffn.2.bias"] = ((c,), Q.BF16)
        tensors.update(t)
    return tensors


def write_gguf_header_only(path: Path, tensors: dict[str, tuple[tuple[int, ...], Q]], ftype: str) -> int:
    """A GGUF file whose header lists `tensors` ({name: (torch shape, type)}) and whose data section is a hole
    (a sparse file of the full size: its header is what a real file of these shapes holds, its data zeros).
    Returns the file's size."""
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[ftype])
    data_bytes = 0
    for name, (shape, qtype) in tensors.items():
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(shape))
        nbytes = numel // block * type_size
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        data_bytes += -(-nbytes // 32) * 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    size = -(-header // 32) * 32 + data_bytes
    if sys.platform == "win32":  # extending a file there allocates (and zeroes) the whole data section
        path.unlink()
        pytest.skip("header-only GGUF files need sparse files (not made on Windows)")
    with path.open("r+b") as f:
        f.truncate(size)  # sparse: no data blocks are written
    if path.stat().st_blocks * 512 > 64 * 2**20:
        path.unlink()
        pytest.skip(f"{path.parent} does not keep files sparse")
    return size


# ------------------------------------------------------------------------------------------------ UMT5 files

# official UMT5 names (§4.2) -> llama.cpp T5-encoder names (§3.4), as convert_hf_to_gguf.py writes them
_LLAMA_T5_BLOCK = {
    "attn.q.weight": "attn_q",
    "attn.k.weight": "attn_k",
    "attn.v.weight": "attn_v",
    "attn.o.weight": "attn_o",
    "pos_embedding.embedding.weight": "attn_rel_b",
    "norm1.weight": "attn_norm",
    "ffn.gate.0.weight": "ffn_gate",
    "ffn.fc1.weight": "ffn_up",
    "ffn.fc2.weight": "ffn_down",
    "norm2.weight": "ffn_norm",
}


def add_llama_t5_tokenizer(writer: gguf.GGUFWriter, spiece_model: Path) -> None:
    """The key-values llama.cpp's converter writes for a T5 sentencepiece tokenizer (`_set_vocab_sentencepiece`
    plus the T5 normalizer flags), read from `spiece.model` with sentencepiece and its proto's normalizer spec."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(kind)
    spec = next(v for n, v, _ in proto_fields(spiece_model.read_bytes()) if n == 3)  # normalizer_spec
    normalizer = {n: v for n, v, _ in proto_fields(spec)}
    writer.add_tokenizer_model("t5")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(normalizer.get(3, 1)))
    writer.add_remove_extra_whitespaces(bool(normalizer.get(4, 1)))
    if normalizer.get(2):
        writer.add_precompiled_charsmap(normalizer[2])
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.pad_id())
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)


def write_gguf_umt5(
    path: Path, official_t5: Path, ftype: str = "Q8_0", spiece_model: Path | None = None
) -> dict[str, torch.Tensor]:
    """The official UMT5 `.pth` as a city96-style `t5encoder` GGUF: llama.cpp names, 2-D weights in Q8_0 (the
    embedding included), 1-D and small tensors F32, and the tokenizer of `spiece_model` as llama.cpp key-values
    when given. Returns {llama.cpp name: float32 values as stored}."""
    if ftype != "Q8_0":
        raise ValueError("only Q8_0 UMT5 files are written here")
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[ftype])
    if spiece_model is not None:
        add_llama_t5_tokenizer(writer, spiece_model)
    stored = {}
    for key, value in torch.load(official_t5, map_location="cpu", weights_only=True).items():
        if key == "token_embedding.weight":
            name = "token_embd.weight"
        elif key == "norm.weight":
            name = "enc.output_norm.weight"
        else:
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
            name = f"enc.blk.{i}.{_LLAMA_T5_BLOCK[rest]}.weight"
        data = value.float().numpy()
        if data.ndim == 2 and data.size > 1024 and data.shape[-1] % 32 == 0:
            blocks = _ENCODERS[Q.Q8_0](data.reshape(-1)).reshape(data.shape[0], -1)
            writer.add_tensor(name, blocks, raw_dtype=Q.Q8_0)
            data = gguf.quants.dequantize(blocks, Q.Q8_0)
        else:
            writer.add_tensor(name, data)
        stored[name] = torch.from_numpy(np.ascontiguousarray(data)).reshape(value.shape).float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
