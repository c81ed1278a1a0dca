"""Residency planner: byte counts against the real model and budgets.md, activation terms against budgets.md (and
against traced forwards in test_live_bytes.py), and plans at the sizes users have (16 / 24 GB cards, 32 / 64 GB RAM)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE_JOBS
from safetensors.torch import save_file
from torch import nn

from wan_local.errors import CheckpointError, InputError
from wan_local.memory import bytes as B
from wan_local.memory import plan as P
from wan_local.memory.options import MemoryOptions
from wan_local.memory.quant.numerics import is_quant_target
from wan_local.models.dit import WanDiT
from wan_local.models.rope import ROPE_CHUNK_TOKENS
from wan_local.models.timesteps import MOD_CHUNK_TOKENS
from wan_local.specs import get_task
from wan_local.weights import headers as H
from wan_local.weights.files import read_state_dict
from wan_local.weights.loading import read_dit

GIB = 1024**3
GB = 1e9
# A "16 GB card" / "24 GB card" as the planner sees it: the desktop and the CUDA context hold ~1 GiB, and the
# default 1 GiB reserve is kept free on top.
FREE_16, FREE_24 = 15 * GIB, 23 * GIB
RESERVE = GIB
RAM_32, RAM_64 = 29 * GIB, 61 * GIB  # available RAM of 32 / 64 GiB machines (~3 GiB for the OS)
JOBS = REFERENCE_JOBS


# ------------------------------------------------------------------------------------------------ model bytes


@pytest.fixture(scope="module")
def meta_models() -> dict[str, WanDiT]:
    with torch.device("meta"):
        return {task: WanDiT(B.official_dit_config(task)) for task in ("t2v-A14B", "ti2v-5B")}


def _expected_bytes(module: nn.Module, prefix: str, quant: str, scope: str) -> int:
    """Bytes of `module`'s parameters counted from the module itself, memory/quant deciding which Linears are 8-bit."""
    total = 0
    for name, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if isinstance(sub, nn.Linear) and quant != "none" and is_quant_target(f"{prefix}{name}", scope):
            total += sub.weight.numel() + 4 * sub.out_features + (sub.bias.numel() * 2 if sub.bias is not None else 0)
        else:
            total += sum(p.numel() * 2 for _, p in own)
    return total


@pytest.mark.parametrize("quant, scope", [("none", "all"), ("int8", "all"), ("fp8", "ffn")])
@pytest.mark.parametrize("task", ["t2v-A14B", "ti2v-5B"])
def test_dit_bytes_match_the_real_model(meta_models, task, quant, scope):
    model = meta_models[task]
    mb = B.dit_bytes(B.official_dit_config(task), quant, scope)
    assert mb.params == sum(p.numel() for p in model.parameters())
    assert mb.num_blocks == len(model.blocks)
    for i, block in enumerate(model.blocks):
        assert mb.block_bytes[i] == _expected_bytes(block, f"blocks.{i}.", quant, scope)
    block_params = {id(p) for p in model.blocks.parameters()}
    assert mb.non_block_bytes == sum(p.numel() * 2 for p in model.parameters() if id(p) not in block_params)
    if quant == "none":
        assert mb.total_bytes == 2 * mb.params and mb.dequant_scratch_bytes == 0
    else:  # the FFN matrices are the largest quantized Linears: dequantized to bf16 while they run
        cfg = model.cfg
        assert mb.dequant_scratch_bytes == 2 * cfg.dim * cfg.ffn_dim


