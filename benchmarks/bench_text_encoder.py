"""UMT5-XXL text encoder on the CPU: seconds per prompt, tokens/s and peak RSS, random weights at the real shape.

    python benchmarks/bench_text_encoder.py                          # all 24 layers, bf16, 512 tokens (11.4 GB RAM)
    python benchmarks/bench_text_encoder.py --layers 4 8             # fewer layers, extrapolated to 24
    python benchmarks/bench_text_encoder.py --layers 4 8 --tokens 512 128 --threads 2

Builds `wan_local.models.text_encoder.TextEncoder` from a transformers `UMT5Config` with the XXL shape (d_model 4096,
64 heads of 64, d_ff 10240, vocab 256,384, 32 relative-position buckets, gated GELU) and `--layers` encoder blocks,
with weights allocated by `torch.empty` in the chosen dtype and filled cheaply (one random chunk per tensor, tiled,
scaled like T5's initialisation so activations stay finite). Each layer count runs in a fresh process (its own peak
RSS); there it encodes one prompt of each `--tokens` length (mask all ones, as the reference pads every prompt to
512) once as warm-up and `--repeats` times timed.

Fewer than 24 layers: the 24-layer time is extrapolated, linearly in the layer count (least squares over the
counts given when there are two or more; else proportionally, the embedding lookup and final norm being
negligible). The extrapolated numbers are marked as such in the log and the JSON.

Writes benchmarks/results/text-encoder-cpu-<date>.json with device, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from common import peak_rss, reset_peak_rss, rss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GB = 1e9
FULL_LAYERS = 24
XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
log = logging.getLogger("bench_text_encoder")


def _init_std(name: str, shape: tuple[int, ...], cfg: dict) -> float | None:
    """T5's initialisation scale for a tensor (None: a norm weight, filled with ones)."""
    d, d_kv, heads = cfg["d_model"], cfg["d_kv"], cfg["num_heads"]
    if "layer_norm" in name:
        return None
    if name.endswith("SelfAttention.q.weight"):
        return (d * d_kv) ** -0.5  # T5 does not scale q·k; the init does
    if name.endswith("SelfAttention.o.weight"):
        return (heads * d_kv) ** -0.5
    if name.endswith("DenseReluDense.wo.weight"):
        return cfg["d_ff"] ** -0.5
    if "relative_attention_bias" in name or name == "shared.weight":
        return 1.0 if name == "shared.weight" else d**-0.5
    return shape[-1] ** -0.5  # k, v, wi_0, wi_1


