"""Weight-only int8 / fp8 DiT blocks: error vs the fp32 model, layer choice, formats, memory and the disk cache."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import rel_l2
from safetensors.torch import load_file, save_file
from torch import nn

from wan_local.errors import CheckpointError, InputError
from wan_local.memory.quant import formats
from wan_local.memory.quant.cache import QuantCache, write_safetensors
from wan_local.memory.quant.formats import build_quantized_dit, load_quantized_dit, quantize_dit, quantized_state_dict
from wan_local.memory.quant.numerics import (
    STORAGE_DTYPE,
    QuantLinear,
    dequantize,
    is_quant_target,
    quantize_weight,
)
from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.convert import as_tensor
from wan_local.weights.loading import load_dit, read_dit

# rel_l2 of the quantized tiny t2v DiT against the same model in fp32 on the golden dit_t2v inputs (CPU, fp32),
# measured: int8/all 2.64e-3, int8/ffn 1.87e-3, fp8/all 1.17e-2, fp8/ffn 7.73e-3 (dit_i2v / dit_ti2v: within
# 15 % of these). Bounds are about twice the measurement; a wrong scale or rounding gives errors of order 1.
BOUNDS = {("int8", "all"): 5e-3, ("int8", "ffn"): 4e-3, ("fp8", "all"): 2.5e-2, ("fp8", "ffn"): 1.6e-2}
LINEARS_PER_BLOCK = {"all": 10, "ffn": 2}
A14B = DiTConfig("t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)


@pytest.fixture(scope="module")
def t2v(tiny: Path, cases: dict, golden) -> tuple[Path, WanDiT, dict]:
    """(checkpoint folder, fp32 model, golden tensors) of dit_t2v."""
    path = tiny / cases["dit_t2v"]["checkpoint"]
    return path, load_dit(path, torch.float32), golden("dit_t2v")


def _run(model: nn.Module, g: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(g["x"][None], g["t"], [g["context"]])[0]


def _quant_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}


# ------------------------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize(("mode", "scope"), list(BOUNDS))
def test_error_vs_fp32_model(mode: str, scope: str, t2v) -> None:
    _, model, g = t2v
    reference = _run(model, g)
    assert rel_l2(reference, g["out"]) <= 1e-5  # the unquantized model is the golden one
    quantized = quantize_dit(copy.deepcopy(model), mode, scope)
    names = _quant_names(quantized)
    assert len(names) == model.cfg.num_layers * LINEARS_PER_BLOCK[scope]
    storage = STORAGE_DTYPE[mode]
    assert all(quantized.get_submodule(n).weight.dtype == storage for n in names)
    err = rel_l2(_run(quantized, g), reference)
    print(f"{mode}/{scope}: rel_l2 vs fp32 = {err:.3e}")
    assert 0 < err <= BOUNDS[(mode, scope)]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_build_from_state_dict_equals_in_place_quantization(mode: str, t2v) -> None:
    path, model, g = t2v
    cfg, sd, _ = read_dit(path, torch.float32)
    built = build_quantized_dit(cfg, sd, mode, "all", torch.float32)
    assert _quant_names(built) == _quant_names(quantize_dit(copy.deepcopy(model), mode, "all"))
    assert torch.equal(_run(built, g), _run(quantize_dit(copy.deepcopy(model), mode, "all"), g))
    assert not any(p.is_meta for p in built.parameters())


def test_only_block_linears_are_chosen(t2v) -> None:
    _, model, _ = t2v
    for scope in ("all", "ffn"):
        quantized = quantize_dit(copy.deepcopy(model), "int8", scope)
        expected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quant_target(n, scope)}
        assert _quant_names(quantized) == expected
        for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_projection.1", "head.head"):
            assert type(quantized.get_submodule(name)) is nn.Linear
    assert is_quant_target("blocks.12.cross_attn.v") and is_quant_target("blocks.0.ffn.2", "ffn")
    assert not is_quant_target("blocks.0.self_attn.q", "ffn")
    assert not any(map(is_quant_target, ("head.head", "blocks.0.modulation", "blocks.0.norm3", "blocks.0.ffn.1")))


# ---------------------------------------------------------------------------------------------- rounding


def test_quantize_weight_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(33, 70) * torch.logspace(-4, 1, 33)[:, None]
    w[5] = 0
    for mode, qmax in (("int8", 127), ("fp8", 448)):
        q, scale = quantize_weight(w, mode)
        absmax = w.abs().amax(1)
        assert scale.dtype == torch.float32 and torch.equal(scale.bfloat16().float(), scale)  # bf16-exact
        nonzero = absmax > 0
        assert (scale[nonzero] >= absmax[nonzero] / qmax).all()
        assert (scale[nonzero] <= absmax[nonzero] / qmax * (1 + 2**-7)).all()
        assert scale[5] == 1 and (q[5].float() == 0).all()
        expected = (w / scale[:, None]).clamp(-qmax, qmax)
        if mode == "int8":
            assert torch.equal(q, expected.round().to(torch.int8))
            assert (q.abs().amax(1)[nonzero] >= 126).all()
            assert ((dequantize(q, scale, torch.float32) - w).abs() <= scale[:, None] / 2).all()
        else:
            assert torch.equal(q.view(torch.uint8), expected.to(torch.float8_e4m3fn).view(torch.uint8))
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match="inf or NaN"):
        quantize_weight(bad, "int8", "blocks.0.ffn.0.weight")


# --------------------------------------------------------------------------------- state dict and autocast


def test_state_dict_round_trip(tmp_path: Path, t2v) -> None:
    path, model, g = t2v
    quantized = quantize_dit(copy.deepcopy(model), "fp8", "all")
    sd = quantized.state_dict()
    names = _quant_names(quantized)
    assert set(sd) == set(model.state_dict()) | {f"{n}.scale" for n in names}
    file = tmp_path / "q.safetensors"
    write_safetensors(file, sd, {"note": "test"})
    loaded = load_file(str(file))  # safetensors' own reader accepts our writer's output
    assert all(torch.equal(loaded[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in sd if k.endswith(".weight"))
    assert loaded["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert loaded["blocks.0.ffn.0.scale"].dtype == torch.float32
    cfg, _, _ = read_dit(path, torch.float32)
    assert torch.equal(_run(build_quantized_dit(cfg, loaded, "fp8", "all", torch.float32), g), _run(quantized, g))
    # copy_-style loading into an existing quantized model, and the dtype guard
    fresh = quantize_dit(copy.deepcopy(model), "fp8", "all")
    fresh.load_state_dict(sd)
    int8 = quantize_dit(copy.deepcopy(model), "int8", "all")
    with pytest.raises(RuntimeError, match=r"this QuantLinear stores torch\.int8"):
        int8.load_state_dict(sd)


def test_quant_linear_matches_linear_under_autocast() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = QuantLinear.from_linear(linear, "int8")
    x = torch.randn(3, 5, 64)
    exact = nn.Linear(64, 96)  # fp32 weights equal to the dequantized ones
    exact.weight.data = dequantize(layer.weight, layer.scale, torch.float32)
    exact.bias.data = linear.bias.data
    with torch.no_grad():
        assert torch.equal(layer(x), exact(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = layer(x), exact(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_dit_under_cpu_bf16_autocast(t2v) -> None:
    _, model, g = t2v
    quantized = quantize_dit(copy.deepcopy(model), "int8", "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, out = _run(model, g), _run(quantized, g)
    assert out.dtype == torch.float32  # the DiT returns float32 whatever runs inside
    assert rel_l2(out, reference) <= 7e-3  # measured 3.2e-3 (both under bf16 autocast)


def test_module_dtype_casts_keep_quantized_storage(t2v) -> None:
    _, model, _ = t2v
    quantized = quantize_dit(copy.deepcopy(model), "fp8", "all")
    layer = quantized.blocks[0].ffn[0]
    weight, scale = layer.weight.clone(), layer.scale.clone()
    quantized.to(torch.bfloat16)
    quantized.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8)) and torch.equal(layer.scale, scale)
    assert layer.bias.dtype == torch.float16 and quantized.head.head.weight.dtype == torch.float16


# ------------------------------------------------------------------------------------------------- memory


def _block_linear_bytes(cfg: DiTConfig) -> tuple[int, int]:
    """(weight elements, scale rows) of one block's ten Linears, from the fact-sheet shapes."""
    c, f = cfg.dim, cfg.ffn_dim
    return 8 * c * c + 2 * c * f, 8 * c + f + c


