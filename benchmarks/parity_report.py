"""Largest relative L2 error of every golden tensor of the wan22-tiny fixtures, as a table (and JSON).

    python benchmarks/parity_report.py [--fixtures PATH] [--json OUT]

Runs every component case and every pipeline case on the CPU in float32 through the project's loaders and
pipeline, and compares each stored tensor with what the official code produced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import rel_l2
from safetensors.torch import load_file

from wan_local.memory import experts as experts_module
from wan_local.pipeline import GenerationSettings, WanPipeline
from wan_local.prompt import PromptTokenizer
from wan_local.weights.loading import load_dit, load_text_encoder, load_vae

REPO = Path(__file__).resolve().parents[1]


def component_errors(root: Path) -> dict[str, float]:
    golden = root / "golden"
    out = {}
    for case, folder in (("dit_t2v", "t2v-A14B/high_noise_model"), ("dit_i2v", "i2v-A14B/low_noise_model"),
                         ("dit_ti2v", "ti2v-5B")):  # fmt: skip
        g = load_file(str(golden / f"{case}.safetensors"))
        model = load_dit(root / folder)
        y = g["y"][None] if "y" in g else None
        t = g["t"].float() if g["t"].dim() == 2 else g["t"]
        with torch.no_grad():
            got = model(g["x"][None], t, [g["context"]], y=y)[0]
        out[f"{case}.out"] = rel_l2(got, g["out"])
    for kind, folder, name in (
        ("wan2.1", "t2v-A14B/Wan2.1_VAE.pth", "vae21"),
        ("wan2.2", "ti2v-5B/Wan2.2_VAE.pth", "vae22"),
    ):
        vae = load_vae(root / folder, kind)
        enc = load_file(str(golden / f"{name}_encode.safetensors"))
        dec = load_file(str(golden / f"{name}_decode.safetensors"))
        with torch.no_grad():
            out[f"{name}_encode.latent"] = rel_l2(vae.encode(enc["video"][None])[0], enc["latent"])
            out[f"{name}_decode.video"] = rel_l2(vae.decode(dec["latent"][None])[0], dec["video"])
    return out


def pipeline_errors(root: Path, case: str, args: dict) -> dict[str, float]:
    g = load_file(str(root / "golden" / f"{case}.safetensors"))
    folder = root / args["task"]
    out: dict[str, float] = {}
    tokenizer = PromptTokenizer.from_dir(folder / "google" / "umt5-xxl")
    encoder = load_text_encoder(folder / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    ids, mask = tokenizer([args["prompt"], args["n_prompt_effective"]])
    out["prompt_ids (mismatches)"] = float((ids[0] != g["prompt_ids"]).sum() + (mask[0] != g["prompt_mask"]).sum())
    out["neg_ids (mismatches)"] = float((ids[1] != g["neg_ids"]).sum() + (mask[1] != g["neg_mask"]).sum())
    with torch.no_grad():
        out["context_prompt"] = rel_l2(encoder.encode(ids[:1], mask[:1])[0], g["context_prompt"])
        out["context_neg"] = rel_l2(encoder.encode(ids[1:], mask[1:])[0], g["context_neg"])

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_load = experts_module.load_dit

    class Recorder:
        def __init__(self, model):
            self.model, self.cfg = model, model.cfg

        def to(self, *a, **k):
            self.model = self.model.to(*a, **k)
            return self

        def __call__(self, x, t, context, y=None):
            result = self.model(x, t, context, y=y)
            calls.append((x[0].clone(), result[0].clone()))
            return result

    experts_module.load_dit = lambda path, **kw: Recorder(real_load(path, **kw))
    try:
        if "image" in args:
            side = int(args["max_area"] ** 0.5)
            size = (side, side) if side * side == args["max_area"] else (args["max_area"] // 48, 48)
        else:
            size = tuple(int(v) for v in args["size"].split("*"))
        guide = args["guide_scale"]
        settings = GenerationSettings(
            task=args["task"], prompt=args["prompt"], negative_prompt=args["n_prompt"],
            image=str(root / "golden" / args["image"]) if "image" in args else None, size=size,
            frames=args["frame_num"], steps=args["sampling_steps"], shift=args["shift"],
            guide_scale=tuple(guide) if isinstance(guide, list) else (guide, guide),
            solver=args["sample_solver"], seed=args["seed"],
        )  # fmt: skip
        result = WanPipeline(folder, args["task"], device="cpu", dtype=torch.float32).generate(settings)
    finally:
        experts_module.load_dit = real_load
    n = len(calls) // 2
    out["step_latent_in (max over steps)"] = max(rel_l2(calls[2 * i][0], g["step_latent_in"][i]) for i in range(n))
    out["noise_pred_cond (max)"] = max(rel_l2(calls[2 * i][1], g["noise_pred_cond"][i]) for i in range(n))
    out["noise_pred_uncond (max)"] = max(rel_l2(calls[2 * i + 1][1], g["noise_pred_uncond"][i]) for i in range(n))
    out["final_latent"] = rel_l2(result.latent, g["final_latent"])
    out["video"] = rel_l2(result.video, g["video"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures" / "wan22-tiny")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    cases = json.loads((args.fixtures / "golden" / "cases.json").read_text())["cases"]
    report = {"components": component_errors(args.fixtures)}
    for name, case in cases.items():
        if case["kind"] == "pipeline":
            report[name] = pipeline_errors(args.fixtures, name, case["args"])
    for section, values in report.items():
        print(f"\n{section}")
        for key, value in values.items():
            print(f"  {key:<36} {value:.3g}")
    if args.json:
        meta = {"torch": torch.__version__, "device": "cpu", "dtype": "float32", "date": time.strftime("%Y-%m-%d")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
