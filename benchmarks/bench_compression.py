"""Streaming with compressed shards against uncompressed ones, warm and cold page cache.

    python benchmarks/bench_compression.py [--model DIR] [--share 0.25] [--new 16] [--repeat 3]

Default model: the embedded SmolLM2-135M-Instruct. Splits its store three ways
(uncompressed, ``8bit``, ``4bit``; each kept beside the model), prints each store's bytes
against the same weights in float16, then runs one in-process stage per store with the
same budget, ``--share`` of the uncompressed weights in the compute dtype, so every store
streams the same units, and times greedy decoding of ``--new`` tokens at batch 1.

- **warm**: the shards stay in the page cache between runs.
- **cold**: before the run and at every token, every shard file of the store is dropped
  from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so each step reads the
  units it streams from disk again, except those the loader thread had already read
  ahead; the time the drops take is counted in the run's. This is ``distlayer bench``'s
  cold run (``distlayer.bench.measure.timed_run``).

Runs alternate between the stores and between warm and cold
(``distlayer.bench.measure.take_turns``), so drift in the machine's speed hits all
alike; ``ratio`` is a compressed store's tokens/s over the uncompressed store's, best
run of each (the median ratio in brackets).
"""

from __future__ import annotations

import argparse
import json

import torch

from distlayer.bench import measure
from distlayer.config import COMPRESSIONS


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

    files = {c: measure.store_files(store.path) for c, store in stores.items()}

    def run(c, cold: bool) -> float:
        """Seconds of one greedy generation; cold, the store's files dropped first and at every token."""
        return measure.timed_run(lambda s: models[c].generate(ids, max_new_tokens=a.new, do_sample=False,
                                                              eos_token_id=[], streamer=s),
                                 a.new, files[c] if cold else None).total_s

    for c in COMPRESSIONS:
        run(c, False)  # warm-up
    seconds = measure.take_turns({(c, cold): lambda c=c, cold=cold: run(c, cold)
                                  for cold in (False, True) for c in COMPRESSIONS}, a.repeat, warmup=False)
    results = []
    for cold in (False, True):
        base = seconds[(None, cold)]
        for c in COMPRESSIONS:
            tok_s, ratio = measure.per_second(a.new, seconds[(c, cold)]), measure.speedup(seconds[(c, cold)], base)
            row = {"cache": "cold" if cold else "warm", "compression": c or "none", "tok_s": round(tok_s[0], 2),
                   "median_tok_s": round(tok_s[1], 2), "ratio": round(ratio[0], 3), "median_ratio": round(ratio[1], 3)}
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
