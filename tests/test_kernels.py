"""Kernel choices (wan_local.kernels) as tables: every GPU generation x installed packages x compute dtype, on the
CPU. Each row asserts the kernel and the reason (or the refusal's message) a user would read in the log."""

from __future__ import annotations

import logging

import pytest

from wan_local.engine.request import JobSettings
from wan_local.engine.resolve import resolve_job
from wan_local.errors import InputError
from wan_local.kernels import (
    JobKernels,
    Software,
    choose_attention,
    choose_fp8_gemm,
    detect_software,
    fp8_gemm_kind,
    version_tuple,
)
from wan_local.machine import MachineInfo

GIB = 1024**3
SM75, SM86, SM89, SM90, SM100, SM120 = (7, 5), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)
GPUS = (SM75, SM86, SM89, SM90, SM100, SM120)
FA2 = {"flash_attn": "2.8.3"}
FA3 = {"flash_attn_interface": "3.0.0b1"}
SAGE = {"sageattention": "2.2.0"}
PACKAGES = {"none": {}, "fa2": FA2, "fa3": FA3, "fa2+fa3": {**FA2, **FA3}, "sage": SAGE, "fa2+sage": {**FA2, **SAGE}}

# What "auto" and "flash" give at bf16/fp16: a kernel, or "!" + part of the refusal (under "auto" the same text is
# the reason for SDPA), per capability for the installed flash packages none / fa2 / fa3 / fa2+fa3.
NOT_INSTALLED = "!flash-attn is not installed"
FA2_AMPERE = "FlashAttention-2 needs an Ampere (sm80) or newer GPU, this GPU is sm75"
FA3_HOPPER = "!FlashAttention-3 runs on Hopper (sm90) only, this GPU is "
FLASH_ROWS = {
    SM75: (NOT_INSTALLED, "!" + FA2_AMPERE, FA3_HOPPER + "sm75", f"{FA3_HOPPER}sm75; {FA2_AMPERE}"),
    SM86: (NOT_INSTALLED, "flash2", FA3_HOPPER + "sm86", "flash2"),
    SM89: (NOT_INSTALLED, "flash2", FA3_HOPPER + "sm89", "flash2"),
    SM90: (NOT_INSTALLED, "flash2", "flash3", "flash3"),
    SM100: (NOT_INSTALLED, "flash2", FA3_HOPPER + "sm100", "flash2"),
    SM120: (NOT_INSTALLED, "flash2", FA3_HOPPER + "sm120", "flash2"),
}
FLASH = {
    (gpu, key): row[i] for gpu, row in FLASH_ROWS.items() for i, key in enumerate(("none", "fa2", "fa3", "fa2+fa3"))
}
# capability -> "sage" at bf16/fp16 with SageAttention 2.2.0 installed (without it: "not installed" everywhere).
SAGE_TABLE = {
    SM75: "!SageAttention needs an Ampere (sm80) or newer GPU, this GPU is sm75",
    SM86: "sage",
    SM89: "sage",
    SM90: "sage",
    SM100: "!SageAttention 2.2.0 has kernels for sm80, sm86, sm89, sm90, sm120, sm121, not for sm100",
    SM120: "sage",
}
FLASH_NAMES = {"flash2": "FlashAttention-2 2.8.3", "flash3": "FlashAttention-3 3.0.0b1"}


def _expect(expected: str, call, name: str = "") -> None:
    """Assert `call()` gives kernel `expected` (its reason naming `name`), or refuses with `expected[1:]`."""
    if expected.startswith("!"):
        with pytest.raises(InputError) as info:
            call()
        assert expected[1:] in str(info.value) and "use --" in str(info.value), str(info.value)
    else:
        choice = call()
        assert choice.kernel == expected, choice
        assert name in choice.reason, choice


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("capability", GPUS, ids=[f"sm{a}{b}" for a, b in GPUS])
@pytest.mark.parametrize("installed", list(PACKAGES))
def test_attention_on_gpus(capability, installed, dtype):
    packages = PACKAGES[installed]
    flash_key = installed.replace("+sage", "").replace("sage", "none")
    flash = FLASH[(capability, flash_key)]
    _expect(flash, lambda: choose_attention("flash", capability, packages, dtype), FLASH_NAMES.get(flash, ""))
    auto = choose_attention("auto", capability, packages, dtype)  # never SageAttention: it is lossy
    if flash.startswith("!"):
        assert auto.kernel == "sdpa" and flash[1:] in auto.reason, auto
    else:
        assert auto.kernel == flash and f"sm{capability[0]}{capability[1]}, {dtype}" in auto.reason, auto
    sage = SAGE_TABLE[capability] if "sage" in installed else "!SageAttention is not installed"
    _expect(sage, lambda: choose_attention("sage", capability, packages, dtype), "SageAttention 2.2.0")
    assert choose_attention("sdpa", capability, packages, dtype).kernel == "sdpa"


