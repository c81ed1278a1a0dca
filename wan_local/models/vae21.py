"""Wan2.1 causal video VAE (z 16, stride 4x8x8), used by T2V-A14B and I2V-A14B (fact sheet §5.3, §5.6).

State-dict keys are exactly those of the official `Wan2.1_VAE.pth` (194 tensors at full size). The latent
statistics are hard-coded constants of the reference, not checkpoint keys.
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

#: Per-channel latent mean / std of the Wan2.1 VAE (reference constants, §5.4).
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAE21Config:
    """Hyper-parameters of the Wan2.1 VAE. Defaults are the released model's.

    base_dim: channels of the first encoder level (and last decoder level); level i has base_dim*dim_mult[i].
    temporal_downsample: per down-sampling level (len(dim_mult) - 1 flags), whether time is halved too.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} flags (one per down-sampling level); "
                f"got {self.temporal_downsample}"
            )
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(f"base_dim, z_dim and num_res_blocks must be positive; got {self}")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VAE21Config:
        """Config of an official-layout Wan2.1 VAE state dict, read from tensor shapes.

        base_dim from `encoder.conv1.weight` [dim, 3, 3, 3, 3], z_dim from `conv2.weight` [z, z, 1, 1, 1];
        dim_mult / num_res_blocks / temporal_downsample are the reference's fixed values. Every other official key
        present in `sd` must have the shape a model of that config has (raises CheckpointError); keys that are
        missing or foreign are left to the strict load, so a partial probe with just those keys works.
        """
        default = cls()
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in sd:
                raise CheckpointError(f"not a Wan2.1 VAE state dict: key {key!r} is missing")
        enc = tuple(sd["encoder.conv1.weight"].shape)
        if len(enc) != 5 or enc[1] != 3:
            raise CheckpointError(f"encoder.conv1.weight has shape {enc}; a Wan2.1 VAE has [dim, 3, 3, 3, 3]")
        z = tuple(sd["conv2.weight"].shape)
        if len(z) != 5 or z[0] != z[1]:
            raise CheckpointError(f"conv2.weight has shape {z}; a Wan2.1 VAE has [z, z, 1, 1, 1]")
        cfg = replace(default, base_dim=enc[0], z_dim=z[0])
        if z[0] != len(LATENT_MEAN):
            raise CheckpointError(
                f"conv2.weight has shape {z}: z_dim {z[0]}, but the Wan2.1 VAE has {len(LATENT_MEAN)} latent channels"
            )
        with torch.device("meta"):
            expected = WanVAE21(cfg).state_dict()
        problems = shape_mismatches(expected, sd)
        if problems:
            raise CheckpointError(f"Wan2.1 VAE tensor shapes do not fit {cfg}: " + "; ".join(problems))
        return cfg


class Encoder21(nn.Module):
    """conv1 (3 -> dim) -> flat list of residual / down-sampling blocks -> middle -> head (-> 2*z channels)."""

    def __init__(self, cfg: VAE21Config) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < last:
                mode = "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = MiddleBlocks(dims[-1])
        self.head = OutputHead(dims[-1], cfg.z_dim * 2)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One chunk [B, 3, n, H, W] -> [B, 2z, 1, H/8, W/8]."""
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return self.head(self.middle(x, cache), cache)


class Decoder21(nn.Module):
    """conv1 (z -> 4*dim) -> middle -> flat list of residual / up-sampling blocks -> head (-> 3 channels).

    Up-sampling convs halve the channels, so every level after the first starts from half its input width.
    """

    def __init__(self, cfg: VAE21Config) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = MiddleBlocks(dims[0])
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if level > 0:
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < last:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
                blocks.append(Resample(out_dim, mode, out_dim=out_dim // 2))
        self.upsamples = nn.ModuleList(blocks)
        self.head = OutputHead(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """One latent frame [B, z, 1, h, w] -> [B, 3, 1 or 4, 8h, 8w] (1 on the first chunk)."""
        x = self.middle(self.conv1(x, cache), cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head(x, cache)


class WanVAE21(CausalVideoVAE):
    """The Wan2.1 VAE: encode [B, 3, F, H, W] in [-1, 1] <-> normalised latent [B, z, 1+(F-1)/4, H/8, W/8].

    Constructible on the meta device and loadable with `load_state_dict(sd, strict=True, assign=True)` from the
    official `Wan2.1_VAE.pth`. See `CausalVideoVAE` for encode / decode / chunked calls.
    """

    latent_mean = LATENT_MEAN
    latent_std = LATENT_STD

    def __init__(self, cfg: VAE21Config | None = None) -> None:
        cfg = cfg or VAE21Config()
        super().__init__(cfg, Encoder21(cfg), Decoder21(cfg))

    def _encode_features(self, frames: Tensor, cache: FeatureCache) -> Tensor:
        return self.encoder(frames, cache)

    def _decode_features(self, z: Tensor, cache: FeatureCache) -> Tensor:
        return self.decoder(z, cache)
