"""Block streaming benchmark: per-forward time streamed vs resident, equality, host RAM, copy stalls.

    python benchmarks/bench_streaming.py                       # CPU part, plus the CUDA part when CUDA is present
    python benchmarks/bench_streaming.py --cpu-only --tokens 256
    python benchmarks/bench_streaming.py --blocks 20 --tokens 32760 --vram-gb 16 24

CPU part (always runs): a mid-size random WanDiT (default dim 1024, 8 layers), resident forward vs every block
streamed through the CPU code path (copies into the reused buffers), bit equality, RSS and peak RSS.

CUDA part: an A14B-shaped block stack (dim 5120, ffn 13824, 40 heads; random bf16 weights, `--blocks` of them,
as many as host RAM allows) run on `--tokens` tokens (32,760 = 480p 81 frames) under bf16 autocast. The resident
run happens uncapped when it fits the card; streamed runs happen with the VRAM capped by
`torch.cuda.set_per_process_memory_fraction` to each `--vram-gb`, once with every block streamed and once with
as many blocks resident as the cap leaves room for (spread through the stack). Writes JSON to
benchmarks/results/ with device, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from common import rss
from torch import nn

from wan_local.memory.streaming import BlockStreamer, block_nbytes, move_unstreamed
from wan_local.models.dit import DiTBlock, DiTConfig, WanDiT
from wan_local.models.rope import rope_table

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
log = logging.getLogger("bench_streaming")


def _peak_rss() -> int | None:
    """Peak resident set of this process in bytes (Linux/macOS), None where `resource` is missing."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaNs in the same places counting as equal (random deep stacks may overflow)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _grid(tokens: int) -> tuple[int, int]:
    """(h, w) with h·w == tokens and h as close to sqrt(tokens) as the divisors allow."""
    h = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return h, tokens // h


def _time_forwards(fn, repeats: int, sync, after_warmup=None) -> tuple[list[float], torch.Tensor]:
    out = fn()  # warm-up (and the output compared between modes)
    sync()
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, out


def _stats_dict(streamer: BlockStreamer) -> dict:
    s = streamer.read_stats()
    forwards = max(s.forwards, 1)
    return {
        "forwards": s.forwards,
        "bytes_per_forward": s.bytes_moved / forwards,
        "stall_s_per_forward": s.stall_s / forwards,
        "copy_s_per_forward": s.copy_s / forwards,
        "pinned_bytes": s.pinned_bytes,
        "pageable_bytes": s.pageable_bytes,
        "staging_bytes": s.staging_bytes,
        "device_buffer_bytes": s.device_buffer_bytes,
        "on_demand_loads": s.on_demand_loads,
    }


# ------------------------------------------------------------------------------------------------------ CPU


def bench_cpu(args: argparse.Namespace) -> dict:
    """Random WanDiT on the CPU: resident vs all blocks streamed (depth args.depth), float32."""
    cfg = DiTConfig(
        model_type="t2v",
        in_dim=16,
        out_dim=16,
        dim=args.cpu_dim,
        ffn_dim=args.cpu_ffn_dim,
        freq_dim=256,
        num_heads=args.cpu_dim // 128 if args.cpu_dim % 128 == 0 else 8,
        num_layers=args.cpu_layers,
        text_len=args.cpu_text_len,
        text_dim=512,
    )
    h, w = _grid(args.cpu_tokens)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 2 * h, 2 * w)
    t = torch.tensor([700.0])
    context = [torch.randn(min(64, cfg.text_len), cfg.text_dim)]
    rss0 = rss()
    torch.manual_seed(1)
    resident_model = WanDiT(cfg).eval()
    rss_model = rss()
    torch.manual_seed(1)
    model = WanDiT(cfg).eval()  # the same weights, streamed; both run alternately so load noise hits both
    rss_two = rss()
    block_bytes = sum(block_nbytes(b) for b in model.blocks)
    streamer = BlockStreamer(model, range(cfg.num_layers), "cpu", args.depth, timing=True).install()
    gc.collect()
    rss_installed = rss()
    resident_times, streamed_times = [], []
    with torch.inference_mode():
        resident_out, streamed_out = resident_model(x, t, context), model(x, t, context)  # warm-up
        streamer.reset_stats()
        for _ in range(args.repeats):
            for m, times in ((resident_model, resident_times), (model, streamed_times)):
                t0 = time.perf_counter()
                m(x, t, context)
                times.append(time.perf_counter() - t0)
    stats = _stats_dict(streamer)
    streamer.uninstall()
    result = {
        "config": {
            "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim,
            "layers": cfg.num_layers,
            "heads": cfg.num_heads,
            "tokens": h * w,
            "text_len": cfg.text_len,
            "dtype": "float32",
            "prefetch_depth": args.depth,
            "threads": torch.get_num_threads(),
        },
        "block_bytes_total": block_bytes,
        "resident_s": resident_times,
        "streamed_s": streamed_times,
        "streamed_over_resident_min": min(streamed_times) / min(resident_times),
        "streamed_over_resident_median": statistics.median(streamed_times) / statistics.median(resident_times),
        "equal": torch.equal(resident_out, streamed_out),
        "rss_bytes": {
            "start": rss0,
            "resident_model_built": rss_model,
            "streamed_model_built": rss_two,
            "streamed_model_installed": rss_installed,
            "peak": _peak_rss(),
        },
        "rss_install_delta_over_block_bytes": (rss_installed - rss_two) / block_bytes,
        "stream_stats": stats,
    }
    log.info(
        "CPU: resident %.3f s, streamed %.3f s per forward (min; x%.3f), copies %.3f s, equal=%s; RSS +%.0f MB "
        "on install for %.0f MB of blocks (buffers %.0f MB)",
        min(resident_times),
        min(streamed_times),
        result["streamed_over_resident_min"],
        stats["copy_s_per_forward"],
        result["equal"],
        (rss_installed - rss_two) / 1e6,
        block_bytes / 1e6,
        stats["device_buffer_bytes"] / 1e6,
    )
    return result