def test_block_bytes_about_half_of_bf16(t2v) -> None:
    path, _, _ = t2v
    bf16 = load_dit(path, torch.bfloat16)
    weights, rows = _block_linear_bytes(bf16.cfg)
    bf16_bytes = sum(p.nbytes for p in bf16.blocks.parameters())
    quantized = quantize_dit(bf16, "int8", "all")
    q_bytes = sum(p.nbytes for p in quantized.blocks.parameters())
    n = bf16.cfg.num_layers
    assert bf16_bytes - q_bytes == n * (weights - 4 * rows)  # 2 -> 1 byte per weight, plus 4 bytes per scale
    assert 0.5 <= q_bytes / bf16_bytes <= 0.56  # tiny dims: scales, biases and norms weigh a few percent


@pytest.mark.parametrize("scope", ["all", "ffn"])
def test_meta_a14b_bytes_without_allocation(scope: str) -> None:
    with torch.device("meta"):
        model = WanDiT(A14B).to(torch.bfloat16)
    bf16_bytes = sum(p.nbytes for p in model.blocks.parameters())
    quantize_dit(model, "fp8", scope)
    assert all(p.is_meta for p in model.parameters())
    q_bytes = sum(p.nbytes for p in model.blocks.parameters())
    weights, rows = _block_linear_bytes(A14B)
    if scope == "all":
        assert weights == 351_272_960  # engine notes §0: ≈ 351 M params per block
        assert bf16_bytes - q_bytes == 40 * (weights - 4 * rows)
        assert q_bytes / bf16_bytes < 0.501
    else:
        ffn = 2 * A14B.dim * A14B.ffn_dim
        assert bf16_bytes - q_bytes == 40 * (ffn - 4 * (A14B.ffn_dim + A14B.dim))


