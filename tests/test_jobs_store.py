"""The persistent job queue: ordering, atomic claims from several processes, edit rules, damaged and locked
databases, the `queue` commands and the latent preview."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from wan_local.errors import InputError
from wan_local.jobs import commands
from wan_local.jobs.database import StoreBusyError, StoreCorruptError, StoreError
from wan_local.jobs.store import JobSettings, JobStore, WorkerAlreadyRunning, default_store_path
from wan_local.preview import latent_to_rgb, write_preview


def _settings(tiny=None, **changes) -> JobSettings:
    ckpt = str(tiny / "t2v-A14B") if tiny is not None else "ckpt"
    base = {"task": "t2v-A14B", "ckpt_dir": ckpt, "prompt": "a fox", "size": (64, 48), "frames": 5, "steps": 2}
    return JobSettings(**{**base, **changes})


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3", busy_timeout_s=2.0)


def _add(store: JobStore, prompt: str, **changes):
    return store.add(_settings(prompt=prompt, **changes), validate=False)


def test_default_path_follows_wan_local_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_LOCAL_HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / "jobs.sqlite3"
    assert JobStore().path == tmp_path / "home" / "jobs.sqlite3"


def test_add_list_and_claim_in_queue_order(store):
    jobs = [_add(store, f"p{i}", seed=-1 if i else 7) for i in range(3)]
    assert [j.state for j in jobs] == ["queued"] * 3
    assert jobs[0].resolved_seed == 7 and jobs[1].resolved_seed >= 0  # -1 is drawn once, on add
    assert [j.id for j in store.list()] == [j.id for j in jobs]
    # Durable: a fresh store object (another process would do the same) sees everything.
    assert [j.settings for j in JobStore(store.path).list()] == [j.settings for j in jobs]

    first = store.claim_next("w1")
    assert (first.id, first.state, first.attempts, first.worker_id) == (jobs[0].id, "running", 1, "w1")
    assert first.started_at is not None
    assert store.claim_next("w1").id == jobs[1].id
    assert store.update_progress(first.id, "w1", step=1, total=2, stage="denoise", eta_seconds=3.0) is False
    assert store.get(first.id).progress.step == 1
    assert store.update_progress(first.id, "someone-else", step=2) is True  # not theirs: told to stop
    assert store.finish(first.id, "w1", "done", output_path="/out/a.mp4")
    done = store.get(first.id)
    assert (done.state, done.output_path, done.progress.step) == ("done", "/out/a.mp4", 2)
    assert not store.finish(first.id, "w1", "failed")  # only a running job of this worker can finish
    assert [j.state for j in store.list(("queued",))] == ["queued"]
    with pytest.raises(InputError, match="no job 999"):
        store.get(999)


def test_validation_and_image_copy(tiny, tmp_path, store):
    with pytest.raises(InputError, match="multiples of 16"):
        store.add(_settings(tiny, size=(60, 48)))
    with pytest.raises(InputError, match="does not exist"):
        store.add(_settings(tiny, ckpt_dir=str(tmp_path / "nowhere")))
    with pytest.raises(InputError, match="unknown memory option"):
        store.add(_settings(tiny, memory={"turbo": "on"}))
    with pytest.raises(InputError, match="quant="):
        store.add(_settings(tiny, memory={"quant": "int3"}))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InputError, match="cannot be read"):
        store.add(_settings(tiny, task="ti2v-5B", ckpt_dir=str(tiny / "ti2v-5B"), image=str(broken), size=(64, 64)))
    assert store.list() == []

    original = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(original)
    job = store.add(_settings(tiny, task="i2v-A14B", ckpt_dir=str(tiny / "i2v-A14B"), image=str(original)))
    original.unlink()  # the user deletes the original: the job keeps its own copy
    copy = store.get(job.id).settings
    assert copy.image_source == str(original)
    assert copy.image.startswith(str(store.inputs_dir)) and Image.open(copy.image).getpixel((1, 1)) == (200, 10, 10)


def test_move_edit_cancel_retry_rules(store):
    a, b, c = (_add(store, p) for p in "abc")
    assert store.move(c.id, "up") and [j.settings.prompt for j in store.list()] == ["a", "c", "b"]
    assert not store.move(a.id, "up")  # already first
    assert store.move(a.id, "down") and [j.settings.prompt for j in store.list()] == ["c", "a", "b"]
    with pytest.raises(InputError, match="up, down"):
        store.move(a.id, "sideways")

    edited = store.edit(b.id, prompt="b2", steps=3, validate=False)
    assert (edited.settings.prompt, edited.settings.steps, edited.resolved_seed) == ("b2", 3, b.resolved_seed)
    assert store.edit(b.id, seed=11, validate=False).resolved_seed == 11
    with pytest.raises(InputError, match="unknown job setting"):
        store.edit(b.id, colour="red")

    running = store.claim_next("w")
    assert running.settings.prompt == "c"
    for change in (lambda: store.edit(running.id, prompt="x"), lambda: store.move(running.id, "down")):
        with pytest.raises(InputError, match="only queued jobs"):
            change()
    with pytest.raises(InputError, match="only failed or cancelled"):
        store.retry(running.id)
    with pytest.raises(InputError, match="cancel it first"):
        store.remove(running.id)

    assert store.request_cancel(a.id).state == "cancelled"  # queued: cancelled at once
    flagged = store.request_cancel(running.id)  # running: flagged, the worker stops it
    assert (flagged.state, flagged.cancel_requested) == ("running", True)
    assert store.update_progress(running.id, "w", step=1) is True
    store.finish(running.id, "w", "cancelled", error="cancelled by the user")
    assert store.claim_next("w").id == b.id and store.finish(b.id, "w", "done")
    with pytest.raises(InputError, match="already done"):
        store.request_cancel(b.id)
    again = store.retry(running.id)
    assert (again.state, again.cancel_requested, again.error) == ("queued", False, None)
    assert store.list(("queued",))[-1].id == running.id  # retried jobs go to the back
    store.remove(a.id)
    assert a.id not in [j.id for j in store.list()]


def test_requeue_stale_puts_orphans_first(store):
    jobs = [_add(store, p) for p in "abcd"]
    store.register_worker("dead")
    store.claim_next("dead")
    store.claim_next("dead")
    # Pretend the worker was a process that no longer exists.
    conn = sqlite3.connect(store.path)
    conn.execute("UPDATE workers SET pid = 2147483646")
    conn.commit()
    conn.close()
    assert store.requeue_stale() == [jobs[0].id, jobs[1].id]
    order = store.list(("queued",))
    assert [j.id for j in order] == [j.id for j in jobs]  # back in front, in their old order
    assert "stopped during this job" in order[0].note

    store.register_worker("alive")  # this process: alive, fresh heartbeat
    live = store.claim_next("alive")
    assert store.requeue_stale() == []
    assert store.requeue_stale(time.time() + 1000, stale_after_s=60) == [live.id]  # heartbeat too old
    with pytest.raises(WorkerAlreadyRunning, match="already running"):
        store.register_worker("second")


def _add_many(path: str, tag: str, count: int) -> None:
    store = JobStore(path, busy_timeout_s=30)
    for i in range(count):
        store.add(JobSettings(task="t2v-A14B", ckpt_dir="ckpt", prompt=f"{tag}{i}"), validate=False)


def test_concurrent_adds_from_two_processes(store):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(store.path), tag, 50)) for tag in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    jobs = store.list()
    assert len(jobs) == 100
    assert len({j.id for j in jobs}) == 100 and len({j.position for j in jobs}) == 100
    assert {j.settings.prompt for j in jobs} == {f"{t}{i}" for t in "xy" for i in range(50)}
    for tag in "xy":  # each process's jobs keep their order
        mine = [int(j.settings.prompt[1:]) for j in jobs if j.settings.prompt[0] == tag]
        assert mine == list(range(50))


def test_threads_share_a_store_object(store):
    errors = []

    def add(tag):
        try:
            for i in range(10):
                _add(store, f"{tag}{i}")
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(t,)) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({j.id for j in store.list()}) == 40


def test_garbage_file_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    garbage = b"this is not a database, it is a shopping list\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreCorruptError) as info:
        JobStore(path)
    message = str(info.value)
    assert str(path) in message and "left untouched" in message and "move the file aside" in message
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.sqlite3"]


def test_damaged_pages_and_foreign_databases(tmp_path, store):
    for i in range(30):
        _add(store, "p" * 300 + str(i))
    store.close()
    data = bytearray(store.path.read_bytes())
    data[4096 * 2 : 4096 * 2 + 40] = b"\xee" * 40  # a b-tree page header
    store.path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"malformed|btree"):
        JobStore(store.path)
    assert store.path.read_bytes() == bytes(data)

    foreign = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreCorruptError, match="not a wan-local queue"):
        JobStore(foreign)
    assert foreign.read_bytes() == before

    newer = JobStore(tmp_path / "newer.sqlite3")
    with sqlite3.connect(newer.path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="newer wan-local"):
        JobStore(newer.path)


def test_locked_database_gives_a_clear_error(tmp_path, store):
    _add(store, "a")
    other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    short = JobStore(store.path, busy_timeout_s=0.2)
    assert [j.settings.prompt for j in short.list()] == ["a"]  # WAL: readers are never blocked
    start = time.monotonic()
    with pytest.raises(StoreBusyError) as info:
        _add(short, "b")
    assert 0.15 < time.monotonic() - start < 5
    assert str(store.path) in str(info.value) and "locked" in str(info.value)
    other.execute("ROLLBACK")
    _add(short, "b")  # usable again once the other program lets go
    other.close()

    # A database (still in rollback-journal mode) that another program holds exclusively cannot even be opened.
    path = tmp_path / "held.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(StoreBusyError, match=r"held\.sqlite3"):
        JobStore(path, busy_timeout_s=0.2)
    holder.execute("ROLLBACK")
    holder.close()


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="wan-local")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_queue_commands(tiny, tmp_path, capsys):
    db = str(tmp_path / "q.sqlite3")
    gen = ["--task", "t2v-A14B", "--ckpt-dir", str(tiny / "t2v-A14B"), "--size", "64*48", "--frames", "5"]
    assert _cli("queue", "add", *gen, "--prompt", "a fox", "--seed", "3", "--store", db) == 0
    owl = [*gen, "--prompt", "an owl", "--guide-scale", "3,4", "--preset", "gpu24-ram32", "--quant", "int8",
           "--vram-budget-gb", "10", "--store", db]  # fmt: skip
    with pytest.raises(InputError, match=r"Not queued: .*needs a CUDA GPU"):
        _cli("queue", "add", *owl)  # a GPU preset on this CPU-only machine: refused unless forced
    assert _cli("queue", "add", *owl, "--force") == 0
    assert _cli("queue", "cancel", "2", "--store", db) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "queued job 1 (seed 3, preset cpu)" and lines[1].startswith("queued job 2")
    assert lines[2] == "job 2: cancelled"
    assert _cli("queue", "list", "--json", "--store", db) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["state"]) for j in jobs] == [(1, "queued"), (2, "cancelled")]
    assert jobs[0]["settings"]["seed"] == 3 and jobs[0]["resolved_seed"] == 3
    assert jobs[1]["settings"]["guide_scale"] == [3.0, 4.0] and jobs[1]["settings"]["preset"] == "gpu24-ram32"
    assert jobs[1]["settings"]["memory"] == {"quant": "int8", "vram_budget_gb": 10.0}
    assert jobs[1]["settings"]["force"] is True and jobs[0]["settings"]["force"] is False
    assert _cli("queue", "retry", "2", "--store", db) == 0
    assert _cli("queue", "move", "2", "up", "--store", db) == 0
    assert _cli("queue", "list", "--store", db) == 0
    out = capsys.readouterr().out
    assert out.index("an owl") < out.index("a fox")
    with pytest.raises(InputError, match="unknown preset 'balanced'"):
        _cli("queue", "add", *gen, "--prompt", "x", "--preset", "balanced", "--store", db)
    with pytest.raises(InputError, match="multiples of 16"):
        _cli("queue", "add", *gen, "--prompt", "x", "--size", "60*48", "--store", db)


def test_importing_the_queue_does_not_import_torch():
    code = (
        "import sys, wan_local.jobs.commands, wan_local.jobs.worker, wan_local.jobs.supervisor, "
        "wan_local.jobs.housekeeping; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("channels", [12, 20])
def test_structure_preview_of_a_latent_space_without_colour_factors(tmp_path, channels):
    latent = torch.randn(channels, 2, 6, 8)
    latent[:, :, :, :4] += 3.0  # left half brighter in every channel
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == torch.uint8
    assert rgb[:, :4].float().mean() > rgb[:, 4:].float().mean() + 50
    path = write_preview(latent, tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.size == (320, 240)  # nearest upscale to a long side of at least 320
        assert img.getpixel((0, 0)) == tuple(rgb[0, 0].tolist())
