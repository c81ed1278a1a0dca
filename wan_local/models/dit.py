"""The Wan2.2 diffusion transformer (official `WanModel` numerics and state-dict keys).

Shapes: B batch, C = dim, N heads, D = C / N head dim, L = F'·H'·W' tokens of the patch grid.

Dtype regime (reference §2.7; what matters when the caller wraps `forward` in `torch.autocast("cuda", bf16)`):
patch/text embeddings and every q/k/v/o/ffn Linear run in bf16; the sinusoid is float64; time embedding,
time projection and head run in an fp32 autocast region; LayerNorms compute in fp32 and return the input
dtype; the residual stream is bf16 only at the entry of block 0 and fp32 after its first gated add;
modulation maths is fp32; RMSNorm normalises in fp32, casts back, then multiplies by the weight; RoPE is
float64 -> fp32. Without autocast (CPU tests) everything is plain fp32.

Time conditioning is kept as a table with one row per distinct timestep ([U, C] / [U, 6, C], fp32) plus an
index tensor [B, 1] (one timestep per sample) or [B, L] (TI2V image-to-video), gathered where it is used
(`models.timesteps`). The reference materialises [B, L, 6, C] in fp32 instead (9 GB at 720p for the 14B); the
values are the same. RoPE is `models.rope`.

Activation memory (what wan_local.memory.bytes.activation_terms models): a block frees every temporary as soon as it
is dead and keeps at most one fp32 copy of a [B, L, C] projection alive. The modulated inputs are cast once to the
autocast dtype (exactly the cast the Linears would do), RMSNorm takes its statistics from a squared copy freed before
the normalised copy is made, RoPE rotates q and k in place (float64 maths per token chunk, written back through
fp32, so the values are the reference's fp32 RoPE output rounded as the attention kernel rounds it), attention
outputs stay in the autocast dtype (the o projection would cast them back anyway), GELU runs in place and the
residual adds are in place on the block's own residual tensor (never on its input). Results are bit-identical to
the straightforward expression of the reference. `DiTBlock.ffn_chunk_tokens` optionally runs the FFN over token
chunks to bound its [tokens, ffn_dim] hidden tensor.

Inference only: those in-place writes would overwrite tensors autograd saves for backward, so a block or attention
forward that autograd would record (grad mode on and a parameter or input needing grad) raises RuntimeError. Run
it under `torch.inference_mode()` / `torch.no_grad()` or with frozen parameters (the loaders freeze them).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wan_local.errors import InputError
from wan_local.models.attention import attention
from wan_local.models.rope import apply_rope, apply_rope_, rope_table
from wan_local.models.timesteps import (
    add_gated_,
    gated_residual,
    modulate_,
    shared_timestep,
    sinusoidal_embedding,
    token_rows,
)

MODEL_TYPES = ("t2v", "i2v", "ti2v")


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of one Wan DiT, as read from its config.json and weight shapes.

    `model_type` "i2v" means a conditioning tensor y (in_dim - out_dim channels) is concatenated to the
    latent; "t2v" and "ti2v" take the latent alone.
    """

    model_type: str
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int
    num_heads: int
    num_layers: int
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"DiTConfig.model_type={self.model_type!r}: must be one of {MODEL_TYPES}")
        for name in ("in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "num_heads", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)}: must be positive")
        for name in ("text_len", "text_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)}: must be positive")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"DiTConfig.patch_size={self.patch_size}: must be 3 positive ints (t, h, w)")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim={self.freq_dim}: must be even (cos and sin halves)")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim={self.dim}: must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"DiTConfig.num_heads={self.num_heads}: head dim dim/num_heads={self.head_dim} must be even "
                "and >= 6 (RoPE splits its complex pairs over frame, height and width)"
            )
        if self.model_type == "i2v" and self.in_dim <= self.out_dim:
            raise ValueError(
                f"DiTConfig.in_dim={self.in_dim}: an i2v model needs in_dim > out_dim={self.out_dim} "
                "(the extra channels are the conditioning y)"
            )
        if self.eps <= 0:
            raise ValueError(f"DiTConfig.eps={self.eps}: must be positive")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (128 for every released Wan DiT)."""
        return self.dim // self.num_heads


# ------------------------------------------------------------------------------ dtype regions, inference only


def _fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """The reference's `autocast(dtype=float32)` region (time embedding, projection, head).

    Autocast is switched off and the layers inside run through `fp32_linear`, which upcasts input, weight and bias:
    the same maths as CUDA's float32 autocast, and it also works on the CPU, whose autocast has no float32 mode.
    """
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 whatever the stored dtype of the weights."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x as a Linear inside the active autocast region computes with it: cast to the autocast dtype, else x.

    F.linear under autocast makes exactly this cast; doing it once up front lets the caller drop the fp32 original
    before the Linear allocates its output (and saves the repeated casts of q, k and v).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def _refuse_autograd(module: nn.Module, *inputs: torch.Tensor) -> None:
    """Raise RuntimeError if autograd would record `module`'s forward (grad mode on and an input or parameter
    needing grad): the blocks write in place into tensors autograd would have to save for backward."""
    if torch.is_grad_enabled() and (
        any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())
    ):
        raise RuntimeError(
            f"{type(module).__name__} is inference-only (it computes in place): call it under torch.inference_mode() "
            "or torch.no_grad(), or freeze its parameters with requires_grad_(False)"
        )


# ----------------------------------------------------------------------------------------------------- layers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (input and affine params upcast), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in fp32, cast back to the input dtype, then multiply by weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over all heads jointly; self-attention when `rope` is given."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        rope: torch.Tensor | None = None,
        x_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, C] attends to source [B, Lk, C] -> [B, Lq, C]; rope [Lq, 1, D/2] for self-attention.

        x_norm, when given, is applied to x first (the block's norm3 before cross-attention); the normalised copy
        lives only until q is projected. Under autocast the attention output stays in the autocast dtype (the
        reference converts it to q's fp32 and the o projection casts it straight back: same values).
        """
        _refuse_autograd(self, x, source)
        n = self.num_heads
        q = self._project_heads(self.q, self.norm_q, x, x_norm)  # [B, Lq, N, D]
        if rope is not None:
            q = self._rope(q, rope)
        k = self._project_heads(self.k, self.norm_k, source)  # [B, Lk, N, D]
        if rope is not None:
            k = self._rope(k, rope)
        v = self.v(source).unflatten(-1, (n, -1))
        out = attention(q, k, v)
        del q, k, v
        return self.o(out.flatten(2))

    def _project_heads(
        self, linear: nn.Module, norm: RMSNorm, x: torch.Tensor, x_norm: nn.Module | None = None
    ) -> torch.Tensor:
        """norm(linear(x_norm(x))) as heads [B, L, N, D], holding at most the projection and one fp32 copy of it.

        The normalised input (when x_norm is given) is made here so that it dies as soon as it is projected. Same
        ops and values as RMSNorm.forward: the statistics come from a squared fp32 copy (squared in place), freed
        before the fp32 copy that is normalised (in place) and cast back. The projection is a fresh tensor owned
        here, so in fp32 it is normalised in place.
        """
        xin = x if x_norm is None else _autocast_input(x_norm(x))
        y = linear(xin)  # [B, L, C]
        del xin
        dtype = y.dtype
        sq = y.float()
        sq = y.pow(2) if sq is y else sq.pow_(2)
        r = sq.mean(dim=-1, keepdim=True).add_(norm.eps).rsqrt_()  # [B, L, 1] fp32
        del sq
        yf = y.float()
        del y
        y = yf.mul_(r).to(dtype)
        del yf, r
        w = norm.weight
        y = y.mul_(w) if torch.result_type(y, w) == y.dtype else y * w
        return y.unflatten(-1, (self.num_heads, -1))

    @staticmethod
    def _rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE of heads x: in place when x's dtype is what the attention computes in, else the fp32 reference."""
        device_type = x.device.type
        if x.dtype == torch.float32 or (
            torch.is_autocast_enabled(device_type) and x.dtype == torch.get_autocast_dtype(device_type)
        ):
            return apply_rope_(x, rope)
        return apply_rope(x, rope)


class DiTBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention to text, modulated FFN.

    `ffn_chunk_tokens` (a plain attribute, not a parameter: the state dict is unchanged) is set from outside, e.g.
    by the residency plan: when set, the FFN runs over chunks of that many tokens and adds each chunk's gated
    output into the residual, so its hidden tensor is [B, chunk, ffn_dim] instead of [B, L, ffn_dim]. Everything
    but the two FFN matrix products is elementwise or per token, so the values equal the unchunked FFN's up to
    how the GEMM kernels round a row for another row count (≤ 2e-7 relative L2 on the CPU float32 golden cases).
    """

    #: Tokens per FFN pass; None runs the FFN over all tokens at once.
    ffn_chunk_tokens: int | None = None

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        c = cfg.dim
        self.norm1 = FP32LayerNorm(c, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(c, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(c, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(c, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(c, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(c, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, c))
        self.modulation = nn.Parameter(torch.randn(1, 6, c) / c**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        t_index: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C] (fp32, a new tensor: x itself is not modified).

        e0: [U, 6, C] fp32 time projection per distinct timestep; t_index: [B, 1] or [B, L] int64, the row
        of e0 for each sample/token; context: [B, text_len, C] embedded text; rope: [L, 1, D/2] from
        `rope_table`.
        """
        _refuse_autograd(self, x, e0, context)
        # Modulation maths is fp32 (fp32 e0 promotes bf16 params): six [U, C] tables, gathered to [B, 1 or L, C]
        # (`m[t_index]`) only where used and per token chunk, so per-token t never holds [B, L, 6, C] at once.
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation[0] + e0).unbind(1)

        # norm1 returns x's dtype: at block 0 under autocast that rounds to bf16 before the fp32 modulation.
        # `.float()` of norm1's output is a fresh tensor in every dtype regime, so it is modulated in place.
        a = modulate_(self.norm1(x).float(), 1 + scale_sa, shift_sa, t_index)
        a = _autocast_input(a)  # the fp32 `a` is dead once cast: q, k and v all project this copy
        y = self.self_attn(a, a, rope)
        del a
        x = gated_residual(x, y, gate_sa, t_index)  # fp32 from here on (bf16/fp32 + fp32), owned by this block
        del y
        x += self.cross_attn(x, context, x_norm=self.norm3)
        self._ffn_(x, scale_ff, shift_ff, gate_ff, t_index)
        return x

    def _ffn_(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        gate: torch.Tensor,
        t_index: torch.Tensor,
    ) -> None:
        """x += ffn(norm2(x) · (1 + scale) + shift) · gate in place, over `ffn_chunk_tokens` tokens at a time."""
        length = x.shape[1]
        chunk = self.ffn_chunk_tokens
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise InputError(f"DiTBlock.ffn_chunk_tokens={chunk!r}: must be a positive int or None")
        step = length if chunk is None else min(chunk, length)
        linear1, gelu, linear2 = self.ffn
        scale1 = 1 + scale
        for s in range(0, length, step):
            xs, rows = x[:, s : s + step], token_rows(t_index, s, s + step)  # [B, n, C] view of the residual
            b = _autocast_input(modulate_(self.norm2(xs).float(), scale1, shift, rows))
            h = linear1(b)  # [B, n, ffn_dim]
            del b
            h = torch.ops.aten.gelu_(h, approximate=gelu.approximate)  # same kernel as GELU, without a copy
            y = linear2(h)
            del h
            add_gated_(xs, y, gate, rows)
            del y


