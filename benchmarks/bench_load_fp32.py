"""Official fp32 DiT shards loaded as bf16 (and quantized to int8): peak RSS against bf16 size + one block, and load
speed against the raw read speed of the same files, measured in the same run.

    python benchmarks/bench_load_fp32.py                     # A14B shapes, 6 of the 40 blocks: 9.4 GB fp32, 6 shards
    python benchmarks/bench_load_fp32.py --blocks 8 --repeats 3
    python benchmarks/bench_load_fp32.py --blocks 2 --repeats 1 --skip-quant     # quick

The checkpoints are random weights of the real T2V-A14B expert shapes (dim 5120, ffn 13824, 40 heads, text_dim
4096; every non-block tensor, `--blocks` of the 40 blocks), written by `bench_load.write_checkpoints` in the
official layout (`config.json` of a `WanModel`, `diffusion_pytorch_model-0000i-of-0000N.safetensors` + index),
split into `--shards` shards as the official experts are (6), once in float32 and once in bf16. Every case runs
`--repeats` times, each in a fresh Python process (`bench_load.run_case`: page cache dropped with
posix_fadvise(DONTNEED) and checked with mincore() for "cold", files read once first for "warm", peak RSS = VmHWM
reset after the imports, so mapped file pages count):

- raw-{cold,warm}-fp32: plain reads of every shard into one 16 MiB buffer (the disk's / page cache's speed);
- fp32-as-bf16-{cold,warm}: `load_dit(folder, dtype=bf16)`, then every page touched (what a CPU run does first);
- fp32-as-bf16-before-cold: the same with the loader before this change (the memory-mapped state dict checked and
  converted with `.to`), for the comparison in the same run (`--skip-before` leaves it out);
- bf16-{cold}: the bf16 files loaded as bf16 (zero-copy mapped, no conversion), raw-cold-bf16 its read speed;
- int8-first-start-cold: `load_quantized_dit(fp32 folder, "int8", cache=QuantCache)` with an empty cache
  (quantize layer by layer, write the cache, fsync); int8-second-start-cold: the cache hit.

Bound (issue 14): peak RSS over the imports <= bf16 bytes of the model + one bf16 block (`bound_bytes`); int8:
<= the int8 model + one bf16 block. `load_over_raw` = (file bytes / load seconds) / raw read speed, same cache
state. Writes benchmarks/results/load-fp32-<device>-<date>.json; the scratch checkpoints are deleted afterwards
unless `--keep`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_load
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GB = 1e9
log = logging.getLogger("bench_load_fp32")


def _convert_mapped(sd, dtype, *, check=None, keep=(), **_):
    """The loader before per-tensor reads: every tensor memory-mapped, checked, then copied with `.to(dtype)`."""
    from wan_local.weights.convert import as_tensor

    mapped = {k: as_tensor(v) for k, v in sd.items()}
    bad = check(mapped) if check is not None else []
    out = {
        k: v.to(dtype) if k not in keep and v.is_floating_point() and v.dtype != dtype else v for k, v in mapped.items()
    }
    return out, bad


def touch_case(case: dict) -> dict:
    """Allocate the bf16 model's tensors and write every page once: what faulting in fresh memory costs (any loader
    that makes a bf16 copy in RAM pays it; a raw read into one reused buffer does not)."""
    from common import peak_rss, reset_peak_rss, rss

    from wan_local.models.dit import DiTConfig, WanDiT

    cfg = {k: v for k, v in case["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = [tuple(t.shape) for t in WanDiT(DiTConfig(**cfg)).state_dict().values()]
    reset_peak_rss()
    rss0 = rss()
    t0 = time.perf_counter()
    tensors = [torch.empty(shape, dtype=torch.bfloat16) for shape in shapes]
    for t in tensors:
        t.view(-1)[:: mmap.PAGESIZE // 2].fill_(0)
    total = time.perf_counter() - t0
    nbytes = sum(t.numel() * 2 for t in tensors)
    peak = peak_rss()
    out = {"total_s": total, "bytes": nbytes, "rss_before": rss0, "peak_rss": peak, "peak_rss_delta": peak - rss0}
    return {**out, "drop": None}


def run_case(case: dict) -> dict:
    """One case in this fresh process (bench_load's worker; "before" swaps in the mapped conversion)."""
    if case["kind"] == "touch":
        return touch_case(case)
    if case.pop("before", False):
        from wan_local.weights import loading

        loading.load_state_dict = _convert_mapped
    return bench_load.run_case(case)


def _spawn(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {case['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_bytes(args: argparse.Namespace) -> dict[str, int]:
    """bf16 bytes of the whole benchmark model and of one block; int8 bytes of the quantized model (all scope)."""
    from wan_local.memory.quant.numerics import is_quant_target
    from wan_local.models.dit import DiTConfig, WanDiT

    cfg = {k: v for k, v in bench_load.dit_config(args).items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in WanDiT(DiTConfig(**cfg)).state_dict().items()}
    bf16 = sum(2 * math.prod(s) for s in shapes.values())
    block = sum(2 * math.prod(s) for k, s in shapes.items() if k.startswith("blocks.0."))
    int8 = 0
    for key, shape in shapes.items():
        layer, _, leaf = key.rpartition(".")
        quantized = leaf == "weight" and is_quant_target(layer, "all")
        int8 += math.prod(shape) + 4 * shape[0] if quantized else 2 * math.prod(shape)
    return {"bf16_bytes": bf16, "block_bf16_bytes": block, "int8_bytes": int8}


def build_cases(args: argparse.Namespace, folders: dict[str, Path], device: str) -> list[dict]:
    fp32, bf16 = folders["fp32"], folders["bf16"]
    f32_files = [str(p) for p in bench_load.shard_files(fp32)]
    b16_files = [str(p) for p in bench_load.shard_files(bf16)]
    base = {"device": device, "folder": str(fp32), "files": f32_files, "file_dtype": "fp32"}
    cases = [
        {**base, "name": "raw-cold-fp32", "kind": "raw", "dtype": "fp32", "cold": True},
        {**base, "name": "fp32-as-bf16-cold", "kind": "load", "dtype": "bf16", "cold": True, "raw": "raw-cold-fp32"},
    ]
    if not args.skip_before:
        before = {"kind": "load", "dtype": "bf16", "cold": True, "raw": "raw-cold-fp32", "before": True}
        cases.append({**base, **before, "name": "fp32-as-bf16-before-cold"})
    cases += [
        {**base, "name": "raw-warm-fp32", "kind": "raw", "dtype": "fp32", "cold": False},
        {**base, "name": "fp32-as-bf16-warm", "kind": "load", "dtype": "bf16", "cold": False, "raw": "raw-warm-fp32"},
    ]
    b16 = {"device": device, "folder": str(bf16), "files": b16_files, "file_dtype": "bf16", "dtype": "bf16"}
    cases += [
        {**b16, "name": "raw-cold-bf16", "kind": "raw", "cold": True},
        {**b16, "name": "bf16-cold", "kind": "load", "cold": True, "raw": "raw-cold-bf16"},
    ]
    touch = {"device": device, "name": "touch-bf16", "kind": "touch", "config": bench_load.dit_config(args)}
    cases.append({**touch, "files": [], "cold": False})
    if not args.skip_quant:
        cache = str(args.workdir / "quant-cache")
        q = {**base, "dtype": "bf16", "cache": cache, "cold": True, "raw": "raw-cold-fp32"}
        cases.append({**q, "name": "int8-first-start-cold", "kind": "quant-first"})
        cases.append({**q, "name": "int8-second-start-cold", "kind": "quant-second", "extra_files": f32_files})
    return [c for c in cases if not args.only or c["name"] in args.only]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=6, help="blocks of the A14B expert's 40 (all non-block tensors)")
    p.add_argument("--shards", type=int, default=6, help="shards per checkpoint (the official experts have 6)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wan-local-bench-load-fp32")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run (else deleted)")
    p.add_argument("--skip-before", action="store_true", help="leave out the loader-before comparison")
    p.add_argument("--skip-quant", action="store_true")
    p.add_argument("--only", nargs="+", help="run only these cases (names as logged)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(run_case(json.loads(args.worker))) + "\n")  # the parent reads this line
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # bench_load's checkpoint writer, at the real A14B widths.
    args.dim, args.ffn_dim, args.heads, args.layers = 5120, 13824, 40, args.blocks
    sizes = model_bytes(args)
    args.shard_mb = math.ceil(sizes["bf16_bytes"] * 2 * 1.05 / args.shards / 1e6)  # whole tensors per shard
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = bench_load.write_checkpoints(args, ["fp32", "bf16"])
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bound = sizes["bf16_bytes"] + sizes["block_bf16_bytes"]
    results: dict[str, dict] = {}
    try:
        for case in build_cases(args, folders, device):
            if case["kind"] == "quant-second":
                case["files"] = [str(f) for f in sorted((args.workdir / "quant-cache").glob("*.safetensors"))]
            runs = [_spawn(dict(case)) for _ in range(1 if case.get("before") else args.repeats)]
            summary = bench_load._summary(runs)
            if case.get("raw") in results:
                raw = results[case["raw"]]
                summary["raw_case"] = case["raw"]
                summary["load_over_raw_best"] = summary["gb_per_s_best"] / raw["gb_per_s_best"]
                summary["load_over_raw_median"] = summary["gb_per_s_median"] / raw["gb_per_s_median"]
            if case["kind"] not in ("raw", "touch"):
                limit = bound if case["kind"] == "load" else sizes["int8_bytes"] + sizes["block_bf16_bytes"]
                summary["bound_bytes"] = limit
                summary["peak_over_bound"] = summary["peak_rss_delta_max"] / limit
            results[case["name"]] = {**summary, "file_bytes": runs[0]["bytes"], "case": case, "runs": runs}
            log.info(
                "%-26s min %.2f s  median %.2f s  %.2f GB/s  peak RSS +%.2f GB%s%s%s",
                case["name"],
                summary["s_min"],
                summary["s_median"],
                summary["gb_per_s_best"],
                summary["peak_rss_delta_max"] / GB,
                f" (bound {summary['bound_bytes'] / GB:.2f})" if "bound_bytes" in summary else "",
                f"  load/raw {summary['load_over_raw_best']:.0%}" if "load_over_raw_best" in summary else "",
                "  (page cache NOT dropped)" if summary["cache_drop_failed"] else "",
            )
    finally:
        if not args.keep:
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(args.workdir / "quant-cache", ignore_errors=True)
    mounts = sorted(psutil.disk_partitions(all=True), key=lambda d: -len(d.mountpoint))
    disk = next((d for d in mounts if str(args.workdir.resolve()).startswith(d.mountpoint)), None)
    report = {
        "benchmark": "dit_load_fp32",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "filesystem": None if disk is None else {"device": disk.device, "type": disk.fstype},
        "config": bench_load.dit_config(args),
        "sizes": sizes,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "target": "fp32 loaded as bf16: peak RSS over imports <= bf16 model + one bf16 block; speed vs raw reads",
        "cases": results,
    }
    out = args.out or RESULTS / f"load-fp32-{device}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
