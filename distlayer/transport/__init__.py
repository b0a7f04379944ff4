"""Moving work from stage to stage: the interface, one module per transport, and the registry.

- ``base``: the interface every transport implements (:class:`Transport`), the messages
  (:class:`Work`, :class:`Payload`, :class:`Failed`, :class:`Handle`) and the driver's
  handle on its stages (:class:`Stages`); re-exported here.
- ``refs``: :class:`RefTransport`, each hop a Ray call passed the previous call's object
  ref (registry name ``"ray"``).
- ``sockets``: :class:`SocketTransport`, each stage serving a loop on its mailbox and
  sending its output straight to the next stage over a Unix socket, or TCP between nodes
  (``"socket"``); its stage-side end is ``sockets.StageServer``.

A new transport is one module with a :class:`Transport` subclass whose constructor takes
``(stages, hosts=None)``, plus one entry in :data:`TRANSPORTS`. The pipeline builds
transports with :func:`make`, the ``transport`` setting accepts :data:`NAMES`, and
``tests/test_transport_contract.py`` runs every entry through the same cases.
"""

from __future__ import annotations

from .base import Failed, Handle, Payload, Stages, Transport, Work, fed_from, in_request
from .refs import RefTransport
from .sockets import SocketTransport

# name -> class, built as ``cls(stages, hosts)``. ``hosts``: ``(each stage's node IP, the
# driver's node IP)`` when they are on several nodes, else None.
TRANSPORTS: dict[str, type[Transport]] = {"ray": RefTransport, "socket": SocketTransport}
AUTO = "auto"  # sockets between Ray actors (over TCP between nodes); calls in one process
NAMES = (AUTO, *TRANSPORTS)  # what the ``transport`` setting accepts

__all__ = ["AUTO", "NAMES", "TRANSPORTS", "Failed", "Handle", "Payload", "RefTransport", "SocketTransport",
           "Stages", "Transport", "Work", "delivers_waves", "fed_from", "in_request", "make", "resolve"]


def resolve(name: str, stages: Stages) -> str:
    """The registry entry that setting ``name`` means for ``stages`` (``"auto"``: sockets
    between Ray actors, calls in one process)."""
    if name == AUTO:
        return "socket" if stages.remote else "ray"
    if name not in TRANSPORTS:
        raise ValueError(f"no transport {name!r}: use one of {', '.join(NAMES)}")
    return name


def delivers_waves(name: str) -> bool:
    """Whether the transport setting ``name`` hands a wave's works to a stage together
    (:attr:`Transport.waves`), so that stages that stream can run blocks. ``"auto"`` does:
    sockets between Ray actors, and in one process a batch is one micro-batch."""
    return name == AUTO or TRANSPORTS[name].waves


def make(name: str, stages: Stages, hosts: tuple[list[str], str] | None = None,
         timeout: float | None = None) -> Transport:
    """A transport ``name`` (a key of :data:`TRANSPORTS`, or ``"auto"``) over ``stages``.

    Args:
        hosts: ``(each stage's node IP, the driver's node IP)`` when the stages or the driver
            are on several nodes (transports that listen, listen there: TCP); None: one node.
        timeout: seconds ``fetch`` and ``control`` wait before raising ``StageLost``.
    """
    transport = TRANSPORTS[resolve(name, stages)](stages, hosts)
    transport.timeout = timeout
    return transport