def random_state_dict(config: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the encoder (transformers names, tied alias left out), torch.empty + a tiled random chunk."""
    from transformers import UMT5Config

    from wan_local.models.text_encoder import TextEncoder

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TextEncoder(UMT5Config(**config)).umt5.state_dict().items()}
    shapes.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randn(1 << 20, generator=gen)
    sd = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        std = _init_std(name, shape, config)
        if std is None:
            t.fill_(1.0)
        else:
            flat, piece = t.view(-1), (chunk * std).to(dtype)
            full = flat.numel() // piece.numel()
            if full:
                flat[: full * piece.numel()].view(full, -1).copy_(piece.expand(full, -1))
            rest = flat.numel() - full * piece.numel()
            flat[flat.numel() - rest :].copy_(piece[:rest])
        sd[name] = t
    return sd


def run_layers(args: argparse.Namespace, layers: int) -> dict:
    """Build the encoder with `layers` blocks in this process and time one prompt per token count."""
    from transformers import UMT5Config

    from wan_local.models.text_encoder import ATTN_IMPLEMENTATION, TextEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    config = {**XXL, "num_layers": layers}
    dtype = DTYPES[args.dtype]
    rss0 = rss()
    t0 = time.perf_counter()
    encoder = TextEncoder.from_state_dict(UMT5Config(**config), random_state_dict(config, dtype))
    build_s = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for t in encoder.parameters())
    rss_built = rss()
    gen = torch.Generator().manual_seed(1)
    runs = []
    for tokens in sorted(args.tokens):  # ascending: each length's peak RSS delta is its own growth
        ids = torch.randint(1, config["vocab_size"], (1, tokens), generator=gen)
        mask = torch.ones(1, tokens, dtype=torch.long)
        reset_peak_rss()
        rss_before = rss()
        out = encoder.encode(ids, mask)[0]  # warm-up
        times, cpu_times = [], []
        for _ in range(args.repeats):
            t1, c1 = time.perf_counter(), time.process_time()
            encoder.encode(ids, mask)
            times.append(time.perf_counter() - t1)
            cpu_times.append(time.process_time() - c1)
        runs.append(
            {
                "tokens": tokens,
                "s": times,
                "s_min": min(times),
                "s_median": statistics.median(times),
                # process CPU seconds per prompt; cpu_s / s well below the thread count means other processes
                # took the cores (the wall times are then inflated)
                "cpu_s": cpu_times,
                "cpu_over_wall_per_thread": [
                    c / (w * torch.get_num_threads()) for c, w in zip(cpu_times, times, strict=True)
                ],
                "tokens_per_s_best": tokens / min(times),
                "output_shape": list(out.shape),
                "output_finite": bool(torch.isfinite(out).all()),
                "output_std": float(out.float().std()),
                "peak_rss_delta": peak_rss() - rss_before,
            }
        )
    return {
        "layers": layers,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "weight_bytes": weight_bytes,
        "build_s": build_s,
        "rss_start": rss0,
        "rss_built": rss_built,
        "peak_rss": peak_rss(),
        "runs": runs,
    }


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of seconds = a + b·layers: least squares over >= 2 layer counts, else a = 0 (proportional)."""
    if len({x for x, _ in points}) < 2:
        x, y = points[0]
        return 0.0, y / x
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def extrapolate(per_layers: list[dict], tokens: int) -> dict:
    """The 24-layer seconds per prompt at `tokens`, measured if 24 layers ran, else extrapolated (marked)."""
    rows = [(r["layers"], next(x for x in r["runs"] if x["tokens"] == tokens)) for r in per_layers]
    measured = [run for layers, run in rows if layers == FULL_LAYERS]
    fewer = [(layers, run["s_min"]) for layers, run in rows if layers != FULL_LAYERS]
    if measured:
        s = measured[0]["s_min"]
        row = {"tokens": tokens, "layers": FULL_LAYERS, "s_per_prompt": s, "tokens_per_s": tokens / s}
        row["extrapolated"] = False
        if fewer:  # how far the extrapolation from the smaller runs lands from the measurement
            a, b = _fit(fewer)
            guess = a + b * FULL_LAYERS
            layers_used = [x for x, _ in fewer]
            row["extrapolation_check"] = {"from_layers": layers_used, "s_per_prompt": guess, "over_measured": guess / s}
        return row
    a, b = _fit([(layers, run["s_min"]) for layers, run in rows])
    s = a + b * FULL_LAYERS
    return {
        "tokens": tokens,
        "layers": FULL_LAYERS,
        "s_per_prompt": s,
        "tokens_per_s": tokens / s,
        "extrapolated": True,
        "from_layers": [layers for layers, _ in rows],
        "fit": {"intercept_s": a, "s_per_layer": b},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[FULL_LAYERS], help="encoder blocks (24 = the real one)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512], help="prompt lengths (512 = the reference's pad)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed prompts per length (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        sys.stdout.write(json.dumps(run_layers(args, args.worker)) + "\n")  # the parent reads this line
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    per_layers = []
    for layers in args.layers:
        cmd = [sys.executable, __file__, "--worker", str(layers), "--dtype", args.dtype]
        cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--tokens", *map(str, args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"worker for {layers} layers failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        per_layers.append(result)
        for run in result["runs"]:
            log.info(
                "%2d layers %s, %3d tokens: %.2f s min / %.2f s median per prompt (core use %.0f%% in the best run), "
                "%.0f tokens/s; weights %.2f GB, peak RSS %.2f GB (forward +%.2f GB), finite=%s",
                layers,
                args.dtype,
                run["tokens"],
                run["s_min"],
                run["s_median"],
                100 * run["cpu_over_wall_per_thread"][run["s"].index(run["s_min"])],
                run["tokens_per_s_best"],
                result["weight_bytes"] / GB,
                result["peak_rss"] / GB,
                run["peak_rss_delta"] / GB,
                run["output_finite"],
            )
    full = [extrapolate(per_layers, tokens) for tokens in args.tokens]
    for row in full:
        if "extrapolation_check" in row:
            check = row["extrapolation_check"]
            log.info(
                "check: extrapolating from %s layers would give %.2f s at %d tokens (x%.2f of the measurement)",
                check["from_layers"],
                check["s_per_prompt"],
                row["tokens"],
                check["over_measured"],
            )
        log.info(
            "24 layers, %d tokens: %.2f s per prompt, %.0f tokens/s (%s)",
            row["tokens"],
            row["s_per_prompt"],
            row["tokens_per_s"],
            f"EXTRAPOLATED from {row['from_layers']} layers" if row["extrapolated"] else "measured",
        )
    report = {
        "benchmark": "text_encoder_cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "shape": XXL,
        "loadavg_start": loadavg_start,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "per_layer_count": per_layers,
        "full_24_layers": full,
        "note": "random weights; one prompt per call (batch 1), mask all ones; s_min over the timed repeats",
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    out = args.out or RESULTS / f"text-encoder-cpu-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
