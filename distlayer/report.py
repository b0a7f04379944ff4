"""Plain-text tables of what users see: the stage plan and per-stage stats."""

from __future__ import annotations

from .planner import fmt_bytes, reserved_context
from .units import unit_names

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


def plan_row(p) -> dict:
    """A stage plan's layers and bytes, as :func:`format_plan` and :func:`format_whatif` show
    them: the bytes of its units in each tier (resident on its device, pinned in host
    memory, and read from disk each step)."""
    return {"layers": f"{p.start}-{p.end - 1}",
            "budget": fmt_bytes(p.budget_bytes) if p.budget_bytes is not None else "unlimited",
            "kv+act": fmt_bytes(p.reserve_bytes), "resident": fmt_bytes(p.resident_bytes),
            "pinned": fmt_bytes(p.host_bytes), "from disk": fmt_bytes(p.streamed_bytes)}


def tier_note(p) -> str:
    """Where a stage plan's streamed units are, and why, in a line: pinned in host memory
    (how much of the stage's host budget, and where that budget came from) or read from disk."""
    if not p.streamed_units:
        return f"stage {p.stage}: all resident, nothing streams"
    budget = f"{fmt_bytes(p.host_budget_bytes)} host budget ({p.host_source})"
    left = [u for u in p.streamed_units if u not in p.host_units]
    if p.host_units:
        rest = f"; {len(left)} from disk ({unit_names(left)})" if left else ""
        return (f"stage {p.stage}: pinned {len(p.host_units)} of {len(p.streamed_units)} streamed units, "
                f"{fmt_bytes(p.host_bytes)} of its {budget}{rest}")
    if p.host_budget_bytes:
        return f"stage {p.stage}: disk: no streamed unit it may pin fits its {budget}"
    return f"stage {p.stage}: disk ({p.host_source})"


def format_plan(plans) -> str:
    """The stage plan (``model.plan``'s ``placement.PlacedStage`` entries) as a table:
    node, pid, device, threads, layers, bytes."""
    return table([{"stage": p.stage, "node": p.node_ip, "pid": p.pid, "device": p.device, "threads": p.threads,
                   **plan_row(p)} for p in plans])


def seconds(s: float) -> str:
    """``0.0123`` as ``12.3 ms``; a second or more as ``1.23 s``."""
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.3g} ms"


def format_whatif(w) -> str:
    """A what-if plan (``whatif.WhatIf``): the plan on the file's devices, each stage's
    predicted decode step and what bounds it, the bottleneck, and tokens/s."""
    pred = w.prediction
    rows = []
    for p, (node, dev), c in zip(w.plan.stages, w.devices(), pred.stages):
        rows.append({"stage": p.stage, "node": node.name, "device": dev.label, "threads": p.threads, **plan_row(p),
                     "step": seconds(c.step_s), "compute": seconds(c.compute_s), "stream": seconds(c.streaming_s),
                     "hand-off": seconds(c.handoff_s), "bound": c.bound})
    return "\n".join([
        table(rows), "", f"dtype: {w.dtype}; " + prediction_lines(pred), f"layers placed {w.plan.balance_note} (--balance)",
        f"block schedule: {w.plan.block_note} (--block-schedule)",
        "Predictions for devices described in a file are not yet checked against measurements: they use peak "
        "figures and no per-layer overhead, so read them as an upper bound.", "", tier_lines(w.plan.stages)])


def tier_lines(plans) -> str:
    """Each stage's :func:`tier_note`, under a line that says what the tiers are."""
    return "\n".join(["streamed units: pinned in host memory (copied to the device each step, read from disk once, "
                      "--host-memory) or read from disk each step", *(tier_note(p) for p in plans)])


def prediction_lines(pred) -> str:
    """A ``cost.Prediction`` in a few lines: rows, micro-batches and context, the step and
    its formula, the bottleneck, tokens/s, and the overlap the model assumes."""
    return "\n".join([
        f"{pred.batch} row(s) (--max-rows) in {pred.micro_batches} micro-batch(es), {pred.context} tokens of "
        "context (half of --context)",
        f"predicted decode step: {seconds(pred.step_s)} = {pred.formula}",
        f"bottleneck: {pred.why}",
        f"predicted tokens/s: {pred.tokens_per_s:.3g} at {pred.batch} row(s)",
        "a stage's step is max(compute, stream) + hand-off: prefetch overlaps reads with compute."])


