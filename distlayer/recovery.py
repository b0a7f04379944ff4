"""Replay recovery: a stage that dies or hangs is replaced, and every KV cache in flight
is rebuilt by replaying what the driver sent, so generation goes on as if nothing happened.

How the caches are rebuilt, and why this way: the driver keeps a :class:`Journal` of every
step and cache operation it sent for the sequences still in flight: token ids, positions
and masks, never hidden states. After a loss, every stage (replacements and survivors,
whose caches may be part-way through the step that was in flight) starts from empty
caches, and the journal is sent again, in its order and with its shapes. Each stage then
computes exactly what it computed before, so the rebuilt caches are bit for bit the ones
that were lost and greedy output equals an uninterrupted run's (sampling happens in the
driver, whose seeded generators a loss does not touch).

Petals' way, each stage's input history kept at the stage before it, would replay only the
lost stage, but it holds ``positions x hidden`` values per sequence at every boundary,
more where the stage before was the one lost, and survivors part-way through a step
would still need rolling back. The journal holds a few integers per token, survives the
loss of any stage (or several), and costs one replay of the steps so far, pipelined with
no round trip to this process per step (measured: benchmarks/README.md).

:class:`Recovering` wraps the pipeline's transport and does all of this behind the same
``submit``/``fetch``/``control`` calls, so ``generate``, the scheduler, jobs and the
server survive a lost stage without a line of their own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import StageError, StageLost
from .transport.base import Handle, Transport, Work, in_request

RESTART_WINDOW = 600.0  # seconds over which max_restarts counts a stage's replacements


# --------------------------------------------------------------------------- the journal


def pack_mask(mask):
    """A left-padded ``[B, L]`` mask as ``(leading zeros per row, L)``; any other mask as it is."""
    if mask is None or mask.dim() != 2:
        return mask
    lead = (mask == 0).sum(1)
    if torch.equal(unpack_mask((lead, mask.shape[1], mask.dtype)), mask):
        return lead.to(torch.int32), mask.shape[1], mask.dtype
    return mask


def unpack_mask(packed):
    """The mask :func:`pack_mask` packed."""
    if not isinstance(packed, tuple):
        return packed
    lead, width, dtype = packed
    return (torch.arange(width)[None, :] >= lead[:, None].long()).to(dtype)


@dataclass(eq=False)
class Step:
    """A forward the driver sent: its work (mask packed, no feed) and its input, token ids or
    the key of the earlier step whose picked tokens it took; ``tokens``: what this step
    picked, once fetched."""

    work: Work
    x: Any
    group: str
    tokens: Any = None

    def replayable(self, spent: bool = False, again: bool = False) -> Work:
        """The work to send; ``spent`` (its result was fetched already): it only rebuilds the
        KV caches, so the last stage computes no logits and picks nothing. ``again`` (a
        replay) runs by itself, not with its first round (not all of which is replayed)."""
        work = dataclasses.replace(self.work, mask=unpack_mask(self.work.mask), feed=None)
        if again:
            work = dataclasses.replace(work, together=None)
        return dataclasses.replace(work, logits_to_keep=None, pick=False) if spent else work


@dataclass(eq=False)
class Op:
    """A cache operation the driver sent to every stage (``select_rows``, ``merge_caches``)."""

    op: str
    args: tuple
    group: str


class Journal:
    """What was sent for the KV caches still alive, in the order it was sent. A dropped
    request's entries go; a merged cache's entries become the merged-into cache's."""

    def __init__(self):
        self.entries: list[Step | Op] = []
        self.steps: dict[str, Step] = {}

    def step(self, work: Work, x) -> Step:
        step = Step(dataclasses.replace(work, mask=pack_mask(work.mask), feed=None), x, work.cache_id)
        self.entries.append(step)
        self.steps[work.key] = step
        return step

    def control(self, op: str, args: tuple) -> None:
        if op == "drop":
            self.forget(args[0])
            return
        group = args[0]
        if op == "merge_caches":
            for e in self.entries:
                if e.group == args[1]:
                    e.group = group
        self.entries.append(Op(op, args, group))

    def forget(self, cache_id: str) -> list[str]:
        """Drop request ``cache_id``'s entries; returns the keys of its steps."""
        gone = [e for e in self.entries if in_request(e.group, cache_id)]
        if not gone:
            return []
        self.entries = [e for e in self.entries if not in_request(e.group, cache_id)]
        keys = [e.work.key for e in gone if isinstance(e, Step)]
        for key in keys:
            del self.steps[key]
        return keys


# --------------------------------------------------------------------------- restarts


