"""The driver's sequences: requests join and leave a running batch at any step.

A :class:`Scheduler` owns every request in flight, ``generate()``'s rows included. Its
loop (one thread) keeps running batches, one per micro-batch the pipeline runs at once
(``Pipeline.micro_batches``), and each round submits a step of every batch before it
fetches any, so all stages work at once:

- requests that arrive are prefilled as batches of their own (left-padded; as many
  batches as there are free micro-batch slots) and, at the next step boundary, join a
  running batch when no slot is free: each stage appends their rows to that batch's KV
  cache, the shorter side padded on the left (``StageCache.merge``). Models with
  sliding-window layers keep such batches separate instead (their caches drop old
  positions, so they cannot be padded);
- a request leaves as soon as it stops (end-of-sequence, a stop text, ``max_new_tokens``,
  the context, or its caller cancelled): every stage drops its rows at once
  (``StageCache.select_rows``), and padding no kept row needs is trimmed;
- admission is bounded by memory: at most ``max_rows`` sequences (the plan reserved KV
  cache for ``max_rows`` sequences of ``context`` tokens); a request that does not fit
  waits, and one longer than the context is refused. Requests submitted as one group
  (a ``generate()`` call) are admitted together, and a group larger than ``max_rows``
  runs when nothing else does, as one batch always could;
- when every row of a batch is greedy and the stages are Ray actors, the last stage picks
  the tokens and, where the transport feeds them back itself (``Transport.feeds``),
  ``AHEAD`` steps stay in flight, each fed the tokens of the step before
  straight from the last stage, so no stage waits on this process. No step is sent past
  a row's last token (its ``max_new_tokens`` or the context), so a row that ends there
  leaves with nothing in flight; one that stops earlier (end-of-sequence, a stop text),
  and rows that join, wait for the steps in flight to be fetched (a stopped row's extra
  tokens are dropped), then the next step is fed from here.

Why rows join one batch rather than run as independent micro-batches: on a device bound
by reading weights, a step of 8 rows costs little more than a step of 1, so 8 requests in
one batch finish far sooner than 8 batches of one (measurements: benchmarks/README.md).

Tokens that are not greedy (or whose settings read earlier tokens) are picked here, each
row with its own settings and its own seeded generator, so a request's sampled text does
not depend on what else runs beside it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from . import compute
from .cache import StageCache
from .config import GenerationConfig
from .errors import ConfigError, DistlayerError
from .generate import cut_at_stop, pick_next, positions_from_mask, process_logits
from .prompts import context_error
from .transport import Handle, Work

AHEAD = 3  # steps in flight per batch when the last stage picks the tokens on Ray actors


@dataclass(eq=False)
class Group:
    """Requests submitted together (one ``generate()`` call): admitted together. With
    ``hold``, each row keeps every step's logits (``Request.logits``), and a row that
    stopped stays in its batch, fed padding, until every row of the group has stopped, so
    each step has logits for every row, as transformers returns them."""

    hold: bool = False
    members: list = field(default_factory=list)

    def stopped(self) -> bool:
        return all(r.stopped for r in self.members)


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
    group: Group | None = None
    logits: list | None = None                       # in a held group: each step's raw logits ``[V]``
    stopped: str | None = None                       # why it stopped; it finishes once its rows left every stage

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

    @property
    def held(self) -> bool:
        """Stopped, but kept in its batch until its whole group has stopped."""
        return self.group is not None and self.group.hold and not self.group.stopped()

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


@dataclass(eq=False)
class _Sent:
    """A step in flight: its handle, the rows it was submitted with, and whether the last
    stage picks its tokens."""

    handle: Handle
    rows: list[Request]
    picked: bool


class _Batch:
    """Rows that share one KV cache on every stage, with their attention mask.

    ``mask`` covers every position up to the next input, ``history`` every token so far
    (prompt with its padding, and the tokens fetched), and ``next_ids`` is the next input:
    token ids, or the handle of the last step in flight whose picked tokens it is.
    """

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
        self.history = self.next_ids.clone()                                # [B, T]
        self.pad_id = pad_id
        self.sent: deque[_Sent] = deque()

    @property
    def picked(self) -> bool:
        """Every row greedy, without settings that read earlier tokens: the last stage picks."""
        return all(not r.settings.do_sample and not r.settings.needs_history and r.logits is None
                   for r in self.rows)

    def steps_left(self, context: int | None) -> int:
        """Steps that can still be sent before some row's last token (``max_new_tokens``, or
        the context), counting those in flight: no step goes past it, so a row that stops
        there leaves with nothing in flight."""
        left = [min(r.settings.max_new_tokens - len(r.tokens),
                    context - len(r.prompt) - len(r.tokens) if context is not None else 1 << 62)
                for r in self.rows if not r.stopped]
        return (min(left) if left else 0) - len(self.sent)

    def to_send(self, depth: int, context: int | None) -> int:
        """How many steps to send now to have ``depth`` in flight: at least one when none
        is, and none past a row's last token (:meth:`steps_left`)."""
        n, left = 0, self.steps_left(context)
        while len(self.sent) + n < depth and (len(self.sent) + n == 0 or left - n > 0):
            n += 1
        return n

    def submit(self, transport, key: str, together: tuple[str, int] | None = None) -> None:
        """Send the next step: ``next_ids`` over the mask, with new positions (``together``:
        its wave, ``Work.together``)."""
        ids, t = self.next_ids, 1 if isinstance(self.next_ids, Handle) else self.next_ids.shape[1]
        pos = positions_from_mask(self.mask)[:, -t:]
        picked = self.picked
        handle = transport.submit(Work(key, self.cache_id, self.mask, pos, 1, picked, together=together), ids)
        self.sent.append(_Sent(handle, list(self.rows), picked))
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        self.next_ids = handle

    def fetched(self, tokens: torch.Tensor) -> None:
        """The oldest step in flight gave ``tokens`` ``[B]`` (padding for held rows)."""
        self.sent.popleft()
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        if not self.sent:
            self.next_ids = tokens[:, None]

    def keep(self, keep: list[int]) -> int:
        """Keep only rows ``keep`` (nothing in flight); returns how many leading positions no
        kept row needs."""
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_ids, self.history = (t.index_select(0, index) for t in
                                                  (self.mask, self.next_ids, self.history))
        used = self.mask.any(0).nonzero()
        trim = int(used[0]) if len(used) else 0
        self.mask, self.history = self.mask[:, trim:], self.history[:, trim:]
        return trim

    def absorb(self, other: "_Batch") -> None:
        """Append ``other``'s rows (nothing in flight on either; the caches were merged the same way)."""
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
        context: most tokens of a sequence (prompt and completion); None: no limit.
    """

    def __init__(self, model, max_rows: int, context: int | None):
        self.model, self.max_rows, self.context = model, max_rows, context
        self.pipeline = model.pipeline
        self.mergeable = StageCache.rows_can_join(model.config)
        self.prefix = uuid.uuid4().hex[:8]
        self._waiting: list[Request] = []
        self._batches: list[_Batch] = []
        self._active: set[Request] = set()  # every request not yet finished
        self._cond = threading.Condition()
        self._steps = itertools.count()
        self._rounds = itertools.count()  # rounds of submissions, sent in waves (Work.together)
        self._stopped = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="distlayer-scheduler", daemon=True)
        self._thread.start()

    @property
    def transport(self):
        return self.pipeline.transport

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

    def submit_many(self, requests: list[tuple[list[int], GenerationConfig]], listener=None,
                    group: Group | None = None) -> list[Request]:
        """Queue several requests at once (each ``(prompt, settings)``), all before the loop
        admits any: requests queued together on an idle scheduler are admitted, stepped,
        joined and left in an order that depends only on them, never on timing, so they
        compute the same whenever they run. With ``group``, they are admitted together
        (see :class:`Group`). Checks every one before queuing any (see :meth:`submit`)."""
        made = []
        for prompt, settings in requests:
            if not prompt:
                raise ConfigError("the prompt has no tokens: write a prompt")
            if settings.stop and self.model.tokenizer is None:
                raise ConfigError("stop texts need the model's tokenizer, and this model has none: put its "
                                  "tokenizer files in the model dir, or leave out stop")
            too_long = context_error(len(prompt), settings.max_new_tokens, self.context, "max_new_tokens")
            if too_long:
                raise ConfigError(too_long)
            made.append(Request(list(prompt), settings, group=group))
            if listener is not None:
                made[-1].listeners.append(listener)
            if group is not None:
                group.members.append(made[-1])
                if group.hold:
                    made[-1].logits = []
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

    def waiting(self) -> int:
        """Sequences queued, not yet admitted to a batch (:meth:`in_flight` counts them too)."""
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> bool:
        """Whether the loop still takes requests (not closed, not failed)."""
        return self.failure is None and not self._stopped

    def close(self) -> None:
        """Stop the loop; requests still running end with an error."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        compute.single_threaded()  # the stages compute on the compute thread; this one picks tokens
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
        """New batches of the waiting requests that fit, first come first served (called
        with the lock held): a group whole or not at all, and one larger than ``max_rows``
        only when nothing else runs."""
        for r in self._waiting:
            if r.cancelled:
                self._finish(r, "cancelled")
        pending = [r for r in self._waiting if not r.cancelled]
        running = sum(len(b.rows) for b in self._batches)
        take: list[Request] = []
        while pending:
            r = pending[0]
            unit = [m for m in r.group.members if m in pending] if r.group else [r]
            alone = not take and not running  # nothing else runs: a large group runs by itself
            if running + len(take) + len(unit) > self.max_rows and not alone:
                break
            take += unit
            pending = [p for p in pending if p not in unit]
        self._waiting = pending
        if not take:
            return []
        slots = self.pipeline.micro_batches(running + len(take)) - len(self._batches)
        pad = take[0].settings.pad_token_id
        return [_Batch(self.prefix, [take[i] for i in part.tolist()], pad)
                for part in torch.arange(len(take)).tensor_split(max(1, min(slots, len(take))))]

    def _round(self, admitted: list[_Batch]) -> None:
        """A step of every batch, all submitted before any is fetched; then rows leave and
        join. Newcomers that can join a running batch are prefilled first and join it at
        once, so the running batch's next step already has them."""
        if admitted and self.mergeable and self._batches:
            self._send([(b, 1) for b in admitted])
            for b in admitted:
                self._fetch(b)
            self._batches = self._join(self._batches + self._settle(admitted))
            admitted = []
        batches = self._batches + admitted
        self._send([(b, b.to_send(AHEAD if b.picked and self.transport.feeds else 1, self.context))
                    for b in batches])
        for b in batches:
            self._fetch(b)
        self._batches = self._join(self._settle(batches))

    def _send(self, steps: list[tuple[_Batch, int]]) -> None:
        """Submit ``n`` steps of each ``(batch, n)``, in waves: the k-th step of every batch
        that sends one, then the next, each wave tagged with its size (``Work.together``),
        so a stage that streams weights runs a wave (different batches) as one block. A
        step depends only on steps of earlier waves, so no stage waits on a wave for
        work that needs its own output."""
        rounds = next(self._rounds)
        for k in range(max((n for _, n in steps), default=0)):
            wave = [b for b, n in steps if n > k]
            for b in wave:
                b.submit(self.transport, f"{self.prefix}#{next(self._steps)}", (f"{self.prefix}@{rounds}.{k}", len(wave)))

    def _fetch(self, b: _Batch) -> None:
        """Fetch the oldest step of ``b`` in flight and give each row its token."""
        sent = b.sent[0]
        out = self.transport.fetch(sent.handle)
        tokens = out.long() if sent.picked else self._pick(b, sent.rows, out[:, -1, :].float())
        for i, r in enumerate(sent.rows):
            if r.stopped:  # a held row is fed padding; a stopped row's extra tokens are dropped
                if r.held:
                    tokens[i] = b.pad_id
                continue
            token = int(tokens[i])
            r.stopped = self._stop_reason(r, token)
            if r.stopped != "cancelled":
                r._emit(token)
        b.fetched(tokens)

    def _drain(self, b: _Batch) -> None:
        """Fetch every step of ``b`` in flight, before its rows change."""
        while b.sent:
            self._fetch(b)

    def _pick(self, b: _Batch, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its logits ``[B, V]``, with its own settings."""
        picked = []
        for i, r in enumerate(rows):
            s, row = r.settings, logits[i:i + 1]
            if r.logits is not None and not r.done:
                r.logits.append(row[0])
            if s.needs_history:
                padding = b.mask[i].nonzero()[0]  # leading positions that are not this row's
                row = process_logits(row, b.history[i:i + 1], padding, len(r.tokens), s)
            picked.append(pick_next(row, s, r.generator))
        return torch.cat(picked).long()

    def _settle(self, batches: list[_Batch]) -> list[_Batch]:
        """Rows that stopped leave their batch on every stage (after the batch's steps in
        flight are fetched); returns the batches that still have rows."""
        for b in batches:
            if not any(r.stopped and not r.held for r in b.rows):
                continue
            self._drain(b)
            keep = [i for i, r in enumerate(b.rows) if not r.stopped or r.held]
            leaving = [r for i, r in enumerate(b.rows) if i not in keep]
            if not keep:
                self.transport.drop(b.cache_id)
                b.rows = []
            else:
                trim = b.keep(keep)
                self.transport.control("select_rows", b.cache_id, keep, trim)
            for r in leaving:  # finished once its KV cache is freed
                self._finish(r, r.stopped)
        return [b for b in batches if b.rows]

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
        if len(r.tokens) + 1 >= s.max_new_tokens or \
                self.context is not None and len(r.prompt) + len(r.tokens) + 1 >= self.context:
            return "length"
        return None

    def _join(self, batches: list[_Batch]) -> list[_Batch]:
        """Fold batches into others while there are more than the micro-batches the pipeline
        runs at once (the smallest into the next smallest, after their steps in flight)."""
        if not self.mergeable:
            return batches
        while True:
            batches = sorted(batches, key=lambda b: -len(b.rows))
            if len(batches) <= self.pipeline.micro_batches(sum(len(b.rows) for b in batches)):
                return batches
            small, into = batches[-1], batches[-2]
            self._drain(into)
            self._drain(small)
            self.transport.control("merge_caches", into.cache_id, small.cache_id)
            into.absorb(small)
            batches = self._settle(batches[:-1])

    def _finish(self, r: Request, reason: str) -> None:
        if r.done:
            return
        if r.text is None:
            r.text = self.model.tokenizer.decode(r.tokens, skip_special_tokens=True) if self.model.tokenizer else ""
        r._finish(reason)
        with self._cond:
            self._active.discard(r)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            everyone, self._active = list(self._active), set()
            self._waiting, batches, self._batches = [], self._batches, []
        for r in everyone:
            r._finish(None, error)
        for b in batches:  # free what the stages still hold, where they still answer
            try:
                self.transport.drop(b.cache_id)
            except Exception:
                pass