@pytest.mark.parametrize("installed", list(PACKAGES))
def test_attention_in_fp32_and_on_the_cpu(installed):
    """fp32 compute and CPU jobs: "auto" is SDPA with its reason; "flash" and "sage" are refused."""
    packages = PACKAGES[installed]
    for capability in (None, *GPUS):
        for dtype in ("bf16", "fp16", "fp32") if capability is None else ("fp32",):
            auto = choose_attention("auto", capability, packages, dtype)
            assert auto.kernel == "sdpa"
            assert ("no CUDA GPU" if capability is None else "fp32 compute") in auto.reason
            for requested in ("flash", "sage"):
                need = "needs a CUDA GPU, but this job runs on the CPU" if capability is None else "--dtype bf16"
                call = lambda r=requested, c=capability, d=dtype: choose_attention(r, c, packages, d)  # noqa: E731
                _expect(f"!{need}", call)
            assert choose_attention("sdpa", capability, packages, dtype).kernel == "sdpa"


@pytest.mark.parametrize(
    ("capability", "packages", "expected"),
    [
        (SM120, {"flash_attn": "2.7.4.post1"}, "!flash-attn 2.7.4.post1 has no kernels for sm120"),
        (SM100, {"flash_attn": ""}, "!flash-attn (unknown version) has no kernels for sm100"),
        (SM89, {"flash_attn": ""}, "flash2"),
    ],
)
def test_flash_attn_versions(capability, packages, expected):
    _expect(expected, lambda: choose_attention("flash", capability, packages, "bf16"))


@pytest.mark.parametrize(
    ("capability", "version", "expected"),
    [
        (SM89, "1.0.6", "sage"),
        (SM90, "1.0.6", "sage"),
        (SM75, "1.0.6", "!needs an Ampere (sm80) or newer GPU"),
        (SM120, "1.0.6", "!gives black frames on Blackwell"),
        (SM100, "1.0.6", "!gives black frames on Blackwell"),
        ((12, 1), "2.2.0", "sage"),
        ((8, 7), "2.1.1", "!not for sm87"),
    ],
)
def test_sageattention_versions(capability, version, expected):
    _expect(expected, lambda: choose_attention("sage", capability, {"sageattention": version}, "bf16"), version)


# ------------------------------------------------------------------------------------------------- FP8 GEMM

TORCH = "2.13.0+cu128"
NO_FP8 = "has no FP8 tensor cores (FP8 GEMMs need sm89 or newer)"


@pytest.mark.parametrize(
    ("capability", "torch_version", "platform", "dtype", "kind", "reason"),
    [
        (None, TORCH, "linux", "bf16", "dequant", "no CUDA GPU"),
        (SM75, TORCH, "linux", "bf16", "dequant", "sm75 " + NO_FP8),
        (SM86, TORCH, "linux", "bf16", "dequant", "sm86 " + NO_FP8),
        (SM86, TORCH, "linux", "fp16", "dequant", "sm86 " + NO_FP8),
        (SM89, TORCH, "linux", "bf16", "rowwise", "row-wise scales on sm89, bf16"),
        (SM89, "2.6.0+cu126", "linux", "bf16", "tensorwise", "row-wise scales on sm89 need torch 2.7+"),
        (SM89, TORCH, "linux", "fp16", "tensorwise", "row-wise scales output bf16 only"),
        (SM89, TORCH, "windows", "bf16", "tensorwise", "not built on Windows"),
        (SM90, "2.5.1", "linux", "bf16", "rowwise", "row-wise scales on sm90, bf16"),
        (SM90, "2.4.1", "linux", "bf16", "tensorwise", "need torch 2.5+"),
        (SM90, TORCH, "linux", "fp16", "tensorwise", "bf16 only"),
        (SM100, "2.9.0", "linux", "bf16", "rowwise", "row-wise scales on sm100"),
        (SM100, "2.8.0", "linux", "bf16", "tensorwise", "need torch 2.9+"),
        (SM120, TORCH, "linux", "bf16", "tensorwise", "has no row-wise scales on sm120"),
        (SM120, TORCH, "linux", "fp16", "tensorwise", "has no row-wise scales on sm120"),
        (SM120, TORCH, "windows", "bf16", "tensorwise", "has no row-wise scales on sm120"),
    ]
    + [(gpu, TORCH, "linux", "fp32", "dequant", "fp32 compute") for gpu in GPUS],
)
def test_fp8_gemm_table(capability, torch_version, platform, dtype, kind, reason):
    choice = fp8_gemm_kind(capability, torch_version, platform, dtype)
    assert (choice.kernel, reason in choice.reason) == (kind, True), choice
    assert choose_fp8_gemm("dequant", capability, torch_version, platform, dtype).kernel == "dequant"
    if kind == "dequant":
        with pytest.raises(InputError, match=r"--quant-compute scaled_mm.*use --quant-compute dequant"):
            choose_fp8_gemm("scaled_mm", capability, torch_version, platform, dtype)
    else:
        assert choose_fp8_gemm("scaled_mm", capability, torch_version, platform, dtype) == choice


