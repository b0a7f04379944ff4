"""Settings, one dataclass per concern, each checked once in ``__post_init__``.

- :class:`PipelineConfig`: where and how the model runs. ``AutoModel.from_pretrained``'s
  keywords, the job file's ``pipeline:`` section and the CLI's pipeline flags are its fields.
- :class:`GenerationConfig`: how tokens are picked and when a completion stops.
  ``generate()``'s keywords, the job file's ``generation:`` section, the CLI's generation
  flags and the sampler all use it.
- :class:`JobConfig`: a batch job (model, input, output, batch size and the two above).

A job file looks like::

    model: default                 # HF repo id, local dir, .gguf, or "default" (SmolLM2-135M-Instruct)
    input: prompts.jsonl           # relative paths are relative to the job file
    output: results.jsonl
    batch_size: 8
    pipeline: {stages: 2, memory_per_stage: 2GiB}
    generation: {max_new_tokens: 64, chat_template: true, stop: ["\\n\\n"]}

Every error names the key and the bad value; an unknown key is rejected with the closest
valid name suggested. No torch and no Ray here: importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devices
from .errors import ConfigError
from .planner import HOST_FRACTION, HOST_RESERVE, fmt_bytes
from .transport import NAMES as TRANSPORTS, delivers_waves

COMPRESSED = ("8bit", "4bit")      # the block-wise compressions a store can have
COMPRESSIONS = (None, *COMPRESSED)  # the compression setting's values (None: none)
# Accepted dtype names and the torch dtype each means.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
PLACEMENTS = ("pack", "spread")
BALANCES = ("auto", "speed", "bytes")  # how layers are split among the stages
BLOCKS = ("auto", "on", "off")  # whether streaming stages run a step's micro-batches as one block
DEVICES = tuple(devices.KINDS)  # the device kinds, by name (devices.KINDS)


def setting(help: str, cli: type | None = None, default: Any = None, aliases: tuple[str, ...] = (), **kw) -> Any:
    """A dataclass field with its help text. ``cli``: the type the command line parses its
    flag with (None: booleans get ``--x/--no-x``, others no flag); ``aliases``: more flags."""
    return field(default=default, metadata={"help": help, "cli": cli, "aliases": aliases}, **kw)


def spell(prefix: str, name: str, value: Any = ...) -> str:
    """A setting as the user writes it where they wrote their settings, ``prefix`` as
    :func:`build` takes it: ``--shards-dir DIR`` on the command line (``"--"``),
    ``pipeline.shards_dir: DIR`` in a job file (``"pipeline."``), ``shards_dir=DIR`` in
    Python (``""``). Without ``value``, the name alone."""
    if prefix == "--":
        key = "--" + name.replace("_", "-")
        return key if value is ... else f"{key} {value}"
    if prefix:
        return prefix + name if value is ... else f"{prefix}{name}: {value}"
    return name if value is ... else f"{name}={value!r}"


def leave_out(prefix: str, name: str) -> str:
    """How to unset a setting there (see :func:`spell`): ``leave out --address``, ``leave
    pipeline.address out``, ``pass address=None``."""
    if prefix == "--":
        return f"leave out {spell(prefix, name)}"
    return f"leave {prefix}{name} out" if prefix else f"pass {name}=None"


def parse_bytes(value: int | float | str | None) -> int | None:
    """Parse ``"4GiB"``, ``"512MB"``, ``"1.5G"`` or a number of bytes.

    Raises:
        ValueError: not a byte size (text that does not parse, a bool, infinity, NaN).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a byte size; write it like 4GiB, 512MiB or 2000000000")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a byte size; write a finite size like 4GiB")
        return int(value)
    text = value.strip().replace(" ", "")
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6,
             "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
    num = text.rstrip("KMGTBibkmgt")
    suffix = text[len(num):].upper()
    try:
        number = float(num)
        if suffix not in units or not math.isfinite(number):
            raise ValueError
        return int(number * units[suffix])
    except ValueError:
        raise ValueError(f"{value!r} is not a byte size; write it like 4GiB, 512MiB or 2000000000") from None


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``"host:port"`` or ``"ray://host:port"``, or None if it is not one."""
    host, sep, port = str(address).removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ "):
        return None
    return host.strip("[]"), int(port)


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


def _check_bool(key: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _bad(key, value, "write true or false")


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join("none" if c is None else str(c) for c in choices)
        raise _bad(key, value, f"use one of {shown}")


def dtype_name(dtype) -> str | None:
    """The canonical name (``"bfloat16"``…) of a dtype name or ``torch.dtype``; None stays None.

    Raises:
        ConfigError: an unknown dtype.
    """
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.")
    if text not in DTYPES:
        raise _bad("dtype", dtype, f"use one of {', '.join(DTYPES)}, or leave it out for the checkpoint's")
    return DTYPES[text]


@dataclass
class PipelineConfig:
    """Where and how the model runs: ``from_pretrained``'s keywords, the job file's
    ``pipeline:`` section and the CLI's pipeline flags. Sizes are parsed to bytes here,
    once."""

    stages: int | None = setting(
        "pipeline stages; 0 runs one stage in this process without Ray (default: one per GPU, else 1)", int)
    memory_per_stage: Any = setting(
        "budget per stage for weights, KV cache and activations: a size like 2GiB, bytes, or a list per stage "
        "(default: 90%% of what each stage's device has free)", str)
    compression: str | None = setting(
        "block-wise compressed shards: 8bit or 4bit (each has its own store; default: none)", str)
    address: str | None = setting(
        'None: a private local Ray; "auto" or host:port: join a `ray start` cluster', str)
    dtype: str | None = setting("compute dtype: float32, float16 or bfloat16 (default: the checkpoint's)", str)
    shards_dir: str | None = setting("where the per-layer shards live (default: beside the model)", str)
    prefetch: bool = setting("stream units on a background thread ahead of use", default=True)
    device: str | None = setting("cpu or cuda (default: cuda when the cluster has GPUs)", str)
    in_process: bool = setting("run the stages in this process, one after another, without Ray", default=False)
    placement: str = setting("pack (fill one node first) or spread (one stage per node)", str, default="pack")
    balance: str = setting(
        "how layers are split among the stages: speed (measure each node, cached: compute, memory, disk and the "
        "links between nodes, and take the ranges the cost model predicts fastest, so a slow node gets fewer "
        "layers), bytes (by memory and bytes alone, nothing measured) or auto (speed when the stages are on more "
        "than one node, else bytes)", str, default="auto")
    stage_resources: list | None = setting('extra Ray resources per stage, e.g. [{"node_a": 1}, {"node_b": 1}]')
    cpus_per_stage: float | None = setting("Ray CPUs per stage (default: an equal share, at most 1)", float)
    threads_per_stage: int | None = setting(
        "torch threads per CPU stage (default: its node's cores, shared by the node's stages that work at once)", int)
    micro_batches: int | None = setting(
        "micro-batches per batch (default: one per device: per GPU stage, or per CPU node)", int)
    block_schedule: str = setting(
        "whether a stage that streams weights runs a step's micro-batches as one block, reading each streamed "
        "unit once for all of them instead of once each, at the cost of the stages' overlap within the step: on, "
        "off, or auto (by the measured rates where they were measured, else as the device kind does: on for GPUs, "
        "off for CPUs); the ray transport hands each micro-batch on alone, so it runs no blocks", str,
        default="auto")
    max_rows: int = setting("most sequences the pipeline runs at once; the budgets reserve KV cache for them "
                            "(with --context)", int, default=1)
    context: int | None = setting(
        "tokens per sequence (prompt + new) the budgets reserve KV cache and activations for", int)
    transport: str = setting(
        "hand-offs between stages: auto (socket between Ray actors, ray in one process), socket (stage-to-stage "
        "sockets: Unix sockets when the driver and every stage share a node, else TCP between the nodes' IPs) or "
        "ray (always Ray calls: object refs)", str, default="auto")
    hf_token: str | None = setting("token for gated Hugging Face repos")
    connect_timeout: float = setting("seconds to wait for a Ray cluster's address to answer before giving up",
                                     float, default=10.0)
    step_timeout: float = setting(
        "seconds the driver waits for one step's result (the bound on a step's work; a stopped or frozen stage is "
        "found sooner by its heartbeat, heartbeat_timeout) before it replaces a stage that died or stopped "
        "answering, or fails the step", float, default=600.0)
    heartbeat_timeout: float = setting(
        "seconds a Ray stage may leave the driver's heartbeat (about one a second, answered on a thread its work "
        "does not block) unanswered before it is taken for hung (stopped, frozen, cut off) and replaced",
        float, default=10.0)
    restart_timeout: float = setting(
        "seconds a replacement for a lost stage may take to start and load before the loss fails the requests "
        "in flight (a lost node's stage waits for room on another)", float, default=120.0)
    standby: int = setting(
        "spare stage processes kept running (libraries loaded, no weights), each in a bundle of its own with one "
        "stage's CPUs and GPU share: a lost stage's layers load into one at once instead of a new process "
        "starting (0: none)", int, default=0)
    max_restarts: int = setting(
        "stage replacements allowed within any 10 minutes before a lost stage fails the requests in flight "
        "(0: a lost stage fails them at once)", int, default=3)
    gpus_per_stage: float | None = setting(
        "Ray GPUs per stage on a GPU cluster: 1 gives each stage a GPU of its own; a fraction such as 0.25 puts "
        "four stages on one GPU, each with its own budget (default: 1)", float)
    host_memory_per_node: Any = setting(
        "pinned host memory per node for its GPU stages' streamed units, shared equally by them: a size like 16GiB "
        "or bytes; each stage reads the units that fit once, at start, and copies them to its GPU each step "
        f"instead of reading them from disk; 0 turns this off (default: {HOST_FRACTION * 100:g}%% of the node's "
        f"available RAM, less {fmt_bytes(HOST_RESERVE)})", str, aliases=("--host-memory",))
    # How the user named these settings, for messages (spell, leave_out): "--" from the CLI,
    # "pipeline." from a job file, "" from Python. Set by build; not a setting.
    messages_prefix: str = field(default="", repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self):
        p = "pipeline."
        _check_int(p + "stages", self.stages, minimum=0, optional=True)
        self.memory_per_stage = self._parse_budget(p + "memory_per_stage", self.memory_per_stage)
        try:
            self.host_memory_per_node = parse_bytes(self.host_memory_per_node)
        except ValueError as e:
            raise ConfigError(f"{p}host_memory_per_node: {e} (0 turns the pinned host tier off)") from None
        if self.host_memory_per_node is not None and self.host_memory_per_node < 0:
            raise _bad(p + "host_memory_per_node", self.host_memory_per_node,
                       "use a size of 0 or more, such as 16GiB (0 turns the pinned host tier off)")
        _check_choice(p + "compression", self.compression, COMPRESSIONS)
        _check_str(p + "address", self.address, optional=True)
        if self.address is not None and self.address != "auto" and parse_address(self.address) is None:
            raise _bad(p + "address", self.address, 'write "auto", host:port (such as 10.0.0.5:6379), or leave it '
                       "out for a private local Ray")
        try:
            self.dtype = dtype_name(self.dtype)
        except ConfigError as e:
            raise ConfigError(f"{p}{e}") from None
        if self.shards_dir is not None:
            _check_str(p + "shards_dir", self.shards_dir)
            self.shards_dir = os.fspath(self.shards_dir)
        for key in ("prefetch", "in_process"):
            _check_bool(p + key, getattr(self, key))
        if self.device is not None:
            _check_str(p + "device", self.device)
            _check_choice(p + "device", devices.type_of(self.device), DEVICES)
        _check_choice(p + "placement", self.placement, PLACEMENTS)
        _check_choice(p + "balance", self.balance, BALANCES)
        if isinstance(self.block_schedule, bool):  # YAML reads a bare on or off as true or false
            self.block_schedule = "on" if self.block_schedule else "off"
        _check_choice(p + "block_schedule", self.block_schedule, BLOCKS)
        _check_choice(p + "transport", self.transport, TRANSPORTS)
        if self.block_schedule == "on" and not delivers_waves(self.transport):
            raise ConfigError(f"{p}block_schedule is on but {p}transport is {self.transport}, which hands each "
                              f"micro-batch on by itself, so no stage could run a block: use transport auto or "
                              f"socket for the block schedule, or leave block_schedule at auto")
        if self.stage_resources is not None and not (
                isinstance(self.stage_resources, list) and all(isinstance(r, dict) for r in self.stage_resources)):
            raise _bad(p + "stage_resources", self.stage_resources, 'write a list of mappings, one per stage')
        if self.cpus_per_stage is not None and (not _is_number(self.cpus_per_stage) or self.cpus_per_stage <= 0):
            raise _bad(p + "cpus_per_stage", self.cpus_per_stage, "use a number above 0, such as 0.5")
        for key in ("threads_per_stage", "micro_batches", "context"):
            _check_int(p + key, getattr(self, key), minimum=1, optional=True)
        _check_int(p + "max_rows", self.max_rows, minimum=1)
        _check_str(p + "hf_token", self.hf_token, optional=True)
        for key in ("connect_timeout", "step_timeout", "heartbeat_timeout", "restart_timeout"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 < value < math.inf:
                raise _bad(p + key, value, f"use a number of seconds above 0, such as {PipelineConfig.__dataclass_fields__[key].default:g}")
        _check_int(p + "max_restarts", self.max_restarts, minimum=0)
        _check_int(p + "standby", self.standby, minimum=0)
        if self.gpus_per_stage is not None and (not _is_number(self.gpus_per_stage)
                                                or not 0 < self.gpus_per_stage <= 1):
            raise _bad(p + "gpus_per_stage", self.gpus_per_stage,
                       "use a number above 0 and at most 1, such as 0.25 for four stages per GPU")
        n = self.stage_count_given()
        for key, value in (("memory_per_stage", self.memory_per_stage), ("stage_resources", self.stage_resources)):
            if isinstance(value, list) and n is not None and len(value) != n:
                raise ConfigError(f"{p}{key} has {len(value)} entries but {p}stages is {self.stages}: "
                                  "give one per stage" + (", or a single size for all" if key[0] == "m" else ""))

    @staticmethod
    def _parse_budget(key: str, value):
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) and not value:
            raise _bad(key, value, "write a size such as 2GiB, or a list of sizes")
        out = []
        for v in value if isinstance(value, list) else [value]:
            try:
                n = parse_bytes(v)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            if n is not None and n <= 0:
                raise _bad(key, v, "use a positive size such as 2GiB")
            out.append(n)
        if isinstance(value, list):
            if None in out:
                raise _bad(key, value, "give a size for every stage")
            return out
        return out[0]

    def stage_count_given(self) -> int | None:
        """The number of stages the settings fix: ``stages`` (0 counts as one in-process
        stage), else the length of a per-stage list; None when the cluster decides."""
        if self.stages is not None:
            return max(self.stages, 1)
        for value in (self.memory_per_stage, self.stage_resources):
            if isinstance(value, list):
                return len(value)
        return 1 if self.in_process else None

    @property
    def runs_in_process(self) -> bool:
        """True when the stages run in this process (``stages=0`` or ``in_process``)."""
        return self.in_process or self.stages == 0

    def budgets(self, stages: int) -> list[int | None]:
        """One budget in bytes per stage; None where no size was given."""
        if isinstance(self.memory_per_stage, list):
            if len(self.memory_per_stage) != stages:
                raise ConfigError(f"memory_per_stage has {len(self.memory_per_stage)} entries but there are "
                                  f"{stages} stages: give one per stage")
            return list(self.memory_per_stage)
        return [self.memory_per_stage] * stages



def temperature_settings(temperature) -> dict:
    """Generation settings for an OpenAI-style ``temperature``: 0 is greedy, any other
    value samples at that temperature (as OpenAI and vLLM read it)."""
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
        return {"do_sample": False, "temperature": None}
    return {"do_sample": True, "temperature": temperature}

@dataclass
class GenerationConfig:
    """How each completion is generated: ``generate()``'s keywords, the job file's
    ``generation:`` section, the CLI's generation flags, and what the sampler reads.

    A None means "the model's own ``generation_config``, else transformers' default";
    :meth:`resolved` fills them in.
    """

    max_new_tokens: int = setting("most tokens per completion", int, default=64)
    min_new_tokens: int | None = setting("fewest tokens per completion (end-of-sequence is held back until then)",
                                         int)
    do_sample: bool | None = setting("sample instead of greedy decoding (default: the model's setting, else greedy)")
    temperature: float | None = setting("sampling temperature, above 0", float)
    top_k: int | None = setting("sample from the k likeliest tokens (0: off)", int)
    top_p: float | None = setting("nucleus sampling threshold in (0, 1]", float)
    repetition_penalty: float | None = setting("penalty above 0 for tokens already in the sequence (1: off)", float)
    no_repeat_ngram_size: int | None = setting("never repeat an n-gram of this size (0: off)", int)
    seed: int | None = setting("sampling seed: reruns reproduce", int)
    stop: list[str] = setting("text that ends a completion; the text is cut before it", str,
                              default=dataclasses.MISSING, default_factory=list)
    eos_token_id: int | list[int] | None = setting("token id(s) that end a completion (default: the model's)")
    pad_token_id: int | None = setting("token written after a row has stopped (default: the model's)")
    chat_template: bool = setting("apply the model's chat template to a prompt", default=False,
                                  aliases=("--chat",))

    def __post_init__(self):
        g = "generation."
        _check_int(g + "max_new_tokens", self.max_new_tokens, minimum=1)
        for key in ("min_new_tokens", "top_k", "no_repeat_ngram_size", "pad_token_id"):
            _check_int(g + key, getattr(self, key), minimum=0, optional=True)
        _check_bool(g + "do_sample", self.do_sample, optional=True)
        _check_bool(g + "chat_template", self.chat_template)
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature < 0
                                             or (self.do_sample and self.temperature == 0)):
            raise _bad(g + "temperature", self.temperature, "use a number above 0, such as 0.7")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise _bad(g + "top_p", self.top_p, "use a number in (0, 1], such as 0.9")
        if self.repetition_penalty is not None and (not _is_number(self.repetition_penalty)
                                                    or self.repetition_penalty <= 0):
            raise _bad(g + "repetition_penalty", self.repetition_penalty, "use a number above 0, such as 1.2")
        _check_int(g + "seed", self.seed, optional=True)
        if isinstance(self.stop, (str, tuple)):
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise _bad(g + "stop", self.stop, "write a list of non-empty texts, such as [\"\\n\\n\"]")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) or (isinstance(eos, (list, tuple)) and all(map(_is_int, eos)))):
            raise _bad(g + "eos_token_id", eos, "write a token id or a list of token ids")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise _bad(g + "min_new_tokens", self.min_new_tokens,
                       f"use at most max_new_tokens ({self.max_new_tokens})")

    @property
    def eos_ids(self) -> list[int]:
        """The end-of-sequence ids as a list."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if _is_int(eos) else list(eos)

    @property
    def needs_history(self) -> bool:
        """True when picking a token reads the tokens before it (repetition penalty,
        n-gram ban, a minimum length), so it cannot happen on the last stage alone."""
        return bool((self.repetition_penalty not in (None, 1.0)) or self.no_repeat_ngram_size
                    or (self.min_new_tokens and self.eos_ids))

    def resolved(self, model_defaults=None, model_config=None) -> "GenerationConfig":
        """A copy with every None filled: from ``model_defaults`` (the model's transformers
        ``GenerationConfig``), then ``model_config`` (eos and pad ids), then transformers'
        defaults (greedy, temperature 1)."""

        def model_value(name, *sources):
            return next((getattr(src, name) for src in sources if getattr(src, name, None) is not None), None)

        out = dataclasses.replace(self)
        for name, fallback in (("do_sample", False), ("temperature", 1.0), ("top_k", None), ("top_p", None),
                               ("repetition_penalty", None), ("no_repeat_ngram_size", None)):
            if getattr(out, name) is None:
                value = model_value(name, model_defaults)
                setattr(out, name, fallback if value is None else value)
        if out.eos_token_id is None:
            out.eos_token_id = model_value("eos_token_id", model_defaults, model_config)
        if out.pad_token_id is None:
            pad = model_value("pad_token_id", model_defaults, model_config)
            out.pad_token_id = pad if pad is not None else out.eos_ids[0] if out.eos_ids else 0
        if out.do_sample and not out.temperature > 0:
            raise _bad("generation.temperature", out.temperature, "use a number above 0 when sampling "
                       "(or do_sample=False)")
        return out

    def for_row(self, row: int) -> "GenerationConfig":
        """Row ``row`` of a batch: the same settings, seeded ``seed + row``, so rows with
        the same prompt sample differently and each row's text depends on its seed alone."""
        return dataclasses.replace(self, seed=None if self.seed is None else self.seed + row)


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
            self.pipeline = build(PipelineConfig, rows_set_by("the job's batch_size", self.pipeline), "pipeline.")
        if isinstance(self.generation, dict):
            self.generation = build(GenerationConfig, self.generation, "generation.")
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
        return build(cls, data, "")


