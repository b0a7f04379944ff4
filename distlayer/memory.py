"""The one seam between a stage's runner and its device: where its weights live.

A stage's weights live in a *memory tier*: ``streaming.HostMemory`` (a CPU stage that
reads its units into memory), ``streaming.MappedMemory`` (a CPU stage that maps its
shards in place) or ``cuda_stream.CudaMemory`` (a GPU stage: an arena, pinned staging, a
copy stream). :class:`WeightMemory` names everything ``runner.LayerRunner`` and
``streaming.Streamer`` call on one, with each member's contract; a tier is any class that
has them all (there is no base class to inherit). What differs between tiers and changes
what the runner does is a capability the tier declares (:attr:`WeightMemory.keeps_tensors`),
never a type test.

The calls come in this order: ``load_resident`` for each resident unit, then (where
``keeps_tensors``) ``tensors`` for each whole streamed unit, then ``prepare`` once. Each
forward runs between ``begin_forward`` and ``end_forward``; within it ``Streamer.take``
calls ``wait_mark``, ``fetch`` (the forward itself without prefetch) and ``ready``, and
``Streamer.release`` calls ``release``, for each streamed unit in order, while the loader
thread calls ``fetch`` ahead of them with its stop event. ``Streamer.stop`` calls ``wake``
and ``discard``; after a failed forward ``Streamer.restart`` calls ``reset``. ``close``
comes last, after the streamer stopped.

``tests/test_memory_contract.py`` runs every tier in :data:`TIERS` through that sequence
and checks each has every member; a new tier goes in :data:`TIERS`. No torch import:
tensors appear in annotations only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import threading

    import torch

# Every tier, by dotted name (importing them imports torch, and CUDA's tier its module).
TIERS = ("distlayer.streaming.HostMemory", "distlayer.streaming.MappedMemory",
         "distlayer.cuda_stream.CudaMemory")

# The keys of stats() that LayerRunner.stats reads or reports on every tier; a tier may add more.
STATS_KEYS = ("peak_weight_bytes", "load_s", "stall_s", "compute_s")


@runtime_checkable
class WeightMemory(Protocol):
    """Where one stage's weights live, how they stream, and how its forwards are timed.

    ``loaded`` (what :meth:`fetch` returns) and the marks of :meth:`wait_mark` and
    :meth:`begin_forward` are the tier's own: callers only hand them back.
    """

    keeps_tensors: bool
    """Whether a streamed unit's tensors stay valid for the stage's lifetime (only their
    pages come and go): the runner then assigns them to its module once, from
    :meth:`tensors`, and neither re-assigns them per forward nor drops them after;
    otherwise each :meth:`ready` hands over fresh tensors that the runner assigns, and
    drops to the meta device after the unit's forward."""

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The lifetime tensors of streamed unit ``name``, which the runner assigns at
        set-up; only where :attr:`keeps_tensors` (elsewhere it raises TypeError)."""

    def load_resident(self, unit: str) -> dict[str, torch.Tensor]:
        """A resident unit's tensors on the device, held for the stage's lifetime; the
        runner calls it for each resident unit at set-up, before :meth:`prepare`."""

    def prepare(self, streamed: list[str]) -> None:
        """Set up streaming of ``streamed`` (units or chunks, in forward order); the runner
        calls it once, after the resident units are loaded and before the streamer starts."""

    def fetch(self, unit: str, stopped: threading.Event | None = None) -> Any:
        """Load ``unit`` within the budget and return its handle for :meth:`ready`. The
        loader thread passes ``stopped`` and waits for room, getting None once it is set;
        a forward loading for itself (no prefetch) passes none, and the room must be there."""

    def wait_mark(self) -> Any:
        """A mark of when a forward starts waiting for a unit, handed back to :meth:`ready`
        (``Streamer.take``, on the forward's thread)."""

    def ready(self, unit: str, loaded: Any, mark: Any) -> dict[str, torch.Tensor]:
        """The tensors of a fetched unit, usable by the forward's next kernels; counts the
        wait since ``mark`` as stall (``Streamer.take``, on the forward's thread)."""

    def release(self, unit: str) -> None:
        """The forward has queued its last use of ``unit``: its bytes may be given back,
        now or by the tier's next :meth:`fetch` (``Streamer.release``)."""

    def discard(self, unit: str, loaded: Any) -> None:
        """Give back a fetched unit that no forward took (``Streamer.stop``, for what the
        loader had queued)."""

    def reset(self, dropped: list[str]) -> None:
        """After a failed forward, with the loader stopped: ``dropped`` units were taken and
        never released; give them back (``Streamer.restart``)."""

    def wake(self) -> None:
        """Wake a loader waiting for room, so it sees its stop event (``Streamer.stop``)."""

    def held_bytes(self) -> int:
        """Bytes of weights held now: resident units plus streamed ones fetched and not yet
        given back (a released unit counts until the tier gives it back: by its next
        fetch, or :meth:`close`)."""

    def begin_forward(self) -> Any:
        """Start timing a forward; the mark goes to :meth:`end_forward` (``LayerRunner.forward``)."""

    def end_forward(self, begun: Any) -> None:
        """A forward's work is queued: count its time less its waits for weights as compute."""

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A forward's input (ids, mask, positions, hidden states) on the stage's device."""

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A forward's output in host memory, complete and ready to send to the next stage."""

    def stats(self) -> dict:
        """At least the keys of :data:`STATS_KEYS` (``LayerRunner.stats`` pops
        ``peak_weight_bytes`` and reports the rest as they are)."""

    def close(self) -> None:
        """Give back everything (buffers, mapped pages); the runner calls it last, after
        the streamer stopped."""


def members() -> frozenset[str]:
    """The names a tier must have: :class:`WeightMemory`'s methods and attributes."""
    names = {*vars(WeightMemory), *WeightMemory.__annotations__}
    return frozenset(n for n in names if not n.startswith("_"))


def tiers() -> list[type]:
    """The classes of :data:`TIERS` (imports torch)."""
    out = []
    for dotted in TIERS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out
