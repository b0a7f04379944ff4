"""Timing one generate call, the page cache, and the read bandwidth of a set of files.

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

from ..pages import drop_from_page_cache

READ_BUFFER = 64 * 2**20   # bytes a bandwidth read asks for at once


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
        out = {"runs": len(self.runs), "new_tokens": new,
               "tok_s": round(b * new / min(totals), 3), "tok_s_median": round(b * new / statistics.median(totals), 3),
               "drop_ms_per_step": round(1e3 * sum(r.drop_s for r in self.runs) / (len(self.runs) * new), 3)}
        if steps:
            out.update(decode_tok_s=round(b / min(steps), 3),
                       decode_tok_s_median=round(b / statistics.median(steps), 3),
                       step_ms=round(1e3 * min(steps), 3), step_ms_median=round(1e3 * statistics.median(steps), 3))
        if ttfts:
            out.update(ttft_ms=round(1e3 * min(ttfts), 2), ttft_ms_median=round(1e3 * statistics.median(ttfts), 2))
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
