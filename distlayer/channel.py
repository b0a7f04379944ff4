"""Same-node hand-off between stages, with no Ray call per step.

With Ray object refs, every hand-off is an actor task: the driver's core worker, the
next actor's task path, serialization and replies: milliseconds a hop (benchmarks/README.md)
and a steady trickle of CPU work that, on a node whose cores the stages share, slows
their compute.
When the driver and every stage are on one node, each stage instead runs a loop
(:class:`StageServer`) that takes work from its :class:`Mailbox` and sends its output
over a Unix socket straight to the next stage's mailbox; the last stage sends the
result to the driver's mailbox and the tokens it picked back to the first stage. Ray
then only starts, inspects and stops the stages.

A mailbox holds two kinds of message: work (``"q"``), taken in the order it was sent,
and keyed results (``"k"``: a step's output for the driver, or the tokens the first
stage feeds on), taken by key. Background threads read the sockets into the mailbox,
so a sender never waits on a busy receiver, and a receiver blocks (no polling) until
its message arrives. A sender that dies closes its socket, and the receiver raises a
:class:`StageError` naming it instead of waiting forever.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener

from .errors import StageError
from .transport import Failed, Handle, Payload, Stages, Transport, Work, in_request

LOST = "its KV caches are lost: close this model and load it again"


class Mailbox:
    """Where a stage (or the driver) receives messages from ``senders`` peers.

    Args:
        authkey: shared secret a sender must know (``multiprocessing.connection``'s handshake).
        owner: who reads this mailbox, for error messages (``"stage 1"``, ``"the driver"``).
        senders: how many peers will connect; the socket's path goes once they have.
    """

    def __init__(self, authkey: bytes, owner: str, senders: int = 1):
        self.owner = owner
        self._dir = tempfile.mkdtemp(prefix="distlayer-")  # private (0700): only this user can connect
        self.address = os.path.join(self._dir, "in.sock")
        self._listener = Listener(self.address, "AF_UNIX", authkey=authkey)
        self._work: deque = deque()
        self._keyed: dict[str, tuple] = {}
        self._dropped: deque[str] = deque(maxlen=64)
        self._cond = threading.Condition()
        self._gone: str | None = None  # why a sender is gone
        self._closed = False
        threading.Thread(target=self._accept, args=(senders,), name=f"mailbox-{owner}", daemon=True).start()

    def _accept(self, senders: int) -> None:
        try:
            for _ in range(senders):
                conn = self._listener.accept()
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        except Exception as e:  # a failed handshake, or closed before every sender came
            self._fail(f"a sender to {self.owner} failed to connect ({type(e).__name__}: {e})")
        self.close()

    def _read(self, conn) -> None:
        sender = "a sender"
        try:
            sender = pickle.loads(conn.recv_bytes())  # the sender's name comes first
            while True:
                kind, key, group, sent_at, payload = pickle.loads(conn.recv_bytes())
                with self._cond:
                    if kind == "gone":
                        self._gone = payload
                    elif kind == "q":
                        self._work.append((key, group, sent_at, payload))
                    elif not any(in_request(group, p) for p in self._dropped):
                        self._keyed[key] = (payload, sent_at, group)
                    self._cond.notify_all()
        except (EOFError, OSError) as e:
            self._fail(f"{sender} died ({type(e).__name__})")
        except Exception as e:  # an unreadable message
            self._fail(f"the channel from {sender} to {self.owner} failed ({type(e).__name__}: {e})")

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._gone = self._gone or reason
            self._cond.notify_all()

    def _wait(self, ready) -> None:
        while not ready():
            if self._gone:
                raise StageError(f"{self._gone}, so {self.owner} gets no input; {LOST}")
            self._cond.wait()

    def next(self) -> tuple:
        """Wait for the next work message: ``(key, group, sent_at, payload)``."""
        with self._cond:
            self._wait(lambda: self._work)
            return self._work.popleft()

    def take(self, key: str):
        """Wait for the keyed message ``key``; returns ``(payload, sent_at)``, or raises
        what the sending stage raised."""
        with self._cond:
            self._wait(lambda: key in self._keyed)
            payload, sent_at, _ = self._keyed.pop(key)
        if isinstance(payload, Failed):
            raise payload.exc
        return payload, sent_at

    @property
    def gone(self) -> str | None:
        """Why a sender is gone, or None."""
        return self._gone

    def discard(self, prefix: str) -> None:
        """Free the keyed messages of requests ``prefix`` (and ``prefix:*``), now and when they arrive later."""
        with self._cond:
            self._dropped.append(prefix)
            for key in [k for k, (_, _, g) in self._keyed.items() if in_request(g, prefix)]:
                del self._keyed[key]

    def close(self) -> None:
        """Stop accepting senders and remove the socket's path (connected senders stay).
        Safe to call twice, and from two threads (the accept loop closes it when every
        sender has come)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        try:
            self._listener.close()
        except OSError:  # its path is already gone
            pass
        shutil.rmtree(self._dir, ignore_errors=True)


class Link:
    """The sending end of a channel to a :class:`Mailbox`.

    Args:
        address, authkey: the mailbox's.
        sender: this end's name (``"stage 0"``, ``"the driver"``), sent first.
        receiver: the other end's name, for errors.
    """

    def __init__(self, address: str, authkey: bytes, sender: str, receiver: str):
        self.receiver = receiver
        self._conn = Client(address, "AF_UNIX", authkey=authkey)
        self._lock = threading.Lock()
        self._conn.send_bytes(pickle.dumps(sender))

    def send(self, kind: str, key: str, group: str, payload) -> None:
        """Send work (``"q"``), a keyed result (``"k"``) or why this end's input is gone (``"gone"``)."""
        data = pickle.dumps((kind, key, group, time.time(), payload), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._lock:
                self._conn.send_bytes(data)
        except OSError as e:
            raise StageError(f"{self.receiver} died ({type(e).__name__}); {LOST}") from e

    def close(self) -> None:
        self._conn.close()


# --------------------------------------------------------------------------- the transport


@dataclass
class Hop:
    """Work on its way to the next stage's mailbox, with its input: a tensor, the
    :class:`Failed` of a stage before, or None (take the tokens of ``work.feed``)."""

    work: Work
    x: object = None


@dataclass
class Control:
    """``StageActor.<op>(*args)`` on every stage in turn, then an acknowledgement to the driver."""

    op: str
    args: tuple
    failed: Failed | None = None  # a stage before failed it: passed on without running


class StageServer:
    """A stage's end of the channels: its mailbox, links to the stages after it, and the
    loop that runs work from the mailbox on the stage (``StageActor.run`` / ``drop``).

    Args:
        actor: the ``StageActor`` object this loop serves.
        authkey: the pipeline's shared secret.
        senders: peers that will connect (two for the first stage: the driver and the last stage).
    """

    def __init__(self, actor, authkey: bytes, senders: int):
        self.actor, self.authkey = actor, authkey
        self.name = f"stage {actor.stage}"
        self.inbox = Mailbox(authkey, self.name, senders)
        self.links: dict[str, Link] = {}

    def connect(self, links: dict[str, tuple[str, str]]) -> None:
        """Connect to ``{role: (address, receiver)}``: ``"next"`` (the next stage), or on the
        last stage ``"driver"`` and ``"ring"`` (the first stage, for the tokens it picks);
        then start serving."""
        self.links = {role: Link(addr, self.authkey, self.name, who) for role, (addr, who) in links.items()}
        threading.Thread(target=self._serve, name=f"{self.name}-loop", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                key, group, sent_at, msg = self.inbox.next()
            except StageError:  # the stage before died: say so downstream, and stop
                self._send_all("gone", "", "", self.inbox.gone)
                return
            try:
                if isinstance(msg, Control):
                    self._control(key, group, msg)
                else:
                    self._run(key, group, sent_at, msg)
            except StageError:  # the stage after died; the driver learns it from its own mailbox
                return

    def _control(self, key: str, group: str, msg: Control) -> None:
        if msg.failed is None:
            try:
                getattr(self.actor, msg.op)(*msg.args)
                if msg.op == "drop":
                    self.inbox.discard(msg.args[0])
            except BaseException as e:  # passed on, so the driver raises it
                msg = Control(msg.op, msg.args, Failed(e))
        if "driver" in self.links:  # the last stage: every stage has done it
            self.links["driver"].send("k", key, "", msg.failed)
        else:
            self.links["next"].send("q", key, group, msg)

    def _run(self, key: str, group: str, sent_at: float, hop: Hop) -> None:
        x, work = hop.x, hop.work
        if not isinstance(x, Failed):
            try:
                if x is None:  # tokens the last stage picked in the previous step
                    x, sent_at = self.inbox.take(work.feed)
                x = self.actor.run(work, Payload(x, sent_at)).x
            except BaseException as e:
                x = Failed(e)
        if "next" in self.links:
            self.links["next"].send("q", key, group, Hop(work, x))
            return
        self.links["driver"].send("k", key, group, x)
        if work.pick is not None:  # picked tokens also feed the first stage's next step
            self.links["ring"].send("k", key, group, x)

    def _send_all(self, *msg) -> None:
        for link in self.links.values():
            try:
                link.send(*msg)
            except StageError:
                pass

    def close(self) -> None:
        """Close the mailbox and the links."""
        for end in [*self.links.values(), self.inbox]:
            end.close()


def open_stage_mailbox(actor, authkey: bytes, senders: int) -> str:
    """Run in a stage's process: attach a :class:`StageServer` to ``actor``; returns its address."""
    server = actor.attach("channel", StageServer(actor, authkey, senders))
    return server.inbox.address


def connect_stage(actor, links: dict[str, tuple[str, str]]) -> None:
    """Run in a stage's process: connect its server's links and start its loop."""
    actor.attached["channel"].connect(links)


class SocketTransport(Transport):
    """Stage-to-stage hand-offs over Unix sockets on one node (see the module docstring).

    Start-up takes two rounds of calls to the stages: open their mailboxes, then connect
    each to the next and start their loops.
    """

    name = "channel"

    def __init__(self, stages: Stages):
        n, key = len(stages.actors), os.urandom(32)
        self._keys = itertools.count()
        addrs = stages.get([stages.call_with(a, open_stage_mailbox, key, 2 if i == 0 else 1)
                            for i, a in enumerate(stages.actors)])
        self._inbox = Mailbox(key, "the driver")
        links = [{"next": (addrs[i + 1], f"stage {i + 1}")} for i in range(n - 1)]
        links.append({"driver": (self._inbox.address, "the driver"), "ring": (addrs[0], "stage 0")})
        self._link: Link | None = None
        try:
            stages.get([stages.call_with(a, connect_stage, ln) for a, ln in zip(stages.actors, links)])
            self._link = Link(addrs[0], key, "the driver", "stage 0")
        except BaseException:
            self.close()
            raise

    def submit(self, work: Work, x) -> Handle:
        if isinstance(x, Handle):
            if not x.picked:
                raise ValueError("a step's handle can feed the next step only when its last stage picked the tokens")
            work.feed, x = x.key, None
        self._link.send("q", work.key, work.cache_id, Hop(work, x))
        return Handle(work.key, picked=work.pick is not None)

    def fetch(self, handle: Handle):
        return self._inbox.take(handle.key)[0]

    def drop(self, cache_id: str) -> None:
        self._inbox.discard(cache_id)
        self.control("drop", cache_id)

    def control(self, op: str, *args) -> None:
        key = f"control {next(self._keys)}"
        self._link.send("q", key, str(args[0]) if args else "", Control(op, args))
        self._inbox.take(key)

    def close(self) -> None:
        for end in (self._link, self._inbox):
            if end is not None:
                end.close()
