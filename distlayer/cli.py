"""``distlayer`` command line: one thin verb per job over the library.

Verbs: ``split``, ``plan``, ``generate``, ``serve``, ``run``, ``demo``, ``bench``, ``doctor``.
Errors distlayer raises on bad input are printed as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
import threading

from .config import COMPRESSED, RENAMED, GenerationConfig, PipelineConfig, build
from .errors import ConfigError, DistlayerError
from .prompts import NoChatTemplate, context_error, model_context, tokenize

DEMO_QUESTION = "What is the capital of France?"
SERVE_ROWS = 8         # requests a server runs at once unless --batch-size says otherwise
SERVE_CONTEXT = 4096   # tokens per request a server reserves for, at most, unless --context says otherwise


def _cli_type(kind: type):
    """An argparse type for a settings field: whole numbers at least 0, or ``kind``."""
    if kind is not int:
        return kind

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
        return value

    return whole


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``memory_per_stage`` -> ``--memory-per-stage``."""
    return "--" + name.replace("_", "-")


def add_settings_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the settings dataclass ``cls`` that has a command-line type
    (``config.setting(cli=...)``); booleans get ``--x/--no-x``. Defaults stay None so
    the dataclass's own defaults apply."""
    group = p.add_argument_group(f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kind, text = f.metadata["cli"], f.metadata["help"]
        names = [flag(f.name), *f.metadata.get("aliases", ())]
        if f.type in ("bool", "bool | None"):
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif kind is not None:
            many = f.name == "stop"
            group.add_argument(*names, dest=f.name, type=_cli_type(kind), default=None,
                               action="append" if many else None, metavar="TEXT" if many else f.name.upper(),
                               help=text + (" (repeatable)" if many else ""))
            for old in RENAMED.get(f.name, ()):  # still accepted, with a warning (config.renamed)
                group.add_argument(flag(old), dest=old, type=_cli_type(kind), default=None, help=argparse.SUPPRESS)


def settings_from(args, cls, **extra):
    """Build ``cls`` from the parsed flags of its fields that were given (and ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    names |= {old for new in names for old in RENAMED.get(new, ())}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(given.get("memory_per_stage"), str) and "," in given["memory_per_stage"]:
        given["memory_per_stage"] = given["memory_per_stage"].split(",")
    return build(cls, {**given, **extra}, "--", "flag")


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
                                   "layer plus manifest.json. A finished store is verified (every shard's size and "
                                   "sha256) and what is damaged or missing is rewritten; an interrupted one is "
                                   "resumed; a store of another model is refused unless --force.")
    p.add_argument("model", help='HF repo id, local model dir, .gguf file, or "default" (SmolLM2-135M-Instruct)')
    p.add_argument("--out", default=None, metavar="DIR", help="store directory (default: next to the model)")
    p.add_argument("--compression", choices=COMPRESSED, default=None,
                   help="block-wise compressed shards")
    p.add_argument("--force", action="store_true", help="split again even if a finished store exists")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("plan", help="print the stage plan, change nothing",
                       description="Print which layers each stage would own and what it keeps resident or "
                                   "streams, as a table. Reads the manifest only: no weights are loaded. With "
                                   "--address, the stages are placed on that Ray cluster and asked where they run "
                                   "(then stopped), so the plan is the one the cluster would run.")
    p.add_argument("model", help='HF repo id, local model dir, layer store, or "default"')
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument("--cluster", default=None, metavar="FILE.yaml",
                   help="what-if: plan on the nodes this file describes (which need not exist) from the model's "
                        "config alone, and predict each stage's decode step and tokens/s at --max-rows")
    add_settings_flags(p, PipelineConfig)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="generate from one prompt, streaming tokens to stdout",
                       description="Load MODEL into a pipeline and stream the completion of PROMPT to stdout "
                                   "as tokens are produced.")
    p.add_argument("model", help='HF repo id, local model dir, .gguf file, layer store, or "default"')
    p.add_argument("prompt", help="the prompt text")
    add_settings_flags(p, PipelineConfig)
    add_settings_flags(p, GenerationConfig)
    p.set_defaults(func=cmd_generate)

    _add_serve_verb(sub)

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

    _add_bench_verb(sub)
    _add_doctor_verb(sub)
    return parser


def _add_serve_verb(sub) -> None:
    """The ``serve`` verb's parser."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the pipeline",
                       description="Serve MODEL over HTTP with the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health), many requests at once. Listens on "
                                   "127.0.0.1 unless told otherwise; stops cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("model", help='HF repo id, local model dir, .gguf file, layer store, or "default"')
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_cli_type(int), default=8000, help="port to listen on (default 8000; 0: one the system picks, printed at start)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: "
                                                  "$DISTLAYER_API_KEY; none if unset)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL's name)")
    add_settings_flags(p, PipelineConfig)
    p.set_defaults(func=cmd_serve)


