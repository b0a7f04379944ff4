"""What a lost stage costs: replay recovery against reloading the model and starting over.

    python benchmarks/bench_recovery.py [--model DIR] [--stages 2] [--new 64] [--json out.json]

Same model, prompt and pipeline, same run, greedy:

- clean: one generation of ``--new`` tokens;
- recovered: the same, with the last stage's process killed (SIGKILL) halfway; the stage
  is replaced and the journal replayed (``distlayer.recovery``); the output must equal the
  clean one;
- reload: what a lost stage cost before replay recovery: close the model, load it again
  and generate from the start (the tokens made before the loss are lost with it).

Each ``--standby`` setting (0: a new process starts for the lost stage; 1: a spare process
takes its range) loads its own pipeline and kills ``--repeats`` times; the medians are
reported. Reports seconds, the extra time each way, their ratio, and the ``recovery_s``
the stage reports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
    ap.add_argument("--standby", type=int, nargs="+", default=[0, 1], help="the standby settings to compare")
    ap.add_argument("--repeats", type=int, default=3, help="kills per setting (the median is reported)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from distlayer import AutoModel
    from distlayer.smollm import resolve_model

    path = resolve_model(args.model)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    rows, reference = {}, None
    for standby in args.standby:
        settings = dict(stages=args.stages, standby=standby, progress=False)
        t = time.perf_counter()
        model = AutoModel.from_pretrained(path, **settings)
        load_s = time.perf_counter() - t
        chat = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me about the history of Paris."}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = chat["input_ids"]
        model.generate(ids, max_new_tokens=4)  # warm-up
        last, cleans, recovereds = len(model.plan) - 1, [], []
        for _ in range(args.repeats):
            time.sleep(10)  # a spare started by the last recovery has loaded its libraries
            t = time.perf_counter()
            clean = model.generate(ids, **kw)
            cleans.append(time.perf_counter() - t)
            t = time.perf_counter()
            recovered = model.generate(ids, streamer=KillHalfway(model, last, args.new // 2), **kw)
            recovereds.append(time.perf_counter() - t)
            assert recovered.tolist() == clean.tolist(), "the recovered output differs from the clean one"
            reference = clean if reference is None else reference
            assert clean.tolist() == reference.tolist()
        stats = model.stats()
        model.close()
        rows[standby] = {"load_s": round(load_s, 2), "clean_s": round(statistics.median(cleans), 2),
                         "recovered_s": round(statistics.median(recovereds), 2),
                         "recovery_extra_s": round(statistics.median(r - c for r, c in zip(recovereds, cleans)), 2),
                         "recovery_s_reported": round(stats[last]["recovery_s"] / args.repeats, 2)}

    t = time.perf_counter()  # before: the loss ends the run; reload and start over
    with AutoModel.from_pretrained(path, stages=args.stages, progress=False) as again:
        again.generate(ids, **kw)
    clean_s = statistics.median(r["clean_s"] for r in rows.values())
    reload_extra = clean_s / 2 + (time.perf_counter() - t) - clean_s  # the half done before the loss, then all again
    for r in rows.values():
        r["extra_ratio_recovery_vs_reload"] = round(r["recovery_extra_s"] / reload_extra, 3)
    out = {"stages": args.stages, "new_tokens": args.new, "repeats": args.repeats,
           "reload_extra_s": round(reload_extra, 2), "by_standby": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
