"""wan-local desktop app: `python app.py` opens the UI in a browser tab at http://127.0.0.1:7860.

Flags are parsed here and only here. The app builds the settings, the job store, the worker process (a separate
process: a CUDA crash or an out-of-memory in a job never takes the UI down), measures the machine in a short
child process (so the UI process never creates a CUDA context that would hold VRAM the worker needs), and hands
all of it to `ui.build_app`. It binds to 127.0.0.1 unless --listen (or the LAN setting) asks for 0.0.0.0; there
is no public share link. Listening on the network needs a password (Gradio's login page): $WAN_LOCAL_PASSWORD, or
--new-password for one made up and shown once; --listen without one refuses to start, and the LAN setting without
one stays on this computer. The browser may fetch only the files the served-files policy (ui.served) names: the
output and previews folders, never the queue's database or the settings. Importing this module does nothing
heavy: no torch, no Gradio, no server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wan_local.jobs.supervisor import WorkerProcess  # starts or adopts the worker; light: no torch

log = logging.getLogger("wan_local.app")

PORT_ATTEMPTS = 100
PASSWORD_ENV = "WAN_LOCAL_PASSWORD"
DEFAULT_USER = "wan"
_PROBE = (
    "import dataclasses, json; from wan_local.machine import detect_machine; "
    "print(json.dumps(dataclasses.asdict(detect_machine(__import__('sys').argv[1]))))"
)


def build_parser() -> argparse.ArgumentParser:
    """The app's flags."""
    parser = argparse.ArgumentParser(
        prog="wan-local-app", description="The wan-local desktop app: a browser UI with a job queue."
    )
    parser.add_argument("--port", type=int, help="port (default: the settings' port, 7860, or the next free one)")
    parser.add_argument(
        "--listen", action="store_true",
        help=f"let other computers on the network open the app (binds 0.0.0.0); needs a password: set "
        f"${PASSWORD_ENV} or pass --new-password",
    )  # fmt: skip
    parser.add_argument(
        "--new-password", action="store_true",
        help="make up a password for network access and show it once (instead of $WAN_LOCAL_PASSWORD)",
    )  # fmt: skip
    parser.add_argument("--user", default=DEFAULT_USER, help=f"user name of the login page (default: {DEFAULT_USER})")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--home", type=Path, help="folder of the queue, videos and settings (overrides WAN_LOCAL_HOME)")
    parser.add_argument("--no-worker", action="store_true", help="do not start the worker (tests, or a separate one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    return parser


# ---------------------------------------------------------------------------------------------------- helpers


def port_is_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name != "nt":  # as the server binds: a port whose old connections linger in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str, start: int, attempts: int = PORT_ATTEMPTS) -> int:
    """The first free port from `start` on; OSError naming the range when all are taken."""
    for port in range(start, min(start + attempts, 65536)):
        if port_is_free(host, port):
            return port
    raise OSError(f"no free port from {start} to {start + attempts - 1} on {host}; pass --port")


def probe_machine(disk_path: Path, timeout_s: float = 120.0) -> Any:
    """Measure the machine (GPU, VRAM, RAM, disk) in a child process; fall back to RAM and disk only."""
    from wan_local.machine import MachineInfo

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(disk_path)], capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            if data.get("cuda_capability") is not None:
                data["cuda_capability"] = tuple(data["cuda_capability"])
            return MachineInfo(**data)
        log.warning("measuring the GPU failed (%s); continuing as if there were none", proc.stderr.strip()[-500:])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, TypeError) as exc:
        log.warning("measuring the GPU failed (%s); continuing as if there were none", exc)
    import shutil

    import psutil

    vm = psutil.virtual_memory()
    return MachineInfo(None, 0, 0, None, int(vm.total), int(vm.available), int(shutil.disk_usage(disk_path).free))


def network_access(
    args: argparse.Namespace, listen_setting: bool, environ: Mapping[str, str]
) -> tuple[str, tuple[str, str] | None]:
    """(host to bind, (user, password) of the login page or None). The network (0.0.0.0) only with a password:
    $WAN_LOCAL_PASSWORD, or a new one (--new-password, shown once). --listen without one raises ValueError with
    the line to show; the LAN setting without one stays on this computer (127.0.0.1), with a warning."""
    if not (args.listen or listen_setting):
        return "127.0.0.1", None
    password = environ.get(PASSWORD_ENV, "")
    if args.new_password:
        import secrets

        password = secrets.token_urlsafe(12)
        log.warning("network login: user %r, password %s (shown only now)", args.user, password)
    if password:
        return "0.0.0.0", (args.user, password)
    if args.listen:
        raise ValueError(f"--listen needs a password: set {PASSWORD_ENV}=<password> or add --new-password")
    log.warning("LAN access is on in the settings but no password is set (%s or --new-password): "
                "only this computer can open the app", PASSWORD_ENV)  # fmt: skip
    return "127.0.0.1", None


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app until Ctrl-C / SIGTERM; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    # No telemetry, and local requests must never go through a proxy (Gradio checks its own URL at start).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    no_proxy = [p for p in os.environ.get("NO_PROXY", "").split(",") if p]
    os.environ["NO_PROXY"] = ",".join([*no_proxy, "localhost", "127.0.0.1"])

    from wan_local.errors import WanLocalError
    from wan_local.jobs.database import DB_NAME
    from wan_local.jobs.store import JobStore
    from wan_local.models_hub import DownloadManager
    from wan_local.paths import HOME_ENV
    from wan_local.presets import load_presets
    from wan_local.settings import SettingsStore, settings_path

    home = args.home.expanduser().absolute() if args.home else None
    if home is None and os.environ.get(HOME_ENV):
        home = Path(os.environ[HOME_ENV]).expanduser().absolute()
    if home is not None:
        os.environ[HOME_ENV] = str(home)  # the worker and everything else agree on the folder
    try:
        settings = SettingsStore(settings_path(home))
        store = JobStore(home / DB_NAME if home is not None else None)
        presets = load_presets()
    except WanLocalError as exc:
        log.error("%s", exc)
        return 2
    try:
        host, login = network_access(args, settings.current.listen, os.environ)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        if args.port is not None:
            if not port_is_free(host, args.port):
                log.error("port %d is in use on %s; pick another with --port", args.port, host)
                return 2
            port = args.port
        else:
            port = find_free_port(host, settings.current.port)
    except OSError as exc:
        log.error("%s", exc)
        return 2
    if host == "0.0.0.0":
        log.warning("listening on the local network (port %d): anyone with the password can use this app", port)

    worker = None if args.no_worker else WorkerProcess(store.path, env=dict(os.environ)).start()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        machine = probe_machine(store.folder)
        log.info("machine: %s", machine.describe())
        import ui
        from ui.served import guard_middleware

        ctx = ui.build_context(
            store=store, settings=settings, machine=machine, presets=presets, worker=worker, hub=DownloadManager()
        )
        demo = ui.build_app(ctx)
        demo.queue(default_concurrency_limit=4)
        # The policy's own lists (changed in place when the settings change), its guard on every file request,
        # and no static-file worker processes (they would keep the lists as they were at launch).
        demo.launch(
            server_name=host, server_port=port, inbrowser=not args.no_browser, share=False,
            auth=login, auth_message="wan-local: the password set on the computer that runs it.",
            allowed_paths=ctx.served.allowed_paths, blocked_paths=ctx.served.blocked_paths,
            app_kwargs={"middleware": [guard_middleware(ctx.served)]}, num_workers=0,
            ssr_mode=False, theme=ui.theme(), footer_links=["gradio", "settings"], quiet=False,
        )  # fmt: skip
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if worker is not None:
            worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