def _table(model: nn.Module, dtype: str, prefix: str = "") -> dict[str, SimpleNamespace]:
    return {prefix + k: SimpleNamespace(shape=tuple(v.shape), dtype=dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("quant, scope", [("none", "all"), ("int8", "all"), ("fp8", "ffn")])
@pytest.mark.parametrize("task", ["t2v-A14B", "ti2v-5B"])
def test_bytes_from_a_files_tensor_table_match_the_config(meta_models, task, quant, scope):
    """A full-precision file's header table gives the same bytes as the config (the table is what `resolve` reads)."""
    cfg = B.official_dit_config(task)
    from_file = B.model_bytes_from_tensors(_table(meta_models[task], "F32"), quant, scope, dense_bytes=2)
    assert from_file == B.dit_bytes(cfg, quant, scope)


def test_a_comfyui_fp8_scaled_file_is_counted_as_stored(meta_models):
    """ComfyUI's fp8_scaled layout (spec §3.3: prefixed keys, block Linear weights float8_e4m3fn with a 0-dim float32
    `scale_weight`, a `scaled_fp8` marker, the rest in higher precision) is held as stored: about half of bf16,
    and the same whatever --quant asks for."""
    model = meta_models["t2v-A14B"]
    prefix = "model.diffusion_model."
    table = _table(model, "BF16", prefix)
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Linear) and is_quant_target(name, "all"):
            table[f"{prefix}{name}.weight"].dtype = "F8_E4M3"
            table[f"{prefix}{name}.scale_weight"] = SimpleNamespace(shape=(), dtype="F32")
    table[f"{prefix}scaled_fp8"] = SimpleNamespace(shape=(0,), dtype="F8_E4M3")
    from wan_local.weights import keymaps

    stripped = keymaps.strip_prefix(table)
    held = B.model_bytes_from_tensors(stripped, "none")
    assert held == B.model_bytes_from_tensors(stripped, "int8")
    bf16, fp8 = B.dit_bytes(model.cfg, "none"), B.dit_bytes(model.cfg, "fp8")
    per_row_scales = sum(s.out_features * 4 for n, s in model.blocks[0].named_modules() if isinstance(s, nn.Linear))
    per_layer_scales = 4 * sum(isinstance(s, nn.Linear) for s in model.blocks[0].modules())
    assert held.block_bytes[0] == fp8.block_bytes[0] - per_row_scales + per_layer_scales
    assert held.non_block_bytes == bf16.non_block_bytes
    assert held.params == bf16.params
    assert 0.45 < held.total_bytes / bf16.total_bytes < 0.55


def test_dit_bytes_agree_with_budgets():
    # Totals from the fact sheet §1.1 / budgets.md.
    a14b, i2v, ti2v = (B.official_dit_config(t) for t in ("t2v-A14B", "i2v-A14B", "ti2v-5B"))
    assert B.dit_bytes(a14b).params == 14_288_491_584
    assert B.dit_bytes(i2v).params == 14_288_901_184
    assert B.dit_bytes(ti2v).params == 4_999_787_712
    for cfg, block_bf16, block_8bit, blocks_bf16, blocks_8bit, non_block_params in (
        (a14b, 703e6, 351e6, 28.1e9, 14.1e9, 232.7e6),
        (ti2v, 327e6, 164e6, 9.8e9, 4.9e9, 90.1e6),
    ):
        bf16, int8 = B.dit_bytes(cfg), B.dit_bytes(cfg, "int8")
        assert bf16.block_bytes[0] == pytest.approx(block_bf16, rel=5e-3)
        assert int8.block_bytes[0] == pytest.approx(block_8bit, rel=5e-3)
        assert bf16.blocks_total_bytes == pytest.approx(blocks_bf16, rel=5e-3)
        assert int8.blocks_total_bytes == pytest.approx(blocks_8bit, rel=5e-3)
        assert bf16.non_block_bytes / 2 == pytest.approx(non_block_params, rel=1e-3)
        assert int8.non_block_bytes == bf16.non_block_bytes  # non-block weights are never quantized
    assert B.text_encoder_bytes() == pytest.approx(11.36e9, rel=1e-3)


def test_dit_bytes_rejects_unknown_modes():
    cfg = B.official_dit_config("ti2v-5B")
    with pytest.raises(InputError, match="quant="):
        B.dit_bytes(cfg, "int4")
    with pytest.raises(InputError, match="quant_scope="):
        B.dit_bytes(cfg, "int8", "attn")


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B", "ti2v-5B"])
def test_config_for_checkpoint_matches_the_loader(tiny, task):
    spec = get_task(task)
    folder = tiny / task / ("high_noise_model" if spec.two_experts else "")
    expected, _, _ = read_dit(folder, torch.float32)
    assert H.dit_config_for_checkpoint(tiny / task, task) == expected


def test_config_for_single_file_checkpoint(tiny, tmp_path):
    expected, _, _ = read_dit(tiny / "ti2v-5B", torch.float32)
    sd = read_state_dict(tiny / "ti2v-5B" / "diffusion_pytorch_model.safetensors")
    path = tmp_path / "wan2.2_ti2v_5B.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(path),
              metadata={"config": json.dumps({"num_heads": expected.num_heads})})  # fmt: skip
    assert H.read_dit_config(path) == expected


