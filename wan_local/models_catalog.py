"""The weight variants the Models tab offers per task, their sizes, what they cost in quality, and which one fits
this PC.

- official: the Wan-AI repository as published (fp32 experts of ~57 GB each for A14B), fetched whole.
- comfy-fp16 / comfy-fp8_scaled: Comfy-Org's repackaged single files (`Comfy-Org/Wan_2.2_ComfyUI_Repackaged`,
  `split_files/{diffusion_models,text_encoders,vae}/…`, fact sheet §3.3).
- gguf-<QT>: QuantStack's GGUF experts (`QuantStack/Wan2.2-{T2V,I2V}-A14B-GGUF` `HighNoise/…`, `LowNoise/…`,
  `QuantStack/Wan2.2-TI2V-5B-GGUF`, §3.4) with Comfy-Org's fp8 text encoder and VAE.

The file variants land in a ComfyUI-style folder (`diffusion_models/`, `text_encoders/`, `vae/`) that
`weights.layout.find_checkpoints` accepts; no tokenizer folder is needed (Comfy-Org's UMT5 files carry the
tokenizer as `spiece_model`). Sizes are listed from the Hub when a download is
checked (`variant_download`); `KNOWN_BYTES` holds the sizes the fact sheet gives, shown offline and marked so.
"""

from __future__ import annotations

from dataclasses import dataclass

from wan_local.machine import GIB, MachineInfo
from wan_local.specs import get_task

OFFICIAL_REPOS: dict[str, str] = {
    "t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B",
    "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
    "ti2v-5B": "Wan-AI/Wan2.2-TI2V-5B",
}
COMFY_REPO = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
GGUF_REPOS = {
    "t2v-A14B": "QuantStack/Wan2.2-T2V-A14B-GGUF",
    "i2v-A14B": "QuantStack/Wan2.2-I2V-A14B-GGUF",
    "ti2v-5B": "QuantStack/Wan2.2-TI2V-5B-GGUF",
}
GGUF_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")

#: Sizes in bytes as the fact sheet states them (§3.1, §3.3, §3.4), used when the Hub cannot be asked; a file
#: missing here shows as "size unknown offline". fp16 / fp8_scaled experts "28.6 GB" / "14.3 GB" each; UMT5 fp16
#: 5,680,910,336 params x 2 bytes; an A14B Q4_K_M expert 9,651,728,896 B (I2V low noise; the other three experts
#: have the same shapes); TI2V-5B Q8_0 ≈ 5.0 GiB, Q4_K_M ≈ 3.2 GiB; official repos: 2 x 57 GB + UMT5 11.4 GB +
#: VAE 0.5 GB (A14B), 20 GB + 11.4 GB + 2.8 GB (5B).
KNOWN_BYTES: dict[str, int] = {
    **{f"wan2.2_{t}_{e}_noise_14B_fp16.safetensors": 28_600_000_000 for t in ("t2v", "i2v") for e in ("high", "low")},
    **{
        f"wan2.2_{t}_{e}_noise_14B_fp8_scaled.safetensors": 14_300_000_000
        for t in ("t2v", "i2v")
        for e in ("high", "low")
    },
    "umt5_xxl_fp16.safetensors": 11_361_820_672,
    **{f"Wan2.2-{t}-A14B-{e}-Q4_K_M.gguf": 9_651_728_896 for t in ("T2V", "I2V") for e in ("HighNoise", "LowNoise")},
    "Wan2.2-TI2V-5B-Q8_0.gguf": int(5.0 * GIB),
    "Wan2.2-TI2V-5B-Q4_K_M.gguf": int(3.2 * GIB),
    "Wan-AI/Wan2.2-T2V-A14B": 2 * 57_000_000_000 + 11_400_000_000 + 508_000_000,
    "Wan-AI/Wan2.2-I2V-A14B": 2 * 57_000_000_000 + 11_400_000_000 + 508_000_000,
    "Wan-AI/Wan2.2-TI2V-5B": 20_000_000_000 + 11_400_000_000 + 2_820_000_000,
}

