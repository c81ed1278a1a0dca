"""One account, per process, of the weights loaded in it: what, in which memory tier, how many bytes.

Every owner of loaded weights (today the DiT expert slots; the VAE, UMT5 and the job runner are to follow) records
what it holds here and releases it when it drops it, so one place can answer "what is loaded, and how much RAM,
pinned RAM and VRAM does it take" and free room by evicting what is idle.

Tiers, in bytes: `host` (host RAM, page-locked or not), `pinned` (the page-locked part of host RAM), `vram`.

An entry's life: `reserve()` before loading (the bytes count at once, so a concurrent planner sees them), then
`register(key=...)` with the measured bytes once loaded (or `register()` directly), `update()` when the owner moves
it (device, pinning), `touch()` when it is used, `release()` when it is dropped. An owner that can drop an entry on
request (an idle expert kept for the next job) passes `evict=`, a callable that frees the weights and releases the
entry, returning False when it cannot (the entry became busy meanwhile); `make_room()` evicts least recently used
evictable entries until the asked bytes fit under a limit.

Thread-safe: entries change under one lock; `evict` callables run outside it (they call `release`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

TIERS = ("host", "pinned", "vram")
STATES = ("reserved", "loaded")


@dataclass(frozen=True)
class LedgerEntry:
    """One holding. name: what it is ("t2v-A14B high_noise DiT"); kind: "dit", "vae", "text_encoder", ...

    last_used orders entries for eviction (larger = more recent). evictable: the owner gave an `evict` callable.
    """

    key: int
    name: str
    kind: str
    state: str
    host_bytes: int = 0
    pinned_bytes: int = 0
    vram_bytes: int = 0
    last_used: int = 0
    evictable: bool = False

    def bytes_in(self, tier: str) -> int:
        """This entry's bytes in `tier` ("host", "pinned" or "vram")."""
        return getattr(self, f"{_check_tier(tier)}_bytes")


@dataclass(frozen=True)
class LedgerTotals:
    """Bytes held per tier, summed over entries (reserved ones included)."""

    host_bytes: int = 0
    pinned_bytes: int = 0
    vram_bytes: int = 0


