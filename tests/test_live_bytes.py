"""Live-bytes tracing: the tracker's accounting on real tensors, and the activation formula (memory.bytes) and VAE
decode estimate (memory.vae_tiling) against whole forwards / decodes traced on fake tensors (memory.meta_trace).

The real-size forwards are benchmarks/bench_activation_meta.py; here a small DiT (dim 256, wide FFN so that
chunking matters) and small latents keep it to seconds while the terms that do not scale with L·C (RoPE table,
contexts, modulation tables, conditioning) weigh more than at full size, and the real-size blocks are traced in a
two-block model (block 1 is the steady state).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import REFERENCE_JOBS

from wan_local.memory import bytes as B
from wan_local.memory.live_bytes import LiveStorageTracker
from wan_local.memory.meta_trace import trace_dit_forward, trace_vae_decode
from wan_local.memory.vae_tiling import decode_bytes_estimate
from wan_local.models.dit import DiTConfig
from wan_local.specs import get_task

SMALL = DiTConfig(
    model_type="t2v", in_dim=16, out_dim=16, dim=256, ffn_dim=2048, freq_dim=256, num_heads=2, num_layers=2,
    text_len=64, text_dim=128,
)  # fmt: skip
TOLERANCE = 0.10  # the estimator must be within 10 % of the tracked peak


def test_tracker_counts_new_storages_until_they_die() -> None:
    w = torch.zeros(1000)  # made before entering: not counted, nor are its views or in-place results
    with torch.no_grad(), LiveStorageTracker() as tracker:
        tracker.phase = "first"
        w.add_(1)
        view = w[:500].view(50, 10).t()
        a = w * 2  # 4000 bytes
        torch.mul(w, 3, out=a)  # out=: no new storage
        b = a + view.sum()  # 4000 (+ 4 for the sum, dead at once)
        del a
        c = b * 3
        tracker.phase = "second"
        del b, c
        d = torch.empty(100)
        assert tracker.live_bytes() == 400
    assert tracker.peak_bytes == 8004 and tracker.peak_phase == "first"
    assert tracker.phase_peak_bytes == {"first": 8004, "second": 400}
    assert tracker.peak_tensors[0].startswith("0.0 MiB float32 [1000] from aten.")
    del d


def _outside_forward(terms: B.ActivationTerms) -> int:
    """The sampler's tensors that live outside a forward: all but the latent it takes."""
    return terms.sampler_bytes - terms.sampler_bytes // B.SAMPLER_LATENTS


@functools.cache
def _trace(model_type: str, grid: tuple[int, int, int], chunk: int | None):
    cfg = dataclasses.replace(SMALL, model_type=model_type, in_dim=36 if model_type == "i2v" else 16)
    return cfg, trace_dit_forward(cfg, grid, chunk, distinct_timesteps=2 if model_type == "ti2v" else 1)


@pytest.mark.parametrize(
    "model_type, grid, chunk",
    [
        ("t2v", (9, 20, 50), None),  # 9000 tokens: two RoPE chunks; the FFN is the peak unchunked
        ("t2v", (9, 20, 50), 1024),  # chunked: the attention phases are
        ("t2v", (3, 10, 20), None),  # 600 tokens: one RoPE chunk, short-video regime
        ("ti2v", (9, 20, 50), 4096),  # per-token timesteps (2 distinct), gathered in chunks
        ("i2v", (5, 20, 30), None),  # the conditioning y
    ],
)
def test_activation_formula_matches_a_traced_forward(model_type, grid, chunk):
    cfg, trace = _trace(model_type, grid, chunk)
    terms = B.activation_terms(cfg, trace.tokens, chunk)
    assert terms.peak_bytes - _outside_forward(terms) == pytest.approx(trace.peak_bytes, rel=TOLERANCE)
    # Term by term: the block's largest phase exactly, its input, and what lives through the forward. The traced
    # part also holds the time tables (a few KB) and per-token timesteps with their index (12 bytes per token).
    assert trace.block_bytes == terms.block_peak_bytes
    assert trace.input_bytes == terms.residual_bytes
    unmodelled = trace.persistent_bytes - (terms.persistent_bytes - _outside_forward(terms))
    assert 0 <= unmodelled <= 64 * 1024 + (12 * trace.tokens if model_type == "ti2v" else 0)
    assert trace.head_bytes <= terms.block_peak_bytes


def test_chunking_moves_the_traced_peak_as_the_formula_says():
    full, chunked = (_trace("t2v", (9, 20, 50), chunk)[1] for chunk in (None, 1024))
    assert full.peak_phase.endswith(".ffn") and not chunked.peak_phase.endswith(".ffn")
    assert full.peak_bytes - chunked.peak_bytes == (
        B.activation_bytes(SMALL, 9000) - B.activation_bytes(SMALL, 9000, 1024)
    )


def test_vae_decode_estimate_matches_a_traced_decode():
    """The estimate traces 3 chunks of one tile on the meta device; the pipeline's decode (tiled_decode, here one
    tile covering the latent) runs every chunk, the blend and the copies to the host video."""
    shape = (1, 16, 3, 8, 8)
    traced = trace_vae_decode("wan2.1", shape).peak_bytes
    assert decode_bytes_estimate("wan2.1", shape) == pytest.approx(traced, rel=TOLERANCE)


# ---------------------------------------------------------------------------------- real-size blocks (one block traced)


def _traced_block_peak(task: str, tokens: int, per_token_t: bool, ffn_chunk_tokens: int | None = None) -> int:
    """What a block of a real-size forward holds on top of its input and everything else alive at its entry, traced
    on fake tensors under bf16 autocast (meta_trace; a 2-block model: block 1 is the steady state)."""
    cfg = dataclasses.replace(B.official_dit_config(task), num_layers=2)
    trace = trace_dit_forward(cfg, (1, 1, tokens), ffn_chunk_tokens, distinct_timesteps=2 if per_token_t else 1)
    return trace.block_bytes


@pytest.mark.parametrize("chunk", [None, 4096, 5000])
@pytest.mark.parametrize("job", list(REFERENCE_JOBS))
def test_activation_model_matches_a_traced_block(job, chunk):
    task, w, h, f = REFERENCE_JOBS[job]
    tokens = B.tokens_for(get_task(task), w, h, f)
    terms = B.activation_terms(B.official_dit_config(task), tokens, chunk)
    traced = _traced_block_peak(task, tokens, per_token_t=task == "ti2v-5B", ffn_chunk_tokens=chunk)
    assert terms.block_peak_bytes == pytest.approx(traced, rel=1e-4)
    # The peak of the forward adds the block's input residual and what lives through the forward.
    assert terms.peak_bytes == terms.residual_bytes + terms.block_peak_bytes + terms.persistent_bytes


@pytest.mark.parametrize(
    "task, tokens, chunk",
    [("t2v-A14B", 100, None), ("t2v-A14B", 5000, 1000), ("ti2v-5B", 700, None), ("ti2v-5B", 9000, 3000)],
)
def test_activation_model_holds_for_short_videos_and_odd_chunks(task, tokens, chunk):
    """Short sequences (context-sized cross-attention, one RoPE / modulation chunk) and chunks not dividing L."""
    terms = B.activation_terms(B.official_dit_config(task), tokens, chunk)
    traced = _traced_block_peak(task, tokens, per_token_t=task == "ti2v-5B", ffn_chunk_tokens=chunk)
    assert terms.block_peak_bytes == pytest.approx(traced, rel=1e-4)
