"""Building blocks shared by the Wan2.1 and Wan2.2 causal video VAEs (fact sheet §5.1, §5.2).

Both VAEs are causal in time: a clip is processed in chunks (encode: frame 0 alone, then groups of
`temporal_stride` frames; decode: one latent frame at a time) and every temporal convolution sees the last frames
of the previous chunk instead of zero padding. That state lives in an explicit `FeatureCache` object that the
caller creates per video stream and passes through every call; the modules themselves hold no per-video state,
so a memory layer can decode chunk by chunk, keep one cache per spatial tile, or drop a cache to start over.

Shapes: video tensors are [B, C, T, H, W] (channels first, then time). Everything is meant to run in float32
(the reference's VAE region); `CausalVideoVAE` disables autocast around its maths.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wan_local.errors import InputError

#: Frames a cached causal conv remembers from the previous chunk (= its temporal kernel size minus 1).
CACHE_FRAMES = 2


class _FirstChunkMarker:
    """State of an up-sampling time conv that skipped the first chunk (the reference's "Rep" marker)."""

    def __repr__(self) -> str:
        return "<first chunk seen>"


_FIRST_CHUNK_SEEN = _FirstChunkMarker()


class FeatureCache:
    """Causal state of ONE video stream through one encoder or decoder, carried from chunk to chunk.

    Holds, per cached module, the last input frames of the previous chunk (at most `CACHE_FRAMES`, always
    tensors of their own, never views of a big activation) and counts finished chunks. Create a fresh cache
    per video (and per spatial tile when tiling); never share one between an encoder and a decoder.
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Tensor | _FirstChunkMarker] = {}
        #: Number of chunks completed with this cache (0 while the first chunk runs).
        self.chunk_index = 0

    @property
    def is_first_chunk(self) -> bool:
        """True until `end_chunk` has been called once."""
        return self.chunk_index == 0

    def get(self, module: nn.Module) -> Tensor | _FirstChunkMarker | None:
        """State stored for `module` by the previous chunk, or None when it has none yet."""
        return self._state.get(module)

    def set(self, module: nn.Module, value: Tensor | _FirstChunkMarker) -> None:
        """Store `module`'s state for the next chunk."""
        self._state[module] = value

    def end_chunk(self) -> None:
        """Mark the current chunk as finished (called by the VAE after each chunk)."""
        self.chunk_index += 1

    def nbytes(self) -> int:
        """Bytes held by the cached frames (for memory accounting)."""
        return sum(v.numel() * v.element_size() for v in self._state.values() if isinstance(v, Tensor))

    def clear(self) -> None:
        """Forget everything; the next call is a first chunk again."""
        self._state.clear()
        self.chunk_index = 0


def causal_tail(x: Tensor, previous: Tensor | None) -> Tensor:
    """The frames of `x` the next chunk must see: its last CACHE_FRAMES frames, as a new tensor.

    x: [B, C, T, H, W]. When T == 1 and `previous` (the state stored by the last chunk) exists, its last frame is
    put in front, so that the next chunk still sees two real frames. The result never aliases `x`.
    """
    tail = x[:, :, -CACHE_FRAMES:].clone()
    if tail.shape[2] < CACHE_FRAMES and previous is not None:
        tail = torch.cat([previous[:, :, -1:].to(tail.device), tail], dim=2)
    return tail


class CausalConv3d(nn.Conv3d):
    """3D convolution padded causally in time: 2*p_t frames in front (cached frames first), none at the back.

    Spatial padding is symmetric zeros (p_h, p_w). Parameters are those of `nn.Conv3d` (`weight`, `bias`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        #: Frames of front padding in total (zeros and cached frames together).
        self.time_pad = 2 * pt
        self.space_pad = (ph, pw)

    def convolve(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        """Convolve [past ; x] after zero padding: max(time_pad - len(past), 0) zero frames in front.

        x: [B, C, T, H, W]; past: [B, C, Tp, H, W] real frames that precede x. Builds the padded input in one
        allocation (no cat-then-pad double copy), which matters at 720p.
        """
        past_t = 0 if past is None else past.shape[2]
        zero_t = max(self.time_pad - past_t, 0)
        ph, pw = self.space_pad
        if past_t == 0 and zero_t == 0 and ph == 0 and pw == 0:
            return super().forward(x)
        b, c, t, h, w = x.shape
        padded = x.new_zeros(b, c, zero_t + past_t + t, h + 2 * ph, w + 2 * pw)
        inner = padded[:, :, zero_t:, ph : ph + h, pw : pw + w]
        if past is not None:
            inner[:, :, :past_t].copy_(past)
        inner[:, :, past_t:].copy_(x)
        return super().forward(padded)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        """Causal conv of x [B, C, T, H, W]; with a cache, the previous chunk's frames replace front zeros.

        Convs without temporal padding (1x1x1 shortcuts) ignore the cache, as in the reference.
        """
        if cache is None or self.time_pad == 0:
            return self.convolve(x)
        past = cache.get(self)
        assert not isinstance(past, _FirstChunkMarker)
        tail = causal_tail(x, past)
        out = self.convolve(x, past)
        cache.set(self, tail)
        return out


class RMSNorm(nn.Module):
    """y = x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (no bias); channels are dim 1.

    gamma has shape [C, 1, 1, 1] for video tensors (spatial_dims=3) and [C, 1, 1] for per-frame images
    (spatial_dims=2, inside attention blocks), as in the official checkpoints.
    """

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise x [B, C, ...] over C."""
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> CausalConv3d 3^3 -> RMSNorm -> SiLU -> (dropout p=0) -> CausalConv3d 3^3, plus shortcut.

    `residual` keeps the reference's sequential indices (parameters at 0, 2, 3, 6); the shortcut is a 1x1x1
    conv when in_dim != out_dim, else the identity.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.ModuleList(
            [
                RMSNorm(in_dim),
                nn.SiLU(),
                CausalConv3d(in_dim, out_dim, 3, padding=1),
                RMSNorm(out_dim),
                nn.SiLU(),
                nn.Identity(),  # dropout slot, p = 0 in the reference
                CausalConv3d(out_dim, out_dim, 3, padding=1),
            ]
        )
        self.shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x), inplace=True), cache)
        h = conv2(F.silu(norm2(h), inplace=True), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Per-frame single-head self-attention over the H*W positions (scale 1/sqrt(C)), added to the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] -> same shape. Frames are independent, so there is no causal state."""
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))  # [BT, 3C, H, W]
        # [BT, 1, HW, 3C]; q, k, v are the channel thirds in that order.
        qkv = qkv.reshape(b * t, 1, c * 3, h * w).transpose(-1, -2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, with an optional causal x2 temporal step (modes of §5.1).

    - downsample2d: zero-pad right/bottom by 1, Conv2d 3x3 stride 2.
    - downsample3d: the same, then `time_conv` (kernel 3x1x1, stride 2) over [last frame of the previous chunk ;
      this chunk]; on the first chunk the time conv is skipped (its single frame passes through).
    - upsample2d: nearest-exact x2, Conv2d 3x3 (dim -> `out_dim`).
    - upsample3d: first `time_conv` (3x1x1, dim -> 2*dim) turns each frame into two (channel halves = frames
      2t and 2t+1), then the spatial step. Skipped on the first chunk; on the second chunk it runs with zero
      front padding; later with the cached last two input frames.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim if out_dim is None else out_dim, 3, padding=1),
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, C, T, H, W] -> [B, C', T', H*2^±1, W*2^±1] with T' = 2T / T/2 / T as the mode and chunk say."""
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _per_frame(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.resample(frames)  # [BT, C', H', W']
        return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def _double_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        state = cache.get(self)
        if state is None:
            # First chunk: no temporal up-sampling at all (1 latent frame -> 1 video frame).
            cache.set(self, _FIRST_CHUNK_SEEN)
            return x
        if isinstance(state, _FirstChunkMarker):
            # Second chunk: zero front padding, not the first chunk's features.
            tail = x[:, :, -CACHE_FRAMES:].clone()
            if tail.shape[2] < CACHE_FRAMES:
                tail = torch.cat([torch.zeros_like(tail), tail], dim=2)
            y = self.time_conv.convolve(x)
        else:
            tail = causal_tail(x, state)
            y = self.time_conv.convolve(x, state)
        cache.set(self, tail)
        b, c, t, h, w = x.shape
        # [B, 2C, T, H, W]: channels [0:C] -> frame 2t, [C:2C] -> frame 2t+1.
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)

    def _halve_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        previous = cache.get(self)
        cache.set(self, x[:, :, -1:].clone())
        if previous is None:
            return x  # first chunk passes through; its last frame feeds the next chunk
        assert isinstance(previous, Tensor)
        return self.time_conv.convolve(x, previous)  # time_pad 0: input is [previous ; x]