# ----------------------------------------------------------------------------------------------------- CUDA


class BlockStack(nn.Module):
    """Only the repeated part of the DiT: `blocks` called in order (what the streamer streams)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, e0, context, rope, t_index) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, e0, context, rope, t_index)
        return x


def _a14b_config(num_layers: int) -> DiTConfig:
    return DiTConfig(
        model_type="t2v",
        in_dim=16,
        out_dim=16,
        dim=5120,
        ffn_dim=13824,
        freq_dim=256,
        num_heads=40,
        num_layers=num_layers,
    )


def _build_stack(num_blocks: int, device: torch.device) -> BlockStack:
    """Random bf16 A14B blocks, initialised on the GPU (fast) and parked in host RAM."""
    cfg = _a14b_config(num_blocks)
    blocks = []
    for i in range(num_blocks):
        torch.manual_seed(i)
        with torch.device(device):
            block = DiTBlock(cfg).to(torch.bfloat16)
        blocks.append(block.to("cpu"))
        del block
    torch.cuda.empty_cache()
    return BlockStack(blocks).eval()


def _spread(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total) (resident blocks interleave with streamed ones)."""
    count = max(0, min(count, total))
    step = total / count if count else 0.0
    return [int(i * step + step / 2) for i in range(count)]  # distinct: step >= 1


