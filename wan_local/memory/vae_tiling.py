"""Spatially tiled VAE decode / encode, and the working-memory estimate that sizes the tiles.

Why tiles: the Wan VAEs decode one latent frame at a time, but every chunk still runs at full resolution, and the
causal caches (2 frames of every cached conv's input) are full-resolution too. Traced at 720p, one untiled decode
chunk peaks at ~16 GiB of activations + caches for the Wan2.1 VAE (1280x720) and ~13.7 GiB for the Wan2.2 VAE
(1280x704), on top of the weights (0.47 / 2.6 GiB). Both scale with the tile area, so a spatial tile of a quarter
of the frame needs about a quarter of that.

How: the latent is cut into a grid of overlapping spatial tiles. Each tile is decoded through ALL latent frames
with its own `FeatureCache` (temporal chunking is native to the causal VAE, so there are no temporal seams and
every tile sees exactly the chunk sequence of an untiled decode). Overlaps are blended with separable linear ramps
whose weights sum to exactly 1 at every pixel, and the result is accumulated into one preallocated output
(`output_device`, CPU by default, so the full video never has to fit on the GPU).

Tile order: tiles outer, frames inner. Only one tile's cache is alive at a time, so the peak is one tile's
activations + one tile's cache. The other order (frames outer, tiles inner) must keep every tile's cache alive
between frames: together they are as large as the untiled cache (8.1 GiB for Wan2.1 at 720p, 6.0 GiB for Wan2.2),
which is half of what tiling is meant to save. Its only advantage, emitting finished frames early for streaming,
is not needed: the pipeline writes the video after the decode.

Estimate: `decode_bytes_estimate` runs the real decoder code on the meta device (shapes only, no memory, ~0.2 s at
full size) under `live_bytes.LiveStorageTracker`, which tracks every tensor storage the ops create and when it
dies; the estimate is the largest total of live storages over three chunks (the third is the steady state: caches
full, 4 frames out).
It equals the same tracker run on real CPU tensors (tests/test_vae_tiling.py) and is what a non-caching allocator
needs: the peak RSS growth of a warm CPU decode was 0.7-1.2x estimate + output, a cold first decode adds ~0.2-0.35
GB of one-off runtime memory (benchmarks/bench_vae.py). The CUDA caching allocator and cuDNN workspaces add some on
top, covered by `DEFAULT_HEADROOM` in `choose_tile` (uncalibrated on a GPU so far: the CUDA part of the benchmark
reports the ratio).
Mid-block attention is counted with its full [HW, HW] score matrix (the math path), which over-states memory when
CUDA picks a fused kernel: a safe error.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from wan_local.errors import InputError
from wan_local.memory.live_bytes import LiveStorageTracker
from wan_local.models.vae21 import VAE21Config, WanVAE21
from wan_local.models.vae22 import VAE22Config, WanVAE22
from wan_local.models.vae_blocks import CausalVideoVAE, FeatureCache

logger = logging.getLogger(__name__)

VAEConfig = VAE21Config | VAE22Config
#: Multiplier applied to the traced peak when checking it against free VRAM (caching allocator, cuDNN workspace).
DEFAULT_HEADROOM = 1.25
#: Smallest tile side (latent positions) `choose_tile` will propose.
MIN_TILE = 8
#: Chunks traced per estimate: the first (1 frame out), the second (zero-padded time conv), the steady state.
_TRACE_CHUNKS = 3

_KINDS: dict[str, tuple[type[CausalVideoVAE], VAEConfig]] = {
    "wan2.1": (WanVAE21, VAE21Config()),
    "wan2.2": (WanVAE22, VAE22Config()),
}


# ---------------------------------------------------------------------------------------------------- layout
def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise InputError(f"{what} must be a positive int or a (height, width) pair of them; got {value!r}")
    return pair  # type: ignore[return-value]


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end (end exclusive) of equal tiles covering [0, length), neighbours overlapping by >= `overlap`.

    One span when `tile >= length`. Otherwise n = ceil((length - overlap) / (tile - overlap)) tiles of exactly
    `tile`, starts spread evenly from 0 to length - tile, so every overlap is between `overlap` and that plus one
    stride's rounding. Requires 0 <= overlap < tile when more than one tile is needed.
    """
    if tile >= length:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise InputError(f"overlap {overlap} must be >= 0 and smaller than the tile {tile} (latent positions)")
    n = math.ceil((length - overlap) / (tile - overlap))
    room = length - tile
    starts = [(k * room + (n - 1) // 2) // (n - 1) for k in range(n)]
    return [(s, s + tile) for s in starts]


def _blend_weights_1d(spans: list[tuple[int, int]], scale: int) -> list[Tensor | None]:
    """Per span, float32 weights over its `scale`-times upsampled extent; None for a span with no neighbour.

    Each span ramps linearly up across its overlap with the previous span and down across its overlap with the
    next, then all weights are divided by their per-position sum, so they sum to exactly 1 everywhere (this also
    keeps the sum exact when a very short axis makes three spans overlap).
    """
    if len(spans) == 1:
        return [None]
    length = spans[-1][1] * scale
    ramps = []
    for k, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, dtype=torch.float64)
        if k > 0:
            a = (spans[k - 1][1] - start) * scale
            w[:a] *= torch.arange(1, a + 1, dtype=torch.float64) / (a + 1)
        if k < len(spans) - 1:
            a = (end - spans[k + 1][0]) * scale
            w[w.numel() - a :] *= torch.arange(a, 0, -1, dtype=torch.float64) / (a + 1)
        ramps.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for (start, end), w in zip(spans, ramps, strict=True):
        total[start * scale : end * scale] += w
    return [(w / total[s * scale : e * scale]).float() for (s, e), w in zip(spans, ramps, strict=True)]


class _Tile(NamedTuple):
    """One tile: its latent rows/cols, its output rows/cols (latent * scale), and its 1-D blend weights."""

    lat_y: slice
    lat_x: slice
    out_y: slice
    out_x: slice
    weight_y: Tensor | None
    weight_x: Tensor | None

    def weight(self, device: torch.device) -> Tensor | None:
        """[rows, cols] float32 blend weight on `device`, or None when the tile has no neighbour at all.

        Built per tile (not kept for all tiles): at 720p one is a few MB.
        """
        if self.weight_y is None and self.weight_x is None:
            return None
        wy = torch.ones(self.out_y.stop - self.out_y.start) if self.weight_y is None else self.weight_y
        wx = torch.ones(self.out_x.stop - self.out_x.start) if self.weight_x is None else self.weight_x
        return (wy.to(device)[:, None] * wx.to(device)[None, :]).contiguous()


def _tile_plan(hw: tuple[int, int], tile: int | Sequence[int], overlap: int, scale: int) -> list[_Tile]:
    """Every tile of an (h, w) latent, row-major; outputs are `scale` times the latent extent."""
    th, tw = _pair(tile, "tile")
    if overlap < 0:
        raise InputError(f"overlap must be >= 0 latent positions; got {overlap}")
    rows, cols = tile_spans(hw[0], th, overlap), tile_spans(hw[1], tw, overlap)
    wy, wx = _blend_weights_1d(rows, scale), _blend_weights_1d(cols, scale)
    return [
        _Tile(slice(y0, y1), slice(x0, x1), slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale), ry, rx)
        for (y0, y1), ry in zip(rows, wy, strict=True)
        for (x0, x1), rx in zip(cols, wx, strict=True)
    ]


