"""The same random T2V DiT twice: a diffusers `WanTransformer3DModel` and our `WanDiT` holding its very tensors.

Weights: linear weights N(0, 1/fan_in), norm scales around 1, the time projection scaled down so gates stay small,
as in trained models. In bf16 the tensors follow diffusers' `from_pretrained(torch_dtype=bfloat16)` convention: the
modules of `_keep_in_fp32_modules` stay float32. Used by bench_vs_diffusers.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.loading import assign_checked

TEXT_LEN, TEXT_DIM, FREQ_DIM, LATENT_CH = 512, 4096, 256, 16


def diffusers_kwargs(dim: int, ffn_dim: int, heads: int, layers: int) -> dict:
    """WanTransformer3DModel arguments of a T2V DiT of this shape."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": LATENT_CH,
        "out_channels": LATENT_CH,
        "text_dim": TEXT_DIM,
        "freq_dim": FREQ_DIM,
        "ffn_dim": ffn_dim,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }


def our_config(kw: dict) -> DiTConfig:
    """Our DiTConfig of the same model."""
    return DiTConfig(
        model_type="t2v",
        in_dim=kw["in_channels"],
        out_dim=kw["out_channels"],
        dim=kw["num_attention_heads"] * kw["attention_head_dim"],
        ffn_dim=kw["ffn_dim"],
        freq_dim=kw["freq_dim"],
        num_heads=kw["num_attention_heads"],
        num_layers=kw["num_layers"],
        text_len=TEXT_LEN,
        text_dim=kw["text_dim"],
    )


def _std_and_mean(name: str, shape: tuple[int, ...], dim: int) -> tuple[float, float]:
    if "norm" in name and name.endswith("weight"):
        return 0.1, 1.0
    if name.endswith("scale_shift_table"):
        return dim**-0.5, 0.0
    if len(shape) == 1:
        return 0.02, 0.0  # biases
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    scale = 0.1 if name.startswith("condition_embedder.time_proj") else 1.0  # small gates, as trained models have
    return scale * fan_in**-0.5, 0.0


def keep_fp32(name: str, keep: set[str]) -> bool:
    return bool(keep & set(name.split(".")))


def random_diffusers(kw: dict, low: torch.dtype | None, init_device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A WanTransformer3DModel on the CPU with seeded random weights, never materialised in float32 as a whole.

    low None: every tensor float32. Else tensors are `low`, except those of `_keep_in_fp32_modules` (float32),
    as `from_pretrained(torch_dtype=low)` leaves them. Values are drawn on `init_device` (a GPU is much faster).
    """
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**kw)
    keep = set(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or [])
    gen = torch.Generator(device=init_device).manual_seed(seed)
    dim = kw["num_attention_heads"] * kw["attention_head_dim"]
    sd = {}
    for name, p in model.named_parameters():
        dtype = torch.float32 if low is None or keep_fp32(name, keep) else low
        std, mean = _std_and_mean(name, tuple(p.shape), dim)
        values = torch.randn(p.shape, generator=gen, device=init_device).mul_(std).add_(mean)
        sd[name] = values.to("cpu", dtype)
        del values
    model.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent RoPE tables were built on meta: rebuild them for real.
    model.rope = WanRotaryPosEmbed(kw["attention_head_dim"], kw["patch_size"], model.config.rope_max_seq_len)
    return model.eval().requires_grad_(False)


def ours_from(sd: dict[str, torch.Tensor], cfg: DiTConfig, device: torch.device | str) -> WanDiT:
    """Our WanDiT holding `sd` (official names) as they are (CPU: the very same tensors), moved to `device`."""
    dev = torch.device(device)
    tensors = sd if dev.type == "cpu" else {k: v.to(dev) for k, v in sd.items()}
    return assign_checked(lambda: WanDiT(cfg), tensors, "benchmark weights", None)


def make_inputs(latent: tuple[int, int, int], low: torch.dtype | None, seed: int = 123) -> dict[str, torch.Tensor]:
    """Latent [1, 16, T, H, W], padded text context [1, 512, 4096] and t = 700, rounded to `low` when given."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, LATENT_CH, *latent, generator=gen)
    context = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen)
    if low is not None:  # the same values for both models, whatever dtype each takes them in
        x, context = x.to(low).float(), context.to(low).float()
    return {"x": x, "context": context, "t": torch.tensor([700.0])}


def ours_forward(model: WanDiT, inp: dict, low: torch.dtype | None) -> Callable[[], torch.Tensor]:
    dev_type = inp["x"].device.type

    def fwd() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(dev_type, dtype=low or torch.float32, enabled=low is not None):
            return model(inp["x"], inp["t"], inp["context"])

    return fwd


def diffusers_forward(model: torch.nn.Module, inp: dict, low: torch.dtype | None) -> Callable[[], torch.Tensor]:
    dtype = low or torch.float32
    x, context = inp["x"].to(dtype), inp["context"].to(dtype)

    def fwd() -> torch.Tensor:
        with torch.no_grad():  # as diffusers' pipelines (group offloading re-points .data inside the forward)
            return model(hidden_states=x, timestep=inp["t"], encoder_hidden_states=context, return_dict=False)[0]

    return fwd
