"""Job-file settings: plain dataclasses, loaded from YAML and checked in ``__post_init__``.

A job file looks like::

    model: default                 # HF repo id, local dir, .gguf, or "default" (SmolLM2-135M-Instruct)
    input: prompts.jsonl           # relative paths are relative to the job file
    output: results.jsonl
    batch_size: 8
    pipeline: {stages: 2, memory_per_stage: 2GiB}
    generation: {max_new_tokens: 64, chat_template: true, stop: ["\\n\\n"]}

Every error names the key and the bad value; an unknown key is rejected with the
closest valid name suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .planner import parse_bytes

COMPRESSIONS = (None, "8bit", "4bit")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(key: str, value, want: str) -> ConfigError:
    return ConfigError(f"{key}: got {value!r} ({type(value).__name__}); {want}")


def _check_int(key: str, value, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise _bad(key, value, "write a whole number" + (f" of at least {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise _bad(key, value, f"use {minimum} or more")


def _check_str(key: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _bad(key, value, "write a non-empty text value")


@dataclass
class PipelineConfig:
    """Where and how the model runs (the ``pipeline:`` section).

    Attributes:
        stages: pipeline stages; None: one per GPU, else 1; 0: in-process, no Ray.
        memory_per_stage: weight budget per stage (``"2GiB"``, bytes, or a list per stage); None: no limit.
        compression: None, ``"8bit"`` or ``"4bit"``.
        address: None for a local Ray, ``"auto"`` or ``"host:port"`` to join a cluster.
        dtype: compute dtype name (``bfloat16``…); None: the checkpoint's.
        shards_dir: where the per-layer shards live; None: next to the model.
    """

    stages: int | None = None
    memory_per_stage: Any = None
    compression: str | None = None
    address: str | None = None
    dtype: str | None = None
    shards_dir: str | None = None

    def __post_init__(self):
        p = "pipeline."
        _check_int(p + "stages", self.stages, minimum=0, optional=True)
        values = self.memory_per_stage if isinstance(self.memory_per_stage, list) else [self.memory_per_stage]
        for v in values:
            if isinstance(v, bool) or not (v is None or isinstance(v, (int, float, str))):
                raise _bad(p + "memory_per_stage", self.memory_per_stage, "write a size such as 2GiB, or a list of sizes")
            try:
                n = parse_bytes(v)
            except ValueError as e:
                raise ConfigError(f"{p}memory_per_stage: {e}") from None
            if n is not None and n <= 0:
                raise _bad(p + "memory_per_stage", v, "use a positive size such as 2GiB")
        if isinstance(self.memory_per_stage, list) and self.stages is not None \
                and len(self.memory_per_stage) != max(self.stages, 1):
            raise ConfigError(f"{p}memory_per_stage has {len(self.memory_per_stage)} entries but {p}stages is "
                              f"{self.stages}: give one size per stage, or a single size for all")
        if self.compression not in COMPRESSIONS:
            raise _bad(p + "compression", self.compression, "use 8bit, 4bit, or leave it out")
        _check_str(p + "address", self.address, optional=True)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise _bad(p + "dtype", self.dtype, f"use one of {', '.join(DTYPES)}, or leave it out")
        _check_str(p + "shards_dir", self.shards_dir, optional=True)


@dataclass
class GenerationConfig:
    """How each completion is generated (the ``generation:`` section).

    Attributes:
        max_new_tokens: most tokens per completion.
        do_sample: False for greedy decoding (reproducible).
        temperature, top_k, top_p: sampling filters; None: the model's generation_config.
        seed: sampling seed (each batch restarts from it, so reruns reproduce).
        stop: texts that end a completion; the text is cut before the first one.
        chat_template: wrap each ``prompt`` as a user message and apply the model's chat
            template (``messages`` records always get it).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    chat_template: bool = False

    def __post_init__(self):
        g = "generation."
        _check_int(g + "max_new_tokens", self.max_new_tokens, minimum=1)
        for key in ("do_sample", "chat_template"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(g + key, getattr(self, key), "write true or false")
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature <= 0):
            raise _bad(g + "temperature", self.temperature, "use a number above 0, such as 0.7")
        _check_int(g + "top_k", self.top_k, minimum=0, optional=True)
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise _bad(g + "top_p", self.top_p, "use a number in (0, 1], such as 0.9")
        _check_int(g + "seed", self.seed, optional=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise _bad(g + "stop", self.stop, "write a list of non-empty texts, such as [\"\\n\\n\"]")


@dataclass
class JobConfig:
    """A batch job: JSONL prompts in, JSONL results out.

    Attributes:
        model: HF repo id, local dir, ``.gguf`` file, or ``"default"`` for the embedded SmolLM2.
        input: JSONL of ``{"id", "prompt"}`` or ``{"id", "messages"}``.
        output: JSONL results, appended and resumed.
        batch_size: prompts per batch (grouped by length).
        pipeline: see :class:`PipelineConfig`.
        generation: see :class:`GenerationConfig`.
    """

    model: str
    input: str
    output: str
    batch_size: int = 8
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        for key in ("model", "input", "output"):
            _check_str(key, getattr(self, key))
        _check_int("batch_size", self.batch_size, minimum=1)
        if isinstance(self.pipeline, dict):
            self.pipeline = _build(PipelineConfig, self.pipeline, "pipeline.")
        if isinstance(self.generation, dict):
            self.generation = _build(GenerationConfig, self.generation, "generation.")
        if not isinstance(self.pipeline, PipelineConfig):
            raise _bad("pipeline", self.pipeline, "write a mapping such as {stages: 2}")
        if not isinstance(self.generation, GenerationConfig):
            raise _bad("generation", self.generation, "write a mapping such as {max_new_tokens: 64}")
        if Path(self.input).expanduser().resolve() == Path(self.output).expanduser().resolve():
            raise ConfigError(f"output: {self.output!r} is the input file too: write results to another file")

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> "JobConfig":
        """Build a checked config from a parsed job file.

        Args:
            data: the mapping read from YAML.
            base_dir: relative ``input``, ``output``, ``pipeline.shards_dir`` and local
                ``model`` paths are taken relative to it (the job file's folder).

        Raises:
            ConfigError: a key is unknown, missing or has a bad value.
        """
        if not isinstance(data, dict):
            raise _bad("job file", data, "write a mapping with keys model, input, output")
        data = dict(data)
        if base_dir is not None:
            base = Path(base_dir)
            for key in ("input", "output"):
                if isinstance(data.get(key), str):
                    data[key] = str(base / Path(data[key]).expanduser())
            model = data.get("model")
            if isinstance(model, str) and not Path(model).expanduser().is_absolute() and (base / model).exists():
                data["model"] = str(base / model)
            pipe = data.get("pipeline")
            if isinstance(pipe, dict) and isinstance(pipe.get("shards_dir"), str):
                data["pipeline"] = {**pipe, "shards_dir": str(base / Path(pipe["shards_dir"]).expanduser())}
        return _build(cls, data, "")


# Names users bring from other tools, mapped to ours (checked before difflib's guess).
_ALIASES = {"stop_strings": "stop", "max_tokens": "max_new_tokens", "chat": "chat_template",
            "num_stages": "stages", "memory": "memory_per_stage", "torch_dtype": "dtype"}


def _build(cls, data, prefix: str):
    """``cls(**data)``, rejecting unknown keys (with a suggestion) and missing required ones."""
    if not isinstance(data, dict):
        raise _bad(prefix.rstrip(".") or "job file", data, "write a mapping of key: value")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            alias = _ALIASES.get(str(key))
            close = [alias] if alias in fields else difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{prefix}{key}': {hint}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}': add `{name}: ...` to the job file")
    return cls(**data)


def load_job_config(path: str | os.PathLike) -> JobConfig:
    """Read and check a YAML job file.

    Args:
        path: the job file.

    Returns:
        The checked :class:`JobConfig`, with relative paths resolved against the file's folder.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or has a bad key or value.
    """
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"job file {path} cannot be read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return JobConfig.from_dict(data if data is not None else {}, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
