"""The cost model (distlayer/cost.py) against measured decode steps on this machine.

    python benchmarks/bench_cost.py [--model default] [--stages 1 2 3] [--batches 1 4] [--new 16]
                                    [--repeat 3] [--share 0.25] [--remeasure] [--json FILE]

Once per batch size, this node's rates are measured (``distlayer.rates``: a real decoder
layer of the model for FLOP/s and overheads, a large read for memory bandwidth, the
store's shards for disk; cached under ``$DISTLAYER_HOME/rates``, ``--remeasure`` measures
again). Then, for 1, 2 and 3 in-process stages (``stages=0`` for one, ``in_process=True``
for more; with ``--ray`` also as Ray stages), each resident and streaming (``memory_per_stage`` a ``--share`` of the model's
weight bytes: a CPU budget without a context reserves no KV cache), the model is loaded,
its ``model.plan`` taken as a planner ``Plan``, and the decode step predicted with
``cost.predict`` at a context of the prompt plus half the new tokens. The runs are warm
(the page cache holds the store), so streaming is predicted at the rate a stage that maps
its shards pages them in and out from the page cache (``mapped_page_cache_bw``; else the
page cache's read rate, ``page_cache_bw``), not the disk's; ``pred_cold_s`` is the prediction
at the disk's rate, for a cold run, which is not measured here.

Measured: greedy decode of ``--new`` tokens a row, the time per new token after the first
(a generate streamer notes each token; ``distlayer.bench.measure.timed_run``), warm page
cache; after a warm-up run each, configurations take turns (``take_turns``); best run and
median. ``model.stats()`` compute_s / load_s / stall_s, summed over stages, per new token
(prefill included), over the timed runs. ``pred_base_s`` is the prediction without the
measured overheads (``Rates.step_overhead_s``, ``layer_overhead_s``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from bench_pipeline import batch as prompt_batch
from distlayer import AutoModel, LayerStore, split
from distlayer.bench import measure
from distlayer.cost import Rates, predict
from distlayer.planner import ModelShape, Plan
from distlayer.rates import measure_node
from distlayer.smollm import resolve_model
from distlayer.units import unit_order

WITHIN = 0.25   # a prediction within this share of the measured step counts as right


def config_name(stages: int, budget: int | None, ray: bool = False) -> str:
    where = f"{stages} Ray stage{'s' * (stages > 1)}" if ray else \
        "1 in-process stage" if stages == 1 else f"{stages} in-process stages"
    return f"{where}, {'resident' if budget is None else f'{budget / 2**20:.0f} MiB/stage'}"


def load(path: str, stages: int, budget: int | None, ray: bool = False):
    if ray:  # every configuration's stages fit on this one node
        kw = {"stages": stages, "cpus_per_stage": 0.1}
    else:
        kw = {"stages": 0} if stages == 1 else {"stages": stages, "in_process": True}
    if budget is not None:
        kw["memory_per_stage"] = budget
    return AutoModel.from_pretrained(path, progress=False, dtype="float32", **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="a model dir or repo id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--share", type=float, default=0.25, help="streaming budget per stage, a share of the weights")
    ap.add_argument("--ray", action="store_true", help="also Ray stages (hand-offs between processes)")
    ap.add_argument("--remeasure", action="store_true", help="measure the rates again even if cached")
    ap.add_argument("--json", default=None, help="write the rows and rates here")
    a = ap.parse_args(argv)

    path = resolve_model(a.model)
    store = LayerStore(split(path, progress=False))
    dtype = torch.float32
    shape = ModelShape.from_store(store, dtype)
    total = sum(store.unit_bytes(u, dtype) for u in unit_order(store.num_layers))
    budget = int(a.share * total)
    configs = [(n, b, ray) for ray in (False, True)[:1 + a.ray] for n in a.stages for b in (None, budget)]
    measured_rates, rows = {}, []
    for batch in a.batches:
        node = measure_node(store, dtype, "cpu", batch, remeasure=a.remeasure)
        measured_rates[batch] = node
        cached = "cached" if node["cached"] else f"measured in {node['seconds']} s"
        print(f"batch {batch}: rates ({cached}, {node['measured_at']}): "
              + json.dumps({**node["rates"], "page_cache_bw": node["page_cache_bw"],
                                                           "mapped_page_cache_bw": node["mapped_page_cache_bw"]}), flush=True)
        # in-process stages share this CPU and take turns; warm runs stream from the page cache
        cold = dataclasses.replace(Rates(**node["rates"]), device="cpu")
        warm = dataclasses.replace(cold, disk_bw=node["mapped_page_cache_bw"] or node["page_cache_bw"])
        base = dataclasses.replace(warm, step_overhead_s=0.0, layer_overhead_s=0.0)
        models = {c: load(path, *c) for c in configs}
        ids, mask = prompt_batch(next(iter(models.values())).tokenizer, batch)
        context = ids.shape[1] + a.new // 2

        def run(m):
            return measure.timed_run(lambda streamer: m.generate(
                ids, attention_mask=mask, max_new_tokens=a.new, do_sample=False, eos_token_id=[],
                streamer=streamer), a.new)

        fns = {c: (lambda m=m: run(m)) for c, m in models.items()}
        for fn in fns.values():  # warm-up, then count the stages' seconds over the timed runs only
            fn()
        before = {c: measure.seconds_of(m.stats()) for c, m in models.items()}
        with torch.inference_mode():
            runs = measure.take_turns(fns, a.repeat, warmup=False)
        for c, m in models.items():
            plan = Plan(tuple(p.plan for p in m.plan), m.pipeline.micro_batches(batch))
            n = len(plan.stages)
            pred = predict(shape, plan, [warm] * n, batch, context=context)
            pred_base = predict(shape, plan, [base] * n, batch, context=context).step_s
            pred_cold = predict(shape, plan, [cold] * n, batch, context=context).step_s
            best, median = measure.best_and_median([r.step_s for r in runs[c]])
            after = measure.seconds_of(m.stats())
            tokens = a.repeat * a.new
            per_token = {k: round(1e3 * (after[k] - before[c].get(k, 0.0)) / tokens, 3)
                         for k in ("compute_s", "load_s", "stall_s") if k in after}
            row = {"config": config_name(*c), "stages": c[0], "budget_bytes": c[1], "ray": c[2], "batch": batch,
                   "context": context, "new_tokens": a.new, "runs": a.repeat,
                   "predicted_s": pred.step_s, "pred_base_s": pred_base, "pred_cold_s": pred_cold,
                   "measured_s": best, "measured_median_s": median, "ratio": pred.step_s / best,
                   "ratio_median": pred.step_s / median, "base_ratio": pred_base / best,
                   "within": abs(pred.step_s / best - 1) <= WITHIN, "bound": pred.why,
                   "stats_ms_per_token": per_token, "streamed_bytes": sum(p.streamed_bytes for p in plan.stages),
                   "prediction": pred.as_dict()}
            rows.append(row)
        for m in models.values():
            m.close()
    print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
                       "rates": measured_rates, "rows": rows}, f, indent=1)


def print_table(rows: list[dict]) -> None:
    head = f"{'configuration':34} {'batch':>5} {'pred ms':>8} {'base ms':>8} {'meas ms':>8} {'median':>8} " \
           f"{'pred/meas':>9} {'±25%':>5} {'cold ms':>8}  {'compute/load/stall ms/token':28} bound"
    print(head)
    for r in rows:
        s = r["stats_ms_per_token"]
        stats = "/".join(f"{s.get(k, 0):.1f}" for k in ("compute_s", "load_s", "stall_s"))
        print(f"{r['config']:34} {r['batch']:>5} {1e3 * r['predicted_s']:8.1f} {1e3 * r['pred_base_s']:8.1f} "
              f"{1e3 * r['measured_s']:8.1f} {1e3 * r['measured_median_s']:8.1f} {r['ratio']:9.2f} "
              f"{'yes' if r['within'] else 'no':>5} {1e3 * r['pred_cold_s']:8.1f}  {stats:28} {r['bound']}")


if __name__ == "__main__":
    main()
