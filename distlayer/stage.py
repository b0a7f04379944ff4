"""StageActor: a plain class around one LayerRunner. The driver applies ``ray.remote``
(with its resources) from outside, so this class also runs in-process in tests. How
work reaches it (Ray calls, or a transport's serving loop: :meth:`StageActor.serve`) is the
transport's business; the stage sets up, runs, drops and reports."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from . import arch, compute, devices, hardware, rates, versions
from .errors import StageError, StoreError
from .planner import StagePlan
from .runner import LayerRunner, Step
from .store import LayerStore
from .transport.base import Payload, Work, in_request


class StageActor:
    """One pipeline stage: a device, a layer range and its KV caches.

    Construction is cheap; :meth:`setup` loads the weights once the driver has planned
    (it asks :meth:`describe` first).

    Args:
        store_path: the layer store on this node's disk (the driver's path;
            ``fill.use_store`` may point the stage at its node's own copy before :meth:`setup`).
        stage: stage index (-1: a spare, told its stage by :meth:`setup`).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: compute dtype.
        prefetch: stream units on a background thread.
    """

    def __init__(self, store_path: str, stage: int, device: str = "cpu", dtype=None, prefetch: bool = True):
        self.store_path = store_path  # fill.use_store points it at this node's copy before setup
        self.store: LayerStore | None = None
        self.stage = stage
        self.device = devices.kind_of(device).stage_device or device  # a Ray actor sees its GPU as cuda:0
        self.dtype, self.prefetch = dtype, prefetch
        self.runner: LayerRunner | None = None
        self.transfer_s = 0.0
        self.server = None  # the loop a transport serves this stage from (see serve), or None: Ray calls
        self._lock = threading.Lock()  # a transport's loop against calls from the driver

    def describe(self) -> dict:
        """Where this stage runs: pid, address, cores, the bytes its device has free, and
        which physical GPU it is (stages that share one share its memory), and the
        versions of the libraries that decide its answers."""
        return {"pid": os.getpid(), "stage": self.stage, "device": self.device, "versions": versions.installed(),
                **hardware.where(self.device)}

    def measure_rates(self, batch: int = 1, remeasure: bool = False, threads: int | None = None,
                      layers: tuple[int, int] | None = None, cached_only: bool = False) -> dict | None:
        """This stage's node and device rates for the cost model, measured here for its
        store's model at ``batch`` rows with ``threads`` torch threads (default: its
        runner's, else as set) on decoder ``layers`` (``rates.measure_node``: cached per
        node and model shape; ``remeasure`` measures again; ``cached_only`` returns None
        rather than measure). ``Rates(**result["rates"])`` is the rates."""
        threads = threads or (self.runner.threads if self.runner is not None else None)
        if cached_only and not (Path(self.store_path) / "manifest.json").is_file():
            return None  # no store on this node yet: the driver fills it, then asks again
        return rates.measure_node(self.store_path, self.dtype, self.device, batch, threads, remeasure,
                                  layers=layers, cached_only=cached_only)

    def setup(self, plan: StagePlan) -> None:
        """Load the stage's resident units and start streaming the rest, as planned."""
        if not (Path(self.store_path) / "manifest.json").is_file():
            raise StoreError(
                f"stage {self.stage} (pid {os.getpid()}) finds no layer store at {self.store_path} on its node: "
                "copy the shards there or run `distlayer split MODEL --out DIR` on that node"
            )
        self.stage = plan.stage  # a spare learns which stage it is here
        self.store = LayerStore(self.store_path)
        self.runner = LayerRunner(self.store, plan, device=self.device, dtype=self.dtype, prefetch=self.prefetch)

    def warm(self) -> None:
        """Import what :meth:`setup` will need for this store's architecture (a spare does
        it while nothing waits on it); nothing when its node has no store yet."""
        if (Path(self.store_path) / "manifest.json").is_file():
            arch.build_skeleton(LayerStore(self.store_path).config)  # parameters on the meta device: no memory

    def serve(self, server):
        """Take work from ``server``, a transport's loop in this process that calls
        :meth:`run` and the cache operations (``transport.sockets.StageServer``), in place of
        the one served before; it is closed with the stage, or on :meth:`reset`. Returns it."""
        self.stop_serving()
        self.server = server
        return server

    def stop_serving(self) -> None:
        """Close the transport's loop that serves this stage, if any: work comes as calls again."""
        server, self.server = self.server, None
        if server is not None:
            server.close()

    def reset(self) -> None:
        """Stop serving (:meth:`stop_serving`) and free every KV cache: the state of a stage
        that has just been set up, from which the driver replays what it had sent."""
        self.stop_serving()
        with self._lock:
            for key in list(self.runner.caches):
                self.runner.drop(key)

    @property
    def blocks(self) -> bool:
        """Whether this stage runs micro-batches that arrive together as one block
        (:meth:`run_block`): it streams, and its plan says so (``StagePlan.blocks``)."""
        return self.runner is not None and self.runner.blocks

    def run(self, work: Work, payload: Payload) -> Payload:
        """Run one micro-batch through this stage's units.

        With ``work.pick`` the last stage returns the greedy next token of each row
        (``[B]``) instead of logits, so only token ids travel on.
        """
        return self.run_block([work], [payload])[0]

    def run_block(self, works: list[Work], payloads: list[Payload]) -> list[Payload]:
        """Run micro-batches of different KV caches through this stage's units as one block:
        each streamed unit is read once and runs for every one of them
        (``LayerRunner.forward_block``); each output is what :meth:`run` gives for its work."""
        compute.single_threaded()  # the forward computes on the compute thread; this thread only hands over
        now = time.time()
        steps = []
        for work, payload in zip(works, payloads, strict=True):
            self.transfer_s += max(0.0, now - payload.sent_at)
            x = payload.x
            if x.dim() == 1:  # tokens the last stage picked in the previous step
                x = x[:, None]
            steps.append(Step(x, work.mask, work.pos, work.cache_id, work.logits_to_keep))
        with self._lock:
            outs = self.runner.forward_block(steps)
        last = self.runner.range.last
        # hidden states for the next stage leave a GPU through pinned memory; what the
        # driver keeps (logits, tokens) is plain host memory
        return [Payload.now(_picked(out, work) if last else self.runner.to_host(out))
                for work, out in zip(works, outs)]

    def drop(self, cache_id: str) -> None:
        """Free the KV caches of a finished request (all its micro-batches)."""
        with self._lock:
            for key in [k for k in self.runner.caches if in_request(k, cache_id)]:
                self.runner.drop(key)

    def select_rows(self, cache_id: str, rows: list[int], trim: int = 0) -> None:
        """Keep only ``rows`` of a request group's KV cache (the others finished), dropping
        its first ``trim`` positions (padding for every kept row)."""
        with self._lock:
            self.runner.caches[cache_id].select_rows(rows, trim)

    def merge_caches(self, into: str, other: str) -> None:
        """Move the rows of KV cache ``other`` into ``into`` (after its rows) and drop ``other``."""
        with self._lock:
            self.runner.caches[into].merge(self.runner.caches.pop(other))

    def stats(self) -> dict:
        """The runner's stats plus peak RSS and hand-off seconds."""
        if self.runner is None:
            raise StageError(f"stage {self.stage} (pid {os.getpid()}) is not set up yet: it is starting, or "
                             "replacing a lost stage; ask again in a moment")
        return {**self.runner.stats(), "transfer_s": round(self.transfer_s, 4)}

    def close(self) -> None:
        """Stop serving (:meth:`stop_serving`) and streaming."""
        self.stop_serving()
        if self.runner is not None:
            self.runner.close()


def _picked(out, work: Work):
    """The last stage's output for the driver: the greedy next tokens ``[B]`` where the
    work asks for them (``Work.pick``), else the logits, in host memory."""
    return (out[:, -1, :].argmax(-1) if work.pick else out).cpu()
