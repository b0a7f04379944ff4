"""The benchmark run: which configurations load together, runs taken in turns, rows.

Every configuration runs once to warm up, then ``repeat`` timed runs taking turns with the
others loaded at the same time, so drift in the machine's speed hits all alike.
transformers in memory (the baseline every ratio is against) stays loaded throughout and
takes its turn in every group; a row's ratio is against its own group's baseline runs.

- **warm**: every configuration that fits in memory at once is loaded at once.
- **cold**: the kernel cannot drop a page from the page cache while any process holds it
  mapped, and a loaded distlayer pipeline maps its resident units, so a cold group holds
  at most one configuration per set of files (the distlayer store, the checkpoint
  accelerate offloads to, AirLLM's shards). Resident configurations read nothing per step
  and run warm only.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from . import measure
from .systems import SYSTEMS, Config, Context, Loaded, Skip, estimate_bytes, load

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?", "Name a famous painter."]
MODES = ("warm", "cold")
MEMORY_SHARE = 0.8      # of the RAM available at the start that loaded models may take
STAGE_KEYS = ("peak_weight_bytes", "peak_rss_bytes", "budget_bytes", "resident_bytes", "streamed_bytes", "load_s",
              "stall_s", "compute_s", "transfer_s")


@dataclass
class Options:
    """What ``distlayer bench`` was asked for (its flags)."""

    model: str = "default"
    synthetic: str | None = None
    synthetic_dir: str | None = None
    out: str = "distlayer-bench"
    systems: tuple = SYSTEMS
    stages: tuple = (0, 1, 2)
    budgets: tuple = ("resident", 0.5, 0.25, 0.1)
    batches: tuple = (1, 16)
    modes: tuple = MODES
    new: int = 16
    repeat: int = 3
    airllm_new: int = 3


def say(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def configurations(o: Options) -> list[Config]:
    """The configurations the options select, baseline first."""
    out = [Config("transformers")] if "transformers" in o.systems else []
    shares = [b for b in o.budgets if b != "resident"]
    if "accelerate" in o.systems:
        out += [Config("accelerate", budget=b) for b in shares]
    if "airllm" in o.systems:
        out.append(Config("airllm"))
    if "distlayer" in o.systems:
        out += [Config("distlayer", s, None if b == "resident" else b) for s in o.stages for b in o.budgets]
    return out


def file_set(cfg: Config) -> str:
    """Which files a configuration reads per step: configurations sharing them cannot run cold together."""
    return {"distlayer": "store", "accelerate": "checkpoint", "airllm": "airllm"}[cfg.system]


def streams(cfg: Config) -> bool:
    """Whether a configuration reads files at every step (so a warm run wants them cached)."""
    return cfg.budget is not None or cfg.system == "airllm"


def pack(configs: list[Config], ctx: Context, room: int, cached: bool = False) -> list[list[Config]]:
    """Cut ``configs`` into groups, in order, whose estimated memory fits ``room`` bytes;
    with ``cached``, the files each group streams from count too (a warm run reads them
    from the page cache, about the weights' size per set of files)."""
    groups, used, sets = [[]], 0, set()
    for c in configs:
        need = estimate_bytes(c, ctx)
        new_set = cached and streams(c) and file_set(c) not in sets
        need += ctx.total_bytes if new_set else 0
        if groups[-1] and used + need > room:
            groups.append([])
            used, sets = 0, set()
            need = estimate_bytes(c, ctx) + (ctx.total_bytes if cached and streams(c) else 0)
        groups[-1].append(c)
        used += need
        if cached and streams(c):
            sets.add(file_set(c))
    return [g for g in groups if g]


def plan_groups(configs: list[Config], mode: str, ctx: Context, room: int) -> list[list[Config]]:
    """The configurations loaded together for ``mode``, in the order they run (see the
    module docstring); the baseline is not among them."""
    others = [c for c in configs if c.system != "transformers"]
    if mode == "warm":
        return pack(others, ctx, room, cached=True) or [[]]
    by_files: dict[str, list[Config]] = {}
    for c in others:
        if streams(c):
            by_files.setdefault(file_set(c), []).append(c)
    rounds = max((len(v) for v in by_files.values()), default=0)
    groups = []
    for i in range(rounds):
        groups += pack([v[i] for v in by_files.values() if i < len(v)], ctx, room)
    return groups


def ray_cpus(group: list[Config]) -> float:
    """Ray CPUs per stage so that every Ray stage of the group fits on this node at once."""
    n = sum(c.stages for c in group if c.system == "distlayer" and c.stages)
    return max(0.01, math.floor(min(1.0, (os.cpu_count() or 1) / max(n, 1)) * 100) / 100)


def prompts(tok, batch: int):
    """``batch`` short chat prompts (plain text without a chat template), left-padded."""
    texts = []
    for i in range(batch):
        p = PROMPTS[i % len(PROMPTS)]
        texts.append(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) if getattr(tok, "chat_template", None) else p)
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@dataclass
class Bench:
    """One benchmark run over one model: the loaded baseline, the measurements, the rows."""

    opts: Options
    ctx: Context
    tok: object
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, dict] = field(default_factory=dict)
    bandwidth: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    baseline_runs: dict = field(default_factory=dict)     # (batch, mode) -> Runs over every group
    airllm_runs: dict = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)

    def measure_bandwidth(self) -> None:
        """Read bandwidth of each file set, per mode asked for (run when no model maps them)."""
        for name, files in self.files.items():
            if not files:
                continue
            for mode in self.opts.modes:
                got = measure.read_bandwidth(files, cold=mode == "cold")
                self.bandwidth.setdefault(name, {}).setdefault(mode, []).append(got)
                say(f"read bandwidth of the {name} files, {mode}: {got['bytes_per_s'] / 1e9:.2f} GB/s")

    def best_bandwidth(self, name: str | None, mode: str) -> float | None:
        """The best bytes per second measured for a file set and mode."""
        got = [m["bytes_per_s"] for m in self.bandwidth.get(name or "", {}).get(mode, []) if m["bytes_per_s"]]
        return max(got) if got else None

    def new_tokens(self, cfg: Config) -> int:
        """Tokens per run: AirLLM takes seconds a token, so it makes fewer."""
        return min(self.opts.airllm_new, self.opts.new) if cfg.system == "airllm" else self.opts.new

    def load_group(self, group: list[Config]) -> list[Loaded]:
        """Load a group's configurations; those that cannot run are noted as skipped."""
        self.ctx.cpus_per_stage = ray_cpus(group)
        loaded = []
        for cfg in group:
            say(f"loading {cfg.label} ...")
            try:
                item = load(cfg, self.ctx)
            except Skip as e:
                self.skipped[cfg.key] = {"key": cfg.key, "label": cfg.label, "system": cfg.system,
                                         "stages": cfg.stages, "budget": cfg.budget, "reason": str(e)}
                say(f"  skipped: {e}")
                continue
            if item.file_set:
                self.files.setdefault(item.file_set, item.files)
            loaded.append(item)
        return loaded

    def run_group(self, mode: str, baseline: Loaded | None, items: list[Loaded]) -> None:
        """Warm up, then take turns; rows for ``items`` with ratios to this group's baseline runs."""
        import torch

        threads = torch.get_num_threads()
        turns = ([baseline] if baseline else []) + items
        for b in self.opts.batches:
            ids, mask = prompts(self.tok, b)

            def once(it: Loaded, cold: bool):
                if it.config.system != "distlayer":
                    torch.set_num_threads(threads)   # an in-process distlayer stage sets its own
                n = self.new_tokens(it.config)
                with torch.inference_mode():
                    return measure.timed_run(lambda s: it.generate(ids, mask, n, s), n,
                                             it.files if cold else None, exclude_drops=it.in_process)

            before = {}
            for it in turns:   # the warm-up runs warm in either mode
                once(it, cold=False)
                before[it.config.key] = measure.seconds_of(it.stats()) if it.stats else {}
            got = measure.take_turns({it.config.key: functools.partial(once, it, mode == "cold") for it in turns},
                                     self.opts.repeat, warmup=False,
                                     after_round=lambda r: say(f"  batch {b}, {mode}: run {r + 1} of "
                                                               f"{self.opts.repeat} done"))
            runs = {key: measure.Runs(b, timed) for key, timed in got.items()}
            for it in turns:
                if it.stats:
                    since = before[it.config.key]
                    runs[it.config.key].costs = {k: v - since.get(k, 0.0)
                                                 for k, v in measure.seconds_of(it.stats()).items()}
            base = runs[baseline.config.key].summary() if baseline else None
            if baseline:
                self.baseline_runs.setdefault((b, mode), measure.Runs(b)).runs += runs[baseline.config.key].runs
            for it in items:
                if it.config.system == "airllm":
                    self.airllm_runs.setdefault((b, mode), measure.Runs(b)).runs += runs[it.config.key].runs
                self.rows.append(self.row(it, mode, runs[it.config.key], base))
                say("  " + brief(self.rows[-1], self.best_bandwidth(it.file_set, mode)))

    def row(self, it: Loaded, mode: str, runs: measure.Runs, base: dict | None) -> dict:
        """One table row: the configuration, its speed, its roofline, its ratio to the baseline."""
        cfg, s = it.config, runs.summary()
        row = {"key": cfg.key, "label": cfg.label, "series": cfg.series, "system": cfg.system, "stages": cfg.stages,
               "budget": cfg.budget, "budget_bytes": it.budget_bytes, "batch": runs.batch, "mode": mode, **s,
               "bytes_per_step": it.bytes_per_step, "notes": list(it.notes)}
        if it.micro_batches(runs.batch) > 1:
            row["notes"].append(f"timed with a streamer, so it ran as 1 micro-batch (its plan has "
                                f"{it.micro_batches(runs.batch)})")
        if it.file_set:
            row["file_set"] = it.file_set
        if mode == "cold" and it.files:
            row["drop_excluded"] = it.in_process   # see measure.Clock
        if base:
            row.update(ratios(s, base, "vs_transformers"))
        if it.stats:
            row["stages_stats"] = [{k: st[k] for k in STAGE_KEYS if k in st} for st in it.stats()]
            row["plan"] = it.plan
            if it.in_process:
                row["notes"].append("peak RSS is this process's: it also holds the baseline and the other "
                                    "in-process configurations")
        return row

    def roofline(self, row: dict) -> None:
        """A streaming row's floor: the bytes a step streams over the best read bandwidth of
        the same files in the same mode measured in the run, and the share of it reached."""
        bw = self.best_bandwidth(row.get("file_set"), row["mode"])
        if not (row["bytes_per_step"] and bw and row.get("step_ms")):
            return
        floor_ms = 1e3 * row["bytes_per_step"] / bw
        row.update(read_bytes_per_s=round(bw), floor_ms=round(floor_ms, 3),
                   roofline_tok_s=round(row["batch"] * 1e3 / floor_ms, 3),
                   roofline_fraction=round(floor_ms / row["step_ms"], 3),
                   roofline_fraction_median=round(floor_ms / row["step_ms_median"], 3))

    def finish(self) -> None:
        """Rooflines, rows of the baseline and AirLLM ratios, once every group ran and the
        bandwidth was measured again."""
        self.rows[:0] = [{"key": "transformers", "label": "transformers in memory", "series": "transformers in memory",
                          "system": "transformers", "stages": None, "budget": None, "budget_bytes": None, "batch": b,
                          "mode": mode, **runs.summary(), "bytes_per_step": 0, "vs_transformers": 1.0, "notes": []}
                         for (b, mode), runs in sorted(self.baseline_runs.items())]
        for row in self.rows:
            self.roofline(row)
            air = self.airllm_runs.get((row["batch"], row["mode"]))
            if air and row["system"] != "airllm":
                row.update(ratios(row, air.summary(), "vs_airllm"))


