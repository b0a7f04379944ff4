"""Streaming with compressed shards against uncompressed ones, warm and cold page cache.

    python benchmarks/bench_compression.py [--model DIR] [--share 0.25] [--new 16] [--repeat 3]

Default model: the embedded SmolLM2-135M-Instruct. Splits its store three ways
(uncompressed, ``8bit``, ``4bit``; each kept beside the model), prints each store's bytes
against the same weights in float16, then runs one in-process stage per store with the
same budget, ``--share`` of the uncompressed weights in the compute dtype, so every store
streams the same units, and times greedy decoding of ``--new`` tokens at batch 1.

- **warm**: the shards stay in the page cache between runs.
- **cold**: before every decode step, every shard file of the store is dropped from the
  page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so each step reads the units it
  streams from disk again, except those the loader thread had already read ahead.

Runs alternate between the stores and between warm and cold, so drift in the machine's
speed hits all alike; ``ratio`` is a compressed store's tokens/s over the uncompressed
store's, best run of each (the median ratio in brackets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distlayer.bench.measure import drop_page_cache as drop_files

COMPRESSIONS = (None, "8bit", "4bit")


def drop_page_cache(store_dir: Path) -> None:
    """Ask the kernel to drop every shard file of a store from the page cache."""
    drop_files(store_dir.glob("*.safetensors"))


class DropEachStep:
    """A generate streamer that drops the store's shards from the page cache at every token."""

    def __init__(self, store_dir: Path):
        self.store_dir = store_dir

    def put(self, value) -> None:
        drop_page_cache(self.store_dir)

    def end(self) -> None:
        pass


def store_bytes(store) -> dict:
    """The store's bytes by kind of unit, against the same tensors in float16."""
    layers = [u for u in store.units if u.startswith("layer.")]

    def f16(names):
        return sum(store.unit_bytes(u, torch.float16) for u in names)

    def disk(names):
        return sum(int(store.units[u]["bytes"]) for u in names)

    whole = list(store.units)
    return {"layers_ratio": round(disk(layers) / f16(layers), 4),
            "embed_ratio": round(disk(["embed"]) / f16(["embed"]), 4),
            "head_ratio": round(disk(["head"]) / f16(["head"]), 4),
            "store_ratio": round(disk(whole) / f16(whole), 4),
            "embed_share": round(disk(["embed"]) / disk(whole), 4),
            "head_share": round(disk(["head"]) / disk(whole), 4),
            "store_bytes": disk(whole)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--share", type=float, default=0.25, help="budget: this share of the uncompressed weights")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args(argv)

    from distlayer import AutoModel, LayerStore, split
    from distlayer.arch import checkpoint_dtype
    from distlayer.smollm import ensure_smollm2

    path = a.model or str(ensure_smollm2())
    stores = {c: LayerStore(split(path, compression=c, progress=False)) for c in COMPRESSIONS}
    for c, store in stores.items():
        print(json.dumps({"compression": c, **store_bytes(store)}), flush=True)
    plain = stores[None]
    dtype = checkpoint_dtype(plain.config)
    budget = int(a.share * sum(plain.unit_bytes(u, dtype) for u in plain.units))
    models = {c: AutoModel.from_pretrained(path, compression=c, stages=0, memory_per_stage=budget, progress=False)
              for c in COMPRESSIONS}
    tok = models[None].tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    for c, m in models.items():
        print(json.dumps({"compression": c, "budget": budget, "resident": m.plan[0].resident_units,
                          "streamed_units": len(m.plan[0].streamed_units),
                          "streamed_bytes_per_step": m.plan[0].streamed_bytes}), flush=True)

    def run(c, cold: bool) -> float:
        kw = dict(max_new_tokens=a.new, do_sample=False, eos_token_id=[])
        if cold:
            drop_page_cache(stores[c].path)
            kw["streamer"] = DropEachStep(stores[c].path)
        t = time.perf_counter()
        models[c].generate(ids, **kw)
        return a.new / (time.perf_counter() - t)

    for c in COMPRESSIONS:
        run(c, False)  # warm-up
    speeds = {(c, cold): [] for c in COMPRESSIONS for cold in (False, True)}
    for _ in range(a.repeat):
        for cold in (False, True):
            for c in COMPRESSIONS:
                speeds[(c, cold)].append(run(c, cold))
    results = []
    for cold in (False, True):
        base = speeds[(None, cold)]
        for c in COMPRESSIONS:
            s = speeds[(c, cold)]
            row = {"cache": "cold" if cold else "warm", "compression": c or "none", "tok_s": round(max(s), 2),
                   "median_tok_s": round(statistics.median(s), 2), "ratio": round(max(s) / max(base), 3),
                   "median_ratio": round(statistics.median(s) / statistics.median(base), 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    for c, m in models.items():
        print("stats", c, json.dumps(m.stats()[0]))
        m.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