# Settings renamed: new name -> its old names, still accepted with a FutureWarning.
RENAMED = {"max_rows": ("batch_size",)}  # PipelineConfig's: batch_size also meant a job's prompts per batch

# Names users bring from other tools, mapped to ours (checked before difflib's guess).
ALIASES = {"stop_strings": "stop", "max_tokens": "max_new_tokens", "chat": "chat_template",
           "num_stages": "stages", "memory": "memory_per_stage", "torch_dtype": "dtype",
           "layer_shards_saving_path": "shards_dir", "token": "hf_token"}


def build(cls, data, prefix: str, what: str = "key"):
    """``cls(**data)``, rejecting unknown keys (with the closest valid name) and missing
    required ones.

    Args:
        cls: a settings dataclass.
        data: its keys and values.
        prefix: prepended to names in messages (``"pipeline."``).
        what: what the keys are called in messages (``"key"``, ``"argument"``).
    """
    if not isinstance(data, dict):
        raise _bad(prefix.rstrip(".") or "job file", data, "write a mapping of key: value")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    data = renamed(data, fields, prefix)
    for key in data:
        if key not in fields:
            alias = ALIASES.get(str(key))
            close = [alias] if alias in fields else difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid {what}s: {', '.join(fields)}"
            raise ConfigError(f"unknown {what} '{prefix}{key}': {hint}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required {what} '{prefix}{name}': add `{name}: ...` to the job file")
    if any(f.name == "messages_prefix" for f in dataclasses.fields(cls)):
        data = {**data, "messages_prefix": prefix}
    return cls(**data)