class MemoryLedger:
    """The account itself; `process_ledger()` is the one the engine uses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, LedgerEntry] = {}
        self._evict: dict[int, Callable[[], bool]] = {}
        self._evicting: set[int] = set()
        self._keys = itertools.count(1)
        self._clock = itertools.count(1)

    # ------------------------------------------------------------------------------------------- changes

    def reserve(self, name: str, kind: str, *, host_bytes: int = 0, pinned_bytes: int = 0, vram_bytes: int = 0) -> int:
        """Claim bytes for something about to be loaded; returns the key `register`, `update` and `release` take."""
        return self._add(name, kind, "reserved", host_bytes, pinned_bytes, vram_bytes, None)

    def register(
        self,
        name: str,
        kind: str,
        *,
        host_bytes: int = 0,
        pinned_bytes: int = 0,
        vram_bytes: int = 0,
        key: int | None = None,
        evict: Callable[[], bool] | None = None,
    ) -> int:
        """Record something loaded, with its measured bytes. With `key` (from `reserve`), that reservation becomes
        this entry (same key); without, a new entry is made. Returns the key."""
        if key is None:
            return self._add(name, kind, "loaded", host_bytes, pinned_bytes, vram_bytes, evict)
        sizes = _sizes(host_bytes, pinned_bytes, vram_bytes)
        with self._lock:
            entry = self._get(key)
            self._entries[key] = replace(entry, name=name, kind=kind, state="loaded", **sizes, last_used=self._tick())
            self._set_evict(key, evict)
        return key

    def update(
        self, key: int, *, host_bytes: int | None = None, pinned_bytes: int | None = None, vram_bytes: int | None = None
    ) -> None:
        """Change an entry's bytes in the tiers given (the owner moved or pinned it). Counts as a use."""
        given = {"host_bytes": host_bytes, "pinned_bytes": pinned_bytes, "vram_bytes": vram_bytes}
        sizes = {k: v for k, v in given.items() if v is not None}
        _sizes(**sizes)
        with self._lock:
            self._entries[key] = replace(self._get(key), **sizes, last_used=self._tick())

    def set_evictable(self, key: int, evict: Callable[[], bool] | None) -> None:
        """Let `make_room` drop the entry through `evict` (see the module docstring), or not (None)."""
        with self._lock:
            self._get(key)
            self._set_evict(key, evict)

    def touch(self, key: int) -> None:
        """Mark the entry used now (eviction takes the least recently used first)."""
        with self._lock:
            self._entries[key] = replace(self._get(key), last_used=self._tick())

    def release(self, key: int) -> bool:
        """Forget the entry; False when it was already released (releasing twice is harmless)."""
        with self._lock:
            self._evict.pop(key, None)
            return self._entries.pop(key, None) is not None

    # ------------------------------------------------------------------------------------------- queries

    def entries(self, kind: str | None = None) -> list[LedgerEntry]:
        """A snapshot of the entries (of `kind`, or all), oldest key first."""
        with self._lock:
            return [e for k, e in sorted(self._entries.items()) if kind is None or e.kind == kind]

    def get(self, key: int) -> LedgerEntry | None:
        """The entry under `key`, or None once released."""
        with self._lock:
            return self._entries.get(key)

    def totals(self) -> LedgerTotals:
        """Bytes held per tier over all entries."""
        with self._lock:
            entries = list(self._entries.values())
        return LedgerTotals(*(sum(e.bytes_in(tier) for e in entries) for tier in TIERS))

    def total(self, tier: str) -> int:
        """Bytes held in `tier` over all entries."""
        return getattr(self.totals(), f"{_check_tier(tier)}_bytes")

    # ------------------------------------------------------------------------------------------- eviction

    def make_room(self, nbytes: int, limit_bytes: int, tier: str = "host") -> list[LedgerEntry]:
        """Evict least recently used evictable entries until `nbytes` more fit in `tier` under `limit_bytes`.

        Only entries holding bytes in `tier` are candidates. Returns the entries evicted (as they were); stops when
        no candidate is left, so whether the room is there afterwards is `total(tier) + nbytes <= limit_bytes`.
        """
        _check_tier(tier)
        evicted: list[LedgerEntry] = []
        refused: set[int] = set()  # their owner could not drop them just now
        while self.total(tier) + nbytes > limit_bytes:
            with self._lock:
                candidates = [
                    e
                    for k, e in self._entries.items()
                    if k in self._evict and k not in self._evicting and k not in refused and e.bytes_in(tier)
                ]
                if not candidates:
                    break
                victim = min(candidates, key=lambda e: e.last_used)
                evict = self._evict[victim.key]
                self._evicting.add(victim.key)  # a concurrent make_room picks another one
            try:
                freed = evict()
            finally:
                with self._lock:
                    self._evicting.discard(victim.key)
            if not freed:
                refused.add(victim.key)
                continue
            self.release(victim.key)  # in case the owner's callable did not
            evicted.append(victim)
            log.info("evicted %s (%.2f GB %s) to make room", victim.name, victim.bytes_in(tier) / 1e9, tier)
        return evicted

    # ------------------------------------------------------------------------------------------- internals

    def _add(self, name, kind, state, host_bytes, pinned_bytes, vram_bytes, evict) -> int:
        sizes = _sizes(host_bytes, pinned_bytes, vram_bytes)
        with self._lock:
            key = next(self._keys)
            self._entries[key] = LedgerEntry(key, name, kind, state, **sizes, last_used=self._tick())
            self._set_evict(key, evict)
        return key

    def _get(self, key: int) -> LedgerEntry:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no ledger entry {key} (released already?)")
        return entry

    def _set_evict(self, key: int, evict: Callable[[], bool] | None) -> None:
        if evict is None:
            self._evict.pop(key, None)
        else:
            self._evict[key] = evict
        self._entries[key] = replace(self._entries[key], evictable=evict is not None)

    def _tick(self) -> int:
        return next(self._clock)


def _check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r}: choose one of {', '.join(TIERS)}")
    return tier


def _sizes(host_bytes: int = 0, pinned_bytes: int = 0, vram_bytes: int = 0) -> dict[str, int]:
    sizes = {"host_bytes": host_bytes, "pinned_bytes": pinned_bytes, "vram_bytes": vram_bytes}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"byte counts must be non-negative integers: {bad}")
    return sizes


def tensor_bytes(module) -> tuple[int, int]:
    """(host bytes, device bytes) of a torch module's parameters and buffers where they are now, each tensor
    counted once: what an owner records when it registers a loaded model."""
    host = device = 0
    seen: set[int] = set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if t.device.type == "cpu":
            host += n
        else:
            device += n
    return host, device


_PROCESS_LEDGER = MemoryLedger()


def process_ledger() -> MemoryLedger:
    """The ledger of this process, shared by every owner of loaded weights."""
    return _PROCESS_LEDGER