def _budget(text: str):
    """A ``--budgets`` entry: ``resident``, or a share of the weights above 0 and at most 1."""
    if text == "resident":
        return text
    try:
        share = float(text)
    except ValueError:
        share = None
    if share is None or not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget: write a share of the model's weights per stage "
                                         "above 0 and at most 1, such as 0.25, or 'resident'")
    return share


def _at_least(low: int):
    """An argparse type for whole numbers at least ``low``."""
    def whole(text: str) -> int:
        value = _cli_type(int)(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: write {low} or more")
        return value

    return whole


def _add_bench_verb(sub) -> None:
    """The ``bench`` verb's parser; its defaults are :class:`distlayer.bench.Options`'."""
    from .bench import MODES, SYSTEMS, Options

    d = Options()
    p = sub.add_parser("bench", help="tokens/s against transformers, accelerate offload and AirLLM, warm and cold",
                       description="Time greedy decoding of the same prompts on transformers with all weights in "
                                   "memory, accelerate's disk offload, AirLLM (when installed) and distlayer "
                                   "(in-process and Ray stages, resident and streaming within a share of the "
                                   "weights per stage), with the page cache warm and cold (every file a system "
                                   "reads dropped at every token). Runs take turns. Each streaming row is set "
                                   "against its roofline: the bytes a step streams over the read bandwidth of the "
                                   "same files, measured in the same run. Writes bench.json, bench.md and bench.png "
                                   "into --out and prints the table.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help='HF repo id, local model dir, .gguf file, or "default" (SmolLM2-135M-Instruct, '
                          'the default)')
    src.add_argument("--synthetic", metavar="SIZE", default=None,
                     help="a random-weight Llama of about SIZE parameters (1B, 50M, 7M), built once and reused")
    p.add_argument("--synthetic-dir", metavar="DIR", default=None,
                   help="where --synthetic models are kept (default: $DISTLAYER_HOME/synthetic)")
    p.add_argument("--out", metavar="DIR", default=d.out, help=f"where the results go (default: ./{d.out})")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(d.systems), metavar="SYSTEM",
                   help=f"systems to run: {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--stages", nargs="+", type=_cli_type(int), default=list(d.stages), metavar="N",
                   help="distlayer stage counts; 0 is one stage in this process without Ray (default: 0 1 2)")
    p.add_argument("--budgets", nargs="+", type=_budget, default=list(d.budgets), metavar="BUDGET",
                   help="'resident', or shares of the weights per stage (default: resident 0.5 0.25 0.1)")
    p.add_argument("--batches", nargs="+", type=_at_least(1), default=list(d.batches), metavar="B",
                   help="batch sizes (default: 1 16)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(d.modes), metavar="MODE",
                   help="page cache: warm, cold (default: both)")
    p.add_argument("--new", type=_at_least(2), default=d.new, help=f"new tokens a run (default {d.new})")
    p.add_argument("--repeat", type=_at_least(1), default=d.repeat, help=f"timed runs each (default {d.repeat})")
    p.add_argument("--airllm-new", type=_at_least(2), default=d.airllm_new,
                   help=f"new tokens a run for AirLLM, seconds a token on CPU (default {d.airllm_new})")
    p.set_defaults(func=cmd_bench)


