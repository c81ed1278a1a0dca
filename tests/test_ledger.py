"""The memory ledger: entries and totals per tier, LRU eviction, threads; and the DiT experts accounted in it."""

from __future__ import annotations

import threading

import pytest
import torch

from wan_local.memory import ledger as ledger_module
from wan_local.memory.ledger import LedgerTotals, MemoryLedger, process_ledger
from wan_local.memory.options import MemoryOptions
from wan_local.pipeline import GenerationSettings, WanPipeline

GB = 1 << 30


def test_reserve_register_update_release() -> None:
    ledger = MemoryLedger()
    name = "t2v-A14B high_noise DiT"
    key = ledger.reserve(name, "dit", host_bytes=10 * GB)
    assert [(e.name, e.state, e.host_bytes) for e in ledger.entries()] == [(name, "reserved", 10 * GB)]
    assert ledger.register(name, "dit", host_bytes=8 * GB, key=key) == key
    vae = ledger.register("Wan2.1 VAE", "vae", host_bytes=GB)
    ledger.update(key, host_bytes=2 * GB, pinned_bytes=GB, vram_bytes=6 * GB)
    assert ledger.get(key).state == "loaded" and ledger.get(key).pinned_bytes == GB
    assert ledger.totals() == LedgerTotals(host_bytes=3 * GB, pinned_bytes=GB, vram_bytes=6 * GB)
    assert ledger.total("vram") == 6 * GB
    assert [e.name for e in ledger.entries(kind="vae")] == ["Wan2.1 VAE"]
    assert ledger.release(key) is True and ledger.release(key) is False
    assert ledger.get(key) is None and ledger.totals() == LedgerTotals(host_bytes=GB)
    ledger.release(vae)
    assert ledger.entries() == [] and ledger.totals() == LedgerTotals()


def test_bad_arguments_are_named() -> None:
    ledger = MemoryLedger()
    with pytest.raises(ValueError, match="host_bytes"):
        ledger.register("x", "dit", host_bytes=-1)
    with pytest.raises(ValueError, match="tier='disk'"):
        ledger.total("disk")
    with pytest.raises(KeyError, match="no ledger entry 7"):
        ledger.update(7, host_bytes=1)
    assert ledger.entries() == []


def test_make_room_evicts_least_recently_used_first() -> None:
    ledger = MemoryLedger()
    calls: list[str] = []

    def owner(name: str, host_bytes: int, can: bool = True) -> int:
        key = ledger.register(name, "dit", host_bytes=host_bytes)

        def evict() -> bool:
            calls.append(name)
            return can and ledger.release(key)

        ledger.set_evictable(key, evict)
        return key

    old = owner("old", 4 * GB)
    busy = owner("busy", 4 * GB, can=False)  # its owner refuses (it became active meanwhile)
    new = owner("new", 4 * GB)
    ledger.register("active", "dit", host_bytes=4 * GB)  # not evictable
    pinned = owner("pinned only", 0)
    ledger.update(pinned, pinned_bytes=GB)  # holds nothing in the host tier: never evicted for host room
    ledger.touch(old)  # now "busy" is the least recently used, then "new", then "old"

    assert ledger.make_room(2 * GB, limit_bytes=20 * GB) == [], "fits already"
    evicted = ledger.make_room(4 * GB, limit_bytes=16 * GB)
    assert [e.name for e in evicted] == ["new"] and calls == ["busy", "new"]
    assert ledger.get(busy) is not None and ledger.get(new) is None and ledger.get(old) is not None
    evicted = ledger.make_room(12 * GB, limit_bytes=16 * GB)
    assert [e.name for e in evicted] == ["old"], "the refused one is asked again, then old goes; active stays"
    assert ledger.total("host") + 12 * GB > 16 * GB, "not enough room: the caller checks the totals"
    assert ledger.make_room(GB, limit_bytes=0, tier="vram") == []
    assert [e.name for e in ledger.make_room(0, limit_bytes=0, tier="pinned")] == ["pinned only"]


def test_concurrent_owners_keep_exact_totals() -> None:
    ledger = MemoryLedger()

    def owner(i: int) -> None:
        for _ in range(200):
            key = ledger.reserve(f"w{i}", "dit", host_bytes=3)
            ledger.register(f"w{i}", "dit", host_bytes=5, key=key)
            ledger.update(key, vram_bytes=7)
            ledger.release(key)
        ledger.register(f"kept {i}", "dit", host_bytes=1)

    threads = [threading.Thread(target=owner, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.totals() == LedgerTotals(host_bytes=8) and len(ledger.entries()) == 8


# ------------------------------------------------------------------------------------------ DiT experts


def _settings() -> GenerationSettings:
    return GenerationSettings(
        task="t2v-A14B", prompt="A fox in the snow.", size=(32, 32), frames=1, steps=3, shift=1.0, seed=3
    )


@pytest.mark.parametrize("keep", [False, True], ids=["drop", "keep"])
def test_the_ledger_holds_the_experts_the_policy_allows(tiny, tmp_path, monkeypatch, keep):
    ledger = MemoryLedger()
    monkeypatch.setattr(ledger_module, "_PROCESS_LEDGER", ledger)  # what ExpertSlots takes by default
    assert process_ledger() is ledger
    seen: list[list[str]] = []

    def record(*_) -> None:
        seen.append(sorted(e.name for e in ledger.entries(kind="dit")))

    def recording(real):
        def call(*args, **kw) -> int:
            key = real(*args, **kw)
            if (args[1] if len(args) > 1 else kw.get("kind")) == "dit":  # the VAE and UMT5 are recorded too
                record()
            return key

        return call

    for method in ("reserve", "register"):
        monkeypatch.setattr(ledger, method, recording(getattr(ledger, method)))

    memory = MemoryOptions(keep_idle_expert="keep" if keep else "drop")
    pipe = WanPipeline(tiny / "t2v-A14B", "t2v-A14B", "cpu", torch.float32, memory, cache_dir=tmp_path)
    pipe.generate(_settings(), on_step=record)
    high, low = "t2v-A14B high_noise DiT", "t2v-A14B low_noise DiT"
    assert len(seen) == 4 + 3, "two reserves, two registers, three steps"
    if not keep:
        assert all(len(names) <= 1 for names in seen), f"two DiT experts held at once: {seen}"
        assert [high] in seen and [low] in seen and ledger.entries(kind="dit") == []
    else:
        entries = ledger.entries(kind="dit")
        assert sorted(e.name for e in entries) == [high, low], "the low-noise read may start first (prefetch)"
        assert all(e.state == "loaded" and e.host_bytes > 0 and e.vram_bytes == 0 for e in entries)
        assert all(e.evictable for e in entries), "idle experts can be evicted"
        # The ledger's eviction drops the least recently used idle expert (high-noise ran first) from the slots.
        evicted = ledger.make_room(1, limit_bytes=ledger.total("host"))
        assert [e.name for e in evicted] == [high] and pipe.experts.held() == ["low_noise"]
        assert [e.name for e in ledger.entries(kind="dit")] == [low]
    pipe.close()
    assert ledger.entries() == []
