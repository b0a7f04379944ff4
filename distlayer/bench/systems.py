"""The systems a benchmark compares, each loaded behind one interface (:class:`Loaded`):
transformers with all weights in memory, accelerate's disk offload, AirLLM, and distlayer
(in-process or Ray stages, resident or streaming at a share of the weights)."""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..units import EMBED, layer_unit
from .measure import store_files

SYSTEMS = ("transformers", "accelerate", "airllm", "distlayer")
RAY_STAGE_BYTES = 450 * 2**20   # memory of a Ray stage's process before weights (torch, transformers, Ray)


class Skip(Exception):
    """A configuration that cannot run here; the message says why."""


@dataclass(frozen=True)
class Config:
    """One configuration: a system, its stages (distlayer) and its budget, a share of the
    model's weights per stage (None: all weights in memory, or no budget for AirLLM)."""

    system: str
    stages: int | None = None
    budget: float | None = None

    @property
    def key(self) -> str:
        """A short unique name: ``distlayer-s1-b0.25``."""
        parts = [self.system] + ([f"s{self.stages}"] if self.stages is not None else []) + \
            ([f"b{self.budget:g}"] if self.budget is not None else [])
        return "-".join(parts)

    @property
    def label(self) -> str:
        """How tables and plots name it: ``distlayer, 1 Ray stage, 25%``."""
        where = {None: "", 0: ", in-process", 1: ", 1 Ray stage"}.get(self.stages, f", {self.stages} Ray stages")
        if self.system == "transformers":
            return "transformers in memory"
        if self.system == "airllm":
            return "AirLLM"
        if self.system == "accelerate":
            return f"accelerate disk offload, {pct(self.budget)}"
        return f"distlayer{where}, {'resident' if self.budget is None else pct(self.budget)}"

    @property
    def series(self) -> str:
        """The plot line it belongs to (all budgets of one system and stage count)."""
        return self.label.rsplit(", ", 1)[0] if self.system in ("distlayer", "accelerate") else self.label


def pct(share: float) -> str:
    """``0.25`` -> ``"25%"``."""
    return f"{100 * share:g}%"


@dataclass
class Context:
    """What every loader needs: the model, its store, the compute dtype, the weights'
    bytes in it, and the run's scratch dir."""

    model: str                    # what distlayer's from_pretrained is given
    checkpoint: Path | None       # the HF checkpoint dir the baselines load (None: not a plain dir)
    store: object                 # distlayer.store.LayerStore
    dtype: object                 # torch.dtype
    total_bytes: int              # the model's weight bytes in dtype (every unit of the store)
    pad_id: int | None
    workdir: Path
    cpus_per_stage: float = 1.0

    def budget_bytes(self, share: float | None) -> int | None:
        """A share of the weights, in bytes (None: no budget)."""
        return None if share is None else int(share * self.total_bytes)


@dataclass
class Loaded:
    """A loaded configuration: ``generate(ids, mask, new, streamer)`` makes ``new`` tokens
    per row, greedily; ``files`` are what a cold run drops at every token; ``bytes_per_step``
    what a decode step reads of them."""

    config: Config
    generate: Callable
    close: Callable[[], None]
    files: list[Path] = field(default_factory=list)
    file_set: str | None = None           # which bandwidth measurement applies
    bytes_per_step: int = 0
    budget_bytes: int | None = None
    stats: Callable[[], list[dict]] | None = None
    plan: list[dict] | None = None
    micro_batches: Callable[[int], int] = lambda batch: 1
    in_process: bool = True                # runs in this process (so peak RSS is this process's)
    notes: list[str] = field(default_factory=list)


def estimate_bytes(cfg: Config, ctx: Context) -> int:
    """Memory a configuration takes once loaded, roughly, to decide what loads at once."""
    total, budget = ctx.total_bytes, ctx.budget_bytes(cfg.budget)
    if cfg.system == "transformers":
        return total
    if cfg.system == "accelerate":
        return budget
    if cfg.system == "airllm":
        layer = max(ctx.store.unit_bytes(layer_unit(i), ctx.dtype) for i in range(ctx.store.num_layers))
        return ctx.store.unit_bytes(EMBED, ctx.dtype) + 2 * layer
    stages = max(1, cfg.stages)
    weights = total if budget is None else min(total, stages * budget)
    return weights + (RAY_STAGE_BYTES * stages if cfg.stages else 0)


def load(cfg: Config, ctx: Context) -> Loaded:
    """Load ``cfg``; raises :class:`Skip` with the reason when it cannot run here."""
    return {"transformers": load_transformers, "accelerate": load_accelerate, "airllm": load_airllm,
            "distlayer": load_distlayer}[cfg.system](cfg, ctx)


def _hf_generate(model, pad_id):
    """transformers' greedy generate of exactly ``new`` tokens per row."""
    def generate(ids, mask, new, streamer):
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad_id, streamer=streamer)
    return generate


def _need_checkpoint(ctx: Context, what: str) -> Path:
    if ctx.checkpoint is None:
        raise Skip(f"{what} loads a Hugging Face checkpoint dir; the model given is not one (give its dir)")
    return ctx.checkpoint


