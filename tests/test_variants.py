"""Downloading what fits this PC: the catalog of variants (official, Comfy-Org repackaged, QuantStack GGUF) with
the published file names, the recommendation per machine, and file-by-file downloads that are size- and disk-checked,
resume after an interruption and refuse a file whose sha256 differs from the Hub's.

No network: the Hub is a folder of files built as the published ones are keyed (`test_inventory`'s builders), listed
by a fake HfApi.get_paths_info (sizes and LFS sha256 computed from those files), and fetched by a stand-in for
hf_hub_download that behaves like it: it writes `<local_dir>/.cache/huggingface/download/<path>.incomplete`,
continues such a file where it stopped, and renames it to `<local_dir>/<path>` when complete."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from comfy_files import write_comfy_dit, write_comfy_text_encoder, write_comfy_vae
from conftest import REPO_ROOT

from wan_local.machine import GIB, MachineInfo
from wan_local.models_catalog import COMFY_REPO, KNOWN_BYTES, get_variant, recommend, variants
from wan_local.models_hub import DownloadManager, default_download_dir, folder_status
from wan_local.specs import get_task
from wan_local.variant_download import plan_variant
from wan_local.weights.inventory import HIGH, LOW, TEXT_ENCODER, VAE, scan_folder

GB = 1_000_000_000
FP8_MAX = 448.0
T5_LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
T5_FFN = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def machine(vram_gib: float, ram_gib: float) -> MachineInfo:
    gpu = "NVIDIA GeForce RTX" if vram_gib else None
    return MachineInfo(
        gpu,
        int(vram_gib * GIB),
        int(vram_gib * GIB),
        (8, 9) if gpu else None,
        int(ram_gib * GIB),
        int(ram_gib * GIB),
        10**12,
    )


# ------------------------------------------------------------------------------------------------ catalog


def test_variants_name_the_published_files_and_place_them_as_comfyui_does() -> None:
    offered = {v.key: v for v in variants("t2v-A14B")}
    assert list(offered) == [
        "official",
        "comfy-fp16",
        "comfy-fp8_scaled",
        "gguf-Q8_0",
        "gguf-Q6_K",
        "gguf-Q5_K_M",
        "gguf-Q4_K_M",
    ]
    assert offered["official"].repo_id == "Wan-AI/Wan2.2-T2V-A14B" and not offered["official"].files
    fp8 = [(f.repo_id, f.path, f.target) for f in offered["comfy-fp8_scaled"].files if not f.optional]
    assert fp8 == [
        (
            COMFY_REPO,
            "split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
            "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        ),
        (
            COMFY_REPO,
            "split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
            "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        ),
        (
            COMFY_REPO,
            "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
            "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        ),
        (COMFY_REPO, "split_files/vae/wan_2.1_vae.safetensors", "vae/wan_2.1_vae.safetensors"),
    ]
    q4 = [(f.repo_id, f.path) for f in get_variant("i2v-A14B", "gguf-Q4_K_M").files[:2]]
    assert q4 == [
        ("QuantStack/Wan2.2-I2V-A14B-GGUF", "HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf"),
        ("QuantStack/Wan2.2-I2V-A14B-GGUF", "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"),
    ]
    five = get_variant("ti2v-5B", "gguf-Q8_0").files
    assert five[0].path == "Wan2.2-TI2V-5B-Q8_0.gguf" and five[2].target == "vae/wan2.2_vae.safetensors"
    assert "comfy-fp8_scaled" not in {v.key for v in variants("ti2v-5B")}  # Comfy-Org publishes the 5B in fp16 only
    # Offline sizes are the fact sheet's: 2 x 14.3 GB experts (the fp8 UMT5's size is not in it: unknown).
    assert get_variant("t2v-A14B", "comfy-fp8_scaled").known_bytes() is None
    assert KNOWN_BYTES["wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"] == 14_300_000_000
    assert default_download_dir("/h", "t2v-A14B", "gguf-Q4_K_M") == Path("/h/models/Wan2.2-T2V-A14B-gguf-Q4_K_M")


def test_quality_lines_cite_the_committed_measurement() -> None:
    """Each variant's quality line states the DiT output error the newest bench_variant_quality result measured
    for it, or says it was not measured: the Models tab never shows a number the benchmark did not produce."""
    import json

    newest = sorted((REPO_ROOT / "benchmarks" / "results").glob("variant-quality-*.json"))[-1]
    measured = json.loads(newest.read_text())["results"]
    for variant in variants("t2v-A14B"):
        key = {"official": "bf16", "comfy-fp16": "fp16", "comfy-fp8_scaled": "fp8_scaled"}.get(variant.key, variant.key)
        result = measured[key]
        if "not_measured" in result:
            assert "not measured" in variant.quality, variant.key
        else:
            assert f"{result['dit_output_rel_l2_vs_golden']:.1e}".replace("e-0", "e-") in variant.quality, variant.key


@pytest.mark.parametrize(
    ("vram", "ram", "a14b", "five"),
    [
        (0, 32, "gguf-Q4_K_M", "gguf-Q8_0"),  # CPU
        (16, 32, "gguf-Q4_K_M", "comfy-fp16"),
        (16, 64, "comfy-fp8_scaled", "comfy-fp16"),
        (24, 32, "comfy-fp8_scaled", "comfy-fp16"),
        (24, 64, "comfy-fp8_scaled", "comfy-fp16"),
        (48, 128, "comfy-fp16", "comfy-fp16"),
        (12, 32, "gguf-Q4_K_M", "gguf-Q8_0"),
    ],
)
def test_recommendation_follows_the_machine(vram, ram, a14b, five) -> None:
    rec = recommend("t2v-A14B", machine(vram, ram), "16 GB VRAM · 32 GB RAM")
    assert rec.key == a14b
    assert rec.reason.startswith("Recommended for this PC (") and get_variant("t2v-A14B", a14b).label in rec.reason
    assert "preset '16 GB VRAM · 32 GB RAM'" in rec.reason
    assert recommend("ti2v-5B", machine(vram, ram)).key == five


# ------------------------------------------------------------------------------------------------ a Hub on disk


@pytest.fixture(scope="module")
def hub(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<hub>/<owner>/<repo>/<path>: the files of t2v-A14B's comfy-fp8_scaled variant."""
    root = tmp_path_factory.mktemp("hub")
    comfy = root / COMFY_REPO / "split_files"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (comfy / sub).mkdir(parents=True)
    t2v = tiny / "t2v-A14B"
    for expert in ("high", "low"):
        path = comfy / "diffusion_models" / f"wan2.2_t2v_{expert}_noise_14B_fp8_scaled.safetensors"
        write_comfy_dit(path, t2v / f"{expert}_noise_model", "fp8_scaled")
    write_comfy_text_encoder(comfy / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tiny, "fp8_scaled")
    write_comfy_vae(comfy / "vae" / "wan_2.1_vae.safetensors", t2v / "Wan2.1_VAE.pth")
    return root


