"""Models and checks shared by the BlockStreamer tests (CPU and CUDA): the golden tiny DiT, random DiTs, a toy
net with quantized-style blocks, and snapshots that prove uninstall restores every tensor."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wan_local.models.dit import DiTConfig, WanDiT
from wan_local.weights.loading import load_dit


def golden_model(tiny: Path, cases: dict) -> WanDiT:
    return load_dit(tiny / cases["dit_t2v"]["checkpoint"]).eval()


def run(model: nn.Module, g: dict, device: str = "cpu") -> torch.Tensor:
    with torch.inference_mode():
        return model(g["x"][None].to(device), g["t"].to(device), [g["context"].to(device)])


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.device, torch.dtype, torch.Tensor]]:
    return {n: (id(t), t.device, t.dtype, t.detach().cpu().clone()) for n, t in named_tensors(model)}


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def assert_restored(model: nn.Module, snap: dict) -> None:
    now = dict(named_tensors(model))
    assert now.keys() == snap.keys()
    for name, (ident, device, dtype, value) in snap.items():
        t = now[name]
        assert id(t) == ident and t.device == device and t.dtype == dtype, name
        assert torch.equal(t.detach().cpu(), value), name
        assert not t.is_pinned() or t.device.type != "cpu", name


def random_dit(num_layers: int = 5, seed: int = 0, **overrides) -> WanDiT:
    fields = dict(model_type="t2v", in_dim=4, out_dim=4, dim=24, ffn_dim=32, freq_dim=16, num_heads=2)
    fields.update(num_layers=num_layers, text_len=8, text_dim=6)
    fields.update(overrides)
    torch.manual_seed(seed)
    return WanDiT(DiTConfig(**fields)).eval()


class ToyQLinear(nn.Module):
    """int8 weight buffer + fp32 per-row scale + bf16 bias, dequantised in forward (like a weight-only quant)."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(n, n, generator=gen)
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.scale, self.bias.float())


class ToyBlock(nn.Module):
    def __init__(self, n: int, seed: int, wide: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = ToyQLinear(n, gen)
        self.register_buffer("gain", torch.tensor(0.5 + 0.1 * seed))  # 0-dim
        self.register_buffer("mask", torch.rand(n, generator=gen) > 0.3)  # bool
        self.wide = nn.Parameter(torch.randn(n, 3 * n, generator=gen) * 0.1) if wide else None  # uneven sizes
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("block failed on purpose")
        y = x + self.gain * torch.tanh(self.lin(x)) * self.mask
        if self.wide is not None:
            y = y + (x @ self.wide)[..., : x.shape[-1]]
        return y


class ToyNet(nn.Module):
    def __init__(self, n: int = 16, num_blocks: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(n, i, wide=i % 3 == 1) for i in range(num_blocks))
        torch.manual_seed(0)
        self.head = nn.Linear(n, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)