def test_config_for_checkpoint_of_the_wrong_task(tiny):
    with pytest.raises(CheckpointError):
        H.dit_config_for_checkpoint(tiny / "ti2v-5B", "t2v-A14B")


def test_official_config_is_the_fact_sheet():
    cfg = B.official_dit_config("i2v-a14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim) == (
        5120, 13824, 40, 40, 36, 16,
    )  # fmt: skip
    assert cfg.model_type == "i2v" and cfg.head_dim == 128


# -------------------------------------------------------------------------------------------------- tokens


def test_tokens_agree_with_budgets():
    assert B.tokens_for(get_task("t2v-A14B"), 832, 480, 81) == 32_760
    assert B.tokens_for(get_task("t2v-A14B"), 1280, 720, 81) == 75_600
    assert B.tokens_for(get_task("ti2v-5B"), 1280, 704, 121) == 27_280
    assert B.latent_grid(get_task("ti2v-5B"), 1280, 704, 121) == (31, 44, 80)
    with pytest.raises(InputError, match="multiples of 32"):
        B.tokens_for(get_task("ti2v-5B"), 1280, 720, 121)
    with pytest.raises(InputError, match="4k\\+1"):
        B.tokens_for(get_task("t2v-A14B"), 832, 480, 80)


# ----------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "job, residual_gb, ffn_gb, qkv_gb",
    [("a14b-480p", 0.67, 0.91, 1.01), ("a14b-720p", 1.55, 2.09, 2.32), ("5b-720p", 0.34, 0.78, 0.50)],
)
def test_activation_terms_agree_with_budgets(job, residual_gb, ffn_gb, qkv_gb):
    task, w, h, f = JOBS[job]
    terms = B.activation_terms(B.official_dit_config(task), B.tokens_for(get_task(task), w, h, f))
    assert terms.residual_bytes / GB == pytest.approx(residual_gb, abs=0.006)
    assert terms.ffn_hidden_bytes / GB == pytest.approx(ffn_gb, abs=0.006)
    assert terms.qkv_bytes / GB == pytest.approx(qkv_gb, abs=0.006)


def test_block_peak_is_about_ten_residual_widths():
    """The lean block: ~10 bytes per token and channel with the FFN chunked, 6 + 2 F / C unchunked (14B: 11.4)."""
    cfg = B.official_dit_config("t2v-A14B")
    tokens = B.tokens_for(get_task("t2v-A14B"), 1280, 720, 81)
    lc = tokens * cfg.dim
    assert B.activation_terms(cfg, tokens).block_peak_bytes / lc == pytest.approx(6 + 2 * cfg.ffn_dim / cfg.dim, 1e-3)
    assert B.activation_terms(cfg, tokens, 4096).block_peak_bytes / lc == pytest.approx(10, rel=5e-3)