#: Quality cost of each variant, measured by benchmarks/bench_variant_quality.py on the tiny fixture (t2v
#: high-noise expert written as the published files store it, loaded by the project's loader; rel. L2 of the DiT
#: output against the official code's golden output; benchmarks/results/variant-quality-2026-12-02.json).
QUALITY: dict[str, str] = {
    "official": "reference weights (fp32 on disk, run in bf16: DiT output rel. L2 2.7e-3 vs fp32 on the fixture)",
    "comfy-fp16": "fp16 weights: DiT output rel. L2 3.6e-4 vs fp32 on the fixture (weights 2.1e-4) — no visible loss",
    "comfy-fp8_scaled": "fp8 e4m3 weights with one scale per layer: DiT output rel. L2 1.2e-2 vs fp32 on the fixture "
    "(weights 2.6e-2) — small loss of detail",
    "gguf-Q8_0": "GGUF Q8_0 (8-bit blocks of 32): DiT output rel. L2 2.5e-3 vs fp32 on the fixture (weights 5.3e-3) "
    "— about as close as bf16",
    "gguf-Q6_K": "GGUF Q6_K (6-bit): DiT output rel. L2 at most 7.8e-3 vs fp32 on the fixture (weights 1.9e-2, plain "
    "rounding; llama-quantize does better) — close to fp8",
    "gguf-Q5_K_M": "GGUF Q5_K_M (5-bit, 6-bit for v and ffn.2): DiT output rel. L2 at most 1.3e-2 vs fp32 on the "
    "fixture (weights 3.4e-2, plain rounding) — about as fp8_scaled",
    "gguf-Q4_K_M": "GGUF Q4_K_M (4-bit, 6-bit for v and ffn.2): DiT output rel. L2 at most 2.7e-2 vs fp32 on the "
    "fixture (weights 6.8e-2, plain rounding; llama-quantize does better) — visible loss of fine detail",
}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a variant: `path` in `repo_id`, saved as `target` (relative to the download folder). optional:
    fetched only when the Hub lists it."""

    repo_id: str
    path: str
    target: str
    optional: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Variant:
    """A downloadable set of weights for `task`. repo_id: set for "official" (the whole repository); files: the
    single files of the other variants."""

    key: str
    task: str
    label: str
    repo_id: str | None = None
    files: tuple[RemoteFile, ...] = ()

    @property
    def quality(self) -> str:
        return QUALITY[self.key]

    def known_bytes(self) -> int | None:
        """Total size from the fact sheet's numbers (offline), None when some required file's size is not known."""
        if self.repo_id is not None:
            return KNOWN_BYTES.get(self.repo_id)
        sizes = [KNOWN_BYTES.get(f.name) for f in self.files if not f.optional]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]

    def folder_name(self) -> str:
        """The default download folder's name, e.g. "Wan2.2-T2V-A14B" or "Wan2.2-T2V-A14B-comfy-fp8_scaled"."""
        base = OFFICIAL_REPOS[self.task].split("/", 1)[1]
        return base if self.key == "official" else f"{base}-{self.key}"


def _comfy(folder: str, name: str) -> RemoteFile:
    return RemoteFile(COMFY_REPO, f"split_files/{folder}/{name}", f"{folder}/{name}")


