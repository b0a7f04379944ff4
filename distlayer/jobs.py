"""Batch jobs: JSONL prompts in, JSONL results out as each prompt finishes, resumable.

Input lines are ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}``.
Each output line is one id: ``{"id", "text", "prompt_tokens", "completion_tokens",
"finish_reason", "seconds"}``, or ``{"id", "line", "error"}`` for a record that cannot
run. Lines are flushed and fsynced as written.

The prompts run on the scheduler (``scheduler.py``), ``batch_size`` rows at a time: a row
leaves as soon as it stops and the next prompt joins the running batch at once, so the
pipeline stays full instead of waiting, batch after batch, for each batch's longest row.

Resume: the prompts are sorted by token length and cut into segments of
:data:`SEGMENT_BATCHES` batches, a pure function of the input file and ``batch_size``.
A segment is queued on an idle scheduler all at once, so which rows share each step
depends only on the segment, never on timing. A rerun skips every id already in the
output; a segment that was only partly written is run again whole and only its missing
ids are written, so every completion is computed exactly as in an uninterrupted run:
greedy text is identical, and so is seeded sampling (each prompt has its own generator).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import JobConfig, load_job_config
from .errors import ConfigError, OutputError
from .metrics import RayExport
from .prompts import NoChatTemplate, check_prompt, context_error, model_context, tokenize
from .scheduler import Scheduler
from .smollm import model_name

SEGMENT_BATCHES = 8  # batches of prompts per segment: a partly written segment runs again whole


@dataclass
class Record:
    """One input line. ``error`` is set when the line cannot run."""

    line: int
    id: Any = None
    prompt: str | None = None
    messages: list | None = None
    error: str | None = None
    tokens: list[int] | None = None

    @property
    def key(self) -> str:
        """Identity in the output (see :func:`record_key`)."""
        return record_key(self.id, self.line)


@dataclass
class JobSummary:
    """What :func:`run_job` did."""

    output: str
    total: int                 # records in the input
    skipped: int               # already in the output before this run
    completed: int             # completions written by this run
    errors: int                # error records written by this run
    completion_tokens: int
    seconds: float
    repaired: bool = False     # a half-written last line was cut off



def record_key(id_, line: int) -> str:
    """Identity of a record in the output: its id, or its line number when it has none."""
    return f"line:{line}" if id_ is None else json.dumps(id_, sort_keys=True)


# --------------------------------------------------------------------------- reading input


def _check_fields(obj) -> tuple[Any, str | None, list | None, str | None]:
    """(id, prompt, messages, error) of one parsed line."""
    if not isinstance(obj, dict):
        return None, None, None, f"a record must be a JSON object, got {type(obj).__name__}"
    id_ = obj.get("id")
    if isinstance(id_, bool) or not isinstance(id_, (str, int)) or id_ == "":
        bad = "missing id" if id_ is None else f"id {id_!r} must be a non-empty string or a whole number"
        return None, None, None, f"{bad}: give every record an \"id\""
    return (id_, *check_prompt(obj.get("prompt"), obj.get("messages")))


def parse_line(raw: bytes, line: int) -> Record:
    """Parse one input line; problems become ``Record.error``, never exceptions."""
    try:
        text, utf8_error = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, utf8_error = raw.decode("utf-8", errors="replace"), f"line {line} is not valid UTF-8 ({e.reason} at byte {e.start}): save the file as UTF-8"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Record(line, error=utf8_error or f"line {line} is not valid JSON ({e})")
    id_, prompt, messages, error = _check_fields(obj)
    return Record(line, id_, prompt, messages, utf8_error or error)


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read the input JSONL (blank lines skipped) and reject duplicate ids.

    Raises:
        ConfigError: the file is unreadable, or an id appears more than once.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"input {path} does not exist: check the job's `input:` path") from None
    except OSError as e:
        raise ConfigError(f"input {path} cannot be read ({e.strerror}): check the job's `input:` path") from None
    records = [parse_line(raw, i + 1) for i, raw in enumerate(data.split(b"\n")) if raw.strip()]
    seen: dict[str, list[int]] = {}
    for r in records:
        if r.id is not None:
            seen.setdefault(r.key, []).append(r.line)
    dups = [(k, lines) for k, lines in seen.items() if len(lines) > 1]
    if dups:
        shown = "; ".join(f"id {k} on lines {', '.join(map(str, ls))}" for k, ls in dups[:5])
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise ConfigError(f"duplicate ids in {path}: {shown}{more}: give every record its own id")
    return records


# --------------------------------------------------------------------------- writing output


class ResultWriter:
    """Append-only JSONL output: knows which ids are done, repairs a torn last line.

    Raises:
        ConfigError: the output cannot be created, or an earlier line is damaged.
        OutputError: a write fails (the disk is full); the torn line is taken back.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fix = "choose a writable path for the job's `output:`"
        if self.path.is_dir():
            raise ConfigError(f"output {self.path} is a directory: {fix}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise ConfigError(f"output {self.path} cannot be written ({e.strerror}): {fix}") from None
        self.done: set[str] = set()
        self.repaired = self._scan()

    def _scan(self) -> bool:
        with open(self.fd, "rb", closefd=False) as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1
        repaired = cut < len(data)
        if repaired:  # killed mid-line: drop the fragment, its id runs again
            os.ftruncate(self.fd, cut)
            os.fsync(self.fd)
        for i, raw in enumerate(data[:cut].split(b"\n")[:-1]):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                self.done.add(record_key(rec.get("id"), rec.get("line", 0)))
            except (ValueError, AttributeError):
                raise ConfigError(f"output {self.path} line {i + 1} is not a JSON record: fix or delete that "
                                  "line, or write to a new output file") from None
        return repaired

    def write(self, rec: dict) -> None:
        """Append one record, flushed and fsynced."""
        try:
            data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from the input
            data = (json.dumps(rec) + "\n").encode("ascii")
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:  # the disk filled up: take back the part line, so nothing is torn
            os.ftruncate(self.fd, start)
            raise OutputError(f"cannot write to output {self.path} ({e.strerror}): free some disk space (or choose "
                              "another `output:`) and run the job again; it resumes after the last full line, and "
                              "every record already written stays") from None
        self.done.add(record_key(rec.get("id"), rec.get("line", 0)))

    def close(self) -> None:
        """Close the output file."""
        os.close(self.fd)


# --------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal, plain periodic log lines otherwise, or nothing.

    Args:
        total: prompts to do.
        mode: ``"bar"``, ``"log"`` or ``"off"``.
        interval: seconds between log lines.
    """

    def __init__(self, total: int, mode: str, interval: float = 10.0):
        self.total, self.mode, self.interval = total, mode, interval
        self.done = self.tokens = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="prompt", desc="distlayer run", file=sys.stderr, dynamic_ncols=True)

    def say(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif self.mode == "log":
            print(f"[distlayer] {msg}", file=sys.stderr, flush=True)

    def update(self, prompts: int, tokens: int) -> None:
        """Count finished prompts and their completion tokens."""
        self.done += prompts
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(prompts)
        elif self.mode == "log" and time.monotonic() - self.last >= self.interval and self.done < self.total:
            self.last = time.monotonic()
            self.say(self.line())

    def line(self) -> str:
        """One status line: prompts done, tokens/s, elapsed, ETA."""
        elapsed = time.monotonic() - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_s = "?" if eta != eta else f"{eta:.0f}s"
        return f"{self.done}/{self.total} prompts, {rate:.1f} tokens/s, elapsed {elapsed:.0f}s, ETA {eta_s}"

    def close(self) -> None:
        """Close the bar (leaves its last state on screen)."""
        if self.bar is not None:
            self.bar.close()


def _progress_mode(progress: bool | str | None) -> str:
    if progress is None:
        return "bar" if sys.stderr.isatty() else "log"
    if isinstance(progress, str):
        return progress
    return "bar" if progress else "off"


# --------------------------------------------------------------------------- running


def plan_segments(records: list[Record], batch_size: int) -> list[list[Record]]:
    """Sort by token length (stable, so rows that share steps need little padding) and cut
    into segments of ``SEGMENT_BATCHES * batch_size`` prompts."""
    ordered = sorted(records, key=lambda r: (len(r.tokens), r.line))
    size = SEGMENT_BATCHES * batch_size
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def run_segment(scheduler: Scheduler, segment: list[Record], settings):
    """Run a segment on an idle scheduler; yields ``(record, result)`` as each finishes."""
    done: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    requests = scheduler.submit_many([(r.tokens, settings) for r in segment])
    for record, request in zip(segment, requests):
        request.listeners.append(lambda kind, value, pair=(record, request): kind != "token" and done.put(pair))
        if request.done:  # finished before its listener was added
            done.put((record, request))
    seen = set()
    while len(seen) < len(segment):
        record, request = done.get()
        if record.key in seen:
            continue
        seen.add(record.key)
        request.result()  # raises the request's error
        yield record, {"id": record.id, "text": request.text, "prompt_tokens": len(record.tokens),
                       "completion_tokens": len(request.tokens), "finish_reason": request.finish_reason,
                       "seconds": round(time.perf_counter() - t0, 4)}


def _open_store(cfg: JobConfig, show_split: bool):
    """The job's layer store (split first if needed) and its tokenizer; no weights are loaded."""
    from .model import load_tokenizer
    from .smollm import resolve_model
    from .store import open_configured

    p = cfg.pipeline
    store = open_configured(resolve_model(cfg.model), p, progress=show_split)
    return store, load_tokenizer(store.path)


def _load_model(cfg: JobConfig, store, batch_size: int, context: int):
    """The model, planned for the job's largest batch and sequence, so a ``memory_per_stage``
    budget also covers their KV cache and activations."""
    from .model import DistModel

    pipe = dataclasses.replace(cfg.pipeline, shards_dir=None, max_rows=batch_size, context=context)
    return DistModel.load(store.path, pipe, progress=False)


def _error(r: Record) -> dict:
    return {"id": r.id, "line": r.line, "error": r.error}


def run_job(path_or_config: str | os.PathLike | JobConfig | dict, progress: bool | str | None = None) -> JobSummary:
    """Run a batch job: every input record gets exactly one output line.

    Everything that can be checked without the model (job file, input, duplicate ids,
    output path) is checked before the model is loaded. Bad records get an error
    record and the job goes on.

    Args:
        path_or_config: a YAML job file, a :class:`JobConfig`, or a dict with its keys.
        progress: None: a bar on a terminal, log lines otherwise; True: bar; False: silent.

    Returns:
        A :class:`JobSummary`.

    Raises:
        ConfigError: bad job file, unreadable input, duplicate ids, unwritable output.
        OutputError: the output's disk filled up; run the job again once there is room.
    """
    if isinstance(path_or_config, JobConfig):
        cfg = path_or_config
    elif isinstance(path_or_config, dict):
        cfg = JobConfig.from_dict(path_or_config)
    else:
        cfg = load_job_config(path_or_config)
    t0 = time.monotonic()
    records = read_records(cfg.input)
    writer = ResultWriter(cfg.output)
    summary = JobSummary(str(cfg.output), len(records), 0, 0, 0, 0, 0.0, writer.repaired)
    mode = _progress_mode(progress)
    model = bar = None
    try:
        pending = [r for r in records if r.key not in writer.done]
        summary.skipped = len(records) - len(pending)
        for r in pending:
            if r.error:
                writer.write(_error(r))
                summary.errors += 1
        pending = [r for r in pending if not r.error]
        say = Progress(0, "log" if mode == "bar" else mode).say
        if writer.repaired:
            say(f"repaired {cfg.output}: removed a half-written last line")
        if summary.skipped:
            say(f"resuming: {summary.skipped} of {len(records)} records already in {cfg.output}")
        if not pending:
            return summary
        store, tokenizer = _open_store(cfg, mode == "bar")
        valid = _tokenize_all([r for r in records if not r.error], tokenizer, store.config, cfg, writer, summary)
        if not valid:
            return summary
        rows = min(cfg.batch_size, len(valid))
        context = max(len(r.tokens) for r in valid) + cfg.generation.max_new_tokens
        model = _load_model(cfg, store, rows, context)
        settings = model.generation_settings(**dataclasses.asdict(cfg.generation))
        bar = Progress(sum(r.key not in writer.done for r in valid), mode)
        bar.say(f"{bar.total} prompts to run, {rows} at a time")
        exported = RayExport(model, model_name(cfg.model))  # the stage series, on Ray's metrics endpoint
        for segment in plan_segments(valid, cfg.batch_size):
            if all(r.key in writer.done for r in segment):
                continue
            for r, res in run_segment(model.scheduler, segment, settings):
                if r.key in writer.done:
                    continue
                writer.write(res)
                summary.completed += 1
                summary.completion_tokens += res["completion_tokens"]
                bar.update(1, res["completion_tokens"])
                exported.tick()
        exported.now()
        if mode == "log":
            bar.say("done: " + bar.line())
        return summary
    finally:
        summary.seconds = round(time.monotonic() - t0, 3)
        if bar is not None:
            bar.close()
        if model is not None:
            model.close()
        writer.close()


def _tokenize_all(records: list[Record], tokenizer, config, cfg: JobConfig, writer: ResultWriter,
                  summary: JobSummary):
    """Tokenize every runnable record (done ones too: the batches must not depend on resume state).

    Records that fail (no chat template, longer than the context) get their error record.
    """
    if tokenizer is None:
        raise ConfigError(f"model {cfg.model} has no tokenizer files: a job needs a model with a tokenizer")
    context = model_context(config)
    valid = []
    for r in records:
        try:
            r.tokens = tokenize(r.prompt, r.messages, tokenizer, cfg.generation.chat_template)
            if not r.tokens:
                raise ValueError("the prompt has no tokens: write the prompt text")
            too_long = context_error(len(r.tokens), cfg.generation.max_new_tokens, context,
                                     "generation.max_new_tokens")
            if too_long:
                raise ValueError(too_long)
        except (ValueError, TypeError) as e:
            r.error = f'{e}: send "prompt" records with generation.chat_template: false' \
                if isinstance(e, NoChatTemplate) else str(e)
            if r.key not in writer.done:
                writer.write(_error(r))
                summary.errors += 1
            continue
        valid.append(r)
    return valid