def load_transformers(cfg: Config, ctx: Context) -> Loaded:
    """transformers, every weight in this process's own memory: the tensors are copied out
    of the checkpoint's memory map, so no file page stays mapped (a mapped page cannot
    be dropped from the page cache, and accelerate's cold runs read the same file)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = _need_checkpoint(ctx, "transformers")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=ctx.dtype).eval()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    gc.collect()
    return Loaded(cfg, _hf_generate(model, ctx.pad_id), close=lambda: None)


def load_accelerate(cfg: Config, ctx: Context) -> Loaded:
    """transformers with accelerate's big-model inference: ``device_map="auto"`` within a
    CPU budget, the rest offloaded to disk (read from the checkpoint's safetensors, or
    from ``offload_folder`` for other formats)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise Skip("accelerate is not installed: pip install accelerate") from None
    from transformers import AutoModelForCausalLM

    path = _need_checkpoint(ctx, "accelerate")
    budget = ctx.budget_bytes(cfg.budget)
    folder = Path(tempfile.mkdtemp(prefix=f"offload-{cfg.budget:g}-", dir=ctx.workdir))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=ctx.dtype, device_map="auto",
                                                     max_memory={"cpu": budget}, offload_folder=folder).eval()
    except (ValueError, RuntimeError) as e:
        raise Skip(f"accelerate cannot place the model within {budget} bytes: {e}") from None
    # accelerate leaves the weights it offloads to disk on the meta device (transformers
    # before 5.7 or so does not say where in hf_device_map when all of them are there)
    per_step = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
    files = store_files(path) + sorted(f for f in folder.rglob("*") if f.is_file())
    notes = [] if per_step else ["accelerate put every weight in memory: nothing offloaded"]
    return Loaded(cfg, _hf_generate(model, ctx.pad_id), close=lambda: None, files=files, file_set="checkpoint",
                  bytes_per_step=per_step, budget_bytes=budget, notes=notes)


@contextlib.contextmanager
def _quiet():
    """Swallow what a library prints (AirLLM prints every shard it writes and every layer)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def load_airllm(cfg: Config, ctx: Context) -> Loaded:
    """AirLLM on CPU: every decoder layer (and an untied head) read from its own per-layer
    shards at every forward; a tied embedding stays resident."""
    try:
        from airllm import AutoModel as AirModel
    except ImportError:
        raise Skip("airllm is not installed: pip install airllm") from None
    except Exception as e:  # noqa: BLE001 (a broken install: say what it raised)
        raise Skip(f"airllm cannot be imported here: {type(e).__name__}: {e}") from None
    path = _need_checkpoint(ctx, "AirLLM")
    try:
        with _quiet():
            model = AirModel.from_pretrained(str(path), device="cpu", dtype=ctx.dtype)
    except Exception as e:  # noqa: BLE001 (a baseline that cannot load is a row skipped, not a failed run)
        raise Skip(f"AirLLM cannot load the model on CPU: {type(e).__name__}: {e}") from None
    shards = store_files(model.checkpoint_path)
    tied = bool(getattr(model, "tie_word_embeddings", False))
    streamed = [f for f in shards if not (tied and f.name.startswith("model.embed_tokens"))]
    inner = _hf_generate(model, ctx.pad_id)

    def generate(ids, mask, new, streamer):
        with _quiet():
            inner(ids, mask, new, streamer)

    return Loaded(cfg, generate, close=lambda: None, files=streamed, file_set="airllm",
                  bytes_per_step=sum(f.stat().st_size for f in streamed))


def load_distlayer(cfg: Config, ctx: Context) -> Loaded:
    """distlayer: ``stages=0`` one in-process stage, else Ray stages, resident or within a
    budget per stage. A budget too small to plan is a :class:`Skip` with the planner's message."""
    from .. import AutoModel
    from ..errors import PlanError

    budget = ctx.budget_bytes(cfg.budget)
    kw = {"stages": cfg.stages, "progress": False}
    if budget is not None:
        kw["memory_per_stage"] = budget
    if cfg.stages:
        kw["cpus_per_stage"] = ctx.cpus_per_stage
    try:
        dl = AutoModel.from_pretrained(ctx.model, **kw)
    except PlanError as e:
        raise Skip(str(e)) from None

    def generate(ids, mask, new, streamer):
        dl.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=[],
                    streamer=streamer)

    keys = ("stage", "start", "end", "budget_bytes", "resident_bytes", "streamed_bytes", "resident_units",
            "streamed_units", "threads")
    plan = [{k: v for k, v in p.as_dict().items() if k in keys} for p in dl.plan]
    return Loaded(cfg, generate, close=dl.close, files=store_files(dl.store.path),
                  file_set="store", bytes_per_step=sum(p.streamed_bytes for p in dl.plan), budget_bytes=budget,
                  stats=dl.stats, plan=plan, micro_batches=dl.pipeline.micro_batches, in_process=not cfg.stages)
