"""`python app.py` as a user starts it, for the tests that talk to the real server (end to end, served files):
a free port, waiting until it answers, and stopping it with every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(**extra: str) -> dict[str, str]:
    """The environment of an app started with --home: offline, no telemetry, no inherited WAN_LOCAL_HOME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("WAN_LOCAL_HOME", None)
    env.pop("WAN_LOCAL_PASSWORD", None)
    return {**env, **extra}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0, ok: Sequence[int] = (200,)) -> None:
    """Wait until `url` answers with a status in `ok`; fail with the app's log when it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the app did not answer at {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(
    args: Sequence[str], log: Path, env: dict[str, str], port: int, ok: Sequence[int] = (200,)
) -> Iterator[subprocess.Popen]:
    """`python app.py --port <port> --no-browser *args`, yielded once http://127.0.0.1:<port>/ answers (a status
    in `ok`); afterwards stopped with SIGTERM (then killed), and no process it started may be left running."""
    psutil = pytest.importorskip("psutil")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--no-browser", *args],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    children: list = []
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, log, ok=ok)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for child in alive:
            child.kill()
        assert not alive, f"the app left processes running: {alive}\n{log.read_text()[-2000:]}"