def _rate(value, unit: float = 1e9) -> str:
    return "-" if value is None else f"{value / unit:.3g}"


def format_measured(placed) -> str:
    """What a plan's nodes measured (``placement.PlacedPlan.survey``) and the cost model's
    prediction for it: per stage its node's rates (GFLOP/s, memory, stream and link GB/s,
    overhead per forward and per layer), predicted step and bound; then the prediction and
    how the ranges were chosen. "" when nothing was measured."""
    if placed.survey is None or placed.prediction is None:
        return ""
    rows = []
    for p, m, r, c in zip(placed.stages, placed.survey.as_dicts(), placed.survey.rates, placed.prediction.stages):
        link = m["link"]
        rows.append({"stage": p.stage, "node": p.node_ip, "measured": "cached" if m["cached"] else f"{m['seconds']:.1f} s",
                     "GFLOP/s": _rate(r.flops), "mem GB/s": _rate(r.mem_bw), "stream GB/s": _rate(r.disk_bw),
                     "link GB/s": _rate(link and link["link_bw"]),
                     "link ms": "-" if link is None else f"{link['link_latency_s'] * 1000:.3g}",
                     "overhead ms": f"{r.step_overhead_s * 1000:.3g}+{r.layer_overhead_s * 1000:.3g}/layer",
                     "step": seconds(c.step_s), "bound": c.bound})
    return "\n".join([table(rows), "", prediction_lines(placed.prediction),
                      f"layers placed {placed.plan.balance_note} (--balance)"])


def plan_notes(plan, cfg, dtype) -> str:
    """Where each number of ``plan`` came from, and the flag that sets it.

    Args:
        plan: a ``planner.Plan`` (or ``placement.PlacedPlan``).
        cfg: the ``PipelineConfig`` it was planned with.
        dtype: the compute dtype.
    """
    def origin(given: bool, default: str, flag: str) -> str:
        return f"({flag})" if given else f"(default: {default}; set {flag})"

    lines = [f"stages: {len(plan.stages)} "
             + origin(cfg.stage_count_given() is not None, "one per GPU, else 1", "--stages"),
             f"dtype: {str(dtype).removeprefix('torch.')} "
             + origin(cfg.dtype is not None, "the checkpoint's", "--dtype")]
    for p in plan.stages:
        budget = fmt_bytes(p.budget_bytes) if p.budget_bytes is not None else "unlimited"
        lines.append(f"stage {p.stage} budget: {budget} "
                     + origin(p.budget_source == "memory_per_stage", p.budget_source, "--memory-per-stage"))
    context = reserved_context(cfg.context, plan.stages[0].device if plan.stages else "cpu")
    if context:
        lines.append(f"reserved per stage for KV cache and activations: {cfg.max_rows} rows x {context} "
                     "tokens " + origin(cfg.context is not None, "on a GPU", "--max-rows, --context"))
    else:
        lines.append("no KV cache reserved: a budget bounds weights alone (set --context to reserve it)")
    lines.append(f"threads: {', '.join(str(p.threads) for p in plan.stages)} "
                 + origin(cfg.threads_per_stage is not None, "the node's cores, shared by its stages that work "
                          "at once", "--threads-per-stage"))
    lines.append(f"micro-batches: {plan.micro_batches} "
                 + origin(cfg.micro_batches is not None, "one per device", "--micro-batches"))
    lines.append(f"block schedule: {getattr(plan, 'plan', plan).block_note} "
                 + origin(cfg.block_schedule != "auto", "auto", "--block-schedule"))
    lines.append(tier_lines(plan.stages))
    return "\n".join(lines)


def stats_table(stats: list[dict]) -> str:
    """Per-stage stats (``model.stats()``) as a table: stage, then the byte and time columns present."""
    cols = [c for c in STATS_COLUMNS if any(c in s for s in stats)]
    return table([{"stage": i, **{c: s.get(c) for c in cols}} for i, s in enumerate(stats)])
