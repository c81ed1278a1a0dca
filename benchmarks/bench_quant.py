"""Benchmark weight-only quantization of Linear layers: quantize time, forward time and output error.

CPU: a mid-size stack shaped like one DiT block's Linears (8 attention dim x dim, FFN up and down), bf16 vs
int8 / fp8 dequantize-in-forward (`QuantLinear`), plus torchao's Int8WeightOnlyConfig when torchao is importable.
CUDA: the real 5120 x 13824 FFN Linear of the A14B at 32,760 tokens (832x480x81): bf16 vs int8-dequant vs
fp8-dequant vs fp8 `torch._scaled_mm` (sm89+), plus torchao when importable.

Writes JSON to benchmarks/results/quant-<device>-<UTC date-time>.json with device, torch version and date.
Run: python benchmarks/bench_quant.py [--device cpu|cuda|all] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import rel_l2
from torch import nn

from wan_local.memory.quant.numerics import QuantLinear

log = logging.getLogger("bench_quant")
RESULTS = Path(__file__).resolve().parent / "results"


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, adding up the inner tensors of a tensor subclass (torchao's quantized weights)."""
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of `fn()` after one warm-up call (CUDA: event timing, and the
    CPU seconds are those of the host). CPU seconds are the steadier figure on a shared machine."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            walls.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def block_stack(dim: int, ffn: int, seed: int = 0) -> nn.Sequential:
    """The Linears of one DiT block in sequence (shapes only matter): 8 x [dim, dim], [ffn, dim], [dim, ffn]."""
    torch.manual_seed(seed)
    layers = [nn.Linear(dim, dim) for _ in range(8)] + [nn.Linear(dim, ffn), nn.Linear(ffn, dim)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    return nn.Sequential(*layers).eval().requires_grad_(False)


def quantized(stack: nn.Sequential, mode: str, compute: str = "dequant") -> tuple[nn.Sequential, float]:
    """A copy of `stack` with every Linear replaced by QuantLinear, and the seconds quantization took."""
    out = copy.deepcopy(stack)
    t0 = time.perf_counter()
    for i, layer in enumerate(out):
        out[i] = QuantLinear.from_linear(layer, mode, compute)
    if any(p.is_cuda for p in out.parameters()):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def torchao_int8(stack: nn.Sequential) -> tuple[nn.Sequential, float] | None:
    """torchao Int8WeightOnlyConfig applied to a copy of `stack`, or None when torchao is not importable."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    out = copy.deepcopy(stack)
    t0 = time.perf_counter()
    quantize_(out, Int8WeightOnlyConfig())
    return out, time.perf_counter() - t0


def run_variants(
    stack: nn.Sequential, x: torch.Tensor, repeats: int, device: torch.device, scaled_mm: bool
) -> dict[str, dict[str, float]]:
    """Time and error of every variant; the error is against the float32 stack on the same input."""
    with torch.inference_mode():
        reference = stack.float()(x.float())
    bf16 = copy.deepcopy(stack).to(torch.bfloat16)
    variants: dict[str, tuple[nn.Module, float]] = {"bf16": (bf16, 0.0)}
    for mode in ("int8", "fp8"):
        variants[f"{mode}-dequant"] = quantized(bf16, mode)
    if scaled_mm:
        variants["fp8-scaled_mm"] = quantized(bf16, "fp8", "scaled_mm")
    ao = torchao_int8(bf16)
    if ao is not None:
        variants["torchao-int8-weight-only"] = ao
    xb = x.to(torch.bfloat16)
    results = {}
    for name, (module, quant_s) in variants.items():
        with torch.inference_mode():
            wall, cpu = time_call(lambda m=module: m(xb), repeats, device)
            err = rel_l2(module(xb).float(), reference)
        weight_bytes = sum(tensor_bytes(t) for t in module.state_dict().values())
        results[name] = {
            "quantize_s": quant_s,
            "forward_s": wall,
            "forward_cpu_s": cpu,
            "rel_l2_vs_fp32": err,
            "bytes": weight_bytes,
        }
        log.info(
            "%-26s quantize %.3f s  forward %.4f s (cpu %.4f s)  rel_l2 %.2e  %d bytes",
            name,
            quant_s,
            wall,
            cpu,
            err,
            weight_bytes,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def bench_cpu(repeats: int, dim: int, ffn: int, tokens: int) -> dict:
    """The CPU part: mid-size block stack."""
    torch.manual_seed(1)
    stack = block_stack(dim, ffn)
    x = torch.randn(tokens, dim)
    return {
        "shape": {"dim": dim, "ffn": ffn, "tokens": tokens},
        "threads": torch.get_num_threads(),
        "results": run_variants(stack, x, repeats, torch.device("cpu"), scaled_mm=False),
    }


def bench_cuda(repeats: int, tokens: int) -> dict:
    """The CUDA part: the A14B FFN up-projection (5120 -> 13824) at 32,760 tokens."""
    device = torch.device("cuda")
    torch.manual_seed(1)
    stack = nn.Sequential(nn.Linear(5120, 13824)).eval().requires_grad_(False)
    nn.init.normal_(stack[0].weight, std=5120**-0.5)
    stack = stack.to(device)
    x = torch.randn(tokens, 5120, device=device)
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "shape": {"in": 5120, "out": 13824, "tokens": tokens},
        "gpu": torch.cuda.get_device_name(device),
        "capability": f"{major}.{minor}",
        "results": run_variants(stack, x, repeats, device, scaled_mm=(major, minor) >= (8, 9)),
    }


def _torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def main() -> None:
    """Parse flags, run the chosen parts, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-dim", type=int, default=1024)
    parser.add_argument("--cpu-ffn", type=int, default=2816)
    parser.add_argument("--cpu-tokens", type=int, default=1024)
    parser.add_argument("--cuda-tokens", type=int, default=32760)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    now = dt.datetime.now(dt.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torchao": _torchao_version(),
    }
    if args.device in ("cpu", "all"):
        report["cpu_bench"] = bench_cpu(args.repeats, args.cpu_dim, args.cpu_ffn, args.cpu_tokens)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        report["cuda_bench"] = bench_cuda(args.repeats, args.cuda_tokens)
    elif args.device == "cuda":
        raise SystemExit("CUDA requested but not available")
    device = "cuda" if "cuda_bench" in report else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"quant-{device}-{now.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
