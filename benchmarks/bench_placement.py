"""Layers placed by measured speed against layers placed by bytes, on two hosts of which
one is slowed: tokens/s of each placement, and the cost model's predicted decode step
against the measured one, in the same run.

    sudo python benchmarks/bench_placement.py [--model DIR] [--new 24] [--repeat 3] [--quota 0.5]
                                              [--batches 1 4] [--json FILE]

The two hosts are network namespaces on this machine (``tests/ray_nodes.NetnsHosts``: a
veth pair, one Ray node each, token auth, separate DISTLAYER_HOMEs, so each measures and
caches its own rates). Host 0 is held to ``--quota`` cores (default half a core) by a
cgroup v1 cpu quota (``cpu.cfs_quota_us``) that every process on it shares: its Ray node
(raylet, GCS, workers: stage 0) and the driver, which runs there too. Host 1 is not
limited. Both read the one store in place (none is hidden).

For each batch size (``--batches``, ``max_rows`` = the batch) pipelines of the same
model are loaded on the same two stages (``stage_resources``: stage 0, the first layers,
on the slowed host 0; stage 1 on host 1; ``cpus_per_stage`` 0.5, one thread a stage):
``balance="bytes"`` (layers split by their bytes, as before, in the default two
micro-batches, one per node), ``bytes/m1`` (the same in one micro-batch, for batches
over 1: what the micro-batch count alone gives) and ``balance="speed"`` (each node
measured, ``distlayer/rates.py``, and the layer ranges and micro-batch count taken that
minimise the cost model's predicted step). Default model: the embedded SmolLM2-135M-Instruct, float32,
greedy, ``--new`` tokens a row (no stop at EOS). Needs root (``ip netns``, cgroups).

Measured: the time of a decode step after the first token (a generate streamer notes
each token; ``distlayer.bench.measure.timed_run``); after a warm-up run each, the
placements take turns (``take_turns``); best run and median. tokens/s is the batch over
the step. ``pred s`` is ``model.prediction.step_s`` (the cost model's step for the plan
that runs, at ``max_rows`` rows); a ``balance="bytes"`` pipeline measures nothing, so its
plan is predicted with the rates the ``"speed"`` pipeline measured on the same nodes.
``pred/meas`` is it over the best measured step. ``stage ms/tok`` is each stage's ``stats()`` compute
seconds per new token (prefill included) over the timed runs, beside the predicted
stage times. The warm-up runs' greedy texts of the two placements must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

WITHIN = 0.25   # a prediction within this share of the measured step counts as right
BALANCES = ("bytes", "bytes/m1", "speed")  # "bytes/m1": by bytes in one micro-batch (batches over 1)

DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    from bench_pipeline import batch as prompt_batch
    from distlayer import AutoModel
    from distlayer.bench import measure
    from distlayer.cost import predict
    from distlayer.planner import ModelShape, Plan

    model_dir, address, new, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    batches = [int(b) for b in sys.argv[5].split(",")]
    balances = sys.argv[6].split(",")
    kw = dict(stages=2, address=address, progress=False, dtype="float32",
              stage_resources=[{"host_0": 0.1}, {"host_1": 0.1}], cpus_per_stage=0.5, threads_per_stage=1)
    out = []
    for batch in batches:
        models, load_s = {}, {}
        for balance in balances:
            if balance.endswith("/m1") and batch == 1:
                continue  # one row is one micro-batch anyway
            t = time.perf_counter()
            extra = {"micro_batches": 1} if balance.endswith("/m1") else {}
            models[balance] = AutoModel.from_pretrained(model_dir, balance=balance.split("/")[0], max_rows=batch,
                                                        **extra, **kw)
            load_s[balance] = time.perf_counter() - t
        tok = next(iter(models.values())).tokenizer
        ids, mask = prompt_batch(tok, batch)
        gen = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=[])

        def run(m):
            return measure.timed_run(lambda streamer: m.generate(ids, streamer=streamer, **gen), new)

        texts = {}
        for balance, m in models.items():  # the warm-up: its greedy texts are compared
            seq = m.generate(ids, **gen)
            texts[balance] = tok.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)
        before = {b: measure.seconds_of(m.stats()) for b, m in models.items()}
        per_stage_before = {b: [s.get("compute_s", 0.0) for s in m.stats()] for b, m in models.items()}
        with torch.inference_mode():
            runs = measure.take_turns({b: (lambda m=m: run(m)) for b, m in models.items()}, repeat, warmup=False)
        measured = models.get("speed") and models["speed"].survey
        for balance, m in models.items():
            steps = [r.step_s for r in runs[balance]]
            best, median = measure.best_and_median(steps)
            pred = m.prediction
            if pred is None and measured:  # bytes placement measures nothing: its plan on the speed run's rates
                plan = Plan(tuple(p.plan for p in m.plan), m.pipeline.micro_batches(batch))
                pred = predict(ModelShape.from_store(m.store, m.dtype), plan, list(measured.rates), batch)
            tokens = repeat * new
            stage_ms = [round(1e3 * (s.get("compute_s", 0.0) - b) / tokens, 3)
                        for s, b in zip(m.stats(), per_stage_before[balance])]
            after = measure.seconds_of(m.stats())
            out.append({
                "balance": balance, "batch": batch, "new_tokens": new, "runs": repeat,
                "load_s": round(load_s[balance], 2),
                "stages": [[p.start, p.end] for p in m.plan], "nodes": [p.node_ip for p in m.plan],
                "measured_s": best, "measured_median_s": median,
                "tok_s": batch / best, "tok_s_median": batch / median,
                "predicted_s": pred.step_s if pred else None,
                "predicted_stage_s": [s.step_s for s in pred.stages] if pred else None,
                "predicted_batch": pred.batch if pred else None,
                "predicted_tok_s": pred.tokens_per_s if pred else None,
                "bound": pred.why if pred else None,
                "ratio": pred.step_s / best if pred else None,
                "ratio_median": pred.step_s / median if pred else None,
                "stage_compute_ms_per_token": stage_ms,
                "stats_ms_per_token": {k: round(1e3 * (after[k] - before[balance].get(k, 0.0)) / tokens, 3)
                                       for k in ("compute_s", "load_s", "stall_s") if k in after},
                "prediction": pred.as_dict() if pred else None,
                "survey": measured.as_dicts() if measured else None,
                "texts": texts[balance]})
        for m in models.values():
            m.close()
    print("RESULT " + json.dumps(out))
""")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="a model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--new", type=int, default=24, help="new tokens a row per run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per placement, after one warm-up")
    ap.add_argument("--quota", type=float, default=0.5, help="cores host 0 (stage 0's) is held to")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    from ray_nodes import NetnsHosts, cpu_quota_problem

    from distlayer import split
    from distlayer.smollm import resolve_model

    why = cpu_quota_problem()
    if why:
        sys.exit(f"cannot hold a host to a CPU quota here: {why}")
    path = resolve_model(a.model)
    split(path, progress=False)  # the store, once, before either host reads it
    root = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    homes = [root / "h0", root / "h1"]
    for h in homes:
        h.mkdir()
    t = time.perf_counter()
    hosts = NetnsHosts(homes, cpus=4, cpu_quota=[a.quota, None])  # logical CPUs: each stage computes on one thread
    try:
        pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
        cmd = ["env", f"PYTHONPATH={pythonpath}", "HF_HUB_OFFLINE=1", sys.executable, "-c", DRIVER, str(path),
               hosts.address, str(a.new), str(a.repeat), ",".join(map(str, a.batches)), ",".join(BALANCES)]
        run = hosts.run(0, cmd, timeout=3600, cwd=str(ROOT / "benchmarks"))
    finally:
        hosts.stop()
        shutil.rmtree(root, ignore_errors=True)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        sys.exit(f"the driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    rows = json.loads(line[0][len("RESULT "):])
    summary = print_table(rows, a.quota)
    print(f"wall time of the cluster and driver: {time.perf_counter() - t:.0f} s")
    print(json.dumps({"rows": rows, "summary": summary}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
                       "quota": a.quota, "rows": rows, "summary": summary}, f, indent=1)


def print_table(rows: list[dict], quota: float) -> dict:
    """Print a row per placement and batch, then the speed/bytes ratios; returns the latter."""
    print(f"host 0 (stage 0) held to {quota} cores; host 1 unlimited")
    print(f"{'balance':8} {'batch':>5} {'stage layers':18} {'tok/s':>7} {'median':>7} {'meas ms':>8} "
          f"{'pred ms':>8} {'pred/meas':>9} {'±25%':>5}  {'pred stage ms':16} {'stage ms/tok':16} bound")
    for r in rows:
        layers = " ".join(f"[{a},{b})" for a, b in r["stages"])
        pred = f"{1e3 * r['predicted_s']:8.1f}" if r["predicted_s"] is not None else f"{'-':>8}"
        ratio = f"{r['ratio']:9.2f}" if r["ratio"] is not None else f"{'-':>9}"
        within = "-" if r["ratio"] is None else "yes" if abs(r["ratio"] - 1) <= WITHIN else "no"
        pstage = "/".join(f"{1e3 * s:.1f}" for s in r["predicted_stage_s"]) if r["predicted_stage_s"] else "-"
        mstage = "/".join(f"{s:.1f}" for s in r["stage_compute_ms_per_token"])
        print(f"{r['balance']:8} {r['batch']:>5} {layers:18} {r['tok_s']:7.2f} {r['tok_s_median']:7.2f} "
              f"{1e3 * r['measured_s']:8.1f} {pred} {ratio} {within:>5}  {pstage:16} {mstage:16} {r['bound'] or '-'}")
    summary = {}
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["balance"]: r for r in rows if r["batch"] == batch}
        if {"speed", "bytes"} <= set(by):
            s, b = by["speed"], by["bytes"]
            summary[batch] = {"speed_over_bytes_tok_s": s["tok_s"] / b["tok_s"],
                              "speed_over_bytes_tok_s_median": s["tok_s_median"] / b["tok_s_median"],
                              "same_texts": s["texts"] == b["texts"]}
            print(f"batch {batch}: speed/bytes tokens/s {s['tok_s'] / b['tok_s']:.2f} (best) "
                  f"{s['tok_s_median'] / b['tok_s_median']:.2f} (median); greedy texts "
                  f"{'identical' if s['texts'] == b['texts'] else 'DIFFER'}")
            if "bytes/m1" in by:
                one = by["bytes/m1"]
                summary[batch].update(speed_over_bytes_m1_tok_s=s["tok_s"] / one["tok_s"],
                                      speed_over_bytes_m1_tok_s_median=s["tok_s_median"] / one["tok_s_median"],
                                      same_texts=summary[batch]["same_texts"] and one["texts"] == s["texts"])
                print(f"batch {batch}: speed/(bytes, 1 micro-batch) tokens/s {s['tok_s'] / one['tok_s']:.2f} (best) "
                      f"{s['tok_s_median'] / one['tok_s_median']:.2f} (median)")
    return summary


if __name__ == "__main__":
    main()
