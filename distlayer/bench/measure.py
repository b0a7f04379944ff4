"""The timing loop of every benchmark (``distlayer bench`` and the scripts in
``benchmarks/``): runs taking turns, one generate call timed, best run and median, the page
cache, and the read bandwidth of a set of files.

Timed runs take turns (:func:`take_turns`): after one warm-up run each, every round runs
each configuration once, so drift in the machine's speed hits all alike. A figure is the
best run's and the median run's (:func:`best_and_median`, :func:`per_second`,
:func:`speedup`).

Cold runs drop every file a system reads from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``) before the run and again at every token, through a
generate streamer's ``put``, so each step reads what it streams from disk again (except
what a loader thread had already read ahead). The kernel cannot drop a page some process
holds mapped, which is why a cold run must not share its files with another loaded model
(see :mod:`distlayer.bench.run`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..pages import drop_from_page_cache

READ_BUFFER = 64 * 2**20   # bytes a bandwidth read asks for at once


def store_files(path) -> list[Path]:
    """The shard files of a layer store (or the weights of a safetensors checkpoint dir):
    the files a cold run drops."""
    return sorted(Path(path).glob("*.safetensors"))


def drop_page_cache(files) -> None:
    """Ask the kernel to drop every page of ``files`` from the page cache."""
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            drop_from_page_cache(f)


def read_all(files, buf: bytearray) -> int:
    """Read every byte of ``files`` into ``buf`` (over and over); the bytes read."""
    view, total = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def read_bandwidth(files, cold: bool) -> dict:
    """Bytes per second a plain sequential read of ``files`` gets: from disk after dropping
    them from the page cache (``cold``), else from the page cache after a first read."""
    files = [Path(f) for f in files]
    buf = bytearray(READ_BUFFER)
    if cold:
        drop_page_cache(files)
    else:
        read_all(files, buf)
    t = time.perf_counter()
    nbytes = read_all(files, buf)
    seconds = time.perf_counter() - t
    return {"bytes": nbytes, "seconds": round(seconds, 4), "bytes_per_s": nbytes / seconds if seconds > 0 else None}


def wall_time(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def take_turns(fns: dict, repeat: int, warmup: bool = True, after_round: Callable[[int], None] | None = None) -> dict:
    """Call every function of ``fns`` once to warm up (with ``warmup``), then ``repeat``
    rounds in which each takes its turn, in the dict's order, so drift in the machine's
    speed hits all alike; ``after_round(r)`` is called after round ``r`` (from 0).

    Returns:
        what each call returned (not the warm-up's), a list per key of ``fns``.
    """
    if warmup:
        for fn in fns.values():
            fn()
    got: dict = {key: [] for key in fns}
    for r in range(repeat):
        for key, fn in fns.items():
            got[key].append(fn())
        if after_round:
            after_round(r)
    return got


def best_and_median(values: Sequence[float]) -> tuple[float, float]:
    """The least of some timed runs' values (the best run's seconds) and their median."""
    return min(values), statistics.median(values)


def per_second(work: float, seconds: Sequence[float]) -> tuple[float, float]:
    """``work`` (tokens, rows) per second of the best run and of the median run."""
    best, median = best_and_median(seconds)
    return work / best, work / median


def speedup(seconds: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """How many times faster the runs of ``seconds`` are than those of ``base``, which did
    the same work: best run against best run, and median against median."""
    (best, median), (base_best, base_median) = best_and_median(seconds), best_and_median(base)
    return base_best / best, base_median / median


class Clock:
    """A generate streamer that notes when the prompt and each new token arrive and, in a
    cold run, drops ``files`` from the page cache at every token. The time the drops take
    is kept in :attr:`drop_s`; with ``exclude_drops`` it is also taken out of the times
    noted, for a system that waits on this thread (in this process) and would otherwise be
    charged with it."""

    def __init__(self, files=(), exclude_drops: bool = False):
        self.files = list(files)
        self.exclude_drops = exclude_drops
        self.times: list[float] = []
        self.drop_s = 0.0

    def now(self) -> float:
        """The time, less the drops so far when they are excluded."""
        return time.perf_counter() - (self.drop_s if self.exclude_drops else 0.0)

    def put(self, value) -> None:
        self.times.append(self.now())
        if self.files:
            t = time.perf_counter()
            drop_page_cache(self.files)
            self.drop_s += time.perf_counter() - t

    def end(self) -> None:
        pass


@dataclass
class Run:
    """One timed generate call: wall time, time to first token, mean decode step."""

    total_s: float
    ttft_s: float | None
    step_s: float | None     # mean time of a decode step after the first token
    drop_s: float            # time spent dropping files from the page cache (excluded from the above, or not)
    tokens: int              # new tokens per row


def timed_run(generate, new: int, cold_files=None, exclude_drops: bool = False) -> Run:
    """Time ``generate(streamer)``, which makes ``new`` tokens per row; with
    ``cold_files``, those files are dropped from the page cache first and at every token
    (see :class:`Clock` for ``exclude_drops``)."""
    clock = Clock(cold_files or (), exclude_drops)
    if cold_files:
        drop_page_cache(cold_files)
    t0 = clock.now()
    generate(clock)
    total = clock.now() - t0
    times = clock.times[1:]   # [0] is the prompt
    ttft = times[0] - t0 if times else None
    step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return Run(total, ttft, step, clock.drop_s, new)


@dataclass
class Runs:
    """The timed runs of one configuration at one batch size and cache mode."""

    batch: int
    runs: list[Run] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)   # per-stage seconds over the runs, stages summed

    def summary(self) -> dict:
        """tokens/s (decode: after the first token; and end to end), time to first token,
        step time: best run and median; per-stage seconds per new token (prefill included)."""
        if not self.runs:
            return {}
        b, new = self.batch, self.runs[0].tokens
        steps = [r.step_s for r in self.runs if r.step_s]
        ttfts = [r.ttft_s for r in self.runs if r.ttft_s is not None]
        totals = [r.total_s for r in self.runs]
        tok_s, tok_s_median = per_second(b * new, totals)
        out = {"runs": len(self.runs), "new_tokens": new,
               "tok_s": round(tok_s, 3), "tok_s_median": round(tok_s_median, 3),
               "drop_ms_per_step": round(1e3 * sum(r.drop_s for r in self.runs) / (len(self.runs) * new), 3)}
        if steps:
            (decode, decode_median), (step, step_median) = per_second(b, steps), best_and_median(steps)
            out.update(decode_tok_s=round(decode, 3), decode_tok_s_median=round(decode_median, 3),
                       step_ms=round(1e3 * step, 3), step_ms_median=round(1e3 * step_median, 3))
        if ttfts:
            ttft, ttft_median = best_and_median(ttfts)
            out.update(ttft_ms=round(1e3 * ttft, 2), ttft_ms_median=round(1e3 * ttft_median, 2))
        if self.costs:
            tokens = len(self.runs) * new
            out["stage_ms_per_token"] = {k: round(1e3 * v / tokens, 3) for k, v in sorted(self.costs.items())}
        return out


def seconds_of(stats: list[dict] | None) -> dict[str, float]:
    """Per-stage seconds counters (``load_s``, ``stall_s``, ``compute_s``, …) summed over stages."""
    out: dict[str, float] = {}
    for st in stats or []:
        for k, v in st.items():
            if k.endswith("_s") and isinstance(v, (int, float)):
                out[k] = out.get(k, 0.0) + float(v)
    return out


def host_to_device_rate(nbytes: int, reps: int, pinned: bool = True, device: str = "cuda") -> float:
    """Bytes/s of ``torch`` copies of ``nbytes`` from host memory (pinned, else pageable)
    to ``device``, timed with CUDA events over ``reps`` copies after one untimed."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=pinned)
    end.record()
    end.synchronize()
    return reps * nbytes / (start.elapsed_time(end) / 1000)