def test_ffn_chunking_bounds_the_ffn_phase():
    cfg = B.official_dit_config("ti2v-5B")
    tokens = B.tokens_for(get_task("ti2v-5B"), 1280, 704, 121)
    full, chunked = B.activation_terms(cfg, tokens), B.activation_terms(cfg, tokens, 4096)
    assert full.modulation_bytes + full.ffn_bytes == full.block_peak_bytes  # the 5B's wide FFN dominates unchunked
    assert chunked.ffn_hidden_bytes == 2 * 4096 * cfg.ffn_dim
    assert chunked.ffn_bytes < full.ffn_bytes and chunked.peak_bytes < full.peak_bytes
    assert chunked.block_peak_bytes == chunked.modulation_bytes + max(
        chunked.self_attn_kernel_bytes, chunked.cross_attn_bytes
    )
    assert B.activation_terms(cfg, tokens, 10**6) == B.activation_terms(cfg, tokens, 10**6)
    assert B.activation_bytes(cfg, tokens, 10**6) == full.peak_bytes  # a chunk larger than L changes nothing
    assert B.ROPE_CHUNK_TOKENS == ROPE_CHUNK_TOKENS
    assert B.MOD_CHUNK_TOKENS == MOD_CHUNK_TOKENS


def test_vae_and_text_encoder_constants_match_the_models():
    from wan_local.memory import vae_tiling

    for vae in ("wan2.1", "wan2.2"):
        assert B.vae_weight_bytes(vae) == vae_tiling.weight_bytes(vae)


# ------------------------------------------------------------------------------------------------------ plans


def _job(job: str, quant: str = "int8"):
    task, w, h, f = JOBS[job]
    spec, cfg = get_task(task), B.official_dit_config(task)
    tokens = B.tokens_for(spec, w, h, f)
    return (
        B.dit_bytes(cfg, quant),
        lambda chunk: B.activation_bytes(cfg, tokens, chunk),
        B.pipeline_bytes_for(spec, w, h, f),
    )


def _plan(job, quant="int8", free=FREE_24, ram=RAM_64, cap=None, vae_fn=None, **options):
    model, act, pipe = _job(job, quant)
    cap = 10**15 if cap is None else cap
    return P.plan_residency(model, act, free, RESERVE, ram, cap, MemoryOptions(quant=quant, **options), vae_fn, pipe)


def _check_fits_and_is_maximal(plan: P.ResidencyPlan, model: B.ModelBytes) -> None:
    """The plan's VRAM fits, and one more resident block (with the fewest buffers) would not."""
    block = model.block_bytes[0]
    fixed = model.non_block_bytes + model.dequant_scratch_bytes + plan.activation_bytes
    resident = len(plan.resident_blocks)
    used = fixed + resident * block + plan.gpu_buffer_bytes
    assert plan.denoise_vram_bytes == used <= plan.usable_vram_bytes
    streamed_after = model.num_blocks - resident - 1
    more = fixed + (resident + 1) * block + (2 * block if streamed_after else 0)
    assert more > plan.usable_vram_bytes
    assert plan.gpu_buffer_bytes == ((plan.prefetch_depth + 1) * block if plan.streamed_blocks else 0)


def _check_interleaved(plan: P.ResidencyPlan) -> None:
    """Streamed blocks spread evenly: gaps between consecutive ones differ by at most 1; none adjacent when
    at most half stream."""
    s, n = plan.streamed_blocks, plan.num_blocks
    assert sorted(s + plan.resident_blocks) == list(range(n))
    gaps = [(s[(i + 1) % len(s)] - s[i]) % n or n for i in range(len(s))]
    smaller = plan.resident_blocks if len(s) > n // 2 else s
    sgaps = [(smaller[(i + 1) % len(smaller)] - smaller[i]) % n or n for i in range(len(smaller))]
    assert max(sgaps) - min(sgaps) <= 1
    if len(s) <= n // 2:
        assert min(gaps) >= 2