class Head(nn.Module):
    """Output head: LayerNorm modulated by the time embedding e (not e0), then Linear to patch features."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [U, C] fp32, t_index [B, 1 or L] -> [B, L, prod(patch)·out_dim] fp32.

        As the blocks: the modulation stays a [U, C] table gathered per token chunk, and the norm output (a fresh
        fp32 tensor) is modulated in place, so per-token timesteps never hold [B, L, C] shift and scale copies.
        """
        with _fp32_region(x.device.type):
            shift, scale = (self.modulation[0].float() + e.unsqueeze(1)).unbind(1)  # [U, C] each
            return fp32_linear(self.head, modulate_(self.norm(x).float(), 1 + scale, shift, t_index))


# ------------------------------------------------------------------------------------------------------ model


class WanDiT(nn.Module):
    """Wan2.2 DiT with the official state-dict keys; `blocks` are the repeated part a memory layer streams."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | list[torch.Tensor],
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for a batch of latents.

        x: [B, C_lat, T, H, W] (C_lat = in_dim, or in_dim - y channels for i2v); T, H, W divisible by patch.
        t: [B] timestep per sample or [B, L] per token (TI2V image-to-video), integer-valued, on x's device.
        context: B tensors [L_i <= text_len, text_dim] (zero-padded here; cross-attention is unmasked) or an
        already padded [B, text_len, text_dim]. y: [B, in_dim - C_lat, T, H, W], i2v only.
        Returns [B, out_dim, T, H, W] float32.
        """
        x = self._check_latent(x, y)
        batch = x.shape[0]
        x = self.patch_embedding(x)  # [B, C, F', H', W']
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, L, C], token order f, h, w
        e, e0, t_index = self._time_conditioning(t, batch, x.shape[1])
        context = self.text_embedding(self._pad_context(context, batch))  # [B, text_len, C]
        rope = rope_table(grid, self.cfg.head_dim, x.device)
        for block in self.blocks:
            x = block(x, e0, context, rope, t_index)
        return self._unpatchify(self.head(x, e, t_index), grid)

    def _check_latent(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Validate x (and y) and return the model input [B, in_dim, T, H, W]."""
        cfg = self.cfg
        if x.dim() != 5:
            raise InputError(f"latent x has shape {tuple(x.shape)}; expected [B, C, T, H, W]")
        if cfg.model_type == "i2v":
            if y is None:
                raise InputError("an i2v DiT needs the conditioning tensor y (mask + image latent)")
            if y.dim() != 5 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise InputError(
                    f"y has shape {tuple(y.shape)}; expected [B, C_y, T, H, W] matching x {tuple(x.shape)}"
                )
            x = torch.cat([x, y], dim=1)  # noisy latent first, then y
        elif y is not None:
            raise InputError(f"a {cfg.model_type} DiT takes no conditioning tensor y (only i2v does)")
        if x.shape[1] != cfg.in_dim:
            raise InputError(f"the DiT input has {x.shape[1]} channels (latent + y); the model expects {cfg.in_dim}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise InputError(f"latent T, H, W {tuple(x.shape[2:])} must be divisible by patch size {cfg.patch_size}")
        return x

    def _time_conditioning(
        self, t: torch.Tensor, batch: int, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """e [U, C] and e0 [U, 6, C] (fp32) for the U distinct timesteps, and t_index [B, 1] or [B, L]."""
        if t.shape not in ((batch,), (batch, num_tokens)):
            raise InputError(f"timesteps t have shape {tuple(t.shape)}; expected [{batch}] or [{batch}, {num_tokens}]")
        shared = shared_timestep(t)
        t = t if shared is None else shared
        values, t_index = torch.unique(t, return_inverse=True)
        if t_index.dim() == 1:
            t_index = t_index[:, None]  # one timestep per sample: broadcast over tokens
        emb, proj = self.time_embedding, self.time_projection
        with _fp32_region(values.device.type):
            e = fp32_linear(emb[0], sinusoidal_embedding(values, self.cfg.freq_dim).float())
            e = fp32_linear(emb[2], F.silu(e))
            e0 = fp32_linear(proj[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0, t_index

    def _pad_context(self, context: torch.Tensor | list[torch.Tensor], batch: int) -> torch.Tensor:
        """Zero-pad the text rows of each sample to text_len: [B, text_len, text_dim]."""
        cfg = self.cfg
        if isinstance(context, torch.Tensor):
            if context.shape != (batch, cfg.text_len, cfg.text_dim):
                raise InputError(
                    f"context tensor has shape {tuple(context.shape)}; expected [{batch}, {cfg.text_len}, "
                    f"{cfg.text_dim}] (or a list of [L_i, {cfg.text_dim}] tensors)"
                )
            return context
        if len(context) != batch:
            raise InputError(f"got {len(context)} context tensors for a batch of {batch}")
        for u in context:
            if u.dim() != 2 or u.shape[0] > cfg.text_len or u.shape[1] != cfg.text_dim:
                raise InputError(f"context of shape {tuple(u.shape)}; expected [L <= {cfg.text_len}, {cfg.text_dim}]")
        padded = context[0].new_zeros(batch, cfg.text_len, cfg.text_dim)
        for i, u in enumerate(context):
            padded[i, : u.shape[0]] = u
        return padded

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """[B, L, pt·ph·pw·out_dim] with features ordered (pt, ph, pw, c) -> [B, out_dim, T, H, W] float32."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw).float()
