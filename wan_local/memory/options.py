"""The memory settings a user (or a preset) chooses; the planner turns them into a concrete plan.

These are the knobs of the low-VRAM engine. Each has an "auto" value that lets the planner decide from the
measured machine (free VRAM, available RAM) and the job (task, size, frames).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from wan_local.errors import InputError

QUANT_MODES = ("none", "int8", "fp8")
QUANT_SCOPES = ("all", "ffn")
QUANT_COMPUTE = ("dequant", "scaled_mm")
OFFLOAD_MODES = ("auto", "none", "blocks", "full")
IDLE_EXPERT_POLICIES = ("auto", "keep", "drop")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage")
VAE_TILING = ("auto", "on", "off")


@dataclass(frozen=True)
class MemoryOptions:
    """How the engine may use VRAM and RAM for one job.

    quant: storage of the DiT blocks' Linear weights ("none" keeps bf16).
    quant_scope: "all" block linears, or "ffn" only (FP8 on attention hurts long videos).
    quant_compute: "dequant" (weights dequantized to bf16 inside each Linear) or "scaled_mm" (FP8 matmuls with
        torch._scaled_mm on sm89+ GPUs, activations quantized on the fly per token; a job asking for it on a
        machine without FP8 GEMMs is refused: wan_local.kernels).
    offload: "none" (everything resident), "blocks" (stream the blocks that do not fit), "full" (stream every
        block), "auto" (the planner picks the least streaming that fits).
    vram_budget_gb: VRAM the engine may use; None measures the free VRAM of the device.
    vram_reserve_gb: kept free for the CUDA context, the allocator's fragmentation and other programs.
    pinned_ram_cap_gb: most page-locked host memory to allocate for streaming; None lets the planner decide.
    keep_idle_expert: A14B only: keep the expert not in use in RAM ("keep"), free it ("drop"), or decide from RAM.
    vae_tiling: spatial tiling of the VAE decode.
    attention: attention kernel; "auto": FlashAttention-3 / -2 where installed and supported, else PyTorch SDPA;
        "flash" / "sage": that kernel or the job is refused (wan_local.kernels); "sdpa": PyTorch SDPA.
    """

    quant: str = "none"
    quant_scope: str = "all"
    quant_compute: str = "dequant"
    offload: str = "auto"
    vram_budget_gb: float | None = None
    vram_reserve_gb: float = 1.0
    pinned_ram_cap_gb: float | None = None
    keep_idle_expert: str = "auto"
    vae_tiling: str = "auto"
    attention: str = "auto"

    def __post_init__(self) -> None:
        choices = {
            "quant": QUANT_MODES,
            "quant_scope": QUANT_SCOPES,
            "quant_compute": QUANT_COMPUTE,
            "offload": OFFLOAD_MODES,
            "keep_idle_expert": IDLE_EXPERT_POLICIES,
            "vae_tiling": VAE_TILING,
            "attention": ATTENTION_BACKENDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vram_budget_gb", "pinned_ram_cap_gb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name} must be > 0 (or unset), got {value}")
        if self.vram_reserve_gb < 0:
            raise InputError(f"vram_reserve_gb must be >= 0, got {self.vram_reserve_gb}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
