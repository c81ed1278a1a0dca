"""What each downloadable weight variant costs in quality, measured on the tiny fixture (the Models tab cites it).

    python benchmarks/bench_variant_quality.py      # needs the wan22-tiny fixtures (WAN_LOCAL_FIXTURES)

For the t2v high-noise expert of the tiny fixture (fp32 official shards), every variant is written as the
published files store it and loaded back through the project's own loader (`weights.loading.load_dit`, which
dequantizes fp8_scaled with `weights.fp8`):

- fp16 / bf16: every floating tensor cast (Comfy-Org's `_fp16` files; the official fp32 shards run in bf16);
- fp8_scaled: every block Linear weight in float8_e4m3fn with one float32 `scale_weight` = absmax / 448 per layer
  (ComfyUI's scaled-fp8 encoding, fact sheet §3.3), the rest fp32.

- GGUF Q8_0 / Q6_K / Q5_K_M / Q4_K_M: written as city96's converter + llama-quantize lay them out
  (tests/gguf_files.py, gguf-py's writer; Q8_0 by gguf-py's quantizer, the K-quants by the tests' plain
  round-to-nearest encoders, which are no better than llama-quantize's searched scales: the numbers are upper
  bounds) and run by the project's GGUF layers.

Reported per variant: rel. L2 of the block Linear weights against fp32, and rel. L2 of the DiT output against the
golden `dit_t2v` output of the official code (same inputs). Needs gguf-py (the test extra).
Writes benchmarks/results/variant-quality-<date>.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gguf_files import write_gguf_dit  # noqa: E402

from wan_local.weights.loading import load_dit  # noqa: E402

FP8_MAX = 448.0
LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight|blocks\.\d+\.ffn\.[02]\.weight")
PREFIX = "model.diffusion_model."


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def official_sd(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    return {k: v for shard in sorted(set(index.values())) for k, v in load_file(str(folder / shard)).items()}


def write_variant(sd: dict[str, torch.Tensor], variant: str, path: Path, config: dict) -> None:
    stored: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if variant == "fp8_scaled" and LINEAR.fullmatch(key):
            w = value.float()
            scale = (w.abs().max() / FP8_MAX).reshape(())
            stored[key] = (w / scale).to(torch.float8_e4m3fn)
            stored[key.removesuffix(".weight") + ".scale_weight"] = scale
        elif variant in ("fp16", "bf16") and value.is_floating_point():
            stored[key] = value.to(torch.float16 if variant == "fp16" else torch.bfloat16)
        else:
            stored[key] = value
    if variant == "fp8_scaled":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    tensors = {PREFIX + k: v.contiguous() for k, v in stored.items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})


def main() -> int:
    fixtures = Path(os.environ.get("WAN_LOCAL_FIXTURES", ROOT.parent / "shared" / "fixtures" / "wan22-tiny"))
    expert = fixtures / "t2v-A14B" / "high_noise_model"
    golden = load_file(str(fixtures / "golden" / "dit_t2v.safetensors"))
    sd = official_sd(expert)
    config = json.loads((expert / "config.json").read_text())
    results: dict[str, dict] = {}
    linears = [k for k in sd if LINEAR.fullmatch(k)]
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("fp32", "bf16", "fp16", "fp8_scaled", "gguf-Q8_0", "gguf-Q6_K", "gguf-Q5_K_M", "gguf-Q4_K_M"):
            if variant.startswith("gguf-"):
                path = Path(tmp) / f"Wan2.2-T2V-A14B-HighNoise-{variant[5:]}.gguf"
                stored = write_gguf_dit(path, expert, variant[5:])  # the values as stored, decoded by gguf-py
                model = load_dit(path, expected_model_type="t2v")
                weights = stored
            else:
                path = Path(tmp) / f"wan2.2_t2v_high_noise_14B_{variant}.safetensors"
                write_variant(sd, variant, path, config)
                model = load_dit(path, expected_model_type="t2v")
                weights = model.state_dict()
            flat = [torch.cat([w[k].float().flatten() for k in linears]) for w in (weights, sd)]
            weight_err = rel_l2(*flat)
            with torch.inference_mode():
                out = model(golden["x"][None], golden["t"], [golden["context"]])
            results[variant] = {
                "block_linear_weight_rel_l2": weight_err,
                "dit_output_rel_l2_vs_golden": rel_l2(out[0], golden["out"]),
            }
            out_err = results[variant]["dit_output_rel_l2_vs_golden"]
            print(f"{variant:>10}: weights rel L2 {weight_err:.2e}, DiT output rel L2 {out_err:.2e}")
    out = {
        "benchmark": "variant_quality",
        "fixture": "wan22-tiny t2v-A14B high_noise_model (dim 64, 2 layers) + golden dit_t2v",
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "results": results,
    }
    dest = ROOT / "benchmarks" / "results" / f"variant-quality-{out['date']}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
