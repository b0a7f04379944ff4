"""Same-node hand-off between stages: each stage sends its output straight to the next
stage's :class:`Mailbox` over a Unix socket.

With Ray object refs, a hand-off goes through the driver's core worker and the next
actor's task path (three processes, about 3 ms on a 2-core node whose weights keep
evicting that path from the cache). Here the driver submits every stage's task at once,
with no dependency between them; each task then blocks on its mailbox (no polling)
until the previous stage's output arrives. A background thread reads the socket into
the mailbox, so a sender never waits on a busy receiver.

Messages carry a key (one per pipeline step) and a group (the request's cache id) so
that :meth:`Mailbox.discard` can free what a finished request left behind.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class FromPeer:
    """A stage input that arrives in the stage's mailbox under ``key``."""

    key: str


class _Failed:
    """An exception raised upstream, passed on so every later stage raises it too."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


def _in_group(group: str, prefix: str) -> bool:
    return group == prefix or group.startswith(prefix + ":")


class Mailbox:
    """Where a stage receives its inputs from the stage before it.

    Args:
        authkey: shared secret the sender must know (``multiprocessing.connection``'s handshake).
        stage: this stage's index, for error messages.
        upstream: the sending stage's index.
    """

    def __init__(self, authkey: bytes, stage: int, upstream: int):
        self.stage, self.upstream = stage, upstream
        self._dir = tempfile.mkdtemp(prefix="distlayer-")  # private (0700): only this user can connect
        self.address = os.path.join(self._dir, "in.sock")
        self._listener = Listener(self.address, "AF_UNIX", authkey=authkey)
        self._msgs: dict[str, tuple] = {}
        self._dropped: deque[str] = deque(maxlen=64)
        self._cond = threading.Condition()
        self._gone: str | None = None  # why the sender is gone
        threading.Thread(target=self._read, name=f"mailbox-{stage}", daemon=True).start()

    def _read(self) -> None:
        reason = f"stage {self.upstream} closed its channel"
        try:
            conn = self._listener.accept()
            self.close()  # one sender per mailbox: the socket's path is no longer needed
            while True:
                key, group, sent_at, payload = pickle.loads(conn.recv_bytes())
                with self._cond:
                    if not any(_in_group(group, p) for p in self._dropped):
                        self._msgs[key] = (payload, sent_at, group)
                        self._cond.notify_all()
        except (EOFError, OSError) as e:
            reason = f"stage {self.upstream} died ({type(e).__name__})"
        except Exception as e:  # a failed handshake or an unreadable message
            reason = f"the channel from stage {self.upstream} failed ({type(e).__name__}: {e})"
        with self._cond:
            self._gone = reason
            self._cond.notify_all()

    def take(self, key: str):
        """Wait for the message ``key``; returns ``(payload, sent_at)`` or raises what the
        sender raised."""
        with self._cond:
            while key not in self._msgs:
                if self._gone:
                    raise StageError(f"{self._gone}, so stage {self.stage} gets no input: its KV caches are "
                                     "lost: close this model and load it again")
                self._cond.wait()
            payload, sent_at, _ = self._msgs.pop(key)
        if isinstance(payload, _Failed):
            raise payload.exc
        return payload, sent_at

    def discard(self, prefix: str) -> None:
        """Free the messages of requests ``prefix`` (and ``prefix:*``), now and when they arrive later."""
        with self._cond:
            self._dropped.append(prefix)
            for key in [k for k, (_, _, g) in self._msgs.items() if _in_group(g, prefix)]:
                del self._msgs[key]

    def close(self) -> None:
        """Stop accepting senders and remove the socket's path (a connected sender stays)."""
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Link:
    """The sending end of a channel to the next stage's :class:`Mailbox`."""

    def __init__(self, address: str, authkey: bytes, downstream: int):
        self.downstream = downstream
        self._conn = Client(address, "AF_UNIX", authkey=authkey)

    def send(self, key: str, group: str, payload) -> None:
        self._send(key, group, payload)

    def send_error(self, key: str, group: str, exc: BaseException) -> None:
        self._send(key, group, _Failed(exc))

    def _send(self, key, group, payload) -> None:
        try:
            self._conn.send_bytes(pickle.dumps((key, group, time.time(), payload), protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            raise StageError(f"stage {self.downstream} died ({type(e).__name__}); its KV caches are lost: close "
                             "this model and load it again") from e

    def close(self) -> None:
        self._conn.close()
