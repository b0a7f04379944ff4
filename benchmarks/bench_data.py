"""Ray Data against ``distlayer run``: the same prompts through the same pipeline.

    python benchmarks/bench_data.py [--model DIR] [--stages 2] [--prompts 64] [--new 32] [--repeats 2] [--json out.json]

Same run, same model, same pipeline (``--stages`` Ray stages), same greedy settings and
``--batch-size`` rows at a time; runs alternate between the two:

- run: ``distlayer.jobs.run_job`` on a JSONL file of the prompts (load, run, close);
- data: ``build_processor(...)`` on ``ray.data.from_items`` of the same prompts, every row
  read back (the replica loads its pipeline as part of the dataset's run).

Each side's wall time covers loading its pipeline (runs taking turns with
``distlayer.bench.measure.take_turns``, no warm-up run). Reports generated tokens per
second, the best of ``--repeats`` each, and their ratio (data / run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
             "What is 12 times 7?", "Name a famous painter."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray

    from distlayer.bench import measure
    from distlayer.data import ProcessorConfig, build_processor
    from distlayer.jobs import run_job
    from distlayer.smollm import resolve_model

    model = str(resolve_model(args.model))
    rows = [{"id": f"p{i}", "prompt": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"} for i in range(args.prompts)]
    generation = {"max_new_tokens": args.new, "min_new_tokens": args.new, "chat_template": True}
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ray.init(include_dashboard=False, logging_level="WARNING")  # one cluster for both sides
    texts: dict[str, dict] = {}
    outputs = (tmp / f"out{k}.jsonl" for k in itertools.count())   # a fresh one a run: a job resumes its output
    config = ProcessorConfig(model_source=model, pipeline={"stages": args.stages}, batch_size=args.batch_size,
                             generation={**generation, "do_sample": False})

    def job() -> float:
        out = next(outputs)
        seconds = measure.wall_time(lambda: run_job({
            "model": model, "input": str(tmp / "in.jsonl"), "output": str(out), "batch_size": args.batch_size,
            "pipeline": {"stages": args.stages}, "generation": generation}, progress=False))
        texts["run"] = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
        return seconds

    def dataset() -> float:
        got = []
        seconds = measure.wall_time(lambda: got.extend(build_processor(config)(ray.data.from_items(rows)).take_all()))
        texts["data"] = {r["id"]: r["generated_text"] for r in got}
        return seconds

    times = measure.take_turns({"run": job, "data": dataset}, args.repeats, warmup=False)
    tokens = args.prompts * args.new
    result = {"prompts": args.prompts, "new_tokens": args.new, "stages": args.stages, "batch_size": args.batch_size,
              "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
              "tokens_per_s": {k: round(measure.per_second(tokens, v)[0], 1) for k, v in times.items()},
              "ratio_data_vs_run": round(measure.speedup(times["data"], times["run"])[0], 3),
              "same_texts": texts["run"] == texts["data"]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
