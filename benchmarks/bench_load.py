"""DiT load time and peak RSS against the raw disk read speed of the same files, cold and warm page cache.

    python benchmarks/bench_load.py                                  # dim 2048, 16 layers (2.2 GB bf16, 4.4 GB fp32)
    python benchmarks/bench_load.py --layers 4 --repeats 3           # smaller, quicker
    python benchmarks/bench_load.py --dim 5120 --ffn-dim 13824 --heads 40 --layers 40   # a real A14B expert

The benchmark first writes random DiT checkpoints in the official layout (config.json of a `WanModel`, sharded
`diffusion_pytorch_model-0000i-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`), once
stored in bfloat16 and once in float32, into `--workdir` (reused by later runs with the same shape). Then every
case runs `--repeats` times, each time in a fresh Python process so that peak RSS and allocator state do not mix:

- raw-{cold,warm}: read every shard with plain `readinto` calls into one 16 MiB buffer (what the disk and page
  cache deliver; nothing is kept).
- load-{cold,warm}: `wan_local.weights.loading.load_dit` (memory-mapped safetensors, meta construction, assign)
  and then the move to the device: `model.to("cuda")` on CUDA; on the CPU, where the pipeline computes straight
  from the mapped file, every page of every tensor is touched instead (that is when the bytes are read).
- fp32 file loaded as bf16 (the official A14B shards are believed to be fp32; the pipeline runs in bf16).
- int8 first start: `load_quantized_dit(..., "int8", cache=QuantCache)` with an empty cache (quantize, write
  the cache file, fsync), then the move; int8 second start: the same call on the cache hit, cold and warm.

"cold": before the run, every file involved is dropped from the page cache with posix_fadvise(DONTNEED) and the
dropped fraction is checked with mincore(); "cache_resident_before" reports what was still cached (it cannot
drop pages that other processes map, and a VM host may still cache the disk below us). "warm": the files are read
once before the timed run. Peak RSS is the kernel's high-water mark (VmHWM, reset after imports), so it includes
the file pages mapped by the load (an mmap'd model is resident, not copied).

Target from the issue: load >= 80 % of the raw read speed (ratio "load_over_raw", same cache state).
Writes benchmarks/results/load-<device>-<date>.json with device, torch version and date.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import logging
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from common import peak_rss, reset_peak_rss, rss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEM = "diffusion_pytorch_model"
GB = 1e9
READ_CHUNK = 16 << 20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
log = logging.getLogger("bench_load")


# --------------------------------------------------------------------------------------------- page cache


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not a POSIX libc (Windows)
        return None


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore over a shared read-only mapping); None if unknown."""
    libc = _libc()
    if libc is None:
        return None
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(addr), size, vec)
            libc.munmap(ctypes.c_void_p(addr), size)
            if rc != 0:
                return None
        finally:
            os.close(fd)
        resident += int(torch.frombuffer(bytearray(vec), dtype=torch.uint8).bitwise_and(1).sum())
        total += pages
    return resident / total if total else 0.0


def drop_cache(paths: list[Path]) -> dict:
    """Ask the kernel to drop the files' pages (posix_fadvise DONTNEED per file) and say how much stayed."""
    if not hasattr(os, "posix_fadvise"):
        return {"dropped": False, "why": "posix_fadvise is not available on this OS", "resident_after": None}
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = resident_fraction(paths)
    ok = after is not None and after < 0.01
    why = None if ok else ("mincore unavailable" if after is None else f"{after:.1%} of the pages are still cached")
    return {"dropped": ok, "why": why, "resident_after": after}


def read_files(paths: list[Path]) -> int:
    """Read every byte of `paths` with plain unbuffered reads into one reused buffer; returns the byte count."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    n = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while r := f.readinto(view):
                n += r
    return n


# ----------------------------------------------------------------------------------------------- RSS


# ---------------------------------------------------------------------------------------- checkpoints


def dit_config(args: argparse.Namespace) -> dict:
    """The official `WanModel` config.json of the benchmark checkpoint."""
    return {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "in_dim": 16,
        "out_dim": 16,
        "dim": args.dim,
        "ffn_dim": args.ffn_dim,
        "freq_dim": 256,
        "num_heads": args.heads,
        "num_layers": args.layers,
        "text_len": 512,
        "text_dim": 4096,
        "eps": 1e-6,
    }


def checkpoint_dir(args: argparse.Namespace, variant: str) -> Path:
    shape = f"d{args.dim}-f{args.ffn_dim}-h{args.heads}-l{args.layers}-s{args.shard_mb:g}"
    return args.workdir / f"dit-{shape}-{variant}"


def shard_files(folder: Path) -> list[Path]:
    """The shard files an official folder's index names (what a load reads)."""
    index = json.loads((folder / f"{STEM}.safetensors.index.json").read_text())
    return [folder / name for name in sorted(set(index["weight_map"].values()))]


