"""A CUDA stage's weights: resident units, streamed units in a fixed arena, GPU timing.

A memory tier (``memory.WeightMemory``, which names the calls ``streaming.Streamer`` and
the runner make, and their contract); ``streaming.HostMemory`` is the CPU's. On a GPU:

- **Resident units** are copied once at start-up, synchronously, on the stream that
  computes; they are never on the copy stream and never in pinned memory.
- **Streamed units** live in one device buffer (the *arena*) allocated at start-up: the
  weight budget less the resident units. Units take contiguous slices of it first in,
  first out, in the order forwards use them (:class:`Ring`). A slice is overwritten only
  after the compute stream has passed an event recorded after the last use of the unit
  that held it: the copy stream waits for that event on the GPU, so the host may run
  ahead while device memory stays at the arena's size. No tensor is freed and
  reallocated per step, so ``torch.cuda.memory_allocated`` for weights is the resident
  units plus the arena, and that is ``peak_weight_bytes``.
- **Host units** (the plan's ``host_units``: streamed units the stage keeps in host RAM)
  are read from the store once, at :meth:`CudaMemory.prepare`, into one pinned host
  region of exactly their bytes (:class:`PinnedRegion`: ``cudaHostRegister`` on an
  ordinary allocation, since PyTorch's pinned allocator rounds each block up to a power of
  two). Each step copies a host unit from its slice of that region to its arena slice
  with one non-blocking copy on the copy stream: no read from the store, no page cache.
- **Units streamed from the store**: :data:`LOADER_THREADS` threads
  (:class:`ReadAhead`) read the next units, in forward order, from the page cache into
  :data:`STAGING_SLOTS` pinned staging slots (``LayerStore.read_into``: one copy, with
  the cast to the compute dtype done in it), up to that many units ahead of the copy
  stream; each unit then goes to its arena slice with one non-blocking copy. A slot is
  refilled only after the copy out of it has finished: the thread that refills it waits
  for that copy's event alone, so neither the forwards nor the other reads wait on it.
- **Timing** is measured with CUDA events (:class:`EventClock`): ``compute_s`` is the
  GPU time of forwards less ``stall_s``, the GPU time the compute stream spent waiting
  for weights; ``h2d_s`` is copy-stream time, and ``load_s`` the host's reads (summed
  over the loader threads) plus it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import torch

from .errors import PlanError, StageError
from .planner import fmt_bytes
from .store.format import READ_ALIGN, align_up

# Threads that read a stage's units from the store into staging slots, side by side.
LOADER_THREADS = 3
# Pinned staging slots, each the size of the largest unit streamed from the store: reads
# run up to this many units ahead of the copy stream (one slot copying while the others fill).
STAGING_SLOTS = 4
# cudaHostRegister's flags: cudaHostRegisterDefault (page-locked, for this process's copies).
HOST_REGISTER_FLAGS = 0


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in pinned (page-locked) host memory."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class Ring:
    """First-in, first-out allocation of contiguous byte ranges of a fixed buffer.

    Units are used in the order they are loaded, so slices are freed in the order they
    were allocated; a slice goes after the newest one, or wraps to the start.

    Args:
        size: bytes in the buffer.
    """

    def __init__(self, size: int):
        self.size = size
        self.live: collections.deque[tuple[int, int]] = collections.deque()

    def alloc(self, n: int) -> int | None:
        """The start of a free slice of ``n`` bytes, now taken; None when there is no room yet.

        Raises:
            ValueError: ``n`` is larger than the whole buffer.
        """
        if n > self.size:
            raise ValueError(f"{n} bytes cannot fit a buffer of {self.size}")
        if not self.live:
            start = 0
        else:
            head, tail = self.live[-1][1], self.live[0][0]
            if head > tail:  # used: [tail, head); free: [head, size) and [0, tail)
                start = head if head + n <= self.size else 0 if n <= tail else None
            else:  # wrapped; free: [head, tail)
                start = head if head + n <= tail else None
        if start is not None:
            self.live.append((start, start + n))
        return start

    def free(self) -> tuple[int, int]:
        """Give back the oldest slice; returns its ``(start, end)``."""
        return self.live.popleft()

    def clear(self) -> None:
        """Give back every slice."""
        self.live.clear()


class EventClock:
    """Sums GPU time between pairs of CUDA events, per name, without stalling the GPU:
    pairs are read once they have completed."""

    def __init__(self):
        self.pending: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()

    @staticmethod
    def mark(stream: torch.cuda.Stream) -> torch.cuda.Event:
        """A timing event recorded on ``stream`` now."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def add(self, name: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Count the GPU time from ``start`` to ``end`` (same stream) under ``name``."""
        with self.lock:
            self.pending[name].append((start, end))

    def collect(self, wait: bool = False) -> dict[str, float]:
        """Seconds per name of the pairs that have completed (``wait``: all of them)."""
        with self.lock:
            for name, pairs in self.pending.items():
                while pairs and (wait or pairs[0][1].query()):
                    start, end = pairs.popleft()
                    end.synchronize()
                    self.totals[name] += start.elapsed_time(end) / 1000
            return dict(self.totals)


