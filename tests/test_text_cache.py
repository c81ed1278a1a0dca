"""The on-disk prompt-embedding cache: keys, hits and misses, atomic writes, corrupt entries, LRU eviction."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from wan_local.errors import InputError
from wan_local.text_cache import PromptCache, cache_key, default_cache_dir
from wan_local.weights.tokenizer_source import TokenizerSource


@pytest.fixture
def encoder_files(tmp_path: Path, tiny: Path) -> tuple[Path, Path]:
    """A private copy of the tiny text encoder file and tokenizer folder (so tests may touch them)."""
    enc = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    shutil.copy(tiny / "t2v-A14B" / enc.name, enc)
    tok = tmp_path / "google" / "umt5-xxl"
    shutil.copytree(tiny / "t2v-A14B" / "google" / "umt5-xxl", tok)
    return enc, tok


def _tid(folder: Path) -> str:
    return TokenizerSource(folder, None).identity()


def _embedding(seed: int, length: int = 7, dim: int = 32) -> torch.Tensor:
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _key(n: int) -> str:
    return f"{n:064x}"


def _set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


# ------------------------------------------------------------------------------------------------ keys
def test_key_is_stable_and_ignores_cleanable_differences(encoder_files) -> None:
    enc, tok = encoder_files
    key = cache_key(enc, _tid(tok), "a cat  on a   skateboard", torch.bfloat16)
    assert len(key) == 64 and key == cache_key(enc, _tid(tok), "a cat  on a   skateboard", torch.bfloat16)
    # The prompt is cleaned as the tokenizer cleans it: whitespace runs and HTML entities do not matter.
    assert key == cache_key(str(enc), _tid(tok), " a cat on a skateboard\n", torch.bfloat16)
    assert cache_key(enc, _tid(tok), "Tom &amp; Jerry", torch.bfloat16) == cache_key(
        enc, _tid(tok), "Tom & Jerry", torch.bfloat16
    )


def test_key_changes_with_text_dtype_and_length(encoder_files) -> None:
    enc, tok = encoder_files
    base = cache_key(enc, _tid(tok), "a cat", torch.bfloat16)
    assert cache_key(enc, _tid(tok), "a dog", torch.bfloat16) != base
    assert cache_key(enc, _tid(tok), "A cat", torch.bfloat16) != base  # case is kept by the cleaning
    assert cache_key(enc, _tid(tok), "a cat", torch.float32) != base
    assert cache_key(enc, _tid(tok), "a cat", torch.bfloat16, max_length=256) != base


def test_key_changes_with_encoder_file(encoder_files, tmp_path: Path) -> None:
    enc, tok = encoder_files
    base = cache_key(enc, _tid(tok), "a cat", torch.bfloat16)
    st = enc.stat()
    os.utime(enc, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    touched = cache_key(enc, _tid(tok), "a cat", torch.bfloat16)
    assert touched != base
    with open(enc, "ab") as f:  # replaced by a different file
        f.write(b"\0")
    assert cache_key(enc, _tid(tok), "a cat", torch.bfloat16) not in (base, touched)
    moved = tmp_path / "elsewhere.pth"
    shutil.copy2(enc, moved)  # same size and mtime, other path
    assert cache_key(moved, _tid(tok), "a cat", torch.bfloat16) != cache_key(enc, _tid(tok), "a cat", torch.bfloat16)


def test_key_changes_with_the_tokenizer_contents(encoder_files) -> None:
    """The tokenizer enters the key by content (TokenizerSource.identity): same bytes, same key; other ids-deciding
    bytes, another key; a file the tokenizer never reads does not matter."""
    enc, tok = encoder_files
    base = cache_key(enc, _tid(tok), "a cat", torch.bfloat16)
    st = (tok / "tokenizer.json").stat()
    os.utime(tok / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched only
    assert cache_key(enc, _tid(tok), "a cat", torch.bfloat16) == base
    (tok / "README.md").write_text("notes")
    assert cache_key(enc, _tid(tok), "a cat", torch.bfloat16) == base
    keys = {base}
    for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json"):
        with open(tok / name, "ab") as f:
            f.write(b" ")
        keys.add(cache_key(enc, _tid(tok), "a cat", torch.bfloat16))
    assert len(keys) == 4
    with pytest.raises(InputError, match="identity"):
        cache_key(enc, "", "a cat", torch.bfloat16)


def test_key_of_missing_encoder_raises(tmp_path: Path, encoder_files) -> None:
    _, tok = encoder_files
    with pytest.raises(InputError, match="does not exist"):
        cache_key(tmp_path / "nope.pth", _tid(tok), "a cat", torch.bfloat16)


def test_default_cache_dir_is_per_user() -> None:
    path = default_cache_dir()
    assert "wan-local" in str(path) and path.is_absolute()


# ------------------------------------------------------------------------------------------------ get / put
def test_miss_then_hit_roundtrips_exactly(tmp_path: Path, encoder_files) -> None:
    enc, tok = encoder_files
    cache = PromptCache(tmp_path / "cache")
    key = cache_key(enc, _tid(tok), "a cat", torch.bfloat16)
    assert cache.get(key) is None  # folder does not even exist yet
    emb = _embedding(0)
    cache.put(key, emb)
    got = cache.get(key)
    assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, emb)
    assert cache.get(cache_key(enc, _tid(tok), "a dog", torch.bfloat16)) is None
    # Only the entry is left in the folder (the temporary file was renamed into place).
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.safetensors"]


def test_get_or_compute_computes_once(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return _embedding(1)

    first = cache.get_or_compute(_key(1), compute)
    second = cache.get_or_compute(_key(1), compute)
    assert len(calls) == 1 and torch.equal(first, second)


def test_put_overwrites(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    cache.put(_key(1), _embedding(1))
    cache.put(_key(1), _embedding(2, length=3))
    assert torch.equal(cache.get(_key(1)), _embedding(2, length=3))
    assert len(cache.entries()) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_a_miss_and_removed(tmp_path: Path, damage: str) -> None:
    cache = PromptCache(tmp_path)
    cache.put(_key(1), _embedding(1))
    path = tmp_path / f"{_key(1)}.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-7], "garbage": b"not a safetensors file" * 4, "empty": b""}[damage])
    assert cache.get(_key(1)) is None
    assert not path.exists()
    cache.put(_key(1), _embedding(1))  # and the cache recovers
    assert torch.equal(cache.get(_key(1)), _embedding(1))


def test_entry_under_the_wrong_name_is_a_miss(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    cache.put(_key(1), _embedding(1))
    os.replace(tmp_path / f"{_key(1)}.safetensors", tmp_path / f"{_key(2)}.safetensors")
    assert cache.get(_key(2)) is None  # the stored key does not match the file name
    assert cache.entries() == []


def test_invalid_key_and_cap(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="sha256"):
        PromptCache(tmp_path).get("../../etc/passwd")
    with pytest.raises(InputError, match="max_bytes"):
        PromptCache(tmp_path, max_bytes=0)


# ------------------------------------------------------------------------------------------------ eviction
def test_lru_eviction_by_mtime(tmp_path: Path) -> None:
    probe = PromptCache(tmp_path / "probe")
    probe.put(_key(0), _embedding(0))
    entry_bytes = probe.total_bytes()

    cache = PromptCache(tmp_path / "cache", max_bytes=3 * entry_bytes)
    for n in (1, 2, 3):
        cache.put(_key(n), _embedding(n))
        _set_mtime(cache.cache_dir / f"{_key(n)}.safetensors", 1_000 + n)
    assert cache.get(_key(1)) is not None  # a hit refreshes entry 1: entry 2 is now the oldest
    cache.put(_key(4), _embedding(4))
    names = {p.name for p in cache.entries()}
    assert names == {f"{_key(n)}.safetensors" for n in (1, 3, 4)}
    assert cache.total_bytes() <= cache.max_bytes


def test_entry_larger_than_the_cap_is_kept_alone(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path, max_bytes=10)
    cache.put(_key(1), _embedding(1))
    cache.put(_key(2), _embedding(2))
    assert [p.name for p in cache.entries()] == [f"{_key(2)}.safetensors"]
    cache.clear()
    assert cache.entries() == [] and cache.total_bytes() == 0