def _add_doctor_verb(sub) -> None:
    """The ``doctor`` verb's parser."""
    p = sub.add_parser("doctor", help="versions, devices, Ray, disk speed and a correctness canary",
                       description="Check that this machine gives right answers and how fast it can go: the "
                                   "versions of transformers, torch and Ray against the tested ranges; CPU, RAM and "
                                   "GPUs; Ray (a private local Ray, or the cluster at --address); the disk's read "
                                   "speed; and a canary, a tiny random model of MODEL's architecture run through "
                                   "distlayer (in process and on 2 Ray stages that stream, on every device kind) "
                                   "whose greedy tokens must equal transformers' own. Prints a table; exit status 1 "
                                   "when a check fails.")
    p.add_argument("model", nargs="?", default="default",
                   help='HF repo id, local model dir, .gguf file, layer store, or "default" (SmolLM2-135M-Instruct, '
                        'the default); only its config is read')
    p.add_argument("--address", default=None,
                   help='the Ray cluster to check: "auto" or host:port (default: start a private local Ray)')
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=cmd_doctor)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it ends like Ctrl-C: models closed,
    stages stopped, no traceback."""


def _terminate(signum, frame):
    raise Terminated()


# Whether streamed text left stdout without a line end (``generate``), so that a message
# after it starts on a line of its own.
_stdout = {"mid_line": False}


def _err(msg: str) -> None:
    if _stdout["mid_line"]:
        print(flush=True)
        _stdout["mid_line"] = False
    print(msg, file=sys.stderr, flush=True)


def cmd_split(args) -> int:
    """``distlayer split``: write the layer store, print its path."""
    from .smollm import resolve_model
    from .store import split

    print(split(resolve_model(args.model), out=args.out, compression=args.compression, force=args.force, verify=True,
                prefix="--"))
    return 0


def cmd_plan(args) -> int:
    """``distlayer plan``: print the plan ``from_pretrained`` would run with on this
    machine, or with ``--address`` on that live Ray cluster (the same planning call and
    defaults), without loading weights."""
    from .pipeline import plan_model, plan_on_cluster
    from .report import format_measured, format_plan, plan_notes
    from .smollm import resolve_model

    cfg = settings_from(args, PipelineConfig)
    if args.cluster is not None:
        return cmd_plan_whatif(args, cfg)
    plan, store, dtype = (plan_model if cfg.address is None else plan_on_cluster)(resolve_model(args.model), cfg)
    if args.json:
        keys = ("stage", "node_ip", "start", "end", "budget_bytes", "budget_source", "reserve_bytes", "resident_bytes",
                "streamed_bytes", "resident_units", "streamed_units", "host_units", "host_bytes", "host_budget_bytes",
                "host_source", "device", "threads")
        measured = {} if plan.survey is None else {"measured": plan.survey.as_dicts(),
                                                   "prediction": plan.prediction.as_dict()}
        print(json.dumps({"model": str(store.path), "dtype": str(dtype).removeprefix("torch."),
                          "micro_batches": plan.micro_batches, "balance": plan.plan.balance,
                          "balance_note": plan.plan.balance_note, "block_note": plan.plan.block_note,
                          "stages": [{k: p.as_dict()[k] for k in keys} for p in plan.stages], **measured}, indent=1))
    else:
        print(format_plan(plan.stages))
        print()
        print(plan_notes(plan, cfg, dtype))
        if plan.survey is not None:
            print()
            print(format_measured(plan))
    return 0


def cmd_plan_whatif(args, cfg: PipelineConfig) -> int:
    """``distlayer plan MODEL --cluster FILE``: the plan and its predicted speed on the
    nodes ``FILE`` describes, from the model's config alone."""
    from .report import format_whatif
    from .whatif import plan_cluster

    w = plan_cluster(args.model, args.cluster, cfg)
    if args.json:
        stages = [{"node": n.name, "device_kind": d.label, **p.as_dict()} for p, (n, d) in zip(w.plan.stages, w.devices())]
        print(json.dumps({"model": args.model, "cluster": args.cluster, "dtype": w.dtype,
                          "micro_batches": w.plan.micro_batches, "balance": w.plan.balance,
                          "balance_note": w.plan.balance_note, "block_note": w.plan.block_note, "stages": stages,
                          "prediction": w.prediction.as_dict()}, indent=1))
    else:
        print(format_whatif(w))
    return 0


