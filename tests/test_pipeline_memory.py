"""The pipeline's memory behaviour on the tiny fixtures: which experts are held, caches, quantization, tiling."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import rel_l2

from wan_local import pipeline as pipeline_module
from wan_local.errors import InputError
from wan_local.memory import experts as experts_module
from wan_local.memory.options import MemoryOptions
from wan_local.memory.vae_tiling import default_overlap, tiled_decode
from wan_local.pipeline import GenerationSettings, WanPipeline

PROMPT = "A red fox runs through fresh snow at sunrise, cinematic lighting."


def _settings(**kw) -> GenerationSettings:
    base = dict(task="t2v-A14B", prompt=PROMPT, size=(64, 48), frames=5, steps=6, guide_scale=(3.0, 4.0), seed=42)
    return GenerationSettings(**{**base, **kw})


def _watch_experts(monkeypatch) -> dict[str, weakref.ref]:
    """Record a weak reference to every expert model loaded from disk."""
    refs: dict[str, weakref.ref] = {}
    real = experts_module.load_dit

    def load(path, **kw):
        model = real(path, **kw)
        refs[path.name] = weakref.ref(model)
        return model

    monkeypatch.setattr(experts_module, "load_dit", load)
    return refs


@pytest.mark.parametrize("keep", [False, True], ids=["drop-idle", "keep-idle"])
def test_experts_held_follow_the_policy(tiny, tmp_path, golden, monkeypatch, keep):
    refs = _watch_experts(monkeypatch)
    memory = MemoryOptions(keep_idle_expert="keep" if keep else "drop")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=tmp_path)
    held_after_switch: list[list[str]] = []

    def on_step(event):
        if event.expert == "low_noise":
            gc.collect()
            alive = [name for name, ref in refs.items() if ref() is not None]
            held_after_switch.append(sorted(alive))

    result = pipe.generate(_settings(), on_step=on_step)
    assert rel_l2(result.latent, golden("t2v_a14b_unipc")["final_latent"]) <= 1e-5
    both = ["high_noise_model", "low_noise_model"]
    if keep:
        # The low-noise expert was read in the background while the high-noise one computed; both stay in RAM.
        assert all(held == both for held in held_after_switch)
        assert sorted(pipe.experts.held()) == ["high_noise", "low_noise"]
    else:
        # After the switch the high-noise expert is gone: one expert in memory at any time.
        assert all(held == ["low_noise_model"] for held in held_after_switch)
        assert pipe.experts.held() == []
    assert sorted(pipe.experts.loads) == ["high_noise", "low_noise"]


def test_kept_experts_are_not_read_again_for_the_next_job(tiny, tmp_path):
    memory = MemoryOptions(keep_idle_expert="keep")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=tmp_path)
    first = pipe.generate(_settings(steps=6))
    second = pipe.generate(_settings(steps=6))
    # Each expert read from disk once (the low-noise one in the background, so the order may vary).
    assert sorted(pipe.experts.loads) == ["high_noise", "low_noise"]
    assert torch.equal(first.latent, second.latent)
    pipe.close()
    assert pipe.experts.held() == []


def test_prompt_cache_skips_the_text_encoder(tiny, tmp_path, monkeypatch):
    loads = []
    real = pipeline_module.load_text_encoder
    monkeypatch.setattr(pipeline_module, "load_text_encoder", lambda *a, **k: loads.append(1) or real(*a, **k))
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, cache_dir=tmp_path)
    first = pipe.encode_prompts(PROMPT, "ugly")
    second = pipe.encode_prompts(PROMPT, "ugly")
    assert loads == [1], "the second call is served from the cache"
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    pipe.encode_prompts(PROMPT, "blurry")
    assert loads == [1, 1], "a new negative prompt needs the encoder again"


@pytest.mark.parametrize("quant", ["none", "int8", "fp8"])
def test_first_and_later_starts_give_the_same_video(tiny, tmp_path, quant):
    """The first start (quantizing, writing the cache) and a later one (reading it) compute the same bits."""
    memory = MemoryOptions(quant=quant, keep_idle_expert="drop")
    runs = []
    for _ in range(2):
        pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=tmp_path)
        runs.append(pipe.generate(_settings(steps=6)).latent)
        assert sorted(pipe.experts.loads) == ["high_noise", "low_noise"]
        pipe.close()
    if quant != "none":
        assert len(list((tmp_path / "quantized").iterdir())) == 2, "both experts were cached by the first start"
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(("quant", "bound"), [("int8", 2e-2), ("fp8", 8e-2)])
def test_quantized_run_stays_close(tiny, tmp_path, golden, quant, bound):
    pipe = WanPipeline(
        tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, MemoryOptions(quant=quant), cache_dir=tmp_path
    )
    result = pipe.generate(_settings())
    error = rel_l2(result.latent, golden("t2v_a14b_unipc")["final_latent"])
    assert 0 < error <= bound, f"{quant}: {error:.3g}"
    assert any((tmp_path / "quantized").iterdir()), "quantized weights are cached on disk"


def test_vae_tiling_on_decodes_through_tiles(tiny, tmp_path, golden, monkeypatch):
    """With vae_tiling="on" the pipeline decodes with the tile the chooser gives (tiling accuracy itself is
    tested in test_vae_tiling.py)."""
    pipe = WanPipeline(
        tiny / "ti2v-5B", "ti2v-5B", "cpu", torch.float32, MemoryOptions(vae_tiling="on"), cache_dir=tmp_path
    )
    asked = []
    monkeypatch.setattr(pipeline_module, "choose_tile", lambda kind, hw, free: asked.append(hw) or (2, 2))
    latent = golden("ti2v_5b_t2v")["final_latent"]
    video = pipe.decode(latent)
    assert asked == [tuple(latent.shape[-2:])]
    expected = tiled_decode(pipe.vae, latent[None], (2, 2), default_overlap((2, 2)))[0]
    assert torch.equal(video, expected)
    assert not torch.equal(video, pipe.vae.decode(latent[None])[0]), "the latent was really split into tiles"
    off = WanPipeline(tiny / "ti2v-5B", "ti2v-5B", "cpu", torch.float32, cache_dir=tmp_path)
    untiled = off.decode(latent)
    assert rel_l2(untiled, golden("ti2v_5b_t2v")["video"]) <= 1e-5, "auto without a plan: untiled"
    assert torch.equal(untiled, off.vae.decode(latent[None])[0]), "one tile covering the latent is vae.decode"


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny, tmp_path, solver):
    """A latent + solver state saved after step k resumes the job in a new pipeline, bit for bit."""
    settings = _settings(solver=solver)
    full = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, cache_dir=tmp_path).generate(settings)
    saved = {}

    def crash_after_step_3(event):
        if event.index == 2:
            path = tmp_path / "checkpoint.pt"
            torch.save({"latent": event.latent, "solver": event.solver_state()}, path)
            saved["path"] = path
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, cache_dir=tmp_path).generate(
            settings, on_step=crash_after_step_3
        )
    checkpoint = torch.load(saved["path"], weights_only=True)
    steps = []
    resumed = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, cache_dir=tmp_path).generate(
        settings, on_step=lambda e: steps.append(e.index), resume=(checkpoint["latent"], checkpoint["solver"])
    )
    assert steps == [3, 4, 5]
    assert torch.equal(resumed.latent, full.latent)
    assert torch.equal(resumed.video, full.video)


def test_fp8_compute_option_reaches_the_linears_and_a_cpu_pipeline_refuses_it(tiny, tmp_path):
    """--quant-compute scaled_mm reaches the quantized Linears; a CPU pipeline refuses it before denoising (there is
    no FP8 GEMM to honour it; on the CPU those Linears would dequantize bit for bit: tests/test_fp8_gemm.py)."""
    memory = MemoryOptions(quant="fp8", quant_compute="scaled_mm")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=tmp_path)
    with pytest.raises(InputError, match=r"scaled_mm needs a CUDA GPU .* use --quant-compute dequant"):
        pipe.generate(_settings(steps=2))
    assert pipe.experts.loads == []  # refused before any expert loaded
    assert pipe.experts("low_noise").blocks[0].ffn[0].compute == "scaled_mm"
    pipe.close()
