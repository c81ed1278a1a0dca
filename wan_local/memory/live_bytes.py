"""Working memory measured from the ops themselves: the bytes of the tensor storages that are alive, op by op.

`LiveStorageTracker` is a dispatch mode: every storage an op creates is counted from the op's return until its last
reference dies. It needs no allocator, so it measures CPU runs (torch keeps no CPU allocator statistics) and runs
on the meta device or on fake tensors (shapes only: a 14B DiT forward at 720p costs seconds and no memory). It is
what vae_tiling's decode estimate runs on, and what checks the DiT activation formula (memory.bytes) against the
real forward (memory.meta_trace, tests/test_live_bytes.py, benchmarks/bench_activation_meta.py).

What it does not see: workspace an op allocates and frees inside itself (cuBLAS / cuDNN workspaces, the tiles of a
fused attention kernel), the caching allocator's rounding and fragmentation, and tensors made before it was entered
(weights, inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveStorageTracker(TorchDispatchMode):
    """Context manager measuring the peak bytes of tensor storages that ops create while it is active.

    After every op, storages that died since the last op are dropped, then the op's new storages are added: an op's
    inputs and outputs count together, as they coexist in an allocator. A result that aliases an argument (a view,
    an in-place or `out=` result, per the op's schema) is no new storage, so a view of a weight counts nothing.
    Tensors made before entering (weights, inputs) are not counted. Run the code under `torch.no_grad()`, or
    autograd keeps every intermediate alive. Reset `peak_bytes` to 0 to start a new window.

    Attribution: set `phase` (any hashable label) from outside, e.g. in module pre-hooks; `phase_peak_bytes[label]`
    is then the most that was alive while that label was set, `peak_phase` the label at the peak, and
    `peak_tensors` describes the storages alive at the peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int, tuple]] = {}
        self._at_peak: list[tuple[int, tuple]] = []
        self.peak_bytes = 0
        self.phase: Hashable = None
        self.peak_phase: Hashable = None
        self.phase_peak_bytes: dict[Hashable, int] = {}

    def live_bytes(self) -> int:
        """Bytes of tracked storages that are still alive."""
        for key in [k for k, (ref, _, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        return sum(n for _, n, _ in self._live.values())

    @property
    def peak_tensors(self) -> list[str]:
        """The storages alive at the peak, largest first: "<MiB> MiB <dtype> <shape> from <op>"."""
        return [
            f"{n / 2**20:.1f} MiB {str(dtype).removeprefix('torch.')} {list(shape)} from {op}"
            for n, (op, dtype, shape) in sorted(self._at_peak, key=lambda item: -item[0])
        ]

    def __torch_dispatch__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        current = self.live_bytes()
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            aliases = bool(returns) and returns[min(i, len(returns) - 1)].alias_info is not None
            if not isinstance(t, Tensor) or aliases:
                continue
            storage = t.untyped_storage()
            if storage._cdata not in self._live:
                self._live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes(), (func, t.dtype, t.shape))
                current += storage.nbytes()
        if self.phase is not None:
            self.phase_peak_bytes[self.phase] = max(self.phase_peak_bytes.get(self.phase, 0), current)
        if current > self.peak_bytes:
            self.peak_bytes, self.peak_phase = current, self.phase
            self._at_peak = [(n, what) for _, n, what in self._live.values()]
        return out
