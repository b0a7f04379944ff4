"""The driver's sequences: requests join and leave a running batch at any step.

A :class:`Scheduler` owns every request in flight. Its loop (one thread) keeps one
running batch per micro-batch slot (``Pipeline.micro_batches``: one per device that
works at once) and, each round, submits one step of every batch before it fetches any,
so all stages work at once:

- a request that arrives is prefilled as a batch of its own (with whatever else arrived
  at the same time, left-padded) and, at the next step boundary, joins a running batch:
  each stage appends its rows to that batch's KV cache, the shorter side padded on the
  left (``StageCache.merge``). Models with sliding-window layers keep such a batch
  separate instead (their caches drop old positions, so they cannot be padded);
- a request leaves as soon as it stops (end-of-sequence, a stop text, ``max_new_tokens``,
  the context, or its caller cancelled): every stage drops its rows at once
  (``StageCache.select_rows``), and padding no kept row needs is trimmed;
- admission is bounded by memory: at most ``max_rows`` sequences (the plan reserved KV
  cache for ``batch_size`` sequences of ``context`` tokens); a request that does not fit
  waits, and one longer than the context is refused.

Why rows join one batch rather than run as independent micro-batches: on a device bound
by reading weights, a step of 8 rows costs little more than a step of 1, so 8 requests in
one batch finish far sooner than 8 batches of one (measurements: benchmarks/README.md).

Tokens are picked on the last stage (argmax) when every row of a batch is greedy without
settings that read earlier tokens; otherwise the last stage returns logits and each row is
picked here with its own settings and its own seeded generator, so a request's sampled
text does not depend on what else runs beside it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .errors import ConfigError, DistlayerError
from .generate import cut_at_stop, pick_next, positions_from_mask, process_logits
from .transport import Work

GREEDY = GenerationConfig(do_sample=False)


@dataclass(eq=False)
class Request:
    """One sequence: a prompt, its settings, and what it has generated so far.

    Read ``tokens`` as they come with :meth:`stream`, or wait with :meth:`result`.
    """

    prompt: list[int]
    settings: GenerationConfig                       # resolved
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None                 # "stop", "length" or "cancelled"
    error: BaseException | None = None
    text: str | None = None                          # the completion once finished, cut before a stop text

    def __post_init__(self):
        self._events: queue.Queue = queue.Queue()
        self.listeners: list = []  # fn(kind, value) called from the scheduler's thread: ("token", id), ("end", reason), ("error", exc)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.generator = torch.Generator().manual_seed(self.settings.seed) \
            if self.settings.do_sample and self.settings.seed is not None else None

    def cancel(self) -> None:
        """Stop generating (the client went away); its KV cache is freed at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stream(self, timeout: float | None = None):
        """Yield each new token id as it is generated; raises the request's error, if any."""
        while True:
            kind, value = self._events.get(timeout=timeout)
            if kind == "token":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def result(self, timeout: float | None = None) -> "Request":
        """Wait until the request finished; raises its error, if any."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._tell("token", token)

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._tell(*(("error", error) if error is not None else ("end", reason)))

    def _tell(self, kind: str, value) -> None:
        self._events.put((kind, value))
        for fn in self.listeners:
            fn(kind, value)


class _Batch:
    """Rows that share one KV cache on every stage, with their attention mask."""

    _ids = itertools.count()

    def __init__(self, prefix: str, rows: list[Request], pad_id: int):
        self.cache_id = f"{prefix}:{next(self._ids)}"
        self.rows = rows
        width = max(len(r.prompt) for r in rows)
        self.mask = torch.zeros(len(rows), width, dtype=torch.long)       # [B, T]
        self.next_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            self.mask[i, width - len(r.prompt):] = 1
            self.next_ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        self.history = self.next_ids.clone()                                # [B, T] every token so far

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next forward's ids ``[B, t]``, mask ``[B, T]`` and positions ``[B, t]``."""
        t = self.next_ids.shape[1]
        pos = positions_from_mask(self.mask)[:, -t:]
        return self.next_ids, self.mask, pos

    def advance(self, tokens: torch.Tensor) -> None:
        """Each row's next token ``[B]`` becomes the next input."""
        self.next_ids = tokens[:, None]
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        self.history = torch.cat([self.history, self.next_ids], dim=1)

    def keep(self, keep: list[int]) -> int:
        """Keep only rows ``keep``; returns how many leading positions no kept row needs."""
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_ids, self.history = (t.index_select(0, index) for t in
                                                  (self.mask, self.next_ids, self.history))
        used = self.mask.any(0).nonzero()
        trim = int(used[0]) if len(used) else 0
        self.mask, self.history = self.mask[:, trim:], self.history[:, trim:]
        return trim

    def absorb(self, other: "_Batch") -> None:
        """Append ``other``'s rows (the caches were merged the same way)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t, fill=0):
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill)

        self.rows += other.rows
        self.mask = torch.cat([pad(self.mask), pad(other.mask)])
        self.history = torch.cat([pad(self.history), pad(other.history)])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])


class Scheduler:
    """Runs requests on a model's pipeline, many at once (see the module docstring).

    Args:
        model: a started ``DistModel``.
        max_rows: most sequences in flight (the batch the plan reserved KV cache for).
        context: most tokens of a sequence (prompt and completion).
    """

    def __init__(self, model, max_rows: int, context: int):
        self.model, self.max_rows, self.context = model, max_rows, context
        self.transport = model.pipeline.transport
        self.slots = model.pipeline.micro_batches(max_rows)
        text = model.config.get_text_config()
        self.mergeable = not (getattr(text, "sliding_window", None) and "sliding_attention" in
                              (getattr(text, "layer_types", None) or ["sliding_attention"]))
        self.prefix = uuid.uuid4().hex[:8]
        self._waiting: list[Request] = []
        self._batches: list[_Batch] = []
        self._active: set[Request] = set()  # every request not yet finished
        self._cond = threading.Condition()
        self._steps = itertools.count()
        self._stopped = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="distlayer-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ clients

    def submit(self, prompt: list[int], settings: GenerationConfig, listener=None) -> Request:
        """Queue a request; returns at once. ``listener(kind, value)``, if given, hears each
        event from the scheduler's thread (``("token", id)``, ``("end", reason)``,
        ``("error", exc)``).

        Raises:
            ConfigError: an empty prompt, or prompt plus ``max_new_tokens`` over the context.
            DistlayerError: the scheduler stopped (a stage died, or it was closed).
        """
        return self.submit_many([(prompt, settings)], listener)[0]

    def submit_many(self, requests: list[tuple[list[int], GenerationConfig]], listener=None) -> list[Request]:
        """Queue several requests at once (each ``(prompt, settings)``), all before the loop
        admits any: requests queued together on an idle scheduler are admitted, stepped,
        joined and left in an order that depends only on them, never on timing, so they
        compute the same whenever they run. Checks every one before queuing any (see
        :meth:`submit`)."""
        made = []
        for prompt, settings in requests:
            if not prompt:
                raise ConfigError("the prompt has no tokens: write a prompt")
            if len(prompt) + settings.max_new_tokens > self.context:
                raise ConfigError(f"the prompt is {len(prompt)} tokens and max_new_tokens is "
                                  f"{settings.max_new_tokens}, {len(prompt) + settings.max_new_tokens} in all, over "
                                  f"the context of {self.context}: shorten the prompt or lower max_new_tokens")
            made.append(Request(list(prompt), settings))
            if listener is not None:
                made[-1].listeners.append(listener)
        with self._cond:
            if self.failure is not None or self._stopped:
                raise DistlayerError(f"the scheduler has stopped ({self.failure or 'closed'})")
            self._waiting.extend(made)
            self._active.update(made)
            self._cond.notify_all()
        return made

    def in_flight(self) -> int:
        """Sequences running or waiting."""
        with self._cond:
            return len(self._active)

    def close(self) -> None:
        """Stop the loop; requests still running end with an error."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._waiting and not self._batches:
                        self._cond.wait()
                    if self._stopped:
                        break
                    admitted = self._admit()
                self._round(admitted)
        except BaseException as e:  # a stage died, or a bug: every request learns it
            self.failure = e
        finally:
            self._fail_all(self.failure or DistlayerError("the scheduler was closed"))

    def _admit(self) -> list[_Batch]:
        """A new batch of the waiting requests that fit (called with the lock held)."""
        for r in self._waiting:
            if r.cancelled:
                self._finish(r, "cancelled")
        pending = [r for r in self._waiting if not r.cancelled]
        room = max(self.max_rows - sum(len(b.rows) for b in self._batches), 0)
        take, self._waiting = pending[:room], pending[room:]
        return [_Batch(self.prefix, take, take[0].settings.pad_token_id)] if take else []

    def _round(self, admitted: list[_Batch]) -> None:
        """One step of every batch, submitted before any is fetched; then rows leave and join.
        Newcomers that can join a running batch are prefilled first and join it at once, so
        the running batch's next step already has them."""
        if admitted and self.mergeable and self._batches:
            self._step(admitted)
            self._batches = self._join(self._batches + self._settle(admitted))
            admitted = []
        batches = self._batches + admitted
        self._step(batches)
        self._batches = self._join(self._settle(batches))

    def _step(self, batches: list[_Batch]) -> None:
        """One forward of each batch (all submitted before any is fetched), and its tokens."""
        handles = []
        for b in batches:
            ids, mask, pos = b.step()
            greedy = all(not r.settings.do_sample and not r.settings.needs_history for r in b.rows)
            work = Work(f"{self.prefix}#{next(self._steps)}", b.cache_id, mask, pos, 1, GREEDY if greedy else None)
            handles.append((b, self.transport.submit(work, ids), greedy))
        for b, handle, greedy in handles:
            out = self.transport.fetch(handle)
            b.advance(self._pick(b, out if greedy else out[:, -1, :], greedy))

    def _settle(self, batches: list[_Batch]) -> list[_Batch]:
        """Deliver the step's tokens; returns the batches that still have rows."""
        for b in batches:
            self._leave(b)
        return [b for b in batches if b.rows]

    def _pick(self, b: _Batch, out: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Each row's next token, from argmax tokens ``[B]`` or logits ``[B, V]``."""
        if greedy:
            return out.long()
        picked = []
        for i, r in enumerate(b.rows):
            s = r.settings
            logits = out[i:i + 1].float()
            if s.needs_history:
                padding = b.mask[i].nonzero()[0]  # leading positions that are not this row's
                logits = process_logits(logits, b.history[i:i + 1], padding, len(r.tokens), s)
            picked.append(pick_next(logits, s, r.generator))
        return torch.cat(picked).long()

    def _leave(self, b: _Batch) -> None:
        """Deliver the step's tokens; rows that stopped leave the batch on every stage."""
        keep = []
        for i, r in enumerate(b.rows):
            if r.done:
                continue
            token = int(b.next_ids[i, 0])
            reason = self._stop_reason(r, token)
            if reason != "cancelled":
                r._emit(token)
            if reason:
                self._finish(r, reason)
            else:
                keep.append(i)
        if len(keep) == len(b.rows):
            return
        if not keep:
            self.transport.drop(b.cache_id)
            b.rows = []
            return
        trim = b.keep(keep)
        self.transport.control("select_rows", b.cache_id, keep, trim)

    def _stop_reason(self, r: Request, token: int) -> str | None:
        s = r.settings
        if r.cancelled:
            return "cancelled"
        if token in s.eos_ids:
            return "stop"
        if s.stop:
            text, hit = cut_at_stop(self.model.tokenizer.decode(r.tokens + [token], skip_special_tokens=True),
                                    s.stop)
            if hit:
                r.text = text
                return "stop"
        if len(r.tokens) + 1 >= s.max_new_tokens or len(r.prompt) + len(r.tokens) + 1 >= self.context:
            return "length"
        return None

    def _join(self, batches: list[_Batch]) -> list[_Batch]:
        """Fold freshly prefilled batches into running ones, at most ``slots`` batches in all."""
        if not self.mergeable:
            return batches
        batches = sorted(batches, key=lambda b: -len(b.rows))
        while len(batches) > self.slots:
            small = batches.pop()
            into = min(batches, key=lambda b: len(b.rows))
            self.transport.control("merge_caches", into.cache_id, small.cache_id)
            into.absorb(small)
        return batches

    def _finish(self, r: Request, reason: str) -> None:
        if r.text is None:
            r.text = self.model.tokenizer.decode(r.tokens, skip_special_tokens=True) if self.model.tokenizer else ""
        r._finish(reason)
        with self._cond:
            self._active.discard(r)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            everyone, self._active = list(self._active), set()
            self._waiting, self._batches = [], []
        for r in everyone:
            r._finish(None, error)
