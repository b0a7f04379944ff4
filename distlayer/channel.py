"""Same-node hand-off between stages, with no Ray call per step.

With Ray object refs, every hand-off is an actor task: the driver's core worker, the
next actor's task path, serialization and replies, about 3 ms a hop and a steady
trickle of CPU work that, on a node whose cores the stages share, slows their compute.
When the driver and every stage are on one node, each stage instead runs a loop
(``StageActor.serve``) that takes work from its :class:`Mailbox` and sends its output
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

import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Client, Listener

from .errors import StageError

LOST = "its KV caches are lost: close this model and load it again"


class Failed:
    """An exception raised by a stage, passed on so the driver raises it."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


def in_request(key: str, request: str) -> bool:
    """Whether a cache id or message group ``key`` belongs to ``request`` (``request`` or ``request:k``)."""
    return key == request or key.startswith(request + ":")


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
        """Stop accepting senders and remove the socket's path (connected senders stay)."""
        self._listener.close()
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