class Restarts:
    """Replacements per stage: counted against ``max_restarts`` within :data:`RESTART_WINDOW`,
    and the seconds spent recovering."""

    def __init__(self, stages: int, limit: int):
        self.limit = limit
        self.times: list[list[float]] = [[] for _ in range(stages)]
        self.count = [0] * stages
        self.seconds = [0.0] * stages

    def admit(self, stage: int, where: str, why: str) -> None:
        """Count a replacement of ``stage``, or raise a :class:`StageError` (not a
        ``StageLost``: nothing more will be tried) when it is one too many."""
        now = time.monotonic()
        recent = [t for t in self.times[stage] if now - t < RESTART_WINDOW]
        if len(recent) >= self.limit:
            done = (f"it was replaced {len(recent)} times in the last {RESTART_WINDOW / 60:g} minutes, the limit "
                    f"(max_restarts={self.limit})") if self.limit else "max_restarts=0, so it was not replaced"
            raise StageError(f"stage {stage} on {where} {why}; {done}. The requests in flight fail: look at that "
                             "node's memory and logs (the kernel's OOM killer, `ray logs`), raise max_restarts, or "
                             "close this model and load it again")
        self.times[stage] = recent + [now]
        self.count[stage] += 1

    def stats(self, stage: int) -> dict:
        return {"restarts": self.count[stage], "recovery_s": round(self.seconds[stage], 3)}


# --------------------------------------------------------------------------- the transport


class Recovering(Transport):
    """A transport that replaces lost stages and replays the journal (see the module docstring).

    Args:
        inner: the transport over the stages as they are.
        pipeline: has ``heal(error, inner) -> (transport, replaced stage indices)``, which
            replaces the lost stages (or raises), ``recovered()``, called when nothing is in
            flight any more after a recovery, and ``restarts`` (:class:`Restarts`).
    """

    def __init__(self, inner: Transport, pipeline):
        self.inner, self.pipeline = inner, pipeline
        self.journal = Journal()
        self.live: dict[str, Handle] = {}  # steps submitted and not yet fetched: key -> the inner handle
        # generate() and a scheduler may share the transport from two threads: the journal,
        # the handles and recovery are changed under this lock; a fetch waits outside it
        self._lock = threading.RLock()
        self._epoch = 0  # recoveries so far: a thread that saw an older transport fail retries on the new one
        self._restock = False  # a recovery happened: tell the pipeline once nothing is in flight

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def timeout(self) -> float | None:
        return self.inner.timeout

    @property
    def feeds(self) -> bool:
        return self.inner.feeds

    def submit(self, work: Work, x) -> Handle:
        with self._lock:
            step = self.journal.step(work, x.key if isinstance(x, Handle) else x)
            self.live[work.key] = None  # in flight from now: a send that fails is replayed as live, not spent
            self._do(lambda: self._send(step, self.live))  # when it fails, the replay sends it
        return Handle(work.key, picked=work.pick)

    def fetch(self, handle: Handle):
        while True:
            with self._lock:
                inner, epoch, inner_handle = self.inner, self._epoch, self.live[handle.key]
            try:
                out = inner.fetch(inner_handle)
                break
            except StageLost as e:
                with self._lock:
                    if epoch == self._epoch:  # else another thread has recovered already
                        self._recover(e)
        with self._lock:
            del self.live[handle.key]
            step = self.journal.steps.get(handle.key)
            if step is not None and handle.picked:
                step.tokens = out  # later replays feed these instead of waiting on this step again
        return out

    def control(self, op: str, *args) -> None:
        with self._lock:
            self.journal.control(op, args)
            self._do(lambda: self.inner.control(op, *args))

    def drop(self, cache_id: str) -> None:
        with self._lock:
            for key in self.journal.forget(cache_id):
                self.live.pop(key, None)
            self._do(lambda: self.inner.drop(cache_id))
            if self._restock and not self.journal.entries:
                self._restock = False
                self.pipeline.recovered()

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def close(self) -> None:
        self.inner.close()

    def _do(self, fn) -> None:
        try:
            fn()
        except StageLost as e:
            self._recover(e)  # the replay does what fn was doing

    def _send(self, step: Step, handles: dict[str, Handle], spent: bool = False, again: bool = False) -> None:
        x = step.x
        if isinstance(x, str):  # the tokens an earlier step picked: known once fetched, else its handle
            source = self.journal.steps.get(x)
            x = source.tokens if source is not None and source.tokens is not None else handles[x]
        handles[step.work.key] = self.inner.submit(step.replayable(spent, again), x)

    def _recover(self, error: StageLost) -> None:
        """Replace the lost stages and replay the journal; a loss during the replay starts
        over (each replacement counted against max_restarts). Called with the lock held."""
        self._epoch += 1
        while True:
            t0 = time.monotonic()
            self.inner, replaced = self.pipeline.heal(error, self.inner)
            try:
                self._replay()
            except StageLost as e:
                error = e
                continue
            finally:
                for i in replaced:
                    self.pipeline.restarts.seconds[i] += time.monotonic() - t0
            self._restock = True
            return

    def _replay(self) -> None:
        handles: dict[str, Handle] = {}
        spent = []  # results the caller already has: fetched and thrown away
        for e in self.journal.entries:
            if isinstance(e, Step):
                self._send(e, handles, spent=e.work.key not in self.live, again=True)
                if e.work.key not in self.live:
                    spent.append(handles[e.work.key])
            else:
                self.inner.control(e.op, *e.args)
        for h in spent:
            self.inner.fetch(h)
        for key in self.live:
            self.live[key] = handles[key]