def variants(task: str) -> list[Variant]:
    """Every variant offered for `task`, largest first."""
    spec = get_task(task)
    name = spec.name
    vae = _comfy("vae", "wan_2.1_vae.safetensors" if spec.vae == "wan2.1" else "wan2.2_vae.safetensors")
    t5_fp16 = _comfy("text_encoders", "umt5_xxl_fp16.safetensors")
    t5_fp8 = _comfy("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    out = [Variant("official", name, f"Official {OFFICIAL_REPOS[name]} (fp32)", repo_id=OFFICIAL_REPOS[name])]
    if spec.two_experts:
        t = spec.model_type
        for precision, t5 in (("fp16", t5_fp16), ("fp8_scaled", t5_fp8)):
            dits = tuple(
                _comfy("diffusion_models", f"wan2.2_{t}_{e}_noise_14B_{precision}.safetensors") for e in ("high", "low")
            )
            out.append(Variant(f"comfy-{precision}", name, f"Comfy-Org {precision}", files=(*dits, t5, vae)))
        upper = t.upper()
        for qt in GGUF_QUANTS:
            dits = tuple(
                RemoteFile(
                    GGUF_REPOS[name],
                    f"{e}/Wan2.2-{upper}-A14B-{e}-{qt}.gguf",
                    f"diffusion_models/Wan2.2-{upper}-A14B-{e}-{qt}.gguf",
                )
                for e in ("HighNoise", "LowNoise")
            )
            out.append(Variant(f"gguf-{qt}", name, f"QuantStack GGUF {qt}", files=(*dits, t5_fp8, vae)))
    else:
        dit = _comfy("diffusion_models", "wan2.2_ti2v_5B_fp16.safetensors")
        out.append(Variant("comfy-fp16", name, "Comfy-Org fp16", files=(dit, t5_fp16, vae)))
        for qt in GGUF_QUANTS:
            gguf = RemoteFile(
                GGUF_REPOS[name], f"Wan2.2-TI2V-5B-{qt}.gguf", f"diffusion_models/Wan2.2-TI2V-5B-{qt}.gguf"
            )
            out.append(Variant(f"gguf-{qt}", name, f"QuantStack GGUF {qt}", files=(gguf, t5_fp8, vae)))
    return out


def get_variant(task: str, key: str) -> Variant:
    """The variant `key` of `task`; KeyError naming the keys offered."""
    found = {v.key: v for v in variants(task)}
    if key not in found:
        raise KeyError(f"{key!r} is not a variant of {task}; offered: {', '.join(found)}")
    return found[key]


@dataclass(frozen=True)
class Recommendation:
    """The variant suggested for a machine, with the reason in words."""

    key: str
    reason: str


def recommend(task: str, machine: MachineInfo, preset_label: str | None = None) -> Recommendation:
    """The variant that fits `machine` best: the largest whose DiT fits the card (one expert at a time, streamed
    from RAM by the engine's presets) and whose files the RAM can hold for loading; GGUF Q4_K_M below that."""
    spec = get_task(task)
    vram, ram = machine.vram_total_bytes / GIB, machine.ram_total_bytes / GIB
    have = f"{vram:.0f} GiB VRAM, {ram:.0f} GiB RAM" if machine.has_gpu else f"no CUDA GPU, {ram:.0f} GiB RAM"
    preset = f" (preset '{preset_label}')" if preset_label else ""
    if spec.two_experts:
        if not machine.has_gpu or ram < 28:
            key, why = "gguf-Q4_K_M", "the smallest offered: 9.7 GB per expert, the least RAM and disk"
        elif vram >= 40 and ram >= 96:
            key, why = "comfy-fp16", "a 48 GB card with this much RAM runs full-precision experts (28.6 GB each)"
        elif vram >= 20 or ram >= 56:
            key, why = "comfy-fp8_scaled", "14.3 GB per expert fits the card with block streaming and the RAM"
        else:
            key, why = (
                "gguf-Q4_K_M",
                "9.7 GB per expert: one expert and the streamed blocks fit 16 GB cards and 32 GB RAM",
            )
    else:
        if machine.has_gpu and vram >= 14 and ram >= 28:
            key, why = "comfy-fp16", "the 5B model in fp16 (10 GB) fits the card"
        else:
            key, why = "gguf-Q8_0", "the 5B model in Q8_0 (5.4 GB) keeps RAM and disk low"
    return Recommendation(key, f"Recommended for this PC ({have}){preset}: {get_variant(task, key).label} — {why}.")
