"""Random Wan2.2 checkpoints of the real shapes (or toy ones), streamed to disk (for bench_realsize_cpu.py).

Two sets, each in a layout the engine reads (fact sheet /work/shared/spec/wan22-reference.md):
- `t2v-A14B-comfyui/`: ComfyUI files (§3.3): `diffusion_models/wan2.2_t2v_{high,low}_noise_14B_fp8_scaled
  .safetensors` (official names under `model.diffusion_model.`, every block Linear weight float8_e4m3fn with a
  0-dim float32 `.scale_weight`, a `scaled_fp8` marker), `text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`
  (bare transformers names, 7 fp8 Linears per layer + scales + marker), `vae/wan_2.1_vae.safetensors` (official
  names), and the `google/umt5-xxl/` tokenizer folder the engine needs next to them.
- `ti2v-5B-official/` (§3.1): bf16 `diffusion_pytorch_model-0000i-of-0000N.safetensors` shards (5 GB each, as
  diffusers' `save_pretrained` cuts them) + index + `config.json`, `models_t5_umt5-xxl-enc-bf16.pth` (§4.2 keys,
  bf16), `Wan2.2_VAE.pth` (float32), the tokenizer folder.

Names and shapes come from the engine's models built on the meta device and from `expected_umt5_shapes`; the
real sizes are checked against the parameter counts of the fact sheet. The spec leaves the dtype of the tensors a
ComfyUI file keeps in "higher precision" open; they are written as float16 (the repackaged files were converted
from the fp16 ones). Values are normal x 0.02 (fp8 weights: normal in fp8, x a positive scale near 0.02), drawn
from one random pool at rotating offsets: values do not change memory or speed. Writes stream in 64 MiB chunks,
so this process stays at a few hundred MB of RSS; `.pth` files are laid out by `torch.save` under `skip_data`
and their bytes (and zip CRCs) filled in afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.models.vae21 import VAE21Config, WanVAE21
from wan_local.models.vae22 import VAE22Config, WanVAE22
from wan_local.weights.umt5 import expected_umt5_shapes

log = logging.getLogger("realsize")

FP8 = torch.float8_e4m3fn
CHUNK_BYTES = 64 * 2**20
POOL_ELEMENTS = 16 * 2**20
DIT_PREFIX = "model.diffusion_model."
FP8_DIT_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight|blocks\.\d+\.ffn\.[02]\.weight")
FP8_UMT5_LINEAR = re.compile(r".*\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))\.weight")
TOKENIZER_FIXTURE = Path("/work/shared/fixtures/wan22-tiny/t2v-A14B/google/umt5-xxl")
TOKENIZER_DIR = "google/umt5-xxl"
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", FP8: "F8_E4M3", torch.uint8: "U8"}
#: Parameter counts from the fact sheet (§1.1, §3.1, §4.2), checked at real size.
SPEC_PARAMS = {"a14b": 14_288_491_584, "ti2v": 4_999_787_712, "umt5": 5_680_910_336, "vae21": 126_892_531}
SPEC_PARAMS["vae22"] = 704_688_668


@dataclass(frozen=True)
class Shapes:
    """One size set: the real one, or a toy one that runs through the same code in seconds."""

    name: str
    a14b: DiTConfig
    ti2v: DiTConfig
    umt5: dict[str, int]
    vae21: VAE21Config
    vae22: VAE22Config
    shard_bytes: int


def _dit(model_type: str, in_out: int, dim: int, ffn: int, heads: int, layers: int, text_dim: int) -> DiTConfig:
    return DiTConfig(model_type, in_out, in_out, dim, ffn, 256, heads, layers, text_dim=text_dim)


REAL = Shapes(
    "real",
    _dit("t2v", 16, 5120, 13824, 40, 40, 4096),
    _dit("ti2v", 48, 3072, 14336, 24, 30, 4096),
    {"vocab_size": 256384, "d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24},
    VAE21Config(),
    VAE22Config(),
    5 * 10**9,
)
# Toy: heads of 128 channels as in the real models (ComfyUI files carry no head count); vocab above the 300
# tokens of the fixture tokenizer.
TOY = Shapes(
    "toy",
    _dit("t2v", 16, 256, 512, 2, 2, 64),
    _dit("ti2v", 48, 256, 512, 2, 2, 64),
    {"vocab_size": 512, "d_model": 64, "d_ff": 128, "num_heads": 4, "num_layers": 2},
    VAE21Config(base_dim=8),
    VAE22Config(base_dim=8, decoder_base_dim=8),
    2 * 10**6,
)


@dataclass(frozen=True)
class Entry:
    """One tensor to write: `kind` is normal (x 0.02), fp8 (normal in fp8), scale (positive), or bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = "normal"
    payload: bytes = b""

    @property
    def nbytes(self) -> int:
        n = len(self.payload) if self.kind == "bytes" else 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


