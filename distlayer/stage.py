"""StageActor: a plain class around one LayerRunner. The driver applies ``ray.remote``
(with its resources) from outside, so this class also runs in-process in tests."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import torch

from .channel import Failed, Link, Mailbox, in_request
from .errors import StageError, StoreError
from .generate import SamplingSettings, pick_next
from .runner import LayerRange, LayerRunner
from .store import LayerStore


# A CPU forward of fewer tokens than this (decode at batch 1 to 7) runs on one thread:
# its matmuls are too small to split well. Measured on a 2-core node (SmolLM2, 2 stages
# taking turns, 32 new tokens, median of 6): batch 4 1.96 s against 2.04 s on 2 threads,
# batch 1 1.43 s against 1.45 s; batch 8 is faster on 2 threads.
SMALL_FORWARD = 8


class StageActor:
    """One pipeline stage: a device, a layer range and its KV caches.

    Construction is cheap; :meth:`setup` loads the weights once the driver has planned
    the ranges (it may ask :meth:`free_memory` first).

    Args:
        store_path: the layer store on this node's disk.
        stage: stage index.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: compute dtype.
        prefetch: stream units on a background thread.
    """

    def __init__(self, store_path: str, stage: int, device: str = "cpu", dtype=None, prefetch: bool = True):
        if not (Path(store_path) / "manifest.json").is_file():
            raise StoreError(
                f"stage {stage} (pid {os.getpid()}) finds no layer store at {store_path} on its node: "
                "copy the shards there or run `distlayer split MODEL --out DIR` on that node"
            )
        self.store = LayerStore(store_path)
        self.stage = stage
        self.device = "cuda:0" if device.startswith("cuda") else device
        self.dtype, self.prefetch = dtype, prefetch
        self.runner: LayerRunner | None = None
        self.transfer_s = 0.0
        self._gens: dict[str, torch.Generator] = {}  # seeded sampling, per micro-batch cache
        self._inbox: Mailbox | None = None  # same-node channels (see ``channel``)
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()  # the serving loop against calls from Ray
        self._threads: int | None = None  # set by setup; None: leave torch's threads alone

    def free_memory(self) -> int:
        """Bytes this stage's device has free now."""
        if self.device.startswith("cuda"):
            return int(torch.cuda.mem_get_info(torch.device(self.device))[0])
        return int(psutil.virtual_memory().available)

    def setup(self, layer_range: LayerRange, budget_bytes: int | None, num_threads: int | None = None) -> dict:
        """Load the stage's resident units and start streaming; returns what it holds.
        ``num_threads``: torch intra-op threads for this stage; None leaves torch's default."""
        if num_threads:
            torch.set_num_threads(num_threads)
            self._threads = num_threads
        self.runner = LayerRunner(self.store, layer_range, device=self.device, dtype=self.dtype,
                                  budget_bytes=budget_bytes, prefetch=self.prefetch, stage=self.stage)
        r = self.runner
        return {"pid": os.getpid(), "device": str(r.device), "budget_bytes": r.budget, "threads": torch.get_num_threads(),
                "resident_bytes": sum(r.unit_bytes[u] for u in r.resident),
                "streamed_bytes": sum(r.unit_bytes[u] for u in r.streamed)}

    def listen(self, authkey: bytes, senders: int) -> str:
        """Open this stage's mailbox for ``senders`` peers on its node; returns its address."""
        self._inbox = Mailbox(authkey, f"stage {self.stage}", senders)
        return self._inbox.address

    def connect(self, authkey: bytes, links: dict[str, tuple[str, str]]) -> None:
        """Connect to the mailboxes this stage sends to: ``{role: (address, receiver)}``,
        roles ``"next"`` (the next stage), or on the last stage ``"driver"`` and ``"ring"``
        (the first stage, for the tokens it picks)."""
        self._links = {role: Link(addr, authkey, f"stage {self.stage}", who) for role, (addr, who) in links.items()}

    def serve(self) -> None:
        """Start the loop that takes work from this stage's mailbox (see ``channel``)."""
        threading.Thread(target=self._serve, name=f"stage-{self.stage}", daemon=True).start()

    def _serve(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)  # OpenMP's thread count is per calling thread
        last = self.runner.range.last
        while True:
            try:
                key, group, sent_at, work = self._inbox.next()
            except StageError:  # the stage before died: say so downstream, and stop
                for link in self._links.values():
                    try:
                        link.send("gone", "", "", self._inbox.gone)
                    except StageError:
                        pass
                return
            try:
                if work == "drop":
                    self.drop(group)
                    if last:  # every stage has dropped it: tell the driver
                        self._links["driver"].send("k", key, "", None)
                    else:
                        self._links["next"].send("q", key, group, work)
                    continue
                x, ring_key, mask, pos, logits_to_keep, pick = work
                if not isinstance(x, Failed):
                    try:
                        if x is None:  # tokens the last stage picked in the previous step
                            x, sent_at = self._inbox.take(ring_key)
                        self.transfer_s += max(0.0, time.time() - sent_at)
                        x = self._compute(x, mask, pos, group, logits_to_keep, pick)
                    except BaseException as e:
                        x = Failed(e)
                if not last:
                    self._links["next"].send("q", key, group, (x, None, mask, pos, logits_to_keep, pick))
                    continue
                self._links["driver"].send("k", key, group, x)
                if pick is not None:  # picked tokens also feed the first stage's next step
                    self._links["ring"].send("k", key, group, x)
            except StageError:  # the stage after died; the driver learns it from its own mailbox
                return

    def forward(self, msg: tuple, mask, pos, cache_id: str, logits_to_keep: int = 1,
                pick: SamplingSettings | None = None) -> tuple:
        """Run one micro-batch (the Ray object-ref hand-off). ``msg`` is ``(tensor, sent_at)``
        from the driver or the previous stage; returns ``(output, sent_at)`` for the next hop."""
        x, sent_at = msg
        self.transfer_s += max(0.0, time.time() - sent_at)
        return self._compute(x, mask, pos, cache_id, logits_to_keep, pick), time.time()

    def _compute(self, x, mask, pos, cache_id: str, logits_to_keep: int, pick: SamplingSettings | None):
        """This stage's forward of one micro-batch, on the CPU.

        With ``pick`` (``generate.picking``) the last stage returns the next token of each
        row (``[B]``: argmax, or sampled with the micro-batch's own seeded generator)
        instead of logits, so only token ids travel on.
        """
        if x.dim() == 1:  # tokens the last stage picked in the previous step
            x = x[:, None]
        if self._threads and self.device == "cpu":
            n = 1 if x.shape[0] * x.shape[1] < SMALL_FORWARD else self._threads
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        with self._lock:
            out = self.runner.forward(x, mask, pos, cache_id, logits_to_keep)
            if pick is not None and self.runner.range.last:
                last = out[:, -1, :]
                out = pick_next(last.float().cpu(), pick, self._generator(cache_id, pick)) if pick.do_sample \
                    else last.argmax(-1)
        return out.cpu()

    def _generator(self, cache_id: str, pick: SamplingSettings) -> torch.Generator | None:
        if pick.seed is None:
            return None
        if cache_id not in self._gens:
            self._gens[cache_id] = torch.Generator().manual_seed(pick.seed)
        return self._gens[cache_id]

    def drop(self, cache_id: str) -> None:
        """Free the KV caches of a finished request (all its micro-batches)."""
        with self._lock:
            for key in [k for k in self.runner.caches if in_request(k, cache_id)]:
                self.runner.drop(key)
            for key in [k for k in self._gens if in_request(k, cache_id)]:
                del self._gens[key]
        if self._inbox is not None:
            self._inbox.discard(cache_id)

    def stats(self) -> dict:
        """The runner's stats plus peak RSS and hand-off seconds."""
        return {**self.runner.stats(), "transfer_s": round(self.transfer_s, 4)}

    def close(self) -> None:
        for end in [*self._links.values(), self._inbox]:
            if end is not None:
                end.close()
        if self.runner is not None:
            self.runner.close()
