"""Drive a distlayer pipeline on a Ray cluster.

On the head node::

    ray start --head
    python examples/driver.py --address auto --stages 2

Other machines join first with ``ray start --address HEAD_IP:6379``. Without
``--address`` a local Ray is started. ``--model default`` is the embedded
SmolLM2-135M-Instruct; pass an HF repo id or a local directory for another model.
"""

from __future__ import annotations

import argparse

from distlayer import AutoModel
from distlayer.report import format_plan, stats_table
from distlayer.smollm import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=None, help='"auto" or host:port of a `ray start` cluster (default: local Ray)')
    ap.add_argument("--stages", type=int, default=None, help="pipeline stages (default: one per GPU, else 1)")
    ap.add_argument("--model", default="default", help='HF repo id, local dir, or "default"')
    ap.add_argument("--memory-per-stage", default=None, help="weight budget per stage, e.g. 2GiB")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    model = AutoModel.from_pretrained(resolve_model(args.model), stages=args.stages, address=args.address,
                                      memory_per_stage=args.memory_per_stage)
    try:
        tok = model.tokenizer
        messages = [{"role": "user", "content": args.prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) \
            if tok.chat_template else args.prompt
        enc = tok(text, add_special_tokens=not tok.chat_template, return_tensors="pt")
        out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens,
                             return_dict_in_generate=True)
        print(tok.decode(out.sequences[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
        print("\n" + format_plan(model.plan))      # which node and device runs which layers
        print("\n" + stats_table(model.stats()))
    finally:
        model.close()


if __name__ == "__main__":
    main()
