"""What a lost stage costs: replay recovery against reloading the model and starting over.

    python benchmarks/bench_recovery.py [--model DIR] [--stages 2] [--new 64] [--json out.json]

Same model, prompt and pipeline, same run, greedy:

- clean: one generation of ``--new`` tokens;
- recovered: the same, with the last stage's process killed (SIGKILL) halfway; the stage
  is replaced and the journal replayed (``distlayer.recovery``); the output must equal the
  clean one;
- reload: what a lost stage cost before replay recovery: close the model, load it again
  and generate from the start (the tokens made before the loss are lost with it).

Reports seconds, the extra time each way, and the ``recovery_s`` the stages report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time


class KillHalfway:
    """A streamer that kills ``stage``'s process after ``at`` tokens."""

    def __init__(self, model, stage: int, at: int):
        self.model, self.stage, self.at, self.seen = model, stage, at, -1

    def put(self, value):
        self.seen += 1
        if self.seen == self.at:
            os.kill(self.model.plan[self.stage].pid, signal.SIGKILL)

    def end(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from distlayer import AutoModel
    from distlayer.smollm import resolve_model

    path = resolve_model(args.model)
    settings = dict(stages=args.stages, progress=False)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    t = time.perf_counter()
    model = AutoModel.from_pretrained(path, **settings)
    load_s = time.perf_counter() - t
    tok = model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = chat["input_ids"]
    model.generate(ids, max_new_tokens=4)  # warm-up
    t = time.perf_counter()
    clean = model.generate(ids, **kw)
    clean_s = time.perf_counter() - t
    last = len(model.plan) - 1
    t = time.perf_counter()
    recovered = model.generate(ids, streamer=KillHalfway(model, last, args.new // 2), **kw)
    recovered_s = time.perf_counter() - t
    stats = model.stats()
    model.close()
    assert recovered.tolist() == clean.tolist(), "the recovered output differs from the clean one"

    t = time.perf_counter()  # before: the loss ends the run; reload and start over
    with AutoModel.from_pretrained(path, **settings) as again:
        again.generate(ids, **kw)
    reload_s = (clean_s / 2) + (time.perf_counter() - t)  # the half done before the loss, then all again

    out = {"stages": len(stats), "new_tokens": args.new, "load_s": round(load_s, 2), "clean_s": round(clean_s, 2),
           "recovered_s": round(recovered_s, 2), "recovery_extra_s": round(recovered_s - clean_s, 2),
           "recovery_s_reported": stats[last]["recovery_s"], "reload_and_rerun_s": round(reload_s, 2),
           "reload_extra_s": round(reload_s - clean_s, 2),
           "extra_ratio_recovery_vs_reload": round((recovered_s - clean_s) / (reload_s - clean_s), 3)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