class HubApi:
    """HfApi.get_paths_info over `root`: size, and LFS sha256 for .safetensors files (`wrong_sha` overrides)."""

    def __init__(self, root: Path, wrong_sha: dict[str, str] | None = None) -> None:
        self.root, self.wrong_sha, self.calls = root, wrong_sha or {}, []

    def get_paths_info(self, repo_id, paths, expand=False):
        self.calls.append((repo_id, tuple(paths), expand))
        out = []
        for p in paths:
            f = self.root / repo_id / p
            if f.is_file():
                lfs = None
                if f.suffix == ".safetensors":
                    lfs = SimpleNamespace(
                        sha256=self.wrong_sha.get(p, hashlib.sha256(f.read_bytes()).hexdigest()), size=f.stat().st_size
                    )
                out.append(SimpleNamespace(path=p, size=f.stat().st_size, lfs=lfs))
        return out


class HubDownload:
    """hf_hub_download's local_dir behaviour over `root`; `fail_after` bytes of one call raise ConnectionError."""

    def __init__(self, root: Path, fail_after: int | None = None) -> None:
        self.root, self.fail_after, self.calls = root, fail_after, []

    def __call__(self, repo_id, filename, local_dir):
        source = self.root / repo_id / filename
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        offset = partial.stat().st_size if partial.exists() else 0
        self.calls.append((repo_id, filename, offset))
        data = source.read_bytes()
        end = len(data)
        if self.fail_after is not None:
            end, self.fail_after = min(end, offset + self.fail_after), None
        with open(partial, "ab") as f:
            f.write(data[offset:end])
        if end < len(data):
            raise ConnectionError("Connection reset by peer")
        final = Path(local_dir) / filename
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(final)
        return str(final)


def test_plan_lists_sizes_and_refuses_when_the_disk_is_short(hub: Path, tmp_path: Path) -> None:
    variant = get_variant("t2v-A14B", "comfy-fp8_scaled")
    api = HubApi(hub)
    plan, listed = plan_variant(variant, tmp_path / "dl", api=api, disk_free=lambda p: 100 * GB)
    sizes = {f.target: (hub / f.repo_id / f.path).stat().st_size for f in listed}
    assert plan.ok and plan.files == sizes and plan.total_bytes == sum(sizes.values()) and len(sizes) == 4
    assert {c[0] for c in api.calls} == {COMFY_REPO} and all(c[2] for c in api.calls)
    assert all(f.sha256 for f in listed if f.target.endswith(".safetensors"))
    plan, _ = plan_variant(variant, tmp_path / "dl", api=api, disk_free=lambda p: 1000, margin_bytes=0)
    assert not plan.ok and plan.message.startswith("Not enough disk space for Comfy-Org fp8_scaled for t2v-A14B")


