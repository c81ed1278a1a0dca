"""FP8 GEMMs of FP8-stored Linears (`scaled_mm_linear`): both scalings against the float32 reference on the CPU
(torch._scaled_mm has CPU kernels since torch 2.6 or so; skipped where it has none), one rounding, per-token
activation scales, no allocation per call, and the CPU fallback that must stay bit for bit the dequant path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2
from torch import nn

from wan_local.memory.quant import numerics
from wan_local.memory.quant.numerics import QuantLinear, _quantize_rows, dequantize, fp8_gemm, scaled_mm_linear

GEMMS = ("rowwise", "tensorwise")


def _layer(in_features: int = 256, out_features: int = 96, per_layer: bool = False) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, out_features), "fp8", compute="scaled_mm")
    if per_layer:  # ComfyUI fp8_scaled files: one scale per layer
        layer.scale = nn.Parameter(layer.scale.amax().reshape(()), requires_grad=False)
    return layer


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), dequantize(layer.weight, layer.scale, torch.float32), layer.bias)


@pytest.fixture(autouse=True)
def _needs_cpu_scaled_mm():
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones(())
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"torch._scaled_mm has no CPU kernel for this in this torch: {exc}")


def test_scaled_mm_layers_dequantize_bit_for_bit_on_the_cpu():
    """On the CPU (no FP8 GEMM) compute="scaled_mm" is the dequant path, bit for bit, in every dtype."""
    layer = _layer()
    dequant = copy.deepcopy(layer)
    dequant.compute = "dequant"
    x = torch.randn(2, 40, 256)
    assert fp8_gemm(torch.device("cpu"), torch.bfloat16) == "dequant"
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(layer(x.to(dtype)), dequant(x.to(dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), dequant(x))


@pytest.mark.parametrize("per_layer", [False, True], ids=["scale-per-row", "scale-per-layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_scaled_mm_linear_matches_the_reference_in_the_compute_dtype(gemm, dtype, per_layer):
    layer = _layer(per_layer=per_layer)
    x = torch.randn(2, 40, 256)  # float32 in, as under autocast: cast to the compute dtype first
    with torch.no_grad():
        out = scaled_mm_linear(x, layer.weight, layer.scale, layer.bias, dtype, gemm)
        ref = _reference(layer, x)
    assert out.dtype == dtype and out.shape == (2, 40, 96)
    assert rel_l2(out, ref) <= 5e-2  # measured 2.4e-2 (fp8 activations); a wrong scale is off by O(1)


def test_tensorwise_rounds_once_and_chunks_without_changing_a_bit(monkeypatch):
    """The tensor-wise result is the fp32 accumulation times token and row scales plus the (compute-dtype) bias,
    rounded to the compute dtype once; bounding the fp32 rows per step changes nothing."""
    layer = _layer()
    x = torch.randn(3, 50, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = scaled_mm_linear(x, layer.weight, layer.scale, layer.bias, torch.bfloat16, "tensorwise")
        q, scale = _quantize_rows(x.reshape(-1, 256))
        acc = q.float() @ layer.weight.float().t()  # fp32 accumulation, as the GEMM does
        once = (acc * scale * layer.scale + layer.bias.bfloat16()).bfloat16()
        monkeypatch.setattr(numerics, "_EPILOGUE_BYTES", 16 * 96 * 4)  # 16 tokens per step: 10 steps
        chunked = scaled_mm_linear(x, layer.weight, layer.scale, layer.bias, torch.bfloat16, "tensorwise")
    assert torch.equal(out.reshape(-1, 96), once)
    assert torch.equal(chunked, out)


@pytest.mark.parametrize("gemm", GEMMS)
def test_every_token_gets_its_own_activation_scale(gemm):
    """A token 1e5 times larger than the rest (DiT activations have such outliers) leaves the others as accurate
    as without it; one scale for the whole input would push them into fp8's subnormals (measured 0.47 error)."""
    layer = _layer()
    x = torch.randn(3, 50, 256)
    x[1, 7] *= 1e5
    with torch.no_grad():
        out = scaled_mm_linear(x, layer.weight, layer.scale, layer.bias, torch.bfloat16, gemm)
        ref = _reference(layer, x)
        x2 = x.reshape(-1, 256).bfloat16()
        one_scale = (x2.float().abs().amax() / 448).bfloat16()
        xq = (x2 / one_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        shared = (xq.float() @ layer.weight.float().t()) * one_scale.float() * layer.scale + layer.bias
    per_token = ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    shared_error = ((shared.reshape(3, 50, 96) - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert per_token <= 5e-2 < 0.2 <= shared_error  # measured 3.4e-2 vs 0.47


def test_zero_tokens_and_fp16_scales_stay_finite():
    """An all-zero token (its scale would be 0) and tiny fp16 activations (absmax / 448 below fp16's normals)."""
    layer = _layer()
    x = torch.randn(2, 32, 256)
    x[0, 3] = 0
    x[1, 5] *= 1e-6
    with torch.no_grad():
        for gemm in GEMMS:
            out = scaled_mm_linear(x, layer.weight, layer.scale, layer.bias, torch.float16, gemm)
            assert torch.isfinite(out).all()
            assert torch.allclose(out[0, 3].float(), layer.bias.half().float(), atol=1e-3)


def test_no_tensor_is_made_per_call_for_the_unit_scales(monkeypatch):
    layer, per_layer = _layer(), _layer(per_layer=True)
    x = torch.randn(4, 256)
    calls = lambda: [  # noqa: E731
        scaled_mm_linear(x, lay.weight, lay.scale, lay.bias, torch.bfloat16, gemm)
        for lay in (layer, per_layer)
        for gemm in GEMMS
    ]
    first = calls()

    def no_ones(*args, **kwargs):
        raise AssertionError("torch.ones called on the GEMM path")

    monkeypatch.setattr(torch, "ones", no_ones)
    assert all(torch.equal(a, b) for a, b in zip(first, calls(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs CUDA sm89+"
)
def test_scaled_mm_on_gpu() -> None:
    """On this GPU's own kernel choice (fp8_gemm): the compute dtype out, near the dequant path."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 2816).cuda()
    x = torch.randn(4, 600, 1024, device="cuda")
    for per_layer in (False, True):
        layer = QuantLinear.from_linear(linear, "fp8", compute="scaled_mm")
        if per_layer:
            layer.scale = nn.Parameter(layer.scale.amax().reshape(()), requires_grad=False)
        dequant = copy.deepcopy(layer)
        dequant.compute = "dequant"
        for dtype in (torch.bfloat16, torch.float16):
            assert fp8_gemm(x.device, dtype) in GEMMS
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                out, ref = layer(x), dequant(x)
            assert out.dtype == dtype and out.shape == ref.shape
            assert rel_l2(out, ref) <= 5e-2
