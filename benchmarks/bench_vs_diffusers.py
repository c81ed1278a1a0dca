"""Our DiT (resident and block-streamed) against diffusers' group offloading: same weights, same tokens, same cap.

    python benchmarks/bench_vs_diffusers.py                          # CPU part, plus the CUDA part when CUDA is present
    python benchmarks/bench_vs_diffusers.py --cpu-only
    python benchmarks/bench_vs_diffusers.py --layers 40 --size 480p --vram-gb 0 24 16
    python benchmarks/bench_vs_diffusers.py --layers 40 --size 720p --vram-gb 0 24 16

Weights: a diffusers `WanTransformer3DModel` is built with random weights (linear weights N(0, 1/fan_in), norm
scales around 1, the time projection scaled down so gates stay small, as in trained models) and its state dict is
renamed into our `WanDiT` with `wan_local.weights.keymaps.dit_diffusers_to_official`: both models hold the very
same tensors (benchmarks/dit_pair.py). In bf16 runs the tensors follow diffusers' `from_pretrained(torch_dtype=
bfloat16)` convention: the modules listed in `_keep_in_fp32_modules` (time embedder, scale-shift tables, affine
norms) stay float32.

Modes, each timed per forward (one warm-up, then `--repeats`; min and median), with peak VRAM from
`torch.cuda.max_memory_allocated`:
(a) resident: our WanDiT entirely on the device, under bf16 autocast (the pipeline's regime);
(b) streamed: our WanDiT with every block streamed by `wan_local.memory.streaming.BlockStreamer` (pinned host
    slabs, `--depth` + 1 reused device buffers, prefetch on a copy stream), non-block weights resident;
(c) diffusers: `enable_group_offload(offload_type="block_level", num_blocks_per_group=1, use_stream=True)` (CUDA
    only), run as diffusers' pipelines run it: bf16 weights, no autocast.

CUDA part: the real A14B shape (dim 5120, ffn 13824, 40 heads, `--layers` blocks, 40 by default), one CFG branch,
480p 81 frames (latent 21x60x104 -> 32,760 tokens) or `--size 720p` (21x90x160 -> 75,600 tokens), 512 text tokens.
Each `--vram-gb` emulates a card: the caching allocator is capped with `torch.cuda.set_per_process_memory_fraction`
to (GiB - `--context-gib`) (the CUDA context lives outside the allocator); 0 means uncapped. A mode that does not
fit records its out-of-memory error. Outputs are compared to the resident output (uncapped run): streamed must be
bit-identical, diffusers differs by its own bf16 rounding (reported, bounded by `--bf16-bound`).

CPU part (always, unless --skip-cpu): a small configuration in float32: (a) and (b) must be bit-identical, and
diffusers' plain forward (no offloading; group offloading with streams needs CUDA) must match within
`FP32_BOUND` (relative L2; measured ~1e-6: diffusers computes the sinusoid in fp32 and fuses attention
differently). The same weights rounded to bf16 are also run (ours under CPU bf16 autocast, diffusers in bf16) and
every pair's error is reported against the fp32 output.

Writes benchmarks/results/vs-diffusers-<device>-<date>.json with device, torch and diffusers versions and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from common import rel_l2, rss
from dit_pair import (
    diffusers_forward,
    diffusers_kwargs,
    keep_fp32,
    make_inputs,
    our_config,
    ours_forward,
    ours_from,
    random_diffusers,
)

from wan_local.memory.streaming import BlockStreamer, block_nbytes, move_unstreamed
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.keymaps import dit_diffusers_to_official

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GB, GIB = 1e9, 2**30
SIZES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # latent T, H, W of 832x480 / 1280x720, 81 frames
# Relative L2 of our fp32 output to diffusers' fp32 output; measured ~1e-6 (tests/test_formats.py uses the same).
FP32_BOUND = 1e-5
log = logging.getLogger("bench_vs_diffusers")


def _timed(fn: Callable[[], torch.Tensor], repeats: int, sync: Callable[[], None]) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up (diffusers' first group-offloaded forward also traces the execution order)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, out


def _times(times: list[float]) -> dict:
    return {"s": times, "s_min": min(times), "s_median": statistics.median(times)}


def _stream_stats(streamer: BlockStreamer) -> dict:
    s = streamer.read_stats()
    n = max(s.forwards, 1)
    return {
        "bytes_per_forward": s.bytes_moved / n,
        "stall_s_per_forward": s.stall_s / n,
        "copy_s_per_forward": s.copy_s / n,
        "pinned_bytes": s.pinned_bytes,
        "pageable_bytes": s.pageable_bytes,
        "device_buffer_bytes": s.device_buffer_bytes,
    }


# ---------------------------------------------------------------------------------------------------- CPU


def bench_cpu(args: argparse.Namespace) -> dict:
    """Small float32 configuration on the CPU: (a) == (b) bit for bit, and our output vs diffusers'."""
    kw = diffusers_kwargs(args.cpu_dim, args.cpu_ffn_dim, args.cpu_heads, args.cpu_layers)
    cfg = our_config(kw)
    cpu = torch.device("cpu")
    ref = random_diffusers(kw, None, cpu)
    sd = dit_diffusers_to_official(ref.state_dict())
    resident = ours_from(sd, cfg, cpu)
    streamed = ours_from(sd, cfg, cpu)  # the same tensors; the streamer moves this model's into its slabs
    streamer = BlockStreamer(streamed, range(cfg.num_layers), cpu, args.depth, timing=True).install()
    inp = make_inputs(tuple(args.cpu_latent), None)
    fns = {
        "resident": ours_forward(resident, inp, None),
        "streamed": ours_forward(streamed, inp, None),
        "diffusers_plain": diffusers_forward(ref, inp, None),
    }
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    streamer.reset_stats()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.cpu_repeats):  # interleaved, so load from other processes hits every mode alike
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    stats = _stream_stats(streamer)
    streamer.uninstall()
    equal = torch.equal(outs["resident"], outs["streamed"])
    err = rel_l2(outs["resident"], outs["diffusers_plain"])
    log.info(
        "CPU fp32 (dim %d, %d layers, %d tokens): resident %.3f s, streamed %.3f s, diffusers (no offload) %.3f s "
        "per forward (min); streamed == resident: %s; ours vs diffusers rel L2 %.2e (bound %.0e)",
        cfg.dim,
        cfg.num_layers,
        inp["x"][0, 0].numel() // 4,
        min(times["resident"]),
        min(times["streamed"]),
        min(times["diffusers_plain"]),
        equal,
        err,
        FP32_BOUND,
    )
    log.info("(c) diffusers group offloading with use_stream=True needs CUDA: not run on the CPU")
    result = {
        "config": {
            **kw,
            "tokens": inp["x"][0, 0].numel() // 4,
            "latent": list(args.cpu_latent),
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "prefetch_depth": args.depth,
        },
        # cpu_s: process CPU seconds per forward; well below threads x s means other processes took the cores
        "modes": {name: {**_times(t), "cpu_s": cpu_times[name]} for name, t in times.items()},
        "streamed_equal_resident": equal,
        "ours_vs_diffusers_rel_l2": err,
        "fp32_bound": FP32_BOUND,
        "within_bound": err <= FP32_BOUND,
        "stream_stats": stats,
        "diffusers_group_offload": "not run: use_stream=True needs CUDA",
        "bf16": bench_cpu_bf16(ref, kw, cfg, inp, outs["diffusers_plain"]),
    }
    return result


