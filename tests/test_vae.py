"""Wan2.1 / Wan2.2 VAEs against golden outputs of the official code (tiny checkpoints, float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import rel_l2

from wan_local.errors import CheckpointError, InputError
from wan_local.models.vae21 import VAE21Config, WanVAE21
from wan_local.models.vae22 import VAE22Config, WanVAE22, patchify, unpatchify
from wan_local.models.vae_blocks import FeatureCache

VAE_FILES = {"vae21": "t2v-A14B/Wan2.1_VAE.pth", "vae22": "ti2v-5B/Wan2.2_VAE.pth"}
VAE_CLASSES = {"vae21": (VAE21Config, WanVAE21), "vae22": (VAE22Config, WanVAE22)}


def _state_dict(tiny: Path, which: str) -> dict[str, torch.Tensor]:
    # Local stand-in for the project loader: the official .pth is a plain state dict.
    return torch.load(tiny / VAE_FILES[which], map_location="cpu", weights_only=True, mmap=True)


def _load(tiny: Path, which: str) -> WanVAE21 | WanVAE22:
    sd = _state_dict(tiny, which)
    config_cls, model_cls = VAE_CLASSES[which]
    cfg = config_cls.from_state_dict(sd)
    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def vae21(tiny: Path) -> WanVAE21:
    return _load(tiny, "vae21")


@pytest.fixture(scope="module")
def vae22(tiny: Path) -> WanVAE22:
    return _load(tiny, "vae22")


@pytest.fixture
def vae(request: pytest.FixtureRequest, tiny: Path) -> WanVAE21 | WanVAE22:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_encode_golden(vae: WanVAE21 | WanVAE22, golden) -> None:
    name = "vae21_encode" if isinstance(vae, WanVAE21) else "vae22_encode"
    g = golden(name)
    latent = vae.encode(g["video"][None])[0]
    assert latent.dtype == torch.float32
    err = rel_l2(latent, g["latent"])
    assert err <= 1e-5, f"{name} latent rel_l2 {err:.3e}"
    # A frames-last ([F, H, W, C] in memory) input, as decoded images often are, gives the same latent.
    frames_last = g["video"].permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    assert rel_l2(vae.encode(frames_last[None])[0], g["latent"]) <= 1e-5


@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_decode_golden(vae: WanVAE21 | WanVAE22, golden) -> None:
    name = "vae21_decode" if isinstance(vae, WanVAE21) else "vae22_decode"
    g = golden(name)
    video = vae.decode(g["latent"][None])[0]
    assert video.dtype == torch.float32
    assert video.abs().max() <= 1.0
    err = rel_l2(video, g["video"])
    assert err <= 1e-5, f"{name} video rel_l2 {err:.3e}"


@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_caller_bf16_autocast_does_not_leak(vae: WanVAE21 | WanVAE22, golden) -> None:
    # The pipeline decodes inside the DiT's bf16 autocast region; the VAE must still run in float32.
    name = "vae21_decode" if isinstance(vae, WanVAE21) else "vae22_decode"
    g = golden(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        video = vae.decode(g["latent"][None])[0]
    assert rel_l2(video, g["video"]) <= 1e-5


@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_chunked_decode_with_external_cache_matches(vae: WanVAE21 | WanVAE22, golden) -> None:
    # What a memory layer does: own the cache and call decode_chunk per latent frame.
    name = "vae21_decode" if isinstance(vae, WanVAE21) else "vae22_decode"
    latent = golden(name)["latent"][None]
    cache = FeatureCache()
    frames = [vae.decode_chunk(latent[:, :, i : i + 1], cache) for i in range(latent.shape[2])]
    assert [f.shape[2] for f in frames] == [1] + [vae.temporal_stride] * (latent.shape[2] - 1)
    assert cache.chunk_index == latent.shape[2]
    # The cache keeps a few frames per conv, not whole activations.
    assert 0 < cache.nbytes() < sum(f.numel() * f.element_size() for f in frames) * 64
    assert torch.equal(torch.cat(frames, dim=2), vae.decode(latent))
    with pytest.raises(InputError, match="one latent frame"):
        vae.decode_chunk(latent[:, :, :2], FeatureCache())


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize(
    ("model_cls", "keys", "params"),
    [(WanVAE21, 194, 126_892_531), (WanVAE22, 196, 704_688_668)],  # fact sheet §3.1 / §5.6
)
def test_full_size_state_dict_on_meta(model_cls: type, keys: int, params: int) -> None:
    with torch.device("meta"):
        model = model_cls()
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(t.numel() for t in sd.values()) == params
    assert all(t.is_meta for t in sd.values())


def test_full_size_key_shapes_match_fact_sheet() -> None:
    with torch.device("meta"):
        sd21 = WanVAE21().state_dict()
        sd22 = WanVAE22().state_dict()
    expected21 = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    expected22 = {
        "encoder.conv1.weight": (160, 12, 3, 3, 3),
        "encoder.middle.1.to_qkv.weight": (1920, 640, 1, 1),
        "encoder.head.2.weight": (96, 640, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1),
        "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "decoder.middle.1.to_qkv.weight": (3072, 1024, 1, 1),
        "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),
        "decoder.head.2.weight": (12, 256, 3, 3, 3),
    }
    for sd, expected in ((sd21, expected21), (sd22, expected22)):
        for key, shape in expected.items():
            assert tuple(sd[key].shape) == shape, key
    assert "encoder.downsamples.5.time_conv.weight" in sd21
    assert "encoder.downsamples.2.time_conv.weight" not in sd21
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in sd22
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in sd22


def test_from_state_dict_tiny(tiny: Path) -> None:
    # README: tiny base dims 4 (Wan2.1), 4 / 6 (Wan2.2 encoder / decoder); real z dims.
    assert VAE21Config.from_state_dict(_state_dict(tiny, "vae21")) == VAE21Config(base_dim=4, z_dim=16)
    assert VAE22Config.from_state_dict(_state_dict(tiny, "vae22")) == VAE22Config(
        base_dim=4, decoder_base_dim=6, z_dim=48
    )


@pytest.mark.parametrize(("config_cls", "model_cls"), [(VAE21Config, WanVAE21), (VAE22Config, WanVAE22)])
def test_from_state_dict_round_trip_full_size(config_cls: type, model_cls: type) -> None:
    with torch.device("meta"):
        sd = model_cls(config_cls()).state_dict()
    assert config_cls.from_state_dict(sd) == config_cls()


@pytest.mark.parametrize("which", ["vae21", "vae22"])
def test_from_state_dict_rejects_bad_checkpoints(tiny: Path, which: str) -> None:
    config_cls, model_cls = VAE_CLASSES[which]
    sd = dict(_state_dict(tiny, which))
    wrong = dict(sd, **{"decoder.middle.1.proj.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"decoder\.middle\.1\.proj\.bias: checkpoint \(5,\)"):
        config_cls.from_state_dict(wrong)
    with pytest.raises(CheckpointError, match=r"encoder\.conv1\.weight"):
        config_cls.from_state_dict({k: v for k, v in sd.items() if not k.startswith("encoder.conv1")})
    with pytest.raises(CheckpointError, match="latent channels"):
        config_cls.from_state_dict(dict(sd, **{"conv2.weight": torch.zeros(8, 8, 1, 1, 1)}))
    other = _state_dict(tiny, "vae22" if which == "vae21" else "vae21")
    with pytest.raises(CheckpointError):
        config_cls.from_state_dict(other)
    # Missing keys are the strict load's business (the config only needs the shape-bearing keys).
    missing = {k: v for k, v in sd.items() if k != "decoder.head.0.gamma"}
    cfg = config_cls.from_state_dict(missing)
    with torch.device("meta"):
        model = model_cls(cfg)
    with pytest.raises(RuntimeError, match=r"decoder\.head\.0\.gamma"):
        model.load_state_dict(missing, strict=True, assign=True)


@pytest.mark.parametrize("which", ["vae21", "vae22"])
def test_from_state_dict_accepts_partial_probe(tiny: Path, which: str) -> None:
    # A loader of renamed formats (diffusers) probes the config with only the shape-bearing official keys.
    config_cls = VAE_CLASSES[which][0]
    sd = _state_dict(tiny, which)
    probe = {k: sd[k] for k in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")}
    probe["encoder.conv_in.weight"] = sd["encoder.conv1.weight"]  # foreign names are ignored
    assert config_cls.from_state_dict(probe) == config_cls.from_state_dict(sd)


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
@pytest.mark.parametrize("frames", [2, 4, 6, 8])
def test_encode_rejects_frame_counts_not_4k_plus_1(vae: WanVAE21 | WanVAE22, frames: int) -> None:
    s = vae.spatial_stride
    with pytest.raises(InputError, match=f"{frames} frames"):
        vae.encode(torch.zeros(1, 3, frames, s, s))


@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_encode_rejects_bad_sizes_and_shapes(vae: WanVAE21 | WanVAE22) -> None:
    s = vae.spatial_stride
    with pytest.raises(InputError, match=f"multiples of {s}"):
        vae.encode(torch.zeros(1, 3, 1, s, s + s // 2))
    with pytest.raises(InputError, match=f"multiples of {s}"):
        vae.encode(torch.zeros(1, 3, 5, 2 * s + 4, s))
    with pytest.raises(InputError, match=r"\[B, 3, F, H, W\]"):
        vae.encode(torch.zeros(1, 4, 1, s, s))
    with pytest.raises(InputError, match=r"\[B, 3, F, H, W\]"):
        vae.encode(torch.zeros(3, 1, s, s))
    with pytest.raises(InputError, match="floating-point"):
        vae.encode(torch.zeros(1, 3, 1, s, s, dtype=torch.uint8))
    with pytest.raises(InputError, match="encode chunk 0"):
        vae.encode_chunk(torch.zeros(1, 3, 4, s, s), FeatureCache())


@pytest.mark.parametrize("vae", ["vae21", "vae22"], indirect=True)
def test_decode_rejects_wrong_latent_channels(vae: WanVAE21 | WanVAE22) -> None:
    with pytest.raises(InputError, match=f"{vae.z_dim}"):
        vae.decode(torch.zeros(1, vae.z_dim + 1, 2, 2, 2))
    with pytest.raises(InputError):
        vae.decode(torch.zeros(vae.z_dim, 2, 2, 2))


def test_strides() -> None:
    with torch.device("meta"):
        v21, v22 = WanVAE21(), WanVAE22()
    assert (v21.z_dim, v21.temporal_stride, v21.spatial_stride) == (16, 4, 8)
    assert (v22.z_dim, v22.temporal_stride, v22.spatial_stride) == (48, 4, 16)


def test_patchify_channel_order() -> None:
    # Channel c*4 + r*2 + q holds pixel (2h+q, 2w+r): the column offset r is the middle index (fact sheet §5.3).
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(1, 2, 1, 4, 6)
    p = patchify(x)
    assert p.shape == (1, 8, 1, 2, 3)
    for c in range(2):
        for r in range(2):
            for q in range(2):
                assert torch.equal(p[0, c * 4 + r * 2 + q, 0], x[0, c, 0, q::2, r::2])
    assert torch.equal(unpatchify(p), x)
