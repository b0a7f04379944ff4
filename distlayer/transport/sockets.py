"""Hand-offs between stages with no Ray call per step: Unix sockets on one node, TCP
between nodes (registry name ``"socket"``).

With Ray object refs, every hand-off is an actor task: the driver's core worker, the
next actor's task path, serialization and replies: milliseconds a hop (benchmarks/README.md)
and a steady trickle of CPU work that, on a node whose cores the stages share, slows
their compute.
When the driver and every stage are on one node, each stage instead runs a loop
(:class:`StageServer`) that takes work from its :class:`Mailbox` and sends its output
over a Unix socket straight to the next stage's mailbox; the last stage sends the
result to the driver's mailbox and the tokens it picked back to the first stage. Ray
then only starts, inspects and stops the stages. When the stages or the driver are on
several nodes, every mailbox listens on TCP at its node's IP instead (a free port), with
the same handshake on the pipeline's random key.

A mailbox holds two kinds of message: work (``"q"``), taken in the order it was sent,
and keyed results (``"k"``: a step's output for the driver, or the tokens the first
stage feeds on), taken by key. Background threads read the sockets into the mailbox,
so a sender never waits on a busy receiver, and a receiver blocks (no polling) until
its message arrives. A sender that dies closes its socket, and the receiver raises a
:class:`StageError` naming it instead of waiting forever.

A stage whose plan runs blocks (``StagePlan.blocks``) takes the works of a wave
(``Work.together``) from its mailbox whole (:meth:`Mailbox.next_while`) and runs them as
one block (``StageActor.run_block``): each streamed unit read once for all of them.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener

from ..errors import StageError, StageLost
from .base import Failed, Handle, Payload, Stages, Transport, Work, fed_from, in_request

LOST = "its KV caches are lost: close this model and load it again"
CLOSE_WAIT = 60  # seconds closing a stage's loop waits for the step it is running


class Mailbox:
    """Where a stage (or the driver) receives messages from ``senders`` peers.

    Args:
        authkey: shared secret a sender must know (``multiprocessing.connection``'s handshake).
        owner: who reads this mailbox, for error messages (``"stage 1"``, ``"the driver"``).
        senders: how many peers will connect; the socket's path goes once they have.
        host: listen on TCP at this address (this node's IP, for peers on other nodes)
            instead of a Unix socket; the port is picked free.
    """

    def __init__(self, authkey: bytes, owner: str, senders: int = 1, host: str | None = None):
        self.owner = owner
        if host is None:
            self._dir = tempfile.mkdtemp(prefix="distlayer-")  # private (0700): only this user can connect
            self._listener = Listener(os.path.join(self._dir, "in.sock"), "AF_UNIX", authkey=authkey)
        else:
            self._dir = None
            self._listener = Listener((host, 0), "AF_INET", authkey=authkey)
        self.address = self._listener.address
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
                no_delay(conn)
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        except Exception as e:  # a failed handshake, or closed before every sender came
            self.fail(f"a sender to {self.owner} failed to connect ({type(e).__name__}: {e})")
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
            self.fail(f"{sender} died ({type(e).__name__})")
        except Exception as e:  # an unreadable message
            self.fail(f"the channel from {sender} to {self.owner} failed ({type(e).__name__}: {e})")

    def fail(self, reason: str) -> None:
        """Whoever waits on this mailbox, or comes to wait, gets ``StageLost`` with ``reason``."""
        with self._cond:
            self._gone = self._gone or reason
            self._cond.notify_all()

    def _wait(self, ready, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self._gone:
                raise StageLost(f"{self._gone}, so {self.owner} gets no input; {LOST}")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StageLost(f"{self.owner} got no answer from the stages within {timeout:g}s (step_timeout)")
            self._cond.wait(left)

    def next(self) -> tuple:
        """Wait for the next work message: ``(key, group, sent_at, payload)``."""
        with self._cond:
            self._wait(lambda: self._work)
            return self._work.popleft()

    def next_while(self, belongs, most: int) -> list[tuple]:
        """Up to ``most`` more work messages that ``belongs(payload)`` says go with one taken
        already, in order: waits for them only while the queue holds nothing else (a
        message that does not belong, queued first, ends the wait)."""
        def ready() -> bool:
            run = 0
            for *_, payload in self._work:
                if run >= most or not belongs(payload):
                    return True
                run += 1
            return run >= most

        with self._cond:
            self._wait(ready)
            out = []
            while len(out) < most and self._work and belongs(self._work[0][3]):
                out.append(self._work.popleft())
            return out

    def take(self, key: str, timeout: float | None = None):
        """Wait (at most ``timeout`` seconds) for the keyed message ``key``; returns
        ``(payload, sent_at)``, or raises what the sending stage raised."""
        with self._cond:
            self._wait(lambda: key in self._keyed, timeout)
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

    def stop(self) -> None:
        """Deliver nothing more: whoever waits on this mailbox, or comes to wait, is told it is closed."""
        self.fail(f"the channel to {self.owner} was closed")

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
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def no_delay(conn) -> None:
    """Send each message at once on a TCP connection (no Nagle wait for the peer's
    acknowledgement); a Unix socket is left as it is."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Link:
    """The sending end of a channel to a :class:`Mailbox`.

    Args:
        address, authkey: the mailbox's.
        sender: this end's name (``"stage 0"``, ``"the driver"``), sent first.
        receiver: the other end's name, for errors.
    """

    def __init__(self, address, authkey: bytes, sender: str, receiver: str):
        self.receiver = receiver
        self._conn = Client(address, authkey=authkey)  # a path: Unix socket; (host, port): TCP
        no_delay(self._conn)
        self._lock = threading.Lock()
        self._conn.send_bytes(pickle.dumps(sender))

    def send(self, kind: str, key: str, group: str, payload) -> None:
        """Send work (``"q"``), a keyed result (``"k"``) or why this end's input is gone (``"gone"``)."""
        data = pickle.dumps((kind, key, group, time.time(), payload), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._lock:
                self._conn.send_bytes(data)
        except OSError as e:
            raise StageLost(f"{self.receiver} died ({type(e).__name__}); {LOST}") from e

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

    Its life, each step run in the stage's process (``Stages.call_with``):
    :meth:`open` builds one and hands it to the stage (``StageActor.serve``), returning
    its mailbox's address; once every stage has one, :meth:`start` connects it to the
    next stage (or the driver) and starts its loop; the stage closes it
    (``StageActor.reset`` / ``close``, or when another is served).

    Args:
        actor: the ``StageActor`` object this loop serves.
        authkey: the pipeline's shared secret.
        senders: peers that will connect (two for the first stage: the driver and the last stage).
        host: this node's IP, to receive over TCP from other nodes (None: a Unix socket).
    """

    def __init__(self, actor, authkey: bytes, senders: int, host: str | None = None):
        self.actor, self.authkey = actor, authkey
        self.name = f"stage {actor.stage}"
        self.inbox = Mailbox(authkey, self.name, senders, host)
        self.links: dict[str, Link] = {}
        self._thread: threading.Thread | None = None

    @staticmethod
    def open(actor, authkey: bytes, senders: int, host: str | None = None):
        """Serve ``actor`` from a new server (its mailbox on TCP at ``host``, else a Unix
        socket), in place of the one it had; returns the mailbox's address."""
        return actor.serve(StageServer(actor, authkey, senders, host)).inbox.address

    @staticmethod
    def start(actor, links: dict[str, tuple[str, str]]) -> None:
        """Connect ``actor``'s server (from :meth:`open`) to ``links`` and start its loop."""
        actor.server.connect(links)

    def connect(self, links: dict[str, tuple[str, str]]) -> None:
        """Connect to ``{role: (address, receiver)}``: ``"next"`` (the next stage), or on the
        last stage ``"driver"`` and ``"ring"`` (the first stage, for the tokens it picks);
        then start serving."""
        self.links = {role: Link(addr, self.authkey, self.name, who) for role, (addr, who) in links.items()}
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

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
                elif msg.work.together and self.actor.blocks:  # the wave's works, as one block
                    wave = msg.work.together
                    more = self.inbox.next_while(lambda m: isinstance(m, Hop) and m.work.together == wave, wave[1] - 1)
                    self._run_block([(key, group, sent_at, msg), *more])
                else:
                    self._run_block([(key, group, sent_at, msg)])
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

    def _run_block(self, block: list[tuple]) -> None:
        """Run work messages ``(key, group, sent_at, hop)`` of different KV caches as one
        block (``StageActor.run_block``), and send each output on."""
        outs, run = {}, []
        for key, group, sent_at, hop in block:
            x = hop.x
            if x is None:  # tokens the last stage picked in the previous step
                try:
                    x, sent_at = self.inbox.take(hop.work.feed)
                except BaseException as e:  # the step that feeds it failed, or its sender is gone
                    x = Failed(e)
            if isinstance(x, Failed):
                outs[key] = x
            else:
                run.append((key, hop.work, Payload(x, sent_at)))
        if run:
            try:
                done = self.actor.run_block([w for _, w, _ in run], [p for *_, p in run])
                outs.update((key, p.x) for (key, *_), p in zip(run, done))
            except BaseException as e:
                outs.update((key, Failed(e)) for key, *_ in run)
        for key, group, _, hop in block:
            self._send_on(key, group, hop.work, outs[key])

    def _send_on(self, key: str, group: str, work: Work, x) -> None:
        if "next" in self.links:
            self.links["next"].send("q", key, group, Hop(work, x))
            return
        self.links["driver"].send("k", key, group, x)
        if work.pick:  # picked tokens also feed the first stage's next step
            self.links["ring"].send("k", key, group, x)

    def _send_all(self, *msg) -> None:
        for link in self.links.values():
            try:
                link.send(*msg)
            except StageError:
                pass

    def close(self) -> None:
        """Stop the loop (after the message it is running, which may still be sent on) and
        close the mailbox and the links; once this returns, the loop touches the stage no more."""
        self.inbox.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_WAIT)
        for end in [*self.links.values(), self.inbox]:
            end.close()


class SocketTransport(Transport):
    """Stage-to-stage hand-offs over Unix sockets on one node, or over TCP between nodes
    (see the module docstring); the pipeline's random key authenticates every connection.

    Start-up takes two rounds of calls to the stages: open their mailboxes, then connect
    each to the next and start their loops.

    Args:
        stages: the stage actors.
        hosts: for TCP, ``(each stage's node IP, the driver's node IP)``: every mailbox
            listens on its node's address. None: Unix sockets (all on one node).
    """

    name = "channel"
    waves = True  # a stage's loop takes a wave from its mailbox whole (StageServer)
    feeds = True  # the last stage sends picked tokens to the first itself (its "ring" link)

    def __init__(self, stages: Stages, hosts: tuple[list[str], str] | None = None):
        n, key = len(stages.actors), os.urandom(32)
        self._keys = itertools.count()
        ips, here = hosts or ([None] * n, None)
        self.name = "channel" if hosts is None else "tcp"
        addrs = stages.get([stages.call_with(a, StageServer.open, key, 2 if i == 0 else 1, ips[i])
                            for i, a in enumerate(stages.actors)])
        self._inbox = Mailbox(key, "the driver", host=here)
        links = [{"next": (addrs[i + 1], f"stage {i + 1}")} for i in range(n - 1)]
        links.append({"driver": (self._inbox.address, "the driver"), "ring": (addrs[0], "stage 0")})
        self._link: Link | None = None
        try:
            stages.get([stages.call_with(a, StageServer.start, ln) for a, ln in zip(stages.actors, links)])
            self._link = Link(addrs[0], key, "the driver", "stage 0")
        except BaseException:
            self.close()
            raise

    def submit(self, work: Work, x) -> Handle:
        fed = fed_from(x)
        if fed is not None:  # the last stage sent its tokens to the first's mailbox
            work.feed, x = fed.key, None
        self._link.send("q", work.key, work.cache_id, Hop(work, x))
        return Handle(work.key, picked=work.pick)

    def fetch(self, handle: Handle):
        self.check()
        return self._inbox.take(handle.key, self.timeout)[0]

    def abort(self, reason: str) -> None:
        super().abort(reason)
        self._inbox.fail(reason)  # and what waits now

    def drop(self, cache_id: str) -> None:
        self._inbox.discard(cache_id)
        self.control("drop", cache_id)

    def control(self, op: str, *args) -> None:
        self.check()
        key = f"control {next(self._keys)}"
        self._link.send("q", key, str(args[0]) if args else "", Control(op, args))
        self._inbox.take(key, self.timeout)

    def close(self) -> None:
        for end in (self._link, self._inbox):
            if end is not None:
                end.close()
