"""The GPU benchmark of ``benchmarks/gpu_check.sh``: tokens/s and host-to-device GB/s.

    python benchmarks/bench_gpu.py --out DIR [--layers 16] [--hidden 2048] [--dtype float16]
                                   [--new 32] [--batches 1 8] [--stages 4] [--ray]

On one GPU, in one run:

- ``torch``'s host-to-device copy bandwidth from pinned and from pageable memory (the
  ceiling a streaming stage is measured against);
- transformers with every weight on the GPU (the baseline);
- distlayer, one stage, every unit resident;
- distlayer, one stage streaming, with a quarter of the weights' bytes as its weight budget,
  reading every streamed unit from the layer store each step (``host_memory_per_node=0``:
  page cache, loader threads, pinned staging slots);
- the same stage with the pinned host tier: every streamed unit kept in pinned host
  memory, read once at start (``host_memory_per_node`` the size of the weights), so each
  step only copies host-to-device;
- distlayer, ``--stages`` stages sharing the GPU, each streaming half of its range from the
  store: Ray actors with ``gpus_per_stage = 1 / stages`` with ``--ray``, else in this process;
  with ``--ray`` once more with ``block_schedule="off"`` (each micro-batch streams by itself).

Each streaming row is set against the link: its *floor* is the time the bytes it copied
host-to-device per run take at the pinned copy rate measured at the start of the same run
(``measure.host_to_device_rate``), and ``of floor`` the share of the tokens/s that floor
allows which the row reached (1.0: it streams as fast as the link carries its bytes);
``vs transformers`` sets it against transformers at the same batch.

The model is a random Llama (``--layers``, ``--hidden``: about 0.85B parameters by
default, an untied head, the shape rule of ``distlayer bench --synthetic``) written to
``--work`` first; its end-of-sequence id is unset, so every run
generates exactly ``--new`` tokens. Each configuration runs once to warm up, then is
timed. Results go to ``DIR/bench.json`` and ``DIR/bench.md``, written again after each
configuration, so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from distlayer import AutoModel, LayerStore, split  # noqa: E402
from distlayer.bench import measure  # noqa: E402
from distlayer.bench.synthetic import llama_shape, write_random_llama  # noqa: E402
from distlayer.planner import ModelShape  # noqa: E402

GB = 1e9
PROMPT = 64  # prompt tokens per row
VOCAB = 32000
DEVICE = "cuda"


def copy_bandwidth(nbytes: int = 2**29, reps: int = 8) -> dict:
    """Host-to-device GB/s of ``torch`` copies from pinned and from pageable memory."""
    return {f"h2d_{name}_GBps": round(measure.host_to_device_rate(nbytes, reps, pinned, DEVICE) / GB, 2)
            for name, pinned in (("pinned", True), ("pageable", False))}


def make_model(path: pathlib.Path, layers: int, hidden: int, dtype: torch.dtype, device: str = DEVICE) -> pathlib.Path:
    """A random Llama checkpoint (untied head, no end-of-sequence token), written to
    ``path`` unless it is there already (``distlayer.bench.synthetic``, its numbers drawn
    on ``device``)."""
    if (path / "config.json").is_file():
        return path
    return write_random_llama(path, llama_shape(hidden, layers), vocab=VOCAB, dtype=str(dtype).removeprefix("torch."),
                              tied=False, token_ids={"bos_token_id": 1, "pad_token_id": 0}, device=device)


def timed(fn) -> float:
    """Seconds of one call of ``fn`` after a warm-up call, the GPU drained before and after."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def prompt(batch: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def bench_transformers(path, dtype, batches, new) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
    rows = []
    for b in batches:
        ids = prompt(b).to(DEVICE)
        with torch.inference_mode():
            s = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                             do_sample=False, eos_token_id=None, pad_token_id=0))
        rows.append({"run": "transformers", "batch": b, "tok_s": round(b * new / s, 2), "wall_s": round(s, 3)})
    del model
    torch.cuda.empty_cache()
    return rows


def bench_distlayer(name: str, path, dtype, batches, new, **settings) -> list[dict]:
    rows = []
    with AutoModel.from_pretrained(path, device=DEVICE, dtype=str(dtype).removeprefix("torch."), progress=False,
                                   **settings) as model:
        plan = [{"stage": p.stage, "layers": f"{p.start}-{p.end - 1}", "budget_bytes": p.budget_bytes,
                 "resident_bytes": p.resident_bytes, "streamed_bytes": p.streamed_bytes,
                 "host_units": len(p.host_units), "host_bytes": p.host_bytes, "pid": p.pid}
                for p in model.plan]
        for b in batches:
            ids = prompt(b)
            before = model.stats()
            s = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new))
            after = model.stats()
            h2d = sum(a["h2d_bytes"] - c["h2d_bytes"] for a, c in zip(after, before)) / 2  # warm-up + timed
            h2d_s = sum(a["h2d_s"] - c["h2d_s"] for a, c in zip(after, before)) / 2
            rows.append({
                "run": name, "batch": b, "tok_s": round(b * new / s, 2), "wall_s": round(s, 3),
                "streamed_GB_per_run": round(h2d / GB, 3),
                "h2d_while_copying_GBps": round(h2d / h2d_s / GB, 2) if h2d_s else None,
                "h2d_sustained_GBps": round(h2d / s / GB, 2),
                "stall_s": round(sum(a["stall_s"] - c["stall_s"] for a, c in zip(after, before)) / 2, 3),
                "compute_s": round(sum(a["compute_s"] - c["compute_s"] for a, c in zip(after, before)) / 2, 3),
                "h2d_bytes_per_run": int(h2d),
                "host_pinned_bytes": [a.get("host_pinned_bytes", 0) for a in after],
                "peak_weight_bytes": [a["peak_weight_bytes"] for a in after],
                "device_peak_bytes": [a["device_peak_bytes"] for a in after],
                "plan": plan,
            })
    torch.cuda.empty_cache()
    return rows