def write_checkpoints(args: argparse.Namespace, variants: list[str]) -> dict[str, Path]:
    """Write the random checkpoints (all variants from the same float32 values, shard by shard); reuse them when a
    previous run left complete ones. Values: uniform(-a, a) with a = fan_in^-0.5 (cheap; values do not matter)."""
    from safetensors.torch import save_file

    from wan_local.models.dit import DiTConfig, WanDiT

    config = dit_config(args)
    folders = {v: checkpoint_dir(args, v) for v in variants}
    todo = [v for v, f in folders.items() if not (f / "complete").is_file()]
    if not todo:
        log.info("reusing checkpoints in %s", args.workdir)
        return folders
    cfg_fields = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in WanDiT(DiTConfig(**cfg_fields)).state_dict().items()}
    # Group keys into shards by size in the widest variant (fp32), in the model's own key order.
    limit = args.shard_mb * 1e6
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    n = len(groups)
    names = [f"{STEM}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for v in todo:
        if folders[v].exists():
            shutil.rmtree(folders[v])
        folders[v].mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for name, keys in zip(names, groups, strict=True):
        tensors = {}
        for key in keys:
            shape = shapes[key]
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            tensors[key] = torch.empty(shape).uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=gen)
        for v in todo:
            path = folders[v] / name
            save_file({k: t.to(DTYPES[v]).contiguous() for k, t in tensors.items()}, str(path), {"format": "pt"})
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        del tensors
    for v in todo:
        folder = folders[v]
        weight_map = {key: name for name, keys in zip(names, groups, strict=True) for key in keys}
        total = sum(math.prod(s) for s in shapes.values()) * DTYPES[v].itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "complete").write_text("ok\n")
    log.info("wrote %s (%d shards each) in %.1f s", ", ".join(todo), n, time.perf_counter() - t0)
    return folders


# --------------------------------------------------------------------------------------------- worker


def _touch(model: torch.nn.Module) -> int:
    """Read one byte of every page of every tensor (faults mapped file pages in); returns a checksum."""
    total = 0
    step = mmap.PAGESIZE
    for t in (*model.parameters(), *model.buffers()):
        flat = t.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::step].sum()) + int(flat[-1])
    return total


def _materialize(model: torch.nn.Module, device: str) -> None:
    if device == "cuda":
        model.to(device)
        torch.cuda.synchronize()
    else:
        _touch(model)


