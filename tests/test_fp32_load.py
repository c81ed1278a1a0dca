"""float32 checkpoints loaded in another dtype: per-tensor plain reads into the final storage, bit-identical to
converting the whole file, never holding the mapped file and its copy together.

References are independent of the loader: `safetensors.torch.load_file` (the library's own reader) and torch's
`.to(dtype)`; quantized weights against `quantize_weight` of the same library-read tensor. The fixtures are the
tiny official checkpoints (t2v-A14B/high_noise_model: fp32 in 2 shards + index; ti2v-5B: one fp32 file).

Memory is counted, not sampled from RSS (a tiny file is lost in RSS noise): `HeldBytes` is a dispatch mode that
adds up every distinct CPU storage an op returns while it lives. A tensor of a memory-mapped file is a view of a
storage spanning the whole file, so a loader that maps the file counts the file's bytes; copies and buffers count
their own bytes. Reads go through a counting reader that also samples the count at every read.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wan_local.errors import CheckpointError
from wan_local.memory.quant.cache import QuantCache
from wan_local.memory.quant.formats import load_quantized_dit
from wan_local.memory.quant.numerics import is_quant_target, quantize_weight
from wan_local.weights import convert, files
from wan_local.weights.convert import BUFFERS, FileReader, read_tensors
from wan_local.weights.files import open_sharded_safetensors, read_sharded_safetensors
from wan_local.weights.loading import load_dit

SHARDED = "t2v-A14B/high_noise_model"
SINGLE = "ti2v-5B"
SMALL_CHUNK = 4096  # so the tiny tensors span several chunks and the buffers are small next to the model


def _library(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors as the safetensors library reads them (every shard, copied into memory)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _block_bytes(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(t.numel() * dtype.itemsize for k, t in sd.items() if k.startswith("blocks.0."))


def _mapped_from(t: torch.Tensor) -> Path | None:
    """The file whose memory mapping holds `t`'s data (from /proc/self/maps), or None (anonymous memory)."""
    address = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


