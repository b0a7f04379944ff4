"""``distlayer`` command line: one thin verb per job over the library.

Verbs: ``split``, ``plan``, ``generate``, ``run``, ``demo``. Errors distlayer raises on
bad input are printed as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, DistlayerError

DEMO_QUESTION = "What is the capital of France?"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _add_pipeline_flags(p: argparse.ArgumentParser, stages_help: str) -> None:
    p.add_argument("--stages", type=_positive_int, default=None, help=stages_help)
    p.add_argument("--memory-per-stage", default=None, metavar="SIZE",
                   help="weight budget per stage, e.g. 2GiB (default: no limit)")
    p.add_argument("--shards-dir", default=None, metavar="DIR", help="where the per-layer shards live")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, float16 or bfloat16 (default: the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    """The ``distlayer`` argument parser, one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="distlayer",
        description="Layered LLM inference across many small devices with Ray.",
        epilog="Start with `distlayer demo`. `distlayer VERB --help` describes each verb.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("split", help="split a checkpoint into per-layer shards + manifest",
                       description="Split a checkpoint (HF dir, .gguf, or repo id) into one safetensors file per "
                                   "layer plus manifest.json. A finished store is reused; an interrupted one resumed.")
    p.add_argument("model", help='HF repo id, local model dir, .gguf file, or "default" (SmolLM2-135M-Instruct)')
    p.add_argument("--out", default=None, metavar="DIR", help="store directory (default: next to the model)")
    p.add_argument("--compression", choices=["8bit", "4bit"], default=None, help="block-wise compressed shards")
    p.add_argument("--force", action="store_true", help="split again even if a finished store exists")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("plan", help="print the stage plan, change nothing",
                       description="Print which layers each stage would own and what it keeps resident or "
                                   "streams, as a table. Reads the manifest only: no weights are loaded.")
    p.add_argument("model", help='HF repo id, local model dir, layer store, or "default"')
    _add_pipeline_flags(p, "number of pipeline stages (default: one per GPU, else 1)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="batch size the KV estimate is for")
    p.add_argument("--context", type=_positive_int, default=None, help="tokens per sequence for the KV estimate")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="generate from one prompt, streaming tokens to stdout",
                       description="Load MODEL into a pipeline and stream the completion of PROMPT to stdout "
                                   "as tokens are produced.")
    p.add_argument("model", help='HF repo id, local model dir, .gguf file, layer store, or "default"')
    p.add_argument("prompt", help="the prompt text")
    _add_pipeline_flags(p, "pipeline stages; 0 runs in-process without Ray (default: one per GPU, else 1)")
    p.add_argument("--address", default=None, help='"auto" or host:port to join a `ray start` cluster')
    p.add_argument("--compression", choices=["8bit", "4bit"], default=None, help="use compressed shards")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="batch job: JSONL in, JSONL out, resumable",
                       description="Run the batch job described by a YAML file: prompts from its input JSONL, "
                                   "one result line per id appended to its output JSONL. Rerunning resumes.")
    p.add_argument("job", metavar="JOB.yaml", help="the job file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the embedded default model: real model, real answer",
                       description=f"Prepare SmolLM2-135M-Instruct (converted and split once, then cached), start "
                                   f"a 2-stage pipeline, ask {DEMO_QUESTION!r}, then print the plan and per-stage stats.")
    p.set_defaults(func=cmd_demo)
    return parser


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(model: str, args, stages=None, **kw):
    from .jobs import resolve_model
    from .model import AutoModel

    return AutoModel.from_pretrained(resolve_model(model), stages=stages, memory_per_stage=args.memory_per_stage,
                                     shards_dir=args.shards_dir, dtype=args.dtype, **kw)


def cmd_split(args) -> int:
    """``distlayer split``: write the layer store, print its path."""
    from .jobs import resolve_model
    from .store import split

    print(split(resolve_model(args.model), out=args.out, compression=args.compression, force=args.force))
    return 0


def cmd_plan(args) -> int:
    """``distlayer plan``: print the stage plan table without loading weights."""
    from .jobs import resolve_model
    from .pipeline import plan_model
    from .report import format_plan

    plans = plan_model(resolve_model(args.model), args.stages or 1, args.memory_per_stage, shards_dir=args.shards_dir,
                       dtype=args.dtype, batch_size=max(args.batch_size, 1), context=args.context)
    print(format_plan(plans))
    return 0


def cmd_generate(args) -> int:
    """``distlayer generate``: stream one completion to stdout."""
    from transformers import TextStreamer

    model = _load(args.model, args, stages=args.stages, address=args.address, compression=args.compression)
    try:
        tok = model.tokenizer
        if tok is None:
            raise ConfigError(f"{args.model} has no tokenizer files: generate needs a model with a tokenizer")
        if args.chat:
            if not getattr(tok, "chat_template", None):
                raise ConfigError(f"{args.model}'s tokenizer has no chat template: run without --chat")
            text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                           tokenize=False)
            enc = tok(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tok(args.prompt, return_tensors="pt")
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens,
                       streamer=streamer, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stop_strings=args.stop)
    finally:
        model.close()
    return 0


def cmd_run(args) -> int:
    """``distlayer run``: run a job file, print a one-line summary to stderr."""
    from .jobs import run_job

    s = run_job(args.job, progress=False if args.no_progress else None)
    _err(f"{s.output}: {s.completed} completed, {s.errors} errors, {s.skipped} already done "
         f"({s.completion_tokens} tokens in {s.seconds:.1f}s)")
    return 0


def cmd_demo(args) -> int:
    """``distlayer demo``: SmolLM2 on 2 stages answers one question; plan and stats tables."""
    from .model import AutoModel
    from .report import format_plan, stats_table
    from .smollm import ensure_smollm2

    try:
        path = ensure_smollm2(progress=_err)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    _err(f"Starting a 2-stage pipeline on {path.name} ...")
    with AutoModel.from_pretrained(path, stages=2) as model:
        tok = model.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": DEMO_QUESTION}], add_generation_prompt=True,
                                       tokenize=False)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=40,
                             return_dict_in_generate=True)
        answer = tok.decode(out.sequences[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
        print(f"Q: {DEMO_QUESTION}\nA: {answer}\n")
        print("Plan:")
        print(format_plan(model.plan))
        print("\nPer-stage stats:")
        print(stats_table(model.stats()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distlayer`` console script.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 on a bad setting or input (printed as ``error: ...``).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistlayerError as e:
        _err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
