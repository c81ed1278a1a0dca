"""Prompt cleaning and tokenization for the UMT5 text encoder.

Reproduces the reference tokenizer call (spec §4.4): every prompt is cleaned (ftfy, HTML-unescape twice,
whitespace collapse), then tokenized with ``padding="max_length"``, ``truncation=True`` and
``add_special_tokens=True``: EOS (``</s>``) is appended, sequences longer than ``max_length`` are cut so that
the EOS stays as the last token, and the rest is filled with the pad id.

Two tokenizers give these ids:

- ``tokenizer.json`` of a tokenizer folder, followed as written (what the reference's fast tokenizer runs;
  transformers 5.x ``AutoTokenizer`` would rebuild the pipeline from ``spiece.model`` and ignore the file's
  pre-tokenizer);
- a serialized sentencepiece ``ModelProto`` (a folder's ``spiece.model``, or the ``spiece_model`` tensor a
  ComfyUI text-encoder file carries, spec §3.3). sentencepiece applies the proto's own normalizer (charsmap,
  dummy prefix, whitespace rules); around it this module does what the fast tokenizer does with special-token
  strings typed in a prompt (``</s>``, ``<pad>``, ``<unk>`` become their ids, the text between them is
  tokenized piece by piece).
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Protocol

import torch

from wan_local.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

_WHITESPACE_RUN = re.compile(r"\s+")

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
#: Files of a tokenizer folder that decide its ids (what a cache key must cover).
TOKENIZER_FILES = (TOKENIZER_JSON, SPIECE_MODEL, "tokenizer_config.json", "special_tokens_map.json")

#: Texts two tokenizers of one checkpoint are compared on: plain and mixed-script prompts, digits and
#: punctuation, special-token strings inside a prompt, a long prompt (truncation).
PROBE_TEXTS = (
    "A red fox runs through fresh snow at sunrise, cinematic lighting.",
    "Two small boats drift on a calm blue lake. 湖面上的小船。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
    "ÀÉÎõü naïve café — 1280×720 @ 24 fps, 3.5/10!",
    "a </s> b <pad> c <unk>d</s>",
    "Tom &amp; Jerry\t  run\n\n away.",
    "A cat wearing sunglasses plays a tiny piano. " * 60,
)
PROBE_LENGTH = 512


def clean_prompt(text: str) -> str:
    """Clean a prompt the way the reference does before tokenizing (mode ``whitespace``).

    ``ftfy.fix_text``, HTML-unescape twice (so ``&amp;lt;`` becomes ``<``), strip, collapse every whitespace
    run to one space, strip again. Case and punctuation are kept.
    """
    import ftfy  # imported here: importing this module stays cheap

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


class _Backend(Protocol):
    pad_id: int

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with EOS appended, truncated to at most ``max_length`` (EOS kept), unpadded."""
        ...


class _TokenizersBackend:
    """``tokenizers.Tokenizer`` loaded from ``tokenizer.json``: normalizer, pre-tokenizer and post-processor
    (which appends EOS) exactly as the file says."""

    def __init__(self, path: Path, pad_token: str) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own exception type for any unreadable file
            raise CheckpointError(f"{path} is not a readable tokenizer.json ({exc}); download it again") from exc
        self._tok.no_padding()
        pad_id = self._tok.token_to_id(pad_token)
        self.pad_id = 0 if pad_id is None else int(pad_id)

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        # The library truncates the text part to max_length minus the post-processor's special tokens, so
        # the appended EOS survives truncation — the same path the reference's fast tokenizer takes.
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=True)]