# ------------------------------------------------------------------------------------------ names and shapes


def _meta_state_dict(model_fn) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_fn().state_dict().items()}


def _umt5_config(u: dict[str, int]):
    from transformers import UMT5Config

    return UMT5Config(d_kv=u["d_model"] // u["num_heads"], relative_attention_num_buckets=32, **u)


def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def model_shapes(s: Shapes) -> dict[str, dict[str, tuple[int, ...]]]:
    """Official names -> shapes of every model (UMT5 in both namings); real sizes checked against the spec."""
    out = {
        "a14b": _meta_state_dict(lambda: WanDiT(s.a14b)),
        "ti2v": _meta_state_dict(lambda: WanDiT(s.ti2v)),
        "umt5": expected_umt5_shapes(_umt5_config(s.umt5), "official"),
        "umt5_hf": expected_umt5_shapes(_umt5_config(s.umt5), "transformers"),
        "vae21": _meta_state_dict(lambda: WanVAE21(s.vae21)),
        "vae22": _meta_state_dict(lambda: WanVAE22(s.vae22)),
    }
    if s.name == "real":
        counted = {k: _params(out[k]) for k in SPEC_PARAMS}
        wrong = {k: (counted[k], v) for k, v in SPEC_PARAMS.items() if counted[k] != v}
        if wrong:
            raise SystemExit(f"real shapes do not match the spec's parameter counts (counted, spec): {wrong}")
    return out


def comfy_fp8_entries(shapes: dict[str, tuple[int, ...]], linear: re.Pattern[str], prefix: str) -> list[Entry]:
    """ComfyUI fp8_scaled: fp8 weight + 0-dim float32 `.scale_weight` per Linear, float16 elsewhere, a marker."""
    entries = []
    for name, shape in shapes.items():
        if linear.fullmatch(name):
            entries.append(Entry(prefix + name, shape, FP8, "fp8"))
            entries.append(Entry(prefix + name.removesuffix(".weight") + ".scale_weight", (), torch.float32, "scale"))
        else:
            entries.append(Entry(prefix + name, shape, torch.float16))
    return [*entries, Entry(prefix + "scaled_fp8", (0,), FP8)]


def plain_entries(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> list[Entry]:
    return [Entry(k, v, dtype) for k, v in shapes.items()]


# ------------------------------------------------------------------------------------------ random bytes


class RandomBytes:
    """Bytes of one random pool per (kind, dtype), handed out at rotating offsets (finite, small values)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self._normal = torch.randn(POOL_ELEMENTS, generator=g)
        self._pools: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._cursor = 0

    def _pool(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        key = (kind, dtype)
        if key not in self._pools:
            x = self._normal
            values = {"fp8": x, "scale": 0.02 * (1 + 0.25 * torch.tanh(x))}.get(kind, 0.02 * x)
            self._pools[key] = values.to(dtype).view(torch.uint8)
        return self._pools[key]

    def chunks(self, entry: Entry):
        """The entry's bytes as uint8 tensors of at most CHUNK_BYTES."""
        if entry.kind == "bytes":
            yield torch.frombuffer(bytearray(entry.payload), dtype=torch.uint8)
            return
        pool, size = self._pool(entry.kind, entry.dtype), entry.dtype.itemsize
        left = entry.nbytes
        while left:
            n = min(left, CHUNK_BYTES, pool.numel() // 2)
            self._cursor = (self._cursor + 7919 * size) % (pool.numel() // 2)
            start = self._cursor - self._cursor % size
            yield pool[start : start + n]
            left -= n


# ------------------------------------------------------------------------------------------ writers


def write_safetensors(path: Path, entries: list[Entry], rng: RandomBytes) -> None:
    """A safetensors file written tensor by tensor, chunk by chunk (header first: offsets are known)."""
    header: dict[str, object] = {}
    offset = 0
    for e in entries:
        dtype = "U8" if e.kind == "bytes" else _ST_DTYPES[e.dtype]
        shape = [e.nbytes] if e.kind == "bytes" else list(e.shape)
        header[e.name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for e in entries:
            for chunk in rng.chunks(e):
                f.write(memoryview(chunk.numpy()))


class _Keys(pickle.Unpickler):
    """Reads a torch.save'd dict's pickle: key -> storage record name (nothing is built)."""

    def find_class(self, module: str, name: str):
        if name == "_rebuild_tensor_v2":
            return lambda storage, *_: storage
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        return lambda *a, **k: None

    def persistent_load(self, pid):
        return f"data/{pid[2]}"


def write_pth(path: Path, entries: list[Entry], rng: RandomBytes) -> None:
    """`torch.save` of a plain state dict: laid out with fake tensors under skip_data, then every storage's
    bytes written at its record offset and the zip CRCs (data descriptor + central directory) set."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)
    with zipfile.ZipFile(path) as z:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        pkl = next(n for n in infos if n.endswith("data.pkl"))
        record_of = _Keys(io.BytesIO(z.read(infos[pkl]))).load()
        start_dir = z.start_dir
    reader = torch._C.PyTorchFileReader(str(path))
    crcs = {}
    with open(path, "r+b") as f:
        for e in entries:
            record = record_of[e.name]
            offset, crc = reader.get_record_offset(record), 0
            f.seek(offset)
            for chunk in rng.chunks(e):
                data = memoryview(chunk.numpy())
                f.write(data)
                crc = zlib.crc32(data, crc)
            crcs[infos[record].filename] = crc
            f.seek(offset + e.nbytes)  # data descriptor: signature, crc32, sizes
            if f.read(4) != b"PK\x07\x08":
                raise RuntimeError(f"{path}: no data descriptor after {record}")
            f.write(struct.pack("<I", crc))
        f.seek(start_dir)
        for _ in infos:  # central directory: 46-byte header, crc32 at +16, then name / extra / comment
            pos = f.tell()
            head = f.read(46)
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", head, 28)
            name = f.read(name_len).decode()
            if name in crcs:
                f.seek(pos + 16)
                f.write(struct.pack("<I", crcs[name]))
            f.seek(pos + 46 + name_len + extra_len + comment_len)


# ------------------------------------------------------------------------------------------ the two sets


@dataclass(frozen=True)
class FileSpec:
    relpath: str
    entries: list[Entry]
    writer: str  # "safetensors" or "pth"

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def a14b_comfy_files(s: Shapes, m: dict, spiece: bytes | None) -> list[FileSpec]:
    te = comfy_fp8_entries(m["umt5_hf"], FP8_UMT5_LINEAR, "")
    if spiece is not None:  # Comfy-Org text encoders carry the tokenizer proto as a uint8 tensor (§3.3)
        te.append(Entry("spiece_model", (), torch.uint8, "bytes", spiece))
    dm = "diffusion_models/wan2.2_t2v_{}_noise_14B_fp8_scaled.safetensors"
    return [
        FileSpec(dm.format("high"), comfy_fp8_entries(m["a14b"], FP8_DIT_LINEAR, DIT_PREFIX), "safetensors"),
        FileSpec(dm.format("low"), comfy_fp8_entries(m["a14b"], FP8_DIT_LINEAR, DIT_PREFIX), "safetensors"),
        FileSpec("text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", te, "safetensors"),
        FileSpec("vae/wan_2.1_vae.safetensors", plain_entries(m["vae21"], torch.float16), "safetensors"),
    ]


def _shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > max_bytes:
            shards.append([])
        shards[-1].append(e)
    return shards


def ti2v_official_files(s: Shapes, m: dict) -> tuple[list[FileSpec], dict[str, object]]:
    """The 5B's files and its small json files (config.json, the shard index)."""
    shards = _shards(plain_entries(m["ti2v"], torch.bfloat16), s.shard_bytes)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = [FileSpec(n, sh, "safetensors") for n, sh in zip(names, shards, strict=True)]
    files += [
        FileSpec("models_t5_umt5-xxl-enc-bf16.pth", plain_entries(m["umt5"], torch.bfloat16), "pth"),
        FileSpec("Wan2.2_VAE.pth", plain_entries(m["vae22"], torch.float32), "pth"),
    ]
    c = s.ti2v
    config = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": c.dim, "eps": c.eps}
    config.update(ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, in_dim=c.in_dim, model_type=c.model_type)
    config.update(num_heads=c.num_heads, num_layers=c.num_layers, out_dim=c.out_dim, text_len=c.text_len)
    if c.text_dim != 4096:  # toy only: the real config.json leaves text_dim at its default (§1.4)
        config["text_dim"] = c.text_dim
    index = {
        "metadata": {"total_size": sum(f.nbytes for f in files[: len(shards)])},
        "weight_map": {e.name: n for n, sh in zip(names, shards, strict=True) for e in sh},
    }
    return files, {"config.json": config, "diffusion_pytorch_model.safetensors.index.json": index}


def _signature(f: FileSpec) -> str:
    text = json.dumps([(e.name, e.shape, str(e.dtype), e.kind, len(e.payload)) for e in f.entries])
    return f"{zlib.crc32(text.encode()):08x}-{f.nbytes}"


def write_set(folder: Path, files: list[FileSpec], small: dict[str, object], rng: RandomBytes) -> list[dict]:
    """Write (or reuse) every file of one set; returns per file its path, bytes and write seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / ".realsize-manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    todo = {f.relpath for f in files if manifest.get(f.relpath) != _signature(f) or not (folder / f.relpath).is_file()}
    need = sum(f.nbytes for f in files if f.relpath in todo) + 2 * 2**30
    free = shutil.disk_usage(folder).free
    if todo and free < need:
        raise SystemExit(f"{folder}: writing needs {need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB is free")
    report = []
    for f in files:
        path = folder / f.relpath
        reused = f.relpath not in todo
        start = time.perf_counter()
        if not reused:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            log.info("writing %s (%.2f GiB)", path, f.nbytes / 2**30)
            (write_safetensors if f.writer == "safetensors" else write_pth)(partial, f.entries, rng)
            os.replace(partial, path)
            manifest[f.relpath] = _signature(f)
            manifest_path.write_text(json.dumps(manifest, indent=1))
        seconds = round(time.perf_counter() - start, 2)
        report.append({"path": str(path), "bytes": path.stat().st_size, "reused": reused, "write_s": seconds})
    for name, data in small.items():
        (folder / name).write_text(json.dumps(data, indent=2))
    tokenizer = folder / TOKENIZER_DIR
    if not tokenizer.is_dir():
        shutil.copytree(TOKENIZER_FIXTURE, tokenizer)
    return report


def tokenizer_vocab(folder: Path = TOKENIZER_FIXTURE) -> int:
    """Tokens of the fixture tokenizer: every id it emits must be a row of the UMT5 embedding."""
    return len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])


def shapes_summary(s: Shapes) -> dict[str, object]:
    return asdict(s)
