"""Which compute kernels a job runs: the attention kernel (PyTorch SDPA, FlashAttention-2/3, SageAttention) and the
matmul of FP8-stored Linears (torch._scaled_mm with row-wise or tensor-wise scales, or dequantize + bf16 matmul).

Every choice is a pure function of facts: the GPU's compute capability (None: no CUDA GPU), the installed
packages and torch version (`Software`), and the compute dtype ("bf16", "fp16", "fp32"). tests/test_kernels.py
checks the table for every GPU generation on the CPU. "auto" picks the fastest kernel known to work and never a
lossy one (SageAttention is used only when asked for); an explicit request this machine cannot honour raises
InputError naming what is missing and what to use instead. `resolve_job` calls this before anything loads.

Per-architecture facts and their sources (PyTorch: pytorch/pytorch source and pull requests; FA:
Dao-AILab/flash-attention; Sage: thu-ml/SageAttention):
- torch._scaled_mm tensor-wise (one fp32 scale per operand, cuBLASLt): sm89 and newer (its own check: "only
  supported on CUDA devices with compute capability >= 9.0 or 8.9"); works on sm120 (pytorch #192707).
- Row-wise scales (scale_a [M, 1], scale_b [1, N]) run a CUTLASS kernel that is not built on Windows
  (RowwiseScaledMM.cu: BUILD_ROWWISE_FP8_KERNEL needs !_WIN32; pytorch PR #194606). Linux: sm90 since the kernel
  landed (PR #128989, June 2024; counted from torch 2.5), sm89 from torch 2.7 (PRs #144348, #145676, Jan 2025),
  sm100 from torch 2.9 (cuBLAS has no row-wise scales there; PRs #160693, #161236 route it to CUTLASS, Aug 2025).
  sm120: not used: torch 2.10 fails with CUBLAS_STATUS_NOT_SUPPORTED (pytorch #192707), and the newest
  dispatcher (RowwiseScaledMM.cpp) has branches for sm89, sm9x and sm10x only. Output: bf16 only before
  torch 2.10 (PR #166744 added fp16), so row-wise is used for bf16 compute only.
- FlashAttention-2: Ampere, Ada, Hopper (FA README), fp16/bf16, head dim <= 256; Turing is not supported
  ("FlashAttention only supports Ampere GPUs or newer"). Blackwell (sm100, sm120) kernels are compiled from 2.7.3
  on when built with CUDA >= 12.8 (FA PR #1436); the official wheels were built with CUDA 12.3 / 12.4 up to
  2.7.4.post1 and with CUDA 12.9 from 2.8.0 (.github/workflows/publish.yml), so Blackwell needs 2.8.0+.
- FlashAttention-3 (`flash_attn_interface`, built from hopper/): Hopper only (README: "Requirements: H100 /
  H800"); its sm90 kernels are compiled for sm_90a, which no other GPU runs.
- SageAttention 2.x `sageattn()` dispatches sm80, sm86, sm89, sm90, sm120, sm121 and raises for anything else
  (sageattention/core.py); head dim <= 128. SageAttention 1.x (PyPI 1.0.6) is Triton only, head dim 64/96/128;
  its Triton path gave black frames with Wan on Blackwell (Comfy-Org/ComfyUI discussion #11583), so it is not
  used from sm100 on. Both take fp16/bf16 only, and need an Ampere GPU or newer (as the installer assumes).
Not verified on hardware here: the torch release that first ships each row-wise kernel (taken from the PR dates)
and flash-attn wheels from other builders than the official workflow.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from wan_local.errors import InputError
from wan_local.memory.options import ATTENTION_BACKENDS, QUANT_COMPUTE

ATTENTION_KERNELS = ("sdpa", "flash2", "flash3", "sage")
FP8_GEMMS = ("dequant", "rowwise", "tensorwise")
DTYPES = ("bf16", "fp16", "fp32")
HALF_DTYPES = ("bf16", "fp16")

# import name -> distribution names it is installed under
ATTENTION_PACKAGES = {
    "flash_attn": ("flash-attn", "flash_attn"),
    "flash_attn_interface": ("flash_attn_3", "flash-attn-3"),
    "sageattention": ("sageattention",),
}
FLASH2_BLACKWELL = (2, 8, 0)
SAGE2_ARCHS = frozenset({(8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1)})
# torch release from which torch._scaled_mm takes row-wise scales on Linux: by (major, minor), else by major.
ROWWISE_SINCE_TORCH = {(8, 9): (2, 7), 9: (2, 5), 10: (2, 9)}


@dataclass(frozen=True)
class Software:
    """What is installed that kernel choices depend on. packages: import name -> version ("" when unknown) of the
    optional attention packages present (keys of ATTENTION_PACKAGES); platform: "linux", "windows" or "darwin"."""

    torch_version: str = ""
    platform: str = "linux"
    packages: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    """A kernel and why it was picked (one line, for the log)."""

    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kernel} ({self.reason})"


@dataclass(frozen=True)
class JobKernels:
    """The kernels one job runs: attention (one of ATTENTION_KERNELS), fp8 (one of FP8_GEMMS: how FP8-stored
    Linears multiply; int8 Linears always dequantize)."""

    attention: Choice
    fp8: Choice

    def describe(self) -> str:
        return f"attention {self.attention}; FP8 Linears {self.fp8}"


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "2.13.0+cu128" -> (2, 13, 0); "" -> ()."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def sm(capability: tuple[int, int]) -> str:
    """(8, 9) -> "sm89"."""
    return f"sm{capability[0]}{capability[1]}"


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name} {value!r} is not one of {', '.join(allowed)}")


# ------------------------------------------------------------------------------------------------ attention


def _flash3_problem(capability: tuple[int, int], version: str) -> str | None:
    if capability[0] != 9:
        return f"FlashAttention-3 runs on Hopper (sm90) only, this GPU is {sm(capability)}"
    return None


def _flash2_problem(capability: tuple[int, int], version: str) -> str | None:
    if capability < (8, 0):
        return f"FlashAttention-2 needs an Ampere (sm80) or newer GPU, this GPU is {sm(capability)}"
    if capability[0] >= 10 and version_tuple(version) < FLASH2_BLACKWELL:
        return (
            f"flash-attn {version or '(unknown version)'} has no kernels for {sm(capability)} "
            "(its Blackwell kernels ship from flash-attn 2.8.0 on)"
        )
    return None


def _sage_problem(capability: tuple[int, int], version: str) -> str | None:
    if capability < (8, 0):
        return f"SageAttention needs an Ampere (sm80) or newer GPU, this GPU is {sm(capability)}"
    if version_tuple(version) >= (2,):
        if capability not in SAGE2_ARCHS:
            archs = ", ".join(sm(c) for c in sorted(SAGE2_ARCHS))
            return f"SageAttention {version} has kernels for {archs}, not for {sm(capability)}"
    elif capability[0] >= 10:
        return (
            f"SageAttention {version or '1.x'} (Triton kernels) gives black frames on Blackwell; "
            "SageAttention 2.1+ supports sm120"
        )
    return None


def _named(name: str, version: str) -> str:
    return f"{name} {version}" if version else name


_FLASH = (  # kernel, name, import name, problem finder; best first
    ("flash3", "FlashAttention-3", "flash_attn_interface", _flash3_problem),
    ("flash2", "FlashAttention-2", "flash_attn", _flash2_problem),
)


def choose_attention(
    requested: str, capability: tuple[int, int] | None, packages: Mapping[str, str], dtype: str
) -> Choice:
    """The attention kernel for `requested` ("auto", "sdpa", "flash", "sage") on a GPU of `capability` (None: the
    job runs on the CPU) with `packages` installed (import name -> version) at compute `dtype`.

    auto: FlashAttention-3 on Hopper, else FlashAttention-2 where it runs, else SDPA (never SageAttention, which is
    slightly lossy). flash / sage: that kernel, or InputError saying what is missing and what to use instead.
    """
    _check("attention", requested, ATTENTION_BACKENDS)
    _check("compute dtype", dtype, DTYPES)
    if requested == "sdpa":
        return Choice("sdpa", "PyTorch SDPA, as set")
    flag = f"--attention {requested}"
    if capability is None:
        if requested == "auto":
            return Choice("sdpa", "no CUDA GPU: PyTorch SDPA is the CPU kernel")
        raise InputError(f"{flag} needs a CUDA GPU, but this job runs on the CPU; use --attention auto or sdpa")
    if dtype not in HALF_DTYPES:
        if requested == "auto":
            return Choice("sdpa", f"{dtype} compute: FlashAttention and SageAttention take bf16/fp16 only")
        raise InputError(
            f"{flag} computes in bf16/fp16, but this job runs in {dtype}; use --dtype bf16 or --attention sdpa"
        )
    if requested == "sage":
        version = packages.get("sageattention")
        problem = "SageAttention is not installed" if version is None else _sage_problem(capability, version)
        if problem:
            raise InputError(f"{flag}: {problem}; use --attention auto (FlashAttention or SDPA) or sdpa")
        return Choice(
            "sage", f"{_named('SageAttention', version)} on {sm(capability)}, as asked (8-bit, slightly lossy)"
        )
    problems = []
    for kernel, name, module, find_problem in _FLASH:
        if module in packages:
            problem = find_problem(capability, packages[module])
            if problem is None:
                return Choice(kernel, f"{_named(name, packages[module])} on {sm(capability)}, {dtype}")
            problems.append(problem)
    missing = not problems
    why = "; ".join(problems) or "flash-attn is not installed"
    if requested == "auto":
        return Choice("sdpa", f"PyTorch SDPA: {why}")
    install = " (or install flash-attn with the setup script)" if missing and capability >= (8, 0) else ""
    raise InputError(f"{flag}: {why}; use --attention auto or sdpa (PyTorch SDPA){install}")


# ------------------------------------------------------------------------------------------------- FP8 GEMM


def _rowwise_problem(capability: tuple[int, int], torch_version: str, platform: str, dtype: str) -> str | None:
    since = ROWWISE_SINCE_TORCH.get(capability) or ROWWISE_SINCE_TORCH.get(capability[0])
    if since is None:
        return f"torch._scaled_mm has no row-wise scales on {sm(capability)}"
    if platform == "windows":
        return "PyTorch's row-wise FP8 kernel is not built on Windows"
    if version_tuple(torch_version)[:2] < since:
        return f"row-wise scales on {sm(capability)} need torch {since[0]}.{since[1]}+ (this is {torch_version})"
    if dtype != "bf16":
        return f"row-wise scales output bf16 only (this job computes in {dtype})"
    return None


def fp8_gemm_kind(capability: tuple[int, int] | None, torch_version: str, platform: str, dtype: str) -> Choice:
    """How FP8-stored Linears multiply when FP8 GEMMs are wanted: "rowwise" (torch._scaled_mm with one activation
    scale per token and the weight's per-row scale, bias fused: one rounding), "tensorwise" (torch._scaled_mm
    accumulating in fp32, per-token and per-row scales and bias applied after it in fp32: one rounding) or
    "dequant" (the weight dequantized to `dtype` and F.linear: no FP8 GEMM here)."""
    _check("compute dtype", dtype, DTYPES)
    if capability is None:
        return Choice("dequant", "no CUDA GPU")
    if dtype not in HALF_DTYPES:
        return Choice("dequant", f"{dtype} compute: FP8 GEMMs compute in bf16/fp16")
    if capability < (8, 9):
        return Choice("dequant", f"{sm(capability)} has no FP8 tensor cores (FP8 GEMMs need sm89 or newer)")
    problem = _rowwise_problem(capability, torch_version, platform, dtype)
    if problem is None:
        return Choice("rowwise", f"torch._scaled_mm with row-wise scales on {sm(capability)}, {dtype}")
    return Choice("tensorwise", f"torch._scaled_mm with tensor-wise scales: {problem}")


def choose_fp8_gemm(
    requested: str, capability: tuple[int, int] | None, torch_version: str, platform: str, dtype: str
) -> Choice:
    """`fp8_gemm_kind` for --quant-compute `requested`: "dequant" always dequantizes; "scaled_mm" raises
    InputError where this machine has no FP8 GEMM (no CUDA GPU, a GPU before sm89, fp32 compute)."""
    _check("quant_compute", requested, QUANT_COMPUTE)
    if requested == "dequant":
        return Choice("dequant", "weights dequantized to the compute dtype, as set")
    kind = fp8_gemm_kind(capability, torch_version, platform, dtype)
    if kind.kernel == "dequant":
        if capability is None:
            raise InputError(
                "--quant-compute scaled_mm needs a CUDA GPU with FP8 (sm89 or newer), but this job runs on the "
                "CPU; use --quant-compute dequant"
            )
        raise InputError(f"--quant-compute scaled_mm: {kind.reason}; use --quant-compute dequant")
    return kind


def choose_kernels(
    attention: str,
    quant_compute: str,
    capability: tuple[int, int] | None,
    software: Software,
    dtype: str,
) -> JobKernels:
    """Both choices for one job (raises InputError for an explicit request that cannot be honoured)."""
    return JobKernels(
        choose_attention(attention, capability, software.packages, dtype),
        choose_fp8_gemm(quant_compute, capability, software.torch_version, software.platform, dtype),
    )


# ---------------------------------------------------------------------------------------------- detecting


def _installed_version(distributions: tuple[str, ...]) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def current_platform() -> str:
    """ "linux", "windows" or "darwin" for this process."""
    return "windows" if sys.platform.startswith("win") else "darwin" if sys.platform == "darwin" else "linux"


def detect_software() -> Software:
    """This process's facts: torch's version, the platform and which attention packages can be found (imports
    nothing: a package is found by its module spec, its version read from its metadata)."""
    packages = {}
    for module, distributions in ATTENTION_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            packages[module] = _installed_version(distributions) or ""
    return Software(_installed_version(("torch",)) or "", current_platform(), packages)