# --------------------------------------------------------------------------------------- sentencepiece protos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message level: varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            size, pos = _varint(data, pos)
            out.append((number, data[pos : pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != len(data):
        raise ValueError("truncated message")
    return out


def proto_normalizer_flags(proto: bytes) -> dict[str, bool]:
    """``add_dummy_prefix`` and ``remove_extra_whitespaces`` of a sentencepiece ModelProto's normalizer_spec
    (field 3; the flags are its fields 3 and 4, both true when absent, as sentencepiece defines them)."""
    flags = {"add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for number, value in _fields(proto):
        if number == 3 and isinstance(value, bytes):
            for inner, flag in _fields(value):
                if inner == 3 and isinstance(flag, int):
                    flags["add_dummy_prefix"] = bool(flag)
                elif inner == 4 and isinstance(flag, int):
                    flags["remove_extra_whitespaces"] = bool(flag)
    return flags


class _SentencePieceBackend:
    """A sentencepiece ModelProto tokenizing as the T5 fast tokenizer built from it does.

    The fast tokenizer matches its special tokens (the proto's control and unknown pieces: ``<pad>``,
    ``</s>``, ``<unk>``) in the raw text first and tokenizes the pieces of text between them one by one: a piece
    loses its trailing spaces, and without a dummy prefix a leading space stays a ``▁``. sentencepiece does the
    rest with the proto's own normalizer. EOS is appended; truncation keeps it.
    """

    def __init__(self, proto: bytes, origin: str) -> None:
        import sentencepiece

        try:
            flags = proto_normalizer_flags(proto)
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (ValueError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{origin}: the sentencepiece tokenizer cannot be read ({exc})") from exc
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise CheckpointError(f"{origin}: the sentencepiece model defines no EOS token; T5 needs </s>.")
        pad_id = int(self._sp.pad_id())
        self.pad_id = pad_id if pad_id >= 0 else 0
        self._dummy_prefix = flags["add_dummy_prefix"]
        special = {
            self._sp.id_to_piece(i): i
            for i in range(self._sp.get_piece_size())
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        special = {piece: i for piece, i in special.items() if piece}
        self._special = special
        longest_first = sorted(special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if special else None

    def _ids(self, text: str) -> list[int]:
        if self._split is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
                continue
            part = part.rstrip()
            if not part:
                continue
            if not self._dummy_prefix and part[0].isspace():
                part = "\u2581" + part.lstrip()  # sentencepiece would drop the space the fast tokenizer keeps
            ids.extend(self._sp.encode(part))
        return ids

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return [[*self._ids(text)[: max_length - 1], self.eos_id] for text in texts]


def _pad_token_name(folder: Path) -> str:
    """Pad token spelled in ``tokenizer_config.json`` / ``special_tokens_map.json``; ``<pad>`` otherwise."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError) as exc:
            logger.warning("Ignoring unreadable %s: %s", path, exc)
            continue
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return "<pad>"


class PromptTokenizer:
    """Cleans and tokenizes prompts for UMT5: ``ids, mask = tok(texts, max_length)``.

    Invariants of the output (both int64, shape [B, max_length]): each row is the cleaned text's tokens, then
    EOS, then pad ids; ``mask`` is 1 on text tokens and EOS, 0 on padding; a text longer than
    ``max_length - 1`` tokens is cut so that position ``max_length - 1`` holds EOS.
    ``source`` names where the tokenizer came from (for messages).
    """

    def __init__(self, backend: _Backend, source: str) -> None:
        self._backend = backend
        self.source = source
        self.pad_id = backend.pad_id

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load from a tokenizer folder (e.g. ``<ckpt>/google/umt5-xxl``).

        Uses ``tokenizer.json`` when present (followed as written), else ``spiece.model``.
        Raises CheckpointError naming the folder if it has neither.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"Tokenizer folder {folder} does not exist or is not a folder.")
        if (folder / TOKENIZER_JSON).is_file():
            logger.debug("Tokenizer: %s", folder / TOKENIZER_JSON)
            path = folder / TOKENIZER_JSON
            return cls(_TokenizersBackend(path, _pad_token_name(folder)), str(path))
        if (folder / SPIECE_MODEL).is_file():
            logger.debug("Tokenizer: %s (sentencepiece)", folder / SPIECE_MODEL)
            return cls.from_sentencepiece((folder / SPIECE_MODEL).read_bytes(), str(folder / SPIECE_MODEL))
        raise CheckpointError(
            f"Tokenizer folder {folder} has neither {TOKENIZER_JSON} nor {SPIECE_MODEL}; "
            "point it at the google/umt5-xxl tokenizer folder of the checkpoint."
        )

    @classmethod
    def from_sentencepiece(cls, proto: bytes, source: str) -> PromptTokenizer:
        """Build from serialized sentencepiece ModelProto bytes (``source`` names where they came from)."""
        return cls(_SentencePieceBackend(bytes(proto), source), source)

    def __call__(self, texts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize ``texts``; returns ``(ids, mask)``, int64 tensors of shape [B, max_length]."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise InputError(f"texts must be a non-empty list of strings, got {type(texts).__name__}.")
        if not all(isinstance(t, str) for t in texts):
            raise InputError("texts must contain only strings.")
        if max_length < 2:
            raise InputError(f"max_length must be at least 2 (text + EOS), got {max_length}.")

        encoded = self._backend.encode([clean_prompt(t) for t in texts], max_length)
        ids = torch.full((len(encoded), max_length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(encoded), max_length), dtype=torch.int64)
        for row, seq in enumerate(encoded):  # loop over prompts only (B is 1 or 2)
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask


def first_disagreement(a: PromptTokenizer, b: PromptTokenizer) -> str | None:
    """None when ``a`` and ``b`` give the same ids on every probe text, else the first text that differs."""
    ids_a, _ = a(list(PROBE_TEXTS), PROBE_LENGTH)
    ids_b, _ = b(list(PROBE_TEXTS), PROBE_LENGTH)
    for text, row_a, row_b in zip(PROBE_TEXTS, ids_a, ids_b, strict=True):
        if not torch.equal(row_a, row_b):
            return text
    return None
