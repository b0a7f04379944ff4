"""The transport interface: the typed messages and what every transport does.

A :class:`Work` is one micro-batch's forward through every stage; a :class:`Payload` is
the tensor that travels with it from hop to hop. A :class:`Transport` submits work at the
first stage and fetches the last stage's output. The implementations, one module each,
are listed in the registry (``distlayer.transport.TRANSPORTS``).

The driver's scheduler (``scheduler.py``) only calls ``submit``, ``fetch``, ``drop`` and
``control`` and reads ``feeds``, so a new transport does not touch it.

Picked tokens, from the last stage back to the first: when every row of a batch is
greedy, the scheduler sets ``Work.pick`` and the last stage returns the next token of each
row instead of logits. The next step's input is then that step's :class:`Handle`, not a
tensor: ``submit(work, handle)``. Every transport accepts such a handle; one whose
``feeds`` is True takes the tokens from the last stage to the first itself (an object ref
passed on, or the last stage's own link to the first: ``Work.feed``), with no round trip
through the driver, so the scheduler keeps several steps of a batch in flight
(``scheduler.AHEAD``) and fetches each step's tokens only to emit them.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..errors import StageLost


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
        together: ``(wave, works)``: the driver sent this work in one wave with others
            (``works`` in all, this one included, each extending a different KV cache and
            none fed by another), one after another. A stage that streams weights takes in
            a wave's works and runs them as one block, reading each streamed unit once for
            all (``StageActor.run_block``), where the transport delivers them to it
            together (``Transport.waves``: the socket transport does; object refs run
            each as it comes).
    """

    key: str
    cache_id: str
    mask: Any
    pos: Any
    logits_to_keep: int | None = 1
    pick: bool = False
    feed: str | None = None
    together: tuple[str, int] | None = None


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


def fed_from(x) -> Handle | None:
    """The handle of the step whose picked tokens ``x`` is (``submit``'s input), or None for a tensor."""
    if not isinstance(x, Handle):
        return None
    if not x.picked:
        raise ValueError("a step's handle can feed the next step only when its last stage picked the tokens")
    return x


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
        name: what this instance is, for reports and tests (``"in-process"``, ``"ray"``,
            ``"channel"``, ``"tcp"``); the registry's key says which module built it.
        timeout: seconds ``fetch`` and ``control`` wait before raising ``StageLost`` (None: no limit).
        feeds: whether the picked tokens of a step (``Work.pick``) go from the last stage to
            the first without this process (see the module docstring): then ``submit`` given
            that step's :class:`Handle` returns at once and the stages overlap the steps, and
            the scheduler keeps ``AHEAD`` steps of a greedy batch in flight. False: a handle
            is still accepted, but each step finishes before the next can start, so the
            scheduler fetches each step before it sends the next.
        waves: whether a stage gets a wave's works (``Work.together``) together, so that
            one that streams runs them as one block (``StageActor.run_block``); False:
            each work runs by itself as it comes.
    """

    name = "?"
    timeout: float | None = None
    feeds: bool = False
    waves = False
    aborted: str | None = None  # why abort() was called, or None

    def submit(self, work: Work, x) -> Handle:
        """Start ``work`` at the first stage with input ``x``: a tensor, or the
        :class:`Handle` of an earlier step whose last stage picked the tokens (any other
        handle: ``ValueError``, see :func:`fed_from`)."""
        raise NotImplementedError

    def fetch(self, handle: Handle):
        """The last stage's output of a submitted step: logits ``[B, T, V]`` or picked tokens ``[B]``."""
        raise NotImplementedError

    def drop(self, cache_id: str) -> None:
        """Free request ``cache_id``'s KV caches (all its micro-batches) on every stage,
        after the work queued before; returns once every stage has. The request's id is
        not used again (what still arrives for it may be discarded)."""
        self.control("drop", cache_id)

    def control(self, op: str, *args) -> None:
        """Run ``StageActor.<op>(*args)`` on every stage, after the work queued before it;
        returns once every stage has (``drop``, ``select_rows``, ``merge_caches``)."""
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """Make what waits on the stages, now or later, raise ``StageLost(reason)`` (a stage
        found hung, whose actor the driver kills too); the transport is done with after this.
        Here: later waits (``fetch``, ``control``) raise at once (:meth:`check`); a transport
        whose waits the killed actor does not fail also wakes the waits under way."""
        self.aborted = reason

    def check(self) -> None:
        """Raise ``StageLost`` once :meth:`abort` was called (before a wait)."""
        if self.aborted is not None:
            raise StageLost(self.aborted)

    def close(self) -> None:
        """Release what the transport holds (sockets); the stages stay."""
