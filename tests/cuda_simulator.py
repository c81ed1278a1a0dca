"""A CPU stand-in for the CUDA calls BlockStreamer makes, in which copies land late and races are reported.

What it models (everything runs on the CPU, under one lock, in "ticks": one tick per simulator call and per
tensor op the compute runs while `watching()`):
- The compute stream is the default stream and runs eagerly, like the CPU compute itself: its `wait_event`
  forces every op up to the awaited record to run now (on whatever stream it sits).
- Every other stream (`torch.cuda.Stream`) is a FIFO of ops (copy, record, wait). Each op gets a random delay of
  0..max_delay ticks and runs once that has passed and every earlier op on its stream has run. `synchronize`
  (device, stream, event) forces the ops it waits for.
- `dst.copy_(src, non_blocking=True)` into a simulated device buffer writes poison (every byte 0xFF: NaN in
  float32, float16 and bfloat16) into dst at once and the real bytes of src only when the op runs (src is read
  then, so a staging chunk overwritten too early shows up as wrong bytes).
- Happens-before, with a vector clock per stream: a compute op that reads a device buffer whose last copy is not
  ordered before it (no wait on an event recorded after the copy) is a "read before ready" violation; a copy
  into a buffer that runs without having waited on a compute event recorded after the buffer's last compute
  read is an "early reuse" violation (the compute here is eager, so early reuse cannot corrupt data; it is
  reported instead); a host `copy_` into the source of a copy that has not run (a staging chunk reused before
  its event fired) is a "source overwritten" violation.
Device buffers are CPU tensors from `torch.empty(..., device="cuda")` on the patched module; host pinning
(cudaHostRegister, `pin_memory=True`) is a no-op that succeeds.

Kept in tests/: it is a test double for CPU runs; the GPU proof runs the real CUDA calls.
"""

from __future__ import annotations

import contextlib
import random
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan_local.memory import pinned, streaming
from wan_local.memory.pinned import aligned_empty

POISON = 0xFF
_NOT_READS = {"_has_compatible_shallow_copy_type"}  # ops on a tensor's metadata, not its bytes


@dataclass(eq=False)
class _Op:
    kind: str  # "copy" | "record" | "wait"
    due: int
    dst: torch.Tensor | None = None
    src: torch.Tensor | None = None
    target: _Op | None = None  # wait: the record (or last op) waited for
    done: bool = False
    clock: dict[int, int] = field(default_factory=dict)  # the stream's vector clock once this op ran


@dataclass
class _Buffer:
    last_read: int | None = None  # compute ops done when the compute last read it
    writer: tuple[int, int] | None = None  # (stream id, op number) of the last copy into it
    pending: int = 0  # copies into it issued but not run


class SimStream:
    def __init__(self, sim: CudaSimulator, eager: bool = False) -> None:
        self.sim, self.eager = sim, eager
        self.id = len(sim.streams)
        sim.streams.append(self)
        self.ops: deque[_Op] = deque()
        self.done = 0  # ops run
        self.clock: dict[int, int] = {}
        self.last: _Op | None = None

    def wait_event(self, event: SimEvent) -> None:
        with self.sim.lock:
            self.sim.tick()
            if event.op is not None:
                self.sim.issue(self, _Op("wait", 0, target=event.op))

    def wait_stream(self, other: SimStream) -> None:
        with self.sim.lock:
            self.sim.tick()
            if other.last is not None:
                self.sim.issue(self, _Op("wait", 0, target=other.last))

    def synchronize(self) -> None:
        with self.sim.lock:
            self.sim.tick()
            if self.last is not None:
                self.sim.force(self.last)

    def query(self) -> bool:
        with self.sim.lock:
            self.sim.tick()
            return not self.ops