@pytest.mark.parametrize("job", ["a14b-480p", "a14b-720p"])
def test_24gb_int8_is_fully_resident(job):
    """budgets.md: 480p fits a 24 GB card fully resident; with the lean block (720p activations 5.8 GiB, 10.3 GiB
    before) 720p does too, without FFN chunking."""
    model, _, _ = _job(job)
    plan = _plan(job)
    assert plan.streamed_blocks == () and plan.resident_blocks == tuple(range(40))
    assert plan.prefetch_depth == 0 and plan.gpu_buffer_bytes == 0 and plan.pinned_host_bytes == 0
    assert plan.ffn_chunk_tokens is None
    assert plan.denoise_vram_bytes == model.total_bytes + model.dequant_scratch_bytes + plan.activation_bytes


@pytest.mark.parametrize(
    "job, quant, free, low, high",
    [
        # budgets.md's first-order counts (≈25-28 int8, ≈12 bf16 on 16 GB) assumed the activations of the block
        # before its temporaries were freed (480p: 4.5 GiB, now 2.3 GiB with the FFN chunked): a few more fit.
        ("a14b-480p", "int8", FREE_16, 29, 32),
        ("a14b-480p", "none", FREE_16, 14, 16),
        ("a14b-480p", "none", FREE_24, 20, 30),
        ("a14b-720p", "int8", FREE_16, 18, 26),
        ("a14b-720p", "none", FREE_24, 18, 26),
    ],
)
def test_streamed_split(job, quant, free, low, high):
    model, _, _ = _job(job, quant)
    plan = _plan(job, quant, free=free)
    assert low <= len(plan.resident_blocks) <= high
    _check_fits_and_is_maximal(plan, model)
    _check_interleaved(plan)
    assert plan.streamed_bytes_per_forward == len(plan.streamed_blocks) * model.block_bytes[0]
    assert plan.pinned_blocks == plan.streamed_blocks and plan.pageable_host_bytes == 0


def test_prefetch_depth():
    model, _, _ = _job("a14b-480p")
    block = model.block_bytes[0]
    assert _plan("a14b-480p", free=FREE_16).prefetch_depth == 1  # VRAM left goes to resident blocks
    full = _plan("a14b-480p", offload="full")  # nothing resident: a third buffer costs nothing
    assert full.prefetch_depth == 2 and full.gpu_buffer_bytes == 3 * block
    tight = RESERVE + full.denoise_vram_bytes - block // 2  # no room for the third buffer
    squeezed = _plan("a14b-480p", free=tight, offload="full")
    assert squeezed.prefetch_depth == 1 and squeezed.gpu_buffer_bytes == 2 * block


def test_offload_full_streams_every_block_and_none_must_fit():
    full = _plan("a14b-480p", offload="full")
    assert full.resident_blocks == () and len(full.streamed_blocks) == 40
    assert full.pinned_blocks == full.streamed_blocks
    assert _plan("a14b-480p", offload="none").streamed_blocks == ()
    with pytest.raises(P.PlanError, match=r"offload='none'.*short.*--offload auto"):
        _plan("a14b-480p", offload="none", free=FREE_16)


def test_vram_below_one_block_and_non_block_weights_is_a_plan_error():
    model, act, _ = _job("a14b-480p", "none")
    tight = RESERVE + model.non_block_bytes + model.block_bytes[0]  # not even 2 buffers + activations
    with pytest.raises(P.PlanError, match=r"more VRAM than the .* usable .*every block streamed.*--quant int8") as e:
        _plan("a14b-480p", "none", free=tight)
    leanest = min(act(chunk) for chunk in (None, *P.FFN_CHUNK_CANDIDATES))  # streaming everything: FFN chunked
    short = model.non_block_bytes + leanest + 2 * model.block_bytes[0] - (tight - RESERVE)
    assert f"needs {short / GIB:.1f} GiB more VRAM" in str(e.value)
    with pytest.raises(P.PlanError, match="nothing after"):
        _plan("a14b-480p", free=RESERVE)
    with pytest.raises(P.PlanError) as e8:  # already quantized: no --quant hint
        _plan("a14b-480p", "int8", free=RESERVE + GIB)
    assert "--quant" not in str(e8.value)


