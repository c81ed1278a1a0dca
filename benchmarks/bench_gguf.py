"""Benchmark GGUF Linears kept packed: dequantizing one DiT block's weights vs that block's matmuls.

One A14B block at real size (dim 5120, ffn 13824): its ten Linears (self- and cross-attention q, k, v, o; FFN up
and down), stored as in QuantStack's files: Q8_0, or Q4_K_M (Q4_K; `.v` and `ffn.2` Q6_K). The weights' bytes
are random with finite fp16 scales (values do not change the speed). Per block and repeat:
- dequant: `GGUFLinear.dequantized_weight` of all ten Linears into the compute dtype (what a forward adds);
- matmul: the ten F.linear calls on the dequantized weights: q, k, v, o, cross q, o and the FFN over `tokens`
  rows, cross k, v over the 512 text rows (as the block runs them).
The matmul time grows with the tokens and the dequant time does not, so the CPU (where 32,760 tokens would take
minutes per block) measures fewer tokens and reports the ratio scaled to the real token count too:
dequant / (matmul_linear_in_tokens * real / measured), with the 512-row cross k/v kept as measured.

Writes benchmarks/results/gguf-<device>-<UTC date>.json with device, torch version, date and every timing.
Run: python benchmarks/bench_gguf.py [--device cpu|cuda] [--tokens N] [--repeats N] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_local.memory.quant.gguf import GGUFLinear
from wan_local.weights.gguf.types import GGML_BY_NAME

log = logging.getLogger("bench_gguf")
RESULTS = Path(__file__).resolve().parent / "results"
REAL_TOKENS = 32_760  # A14B 832x480x81: 21 x 30 x 52 tokens
TEXT_LEN = 512
FP16_FIELDS = {"Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def block_linears(dim: int, ffn: int) -> dict[str, tuple[int, int, bool]]:
    """{name: (out, in, runs over video tokens)} of one DiT block's Linears."""
    out = {f"self_attn.{p}": (dim, dim, True) for p in "qkvo"}
    out.update({f"cross_attn.{p}": (dim, dim, p in "qo") for p in "qkvo"})
    out.update({"ffn.0": (ffn, dim, True), "ffn.2": (dim, ffn, True)})
    return out


def gguf_type(name: str, ftype: str) -> str:
    if ftype == "Q8_0":
        return "Q8_0"
    return "Q6_K" if name.endswith(".v") or name == "ffn.2" else "Q4_K"


def random_layer(out: int, inp: int, type_name: str, device: torch.device, gen: torch.Generator) -> GGUFLinear:
    """A GGUFLinear with random stored bytes whose fp16 scale fields are small finite values."""
    ggml = GGML_BY_NAME[type_name]
    layer = GGUFLinear(inp, out, True, ggml=ggml, bias_dtype=torch.float32)
    raw = torch.randint(
        0, 256, (layer.weight.numel() // ggml.type_size, ggml.type_size), dtype=torch.uint8, generator=gen
    )
    for offset in FP16_FIELDS[type_name]:
        scale = (torch.rand(raw.shape[0], 1, generator=gen) * 1e-3).half()
        raw[:, offset : offset + 2] = scale.view(torch.uint8)
    layer.weight.data = raw.reshape(-1).to(device)
    layer.bias.data = torch.zeros(out, device=device)
    return layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); on a shared CPU the CPU seconds are the steadier figure."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_block(ftype: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = block_linears(args.dim, args.ffn)
    layers = {n: random_layer(o, i, gguf_type(n, ftype), device, gen) for n, (o, i, _) in shapes.items()}
    x_video = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    x_ffn = torch.randn(args.tokens, args.ffn, device=device, dtype=dtype)
    x_text = torch.randn(TEXT_LEN, args.dim, device=device, dtype=dtype)
    weights = {n: layer.dequantized_weight(dtype) for n, layer in layers.items()}

    def dequant() -> None:
        for layer in layers.values():
            layer.dequantized_weight(dtype)

    def matmul(video: bool) -> None:
        for n, (_, inp, over_video) in shapes.items():
            if over_video == video:
                x = x_ffn if inp == args.ffn else (x_video if video else x_text)
                F.linear(x, weights[n])

    runs: dict[str, list[float]] = {}
    dequant(), matmul(True), matmul(False)  # warm-up
    for _ in range(args.repeats):
        for name, fn in (
            ("dequant", dequant),
            ("matmul_video", lambda: matmul(True)),
            ("matmul_text", lambda: matmul(False)),
        ):
            wall, cpu = timed(fn, device)
            runs.setdefault(f"{name}_s", []).append(wall)
            runs.setdefault(f"{name}_cpu_s", []).append(cpu)
    best = {k: min(v) for k, v in runs.items()}
    matmul_s = best["matmul_video_s"] + best["matmul_text_s"]
    scaled = best["matmul_video_s"] * REAL_TOKENS / args.tokens + best["matmul_text_s"]
    packed = sum(layer.weight.numel() for layer in layers.values())
    params = sum(o * i for o, i, _ in shapes.values())
    result = {
        "ftype": ftype,
        "types": {n: gguf_type(n, ftype) for n in shapes},
        "packed_bytes": packed,
        "bf16_bytes": 2 * params,
        "bits_per_weight": 8 * packed / params,
        "dequant_s_min": best["dequant_s"],
        "matmul_s_min": matmul_s,
        "dequant_over_matmul": best["dequant_s"] / matmul_s,
        "matmul_s_at_real_tokens": scaled,
        "dequant_over_matmul_at_real_tokens": best["dequant_s"] / scaled,
        "dequant_gb_per_s": packed / best["dequant_s"] / 1e9,
        "dequant_over_matmul_cpu_seconds": best["dequant_cpu_s"]
        / (best["matmul_video_cpu_s"] + best["matmul_text_cpu_s"]),
        "median": {k: statistics.median(v) for k, v in runs.items()},
        "runs": runs,
    }
    log.info(
        "%s: %.2f bits/weight, dequant %.3f s, matmul %.3f s at %d tokens (ratio %.3f); at %d tokens ratio %.4f",
        *(ftype, result["bits_per_weight"], best["dequant_s"], matmul_s, args.tokens),
        *(result["dequant_over_matmul"], REAL_TOKENS, result["dequant_over_matmul_at_real_tokens"]),
    )
    return result


def main() -> None:
    """Parse flags, run both file types, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=0, help=f"video tokens (default {REAL_TOKENS} on CUDA, 256 CPU)")
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but not available")
    args.tokens = args.tokens or (REAL_TOKENS if device.type == "cuda" else 256)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    now = dt.datetime.now(dt.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
        "real_tokens": REAL_TOKENS,
        "text_len": TEXT_LEN,
        "load_average_before": os.getloadavg(),
        "blocks": [bench_block(ftype, args, device, dtype) for ftype in ("Q8_0", "Q4_K_M")],
    }
    report["load_average_after"] = os.getloadavg()  # other processes on the cores stretch the wall times
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gguf-{device.type}-{now.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