def bench_cpu_bf16(ref32: torch.nn.Module, kw: dict, cfg: DiTConfig, inp: dict, out32: torch.Tensor) -> dict:
    """The same weights rounded to bf16 (diffusers' keep-fp32 modules kept), both models; errors vs fp32."""
    from diffusers import WanTransformer3DModel

    keep = set(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or [])
    sd16 = {k: v if keep_fp32(k, keep) else v.to(torch.bfloat16) for k, v in ref32.state_dict().items()}
    with torch.device("meta"):
        ref16 = WanTransformer3DModel(**kw)
    ref16.load_state_dict(sd16, strict=True, assign=True)
    ref16.rope = ref32.rope
    ref16.eval()
    ours16 = ours_from(dit_diffusers_to_official(sd16), cfg, "cpu")
    ours_out = ours_forward(ours16, inp, torch.bfloat16)().float()
    diff_out = diffusers_forward(ref16, inp, torch.bfloat16)().float()
    result = {
        "ours_bf16_vs_fp32": rel_l2(ours_out, out32),
        "diffusers_bf16_vs_fp32": rel_l2(diff_out, out32),
        "ours_bf16_vs_diffusers_bf16": rel_l2(ours_out, diff_out),
    }
    log.info(
        "CPU bf16: ours vs fp32 %.2e, diffusers vs fp32 %.2e, ours vs diffusers %.2e (rel L2)",
        *result.values(),
    )
    return result


# --------------------------------------------------------------------------------------------------- CUDA