class HeldBytes(TorchDispatchMode):
    """Bytes of the distinct CPU storages that ops returned and that are still alive; `peak` the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def sample(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        held = sum(n for _, n in self.live.values())
        self.peak = max(self.peak, held)
        return held

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.sample()
        return out


class CountingReader(FileReader):
    """FileReader that records every read (path, offset, bytes)."""

    reads: ClassVar[list[tuple[Path, int, int]]] = []

    def readinto(self, path: Path, offset: int, out: memoryview) -> None:
        CountingReader.reads.append((path, offset, len(out)))
        super().readinto(path, offset, out)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch):
    """Every read of the conversion path goes through CountingReader, in chunks of SMALL_CHUNK bytes."""
    monkeypatch.setattr(convert, "FileReader", CountingReader)
    monkeypatch.setattr(convert, "CHUNK_BYTES", SMALL_CHUNK)
    monkeypatch.setattr(CountingReader, "reads", [])
    return CountingReader


# ------------------------------------------------------------------------------------------- same values


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("folder", [SHARDED, SINGLE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loaded_values_are_the_files_values_in_dtype_bit_for_bit(folder, dtype, tiny, counted):
    reference = _library(tiny / folder)
    assert {t.dtype for t in reference.values()} == {torch.float32}  # the fixtures are fp32, as official A14B shards
    sd = load_dit(tiny / folder, dtype=dtype).state_dict()
    assert set(sd) == set(reference)
    for key, value in reference.items():
        assert sd[key].dtype == dtype, key
        assert torch.equal(_bits(sd[key]), _bits(value.to(dtype))), key
    if dtype == torch.float32:  # no conversion: zero-copy views of the file, nothing read by plain reads
        assert counted.reads == []
        assert all(_mapped_from(sd[k]).parent == tiny / folder for k in reference)
    else:  # converted: every stored byte read exactly once, in chunks, nothing left mapped
        spans = sorted((str(path), offset, offset + n) for path, offset, n in counted.reads)
        assert sum(end - start for _, start, end in spans) == sum(t.numel() * 4 for t in reference.values())
        assert all(a[0] != b[0] or a[2] <= b[1] for a, b in itertools.pairwise(spans))  # no byte read twice
        assert max(end - start for _, start, end in spans) <= SMALL_CHUNK
        assert all(_mapped_from(sd[k]) is None for k in reference)


def test_read_tensors_keeps_the_given_order_across_shards_and_chunk_sizes(tiny):
    folder = tiny / SHARDED
    stored = open_sharded_safetensors(folder)
    reference = _library(folder)
    keys = sorted(stored, key=lambda k: -stored[k].numel())  # not file order
    for chunk in (64, 1000, 1 << 20):
        values, bad, stats = read_tensors([stored[k] for k in keys], torch.bfloat16, chunk_bytes=chunk)
        assert bad == [] and stats.bytes_read == sum(stored[k].nbytes for k in keys)
        for key, value in zip(keys, values, strict=True):
            assert torch.equal(_bits(value), _bits(reference[key].bfloat16())), (chunk, key)


def test_converting_never_maps_the_source_file(tiny, monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path} was memory-mapped during a conversion")

    monkeypatch.setattr(files, "read_safetensors", refuse)
    model = load_dit(tiny / SHARDED, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --------------------------------------------------------------------------------------------- memory


def test_fp32_as_bf16_holds_at_most_the_bf16_model_plus_the_buffers(tiny, counted):
    folder = tiny / SHARDED
    reference = _library(folder)
    bf16_bytes = sum(t.numel() * 2 for t in reference.values())
    fp32_bytes = 2 * bf16_bytes
    held = HeldBytes()

    sample = CountingReader.readinto

    def readinto(self, path, offset, out):
        held.sample()  # the reader thread asks too: what is alive while a chunk is read
        sample(self, path, offset, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CountingReader, "readinto", readinto)
        with torch.no_grad(), held:
            model = load_dit(folder, dtype=torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == bf16_bytes
    # Measured: exactly the bf16 model + BUFFERS chunk buffers. The bound: bf16 size + one block.
    assert held.peak <= bf16_bytes + BUFFERS * SMALL_CHUNK
    assert held.peak <= bf16_bytes + _block_bytes(reference, torch.bfloat16)
    assert held.peak >= bf16_bytes  # the count sees the model being made

    # The same count sees a mapped file: converting the memory-mapped state dict (the loader before) holds the
    # fp32 file and the bf16 copies together.
    before = HeldBytes()
    with torch.no_grad(), before:
        mapped = read_sharded_safetensors(folder)
        copies = {k: v.to(torch.bfloat16) for k, v in mapped.items()}
    assert before.peak >= fp32_bytes + bf16_bytes > bf16_bytes + _block_bytes(reference, torch.bfloat16)
    del copies, mapped


def test_int8_from_fp32_holds_the_quantized_model_plus_one_layer(tiny, counted):
    folder = tiny / SHARDED
    reference = _library(folder)
    held = HeldBytes()
    with torch.no_grad(), held:
        model = load_quantized_dit(folder, "int8", "all", torch.bfloat16)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest_fp32 = max(t.numel() * 4 for t in reference.values())
    # One layer read in fp32, quantize_weight's float32 rows buffer of the same size and its per-row temporaries.
    assert held.peak <= model_bytes + 2 * largest_fp32 + 16 * 1024
    assert held.peak <= model_bytes + _block_bytes(reference, torch.float32)
    for key, value in reference.items():  # the same int8 values as quantizing the library-read fp32 tensor
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and is_quant_target(layer, "all"):
            q, scale = quantize_weight(value, "int8", key)
            module = model.get_submodule(layer)
            assert torch.equal(module.weight, q) and torch.equal(module.scale, scale), key
        else:
            assert torch.equal(_bits(model.state_dict()[key]), _bits(value.bfloat16())), key


def test_int8_cache_from_fp32_equals_quantizing_in_memory(tiny, tmp_path, counted):
    folder = tiny / SINGLE
    first = load_quantized_dit(folder, "int8", "all", torch.bfloat16, cache=QuantCache(tmp_path / "cache"))
    plain = load_quantized_dit(folder, "int8", "all", torch.bfloat16)
    for (name, a), (_, b) in zip(first.state_dict().items(), plain.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), name


# --------------------------------------------------------------------------------------- bad files, logs


def test_nan_inside_a_later_chunk_is_named(tiny, tmp_path, counted):
    folder = Path(shutil.copytree(tiny / SHARDED, tmp_path / "dit"))
    shard = sorted(folder.glob("*.safetensors"))[1]
    tensors = load_file(str(shard))
    name = max(tensors, key=lambda k: tensors[k].numel())
    assert tensors[name].numel() * 4 > 2 * SMALL_CHUNK
    tensors[name].view(-1)[-1] = float("inf")  # in the tensor's last chunk
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        load_dit(folder, dtype=torch.bfloat16)
    assert name in str(info.value) and "damaged" in str(info.value)


def test_truncated_shard_is_reported_before_any_read(tiny, tmp_path, counted):
    folder = Path(shutil.copytree(tiny / SHARDED, tmp_path / "dit"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="re-download") as info:
        load_dit(folder, dtype=torch.bfloat16)
    assert str(shard) in str(info.value) and counted.reads == []


def test_a_long_read_says_what_it_does_and_how_long_it_takes(tiny, monkeypatch, caplog):
    monkeypatch.setattr(convert, "ANNOUNCE_BYTES", 0)  # the fixtures are tiny: announce any read
    monkeypatch.setattr(convert, "_ESTIMATE_AFTER_S", 0.0)
    with caplog.at_level(logging.INFO, logger="wan_local.weights.convert"):
        read_tensors(list(open_sharded_safetensors(tiny / SHARDED).values()), torch.bfloat16, chunk_bytes=4096)
    text = caplog.text
    assert "reading float32 weights from" in text and "converting to bfloat16" in text and "GB to read" in text
    assert "GB read at" in text and "GB/s: about" in text and "s left" in text
    assert "read 0.0 GB in" in text and "in memory" in text