def test_download_resumes_after_an_interruption_and_becomes_a_complete_folder(hub: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "t2v-fp8"
    done = []
    first = HubDownload(hub, fail_after=50_000)
    manager = DownloadManager(
        api=HubApi(hub), file_downloader=first, disk_free=lambda p: 100 * GB, on_done=lambda t, f: done.append(f)
    )
    manager.start("t2v-A14B", target, "comfy-fp8_scaled")
    status = manager.wait("t2v-A14B", timeout_s=30)
    assert status.state == "failed" and "huggingface.co cannot be reached: ConnectionError" in status.message
    assert "press Download again later (it resumes)" in status.message and done == []
    high = "split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    assert first.calls == [(COMFY_REPO, high, 0)]

    second = HubDownload(hub)
    manager = DownloadManager(
        api=HubApi(hub), file_downloader=second, disk_free=lambda p: 100 * GB, on_done=lambda t, f: done.append(f)
    )
    manager.start("t2v-A14B", target, "comfy-fp8_scaled")
    status = manager.wait("t2v-A14B", timeout_s=30)
    assert status.state == "done", status.message
    assert second.calls[0] == (COMFY_REPO, high, 50_000)  # continued where the first one stopped
    assert done == [target] and folder_status("t2v-A14B", target).complete
    roles = {f.name(target): f.role for f in scan_folder(target)}
    assert roles["diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"] == HIGH
    assert roles["diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"] == LOW
    assert roles["text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"] == TEXT_ENCODER
    assert roles["vae/wan_2.1_vae.safetensors"] == VAE
    assert not (target / "split_files").exists()
    for f in get_variant("t2v-A14B", "comfy-fp8_scaled").files:
        assert (target / f.target).read_bytes() == (hub / f.repo_id / f.path).read_bytes()

    third = HubDownload(hub)  # everything in place: nothing is fetched again
    manager = DownloadManager(api=HubApi(hub), file_downloader=third, disk_free=lambda p: 100 * GB)
    manager.start("t2v-A14B", target, "comfy-fp8_scaled")
    assert manager.wait("t2v-A14B", timeout_s=30).state == "done" and third.calls == []


def test_a_file_whose_sha256_differs_from_the_hubs_is_refused_and_deleted(hub: Path, tmp_path: Path) -> None:
    vae = "split_files/vae/wan_2.1_vae.safetensors"
    api = HubApi(hub, wrong_sha={vae: "0" * 64})
    target = tmp_path / "dl"
    manager = DownloadManager(api=api, file_downloader=HubDownload(hub), disk_free=lambda p: 100 * GB)
    manager.start("t2v-A14B", target, "comfy-fp8_scaled")
    status = manager.wait("t2v-A14B", timeout_s=30)
    real = hashlib.sha256((hub / COMFY_REPO / vae).read_bytes()).hexdigest()
    assert status.state == "failed"
    assert status.message == (
        f"vae/wan_2.1_vae.safetensors is damaged: its sha256 is {real[:16]}…, but the Hub lists {'0' * 16}… for "
        f"{COMFY_REPO}/{vae}. The file was deleted; press Download again to fetch it anew."
    )
    assert not (target / "vae" / "wan_2.1_vae.safetensors").exists() and not (target / vae).exists()
    assert (target / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors").is_file()  # kept


def test_a_required_file_the_hub_does_not_list_is_named(hub: Path, tmp_path: Path) -> None:
    manager = DownloadManager(api=HubApi(hub), file_downloader=HubDownload(hub), disk_free=lambda p: 100 * GB)
    manager.start("i2v-A14B", tmp_path / "dl", "comfy-fp8_scaled")  # the fake Hub holds only t2v files
    status = manager.wait("i2v-A14B", timeout_s=30)
    assert status.state == "failed" and status.message.startswith(
        f"{COMFY_REPO} does not list split_files/diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    )
    assert get_task("i2v-A14B").two_experts


def test_offline_says_how_to_get_the_files_elsewhere(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    from wan_local.models_hub import DownloadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as info:
        plan_variant(get_variant("ti2v-5B", "gguf-Q4_K_M"), tmp_path)  # the real HfApi, refused before any request
    message = str(info.value)
    assert message.startswith("Cannot download QuantStack GGUF Q4_K_M for ti2v-5B: offline mode is on")
    assert "`hf download QuantStack/Wan2.2-TI2V-5B-GGUF Wan2.2-TI2V-5B-Q4_K_M.gguf` → diffusion_models/" in message
    assert "`hf download Comfy-Org/Wan_2.2_ComfyUI_Repackaged split_files/vae/wan2.2_vae.safetensors` → vae/" in message