def ratios(s: dict, base: dict, name: str) -> dict:
    """Tokens/s of a row over a baseline's: best runs, and medians (decode where both have it)."""
    kind = "decode_tok_s" if s.get("decode_tok_s") and base.get("decode_tok_s") else "tok_s"
    if not base.get(kind):
        return {}
    return {name: round(s[kind] / base[kind], 3),
            f"{name}_median": round(s[kind + "_median"] / base[kind + "_median"], 3)}


def brief(row: dict, bandwidth: float | None) -> str:
    """A one-line account of a row, for progress (its roofline from the bandwidth measured so far)."""
    bits = [f"{row['label']}, batch {row['batch']}, {row['mode']}: {row.get('decode_tok_s', row.get('tok_s'))} tok/s"]
    if "vs_transformers" in row:
        bits.append(f"{row['vs_transformers']}x transformers")
    if row["bytes_per_step"] and bandwidth and row.get("step_ms"):
        bits.append(f"{1e3 * row['bytes_per_step'] / bandwidth / row['step_ms']:.3g} of the roofline")
    return ", ".join(bits)


def model_context(o: Options, workdir: Path) -> tuple[Context, object, dict]:
    """Resolve the model (``--synthetic`` built first), open its store (split once), and
    describe it."""
    from ..arch import compute_dtype
    from ..model import load_tokenizer
    from ..smollm import resolve_model
    from ..sources import is_checkpoint, resolve_source
    from ..store import MANIFEST, open_store
    from .synthetic import ensure_synthetic

    model = str(ensure_synthetic(o.synthetic, o.synthetic_dir, say)) if o.synthetic else resolve_model(o.model)
    source = resolve_source(model)
    checkpoint = source.path if source.kind == "dir" and is_checkpoint(source.path) and \
        not (source.path / MANIFEST).is_file() else None
    store = open_store(model, progress=True)
    tok = load_tokenizer(store.path)
    if tok is None:
        raise ConfigError(f"{model} has no tokenizer files: the benchmark needs a model with a tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = compute_dtype(None, store.config)
    total = sum(store.unit_bytes(u, dtype) for u in store.units)
    text = store.config.get_text_config()
    info = {"model": model, "synthetic": o.synthetic, "store": str(store.path),
            "dtype": str(dtype).removeprefix("torch."),
            "weight_bytes": total, "layers": store.num_layers, "hidden_size": getattr(text, "hidden_size", None),
            "vocab_size": getattr(text, "vocab_size", None), "architecture": (store.config.architectures or [None])[0]}
    ctx = Context(model, checkpoint, store, dtype, total, tok.pad_token_id, workdir)
    return ctx, tok, info


def run_bench(o: Options) -> dict:
    """Run the benchmark ``o`` describes; returns everything ``bench.json`` holds."""
    import psutil

    from .report import describe_machine

    o = dataclasses.replace(o, **{k: tuple(dict.fromkeys(getattr(o, k))) for k in ("systems", "stages", "budgets",
                                                                                     "batches", "modes")})
    with tempfile.TemporaryDirectory(prefix="distlayer-bench-") as tmp:
        ctx, tok, info = model_context(o, Path(tmp))
        bench = Bench(o, ctx, tok)
        bench.files["store"] = measure.store_files(ctx.store.path)
        if ctx.checkpoint is not None and "accelerate" in o.systems:
            bench.files["checkpoint"] = measure.store_files(ctx.checkpoint)
        bench.measure_bandwidth()
        configs = configurations(o)
        baseline = None
        if configs and configs[0].system == "transformers":
            (baseline,) = bench.load_group([configs[0]]) or (None,)
        room = int(MEMORY_SHARE * psutil.virtual_memory().available)
        for mode in o.modes:
            for group in plan_groups([c for c in configs if c.key not in bench.skipped], mode, ctx, room):
                if not group and baseline is None:
                    continue
                bench.groups.append({"mode": mode, "configurations": [c.label for c in group]})
                say(f"{mode}: {', '.join(c.label for c in group) or 'the baseline alone'}")
                items = bench.load_group(group)
                try:
                    bench.run_group(mode, baseline, items)
                finally:
                    for it in items:
                        it.close()
                    del items
                    gc.collect()
        bench.measure_bandwidth()
        bench.finish()
    return {"machine": describe_machine(), "model": info, "settings": settings_of(o),
            "loading": loading_note(bench.groups), "bandwidth": bench.bandwidth, "groups": bench.groups,
            "rows": bench.rows, "skipped": list(bench.skipped.values())}


def settings_of(o: Options) -> dict:
    """The options as plain JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(o).items()}


def loading_note(groups: list[dict]) -> str:
    """How the configurations were loaded: all at once, or in groups one after another."""
    warm = [g for g in groups if g["mode"] == "warm"]
    cold = [g for g in groups if g["mode"] == "cold"]
    parts = []
    if warm:
        parts.append("warm: all configurations loaded at once" if len(warm) == 1 else
                     f"warm: {len(warm)} groups loaded one after another (not all fit in memory at once)")
    if cold:
        parts.append(f"cold: {len(cold)} group{'s' * (len(cold) > 1)} one after another, at most one "
                     "configuration per set of files in each (a page another loaded model maps cannot be dropped "
                     "from the page cache)")
    return "; ".join(parts) + "; transformers in memory stays loaded and takes its turn in every group"
