"""The Models tab's backend: completeness of the tiny checkpoint folders and of incomplete copies, the size and
disk check before a download (a mocked HfApi), offline errors that say what is missing and how to get it, and a
background download (a fake snapshot_download) that becomes the task's model folder."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from wan_local.models_hub import (
    OFFICIAL_REPOS,
    DownloadError,
    DownloadManager,
    default_download_dir,
    folder_status,
    plan_download,
    present_bytes,
    repo_size,
)

GB = 1_000_000_000


def repo_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under `folder` (what the Hub would list for it)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeApi:
    """HfApi stand-in: model_info lists `files` (None sizes force the list_repo_tree fallback)."""

    def __init__(self, files: dict[str, int | None], tree: dict[str, int] | None = None, error=None) -> None:
        self.files, self.tree, self.error, self.calls = files, tree, error, []

    def model_info(self, repo_id, files_metadata=False, timeout=None):
        self.calls.append(("model_info", repo_id, files_metadata))
        if self.error is not None:
            raise self.error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=k, size=v) for k, v in self.files.items()])

    def list_repo_tree(self, repo_id, recursive=False):
        self.calls.append(("list_repo_tree", repo_id, recursive))
        folder = SimpleNamespace(path="high_noise_model", tree_id="x")  # folders carry no blob_id / size
        return [folder, *(SimpleNamespace(path=k, size=v, blob_id="b") for k, v in (self.tree or {}).items())]


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub reads it (at import) and as the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------------------------ completeness


@pytest.mark.parametrize("task", list(OFFICIAL_REPOS))
def test_tiny_fixture_folders_are_complete(tiny, task):
    status = folder_status(task, tiny / task)
    assert (status.complete, status.layout, status.folder) == (True, "official", str(tiny / task))
    assert status.message == f"Complete (official layout): {tiny / task}"


def test_incomplete_copy_names_what_is_missing_and_where_to_get_it(tiny, tmp_path):
    copy = tmp_path / "t2v"
    shutil.copytree(tiny / "t2v-A14B", copy)
    shutil.rmtree(copy / "low_noise_model")
    (copy / "Wan2.1_VAE.pth").unlink()
    status = folder_status("t2v-A14B", copy)
    assert not status.complete and status.layout is None
    assert "low_noise_model/" in status.message and "Wan2.1_VAE.pth" in status.message
    assert "Wan-AI/Wan2.2-T2V-A14B" in status.message
    # The folder of another task is not complete for this one; no folder at all says so.
    assert not folder_status("i2v-A14B", tiny / "ti2v-5B").complete
    assert folder_status("ti2v-5B", None).message.startswith("No model folder set for ti2v-5B")
    assert "does not exist" in folder_status("ti2v-5B", tmp_path / "nope").message


# ------------------------------------------------------------------------------------------------ size and disk


def test_size_is_listed_and_disk_checked_before_anything_is_fetched(tmp_path):
    files = {"high_noise_model/a.safetensors": 30 * GB, "low_noise_model/b.safetensors": 27 * GB, "README.md": 5_000}
    api = FakeApi(files)
    plan = plan_download("t2v-A14B", tmp_path / "dl", api=api, disk_free=lambda path: 40 * GB)
    assert api.calls == [("model_info", "Wan-AI/Wan2.2-T2V-A14B", True)]
    assert (plan.total_bytes, plan.present_bytes, plan.needed_bytes, plan.free_bytes) == (
        57 * GB + 5000,
        0,
        57 * GB + 5000,
        40 * GB,
    )
    assert not plan.ok
    assert plan.message.startswith("Not enough disk space for Wan-AI/Wan2.2-T2V-A14B: 57.0 GB still to fetch")
    assert "only 40.0 GB is free" in plan.message and "Free 19.1 GB" in plan.message

    # Files already complete in the folder are not counted again (a resumed download).
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "README.md").write_bytes(b"x" * 5_000)
    assert present_bytes(tmp_path / "dl", files) == 5_000
    plan = plan_download("t2v-A14B", tmp_path / "dl", api=api, disk_free=lambda path: 60 * GB)
    assert (
        plan.ok and plan.needed_bytes == 57 * GB and "5.0 kB" not in plan.message and "57.0 GB to fetch" in plan.message
    )


def test_sizes_fall_back_to_the_repository_tree():
    api = FakeApi({"a.safetensors": None}, tree={"a.safetensors": 7 * GB, "b.json": 10})
    size = repo_size("Wan-AI/Wan2.2-TI2V-5B", api)
    assert size.files == {"a.safetensors": 7 * GB, "b.json": 10} and size.total_bytes == 7 * GB + 10
    assert [c[0] for c in api.calls] == ["model_info", "list_repo_tree"]


def test_disk_refusal_stops_the_download_before_it_starts(tmp_path):
    fetched = []
    manager = DownloadManager(
        api=FakeApi({"model.safetensors": 20 * GB}), downloader=lambda *a, **k: fetched.append(a),
        disk_free=lambda path: 5 * GB,
    )  # fmt: skip
    manager.start("ti2v-5B", tmp_path / "5b")
    status = manager.wait("ti2v-5B", timeout_s=10)
    assert status.state == "refused" and "Not enough disk space" in status.message and fetched == []


# ------------------------------------------------------------------------------------------------ offline


def test_offline_size_check_says_what_is_missing_and_how_to_get_it(offline, tmp_path):
    with pytest.raises(DownloadError) as info:
        plan_download("ti2v-5B", tmp_path / "5b")  # the real HfApi, refused by offline mode before any request
    message = str(info.value)
    assert message.startswith("Cannot download Wan-AI/Wan2.2-TI2V-5B: offline mode is on (HF_HUB_OFFLINE=1")
    assert "`hf download Wan-AI/Wan2.2-TI2V-5B --local-dir Wan2.2-TI2V-5B`" in message
    assert "'Use this folder'" in message


def test_offline_download_in_the_background_names_the_missing_files(offline, tiny, tmp_path):
    target = tmp_path / "partial"
    shutil.copytree(tiny / "ti2v-5B", target)
    (target / "Wan2.2_VAE.pth").unlink()
    manager = DownloadManager(api=FakeApi(repo_files(tiny / "ti2v-5B")))  # sizes known; the real download runs
    assert manager.start("ti2v-5B", target).state == "checking"
    status = manager.wait("ti2v-5B", timeout_s=30)
    assert status.state == "failed", status
    assert "offline mode is on" in status.message and "Wan2.2_VAE.pth" in status.message
    assert "hf download Wan-AI/Wan2.2-TI2V-5B" in status.message


def test_unreachable_hub_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = FakeApi({}, error=ConnectionError("[Errno -2] Name or service not known"))
    with pytest.raises(DownloadError, match=r"huggingface.co cannot be reached: ConnectionError: \[Errno -2\]"):
        plan_download("i2v-A14B", tmp_path, api=api)


# ------------------------------------------------------------------------------------------------ download


def test_background_download_reports_progress_and_becomes_the_model_folder(tiny, tmp_path):
    source = tiny / "t2v-A14B"
    files = repo_files(source)
    release, started, done = threading.Event(), threading.Event(), []

    def fake_snapshot_download(repo_id, local_dir):
        assert repo_id == "Wan-AI/Wan2.2-T2V-A14B"
        names = list(files)
        first = names[: len(names) // 2]
        for name in first:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, Path(local_dir) / name)
        started.set()
        assert release.wait(10)
        shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return local_dir

    target = default_download_dir(tmp_path / "home", "t2v-A14B")
    assert target == tmp_path / "home" / "models" / "Wan2.2-T2V-A14B"
    manager = DownloadManager(
        api=FakeApi(files), downloader=fake_snapshot_download, disk_free=lambda path: 100 * GB,
        on_done=lambda task, folder: done.append((task, folder)),
    )  # fmt: skip
    manager.start("t2v-A14B", target)
    assert started.wait(10)
    status = manager.status("t2v-A14B")
    half = present_bytes(target, files)
    assert status.state == "downloading" and 0 < status.done_bytes == half < status.total_bytes
    assert status.describe().startswith(f"Downloading into {target}: ")
    assert manager.start("t2v-A14B", target).state == "downloading"  # a second click does not start another
    release.set()
    status = manager.wait("t2v-A14B", timeout_s=10)
    assert status.state == "done" and status.done_bytes == status.total_bytes == sum(files.values())
    assert done == [("t2v-A14B", target)] and folder_status("t2v-A14B", target).complete