def with_floor(rows: list[dict], pinned_GBps: float, new: int) -> list[dict]:
    """Each streaming row with its link floor: the seconds its host-to-device bytes per run
    (``new`` tokens a row) take at ``pinned_GBps``, the tokens/s that allows, and the share
    of it reached."""
    for r in rows:
        if r.get("h2d_bytes_per_run"):
            floor_s = r["h2d_bytes_per_run"] / (pinned_GBps * GB)
            r.update(floor_s=round(floor_s, 3), floor_tok_s=round(r["batch"] * new / floor_s, 2),
                     of_floor=round(floor_s / r["wall_s"], 3))
    return rows


def markdown(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}; torch {result['torch']}; model {result['params'] / 1e9:.2f}B parameters, "
             f"{result['weights_GB']:.2f} GB in {result['dtype']}; {result['new']} new tokens after "
             f"{PROMPT} prompt tokens; stages sharing the GPU ran {result.get('shared_stages_ran', '-')}.", "",
             f"torch host-to-device copies: pinned {result['copy']['h2d_pinned_GBps']} GB/s, pageable "
             f"{result['copy']['h2d_pageable_GBps']} GB/s. Floor: a run's host-to-device bytes at the pinned rate; "
             "of floor: the floor's seconds over the run's.", "",
             "| run | batch | tok/s | vs transformers | floor tok/s | of floor | streamed GB/run "
             "| H2D GB/s while copying (of pinned) | H2D GB/s sustained | stall s | compute s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["batch"]: r["tok_s"] for r in result["rows"] if r["run"] == "transformers"}
    pinned = result["copy"]["h2d_pinned_GBps"]
    for r in result["rows"]:
        copying = r.get("h2d_while_copying_GBps")
        share = f"{copying} ({copying / pinned:.0%})" if copying else "-"
        versus = f"{r['tok_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        floor = f"{r['of_floor']:.0%}" if "of_floor" in r else "-"
        lines.append(f"| {r['run']} | {r['batch']} | {r['tok_s']} | {versus} | {r.get('floor_tok_s', '-')} | {floor} | "
                     f"{r.get('streamed_GB_per_run', '-')} | {share} | {r.get('h2d_sustained_GBps', '-')} | "
                     f"{r.get('stall_s', '-')} | {r.get('compute_s', '-')} |")
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, result: dict) -> None:
    """bench.json and bench.md as they stand."""
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where bench.json and bench.md go")
    ap.add_argument("--work", default=None, help="where the random model and its layer store go (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--stages", type=int, default=4, help="stages sharing the GPU in the last run")
    ap.add_argument("--ray", action="store_true", help="run the shared stages as Ray actors (gpus_per_stage)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="distlayer-bench-"))

    t = time.perf_counter()
    path = make_model(work / f"llama-{args.layers}x{args.hidden}", args.layers, args.hidden, dtype)
    store = LayerStore(split(path, progress=False))
    made_s = time.perf_counter() - t
    shape = ModelShape.from_store(store, dtype)
    weights = sum(store.unit_bytes(u, dtype) for u in store.units)
    batch, context = max(args.batches), PROMPT + args.new
    reserve = shape.kv_bytes_per_layer(batch, context) * store.num_layers + shape.activation_bytes(batch, context)
    largest = max(store.packed_bytes(u, dtype) for u in store.units)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "params": sum(store.unit_bytes(u, torch.int8) for u in store.units), "weights_GB": weights / GB,
              "new": args.new, "model_and_split_s": round(made_s, 1), "copy": copy_bandwidth()}
    print(json.dumps(result), flush=True)
    pinned = result["copy"]["h2d_pinned_GBps"]
    result["rows"] = rows = []

    def run(fn, *positional, **settings) -> None:
        rows.extend(with_floor(fn(*positional, **settings), pinned, args.new))
        write(out, result)

    common = dict(max_rows=batch, context=context)
    run(bench_transformers, path, dtype, args.batches, args.new)
    run(bench_distlayer, "distlayer 1 stage resident", path, dtype, args.batches, args.new, stages=0,
        host_memory_per_node=0, **common)
    quarter = max(weights // 4, 2 * largest)
    run(bench_distlayer, "distlayer 1 stage streaming 25% from the store", path, dtype, args.batches, args.new,
        stages=0, memory_per_stage=quarter + reserve, host_memory_per_node=0, **common)
    run(bench_distlayer, "distlayer 1 stage streaming 25%, pinned host tier", path, dtype, args.batches, args.new,
        stages=0, memory_per_stage=quarter + reserve, host_memory_per_node=weights, **common)
    half_range = max(weights // args.stages // 2, 2 * largest)
    shared = dict(stages=args.stages, memory_per_stage=half_range + reserve, host_memory_per_node=0, **common)
    if args.ray:
        shared.update(gpus_per_stage=1 / args.stages)
    else:
        shared.update(in_process=True)
    result["shared_stages_ran"] = f"as Ray actors, gpus_per_stage={1 / args.stages:g}" if args.ray else "in one process"
    run(bench_distlayer, f"distlayer {args.stages} stages sharing, streaming from the store", path, dtype,
        args.batches, args.new, **shared)
    if args.ray:  # the block schedule (on for GPUs) against each micro-batch streaming by itself; last, so cut first
        run(bench_distlayer, f"distlayer {args.stages} stages sharing, streaming, block_schedule off", path, dtype,
            args.batches, args.new, block_schedule="off", **shared)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
