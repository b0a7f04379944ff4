"""Batch inference inside a Ray Data pipeline: prompts.jsonl in, a folder of JSON answers out.

    python examples/ray_data.py [--stages 2] [--concurrency 1] [--out answers/]

Each replica of the map step is a whole distlayer pipeline (``--stages`` stage actors)
in the same Ray cluster; ``--concurrency`` runs that many pipelines side by side. Pass
``--address auto`` to use a ``ray start`` cluster instead of a private local one.
"""

import argparse
import json
from pathlib import Path

import ray

from distlayer.data import ProcessorConfig, build_processor
from distlayer.smollm import resolve_model

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--stages", type=int, default=2)
ap.add_argument("--concurrency", type=int, default=1)
ap.add_argument("--address", default=None, help="a Ray cluster to join (default: a private local Ray)")
ap.add_argument("--out", default="answers")
args = ap.parse_args()

if args.address:
    ray.init(address=args.address)
config = ProcessorConfig(
    model_source=str(resolve_model("default")),         # the embedded SmolLM2-135M-Instruct
    pipeline={"stages": args.stages},                   # PipelineConfig fields for each replica
    batch_size=8, concurrency=args.concurrency, should_continue_on_error=True,
    generation={"chat_template": True})                 # "prompt" rows get the chat template, as "messages" do
processor = build_processor(
    config,
    preprocess=lambda row: {"sampling_params": {"max_new_tokens": 48, "temperature": 0}},  # per row, if you like
    postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"], "error": row["error"]})
prompts = Path(__file__).with_name("prompts.jsonl")
answers = processor(ray.data.read_json(str(prompts)))
answers.write_json(args.out)
for row in sorted((json.loads(line) for f in sorted(Path(args.out).glob("*.json")) for line in f.open()),
                  key=lambda r: r["id"]):
    print(f"{row['id']}: {row['answer'] if row['error'] is None else 'error: ' + row['error']}")
