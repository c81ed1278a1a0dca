"""What the browser may fetch, asked the way browsers and attackers ask: the real app (`python app.py`) on a free
127.0.0.1 port with its own home folder, plain HTTP requests on Gradio's file routes and the Settings tab's save
endpoint called through gradio_client. The queue's database, the settings and system files are refused before
and after any settings save; a real output video is served; an output folder that would expose more is refused
with the reason; changing the output folder replaces what is served. The policy itself (ui.served) is also
checked directly, without a server. --listen refuses to start without a password, and with one every request
needs it. The app starts once for the module (about 15 s on 2 busy cores: `slow`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from running_app import REPO_ROOT, app_env, free_port, running_app

from ui.served import PrivatePaths, ServedFiles, file_route_target, output_folder_refusal
from wan_local.specs import TASKS
from wan_local.video import save_video

FILE_ROUTES = ("/gradio_api/file=", "/file=", "/gradio_api/file/")


def fetch(url: str, data: bytes | None = None, content_type: str = "application/json") -> tuple[int, bytes]:
    """(HTTP status, body) of a GET (or a POST of `data`), errors included."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def write_video(path: Path) -> Path:
    """A real MP4 of ours: 5 frames of 64×48 with the settings embedded."""
    video = torch.linspace(-1, 1, 3 * 5 * 48 * 64).reshape(3, 5, 48, 64)
    return save_video(video, path, 16, {"prompt": "a red fox in snow", "seed": 7, "task": "t2v-A14B"})


# ------------------------------------------------------------------------------------------------ the policy


@pytest.fixture
def private(tmp_path) -> PrivatePaths:
    """An app installed as usual under a user's home: data in ~/.local/share, settings in ~/.config."""
    user = tmp_path.resolve() / "user"
    data, config, cache = user / ".local/share/wan-local", user / ".config/wan-local", user / ".cache/wan-local"
    return PrivatePaths(data, data / "jobs.sqlite3", config / "settings.json", (config, cache), user)


@pytest.mark.parametrize(
    ("folder", "reason"),
    [
        ("/", "root of the file system"),
        ("user", "home folder"),
        (".", "home folder"),  # a folder holding the home
        ("user/.local", "job queue's folder"),
        ("user/.local/share/wan-local", "job queue's folder"),
        ("user/.config", "settings file"),
        ("user/.config/wan-local/videos", "wan-local's own folder"),
        ("user/.cache/wan-local", "wan-local's own folder"),
        ("user/.ssh", "hidden folder of your home (.ssh)"),
    ],
)
def test_output_folders_that_would_expose_more_are_refused_with_the_reason(private, tmp_path, folder, reason):
    refusal = output_folder_refusal(tmp_path / folder, private)
    assert refusal is not None and reason in refusal, refusal


def test_a_folder_for_videos_may_be_served(private, tmp_path):
    for folder in ("user/Videos", "user/.local/share/wan-local/outputs", "elsewhere/videos"):
        assert output_folder_refusal(tmp_path / folder, private) is None, folder
    link = tmp_path / "user" / "Videos" / "link"  # a symlink is judged by where it leads
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "user")
    assert "home folder" in output_folder_refusal(link, private)


def test_the_served_folders_are_rebuilt_not_extended_and_state_files_are_never_served(private, tmp_path):
    previews, old, new = private.data_dir / "previews", tmp_path / "old", tmp_path / "new"
    for folder in (previews, old, new):
        folder.mkdir(parents=True)
    served = ServedFiles(private, previews)
    lists = served.allowed_paths
    assert served.rebuild(old) is None and served.serves(old / "a.mp4") and served.serves(previews / "p.png")
    clip = write_video(tmp_path / "kept" / "clip.mp4")
    assert served.show(clip) and served.serves(clip)  # a gallery video of an earlier folder: that file only
    assert not served.serves(clip.parent / "other.mp4")
    assert served.rebuild(new) is None
    assert not served.serves(old / "a.mp4") and not served.serves(clip) and served.serves(new / "a.mp4")
    assert served.allowed_paths is lists and lists == [str(new.resolve()), str(previews.resolve())]
    assert "root" in served.rebuild("/") and served.allowed_paths == [str(previews.resolve())]
    private.database.write_bytes(b"SQLite")
    private.settings_file.parent.mkdir(parents=True)
    private.settings_file.write_text("{}")
    for state in (private.database, private.settings_file):
        assert not served.show(state) and not served.serves(state, also=[state.parent])
    assert not served.serves(str(private.database) + "-wal", also=[private.data_dir])
    assert str(private.database) in served.blocked_paths and str(private.settings_file) in served.blocked_paths


def test_only_the_file_routes_are_guarded():
    assert file_route_target({"path": "/gradio_api/file=/etc/passwd"}) == "/etc/passwd"
    assert file_route_target({"path": "/file//etc/passwd"}) == "/etc/passwd"
    assert file_route_target({"path": "/app/gradio_api/file=x.mp4", "root_path": "/app"}) == "x.mp4"
    assert file_route_target({"path": "/gradio_api/info"}) is None and file_route_target({"path": "/"}) is None