def cmd_generate(args) -> int:
    """``distlayer generate``: stream one completion to stdout. The prompt and settings are
    checked against the model before any stage starts."""
    import torch
    from transformers import TextStreamer

    from .model import DistModel, load_tokenizer
    from .smollm import resolve_model
    from .store import open_configured

    cfg = settings_from(args, PipelineConfig)
    gen = settings_from(args, GenerationConfig)
    if not args.prompt.strip():
        raise ConfigError("the prompt is empty: write the prompt text")
    store = open_configured(resolve_model(args.model), cfg)
    tok = load_tokenizer(store.path)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer files: generate needs a model with a tokenizer")
    try:
        ids = torch.tensor([tokenize(args.prompt, None, tok, gen.chat_template)])
    except NoChatTemplate as e:
        raise ConfigError(f"{e}: run without --chat") from None
    too_long = context_error(ids.shape[1], gen.max_new_tokens, model_context(store.config), "--max-new-tokens")
    if too_long:
        raise ConfigError(too_long)
    class LineStreamer(TextStreamer):
        """TextStreamer that notes whether stdout was left mid-line (for "terminated")."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            super().on_finalized_text(text, stream_end)
            if text or stream_end:
                _stdout["mid_line"] = not stream_end and not text.endswith("\n")

    with DistModel.start(store, cfg) as model:
        streamer = LineStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **dataclasses.asdict(gen))
    return 0


def cmd_serve(args) -> int:
    """``distlayer serve``: the OpenAI-compatible server, until SIGINT or SIGTERM."""
    import os
    from pathlib import Path

    from .model import DistModel
    from .serve import listen, serve
    from .smollm import model_name, resolve_model
    from .store import open_configured

    cfg = settings_from(args, PipelineConfig)
    sock = listen(args.host, args.port)
    store = open_configured(resolve_model(args.model), cfg)
    longest = model_context(store.config) or 4096
    cfg = dataclasses.replace(cfg, max_rows=SERVE_ROWS if args.max_rows is None and args.batch_size is None
                              else cfg.max_rows,
                              context=cfg.context or min(longest, SERVE_CONTEXT))
    name = args.served_model_name or model_name(args.model)
    api_key = args.api_key or os.environ.get("DISTLAYER_API_KEY") or None
    with sock, DistModel.start(store, cfg) as model:
        serve(model, model.scheduler, name, sock, api_key,
              ready=lambda port: _err(f"serving {name} on http://{args.host}:{port}/v1 "
                                      f"({len(model.plan)} stages, up to {cfg.max_rows} requests at once)"))
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
    import torch

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
        ids = torch.tensor([tokenize(DEMO_QUESTION, None, tok, True)])
        out = model.generate(ids, max_new_tokens=40, return_dict_in_generate=True)
        answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
        print(f"Q: {DEMO_QUESTION}\nA: {answer}\n")
        print("Plan:")
        print(format_plan(model.plan))
        print("\nPer-stage stats:")
        print(stats_table(model.stats()))
    return 0


def cmd_bench(args) -> int:
    """``distlayer bench``: run, write bench.json / bench.md / bench.png, print the table."""
    from pathlib import Path

    from .bench import Options, run_bench, write

    names = {f.name for f in dataclasses.fields(Options)}
    opts = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
                      if k in names and v is not None})
    paths = write(run_bench(opts), Path(args.out))
    print(paths["md"].read_text())
    _err(f"wrote {paths['json']}, {paths['md']}" + (f" and {paths['png']}" if paths["png"] else
                                                     "; no plot: matplotlib is not installed "
                                                     "(pip install 'distlayer[bench]')"))
    return 0


def cmd_doctor(args) -> int:
    """``distlayer doctor``: the checks' table (or JSON); 1 when one fails."""
    from .doctor import FAIL, format_rows, run_doctor

    cfg = settings_from(args, PipelineConfig)
    rows = run_doctor(args.model, cfg, say=_err)
    print(json.dumps([r.as_dict() for r in rows], indent=1) if args.json else format_rows(rows))
    return 1 if any(r.status == FAIL for r in rows) else 0


def _negative_values(argv: list[str]) -> list[str]:
    """``argv`` with a value that starts with a minus and a digit joined to the long flag
    before it (``--memory-per-stage -5GiB`` -> ``--memory-per-stage=-5GiB``): argparse
    takes ``-5GiB`` for a flag and says "expected one argument"; joined, the setting's
    own check says what is wrong with the value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\.?\d", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distlayer`` console script.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 on a bad setting or input (printed as ``error: ...``),
        1 when a ``doctor`` check fails.
    """
    _stdout["mid_line"] = False
    args = build_parser().parse_args(_negative_values(sys.argv[1:] if argv is None else list(argv)))
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except DistlayerError as e:
        _err(f"error: {e}")
        return 2
    except Terminated:
        _err("terminated")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