def test_meta_a14b_build_from_meta_state_dict() -> None:
    with torch.device("meta"):
        sd = WanDiT(A14B).to(torch.bfloat16).state_dict()
    qsd = quantized_state_dict(sd, "int8", "all")
    model = build_quantized_dit(A14B, qsd, "int8", "all", torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert model.blocks[39].ffn[2].weight.dtype == torch.int8 and model.blocks[39].ffn[2].scale.shape == (5120,)
    assert model.head.head.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ foreign files


def _official_sd(path: Path) -> dict[str, torch.Tensor]:
    _, sd, _ = read_dit(path, torch.float32)
    return {k: as_tensor(v).clone() for k, v in sd.items()}


def test_comfyui_fp8_scaled_kept_quantized(tmp_path: Path, t2v) -> None:
    path, _, g = t2v
    sd, out = _official_sd(path), {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in sd.items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and (is_quant_target(layer) or layer == "text_embedding.0"):
            scale = value.abs().amax() / 448  # ComfyUI: one float32 scale per layer
            out[f"model.diffusion_model.{key}"] = (value / scale).to(torch.float8_e4m3fn)
            out[f"model.diffusion_model.{layer}.scale_weight"] = scale.reshape(())
        else:
            out[f"model.diffusion_model.{key}"] = value
    file = tmp_path / "wan_fp8_scaled.safetensors"
    config = (path / "config.json").read_text()  # single files carry no config.json: the head count rides along
    save_file(out, str(file), metadata={"config": config})
    model = load_quantized_dit(file, "int8", "all", torch.float32)  # the file's fp8 wins over the asked int8
    layer = model.blocks[1].cross_attn.k
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.float8_e4m3fn and layer.scale.dim() == 0
    stored = out["model.diffusion_model.blocks.1.cross_attn.k.weight"]
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert type(model.text_embedding[0]) is nn.Linear  # outside the blocks: dequantized
    reference = load_dit(file, torch.float32)  # the existing loader dequantizes everything
    assert rel_l2(_run(model, g), _run(reference, g)) <= 1e-6


def _quanto_file(tmp_path: Path, path: Path, qmap_extra: dict | None = None) -> Path:
    """A file in optimum-quanto's qint8 serialization (`.weight._data`, `.weight._scale` [out, 1] in the model
    dtype, unit `.input_scale` / `.output_scale`) with WanGP's base64 map in the safetensors metadata."""
    sd, out, qmap = _official_sd(path), {}, {}
    for key, value in sd.items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and (is_quant_target(layer) or layer == "text_embedding.0"):
            scale = (value.abs().amax(1, keepdim=True) / 127).bfloat16()
            out[f"{key}._data"] = (value / scale.float()).round().clamp(-127, 127).to(torch.int8)
            out[f"{key}._scale"] = scale
            out[f"{layer}.input_scale"] = torch.ones((), dtype=torch.bfloat16)
            out[f"{layer}.output_scale"] = torch.ones((), dtype=torch.bfloat16)
            qmap[layer] = {"weights": "qint8", "activations": "none"}
        else:
            out[key] = value
    qmap.update(qmap_extra or {})
    meta = {
        "quantization_format": "quanto",
        "quantization_map_base64": base64.b64encode(json.dumps(qmap).encode()).decode(),
        "config_base64": base64.b64encode((path / "config.json").read_bytes()).decode(),
    }
    file = tmp_path / "wan_quanto_int8.safetensors"
    save_file(out, str(file), metadata=meta)
    return file


def test_quanto_qint8_file(tmp_path: Path, t2v) -> None:
    path, model, g = t2v
    file = _quanto_file(tmp_path, path)
    loaded = load_quantized_dit(file, "int8", "all", torch.float32)
    layer = loaded.blocks[0].self_attn.o
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.int8 and layer.scale.shape == (64,)
    stored = load_file(str(file))
    assert torch.equal(layer.scale, stored["blocks.0.self_attn.o.weight._scale"].float().reshape(-1))
    assert type(loaded.text_embedding[0]) is nn.Linear
    assert rel_l2(_run(loaded, g), _run(model, g)) <= BOUNDS[("int8", "all")]


def test_quanto_rejects_4bit_and_activation_quantization(tmp_path: Path, t2v) -> None:
    path, _, _ = t2v
    file = _quanto_file(tmp_path, path, {"blocks.0.ffn.0": {"weights": "qint4", "activations": "none"}})
    with pytest.raises(CheckpointError, match="only weight-only qint8"):
        load_quantized_dit(file, "int8")


# --------------------------------------------------------------------------------------------------- cache


def _sources(tmp_path: Path) -> list[Path]:
    files = [tmp_path / "src" / "a.safetensors", tmp_path / "src" / "config.json"]
    files[0].parent.mkdir(exist_ok=True)
    files[0].write_bytes(b"x" * 100)
    files[1].write_text("{}")
    return files


def _small_qsd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return quantized_state_dict(
        {"blocks.0.ffn.0.weight": torch.randn(8, 4), "blocks.0.ffn.0.bias": torch.randn(8)}, "fp8"
    )


def test_cache_second_start_does_not_quantize(tmp_path: Path) -> None:
    cache, sources, calls = QuantCache(tmp_path / "cache"), _sources(tmp_path), []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return _small_qsd()

    first = cache.get_or_create(sources, "fp8", "all", build)
    second = cache.get_or_create(sources, "fp8", "all", build)
    assert len(calls) == 1
    assert set(first) == set(second) and second["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    first, second = ({k: as_tensor(v) for k, v in sd.items()} for sd in (first, second))
    assert all(torch.equal(first[k].view(torch.uint8), second[k].view(torch.uint8)) for k in first)
    assert cache.load(sources, "int8", "all") is None  # another mode is another entry


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_cache_damaged_file_is_deleted_and_rebuilt(damage: str, tmp_path: Path) -> None:
    cache, sources = QuantCache(tmp_path / "cache"), _sources(tmp_path)
    path = cache.store(sources, "fp8", "all", _small_qsd())
    assert path is not None and path == cache.path(sources, "fp8", "all")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all" + data[24:])
    else:
        write_safetensors(path, _small_qsd(), {"wan_local.key": "0" * 64})
    assert cache.load(sources, "fp8", "all") is None
    assert not path.exists()
    rebuilt = cache.get_or_create(sources, "fp8", "all", _small_qsd)
    assert path.exists() and "blocks.0.ffn.0.scale" in rebuilt


def test_cache_key_follows_source_changes(tmp_path: Path) -> None:
    cache, sources = QuantCache(tmp_path / "cache"), _sources(tmp_path)
    old = cache.store(sources, "int8", "ffn", _small_qsd())
    sources[0].write_bytes(b"y" * 101)  # the checkpoint changed
    assert cache.load(sources, "int8", "ffn") is None
    new = cache.store(sources, "int8", "ffn", _small_qsd())
    assert new != old and new.exists() and not old.exists()  # the stale entry is removed
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [new.name]  # no temporary left behind


def test_load_quantized_dit_uses_cache(tmp_path: Path, t2v, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, g = t2v
    cache = QuantCache(tmp_path / "cache")
    first = load_quantized_dit(path, "int8", "ffn", torch.float32, cache=cache, expected_model_type="t2v")

    def fail(*args, **kwargs):
        raise AssertionError("quantized again despite the cache")

    monkeypatch.setattr(formats, "quantized_state_dict", fail)
    second = load_quantized_dit(path, "int8", "ffn", torch.float32, cache=cache)
    assert torch.equal(_run(first, g), _run(second, g))
    assert _quant_names(second) == {f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)}


# -------------------------------------------------------------------------------------------------- errors


def test_errors(t2v) -> None:
    path, model, _ = t2v
    with pytest.raises(InputError, match="int4"):
        quantize_dit(copy.deepcopy(model), "int4")
    with pytest.raises(InputError, match="scope"):
        quantize_dit(copy.deepcopy(model), "int8", "attn")
    with pytest.raises(InputError, match="weight dtype"):
        QuantLinear(4, 4, weight_dtype=torch.float32)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantized_state_dict(_small_qsd(), "int8")
    with pytest.raises(CheckpointError, match="t2v"):
        load_quantized_dit(path, "int8", expected_model_type="i2v")
    cfg, sd, _ = read_dit(path, torch.float32)
    qsd = quantized_state_dict(sd, "int8", "all")
    qsd["blocks.0.ffn.0.scale"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.scale"):
        build_quantized_dit(cfg, qsd, "int8", "all", torch.float32)


def test_cache_hit_does_not_open_the_source_weights(tiny, tmp_path, monkeypatch):
    """The second start builds the model from the cache alone: reading the source shards would cost a full read."""
    folder = tiny / "t2v-A14B" / "high_noise_model"
    cache = QuantCache(tmp_path / "cache")
    first = load_quantized_dit(folder, "int8", "all", torch.float32, cache=cache)
    monkeypatch.setattr(formats, "read_dit", lambda *a, **k: pytest.fail("the source weights were read on a cache hit"))
    second = load_quantized_dit(folder, "int8", "all", torch.float32, cache=cache, expected_model_type="t2v")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
