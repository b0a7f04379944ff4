"""Drivers that run a model's stages in order.

``LocalPipeline`` runs every stage's ``LayerRunner`` in this process (``stages=0``,
debugging, single-device runs). The Ray driver, with one actor per stage, builds on
the same ``forward`` / ``drop`` / ``plan`` / ``stats`` / ``close`` seam.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, asdict

import psutil
import torch

from .planner import split_layers
from .runner import LayerRange, LayerRunner
from .store import LayerStore


@dataclass
class StagePlan:
    """Where one stage runs and what it holds (``model.plan`` entries)."""

    stage: int
    node_ip: str
    pid: int
    device: str
    start: int            # first decoder layer (inclusive)
    end: int              # last decoder layer (exclusive)
    budget_bytes: int | None
    resident_bytes: int
    streamed_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def node_ip() -> str:
    """This machine's address as other nodes would see it (best effort)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def stage_ranges(store: LayerStore, stages: int, dtype=None) -> list[LayerRange]:
    """Even-by-bytes contiguous layer ranges for ``stages`` stages."""
    layer_bytes = [store.unit_bytes(f"layer.{i}", dtype) for i in range(store.num_layers)]
    cuts = split_layers(layer_bytes, stages)
    return [LayerRange(a, b, first=i == 0, last=i == len(cuts) - 1) for i, (a, b) in enumerate(cuts)]


def runner_stats(runner: LayerRunner) -> dict:
    """A stage's stats as ``model.stats()`` reports them."""
    st = runner.stats()
    st["peak_rss_bytes"] = _peak_rss()
    return st


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # pragma: no cover - not on Linux
        return psutil.Process().memory_info().rss


class LocalPipeline:
    """All stages in this process, run one after another.

    Args:
        store: the layer store.
        ranges: each stage's layer range.
        budgets: weight budget per stage (None: unlimited).
        device, dtype, prefetch: passed to each ``LayerRunner``.
    """

    def __init__(self, store: LayerStore, ranges: list[LayerRange], budgets: list[int | None],
                 device="cpu", dtype=None, prefetch=True):
        self.runners = [LayerRunner(store, r, device=device, dtype=dtype, budget_bytes=b, prefetch=prefetch, stage=i)
                        for i, (r, b) in enumerate(zip(ranges, budgets))]
        self.transfer_s = 0.0
        ip = node_ip()
        self.plan = [StagePlan(i, ip, os.getpid(), str(r.device), r.range.start, r.range.end, r.budget,
                               sum(r.unit_bytes[u] for u in r.resident), sum(r.unit_bytes[u] for u in r.streamed))
                     for i, r in enumerate(self.runners)]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, cache_id: str,
                logits_to_keep: int = 1) -> torch.Tensor:
        """Run all stages on one batch; returns the last stage's logits."""
        x = ids
        for r in self.runners:
            x = r.forward(x, mask, pos, cache_id, logits_to_keep)
        return x

    def drop(self, cache_id: str) -> None:
        for r in self.runners:
            r.drop(cache_id)

    def stats(self) -> list[dict]:
        return [{**runner_stats(r), "transfer_s": 0.0} for r in self.runners]

    def close(self) -> None:
        for r in self.runners:
            r.close()