def test_ffn_chunk_only_when_it_makes_the_blocks_fit():
    model, act, _ = _job("5b-720p", "none")
    assert _plan("5b-720p", "none").ffn_chunk_tokens is None
    free = RESERVE + model.total_bytes + act(16384)  # fits only with the FFN in 16k-token chunks
    plan = _plan("5b-720p", "none", free=free)
    assert plan.ffn_chunk_tokens == 16384 and plan.streamed_blocks == ()
    assert plan.activation_bytes == act(16384) < act(None)


def test_pinned_cap_hit_leaves_a_pageable_remainder():
    model, _, _ = _job("a14b-480p")
    block = model.block_bytes[0]
    free = _plan("a14b-480p", free=FREE_16)
    cap = P.STAGING_HOST_BYTES + 5 * block + block // 2
    plan = _plan("a14b-480p", free=FREE_16, cap=cap)
    assert plan.streamed_blocks == free.streamed_blocks
    assert plan.pinned_blocks == plan.streamed_blocks[:5]
    assert plan.staging_host_bytes == P.STAGING_HOST_BYTES
    assert plan.pinned_host_bytes == 5 * block + P.STAGING_HOST_BYTES <= cap
    assert plan.pageable_host_bytes == (len(plan.streamed_blocks) - 5) * block
    assert any("pageable" in note for note in plan.notes)


def test_idle_expert_policy_under_32_and_64_gb_of_ram():
    model, _, pipe = _job("a14b-480p")
    keep64, auto32 = _plan("a14b-480p", ram=RAM_64), _plan("a14b-480p", ram=RAM_32)
    assert keep64.experts_in_ram == 2 and keep64.release_text_encoder_before_dit
    assert auto32.experts_in_ram == 1
    both = P.PROCESS_RAM_BYTES + 2 * model.total_bytes + pipe.vae_bytes
    assert keep64.denoise_ram_bytes == both and keep64.peak_ram_bytes <= RAM_64
    assert auto32.peak_ram_bytes <= RAM_32
    assert _plan("a14b-480p", ram=RAM_64, keep_idle_expert="drop").experts_in_ram == 1
    with pytest.raises(P.PlanError, match=r"RAM for UMT5 .* with both DiT experts .* held.*keep_idle_expert='drop'"):
        _plan("a14b-480p", ram=RAM_32, keep_idle_expert="keep")
    # The 5B has one model: the policy does not apply.
    assert _plan("5b-720p", ram=RAM_64, keep_idle_expert="keep").experts_in_ram == 1


@pytest.mark.parametrize("ram", [RAM_32 + 2 * GIB, RAM_64, 4 * RAM_64])
def test_text_encoder_is_always_released_before_the_dit(ram):
    """The pipeline deletes UMT5 after the prompt encode whatever the RAM: the plan never counts it later."""
    model, _, pipe = _job("a14b-480p", "none")
    plan = _plan("a14b-480p", "none", ram=ram, keep_idle_expert="drop")
    assert plan.experts_in_ram == 1 and plan.release_text_encoder_before_dit
    assert plan.encode_ram_bytes == P.PROCESS_RAM_BYTES + pipe.text_encoder_bytes
    assert plan.denoise_ram_bytes == P.PROCESS_RAM_BYTES + model.total_bytes + pipe.vae_bytes


def test_ram_too_small_for_one_expert_names_ram():
    model, _, _ = _job("a14b-480p", "none")
    with pytest.raises(P.PlanError, match=r"GiB of RAM for one DiT expert while denoising.*short"):
        _plan("a14b-480p", "none", ram=model.total_bytes)