def bench_cuda(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    cfg = _a14b_config(1)
    num_blocks = args.blocks
    avail = psutil.virtual_memory().available
    est_block = 703_000_000  # bytes of one bf16 A14B block (spec/budgets.md)
    if num_blocks * est_block > 0.75 * avail:
        num_blocks = max(1, int(0.75 * avail // est_block))
        log.warning("only %d blocks fit 75%% of the available host RAM (%.1f GB)", num_blocks, avail / GB)
    log.info("building %d A14B-shaped bf16 blocks in host RAM ...", num_blocks)
    stack = _build_stack(num_blocks, device)
    per_block = max(block_nbytes(b) for b in stack.blocks)
    tokens = args.tokens
    torch.manual_seed(123)
    x = torch.randn(1, tokens, cfg.dim, device=device, dtype=torch.bfloat16)
    e0 = torch.randn(1, 6, cfg.dim, device=device) * 0.05
    context = torch.randn(1, cfg.text_len, cfg.dim, device=device, dtype=torch.bfloat16)
    rope = rope_table((tokens, 1, 1), cfg.head_dim, device)
    t_index = torch.zeros(1, 1, dtype=torch.long, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            return stack(x, e0, context, rope, t_index)

    sync = torch.cuda.synchronize
    result: dict = {
        "gpu": props.name,
        "gpu_total_bytes": props.total_memory,
        "blocks": num_blocks,
        "tokens": tokens,
        "block_bytes": per_block,
        "prefetch_depth": args.depth,
        "runs": [],
    }
    total = props.total_memory
    free = torch.cuda.mem_get_info(device)[0]
    resident_out = None
    if num_blocks * per_block + 12 * GB < free:
        stack.to(device)
        torch.cuda.reset_peak_memory_stats(device)
        times, resident_out = _time_forwards(forward, args.repeats, sync)
        result["runs"].append(
            {"mode": "resident", "vram_cap_gb": None, "s": times, "peak_bytes": torch.cuda.max_memory_allocated()}
        )
        log.info("CUDA resident (uncapped): %.3f s per forward", min(times))
        resident_out = resident_out.float().cpu()
        stack.to("cpu")
        torch.cuda.empty_cache()
    else:
        log.info("resident run skipped: %d blocks (%.1f GB) do not fit", num_blocks, num_blocks * per_block / GB)

    pinned_cap = int(args.pinned_gb * GB) if args.pinned_gb is not None else int(0.5 * psutil.virtual_memory().total)
    for cap_gb in args.vram_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GB / total), device)
        activations = None
        for plan in ("all", "fit"):
            if plan == "fit":
                if activations is None:
                    continue
                room = cap_gb * GB - activations - (args.depth + 1) * per_block - args.reserve_gb * GB
                n_res = max(0, min(num_blocks - 1, int(room // per_block)))
                if n_res == 0:
                    continue  # same as streaming every block
                resident = _spread(n_res, num_blocks)
            else:
                resident = []
            streamed = [i for i in range(num_blocks) if i not in resident]
            move_unstreamed(stack, streamed, device)
            streamer = BlockStreamer(stack, streamed, device, args.depth, pinned_cap, timing=True).install()
            sync()
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            times, out = _time_forwards(forward, args.repeats, sync, streamer.reset_stats)
            peak = torch.cuda.max_memory_allocated(device)
            stats = _stats_dict(streamer)
            streamer.uninstall()
            move_unstreamed(stack, [], "cpu")
            torch.cuda.empty_cache()
            if plan == "all":
                activations = peak - held
            run = {
                "mode": f"streamed-{plan}",
                "vram_cap_gb": cap_gb,
                "resident_blocks": len(resident),
                "streamed_blocks": len(streamed),
                "s": times,
                "held_bytes": held,
                "peak_bytes": peak,
                "equal_to_resident": None if resident_out is None else _same(out.float().cpu(), resident_out),
                "stream_stats": stats,
            }
            result["runs"].append(run)
            log.info(
                "CUDA cap %g GB, %d resident / %d streamed: %.3f s per forward, stall %.3f s, copy %.3f s, "
                "peak %.2f GB, equal=%s",
                cap_gb,
                len(resident),
                len(streamed),
                min(times),
                stats["stall_s_per_forward"],
                stats["copy_s_per_forward"],
                peak / GB,
                run["equal_to_resident"],
            )
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=1, choices=(1, 2), help="prefetch depth (device buffers = depth+1)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per mode (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/streaming-*.json)")
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA part even when CUDA is present")
    p.add_argument("--skip-cpu", action="store_true", help="skip the CPU part")
    g = p.add_argument_group("CPU part (random WanDiT, float32)")
    g.add_argument("--cpu-dim", type=int, default=1024)
    g.add_argument("--cpu-ffn-dim", type=int, default=4096)
    g.add_argument("--cpu-layers", type=int, default=8)
    g.add_argument("--cpu-tokens", type=int, default=1024, help="latent tokens (1 frame, near-square grid)")
    g.add_argument("--cpu-text-len", type=int, default=512)
    g = p.add_argument_group("CUDA part (A14B-shaped bf16 block stack)")
    g.add_argument("--blocks", type=int, default=40, help="A14B blocks (703 MB each in host RAM)")
    g.add_argument("--tokens", type=int, default=32760, help="tokens per forward (32760 = 832x480x81)")
    g.add_argument("--vram-gb", type=float, nargs="+", default=[16.0, 24.0], help="emulated card sizes")
    g.add_argument("--pinned-gb", type=float, default=None, help="pinned host cap (default 50%% of RAM)")
    g.add_argument("--reserve-gb", type=float, default=1.0, help="headroom kept when planning resident blocks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    result: dict = {
        "benchmark": "block_streaming",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_cpu:
        result["cpu_run"] = bench_cpu(args)
    if torch.cuda.is_available() and not args.cpu_only:
        result["cuda_run"] = bench_cuda(args)
    device = "cuda" if "cuda_run" in result else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"streaming-{device}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