def _run_capped(
    name: str, fn: Callable[[], torch.Tensor], cap_gb: float, args: argparse.Namespace, device: torch.device
) -> tuple[dict, torch.Tensor | None]:
    """Time `fn` with the allocator capped to emulate a `cap_gb` card (0: uncapped); OOM is a result."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap_bytes = None if cap_gb == 0 else int((cap_gb - args.context_gib) * GIB)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else min(1.0, cap_bytes / total), device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run: dict = {"mode": name, "vram_gb": cap_gb or None, "cap_bytes": cap_bytes, "held_bytes": held}
    out = None
    try:
        times, out = _timed(fn, args.repeats, torch.cuda.synchronize)
        run.update(_times(times))
        run["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        run["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        run["oom"] = False
        run["rss"] = rss()  # host memory of the whole process (all weights copies alive at that point)
        out = out.float().cpu()
        log.info(
            "CUDA %-9s cap %-8s %.3f s min / %.3f s median per forward, peak %.2f GiB allocated (%.2f reserved)",
            name,
            "none" if cap_bytes is None else f"{cap_gb:g} GB",
            run["s_min"],
            run["s_median"],
            run["peak_allocated"] / GIB,
            run["peak_reserved"] / GIB,
        )
    except torch.OutOfMemoryError as exc:
        run.update({"oom": True, "error": str(exc).splitlines()[0][:300]})
        log.info("CUDA %-9s cap %s: out of memory", name, "none" if cap_bytes is None else f"{cap_gb:g} GB")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        gc.collect()
        torch.cuda.empty_cache()
    return run, out


def bench_cuda(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    low = torch.bfloat16
    layers = args.layers
    with torch.device("meta"):
        block = WanDiT(our_config(diffusers_kwargs(args.dim, args.ffn_dim, args.heads, 1))).blocks[0]
    per_block = 2 * sum(p.numel() for p in block.parameters())  # bf16 estimate (a few small tensors stay fp32)
    # Host RAM: the weights + our pinned slabs (b), later the weights + diffusers' pinned copies, which the
    # pinned allocator rounds up to powers of two (≈1.5x for these tensors).
    avail = psutil.virtual_memory().available
    if 2.6 * layers * per_block > 0.9 * avail:
        layers = max(1, int(0.9 * avail / (2.6 * per_block)))
        log.warning("host RAM (%.0f GB available) allows %d layers; running %d", avail / GB, layers, layers)
    kw = diffusers_kwargs(args.dim, args.ffn_dim, args.heads, layers)
    cfg = our_config(kw)
    latent = tuple(args.latent) if args.latent else SIZES[args.size]
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    log.info("building a random %d-layer diffusers WanTransformer3DModel (bf16) ...", layers)
    ref = random_diffusers(kw, low, device)
    host_sd = dit_diffusers_to_official(ref.state_dict())
    per_block = block_nbytes(ours_from(host_sd, cfg, "cpu").blocks[0])  # the real size (shares the tensors)
    inp = {k: v.to(device) for k, v in make_inputs(latent, low).items()}
    caps = args.vram_gb
    result: dict = {
        "gpu": props.name,
        "gpu_total_bytes": props.total_memory,
        "config": {**kw, "tokens": tokens, "latent": list(latent), "size": None if args.latent else args.size},
        "weight_bytes": sum(t.numel() * t.element_size() for t in host_sd.values()),
        "block_bytes": per_block,
        "prefetch_depth": args.depth,
        "context_gib": args.context_gib,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None
        or importlib.util.find_spec("flash_attn_interface") is not None,
        "runs": [],
    }
    outs: dict[str, torch.Tensor] = {}

    def record(run: dict, out: torch.Tensor | None) -> None:
        result["runs"].append(run)
        if out is not None:
            outs.setdefault(run["mode"], out)

    if "resident" in args.modes:
        try:
            model = ours_from(host_sd, cfg, device)
        except torch.OutOfMemoryError as exc:
            record(
                {"mode": "resident", "vram_gb": None, "oom": True, "error": f"weights do not fit: {exc}"[:300]}, None
            )
        else:
            for cap in caps:
                record(*_run_capped("resident", ours_forward(model, inp, low), cap, args, device))
            del model
        gc.collect()
        torch.cuda.empty_cache()

    if "streamed" in args.modes:
        model = ours_from(host_sd, cfg, "cpu")
        streamed = list(range(cfg.num_layers))
        move_unstreamed(model, streamed, device)
        pinned_cap = int(0.5 * psutil.virtual_memory().total)
        rss0 = rss()
        streamer = BlockStreamer(model, streamed, device, args.depth, pinned_cap, timing=True).install()
        # Our slabs replace the model's block tensors; here the originals stay alive (diffusers' model holds them),
        # so the delta is what streaming adds on top of one copy of the weights.
        result["streamer_rss_delta"] = rss() - rss0
        for cap in caps:
            streamer.reset_stats()
            run, out = _run_capped("streamed", ours_forward(model, inp, low), cap, args, device)
            run["stream_stats"] = _stream_stats(streamer)
            record(run, out)
        streamer.uninstall()
        del model, streamer
        gc.collect()
        torch.cuda.empty_cache()

    del host_sd  # diffusers pins its own copies: let the originals go once they are re-pointed
    if "diffusers" in args.modes:
        gc.collect()
        rss0 = rss()
        ref.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
            record_stream=args.record_stream,
        )
        gc.collect()
        result["diffusers_group_offload"] = {
            "offload_type": "block_level",
            "num_blocks_per_group": 1,
            "use_stream": True,
            "record_stream": args.record_stream,
            "low_cpu_mem_usage": False,
            "rss_delta_setup": rss() - rss0,  # what enable_group_offload added on top of the weights
        }
        for cap in caps:
            record(*_run_capped("diffusers", diffusers_forward(ref, inp, low), cap, args, device))

    reference = outs.get("resident")
    checks: dict = {"bf16_bound": args.bf16_bound}
    if reference is not None:
        checks["resident_finite"] = bool(torch.isfinite(reference).all())
        if "streamed" in outs:
            checks["streamed_equal_resident"] = torch.equal(outs["streamed"], reference)
            checks["streamed_vs_resident_rel_l2"] = rel_l2(outs["streamed"], reference)
        if "diffusers" in outs:
            err = rel_l2(reference, outs["diffusers"])
            checks["ours_vs_diffusers_rel_l2"] = err
            checks["within_bound"] = err <= args.bf16_bound
    log.info("CUDA checks: %s", checks)
    result["checks"] = checks
    return result


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=1, choices=(1, 2), help="our prefetch depth (buffers = depth + 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/vs-diffusers-*)")
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA part even when CUDA is present")
    p.add_argument("--skip-cpu", action="store_true", help="skip the CPU part")
    g = p.add_argument_group("CUDA part (A14B shape, bf16)")
    g.add_argument("--layers", type=int, default=40)
    g.add_argument("--dim", type=int, default=5120)
    g.add_argument("--ffn-dim", type=int, default=13824)
    g.add_argument("--heads", type=int, default=40)
    g.add_argument("--size", choices=list(SIZES), default="480p", help="81 frames at 832x480 or 1280x720")
    g.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"), help="latent grid instead of --size")
    g.add_argument("--vram-gb", type=float, nargs="+", default=[0.0, 24.0, 16.0], help="emulated cards, 0 = no cap")
    g.add_argument("--context-gib", type=float, default=0.5, help="taken off each cap for the CUDA context")
    modes = ["resident", "streamed", "diffusers"]
    g.add_argument("--modes", nargs="+", choices=modes, default=modes, help="(a), (b), (c)")
    g.add_argument("--repeats", type=int, default=3, help="timed forwards per run (after one warm-up)")
    g.add_argument("--record-stream", action="store_true", help="diffusers record_stream=True")
    g.add_argument("--bf16-bound", type=float, default=5e-2, help="allowed rel. L2 of ours vs diffusers in bf16")
    g = p.add_argument_group("CPU part (float32)")
    g.add_argument("--cpu-dim", type=int, default=1024)
    g.add_argument("--cpu-ffn-dim", type=int, default=4096)
    g.add_argument("--cpu-heads", type=int, default=8)
    g.add_argument("--cpu-layers", type=int, default=8)
    g.add_argument("--cpu-latent", type=int, nargs=3, default=[4, 32, 32], metavar=("T", "H", "W"))
    g.add_argument("--cpu-repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    import diffusers

    result: dict = {
        "benchmark": "vs_diffusers",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_cpu:
        result["cpu_run"] = bench_cpu(args)
    if torch.cuda.is_available() and not args.cpu_only:
        result["cuda_run"] = bench_cuda(args)
    elif not args.cpu_only:
        log.info("no CUDA device: the A14B-shaped comparison and (c) diffusers group offloading were not run")
    result["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = "cuda" if "cuda_run" in result else "cpu"
    out = args.out or RESULTS / f"vs-diffusers-{device}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
