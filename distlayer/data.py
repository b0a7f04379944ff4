"""Ray Data batch inference: a dataset of prompts in, the same rows with completions out.

Named after ``ray.data.llm`` so its users feel at home::

    processor = build_processor(ProcessorConfig(model_source=..., pipeline={"stages": 2}),
                                preprocess=..., postprocess=...)
    out = processor(ray.data.read_json("prompts.jsonl"))

How it runs: ``preprocess`` and ``postprocess`` are Ray Data ``map`` steps. Between them, a
``map_batches`` step runs on ``concurrency`` replicas. A replica is an actor of that step
that owns one :class:`~distlayer.model.DistModel`, a whole pipeline whose stage actors run
in the same Ray cluster: data parallel across replicas, pipeline parallel inside each. A
replica asks Ray for nothing itself; its stages ask for their CPUs and GPUs. Each replica
exports its stages' series to Ray's metrics (``metrics.RayExport``). Each replica
takes two batches of ``batch_size`` rows at a time and feeds every row to the model's
scheduler at once, so rows join and leave the running batch as they finish, as in
``distlayer run``; the rows it holds are bounded by those two batches, so memory stays flat
however long the dataset is.

Rows in: ``prompt`` (text) or ``messages`` (chat; the tokenizer's template is applied; a
row with both, such as a prompt column a ``preprocess`` turned into messages, is chat),
and optionally ``sampling_params``, a mapping of ``GenerationConfig`` fields for that row
(``temperature`` 0 is greedy). Every column is kept. Rows out add ``generated_text``,
``num_generated_tokens``, ``num_input_tokens``, ``finish_reason`` and ``error`` (a
sentence for a row that cannot run, else None). Without ``should_continue_on_error`` the
first bad row fails the dataset with that sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from . import devices
from .config import GenerationConfig, PipelineConfig, build, rows_set_by, temperature_settings
from .errors import ConfigError, DistlayerError
from .prompts import NoChatTemplate, check_prompt, context_error, model_context, tokenize
from .metrics import RayExport
from .smollm import model_name

CALLS_PER_REPLICA = 2  # batches a replica works on at once: the next one joins while the last rows finish
DATA_CPUS = 1.0        # CPUs per cluster left to Ray Data's own tasks (reading, preprocess, postprocess, writing)
MIN_STAGE_CPUS = 0.1   # the least CPU share a stage is given by default: below it the cluster is too small
OUTPUTS = ("generated_text", "num_generated_tokens", "num_input_tokens", "finish_reason", "error")


@dataclass
class ProcessorConfig:
    """What :func:`build_processor` builds.

    Attributes:
        model_source: a model dir, a Hugging Face repo id, a GGUF file or a layer store.
        pipeline: ``PipelineConfig`` fields for each replica's pipeline (``stages``,
            ``memory_per_stage``, ...). ``cpus_per_stage`` defaults to an equal share of
            the cluster's CPUs, less one CPU left to Ray Data's own tasks.
        batch_size: rows per batch handed to a replica, and the rows its pipeline runs at once.
        concurrency: replicas, each a whole pipeline.
        should_continue_on_error: a bad row gets an ``error`` sentence instead of failing the dataset.
        generation: default ``GenerationConfig`` fields for every row (a row's
            ``sampling_params`` override them).
    """

    model_source: str
    pipeline: dict = field(default_factory=dict)
    batch_size: int = 16
    concurrency: int = 1
    should_continue_on_error: bool = False
    generation: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.model_source, str) or not self.model_source:
            raise ConfigError(f"model_source: got {self.model_source!r}; give a model dir, repo id or GGUF file")
        for key in ("batch_size", "concurrency"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: got {value!r}; use a whole number of 1 or more")
        if not isinstance(self.should_continue_on_error, bool):
            raise ConfigError(f"should_continue_on_error: got {self.should_continue_on_error!r}; use true or false")
        for key in ("pipeline", "generation"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: got {getattr(self, key)!r}; use a mapping of its fields")
        self.pipeline = rows_set_by("batch_size", self.pipeline)
        self.pipeline_config()  # every field checked now, before anything starts
        build(GenerationConfig, dict(self.generation), "generation.", "key")

    def pipeline_fields(self) -> dict:
        """The ``PipelineConfig`` fields given, with ``max_rows``: a replica's pipeline runs a batch's rows at once."""
        return {**self.pipeline, "max_rows": self.batch_size}

    def pipeline_config(self) -> PipelineConfig:
        return build(PipelineConfig, self.pipeline_fields(), "pipeline.", "key")


class Processor:
    """A dataset in, a dataset out (see the module docstring); made by :func:`build_processor`."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable | None, postprocess: Callable | None):
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess

    def __call__(self, dataset):
        replica = self.replica_args()
        if self.preprocess is not None:
            pre = self.preprocess
            dataset = dataset.map(lambda row: {**row, **pre(row)})
        c = self.config
        dataset = dataset.map_batches(
            Replica, batch_size=c.batch_size, batch_format="pandas", num_cpus=0, num_gpus=0,
            **replicas(c.concurrency),
            fn_constructor_kwargs=replica)
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess)
        return dataset

    def replica_args(self) -> dict:
        """The :class:`Replica` arguments each replica is built with: the layer store's path
        and its pipeline's settings, which run ``batch_size`` rows at once. ``concurrency``
        pipelines and Ray Data's own tasks fit the cluster's CPUs, GPUs and memory, or a
        ``ConfigError`` says what to change before anything starts. The model is split here,
        once, if it has no layer store yet (replicas only read it)."""
        from .pipeline import RayStages, layout_for
        from .smollm import resolve_model
        from .store import open_configured

        c = self.config
        cfg = c.pipeline_config()
        if cfg.runs_in_process:
            raise ConfigError("pipeline.stages 0 (in-process) cannot run in a Ray Data replica: give 1 or more stages")
        store = open_configured(resolve_model(c.model_source), cfg, progress=False)
        ray = RayStages.connect(cfg)
        res = ray.cluster_resources()
        gpus, cpus, memory = res.get("GPU", 0), res.get("CPU", 0), res.get("memory", 0)
        layout = layout_for(cfg, gpus / c.concurrency)  # each pipeline's share of the GPUs
        device, n = layout.device, layout.stages
        stages = n * c.concurrency
        share = cfg.cpus_per_stage or min(1.0, math.floor(max(0.0, cpus - DATA_CPUS) / stages * 100) / 100)
        budgets = cfg.budgets(n)
        held = 0  # weights in host memory per pipeline (a GPU pipeline's are on its GPUs)
        if devices.kind_of(device).host:
            held = sum(budgets) if all(budgets) else store_bytes(store.path)
        short = []
        if share < MIN_STAGE_CPUS or stages * share > cpus - DATA_CPUS + 1e-6:
            short.append(f"{stages} stages need {max(share, MIN_STAGE_CPUS):g} CPUs each and {DATA_CPUS:g} is left to "
                         f"Ray Data's tasks, but the cluster has {cpus:g} CPUs")
        if devices.kind_of(device).ray_resource == "GPU" and stages * (cfg.gpus_per_stage or 1) > gpus + 1e-6:
            short.append(f"{stages} stages need {cfg.gpus_per_stage or 1:g} GPU each, but the cluster has {gpus:g}")
        if memory and c.concurrency * held > memory:
            short.append(f"each pipeline holds {held / 2**30:.2f} GiB of weights in host memory, but Ray has "
                         f"{memory / 2**30:.2f} GiB for all {c.concurrency}")
        if short:
            raise ConfigError(f"{c.concurrency} pipelines of {n} stages do not fit this Ray cluster ({'; '.join(short)}): "
                              "lower concurrency or pipeline.stages, give pipeline.memory_per_stage, or add nodes")
        pipeline = {**c.pipeline_fields(), "stages": n, "cpus_per_stage": share, "address": None,
                    "shards_dir": None}
        return dict(model_source=str(store.path), pipeline=pipeline, generation=c.generation,
                    continue_on_error=c.should_continue_on_error)