def run_case(case: dict) -> dict:
    """One case in this (fresh) process.

    case: kind ("raw", "load", "quant-first", "quant-second"), files (the bytes the case reads: shards, or the cache
    file on a cache hit), extra_files (also dropped / warmed: the shards on a cache hit, whose headers are read),
    folder, dtype, device, cache (folder), cold.
    """
    from wan_local.memory.quant.cache import QuantCache
    from wan_local.memory.quant.formats import load_quantized_dit
    from wan_local.models.dit import DiTConfig, WanDiT
    from wan_local.weights.loading import load_dit

    files = [Path(p) for p in case["files"]]
    kind, device = case["kind"], case["device"]
    # One-off per process, not per load: the first op on the meta device imports torch._dynamo (~0.8 s here).
    t0 = time.perf_counter()
    with torch.device("meta"):
        WanDiT(DiTConfig("t2v", 16, 16, 64, 128, 256, 1, 1, text_dim=64))
    process_warmup_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # CUDA context outside the timed region
    warm_paths = files + [Path(p) for p in case.get("extra_files", [])]
    if kind == "quant-first":
        shutil.rmtree(case["cache"], ignore_errors=True)
    if case["cold"]:
        drop = drop_cache(warm_paths)
    else:
        read_files(warm_paths)
        drop = None
    resident_before = resident_fraction(warm_paths)
    reset_ok = reset_peak_rss()
    rss0 = rss()
    out: dict = {"resident_before": resident_before, "drop": drop, "peak_reset": reset_ok}
    out["process_warmup_s"] = process_warmup_s  # excluded from the timings
    t0 = time.perf_counter()
    if kind == "raw":
        nbytes = read_files(files)
        out["read_s"] = time.perf_counter() - t0
        out["total_s"] = out["read_s"]
        out["bytes"] = nbytes
    else:
        dtype = DTYPES[case["dtype"]]
        folder = Path(case["folder"])
        if kind == "load":
            model = load_dit(folder, dtype=dtype)
        else:
            model = load_quantized_dit(folder, "int8", "all", dtype, cache=QuantCache(Path(case["cache"])))
        t1 = time.perf_counter()
        _materialize(model, device)
        t2 = time.perf_counter()
        out.update({"load_call_s": t1 - t0, "materialize_s": t2 - t1, "total_s": t2 - t0})
        out["bytes"] = sum(p.stat().st_size for p in files)
        out["model_bytes"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        if device == "cuda":
            out["cuda_allocated"] = torch.cuda.memory_allocated()
    out["resident_after"] = resident_fraction(files)
    if case.get("extra_files"):  # a cache hit should leave the source shards unread
        out["extra_resident_after"] = resident_fraction([Path(p) for p in case["extra_files"]])
    out["rss_before"] = rss0
    out["peak_rss"] = peak_rss()
    out["peak_rss_delta"] = out["peak_rss"] - rss0
    return out


# ---------------------------------------------------------------------------------------------- parent


def _spawn(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {case['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    totals = [r["total_s"] for r in runs]
    nbytes = runs[0]["bytes"]
    return {
        "s_min": min(totals),
        "s_median": statistics.median(totals),
        "gb_per_s_best": nbytes / min(totals) / GB,
        "gb_per_s_median": nbytes / statistics.median(totals) / GB,
        "peak_rss_max": max(r["peak_rss"] for r in runs),
        "peak_rss_delta_max": max(r["peak_rss_delta"] for r in runs),
        "cache_drop_failed": any(r["drop"] is not None and not r["drop"]["dropped"] for r in runs),
    }


def build_cases(args: argparse.Namespace, folders: dict[str, Path], device: str) -> list[dict]:
    cases = []
    for v, folder in folders.items():
        files = [str(p) for p in shard_files(folder)]
        for cold in (True, False):
            temp = "cold" if cold else "warm"
            base = {"files": files, "folder": str(folder), "device": device, "cold": cold, "file_dtype": v}
            cases.append({**base, "name": f"raw-{temp}-{v}", "kind": "raw", "dtype": v})
            cases.append({**base, "name": f"load-{temp}-{v}", "kind": "load", "dtype": v, "raw": f"raw-{temp}-{v}"})
            if v == "fp32" and not args.skip_convert:
                name = f"load-{temp}-fp32-as-bf16"
                cases.append({**base, "name": name, "kind": "load", "dtype": "bf16", "raw": f"raw-{temp}-fp32"})
    if not args.skip_quant and args.quant_source in folders:
        folder = folders[args.quant_source]
        files = [str(p) for p in shard_files(folder)]
        cache = str(args.workdir / "quant-cache")
        base = {"folder": str(folder), "device": device, "dtype": "bf16", "cache": cache}
        src = args.quant_source
        cases.append({**base, "name": "int8-first-start-cold", "kind": "quant-first", "files": files, "cold": True})
        for cold, temp in ((True, "cold"), (False, "warm")):
            name = f"int8-second-start-{temp}"  # "files" (the cache file) are filled in once the first start ran
            case = {**base, "name": name, "kind": "quant-second", "extra_files": files, "cold": cold}
            cases.append({**case, "raw": f"raw-{temp}-{src}"})
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn-dim", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--shard-mb", type=float, default=1000.0, help="shard size limit (of the fp32 variant), MB")
    p.add_argument("--variants", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wan-local-bench-load")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run (else deleted)")
    p.add_argument("--skip-quant", action="store_true")
    p.add_argument("--skip-convert", action="store_true", help="skip loading the fp32 file as bf16")
    p.add_argument("--quant-source", choices=list(DTYPES), default="bf16")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(run_case(json.loads(args.worker))) + "\n")  # the parent reads this line
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = write_checkpoints(args, args.variants)
    quant_cache = args.workdir / "quant-cache"
    cases = build_cases(args, folders, device)
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[str, dict] = {}
    for case in cases:
        if case["kind"] == "quant-second":
            case["files"] = [str(p) for p in sorted(quant_cache.glob("*.safetensors"))]
            if not case["files"]:
                raise RuntimeError(f"the int8 first start left no cache file in {quant_cache}")
        runs = [_spawn(case) for _ in range(args.repeats)]
        summary = _summary(runs)
        if "raw" in case and case["raw"] in results:
            raw = results[case["raw"]]
            summary["raw_case"] = case["raw"]
            summary["load_over_raw_best"] = summary["gb_per_s_best"] / raw["gb_per_s_best"]
            summary["load_over_raw_median"] = summary["gb_per_s_median"] / raw["gb_per_s_median"]
        results[case["name"]] = {**summary, "file_bytes": runs[0]["bytes"], "case": case, "runs": runs}
        log.info(
            "%-26s min %.2f s  median %.2f s  %.2f GB/s (best)  peak RSS %.2f GB (+%.2f)%s%s",
            case["name"],
            summary["s_min"],
            summary["s_median"],
            summary["gb_per_s_best"],
            summary["peak_rss_max"] / GB,
            summary["peak_rss_delta_max"] / GB,
            f"  load/raw {summary['load_over_raw_best']:.0%}" if "load_over_raw_best" in summary else "",
            "  (page cache NOT dropped)" if summary["cache_drop_failed"] else "",
        )
    mounts = sorted(psutil.disk_partitions(all=True), key=lambda d: -len(d.mountpoint))
    disk = next((d for d in mounts if str(args.workdir.resolve()).startswith(d.mountpoint)), None)
    report = {
        "benchmark": "dit_load",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "workdir": str(args.workdir),
        "filesystem": None if disk is None else {"device": disk.device, "type": disk.fstype},
        "config": dit_config(args),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "target": "load >= 80 % of the raw read speed of the same files, same cache state",
        "cases": results,
    }
    out = args.out or RESULTS / f"load-{device}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    if not args.keep:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(quant_cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