def test_versions_and_unknown_values():
    assert version_tuple("2.13.0+cu128") == (2, 13, 0) and version_tuple("2.7.4.post1") == (2, 7, 4)
    assert version_tuple("") == () and version_tuple("unknown") == ()
    with pytest.raises(InputError, match="not one of auto, sdpa, flash, sage"):
        choose_attention("xformers", SM89, {}, "bf16")
    with pytest.raises(InputError, match="not one of dequant, scaled_mm"):
        choose_fp8_gemm("fast", SM89, TORCH, "linux", "bf16")
    software = detect_software()  # this machine: torch is installed, its version read without importing it
    assert version_tuple(software.torch_version) >= (2, 4) and software.platform in ("linux", "windows", "darwin")


# ---------------------------------------------------------------------------------------- resolve: refusals


def _machine(capability: tuple[int, int] | None, gpu: bool | None = None) -> MachineInfo:
    gpu = capability is not None if gpu is None else gpu
    vram = 24 * GIB if gpu else 0
    return MachineInfo("GPU" if gpu else None, vram, vram, capability, 64 * GIB, 60 * GIB, 500 * GIB)


@pytest.fixture
def resolve(monkeypatch):
    """resolve(memory overrides, capability, device=None, software=torch 2.13 and no attention packages)."""
    import wan_local.engine.resolve as module

    def run(memory: dict, capability, device: str | None = None, software: Software | None = None, gpu=None):
        monkeypatch.setattr(module, "detect_software", lambda: software or Software(TORCH))
        job = JobSettings(task="t2v-A14B", ckpt_dir="", prompt="", seed=1, device=device, memory=memory)
        return resolve_job(job, machine=_machine(capability, gpu))

    return run


@pytest.mark.parametrize(
    ("memory", "capability", "device", "message"),
    [
        ({"attention": "flash"}, None, None, "--attention flash needs a CUDA GPU, but this job runs on the CPU"),
        ({"attention": "sage"}, SM89, "cpu", "--attention sage needs a CUDA GPU, but this job runs on the CPU"),
        ({"quant_compute": "scaled_mm"}, None, None, "scaled_mm needs a CUDA GPU with FP8 (sm89 or newer)"),
        ({"attention": "flash"}, SM89, None, "--attention flash: flash-attn is not installed"),
        ({"attention": "sage"}, SM120, None, "--attention sage: SageAttention is not installed"),
        ({"quant_compute": "scaled_mm"}, SM86, None, "sm86 has no FP8 tensor cores"),
    ],
)
def test_resolve_refuses_a_kernel_the_machine_cannot_run(resolve, memory, capability, device, message):
    with pytest.raises(InputError) as info:
        resolve(memory, capability, device)
    assert message in str(info.value) and "use --" in str(info.value)


def test_resolve_accepts_auto_everywhere_and_what_the_machine_runs(resolve):
    for capability in (None, *GPUS):
        job = resolve({}, capability)
        kernels = job.kernels(job.memory(job.requested))
        assert kernels.attention.kernel == "sdpa" and kernels.fp8.kernel == "dequant"
    fa2 = Software(TORCH, "linux", FA2)
    job = resolve({"attention": "flash", "quant_compute": "scaled_mm"}, SM89, software=fa2)
    kernels = job.kernels(job.memory(job.requested))
    assert kernels == JobKernels(kernels.attention, kernels.fp8)
    assert (kernels.attention.kernel, kernels.fp8.kernel) == ("flash2", "rowwise")
    assert kernels.describe().startswith("attention flash2 (FlashAttention-2 2.8.3 on sm89, bf16); FP8 Linears rowwise")
    # An estimate for a GPU named only by its VRAM (capability unknown) is not refused for the kernel.
    assert resolve({"attention": "flash"}, None, device="cuda", gpu=True).device == "cuda"


def test_the_job_log_names_the_kernels_once(tiny, tmp_path, caplog):
    """A CPU job logs one line naming its attention kernel and FP8 GEMM and why (the cpu preset sets sdpa)."""
    from wan_local import cli

    argv = ["generate", "--task", "t2v-A14B", "--ckpt-dir", str(tiny / "t2v-A14B"), "--prompt", "a fox",
            "--size", "64*48", "--frames", "5", "--steps", "1", "--device", "cpu", "--dtype", "fp32",
            "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="wan_local"):
        assert cli.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels: ")]
    assert lines == [
        "kernels: attention sdpa (PyTorch SDPA, as set); "
        "FP8 Linears dequant (weights dequantized to the compute dtype, as set)"
    ]