def default_overlap(tile: int | Sequence[int]) -> int:
    """A reasonable overlap (latent positions) for `tile`: a quarter of its smaller side, at least 1.

    With the real decoders that is 64 px for a 32-position Wan2.1 tile (256 px) and 128 px for a 32-position
    Wan2.2 tile (512 px), in line with what other Wan front-ends default to (256 px tiles, 32-64 px overlap).
    """
    return max(1, min(_pair(tile, "tile")) // 4)


def _accumulate(target: Tensor, chunk: Tensor, weight: Tensor | None) -> None:
    """target += chunk * weight (or target = chunk when the region belongs to this tile alone)."""
    if weight is None:
        target.copy_(chunk)
    else:
        target.add_(chunk.float().mul_(weight).to(target.device))


def _compute_device(vae: CausalVideoVAE, device: torch.device | str | None) -> torch.device:
    return next(vae.parameters()).device if device is None else torch.device(device)


# ---------------------------------------------------------------------------------------------------- decode
@torch.no_grad()
def tiled_decode(
    vae: CausalVideoVAE,
    latent: Tensor,
    tile_latent: int | tuple[int, int],
    overlap_latent: int,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Decode a normalised latent [B, z, T, h, w] tile by tile into float32 video [B, 3, 1 + ts*(T-1), h*s, w*s].

    tile_latent: tile size in latent positions (int or (height, width)); clipped to the latent, so a tile >= (h, w)
        is one tile and gives exactly `vae.decode(latent)`.
    overlap_latent: minimum overlap of neighbouring tiles (latent positions), 0 <= overlap < tile.
    device: where the VAE runs (default: its parameters' device); latent chunks are moved there one at a time, so
        the latent may stay on the CPU.
    output_device: where the video is assembled (default CPU: 1280x704x121 float32 is 1.3 GB).
    on_progress: called with (chunks done, chunks total) after every decoded chunk.
    Output is clamped to [-1, 1] like `decode` (a convex blend of clamped tiles, clamped again for rounding).
    """
    vae._check_latent(latent)
    b, _, t, h, w = latent.shape
    ts, s = vae.temporal_stride, vae.spatial_stride
    device = _compute_device(vae, device)
    plan = _tile_plan((h, w), tile_latent, overlap_latent, s)
    out = torch.zeros(b, 3, 1 + ts * (t - 1), h * s, w * s, dtype=torch.float32, device=output_device)
    logger.info(
        "VAE decode: %d tile(s) of %s latent, overlap %d, on %s", len(plan), tile_latent, overlap_latent, device
    )
    total, done = len(plan) * t, 0
    for tile in plan:
        # One cache per tile, alive only while this tile runs (tiles outer: see the module docstring).
        cache = FeatureCache()
        weight = tile.weight(device)
        start = 0
        for i in range(t):
            z = latent[:, :, i : i + 1, tile.lat_y, tile.lat_x].to(device)
            frames = vae.decode_chunk(z, cache)  # [B, 3, n, th*s, tw*s]
            n = frames.shape[2]
            _accumulate(out[:, :, start : start + n, tile.out_y, tile.out_x], frames, weight)
            start += n
            del frames
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        del cache, weight
    if len(plan) > 1:
        out.clamp_(-1.0, 1.0)  # weights sum to 1 up to float rounding: 1 + 1e-7 must not leak out
    return out


# ---------------------------------------------------------------------------------------------------- encode
@torch.no_grad()
def tiled_encode(
    vae: CausalVideoVAE,
    video: Tensor,
    tile_latent: int | tuple[int, int],
    overlap_latent: int,
    device: torch.device | str | None = None,
    output_device: torch.device | str = "cpu",
) -> Tensor:
    """Encode video [B, 3, F, H, W] in [-1, 1] (F = ts*k + 1, H and W multiples of s) tile by tile.

    Tiles and overlaps are in latent positions (a tile covers tile*s pixels); each tile runs through all frame
    chunks with its own cache and the latent tiles are blended with the same ramps as `tiled_decode`. Returns
    float32 [B, z, 1 + (F-1)/ts, H/s, W/s] on `output_device`; one tile covering everything gives exactly
    `vae.encode(video)`.
    """
    vae._check_video(video)
    b, _, f, hp, wp = video.shape
    ts, s = vae.temporal_stride, vae.spatial_stride
    device = _compute_device(vae, device)
    plan = _tile_plan((hp // s, wp // s), tile_latent, overlap_latent, 1)
    out = torch.zeros(b, vae.z_dim, 1 + (f - 1) // ts, hp // s, wp // s, dtype=torch.float32, device=output_device)
    bounds = [(0, 1)] + [(k, k + ts) for k in range(1, f, ts)]  # frame chunks: 1, then ts at a time
    for tile in plan:
        cache = FeatureCache()
        weight = tile.weight(device)
        pix_y = slice(tile.lat_y.start * s, tile.lat_y.stop * s)
        pix_x = slice(tile.lat_x.start * s, tile.lat_x.stop * s)
        for i, (f0, f1) in enumerate(bounds):
            chunk = video[:, :, f0:f1, pix_y, pix_x].to(device)
            _accumulate(out[:, :, i : i + 1, tile.lat_y, tile.lat_x], vae.encode_chunk(chunk, cache), weight)
        del cache, weight
    return out


# ---------------------------------------------------------------------------------------------------- estimate
def resolve_kind(kind: str | VAEConfig) -> tuple[type[CausalVideoVAE], VAEConfig]:
    """(VAE class, config) of "wan2.1" / "wan2.2" or of a VAE config."""
    if isinstance(kind, VAE21Config):
        return WanVAE21, kind
    if isinstance(kind, VAE22Config):
        return WanVAE22, kind
    if kind not in _KINDS:
        raise InputError(f"unknown VAE kind {kind!r}; expected one of {sorted(_KINDS)} or a VAE config")
    return _KINDS[kind]


@functools.lru_cache(maxsize=4)
def _meta_vae(kind: str | VAEConfig) -> CausalVideoVAE:
    model_cls, cfg = resolve_kind(kind)
    with torch.device("meta"):
        return model_cls(cfg).eval()


@functools.lru_cache(maxsize=256)
def _traced_peak_bytes(kind: str | VAEConfig, mode: str, batch: int, th: int, tw: int) -> int:
    """Peak live bytes of `_TRACE_CHUNKS` decode (or encode) chunks of one [th, tw]-latent tile, run on meta."""
    vae = _meta_vae(kind)
    cache = FeatureCache()
    ts, s = vae.temporal_stride, vae.spatial_stride
    with LiveStorageTracker() as tracker, torch.no_grad():
        for i in range(_TRACE_CHUNKS):
            # decode_chunk / encode_chunk minus the latent (de)normalisation and autocast (no meta autocast); the
            # per-chunk maths is that of the protected per-chunk hooks the VAE classes define.
            if mode == "decode":
                z = torch.empty(batch, vae.z_dim, 1, th, tw, device="meta")
                result = vae._decode_features(vae.conv2(z), cache).clamp_(-1.0, 1.0)
            else:
                frames = torch.empty(batch, 3, 1 if i == 0 else ts, th * s, tw * s, device="meta")
                result = vae.conv1(vae._encode_features(frames, cache))[:, : vae.z_dim]
            cache.end_chunk()
            del result
    return tracker.peak_bytes


def _latent_hw(latent_shape: Sequence[int]) -> tuple[int, int]:
    if len(latent_shape) not in (4, 5) or any(int(v) < 1 for v in latent_shape):
        raise InputError(f"latent shape must be [B, z, T, h, w] or [z, T, h, w]; got {tuple(latent_shape)}")
    return int(latent_shape[-2]), int(latent_shape[-1])


def decode_bytes_estimate(
    kind: str | VAEConfig, latent_shape: Sequence[int], tile: int | Sequence[int] | None = None
) -> int:
    """Peak working memory (bytes) of decoding one tile: activations + that tile's causal cache, weights excluded.

    kind: "wan2.1", "wan2.2" (the released architectures) or a VAE21Config / VAE22Config.
    latent_shape: [B, z, T, h, w] (or [z, T, h, w], B = 1); T does not matter (chunks are one latent frame).
    tile: tile size in latent positions, clipped to (h, w); None = untiled. Add `decode_output_bytes` when the
    output lives on the same device, and the weights (`weight_bytes`).
    """
    h, w = _latent_hw(latent_shape)
    th, tw = (h, w) if tile is None else _pair(tile, "tile")
    batch = int(latent_shape[0]) if len(latent_shape) == 5 else 1
    return _traced_peak_bytes(kind, "decode", batch, min(th, h), min(tw, w))


def encode_bytes_estimate(
    kind: str | VAEConfig, latent_shape: Sequence[int], tile: int | Sequence[int] | None = None
) -> int:
    """Peak working memory (bytes) of encoding one tile; arguments as `decode_bytes_estimate` (latent-sized)."""
    h, w = _latent_hw(latent_shape)
    th, tw = (h, w) if tile is None else _pair(tile, "tile")
    batch = int(latent_shape[0]) if len(latent_shape) == 5 else 1
    return _traced_peak_bytes(kind, "encode", batch, min(th, h), min(tw, w))


def decode_output_bytes(kind: str | VAEConfig, latent_shape: Sequence[int]) -> int:
    """Bytes of the float32 video a decode of `latent_shape` produces ([B, 3, 1 + ts*(T-1), h*s, w*s])."""
    h, w = _latent_hw(latent_shape)
    vae = _meta_vae(kind)
    batch, t = (int(latent_shape[0]), int(latent_shape[2])) if len(latent_shape) == 5 else (1, int(latent_shape[1]))
    return 4 * batch * 3 * (1 + vae.temporal_stride * (t - 1)) * h * w * vae.spatial_stride**2


def weight_bytes(kind: str | VAEConfig) -> int:
    """Bytes of the VAE's float32 parameters (encoder and decoder)."""
    return sum(p.numel() * 4 for p in _meta_vae(kind).parameters())


def _split(length: int, count: int, overlap: int) -> int:
    """Size of `count` equal tiles covering `length` with neighbours overlapping by at least `overlap`."""
    if count <= 1:
        return length
    return min(length, math.ceil((length - overlap) / count) + overlap)


def _tile_candidates(hw: tuple[int, int], overlap: int | None, smallest: tuple[int, int]) -> list[tuple[int, int]]:
    """Tiles worth considering, best first: one per (rows, cols) count.

    Each tile is the smallest that covers the latent with that many rows and columns at the overlap the caller
    will use (`overlap`, or `default_overlap` of the tile itself, found by one fixed-point step). Rank: the
    shorter side, longest first (quality: the tiling error comes from context a tile lacks near its borders and
    from each tile's mid-block attention seeing only the tile, so thin strips are worst), then the total decoded
    area (time), then the number of tiles (seams).
    """
    h, w = hw
    ranked = {}
    for ny in range(1, max(1, h // smallest[0]) + 1):
        for nx in range(1, max(1, w // smallest[1]) + 1):
            ov = default_overlap((math.ceil(h / ny), math.ceil(w / nx))) if overlap is None else overlap
            tile = (_split(h, ny, ov), _split(w, nx, ov))
            if overlap is None:
                ov = default_overlap(tile)
                tile = (_split(h, ny, ov), _split(w, nx, ov))
            if tile[0] < smallest[0] or tile[1] < smallest[1] or tile in ranked:
                continue
            count = len(tile_spans(h, tile[0], ov)) * len(tile_spans(w, tile[1], ov))
            ranked[tile] = (-min(tile), count * tile[0] * tile[1], count)
    return sorted(ranked, key=ranked.__getitem__)


def choose_tile(
    kind: str | VAEConfig,
    latent_hw: tuple[int, int],
    free_bytes: int,
    *,
    batch: int = 1,
    overlap: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    min_tile: int = MIN_TILE,
) -> tuple[int, int]:
    """The tile (latent positions, (height, width)) to decode with in `free_bytes`: the cheapest one that fits.

    free_bytes: memory the decode may use for its working set, i.e. free VRAM after the VAE weights (and the
    output, if it is kept on the GPU). A tile fits when headroom * decode_bytes_estimate <= free_bytes.
    overlap: the overlap the decode will use; None means `default_overlap(returned tile)`, so use that.
    Returns (h, w) itself when the untiled decode fits. Otherwise, among the tiles of every rows x columns split
    (sides >= `min_tile`), the one that fits with the longest shorter side (squarish tiles: most context per
    tile), then the least total decoded area, then the fewest tiles. Raises InputError when not even a `min_tile`
    tile fits.
    """
    h, w = latent_hw
    if h < 1 or w < 1:
        raise InputError(f"latent size must be positive; got {latent_hw}")
    shape = (batch, 1, 1, h, w)

    def need(tile: tuple[int, int]) -> float:
        return headroom * decode_bytes_estimate(kind, shape, tile)

    full = need((h, w))
    if full <= free_bytes:
        return h, w
    smallest = (min(min_tile, h), min(min_tile, w))
    floor = need(smallest)
    if floor > free_bytes:
        raise InputError(
            f"{free_bytes / 2**30:.2f} GiB free is not enough to decode even a {smallest[0]}x{smallest[1]} latent "
            f"tile (needs {floor / 2**30:.2f} GiB); free VRAM or decode on the CPU"
        )
    # Activations and caches all scale with the tile area, so the need is affine in it to well under 1 %: predict
    # from the two exact points to skip hopeless candidates, and confirm the pick with an exact trace.
    per_position = (full - floor) / max(1, h * w - smallest[0] * smallest[1])
    for tile in _tile_candidates((h, w), overlap, smallest):
        predicted = floor + per_position * (tile[0] * tile[1] - smallest[0] * smallest[1])
        if predicted <= free_bytes and need(tile) <= free_bytes:
            logger.debug("choose_tile %s %s free %.2f GiB -> %s", kind, latent_hw, free_bytes / 2**30, tile)
            return tile
    return smallest