def store_bytes(path) -> int:
    """Bytes of a layer store's shard files."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def replicas(n: int) -> dict:
    """``map_batches`` arguments for ``n`` replicas taking :data:`CALLS_PER_REPLICA` batches at once,
    in the words of the installed Ray Data (newer releases name the calls per actor)."""
    import inspect

    from ray.data import ActorPoolStrategy

    if "max_concurrent_calls_per_actor" in inspect.signature(ActorPoolStrategy).parameters:
        return {"compute": ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=CALLS_PER_REPLICA)}
    return {"concurrency": n, "max_concurrency": CALLS_PER_REPLICA}


def build_processor(config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """A :class:`Processor`: call it on a Ray dataset to get the completed dataset.

    Args:
        config: the model, its pipeline, the replicas and the batch size.
        preprocess: row -> the fields to add (``prompt`` or ``messages``, ``sampling_params``);
            the row's own columns are kept.
        postprocess: row (every column, the outputs included) -> the row to keep.
    """
    if not isinstance(config, ProcessorConfig):
        raise ConfigError(f"build_processor needs a ProcessorConfig, got {type(config).__name__}")
    for name, fn in (("preprocess", preprocess), ("postprocess", postprocess)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name}: got {fn!r}; give a function of a row")
    return Processor(config, preprocess, postprocess)


# --------------------------------------------------------------------------- the replica


def plain(value: Any) -> Any:
    """A row value as plain Python: Arrow and pandas hand lists as numpy arrays, numbers as
    numpy scalars, and a mapping's keys missing in this row as None (dropped here)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class Replica:
    """One pipeline of a :class:`Processor`: the ``map_batches`` callable."""

    def __init__(self, model_source: str, pipeline: dict, generation: dict, continue_on_error: bool):
        from .model import AutoModel

        self.model = AutoModel.from_pretrained(model_source, progress=False, **pipeline)
        self.defaults, self.continue_on_error = generation, continue_on_error
        self.context = model_context(self.model.config)
        self.exported = RayExport(self.model, model_name(model_source))  # stage series on Ray's metrics

    def __call__(self, batch):
        prepared = [self._prepare(row) for row in batch.to_dict("records")]
        requests = iter(self.model.scheduler.submit_many([p[0] for p in prepared if p[0] is not None]))
        out = {key: [] for key in OUTPUTS}
        for work, n_input, error in prepared:
            request = next(requests) if work is not None else None
            if request is not None:
                try:
                    request.result()
                except DistlayerError as e:  # the pipeline failed past recovery: Ray Data retries the batch
                    raise DistlayerError(f"a replica's pipeline failed: {e}") from e
            done = request is not None
            out["generated_text"].append(request.text if done else None)
            out["num_generated_tokens"].append(len(request.tokens) if done else 0)
            out["num_input_tokens"].append(n_input)
            out["finish_reason"].append(request.finish_reason if done else None)
            out["error"].append(error)
        self.exported.tick()
        return batch.assign(**out)

    def _prepare(self, row: dict):
        """One row's ``((tokens, settings), input tokens, None)``, or ``(None, input tokens,
        the error sentence)`` for a row that cannot run (raised without continue_on_error).
        The batch's rows are then queued at once, so the scheduler admits them as one
        batch rather than one prefill per row as they trickle in."""
        n_input = 0
        try:
            messages = plain(row.get("messages"))  # a preprocess that writes messages beside a prompt column: chat
            prompt = plain(row.get("prompt")) if messages is None else None
            prompt, messages, error = check_prompt(prompt, messages)
            if error:
                raise ConfigError(error)
            sampling = plain(row.get("sampling_params")) or {}
            if not isinstance(sampling, dict):
                raise ConfigError(f"sampling_params: got {sampling!r}; use a mapping of generation settings")
            sampling = {**self.defaults, **sampling}
            if "temperature" in sampling:
                sampling.update(temperature_settings(sampling.pop("temperature")))
            settings = self.model.generation_settings(**sampling)
            try:
                tokens = tokenize(prompt, messages, self.model.tokenizer, settings.chat_template)
            except NoChatTemplate as e:
                raise ConfigError(f'{e}: give rows a "prompt", and chat_template False in generation') from None
            n_input = len(tokens)
            error = context_error(n_input, settings.max_new_tokens, self.context, "sampling_params.max_new_tokens")
            if error:
                raise ConfigError(error)
            return (tokens, settings), n_input, None
        except (ConfigError, ValueError, TypeError) as e:
            if not self.continue_on_error:
                raise ConfigError(f"{e} (set should_continue_on_error to keep going past bad rows)") from None
            return None, n_input, str(e)

    def __del__(self):
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


__all__ = ["ProcessorConfig", "Processor", "build_processor"]