class MiddleBlocks(nn.ModuleList):
    """Residual -> attention -> residual at the lowest resolution (keys `middle.0`, `middle.1`, `middle.2`)."""

    def __init__(self, dim: int) -> None:
        super().__init__([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, dim, T, h, w] -> same shape."""
        res1, attn, res2 = self
        return res2(attn(res1(x, cache)), cache)


class OutputHead(nn.ModuleList):
    """RMSNorm -> SiLU -> CausalConv3d 3^3 (keys `head.0.gamma`, `head.2.weight`, `head.2.bias`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__([RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1)])

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        norm, _, conv = self
        return conv(F.silu(norm(x), inplace=True), cache)


def _latent_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean, 1/std) as float32 [1, z, 1, 1, 1] tensors on `device`; 1/std is computed in float32 as the reference.

    Built per call (z floats, once per chunk): a cache of tensors here would be global state that leaks across
    devices and tensor modes (a real CPU tensor reused under FakeTensorMode fails).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean_t, inv_std


class CausalVideoVAE(nn.Module):
    """Chunked causal encode/decode shared by both Wan VAEs (fact sheet §5.2, §5.4).

    Subclasses pass their config, encoder and decoder to `__init__` (which adds `conv1`, 1x1x1 2z -> 2z, and
    `conv2`, 1x1x1 z -> z), set the latent statistics `latent_mean` / `latent_std` (class attributes, z floats
    each) and `patch`, and define `_encode_features` / `_decode_features` (one chunk through the stacks).

    Encode: frame 0 alone, then groups of `temporal_stride` frames, one latent frame per chunk; decode: one latent
    frame per chunk -> 1 frame for the first, `temporal_stride` frames for every later one.
    """

    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()
    #: Input pixels folded into channels per side before the encoder (Wan2.2: 2; Wan2.1: 1).
    patch: int = 1

    def __init__(self, cfg, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        if cfg.z_dim != len(self.latent_mean):
            raise ValueError(
                f"the {type(self).__name__} latent statistics have {len(self.latent_mean)} channels; z_dim={cfg.z_dim}"
            )
        self.config = cfg
        self.encoder = encoder
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = decoder

    @property
    def z_dim(self) -> int:
        """Latent channels (16 for Wan2.1, 48 for Wan2.2)."""
        return self.config.z_dim

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame after the first (4)."""
        return 2 ** sum(self.config.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent position along H and W (8 for Wan2.1; 16 = 2x2 patch times 8 for Wan2.2)."""
        return self.patch * 2 ** (len(self.config.dim_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters (float32 in the reference); inputs are cast to it per chunk."""
        return self.conv1.weight.dtype

    def _encode_features(self, frames: Tensor, cache: FeatureCache) -> Tensor:
        raise NotImplementedError

    def _decode_features(self, z: Tensor, cache: FeatureCache) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- validation
    def _check_spatial(self, what: str, h: int, w: int) -> None:
        s = self.spatial_stride
        if h % s or w % s:
            raise InputError(f"{what} size {w}x{h} (WxH) is not usable: width and height must be multiples of {s}")

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise InputError(f"video must be [B, 3, F, H, W]; got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise InputError(f"video must be a floating-point tensor in [-1, 1]; got {video.dtype}")
        frames, ts = video.shape[2], self.temporal_stride
        if frames < 1 or (frames - 1) % ts:
            lower = max(1, (frames - 1) // ts * ts + 1)
            raise InputError(
                f"video has {frames} frames; the causal VAE needs {ts}k+1 frames (e.g. {lower} or {lower + ts})"
            )
        self._check_spatial("video", video.shape[3], video.shape[4])

    def _check_latent(self, latent: Tensor) -> None:
        if latent.ndim != 5 or latent.shape[1] != self.z_dim or latent.shape[2] < 1:
            raise InputError(
                f"latent must be [B, {self.z_dim}, T>=1, h, w] for this VAE; got shape {tuple(latent.shape)}"
            )
        if not latent.is_floating_point():
            raise InputError(f"latent must be a floating-point tensor; got {latent.dtype}")

    # ------------------------------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode_chunk(self, frames: Tensor, cache: FeatureCache) -> Tensor:
        """Encode one chunk of video frames into one normalised latent frame.

        frames: [B, 3, n, H, W] in [-1, 1], n = 1 for the first chunk of `cache`, `temporal_stride` afterwards.
        Returns [B, z, 1, H/s, W/s] = (mu - mean) * (1/std). Updates `cache` for the next chunk.
        """
        expected = 1 if cache.is_first_chunk else self.temporal_stride
        if frames.ndim != 5 or frames.shape[1] != 3 or frames.shape[2] != expected:
            raise InputError(
                f"encode chunk {cache.chunk_index} must be [B, 3, {expected}, H, W]; got {tuple(frames.shape)}"
            )
        self._check_spatial("video", frames.shape[3], frames.shape[4])
        with torch.autocast(frames.device.type, enabled=False):
            feats = self._encode_features(frames.to(self.dtype), cache)  # [B, 2z, 1, h, w]
            mu = self.conv1(feats)[:, : self.z_dim]
            mean, inv_std = _latent_stats(self.latent_mean, self.latent_std, mu.device)
            latent = (mu - mean) * inv_std
        cache.end_chunk()
        return latent.float()

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Encode video [B, 3, F, H, W] in [-1, 1] (F = k*temporal_stride + 1) into the normalised latent.

        Returns float32 [B, z, 1 + (F-1)/temporal_stride, H/spatial_stride, W/spatial_stride].
        """
        self._check_video(video)
        cache = FeatureCache()
        ts = self.temporal_stride
        chunks = [self.encode_chunk(video[:, :, :1], cache)]
        for start in range(1, video.shape[2], ts):
            chunks.append(self.encode_chunk(video[:, :, start : start + ts], cache))
        return torch.cat(chunks, dim=2)

    # ------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_chunk(self, latent: Tensor, cache: FeatureCache) -> Tensor:
        """Decode ONE normalised latent frame [B, z, 1, h, w] into video frames clamped to [-1, 1].

        Returns [B, 3, n, h*s, w*s] with n = 1 for the first chunk of `cache`, `temporal_stride` afterwards
        (dtype of the parameters). Updates `cache` for the next chunk.
        """
        self._check_latent(latent)
        if latent.shape[2] != 1:
            raise InputError(
                f"decode_chunk takes one latent frame; got {latent.shape[2]} (shape {tuple(latent.shape)})"
            )
        with torch.autocast(latent.device.type, enabled=False):
            mean, inv_std = _latent_stats(self.latent_mean, self.latent_std, latent.device)
            # The reference divides by the reciprocal (not multiply by std); kept for bit-compatibility.
            z = self.conv2((latent.float() / inv_std + mean).to(self.dtype))
            video = self._decode_features(z, cache).clamp_(-1.0, 1.0)
        cache.end_chunk()
        return video

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Decode a normalised latent [B, z, T, h, w] into float32 video [B, 3, 1 + ts*(T-1), h*s, w*s] in [-1, 1].

        One latent frame at a time (as the reference), written into one preallocated output tensor.
        """
        self._check_latent(latent)
        b, _, t, h, w = latent.shape
        ts, s = self.temporal_stride, self.spatial_stride
        out = torch.empty(b, 3, 1 + ts * (t - 1), h * s, w * s, dtype=torch.float32, device=latent.device)
        cache = FeatureCache()
        start = 0
        for i in range(t):
            frames = self.decode_chunk(latent[:, :, i : i + 1], cache)
            out[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
            del frames
        assert start == out.shape[2], (start, out.shape)
        return out


def shape_mismatches(expected: Mapping[str, Tensor], sd: Mapping[str, Tensor], limit: int = 8) -> list[str]:
    """Keys present in both `expected` (a meta model's state dict) and `sd` whose shapes differ, as text lines.

    Missing / unexpected keys are not reported: `sd` may be a partial probe, and the strict load reports them.
    """
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    more = [f"(+{len(wrong) - limit} more)"] if len(wrong) > limit else []
    return wrong[:limit] + more
