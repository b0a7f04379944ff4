"""Liveness apart from step time: the driver's heartbeat to every Ray stage.

A step may rightly take long (a big prefill from a slow disk), so the bound on one step's
work (``step_timeout``) cannot also be how a frozen process is found. Each stage actor
therefore has a concurrency group of its own, :data:`HEALTH`, served by a thread that its
forward, its loading and its transport's loop never block. A :class:`Heartbeat` thread in
the driver calls a no-op there every second or so. A stage that has answered once and then
leaves a call unanswered for ``heartbeat_timeout`` seconds has a process that is stopped
(SIGSTOP), frozen or cut off: it is declared hung and its ``on_hung`` callback runs (the
pipeline kills the process and fails the steps in flight, so recovery replaces the stage
at once rather than after ``step_timeout``).

A stage that has not answered yet (a replacement still starting) is not judged: its start
is bounded by ``restart_timeout``. A stage that died is not judged either: Ray and the
transports see a death by themselves.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

HEALTH = "health"  # the stage actor's concurrency group for pings


def interval(timeout: float) -> float:
    """Seconds between heartbeats: about one a second, at least five per ``timeout``."""
    return min(1.0, timeout / 5)


class _Watch:
    """One stage actor's heartbeat: the ping in flight, and when it last answered."""

    def __init__(self, actor):
        self.actor = actor
        self.ref = None
        self.sent = 0.0
        self.seen: float | None = None
        self.dead = False


class Heartbeat:
    """Pings every stage of ``stages`` (``RayStages``) on its :data:`HEALTH` thread.

    Args:
        stages: has ``actors`` (read at every beat, so replacements are watched),
            ``ping(actor)`` (an object ref that resolves when the actor answers) and
            ``answers(refs)`` (for each, True: answered, False: the actor died, None: not yet).
        timeout: seconds without an answer after which a stage that answered before is hung.
        on_hung: called from the heartbeat's thread with ``(stage index, why)``, once per actor.
    """

    def __init__(self, stages, timeout: float, on_hung: Callable[[int, str], None]):
        self.stages, self.timeout, self.on_hung = stages, timeout, on_hung
        self._watches: dict[int, _Watch] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distlayer-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(interval(self.timeout)):
            try:
                self.beat()
            except Exception:  # Ray going down under a closing pipeline: the next beat, if any, tries again
                pass

    def beat(self) -> None:
        """Collect the answers that came, judge every stage, and ping the ones with no ping in flight."""
        now = time.monotonic()
        watches = self._watches
        for i, actor in enumerate(list(self.stages.actors)):
            if i not in watches or watches[i].actor is not actor:
                watches[i] = _Watch(actor)
        pending = [w for w in watches.values() if w.ref is not None]
        for w, answer in zip(pending, self.stages.answers([w.ref for w in pending])):
            if answer is not None:
                w.seen, w.dead, w.ref = w.sent, not answer, None  # a death is not this module's to report
        for i, w in watches.items():
            if w.dead:
                continue
            if w.seen is not None and w.ref is not None and now - w.seen > self.timeout:
                w.dead = True  # judged once; the replacement gets a watch of its own
                self.on_hung(i, f"answered no heartbeat for {now - w.seen:.0f}s (heartbeat_timeout is "
                                f"{self.timeout:g}s): its process is stopped, frozen or cut off")
            elif w.ref is None:
                w.ref, w.sent = self.stages.ping(w.actor), now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
