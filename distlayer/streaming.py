"""Streaming a stage's units in step order, within its weight budget.

A stage streams the units its budget cannot keep resident. A loader thread reads them in
the order forwards use them (cyclically, across step boundaries), as far ahead as the
memory allows, and hands them over through a queue; a forward takes each unit just
before it runs and releases it right after.

- :class:`Streamer`: the order, the loader thread, the hand-over, and recovery after a
  failed forward or a loader that died. It knows nothing of devices.
- :class:`HostMemory`: where a CPU stage's weights live and how long a forward takes:
  host memory, held within a byte budget, timed by the host's clock.
- :class:`MappedMemory`: a CPU stage's shards mapped in place, paged in and out.

Both are memory tiers (``memory.WeightMemory``, which names every call the runner and
the streamer make on one, and its contract); ``cuda_stream.CudaMemory`` is the GPU's.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from . import compute
from .errors import StageError, StoreError
from .memory import WeightMemory
from .units import chunk_rows, chunk_unit

# How often a forward that waits for a unit checks that the loader thread still runs.
LOADER_CHECK_S = 1.0


class HostMemory:
    """A CPU stage's weights: units read from the store into host memory, held within a
    byte budget; forwards timed with the host's clock. A ``memory.WeightMemory``.

    Args:
        store: the layer store.
        dtype: compute dtype.
        device: the stage's (CPU) device.
        budget: bytes of weights the stage may hold; None: unlimited.
        unit_bytes: bytes of each unit in ``dtype``.
        stage: stage index, for messages.
    """

    # each fetch reads a unit into new tensors, which go with the forward that used them
    keeps_tensors = False

    def __init__(self, store, dtype: torch.dtype, device: torch.device, budget: int | None,
                 unit_bytes: dict[str, int], stage: int):
        self.store, self.dtype, self.device, self.budget = store, dtype, device, budget
        self.unit_bytes, self.stage = unit_bytes, stage
        self.cond = threading.Condition()
        self.held = 0
        self.peak_weight_bytes = 0
        # load_s: disk reads, on any thread; stall_s: forwards waiting for weights.
        self.times = {"load_s": 0.0, "stall_s": 0.0, "compute_s": 0.0}

    def read(self, unit: str) -> dict[str, torch.Tensor]:
        """Read a unit from disk into host memory, in the compute dtype; a unit of a
        compressed store is decoded here, so a streamed one is decoded on the loader
        thread, off the forward's."""
        t0 = time.perf_counter()
        tensors = self.store.load(unit, self.dtype, "cpu")
        self.times["load_s"] += time.perf_counter() - t0
        return tensors

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` more of weights held (the caller holds :attr:`cond` or is alone)."""
        self.held += nbytes
        self.peak_weight_bytes = max(self.peak_weight_bytes, self.held)
        assert self.budget is None or self.held <= self.budget, (self.held, self.budget)

    def free(self, nbytes: int) -> None:
        """Count ``nbytes`` of weights given back, and wake a loader waiting for room."""
        with self.cond:
            self.held -= nbytes
            self.cond.notify_all()

    def held_bytes(self) -> int:
        """Bytes of weights counted held: resident units and streamed ones not yet freed."""
        return self.held

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Not here: streamed units are read anew by each fetch (``keeps_tensors`` is False)."""
        raise TypeError(f"{type(self).__name__} hands a streamed unit's tensors over at each fetch: "
                        "it keeps none for the stage's lifetime")

    def load_resident(self, unit: str) -> dict[str, torch.Tensor]:
        """A resident unit's tensors, held for the stage's lifetime."""
        tensors = self.read(unit)
        self.hold(self.unit_bytes[unit])
        return tensors

    def prepare(self, streamed: list[str]) -> None:
        """Nothing to set up for streaming: host memory is taken as units load."""

    def fetch(self, unit: str, stopped: threading.Event | None = None):
        """Wait for room in the budget, then read ``unit``. With ``stopped`` (the loader
        thread), returns None once it is set; without (a forward loading for itself), the
        room must be there.
        """
        nbytes = self.unit_bytes[unit]
        while True:
            self.reclaim()
            with self.cond:
                if stopped is not None and stopped.is_set():
                    return None
                if stopped is None or self.budget is None or self.held + nbytes <= self.budget:
                    self.hold(nbytes)
                    break
                if not self.pending():
                    self.cond.wait(0.5)
        try:
            return self.read(unit)
        except BaseException:
            self.free(nbytes)
            raise

    def reclaim(self) -> None:
        """Finish giving back what forwards released (nothing to do here: host tensors go
        with their last reference)."""

    def pending(self) -> bool:
        """Whether something released awaits :meth:`reclaim`."""
        return False

    def wait_mark(self) -> float:
        """When a forward starts waiting for a unit."""
        return time.perf_counter()

    def ready(self, unit: str, loaded, mark: float) -> dict[str, torch.Tensor]:
        """The tensors of a fetched unit, for the forward that waited since ``mark``."""
        self.times["stall_s"] += time.perf_counter() - mark
        return loaded

    def release(self, unit: str) -> None:
        """A forward is done with ``unit``."""
        self.free(self.unit_bytes[unit])

    def discard(self, unit: str, loaded) -> None:
        """Give back a fetched unit that no forward took."""
        self.free(self.unit_bytes[unit])

    def reset(self, dropped: list[str]) -> None:
        """After a failed forward: ``dropped`` units were taken and not released."""
        for unit in dropped:
            self.release(unit)

    def wake(self) -> None:
        """Wake a loader waiting for room (to see that it should stop)."""
        with self.cond:
            self.cond.notify_all()

    def begin_forward(self):
        """Start timing a forward."""
        return time.perf_counter(), self.times["stall_s"]

    def end_forward(self, begun) -> None:
        """A forward ended: its time less its waits for weights is compute."""
        t0, stall0 = begun
        self.times["compute_s"] += time.perf_counter() - t0 - (self.times["stall_s"] - stall0)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """An input of a forward on the stage's device."""
        return t.to(self.device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A forward's output in host memory, ready to send."""
        return t.cpu()

    def stats(self) -> dict:
        """Peak weight bytes and seconds spent loading, waiting and computing."""
        return {"peak_weight_bytes": self.peak_weight_bytes, **{k: round(v, 4) for k, v in self.times.items()}}

    def close(self) -> None:
        """Nothing to free: host tensors go with their last reference."""


class MappedMemory(HostMemory):
    """A CPU stage that streams an uncompressed store in its stored dtype: every streamed
    unit is mapped once (``LayerStore.map``) and its tensors stay the module's for the
    stage's lifetime; loading a unit maps its pages in, and once a forward released it
    the loader thread maps them out (see ``pages.py``) before counting its bytes free,
    so the budget bounds the bytes mapped in at once. Nothing is copied.

    Args:
        chunks: units streamed in chunks, and how many (the head, cut along its rows,
            the vocabulary); each chunk ``units.chunk_unit(unit, j)`` streams on its own.
        Others as :class:`HostMemory`.
    """

    # a streamed unit's tensors are views of its map for the stage's lifetime (:meth:`tensors`)
    keeps_tensors = True

    def __init__(self, store, dtype: torch.dtype, device: torch.device, budget: int | None,
                 unit_bytes: dict[str, int], stage: int, chunks: dict[str, int] | None = None):
        super().__init__(store, dtype, device, budget, dict(unit_bytes), stage)
        self.maps: dict[str, object] = {}  # unit -> pages.Mapping
        self.outgoing: list[str] = []  # released by forwards, to be mapped out by the loader
        self.pieces: dict[str, tuple[str, tuple[int, int], bool]] = {}  # chunk -> (unit, rows, last)
        # rows of each chunked unit: its tensors with that many rows are cut, others whole
        self.rows = {unit: max(t.shape[0] for t in self.mapping(unit).tensors.values() if t.dim())
                     for unit in (chunks or {})}
        for unit, n in (chunks or {}).items():
            for j in range(n):
                name, rows = chunk_unit(unit, j), chunk_rows(self.rows[unit], n, j)
                self.pieces[name] = (unit, rows, j == n - 1)
                self.unit_bytes[name] = sum(t.nbytes for t in self.tensors(name).values())

    def mapping(self, unit: str):
        """Unit ``unit``'s shard, mapped (once)."""
        if unit not in self.maps:
            m = self.maps[unit] = self.store.map(unit)
            if m.huge:  # read it again, into 2 MiB pages: a cached file read another way has 4 KiB ones
                m.drop_cached()
        return self.maps[unit]

    def _cut(self, unit: str, t: torch.Tensor) -> bool:
        return t.dim() > 0 and t.shape[0] == self.rows[unit]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of a streamed unit or chunk: views of its mapped shard, valid for
        the stage's lifetime (they are the module's; only their pages come and go)."""
        if name not in self.pieces:
            return self.mapping(name).tensors
        unit, (a, b), _ = self.pieces[name]
        return {k: t[a:b] if self._cut(unit, t) else t for k, t in self.mapping(unit).tensors.items()}

    def _spans(self, name: str):
        """The mapping of a streamed unit or chunk, and the file byte ranges it reads."""
        if name not in self.pieces:
            m = self.mapping(name)
            return m, [(0, len(m.map))]
        unit, rows, _ = self.pieces[name]
        m = self.mapping(unit)
        return m, [m.span(k, rows if self._cut(unit, t) else None) for k, t in m.tensors.items()]

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """Map a unit's (or chunk's) pages in, reading from disk what the page cache lacks.

        Raises:
            StoreError: its shard changed on disk since it was checked (truncated or
                corrupt), or cannot be read.
        """
        t0 = time.perf_counter()
        unit = self.pieces[name][0] if name in self.pieces else name
        self.store.shard(unit, sha=False)  # a shard truncated under its map must not be touched
        m, spans = self._spans(name)
        try:
            for lo, hi in spans:
                m.page_in(lo, hi)
        except OSError as e:
            raise StoreError(f"unit {unit} of {self.store.path} cannot be read ({e}): "
                             f"{self.store.repair_hint()}") from e
        # its sha256 on first use (or after a change), over the pages just mapped in: read
        # through the map, the file comes into the page cache in 2 MiB pages
        self.store.shard(unit, data=m.map)
        self.times["load_s"] += time.perf_counter() - t0
        return self.tensors(name)

    def _page_out(self, name: str) -> None:
        m, spans = self._spans(name)
        if name in self.pieces and self.pieces[name][2]:
            # the last chunk: the whole shard, with what the kernel mapped in around earlier chunks
            spans = [(0, len(m.map))]
        for lo, hi in spans:
            m.page_out(lo, hi)

    def release(self, name: str) -> None:
        """A forward is done with ``name``: the loader thread maps its pages out (off the
        forward's thread) and only then counts its bytes free."""
        with self.cond:
            self.outgoing.append(name)
            self.cond.notify_all()

    def pending(self) -> bool:
        return bool(self.outgoing)

    def reclaim(self) -> None:
        """Map out the pages of what forwards released, then count their bytes free."""
        with self.cond:
            names, self.outgoing = self.outgoing, []
        for name in names:
            self._page_out(name)
            self.free(self.unit_bytes[name])

    def discard(self, name: str, loaded) -> None:
        """Give back a unit mapped in that no forward took."""
        self._page_out(name)
        self.free(self.unit_bytes[name])

    def close(self) -> None:
        """Map every page out (the maps themselves go with the last tensor viewing them)."""
        self.reclaim()
        for m in self.maps.values():
            m.page_out(0, len(m.map))


class Streamer:
    """Hands a stage's streamed units to its forwards in step order.

    Args:
        memory: where the units live (a ``memory.WeightMemory``: :class:`HostMemory`,
            :class:`MappedMemory` or ``cuda_stream.CudaMemory``).
        units: the streamed units, in forward order.
        stage: stage index, for messages.
        prefetch: load on a background thread ahead of use (else each forward loads the
            unit it needs itself).
    """

    def __init__(self, memory: WeightMemory, units: list[str], stage: int, prefetch: bool):
        self.memory, self.units, self.stage, self.prefetch = memory, list(units), stage, prefetch
        self.next = 0  # index into units of the next unit a forward needs
        self.taken = 0  # units handed to forwards since the start: each one fetched (read) once
        self.queue: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start loading ahead, from the unit the next forward needs."""
        if not (self.prefetch and self.units):
            return
        self.stopped.clear()
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self._load_ahead, args=(self.next, self.queue),
                                       name=f"prefetch-stage{self.stage}", daemon=True)
        self.thread.start()

    def _load_ahead(self, first: int, out: queue.Queue) -> None:
        compute.single_threaded()  # a loader's copies leave the cores to the compute thread's team
        i = first
        while not self.stopped.is_set():
            unit = self.units[i % len(self.units)]
            try:
                loaded = self.memory.fetch(unit, self.stopped)
            except Exception as e:  # handed to the forward that needs the unit
                out.put((unit, e))
                return
            if loaded is None:
                return
            out.put((unit, loaded))
            i += 1

    def take(self, unit: str):
        """The tensors of ``unit``, the next one a forward runs, ready for its kernels.

        Raises:
            StageError: the loader thread ended without handing the unit over.
        """
        expected = self.units[self.next % len(self.units)]
        assert unit == expected, f"stage {self.stage} streams {expected} next but {unit} ran"
        self.next += 1
        self.taken += 1
        mark = self.memory.wait_mark()
        loaded = self.memory.fetch(unit) if self.thread is None else self._receive(unit)
        return self.memory.ready(unit, loaded, mark)

    def _receive(self, unit: str):
        while True:
            try:
                got, loaded = self.queue.get(timeout=LOADER_CHECK_S)
                break
            except queue.Empty:
                if self.thread.is_alive() or not self.queue.empty():
                    continue
                raise StageError(
                    f"stage {self.stage}'s weight loader ended without a word while a forward waited for "
                    f"{unit}: this step failed, and the next restarts the loader; if it happens again, the "
                    "stage's log says why (out of memory, a CUDA error)") from None
        assert got == unit, (got, unit)
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    def release(self, unit: str) -> None:
        """A forward is done with ``unit``."""
        self.memory.release(unit)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loader and give back what it loaded that no forward took."""
        if self.thread is None:
            return
        self.stopped.set()
        self.memory.wake()
        self.thread.join(timeout)
        self.thread = None
        while not self.queue.empty():
            unit, loaded = self.queue.get_nowait()
            if not isinstance(loaded, Exception):
                self.memory.discard(unit, loaded)

    def restart(self, dropped: list[str]) -> None:
        """After a failed forward the order is lost: start again at the step's first unit.

        Args:
            dropped: the units the forward had taken and the runner dropped unreleased.
        """
        self.stop()
        self.memory.reset(dropped)
        self.next = 0
        self.start()
