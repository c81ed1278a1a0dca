"""The sentencepiece model a GGUF T5 encoder carries as `tokenizer.ggml.*` key-values (llama.cpp's convention,
fact sheet §3.4), rebuilt as a serialized `ModelProto` the way ComfyUI-GGUF rebuilds it: the pieces with their
scores and types, a unigram trainer spec with the file's unk / eos / pad ids (no bos), and the normalizer's
`add_dummy_prefix` (= `add_space_prefix`), `remove_extra_whitespaces` and `precompiled_charsmap`.

The proto is written with a few lines of protobuf wire format (no protobuf dependency): `sentencepiece` loads
the bytes with `SentencePieceProcessor(model_proto=...)`, exactly as it loads the `spiece_model` tensor of a
ComfyUI text-encoder file. `gguf_carries_tokenizer` / `read_gguf_tokenizer` take a path, as a text-encoder file
type's tokenizer reader does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from wan_local.errors import CheckpointError
from wan_local.weights.gguf.reader import GGUFFile, file_identity, read_gguf

PREFIX = "tokenizer.ggml."
_UNIGRAM = 1  # TrainerSpec.ModelType
_NORMAL = 1  # SentencePiece.Type


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields are sign-extended to 64 bits, as protobuf does
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value: int | float | bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def _message(fields: Iterable[tuple[int, int | float | bytes | str]]) -> bytes:
    return b"".join(_field(n, v) for n, v in fields)


def has_tokenizer(gf: GGUFFile) -> bool:
    """Whether the file carries a sentencepiece (T5) tokenizer as key-values."""
    return gf.kv.get(PREFIX + "model") == "t5" and PREFIX + "tokens" in gf.kv


def sentencepiece_model_from_gguf(gf: GGUFFile) -> bytes:
    """The serialized sentencepiece ModelProto of a GGUF T5 tokenizer (CheckpointError if it has none)."""
    kv = gf.kv
    if not has_tokenizer(gf):
        raise CheckpointError(
            f"{gf.path} carries no T5 tokenizer (tokenizer.ggml.model is {kv.get(PREFIX + 'model')!r}); "
            "put the tokenizer folder (google/umt5-xxl/) beside it"
        )
    tokens = kv[PREFIX + "tokens"]
    scores = kv.get(PREFIX + "scores") or [0.0] * len(tokens)
    types = kv.get(PREFIX + "token_type") or [_NORMAL] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise CheckpointError(f"{gf.path}: {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types")
    pieces = b"".join(
        _field(1, _message(((1, str(t)), (2, float(s)), (3, int(k)))))
        for t, s, k in zip(tokens, scores, types, strict=True)
    )
    trainer = _message(
        (
            (3, _UNIGRAM),
            (40, int(kv.get(PREFIX + "unknown_token_id", 2))),
            (41, int(kv.get(PREFIX + "bos_token_id", -1)) if kv.get(PREFIX + "add_bos_token") else -1),
            (42, int(kv.get(PREFIX + "eos_token_id", 1))),
            (43, int(kv.get(PREFIX + "padding_token_id", 0))),
        )
    )
    normalizer = _message(
        (
            (2, bytes(kv.get(PREFIX + "precompiled_charsmap") or b"")),
            (3, int(bool(kv.get(PREFIX + "add_space_prefix", True)))),
            (4, int(bool(kv.get(PREFIX + "remove_extra_whitespaces", True)))),
            (5, 1),  # escape_whitespaces
        )
    )
    return pieces + _field(2, trainer) + _field(3, normalizer)


def gguf_carries_tokenizer(path: Path) -> bool:
    """Whether the GGUF file at `path` carries a T5 tokenizer (header only)."""
    return has_tokenizer(read_gguf(path))


#: Rebuilt protos of the last few GGUF text encoders, by file identity: a real umt5-xxl vocabulary (256,384
#: pieces) takes about a second to rebuild, and every job start asks for it (the prompt cache key).
_PROTOS: dict[tuple, bytes | None] = {}
_CACHED_PROTOS = 4


def read_gguf_tokenizer(path: Path) -> bytes | None:
    """The sentencepiece ModelProto of the GGUF file at `path`, or None when it carries no tokenizer."""
    path = Path(path)
    key = file_identity(path)
    if key not in _PROTOS:
        gf = read_gguf(path)
        while len(_PROTOS) >= _CACHED_PROTOS:
            _PROTOS.pop(next(iter(_PROTOS)))
        _PROTOS[key] = sentencepiece_model_from_gguf(gf) if has_tokenizer(gf) else None
    return _PROTOS[key]