# ------------------------------------------------------------------------------------------------ the real app


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app (no worker) on a free port with a fresh home holding one finished video in <home>/outputs."""
    root = tmp_path_factory.mktemp("served")
    home = root / "home"
    video = write_video(home / "outputs" / "fox.mp4")
    port = free_port()
    with running_app(["--home", str(home), "--no-worker"], root / "app.log", app_env(), port):
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", home=home, video=video, root=root)


def secrets(home: Path) -> list[str]:
    """What must never come back: system files, the queue's database (and its WAL) and the settings."""
    return ["/etc/passwd", str(home / "jobs.sqlite3"), str(home / "jobs.sqlite3-wal"), str(home / "settings.json")]


def assert_refused(app, paths: list[str]) -> None:
    for path in paths:
        for route in FILE_ROUTES:
            status, body = fetch(f"{app.url}{route}{path}")
            assert status in (403, 404), f"{route}{path} answered {status}: {body[:100]!r}"  # 404: no such route


def save_settings(client, output_dir: str) -> str:
    """The Settings tab's save, called through the API as any client can."""
    return client.predict(output_dir, *[""] * len(TASKS), "auto", 7860, False, api_name="/save_settings")


def test_state_and_system_files_are_refused_and_a_video_is_served(app):
    assert (app.home / "jobs.sqlite3").is_file() and (app.home / "settings.json").exists() is False
    (app.home / "settings.json").write_text("{}")  # present, so a 403 is the policy and not a missing file
    assert_refused(app, secrets(app.home))
    assert fetch(f"{app.url}/gradio_api/file={app.video}") == (200, app.video.read_bytes())
    assert fetch(f"{app.url}/gradio_api/file=https://example.com/")[0] == 403  # no fetching on our behalf


def test_settings_saved_through_the_api_never_expose_more(app):
    from gradio_client import Client

    client = Client(app.url + "/", verbose=False)
    refused = {"/": "root of the file system", str(app.home): "job queue's folder", str(Path.home()): "home folder",
               str(app.home / "config"): "wan-local's own folder", "~/.ssh": "hidden folder"}  # fmt: skip
    for folder, reason in refused.items():
        message = save_settings(client, folder)
        assert message.startswith("✗") and reason in message, (folder, message)
        assert_refused(app, secrets(app.home))
    assert "output_dir" not in json.loads((app.home / "settings.json").read_text())  # nothing refused was saved
    elsewhere = write_video(app.root / "videos" / "wolf.mp4")
    assert save_settings(client, str(elsewhere.parent)).startswith("✓ Saved")
    assert json.loads((app.home / "settings.json").read_text())["output_dir"] == str(elsewhere.parent)
    assert fetch(f"{app.url}/gradio_api/file={elsewhere}")[0] == 200
    assert fetch(f"{app.url}/gradio_api/file={app.video}")[0] == 403  # the old folder is not served any more
    assert_refused(app, secrets(app.home))
    assert save_settings(client, "").startswith("✓ Saved")  # back to <home>/outputs
    assert fetch(f"{app.url}/gradio_api/file={app.video}")[0] == 200
    assert fetch(f"{app.url}/gradio_api/file={elsewhere}")[0] == 403


# ------------------------------------------------------------------------------------------------ --listen


def test_listen_without_a_password_refuses_to_start_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "app.py", "--listen", "--no-browser", "--no-worker", "--home", str(tmp_path)],
        cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "--listen needs a password: set WAN_LOCAL_PASSWORD=<password> or add --new-password" in errors[0]
    help_text = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "WAN_LOCAL_PASSWORD" in help_text and "--new-password" in help_text


def test_the_network_needs_a_password_and_the_lan_setting_without_one_stays_local(caplog):
    spec = importlib.util.spec_from_file_location("wan_local_app", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    parse = app.build_parser().parse_args
    assert app.network_access(parse([]), False, {"WAN_LOCAL_PASSWORD": "pw"}) == ("127.0.0.1", None)
    assert app.network_access(parse(["--listen"]), False, {"WAN_LOCAL_PASSWORD": "pw"}) == ("0.0.0.0", ("wan", "pw"))
    with pytest.raises(ValueError, match="--listen needs a password"):
        app.network_access(parse(["--listen"]), False, {})
    assert app.network_access(parse([]), True, {}) == ("127.0.0.1", None)
    assert "LAN access is on in the settings but no password is set" in caplog.text
    host, (user, password) = app.network_access(parse(["--new-password", "--user", "me"]), True, {})
    assert host == "0.0.0.0" and user == "me" and len(password) >= 16 and password in caplog.text


def test_listen_with_a_password_asks_every_request_for_it(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    home = tmp_path / "home"
    video = write_video(home / "outputs" / "fox.mp4")
    port = free_port()
    env = app_env(WAN_LOCAL_PASSWORD="correct horse")
    with running_app(["--listen", "--home", str(home), "--no-worker"], tmp_path / "app.log", env, port):
        url = f"http://127.0.0.1:{port}"
        assert fetch(f"{url}/config")[0] == 401
        assert fetch(f"{url}/gradio_api/file={video}")[0] == 401
        assert fetch(f"{url}/gradio_api/file=/etc/passwd")[0] == 403
        assert fetch(f"{url}/gradio_api/call/save_settings", data=b'{"data": ["/"]}')[0] == 401
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url + "/", verbose=False)
        assert fetch(f"{url}/login", b"username=wan&password=wrong", "application/x-www-form-urlencoded")[0] == 400
        client = Client(url + "/", auth=("wan", "correct horse"), verbose=False)
        assert save_settings(client, "/").startswith("✗ The output folder / is not allowed")
    assert "anyone with the password" in (tmp_path / "app.log").read_text()