class SimEvent:
    def __init__(self, sim: CudaSimulator) -> None:
        self.sim = sim
        self.op: _Op | None = None  # the latest record issued

    def record(self, stream: SimStream | None = None) -> None:
        with self.sim.lock:
            self.sim.tick()
            self.op = _Op("record", 0)
            self.sim.issue(stream or self.sim.current_stream(), self.op)

    def query(self) -> bool:
        with self.sim.lock:
            self.sim.tick()
            return self.op is None or self.op.done

    def synchronize(self) -> None:
        with self.sim.lock:
            self.sim.tick()
            if self.op is not None:
                self.sim.force(self.op)

    def wait(self, stream: SimStream | None = None) -> None:
        (stream or self.sim.current_stream()).wait_event(self)

    def elapsed_time(self, end: SimEvent) -> float:
        return 0.0


class CudaSimulator:
    """One simulated device. `install(monkeypatch)` routes streaming.py's and pinned.py's CUDA calls here."""

    def __init__(self, seed: int, max_delay: int = 400) -> None:
        self.rng = random.Random(seed)
        self.max_delay = max_delay
        self.lock = threading.RLock()
        self.ticks = 0
        self.streams: list[SimStream] = []
        self.compute = SimStream(self, eager=True)
        self.buffers: dict[int, _Buffer] = {}  # storage data_ptr -> state
        self.sources: dict[int, int] = {}  # storage data_ptr -> copies reading it that have not run
        self.violations: list[str] = []
        self.copies = self.forced_copies = 0  # copies issued; of those, run early because a wait needed them
        self._local = threading.local()

    # --------------------------------------------------------------------------------- the patched names

    def install(self, monkeypatch) -> None:
        cuda = SimpleNamespace(
            Stream=lambda device=None, **kw: SimStream(self),
            Event=lambda **kw: SimEvent(self),
            stream=self.stream_context,
            current_stream=lambda device=None: self.current_stream(),
            synchronize=lambda device=None: self.synchronize(),
            device=lambda device=None: contextlib.nullcontext(),
            is_available=lambda: True,
            current_device=lambda: 0,
            empty_cache=lambda: None,
        )
        proxy = _TorchProxy(cuda=cuda, empty=self.empty)
        monkeypatch.setattr(streaming, "torch", proxy)
        monkeypatch.setattr(pinned, "torch", proxy)
        monkeypatch.setattr(pinned, "_host_register", lambda ptr, nbytes: 0)
        monkeypatch.setattr(pinned, "_host_unregister", lambda ptr: 0)
        real_copy = torch.Tensor.copy_

        def copy_(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
            if non_blocking and dst.untyped_storage().data_ptr() in self.buffers:
                self.copy_async(dst, src)
                return dst
            if self.sources.get(dst.untyped_storage().data_ptr()):
                self.violations.append("source overwritten: a host copy into the source of a pending copy")
            return real_copy(dst, src, non_blocking)

        monkeypatch.setattr(torch.Tensor, "copy_", copy_)

    def empty(self, *size, dtype=None, device=None, pin_memory=False, **kw) -> torch.Tensor:
        if device is None or torch.device(device).type != "cuda":
            return torch.empty(*size, dtype=dtype, **kw)
        if dtype not in (None, torch.uint8):
            raise NotImplementedError("the simulator allocates uint8 device buffers only")
        buf = aligned_empty(int(size[0]) if len(size) == 1 else int(torch.Size(size).numel()))
        buf.fill_(POISON)
        key, state = buf.untyped_storage().data_ptr(), _Buffer()
        self.buffers[key] = state
        weakref.finalize(buf, self._forget, key, state)  # its address may come back as an ordinary CPU tensor
        return buf

    def _forget(self, key: int, state: _Buffer) -> None:
        with self.lock:
            if self.buffers.get(key) is state:
                del self.buffers[key]

    def current_stream(self) -> SimStream:
        return getattr(self._local, "stream", self.compute)

    @contextlib.contextmanager
    def stream_context(self, stream: SimStream | None):
        before = self.current_stream()
        self._local.stream = stream or before
        try:
            yield
        finally:
            self._local.stream = before

    def synchronize(self) -> None:
        with self.lock:
            self.tick()
            for s in self.streams:
                if s.last is not None:
                    self.force(s.last)

    @contextlib.contextmanager
    def watching(self):
        """Track the compute's reads of device buffers (and tick once per op) in this thread."""
        with _ReadTracker(self):
            yield

    # ------------------------------------------------------------------------------------------- engine

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self.lock:
            self.tick()
            self.copies += 1
            self._raw(lambda: dst.fill_(POISON))
            self.buffers[dst.untyped_storage().data_ptr()].pending += 1
            key = src.untyped_storage().data_ptr()
            self.sources[key] = self.sources.get(key, 0) + 1
            self.issue(self.current_stream(), _Op("copy", 0, dst=dst, src=src))

    def issue(self, stream: SimStream, op: _Op) -> None:
        op.due = self.ticks + self.rng.randint(0, self.max_delay)
        stream.ops.append(op)
        stream.last = op
        if stream.eager:
            self.force(op)

    def tick(self) -> None:
        """One simulated operation: every non-eager stream runs its head ops that are due and unblocked."""
        with self.lock:
            self.ticks += 1
            for s in self.streams:
                while s.ops and s.ops[0].due <= self.ticks:
                    head = s.ops[0]
                    if head.kind == "wait" and not head.target.done:
                        break
                    self._run(s)

    def force(self, op: _Op) -> None:
        """Run `op` now, with everything it depends on (earlier ops on its stream, the records they wait for)."""
        stream = next(s for s in self.streams if op in s.ops) if not op.done else None
        while stream is not None and not op.done:
            head = stream.ops[0]
            if head.kind == "wait" and not head.target.done:
                self.force(head.target)
            self.forced_copies += head.kind == "copy" and head.due > self.ticks
            self._run(stream)

    def _run(self, stream: SimStream) -> None:
        op = stream.ops.popleft()
        stream.done += 1
        stream.clock[stream.id] = stream.done
        if op.kind == "wait":
            for k, v in op.target.clock.items():
                stream.clock[k] = max(stream.clock.get(k, 0), v)
        elif op.kind == "copy":
            buf = self.buffers.get(op.dst.untyped_storage().data_ptr(), _Buffer(pending=1))  # or freed since
            read = buf.last_read
            if read is not None and stream.clock.get(self.compute.id, 0) <= read:
                self.violations.append(f"early reuse: copy on stream {stream.id} overwrites a buffer the compute read")
            self._raw(lambda: op.dst.copy_(op.src))
            buf.pending -= 1
            self.sources[op.src.untyped_storage().data_ptr()] -= 1
            buf.writer = (stream.id, stream.done)
        op.clock = dict(stream.clock)
        op.done = True

    def _raw(self, write) -> None:
        self._local.raw = True
        try:
            write()
        finally:
            self._local.raw = False

    def on_read(self, t: torch.Tensor) -> None:
        buf = self.buffers.get(t.untyped_storage().data_ptr())
        if buf is None:
            return
        with self.lock:
            if buf.pending:
                self.violations.append("read before ready: a copy into the buffer has not completed")
            elif buf.writer is not None and self.compute.clock.get(buf.writer[0], 0) < buf.writer[1]:
                self.violations.append("read before ready: the compute never waited for the copy's event")
            buf.last_read = self.compute.done


class _TorchProxy:
    """`torch` for the patched modules: the real one except for the names given."""

    def __init__(self, **names) -> None:
        self.__dict__.update(names)

    def __getattr__(self, name: str):
        return getattr(torch, name)


class _ReadTracker(TorchDispatchMode):
    def __init__(self, sim: CudaSimulator) -> None:
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        name = func.overloadpacket.__name__
        if not getattr(sim._local, "raw", False) and not func.is_view and name not in _NOT_READS:
            sim.tick()
            inputs = args[1:] if name == "copy_" else args
            for a in [*inputs, *kwargs.values()]:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        sim.on_read(t)
        return func(*args, **kwargs)
