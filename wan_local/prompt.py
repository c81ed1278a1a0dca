"""Prompt cleaning and tokenization for the UMT5 text encoder.

Reproduces the reference tokenizer call (spec §4.4): every prompt is cleaned (ftfy, HTML-unescape twice,
whitespace collapse), then tokenized with ``padding="max_length"``, ``truncation=True`` and
``add_special_tokens=True``: EOS (``</s>``) is appended, sequences longer than ``max_length`` are cut so that
the EOS stays as the last token, and the rest is filled with the pad id.

The tokenizer follows ``tokenizer.json`` as written when the folder has one (this is what the reference's
fast tokenizer does; transformers 5.x ``AutoTokenizer`` would rebuild the pipeline from ``spiece.model`` and
ignore the file's pre-tokenizer). A folder with only ``spiece.model`` falls back to sentencepiece.
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

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        pad_id = self._tok.token_to_id(pad_token)
        self.pad_id = 0 if pad_id is None else int(pad_id)

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        # The library truncates the text part to max_length minus the post-processor's special tokens, so
        # the appended EOS survives truncation — the same path the reference's fast tokenizer takes.
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=True)]


class _SentencePieceBackend:
    """Fallback for folders with only ``spiece.model``: sentencepiece ids + EOS; slow-T5-tokenizer style."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise CheckpointError(f"{path}: the sentencepiece model defines no EOS token; T5 needs </s>.")
        pad_id = int(self._sp.pad_id())
        self.pad_id = pad_id if pad_id >= 0 else 0

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return [[*ids[: max_length - 1], self.eos_id] for ids in self._sp.encode(texts)]


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
    """

    def __init__(self, backend: _Backend, source: Path) -> None:
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
            backend: _Backend = _TokenizersBackend(folder / TOKENIZER_JSON, _pad_token_name(folder))
            logger.debug("Tokenizer: %s", folder / TOKENIZER_JSON)
        elif (folder / SPIECE_MODEL).is_file():
            backend = _SentencePieceBackend(folder / SPIECE_MODEL)
            logger.debug("Tokenizer: %s (sentencepiece fallback)", folder / SPIECE_MODEL)
        else:
            raise CheckpointError(
                f"Tokenizer folder {folder} has neither {TOKENIZER_JSON} nor {SPIECE_MODEL}; "
                "point it at the google/umt5-xxl tokenizer folder of the checkpoint."
            )
        return cls(backend, folder)

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
