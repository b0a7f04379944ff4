"""Tokens/s of a distlayer pipeline against transformers in memory, in the same run.

    python benchmarks/bench_pipeline.py [--model DIR] [--stages 2] [--batches 1 16] [--new 32]
                                        [--transports auto ray] [--block-schedules auto on off]

Default model: the embedded SmolLM2-135M-Instruct. Everything resident unless
``--memory-per-stage`` makes the stages stream.
Each configuration runs once to warm up, then ``--repeat`` timed runs, alternating
between transformers and distlayer (one pipeline per ``--transports`` and
``--block-schedules`` entry;
``distlayer.bench.measure.take_turns``), so drift in the machine's speed hits all alike.
``ratio`` compares the best run of each, ``median_ratio`` the medians.
``reads_per_step`` is how many streamed units the stages fetched per decode step, from one
more run after the timed ones: with several micro-batches, stages that stream run them as
one block over channels (``auto``) with ``--block-schedules on``, reading each unit once a
step, and read each unit once per micro-batch otherwise.
"""

from __future__ import annotations

import argparse
import json

import torch

from distlayer.bench import measure

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?", "Name a famous painter."]


def batch(tok, n: int):
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(n)]
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads-per-stage", type=int, default=None)
    ap.add_argument("--micro-batches", type=int, default=None, help="default: one per stage")
    ap.add_argument("--memory-per-stage", default=None, help="budget per stage (default: all resident)")
    ap.add_argument("--transports", nargs="+", default=["auto"], choices=["auto", "ray"],
                    help="hand-offs to compare: auto (same-node channels) and/or ray (object refs)")
    ap.add_argument("--block-schedules", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                    help="block_schedule settings to compare (each with every transport)")
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from distlayer import AutoModel
    from distlayer.smollm import ensure_smollm2

    path = a.model or str(ensure_smollm2())
    configs = [(tr, bs) for tr in a.transports for bs in a.block_schedules]
    cpus = 1 / len(configs) / a.stages  # room for every pipeline's stages on one node
    dls = {c: AutoModel.from_pretrained(path, stages=a.stages, progress=False, threads_per_stage=a.threads_per_stage,
                                        micro_batches=a.micro_batches, memory_per_stage=a.memory_per_stage,
                                        transport=c[0], block_schedule=c[1], cpus_per_stage=cpus) for c in configs}
    dl = dls[configs[0]]
    tok = dl.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dl.dtype).eval()
    results = []
    for b in a.batches:
        ids, mask = batch(tok, b)
        kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=tok.pad_token_id)
        ours = dict(max_new_tokens=a.new, do_sample=False, eos_token_id=[])
        fns = {"hf": lambda: measure.wall_time(lambda: hf.generate(ids, attention_mask=mask, **kw))}
        for c, m in dls.items():
            fns[c] = lambda m=m: measure.wall_time(lambda: m.generate(ids, attention_mask=mask, **ours))
        with torch.inference_mode():
            times = measure.take_turns(fns, a.repeat)
        hf_tok_s = measure.per_second(b * a.new, times["hf"])[0]
        for c, m in dls.items():
            dl_tok_s, ratio = measure.per_second(b * a.new, times[c])[0], measure.speedup(times[c], times["hf"])
            before = sum(s["stream_reads"] for s in m.stats())
            m.generate(ids, attention_mask=mask, **ours)
            reads = sum(s["stream_reads"] for s in m.stats()) - before
            row = {"batch": b, "new_tokens": a.new, "transport": m.pipeline.transport.name, "block_schedule": c[1],
                   "blocks": any(p.blocks for p in m.plan),
                   "micro_batches": m.pipeline.micro_batches(b), "reads_per_step": round(reads / a.new, 2),
                   "hf_tok_s": round(hf_tok_s, 2), "distlayer_tok_s": round(dl_tok_s, 2),
                   "ratio": round(ratio[0], 3), "median_ratio": round(ratio[1], 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("plan:", [p.as_dict() for p in dl.plan])
    print("stats:", dl.stats())
    print("threads:", torch.get_num_threads(), "(driver / transformers)")
    for m in dls.values():
        m.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
