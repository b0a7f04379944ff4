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
- **Host side**: a unit is read from disk straight into one of two reusable pinned
  staging buffers (``LayerStore.read_into``: one copy from the page cache, with the cast
  to the compute dtype done in that copy), then copied to its arena slice with one
  non-blocking copy on a side stream. A staging buffer is refilled only after the copy
  out of it has finished.
- **Timing** is measured with CUDA events (:class:`EventClock`): ``compute_s`` is the
  GPU time of forwards less ``stall_s``, the GPU time the compute stream spent waiting
  for weights; ``h2d_s`` is copy-stream time, and ``load_s`` the host's disk reads plus it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import torch

from .store.format import READ_ALIGN, align_up

# Staging buffers in pinned host memory: one filled from disk while the other is copied.
STAGING_BUFFERS = 2


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


@dataclass
class Staging:
    """A pinned host buffer and the event of the last copy out of it."""

    buffer: torch.Tensor
    copied: torch.cuda.Event | None = None


@dataclass
class Loaded:
    """A streamed unit on its way to the GPU: its tensors (views of the arena) and the
    event after which they hold its weights."""

    tensors: dict[str, torch.Tensor]
    copied: torch.cuda.Event


class CudaMemory:
    """A CUDA stage's weights (see the module docstring). Resident units are loaded first
    (:meth:`load_resident`); :meth:`prepare` then sizes the arena and staging buffers
    for the streamed ones.

    Args:
        store: the layer store.
        dtype: compute dtype.
        device: the stage's CUDA device.
        budget: bytes of weights the stage may hold; None: unlimited (nothing streams).
        unit_bytes: bytes of each unit in ``dtype``.
        stage: stage index, for messages.
    """

    # each fetch copies a unit into an arena slice that a later unit overwrites
    keeps_tensors = False

    def __init__(self, store, dtype: torch.dtype, device: torch.device, budget: int | None,
                 unit_bytes: dict[str, int], stage: int):
        self.store, self.dtype, self.device, self.budget = store, dtype, device, budget
        self.unit_bytes, self.stage = unit_bytes, stage
        self.resident_bytes = 0
        self.clock = EventClock()
        self.read_s = 0.0
        self.h2d_bytes = 0
        self.cond = threading.Condition()
        self.freed: list[tuple[int, int, torch.cuda.Event]] = []  # arena slices given back, and when
        self.arena_bytes = 0
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.ring = Ring(0)
        self.copy_stream = None
        self.staging: list[Staging] = []
        self.turn = 0

    def prepare(self, streamed: list[str]) -> None:
        """Allocate the arena (the budget less the resident units, no more than all the
        streamed units and no less than the largest) and the staging buffers."""
        if not streamed:
            return
        sizes = [self.store.packed_bytes(u, self.dtype) for u in streamed]
        largest = max(sizes)
        room = sum(sizes) if self.budget is None else self.budget - self.resident_bytes
        self.arena_bytes = max(largest, min(room, sum(sizes))) // READ_ALIGN * READ_ALIGN
        with torch.cuda.device(self.device):
            self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
            self.ring = Ring(self.arena_bytes)
            self.copy_stream = torch.cuda.Stream(self.device)
            self.staging = [Staging(pinned_empty(largest, torch.uint8)) for _ in range(STAGING_BUFFERS)]

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
        """Read ``unit`` into a staging buffer, wait for a slice of the arena, and start
        its copy there. With ``stopped`` (the loader thread), returns None once it is set;
        without (a forward loading for itself), the slice must be free."""
        with torch.cuda.device(self.device):
            staging = self.staging[self.turn]
            self.turn = (self.turn + 1) % len(self.staging)
            if staging.copied is not None:
                staging.copied.synchronize()  # the copy out of it has finished
            t0 = time.perf_counter()
            host = self.store.read_into(unit, self.dtype, staging.buffer)
            self.read_s += time.perf_counter() - t0
            base = staging.buffer.data_ptr()
            offsets = {k: t.data_ptr() - base for k, t in host.items()}
            used = max((offsets[k] + t.numel() * t.element_size() for k, t in host.items()), default=0)
            start, waits = self._slice(align_up(max(used, 1)), stopped)
            if start is None:
                return None
            with torch.cuda.stream(self.copy_stream):
                for event in waits:  # the units that held this slice are done with it
                    self.copy_stream.wait_event(event)
                begin = self.clock.mark(self.copy_stream)
                self.arena[start:start + used].copy_(staging.buffer[:used], non_blocking=True)
                end = self.clock.mark(self.copy_stream)
            self.clock.add("h2d", begin, end)
            staging.copied = end
            self.h2d_bytes += used
            tensors = {k: self.arena[start + offsets[k]:start + offsets[k] + t.numel() * t.element_size()]
                       .view(t.dtype).view(t.shape) for k, t in host.items()}
            return Loaded(tensors, end)

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
        """Weight bytes on the device, GPU seconds, host-to-device bytes, pinned bytes and the
        device's peak allocation."""
        t = self.clock.collect(wait=True)
        return {
            "peak_weight_bytes": self.resident_bytes + self.arena_bytes,
            "load_s": round(self.read_s + t.get("h2d", 0.0), 4),
            "stall_s": round(t.get("stall", 0.0), 4),
            "compute_s": round(max(0.0, t.get("forward", 0.0) - t.get("stall", 0.0)), 4),
            "h2d_s": round(t.get("h2d", 0.0), 4),
            "h2d_bytes": self.h2d_bytes,
            "pinned_bytes": sum(s.buffer.numel() for s in self.staging),
            "device_peak_bytes": torch.cuda.max_memory_allocated(self.device),
        }

    def close(self) -> None:
        """Wait for copies in flight, then free the arena (and its slices) and the staging buffers."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        with self.cond:
            self.ring.clear()
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.staging = []
