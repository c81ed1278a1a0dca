"""On-disk cache of UMT5 prompt embeddings, so a repeated prompt skips loading the 11 GB text encoder.

An entry is one safetensors file `<key>.safetensors` holding the tensor "embedding" ([L, d_model], in the dtype the
encoder ran in, trimmed to the prompt's true length) plus metadata naming the key and the format version. The key
(`cache_key`) is a sha256 over everything that decides the embedding: the text-encoder file(s) identity (resolved
path, size, mtime), the tokenizer's identity (a content hash: of a tokenizer folder's files, or of the sentencepiece
model a ComfyUI text-encoder file carries; `wan_local.weights.tokenizer_source`), the cleaned prompt, the max
token length, the dtype and `FORMAT_VERSION`. The encoder file is identified by size + mtime rather than a content
hash: hashing 11 GB on every run would cost more than the encode it saves (the tokenizer is a few MB).

Writes are atomic (temporary file in the cache folder + os.replace, `wan_local.tempfiles`), so concurrent readers
see whole files or nothing. An unreadable or inconsistent file counts as a miss and is removed. The folder is
capped in bytes; the least recently used entries (oldest mtime, refreshed on every hit) are evicted after each put.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wan_local.errors import InputError
from wan_local.prompt import clean_prompt
from wan_local.tempfiles import atomic_write

logger = logging.getLogger(__name__)

#: Bump when the key recipe or the file layout changes (old entries then simply miss and age out).
FORMAT_VERSION = 2
#: Default folder size cap. A 512-token bf16 UMT5-XXL embedding is 4 MiB; typical prompts are a fraction of that.
DEFAULT_MAX_BYTES = 512 * 2**20
_SUFFIX = ".safetensors"
_TENSOR_NAME = "embedding"


def default_cache_dir() -> Path:
    """The per-user cache folder for prompt embeddings (see wan_local.paths)."""
    from wan_local import paths

    return paths.cache_dir() / "prompt-embeddings"


def _file_identity(path: Path) -> list:
    """[name relative to `path`, size, mtime_ns] for a file, or for every file under a folder (sorted)."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    raise InputError(f"{path} does not exist: cannot identify it for the prompt cache")


def cache_key(
    text_encoder_path: str | Path,
    tokenizer_identity: str,
    text: str,
    dtype: torch.dtype,
    max_length: int = 512,
) -> str:
    """sha256 hex key of the embedding of `text` by this encoder + tokenizer, run in `dtype`.

    `tokenizer_identity` is the tokenizer's content hash (`TokenizerSource.identity()`). The prompt is cleaned
    first (`clean_prompt`), so prompts that tokenize the same share a key. Any change to the encoder file(s) (path,
    size, mtime), to the tokenizer, to the text, dtype, max_length or the format version changes the key.
    """
    if not tokenizer_identity:
        raise InputError("the prompt cache key needs the tokenizer's identity")
    encoder = Path(text_encoder_path).resolve()
    recipe = {
        "format": FORMAT_VERSION,
        "text_encoder": [str(encoder), _file_identity(encoder)],
        "tokenizer": tokenizer_identity,
        "text": clean_prompt(text),
        "max_length": int(max_length),
        "dtype": str(dtype),
    }
    blob = json.dumps(recipe, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


class PromptCache:
    """Folder of cached prompt embeddings with a byte cap and LRU eviction (see the module docstring).

    cache_dir: created on first put; None uses `default_cache_dir()`.
    max_bytes: total size the folder is trimmed to after every put (the entry just written is kept even if it
        alone is larger).
    """

    def __init__(self, cache_dir: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise InputError(f"prompt cache max_bytes must be > 0; got {max_bytes}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_bytes = int(max_bytes)

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise InputError(f"prompt cache key must be a sha256 hex digest; got {key!r}")
        return self.cache_dir / f"{key}{_SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor for `key` (on the CPU), or None on a miss. A damaged entry is removed and misses."""
        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                consistent = names == [_TENSOR_NAME] and meta.get("key") == key
                consistent = consistent and meta.get("format") == str(FORMAT_VERSION)
                # A copy: no view of the file's mapping survives (a mapped file cannot be deleted on Windows).
                tensor = f.get_tensor(_TENSOR_NAME).clone() if consistent else None
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            logger.warning("prompt cache entry %s is unreadable (%s); removing it", path.name, exc)
            self._remove(path)
            return None
        if tensor is None:
            logger.warning("prompt cache entry %s does not hold this key's embedding; removing it", path.name)
            self._remove(path)
            return None
        # Refresh the LRU position; the entry may have been evicted by another process meanwhile (the tensor we
        # read stays valid).
        with contextlib.suppress(OSError):
            os.utime(path)
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store `tensor` (any device; saved from the CPU) under `key` atomically, then evict down to the cap."""
        path = self._path(key)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        data = {_TENSOR_NAME: tensor.detach().to("cpu").contiguous()}
        with atomic_write(path, mode=None, suffix=".tmp") as tmp:  # not *.safetensors: never listed as an entry
            save_file(data, str(tmp), metadata={"key": key, "format": str(FORMAT_VERSION)})
        self._evict(keep=path)

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor for `key`, or `compute()` stored and returned (its own device and dtype)."""
        cached = self.get(key)
        if cached is not None:
            return cached
        tensor = compute()
        self.put(key, tensor)
        return tensor

    def entries(self) -> list[Path]:
        """Entry files, least recently used first."""
        if not self.cache_dir.is_dir():
            return []
        found = []
        for path in self.cache_dir.glob(f"*{_SUFFIX}"):
            try:
                found.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:
                continue  # removed by another process meanwhile
        return [p for _, p in sorted(found)]

    def total_bytes(self) -> int:
        """Bytes held by the entries."""
        return sum(_size(p) for p in self.entries())

    def clear(self) -> None:
        """Remove every entry."""
        for path in self.entries():
            self._remove(path)

    def _evict(self, keep: Path) -> None:
        entries = self.entries()
        total = sum(_size(p) for p in entries)
        for path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            total -= _size(path)
            self._remove(path)
            logger.debug("prompt cache: evicted %s", path.name)

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