def test_text_encoder_always_runs_on_the_cpu():
    """The pipeline encodes prompts on the CPU, so the plan never gives UMT5 any VRAM, however much is free."""
    for free in (FREE_16, 80 * GIB):
        plan = _plan("a14b-480p", free=free)
        assert not plan.text_encoder_on_gpu and plan.encode_vram_bytes == 0


def test_vae_tile_from_free_vram():
    def decode(tile):  # weights + work growing with the tile area (latent 60 x 104)
        th, tw = (60, 104) if tile is None else (min(tile, 60), min(tile, 104))
        return GIB + th * tw * 3 * 1024**2

    untiled = _plan("a14b-480p", vae_fn=decode)
    assert untiled.vae_tile_latent_px is None and untiled.decode_vram_bytes == decode(None)
    usable = untiled.usable_vram_bytes
    tiled = _plan("a14b-480p", free=FREE_16, vae_fn=decode)
    tile = tiled.vae_tile_latent_px
    assert tile is not None and decode(tile) <= tiled.usable_vram_bytes < decode(tile + 1)
    assert tiled.peak_vram_bytes == max(tiled.denoise_vram_bytes, tiled.encode_vram_bytes, decode(tile))
    forced = _plan("a14b-480p", vae_fn=decode, vae_tiling="on")
    assert forced.vae_tile_latent_px is not None and forced.vae_tile_latent_px <= 52 and usable > decode(None)
    with pytest.raises(P.PlanError, match="enable VAE tiling"):
        _plan("a14b-480p", free=FREE_16, vae_fn=decode, vae_tiling="off")
    with pytest.raises(P.PlanError, match="even with 8x8"):
        _plan("a14b-480p", free=FREE_16, vae_fn=lambda tile: 100 * GIB)


def test_i2v_conditioning_encode_uses_the_decode_tile():
    model, act, pipe = _job("a14b-480p")

    def decode(tile):
        return GIB + (60 * 104 if tile is None else min(tile, 60) * min(tile, 104)) * 3 * 1024**2

    def encode(tile):
        return decode(tile) // 2

    def plan(free, enc):
        return P.plan_residency(model, act, free, RESERVE, RAM_64, 10**15, MemoryOptions(), decode, pipe,
                                vae_encode_bytes_fn=enc)  # fmt: skip

    tiled = plan(FREE_16, encode)
    assert tiled.condition_vram_bytes == encode(tiled.vae_tile_latent_px) > 0
    assert plan(FREE_16, None).condition_vram_bytes == 0
    with pytest.raises(P.PlanError, match="encode of the conditioning video"):
        plan(FREE_16, lambda tile: 100 * GIB)


def test_cpu_plan_holds_everything_in_ram():
    model, act, pipe = _job("5b-720p", "none")
    plan = P.plan_cpu(model, act(None), RAM_64, MemoryOptions(), 3 * GIB, pipe)
    assert plan.device == "cpu" and plan.peak_vram_bytes == 0 and plan.streamed_blocks == ()
    assert plan.denoise_ram_bytes >= model.total_bytes + act(None)
    with pytest.raises(P.PlanError, match="RAM"):
        P.plan_cpu(model, act(None), 8 * GIB, MemoryOptions(), 3 * GIB, pipe)


def test_default_pinned_cap():
    assert B.default_pinned_cap_bytes(32 * GIB, "Windows") == int(0.4 * 32 * GIB)
    assert B.default_pinned_cap_bytes(64 * GIB, "Linux") == int(0.9 * 64 * GIB)
    assert B.default_pinned_cap_bytes(8 * GIB, "Linux") == 4 * GIB  # RAM - 4 GiB
    assert B.default_pinned_cap_bytes(4 * GIB, "Darwin") == int(0.4 * 4 * GIB)
    assert B.default_pinned_cap_bytes(32 * GIB, "Linux") == 28 * GIB