class PinnedRegion:
    """One host buffer of exactly ``nbytes``, page-locked for asynchronous copies with
    ``cudaHostRegister`` (and unregistered by :meth:`close`).

    Args:
        nbytes: its size.
        what: what it holds, for messages (``"stage 2's host units"``).
        advice: what to change when the host cannot lock that much memory.

    Raises:
        StageError: the host cannot allocate or page-lock ``nbytes``; says what to change.
    """

    def __init__(self, nbytes: int, what: str, advice: str):
        self.nbytes, self.registered = nbytes, False
        try:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        except RuntimeError as e:
            raise StageError(f"{what}: {fmt_bytes(nbytes)} of host memory cannot be allocated ({e}): {advice}") from e
        if nbytes:
            err = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes, HOST_REGISTER_FLAGS))
            if err:
                self.buffer = torch.empty(0, dtype=torch.uint8)
                raise StageError(f"{what}: cudaHostRegister could not pin {fmt_bytes(nbytes)} of host memory "
                                 f"(cudaError {err}; the locked-memory limit, `ulimit -l`, or the host's free RAM "
                                 f"is too small): {advice}")
            self.registered = True

    def close(self) -> None:
        """Unpin and free the buffer (after every copy out of it has finished)."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False
        self.buffer = torch.empty(0, dtype=torch.uint8)


@dataclass
class Slot:
    """A pinned staging slot and the event of the last copy out of it."""

    buffer: torch.Tensor
    copied: torch.cuda.Event | None = None


@dataclass
class Packed:
    """A unit's bytes in host memory as ``LayerStore.read_into`` packs them: ``source``
    (the ``uint8`` bytes to copy, from the first tensor to the end of the last) and each
    tensor's offset in it, dtype and shape."""

    source: torch.Tensor
    layout: dict[str, tuple[int, torch.dtype, torch.Size]]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], buffer: torch.Tensor) -> Packed:
        """The packing of ``tensors``, views of ``buffer`` (a flat ``uint8`` tensor)."""
        base = buffer.data_ptr()
        layout = {k: (t.data_ptr() - base, t.dtype, t.shape) for k, t in tensors.items()}
        used = max((off + t.numel() * t.element_size() for (off, _, _), t in zip(layout.values(), tensors.values())),
                   default=0)
        return cls(buffer[:used], layout)

    def views(self, dest: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors as views of ``dest``, a ``uint8`` tensor holding a copy of :attr:`source`."""
        return {k: dest[off:off + shape.numel() * dtype.itemsize].view(dtype).view(shape)
                for k, (off, dtype, shape) in self.layout.items()}


class ReadAhead:
    """Reads units from the store into pinned staging slots on several threads, ahead of
    their use, in a fixed cyclic order (the units a step streams from the store).

    :meth:`take` hands over the next unit's slot once its read is done; the caller starts
    the copy out of the slot and hands it back with that copy's event (:meth:`done`); the
    slot then takes the next read of the order, which waits for that event before it
    overwrites the slot. A :meth:`take` of another unit than the next (the order
    restarted after a failed step) forgets the reads ahead and starts again there.

    Args:
        read: ``read(unit, buffer)`` reads a unit into a slot's buffer and returns its tensors there.
        order: the units, in the order they are taken (cyclically).
        slots: the staging slots.
        threads: reads at once.
        name: the threads' name prefix.
    """

    def __init__(self, read, order: list[str], slots: list[Slot], threads: int, name: str):
        self.read, self.order = read, list(order)
        self.free: collections.deque[Slot] = collections.deque(slots)
        self.pending: collections.deque[tuple[str, Slot, concurrent.futures.Future]] = collections.deque()
        self.next = 0  # index into order of the next unit to read
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
        self.lock = threading.Lock()

    def take(self, unit: str) -> tuple[Slot, dict[str, torch.Tensor]]:
        """``unit``'s slot and its tensors there, once read (the read's error, if it failed)."""
        with self.lock:
            if not self.pending or self.pending[0][0] != unit:
                self._drop()
                self.next = self.order.index(unit)
                self._top_up()
            _, slot, future = self.pending.popleft()
            try:
                return slot, future.result()
            except BaseException:
                self.free.append(slot)
                raise

    def done(self, slot: Slot, copied: torch.cuda.Event | None) -> None:
        """A taken slot is copied out of once ``copied`` has passed (None: nothing was
        copied out of it); the next read goes into it after that."""
        with self.lock:
            if copied is not None:
                slot.copied = copied
            self.free.append(slot)
            if copied is not None:
                self._top_up()

    def _top_up(self) -> None:
        while self.free:
            slot = self.free.popleft()
            unit = self.order[self.next % len(self.order)]
            self.next += 1
            self.pending.append((unit, slot, self.pool.submit(self._fill, unit, slot)))

    def _fill(self, unit: str, slot: Slot) -> dict[str, torch.Tensor]:
        if slot.copied is not None:
            slot.copied.synchronize()  # the copy out of this slot has finished (this event only)
        return self.read(unit, slot.buffer)

    def _drop(self) -> None:
        """Forget the reads ahead: wait for those running, and free their slots."""
        concurrent.futures.wait([future for _, _, future in self.pending])
        while self.pending:
            self.free.append(self.pending.popleft()[1])

    def close(self) -> None:
        """Wait for the reads running, and end the threads."""
        with self.lock:
            self._drop()
        self.pool.shutdown(wait=True)


@dataclass
class Loaded:
    """A streamed unit on its way to the GPU: its tensors (views of the arena) and the
    event after which they hold its weights."""

    tensors: dict[str, torch.Tensor]
    copied: torch.cuda.Event


class CudaMemory:
    """A CUDA stage's weights (see the module docstring). Resident units are loaded first
    (:meth:`load_resident`); :meth:`prepare` then sizes the arena, fills the pinned host
    units, and sizes the staging slots for the streamed ones.

    Args:
        store: the layer store.
        dtype: compute dtype.
        device: the stage's CUDA device.
        budget: bytes of weights the stage may hold; None: unlimited (nothing streams).
        unit_bytes: bytes of each unit in ``dtype``.
        stage: stage index, for messages.
        host_units: streamed units kept in pinned host memory (the plan's ``host_units``).
    """

    # each fetch copies a unit into an arena slice that a later unit overwrites
    keeps_tensors = False

    def __init__(self, store, dtype: torch.dtype, device: torch.device, budget: int | None,
                 unit_bytes: dict[str, int], stage: int, host_units=()):
        self.store, self.dtype, self.device, self.budget = store, dtype, device, budget
        self.unit_bytes, self.stage = unit_bytes, stage
        self.host_units = tuple(host_units)
        self.resident_bytes = 0
        self.clock = EventClock()
        self.read_s = 0.0
        self.read_lock = threading.Lock()  # read_s, from the loader threads
        self.h2d_bytes = 0
        self.cond = threading.Condition()
        self.freed: list[tuple[int, int, torch.cuda.Event]] = []  # arena slices given back, and when
        self.arena_bytes = 0
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.ring = Ring(0)
        self.copy_stream = None
        self.host: dict[str, Packed] = {}  # host unit -> its bytes in the pinned host region
        self.host_region: PinnedRegion | None = None
        self.staging_region: PinnedRegion | None = None
        self.reader: ReadAhead | None = None

    def prepare(self, streamed: list[str]) -> None:
        """Allocate the arena (the budget less the resident units, no more than all the
        streamed units and no less than the largest); read the host units into their
        pinned region; pin the staging slots of the units streamed from the store.

        Raises:
            PlanError: a host unit is not one of ``streamed``.
            StageError: the host cannot pin the host units' or the slots' bytes.
        """
        stray = [u for u in self.host_units if u not in streamed]
        if stray:
            raise PlanError(f"stage {self.stage}'s plan keeps {stray} in pinned host memory, but only units it "
                            "streams whole can be kept there (not resident ones, nor the embeddings, which are read "
                            "by row): plan it again")
        if not streamed:
            return
        sizes = {u: self.store.packed_bytes(u, self.dtype) for u in streamed}
        largest = max(sizes.values())
        room = sum(sizes.values()) if self.budget is None else self.budget - self.resident_bytes
        self.arena_bytes = max(largest, min(room, sum(sizes.values()))) // READ_ALIGN * READ_ALIGN
        from_store = [u for u in streamed if u not in self.host_units]
        with torch.cuda.device(self.device):
            try:
                self._allocate(streamed, from_store, sizes)
            except BaseException:
                self.close()
                raise

    def _allocate(self, streamed: list[str], from_store: list[str], sizes: dict[str, int]) -> None:
        """The arena and copy stream, the host units' region (filled), the staging slots and their readers."""
        self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
        self.ring = Ring(self.arena_bytes)
        self.copy_stream = torch.cuda.Stream(self.device)
        self._fill_host([u for u in streamed if u in self.host_units], sizes)
        if from_store:
            n, each = min(STAGING_SLOTS, len(from_store)), max(sizes[u] for u in from_store)
            self.staging_region = PinnedRegion(n * each, f"stage {self.stage}'s {n} staging slots",
                                               "free host memory, or give the stage a budget that keeps more "
                                               "units resident")
            slots = [Slot(self.staging_region.buffer[i * each:(i + 1) * each]) for i in range(n)]
            self.reader = ReadAhead(self.read, from_store, slots, min(LOADER_THREADS, n),
                                    f"read-stage{self.stage}")

    def _fill_host(self, units: list[str], sizes: dict[str, int]) -> None:
        """Read the host units from the store, once, into one pinned region of their bytes."""
        if not units:
            return
        self.host_region = PinnedRegion(
            sum(sizes[u] for u in units), f"stage {self.stage}'s host units ({len(units)} units)",
            "lower the host memory the plan keeps units in (host_memory_per_node) so fewer units stay in host RAM, "
            "or free host memory")
        buffers, offset = {}, 0
        for u in units:
            buffers[u] = self.host_region.buffer[offset:offset + sizes[u]]
            offset += sizes[u]
        with concurrent.futures.ThreadPoolExecutor(LOADER_THREADS, f"fill-stage{self.stage}") as pool:
            read = {u: pool.submit(self.read, u, b) for u, b in buffers.items()}
            for u, b in buffers.items():
                self.host[u] = Packed.of(read[u].result(), b)

    def read(self, unit: str, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Read ``unit`` from the store into ``buffer`` (a flat ``uint8`` host tensor)."""
        t0 = time.perf_counter()
        tensors = self.store.read_into(unit, self.dtype, buffer)
        with self.read_lock:
            self.read_s += time.perf_counter() - t0
        return tensors

    def compute_stream(self) -> torch.cuda.Stream:
        """The stream this thread's forwards run on."""
        return torch.cuda.current_stream(self.device)

    def held_bytes(self) -> int:
        """Bytes of weights held: the resident units and the arena slices of streamed units
        not yet released (a slice's bytes, aligned, not the unit's)."""
        with self.cond:
            return self.resident_bytes + sum(end - start for start, end in self.ring.live)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Not here: a streamed unit's arena slice holds it for one use (``keeps_tensors`` is False)."""
        raise TypeError(f"{type(self).__name__} hands a streamed unit's tensors over at each fetch: "
                        "it keeps none for the stage's lifetime")

    # ------------------------------------------------------------------ resident units

    def load_resident(self, unit: str) -> dict[str, torch.Tensor]:
        """A resident unit's tensors, copied to the device on the compute stream."""
        t0 = time.perf_counter()
        tensors = {k: t.to(self.device) for k, t in self.store.load(unit, self.dtype, "cpu").items()}
        self.read_s += time.perf_counter() - t0
        self.resident_bytes += self.unit_bytes[unit]
        return tensors

    # ------------------------------------------------------------------ streamed units

    def fetch(self, unit: str, stopped: threading.Event | None = None) -> Loaded | None:
        """Wait for ``unit``'s bytes in host memory (its pinned slice for a host unit, else
        its staging slot, read ahead) and a slice of the arena, and start its copy there.
        With ``stopped`` (the loader thread), returns None once it is set; without (a
        forward loading for itself), the slice must be free.

        Raises:
            StoreError: its read from the store failed.
        """
        with torch.cuda.device(self.device):
            slot = None
            if unit in self.host:
                packed = self.host[unit]
            else:
                slot, tensors = self.reader.take(unit)
                packed = Packed.of(tensors, slot.buffer)
            end = None
            try:
                used = packed.source.numel()
                start, waits = self._slice(align_up(max(used, 1)), stopped)
                if start is None:
                    return None
                with torch.cuda.stream(self.copy_stream):
                    for event in waits:  # the units that held this slice are done with it
                        self.copy_stream.wait_event(event)
                    begin = self.clock.mark(self.copy_stream)
                    self.arena[start:start + used].copy_(packed.source, non_blocking=True)
                    end = self.clock.mark(self.copy_stream)
            finally:
                if slot is not None:
                    self.reader.done(slot, end)
            self.clock.add("h2d", begin, end)
            self.h2d_bytes += used
            return Loaded(packed.views(self.arena[start:start + used]), end)

    def _slice(self, n: int, stopped: threading.Event | None) -> tuple[int | None, list[torch.cuda.Event]]:
        """Take ``n`` bytes of the arena once there is room; returns their start and the
        events the copy into them must wait for."""
        with self.cond:
            while (start := self.ring.alloc(n)) is None:
                assert stopped is not None, f"stage {self.stage}: no room in the arena for a unit loaded in place"
                if stopped.is_set():
                    return None, []
                self.cond.wait(0.5)
            self.freed = [f for f in self.freed if not f[2].query()]
            return start, [event for a, b, event in self.freed if a < start + n and start < b]

    def wait_mark(self) -> torch.cuda.Event:
        """When the compute stream starts waiting for a unit."""
        return self.clock.mark(self.compute_stream())

    def ready(self, unit: str, loaded: Loaded, mark: torch.cuda.Event) -> dict[str, torch.Tensor]:
        """Make the compute stream wait for the unit's copy; its tensors."""
        stream = self.compute_stream()
        stream.wait_event(loaded.copied)
        self.clock.add("stall", mark, self.clock.mark(stream))
        return loaded.tensors

    def release(self, unit: str) -> None:
        """A forward has queued its last use of ``unit``: its slice is free once the
        compute stream passes this point."""
        event = torch.cuda.Event()
        event.record(self.compute_stream())
        with self.cond:
            start, end = self.ring.free()
            self.freed.append((start, end, event))
            self.cond.notify_all()

    def discard(self, unit: str, loaded: Loaded) -> None:
        """A fetched unit no forward took: :meth:`reset` frees the whole arena."""

    def reset(self, dropped: list[str]) -> None:
        """After a failed forward: every slice is free once the compute stream passes this point."""
        event = torch.cuda.Event()
        event.record(self.compute_stream())
        with self.cond:
            self.ring.clear()
            self.freed.append((0, self.ring.size, event))
            self.cond.notify_all()

    def wake(self) -> None:
        """Wake a loader waiting for room (to see that it should stop)."""
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------ forwards and hand-offs

    def begin_forward(self) -> torch.cuda.Event:
        """Start timing a forward on the GPU."""
        return self.clock.mark(self.compute_stream())

    def end_forward(self, begun: torch.cuda.Event) -> None:
        """A forward's kernels are queued: time them on the GPU."""
        self.clock.add("forward", begun, self.clock.mark(self.compute_stream()))
        self.clock.collect()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """An input of a forward on the device: from pinned memory, without blocking the host."""
        if t.device.type != "cpu":
            return t.to(self.device)
        return (t if t.is_pinned() else pinned_empty(t.shape, t.dtype).copy_(t)).to(self.device, non_blocking=True)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A forward's output in pinned host memory, copied once its kernels are done."""
        host = pinned_empty(t.shape, t.dtype)
        host.copy_(t, non_blocking=True)
        self.compute_stream().synchronize()
        return host

    def stats(self) -> dict:
        """Weight bytes on the device, GPU seconds, host-to-device bytes, pinned host bytes
        (staging slots; host units) and the device's peak allocation."""
        t = self.clock.collect(wait=True)
        return {
            "peak_weight_bytes": self.resident_bytes + self.arena_bytes,
            "load_s": round(self.read_s + t.get("h2d", 0.0), 4),
            "stall_s": round(t.get("stall", 0.0), 4),
            "compute_s": round(max(0.0, t.get("forward", 0.0) - t.get("stall", 0.0)), 4),
            "h2d_s": round(t.get("h2d", 0.0), 4),
            "h2d_bytes": self.h2d_bytes,
            "pinned_bytes": self.staging_region.nbytes if self.staging_region else 0,
            "host_pinned_bytes": self.host_region.nbytes if self.host_region else 0,
            "host_units": len(self.host_units),
            "device_peak_bytes": torch.cuda.max_memory_allocated(self.device),
        }

    def close(self) -> None:
        """Wait for the reads and copies in flight, then free the arena (and its slices) and
        unpin and free the host units' region and the staging slots."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        with self.cond:
            self.ring.clear()
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.host = {}
        for region in (self.host_region, self.staging_region):
            if region is not None:
                region.close()
