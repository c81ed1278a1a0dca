"""Wan2.2 causal video VAE (z 48, stride 4x16x16), used by TI2V-5B (fact sheet §5.3, §5.6).

Differences from Wan2.1: 2x2 pixel patchify before the encoder (12 input channels) and the inverse after the
decoder; residual down/up levels with parameter-free averaging (AvgDown) / duplicating (DupUp) shortcuts;
up-sampling convs keep the channel count; separate encoder and decoder base widths. State-dict keys are exactly
those of the official `Wan2.2_VAE.pth` (196 tensors at full size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import Tensor, nn

from wan_local.errors import CheckpointError
from wan_local.models.vae_blocks import (
    CausalConv3d,
    CausalVideoVAE,
    FeatureCache,
    MiddleBlocks,
    OutputHead,
    Resample,
    ResidualBlock,
    shape_mismatches,
)

#: Pixel patch folded into channels before encoding (3 colours -> 3 * PATCH**2 channels).
PATCH = 2

#: Per-channel latent mean / std of the Wan2.2 VAE (reference constants, §5.4).
LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def patchify(x: Tensor) -> Tensor:
    """[B, C, F, 2h, 2w] -> [B, 4C, F, h, w]; channel c*4 + r*2 + q holds pixel (2i+q, 2j+r).

    q is the row offset, r the column offset (the column offset is the MIDDLE index). This is the VAE's
    convention, not the DiT's unpatchify order.
    """
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)  # [B, C, F, h, q, w, r]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


def unpatchify(x: Tensor) -> Tensor:
    """Exact inverse of `patchify`: [B, 4C, F, h, w] -> [B, C, F, 2h, 2w]."""
    b, c4, f, h, w = x.shape
    c = c4 // (PATCH * PATCH)
    x = x.reshape(b, c, PATCH, PATCH, f, h, w)  # [B, C, r, q, F, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * PATCH, w * PATCH)


class AvgDown(nn.Module):
    """Parameter-free shortcut: fold ft x fs x fs neighbourhoods into channels, then average channel groups.

    If T is not a multiple of ft, (ft - T mod ft) zero frames are put in front (so a 1-frame first chunk is
    averaged with a zero frame). Folded channel index is ((c*ft + it)*fs + ih)*fs + iw; consecutive groups of
    in_dim*ft*fs^2/out_dim channels are averaged into out_dim channels.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        folded = in_dim * factor_t * factor_s * factor_s
        if folded % out_dim:
            raise ValueError(f"AvgDown {in_dim}->{out_dim} with factors ({factor_t}, {factor_s}) is not integral")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = folded // out_dim

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] -> [B, out_dim, ceil(T/ft), H/fs, W/fs]."""
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[2] % ft) % ft
        if pad_t:
            x = torch.cat([x.new_zeros(*x.shape[:2], pad_t, *x.shape[3:]), x], dim=2)
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs, fs, T', H', W']
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp(nn.Module):
    """Parameter-free shortcut: repeat each channel, then scatter channel groups into time and space.

    Each input channel is repeated R = out_dim*ft*fs^2/in_dim times consecutively; the channel index is read as
    (cout, it, ih, iw) and sent to frame t*ft + it, row h*fs + ih, column w*fs + iw. On the first decode chunk
    the first ft - 1 output frames are dropped.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        folded = out_dim * factor_t * factor_s * factor_s
        if folded % in_dim:
            raise ValueError(f"DupUp {in_dim}->{out_dim} with factors ({factor_t}, {factor_s}) is not integral")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = folded // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T*ft (- ft + 1 on the first chunk), H*fs, W*fs]."""
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.view(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class DownLevel(nn.Module):
    """One encoder level: `downsamples` = residual blocks (+ Resample) plus an AvgDown shortcut of the input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(dim, out_dim))
            dim = out_dim
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T', H', W'] (halved where this level down-samples)."""
        out = x
        for block in self.downsamples:
            out = block(out, cache)
        # `out` is always a fresh tensor here (residual blocks never return their input).
        return out.add_(self.avg_shortcut(x))


class UpLevel(nn.Module):
    """One decoder level: `upsamples` = residual blocks (+ Resample) plus a DupUp shortcut when it up-samples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(dim, out_dim))
            dim = out_dim
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T', H', W'] (doubled where this level up-samples)."""
        out = x
        for block in self.upsamples:
            out = block(out, cache)
        if self.avg_shortcut is not None:
            out = out.add_(self.avg_shortcut(x, first_chunk=cache.is_first_chunk))
        return out


@dataclass(frozen=True)
class VAE22Config:
    """Hyper-parameters of the Wan2.2 VAE. Defaults are the released model's.

    base_dim / decoder_base_dim: widths of the first encoder level / last decoder level; level i has
    dim*dim_mult[i]. temporal_downsample: per down-sampling level (len(dim_mult) - 1 flags).
    """

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} flags (one per down-sampling level); "
                f"got {self.temporal_downsample}"
            )
        if min(self.base_dim, self.decoder_base_dim, self.z_dim, self.num_res_blocks) < 1:
            raise ValueError(f"dims and num_res_blocks must be positive; got {self}")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VAE22Config:
        """Config of an official-layout Wan2.2 VAE state dict, read from tensor shapes.

        base_dim from `encoder.conv1.weight` [dim, 12, 3, 3, 3], decoder_base_dim from `decoder.conv1.weight`
        [dim_mult[-1]*dec_dim, z, 3, 3, 3], z_dim from `conv2.weight` [z, z, 1, 1, 1]; dim_mult / num_res_blocks /
        temporal_downsample are the reference's fixed values. Every other official key present in `sd` must have
        the shape a model of that config has (raises CheckpointError); keys that are missing or foreign are left
        to the strict load, so a partial probe with just those keys works.
        """
        default = cls()
        for key in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"):
            if key not in sd:
                raise CheckpointError(f"not a Wan2.2 VAE state dict: key {key!r} is missing")
        enc = tuple(sd["encoder.conv1.weight"].shape)
        if len(enc) != 5 or enc[1] != 3 * PATCH * PATCH:
            raise CheckpointError(
                f"encoder.conv1.weight has shape {enc}; a Wan2.2 VAE has [dim, {3 * PATCH * PATCH}, 3, 3, 3]"
            )
        dec = tuple(sd["decoder.conv1.weight"].shape)
        top = default.dim_mult[-1]
        if len(dec) != 5 or dec[0] % top:
            raise CheckpointError(f"decoder.conv1.weight has shape {dec}; expected [{top}*dec_dim, z, 3, 3, 3]")
        z = tuple(sd["conv2.weight"].shape)
        if len(z) != 5 or z[0] != z[1]:
            raise CheckpointError(f"conv2.weight has shape {z}; a Wan2.2 VAE has [z, z, 1, 1, 1]")
        cfg = replace(default, base_dim=enc[0], decoder_base_dim=dec[0] // top, z_dim=z[0])
        if z[0] != len(LATENT_MEAN):
            raise CheckpointError(
                f"conv2.weight has shape {z}: z_dim {z[0]}, but the Wan2.2 VAE has {len(LATENT_MEAN)} latent channels"
            )
        with torch.device("meta"):
            expected = WanVAE22(cfg).state_dict()
        problems = shape_mismatches(expected, sd)
        if problems:
            raise CheckpointError(f"Wan2.2 VAE tensor shapes do not fit {cfg}: " + "; ".join(problems))
        return cfg


class Encoder22(nn.Module):
    """conv1 (12 -> dim) -> DownLevels -> middle -> head (-> 2*z channels)."""

    def __init__(self, cfg: VAE22Config) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.ModuleList(
            DownLevel(
                in_dim,
                out_dim,
                cfg.num_res_blocks,
                temporal=level < last and cfg.temporal_downsample[level],
                spatial=level < last,
            )
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        )
        self.middle = MiddleBlocks(dims[-1])
        self.head = OutputHead(dims[-1], cfg.z_dim * 2)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One patchified chunk [B, 12, n, H/2, W/2] -> [B, 2z, 1, H/16, W/16]."""
        x = self.conv1(x, cache)
        for level in self.downsamples:
            x = level(x, cache)
        return self.head(self.middle(x, cache), cache)


class Decoder22(nn.Module):
    """conv1 (z -> 4*dec_dim) -> middle -> UpLevels (num_res_blocks + 1 residual blocks each) -> head (-> 12)."""

    def __init__(self, cfg: VAE22Config) -> None:
        super().__init__()
        dims = [cfg.decoder_base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = MiddleBlocks(dims[0])
        self.upsamples = nn.ModuleList(
            UpLevel(
                in_dim,
                out_dim,
                cfg.num_res_blocks + 1,
                temporal=level < last and temporal_upsample[level],
                spatial=level < last,
            )
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        )
        self.head = OutputHead(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One latent frame [B, z, 1, h, w] -> patchified [B, 12, 1 or 4, 8h, 8w] (1 on the first chunk)."""
        x = self.middle(self.conv1(x, cache), cache)
        for level in self.upsamples:
            x = level(x, cache)
        return self.head(x, cache)


class WanVAE22(CausalVideoVAE):
    """The Wan2.2 VAE: encode [B, 3, F, H, W] in [-1, 1] <-> normalised latent [B, 48, 1+(F-1)/4, H/16, W/16].

    Constructible on the meta device and loadable with `load_state_dict(sd, strict=True, assign=True)` from the
    official `Wan2.2_VAE.pth`. See `CausalVideoVAE` for encode / decode / chunked calls.
    """

    latent_mean = LATENT_MEAN
    latent_std = LATENT_STD
    patch = PATCH

    def __init__(self, cfg: VAE22Config | None = None) -> None:
        cfg = cfg or VAE22Config()
        super().__init__(cfg, Encoder22(cfg), Decoder22(cfg))

    def _encode_features(self, frames: Tensor, cache: FeatureCache) -> Tensor:
        return self.encoder(patchify(frames), cache)

    def _decode_features(self, z: Tensor, cache: FeatureCache) -> Tensor:
        return unpatchify(self.decoder(z, cache))