def rows_set_by(owner: str, pipeline: dict) -> dict:
    """The ``pipeline`` mapping of a job or a Ray Data processor, whose own batch size
    (``owner``) sets its ``max_rows``: ``max_rows`` there is refused; its old name, which
    such a mapping could always hold and which never counted, is dropped with a warning."""
    import warnings

    if "max_rows" in pipeline:
        raise ConfigError(f"pipeline.max_rows: {owner} sets the rows the pipeline runs at once; leave "
                          "pipeline.max_rows out")
    for old in RENAMED["max_rows"]:
        if old in pipeline:
            warnings.warn(f"pipeline.{old} has no effect here: {owner} sets the rows the pipeline runs at once; "
                          f"leave pipeline.{old} out", FutureWarning, stacklevel=3)
            pipeline = {k: v for k, v in pipeline.items() if k != old}
    return pipeline


def renamed(data: dict, fields, prefix: str) -> dict:
    """``data`` with the old names of renamed settings (:data:`RENAMED`) given their new
    ones, each with a FutureWarning that says what to write instead."""
    import warnings

    for new, olds in RENAMED.items():
        for old in olds:
            if new not in fields or old in fields or old not in data:
                continue
            if new in data:
                raise ConfigError(f"{spell(prefix, old)} and {spell(prefix, new)} are the same setting (the old name "
                                  f"and the new): give only {spell(prefix, new)}")
            warnings.warn(f"{spell(prefix, old)} is now called {spell(prefix, new)}: write that instead (the old "
                          "name still works for now)", FutureWarning, stacklevel=4)
            data = {(new if k == old else k): v for k, v in data.items()}
    return data


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
        raise ConfigError(f"job file {path} cannot be read ({e}): check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return JobConfig.from_dict(data if data is not None else {}, base_dir=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
