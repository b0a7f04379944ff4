"""Plain-text tables of what users see: the stage plan and per-stage stats."""

from __future__ import annotations

from .planner import fmt_bytes

STATS_COLUMNS = ("peak_weight_bytes", "peak_rss_bytes", "kv_bytes", "load_s", "stall_s", "compute_s", "transfer_s")


def _cell(key: str, value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("_bytes"):
        return fmt_bytes(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table; ``*_bytes`` columns human-readable."""
    if not rows:
        return "(empty)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_plan(plans) -> str:
    """The stage plan (``StagePlan`` objects) as a table: node, pid, device, threads, layers, bytes."""
    return table([{"stage": p.stage, "node": p.node_ip, "pid": p.pid, "device": p.device, "threads": p.threads,
                   "layers": f"{p.start}-{p.end - 1}",
                   "budget": fmt_bytes(p.budget_bytes) if p.budget_bytes is not None else "unlimited",
                   "resident": fmt_bytes(p.resident_bytes), "streamed": fmt_bytes(p.streamed_bytes)}
                  for p in plans])


def stats_table(stats: list[dict]) -> str:
    """Per-stage stats (``model.stats()``) as a table: stage, then the byte and time columns present."""
    cols = [c for c in STATS_COLUMNS if any(c in s for s in stats)]
    return table([{"stage": i, **{c: s.get(c) for c in cols}} for i, s in enumerate(stats)])
