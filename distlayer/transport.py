"""Moving work from stage to stage: the typed messages and the transport interface.

A :class:`Work` is one micro-batch's forward through every stage; a :class:`Payload` is
the tensor that travels with it from hop to hop. A :class:`Transport` submits work at the
first stage and fetches the last stage's output. Two implementations:

- :class:`RefTransport` (here): each hop is a call on the next stage whose argument is
  the previous call's result. On Ray that result is an object ref, so hidden states go
  from actor to actor without passing the driver; in one process it is the value.
- ``channel.SocketTransport``: every stage serves a loop on its mailbox and sends its
  output over a socket straight to the next, with no Ray call per step.

The driver's scheduler (``scheduler.py``) only calls ``submit``, ``fetch`` and
``drop``, so a new transport does not touch it.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass
class Work:
    """One micro-batch's forward through every stage.

    Attributes:
        key: unique per submission.
        cache_id: the KV cache the stages extend (``request:k`` for micro-batch k).
        mask: ``[B, past + T]`` attention mask, or None (no padding).
        pos: ``[B, T]`` positions of the new tokens.
        logits_to_keep: how many final positions get logits on the last stage (None: none,
            for a step sent only to rebuild KV caches).
        pick: the last stage returns the greedy next token of each row (``[B]``)
            instead of logits.
        feed: the key of an earlier step whose picked tokens are this step's input (set
            by transports that pass tokens from the last stage to the first themselves).
    """

    key: str
    cache_id: str
    mask: Any
    pos: Any
    logits_to_keep: int | None = 1
    pick: bool = False
    feed: str | None = None


class Failed:
    """An exception raised by a stage, passed down the chain so the driver raises it."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


@dataclass
class Payload:
    """What travels with a :class:`Work` from hop to hop: token ids ``[B, T]`` or picked
    tokens ``[B]`` into the first stage, hidden states ``[B, T, H]`` between stages, logits
    or picked tokens out of the last; or the :class:`Failed` of a stage before."""

    x: Any
    sent_at: float

    @classmethod
    def now(cls, x) -> "Payload":
        """A payload sent now."""
        return cls(x, time.time())


@dataclass
class Handle:
    """A submitted step, for :meth:`Transport.fetch` (and as the next step's input)."""

    key: str
    ref: Any = None       # RefTransport: the last stage's result (a Ray object ref, or the value)
    picked: bool = False  # the last stage picked tokens


def in_request(key: str, request: str) -> bool:
    """Whether a cache id or message group ``key`` belongs to ``request`` (``request`` or ``request:k``)."""
    return key == request or key.startswith(request + ":")


class Stages(Protocol):
    """The driver's handle on its stage actors (Ray actors, or objects in this process)."""

    actors: list
    remote: bool

    def call(self, actor, method: str, *args) -> Any:
        """Call ``actor.method(*args)``: a Ray object ref, or the value in one process."""

    def call_with(self, actor, fn: Callable, *args) -> Any:
        """Run ``fn(stage_actor_object, *args)`` where the actor lives; a ref or the value."""

    def get(self, refs, timeout: float | None = None) -> Any:
        """The values of refs, waiting at most ``timeout`` seconds (raising a stage's error,
        or ``StageLost`` for a stage that died or did not answer in time)."""


class Transport:
    """Moves work from stage to stage; see the module docstring.

    Attributes:
        timeout: seconds ``fetch`` and ``control`` wait before raising ``StageLost`` (None: no limit).
    """

    name = "?"
    timeout: float | None = None

    def submit(self, work: Work, x) -> Handle:
        """Start ``work`` at the first stage with input ``x``: a tensor, or the
        :class:`Handle` of an earlier step whose last stage picked the tokens."""
        raise NotImplementedError

    def fetch(self, handle: Handle):
        """The last stage's output of a submitted step: logits ``[B, T, V]`` or picked tokens ``[B]``."""
        raise NotImplementedError

    def drop(self, cache_id: str) -> None:
        """Free request ``cache_id``'s KV caches (all its micro-batches) on every stage,
        after the work queued before; returns once every stage has."""
        self.control("drop", cache_id)

    def control(self, op: str, *args) -> None:
        """Run ``StageActor.<op>(*args)`` on every stage, after the work queued before it;
        returns once every stage has (``drop``, ``select_rows``, ``merge_caches``)."""
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """Make what waits on the stages, now or later, raise ``StageLost(reason)`` (a stage
        found hung). Over Ray object refs nothing is needed: killing the stage's actor
        fails the refs that wait on it."""

    def close(self) -> None:
        """Release what the transport holds (sockets); the stages stay."""


class RefTransport(Transport):
    """Each hop a call on the next stage, passed the previous call's result."""

    def __init__(self, stages: Stages):
        self.stages = stages
        self.name = "ray" if stages.remote else "in-process"

    def submit(self, work: Work, x) -> Handle:
        if isinstance(x, Handle):
            if not x.picked:
                raise ValueError("a step's handle can feed the next step only when its last stage picked the tokens")
            msg = x.ref
        else:
            msg = Payload.now(x)
        for actor in self.stages.actors:
            msg = self.stages.call(actor, "run", work, msg)
        return Handle(work.key, msg, picked=work.pick)

    def fetch(self, handle: Handle):
        return self.stages.get(handle.ref, self.timeout).x

    def control(self, op: str, *args) -> None:
        s = self.stages
        s.get([s.call(a, op, *args) for a in s.actors], self.timeout)
