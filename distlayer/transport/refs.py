"""Hand-offs as calls: each hop is a call on the next stage whose argument is the previous
call's result (registry name ``"ray"``).

On Ray that result is an object ref, so hidden states go from actor to actor without
passing the driver, and a picked step's ref handed to the first stage's next call feeds
it the tokens the same way. In one process (``Stages.remote`` False) each call returns
its value at once: the whole step runs inside ``submit``, and a stage's error is kept for
``fetch`` to raise, as over Ray.
"""

from __future__ import annotations

from .base import Failed, Handle, Payload, Stages, Transport, Work, fed_from


class RefTransport(Transport):
    """Each hop a call on the next stage, passed the previous call's result.

    Args:
        stages: the stage actors (Ray actors, or objects in this process).
        hosts: ignored: object refs travel the same way on one node or several.
    """

    def __init__(self, stages: Stages, hosts=None):
        self.stages = stages
        self.name = "ray" if stages.remote else "in-process"
        self.feeds = stages.remote  # in one process a step is done before submit returns

    def submit(self, work: Work, x) -> Handle:
        fed = fed_from(x)
        msg = fed.ref if fed is not None else Payload.now(x)
        if isinstance(getattr(msg, "x", None), Failed):  # in one process: fed by a step that failed
            return Handle(work.key, msg, picked=work.pick)
        try:
            for actor in self.stages.actors:
                msg = self.stages.call(actor, "run", work, msg)
        except Exception as e:  # in one process the step runs here: fetch raises it
            msg = Payload.now(Failed(e))
        return Handle(work.key, msg, picked=work.pick)

    def fetch(self, handle: Handle):
        self.check()
        out = self.stages.get(handle.ref, self.timeout).x
        if isinstance(out, Failed):
            raise out.exc
        return out

    def control(self, op: str, *args) -> None:
        self.check()  # a wait under way fails when the driver kills the hung stage's actor
        s = self.stages
        s.get([s.call(a, op, *args) for a in s.actors], self.timeout)

