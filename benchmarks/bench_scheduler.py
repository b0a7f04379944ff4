"""Many requests at once on the scheduler, against the same requests one after another.

    python benchmarks/bench_scheduler.py [--model DIR] [--stages 2] [--json out.json]

Two measurements, same model and pipeline, same run:

(a) 8 requests submitted together (different prompts and lengths, greedy) against the
    same 8 sent one after another: wall-time ratio (target at most 0.5).
(b) a batch of 64 prompts whose outputs run from 8 to 128 tokens, on the scheduler (rows
    join and leave a running batch, at most ``--rows`` at a time) against batch after
    batch of ``--rows`` through ``generate()`` (each batch runs until its longest row is
    done, as before the scheduler): throughput ratio (target at least 1.3).

End-of-sequence is off so every output has exactly the length asked for.
"""

from __future__ import annotations

import argparse
import json
import random
import time

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?", "Name a famous painter."]


def encode(tok, text: str) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return list(tok(chat, add_special_tokens=False).input_ids)


def run_together(sched, model, jobs) -> float:
    t = time.perf_counter()
    reqs = [sched.submit(ids, model.generation_settings(max_new_tokens=n, eos_token_id=[])) for ids, n in jobs]
    for r in reqs:
        r.result()
    return time.perf_counter() - t


def run_one_by_one(sched, model, jobs) -> float:
    t = time.perf_counter()
    for ids, n in jobs:
        sched.submit(ids, model.generation_settings(max_new_tokens=n, eos_token_id=[])).result()
    return time.perf_counter() - t


def run_batches(model, jobs, rows: int) -> float:
    """Batch after batch through generate(), prompts sorted by length as jobs did."""
    import torch

    t = time.perf_counter()
    ordered = sorted(jobs, key=lambda j: len(j[0]))
    pad = model.tokenizer.pad_token_id
    for i in range(0, len(ordered), rows):
        batch = ordered[i:i + rows]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (p, _) in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        model.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in batch), eos_token_id=[])
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8, help="sequences at once (scheduler) / batch size (baseline)")
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from distlayer import AutoModel
    from distlayer.smollm import ensure_smollm2

    path = a.model or str(ensure_smollm2())
    model = AutoModel.from_pretrained(path, stages=a.stages, progress=False, max_rows=a.rows, context=512)
    sched = model.scheduler  # the one generate() runs on too
    tok = model.tokenizer
    rng = random.Random(0)
    eight = [(encode(tok, PROMPTS[i]), n) for i, n in enumerate([8, 16, 24, 32, 40, 48, 56, 64])]
    many = [(encode(tok, PROMPTS[i % len(PROMPTS)]), rng.randint(8, 128)) for i in range(a.jobs)]
    run_together(sched, model, eight[:2])  # warm up
    rows = []
    for _ in range(a.repeat):
        together, alone = run_together(sched, model, eight), run_one_by_one(sched, model, eight)
        rows.append({"case": "8 requests", "together_s": round(together, 2), "one_by_one_s": round(alone, 2),
                     "ratio": round(together / alone, 3)})
        print(json.dumps(rows[-1]), flush=True)
        tokens = sum(n for _, n in many)
        sched_s, batch_s = run_together(sched, model, many), run_batches(model, many, a.rows)
        rows.append({"case": f"{a.jobs} prompts, 8-128 new tokens", "tokens": tokens,
                     "scheduler_tok_s": round(tokens / sched_s, 2), "batches_tok_s": round(tokens / batch_s, 2),
                     "ratio": round(batch_s / sched_s, 3)})
        print(json.dumps(rows[-1]), flush=True)
    model.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
