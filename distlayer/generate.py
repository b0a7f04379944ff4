"""Prefill, decode, sampling and stopping over a ``step`` callable.

Nothing here knows about stages, devices or Ray. ``step(k, ids, mask, pos)`` starts one
forward of micro-batch ``k`` through the whole model with its KV cache and returns a
handle; ``fetch(handle)`` gives logits for the last position of every row, or, when
the model picks tokens itself, the chosen tokens. Settings are a resolved
``config.GenerationConfig``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import GenerationConfig

Step = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], object]


@dataclass
class Generated:
    """What :func:`generate` returns."""

    sequences: torch.Tensor                    # [B, prompt + new] prompt (with its padding) and completion
    finish_reasons: list[str]                  # per row: "stop" or "length"
    completion_tokens: list[int]               # per row: tokens generated, stop token included
    logits: list[torch.Tensor] = field(default_factory=list)  # per step: [B, V] raw logits


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token from a left-padded ``[B, L]`` mask (padding gets 1, as in transformers)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def process_logits(logits: torch.Tensor, history: torch.Tensor, padding: torch.Tensor, new: int,
                   s: GenerationConfig) -> torch.Tensor:
    """Apply the settings that read earlier tokens, as transformers does and in its order:
    repetition penalty (left padding not counted), n-gram ban, minimum new tokens.

    Args:
        logits: ``[B, V]`` float logits of the next token.
        history: ``[B, L]`` every token so far (prompt with its padding, and completion).
        padding: ``[B]`` left-padding length of each row.
        new: tokens generated so far.
        s: resolved settings.
    """
    if s.repetition_penalty not in (None, 1.0):
        vocab = logits.shape[-1]  # padding positions point at an extra column, dropped after
        ids = history.masked_fill(torch.arange(history.shape[1])[None, :] < padding[:, None], vocab)
        padded = torch.nn.functional.pad(logits, (0, 1))
        seen = torch.gather(padded, 1, ids)
        seen = torch.where(seen < 0, seen * s.repetition_penalty, seen / s.repetition_penalty)
        logits = padded.scatter(1, ids, seen)[:, :vocab]
    n = s.no_repeat_ngram_size
    if n and history.shape[1] + 1 >= n:
        logits = logits.clone()
        for r, row in enumerate(history.tolist()):
            prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix}
            logits[r, list(banned)] = float("-inf")
    if s.min_new_tokens and new < s.min_new_tokens and s.eos_ids:
        logits = logits.clone()
        logits[:, s.eos_ids] = float("-inf")
    return logits


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """``text`` cut before the first of the ``stops`` texts it holds, and whether one was there."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def pick_next(logits: torch.Tensor, s: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row from ``[B, V]`` logits: argmax, or sampled after
    temperature, top-k and top-p, in that order."""
    if not s.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _MicroBatches:
    """The rows of a batch cut into micro-batches, each with its mask, next input,
    positions and the handles of its steps in flight."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, groups: int, step: Step, ahead: int, limit: int):
        self.rows = [r for r in torch.arange(ids.shape[0]).tensor_split(groups) if len(r)]
        self.masks = [mask[r] for r in self.rows]
        self.inputs = [ids[r] for r in self.rows]
        self.positions = [positions_from_mask(m) for m in self.masks]
        self.pending = [deque() for _ in self.rows]
        self.submitted = [0] * len(self.rows)
        self.step, self.ahead, self.limit = step, ahead, limit

    def advance(self, k: int, new_ids) -> None:
        """Micro-batch ``k``'s next input is ``new_ids`` (tokens, or a handle to them)."""
        m = self.masks[k] = torch.cat([self.masks[k], torch.ones(len(self.rows[k]), 1, dtype=self.masks[k].dtype)],
                                      dim=1)
        self.inputs[k], self.positions[k] = new_ids, m.sum(-1, keepdim=True) - 1

    def top_up(self, k: int, steps: int) -> None:
        """Submit micro-batch ``k``'s steps until ``steps`` (at most the limit) are submitted."""
        while self.submitted[k] < min(steps, self.limit):
            self.pending[k].append(self.step(k, self.inputs[k], self.masks[k], self.positions[k]))
            self.submitted[k] += 1
            if self.ahead > 1:  # the next step's input is this step's tokens, still on their way
                self.advance(k, self.pending[k][-1])


def generate(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: GenerationConfig,
             tokenizer=None, streamer=None, keep_logits: bool = False, fetch: Callable | None = None,
             groups: int = 1, ahead: int = 1) -> Generated:
    """Generate up to ``s.max_new_tokens`` tokens for each row of a left-padded batch.

    The batch may run as several micro-batches (``groups``) whose forwards are submitted
    in step order, micro-batch after micro-batch, so a pipeline works on one while the
    next waits; and, when ``step`` picks tokens itself, ``ahead`` steps deep.

    Args:
        step: ``step(k, ids, mask, pos)`` starts micro-batch ``k``'s next forward, extending
            its KV cache, and returns a handle; ``fetch`` of it gives ``[b, V]`` logits, or
            ``[b]`` tokens when the step picks them itself.
        input_ids: ``[B, T]`` prompt ids, left-padded.
        attention_mask: ``[B, T]``, 0 on padding; None means no padding.
        s: resolved generation settings (``GenerationConfig.resolved``).
        tokenizer: needed for ``s.stop``.
        streamer: object with ``put(tensor)`` / ``end()`` like transformers' ``TextStreamer`` (batch 1).
        keep_logits: return each step's logits.
        fetch: turns a handle into its tensor; default: the handle is the tensor.
        groups: micro-batches (contiguous row ranges) the batch runs as.
        ahead: with ``ahead > 1``, ``step`` must pick tokens itself and accept the handle of
            the previous step as its input ids: each micro-batch then has up to ``ahead``
            steps in flight and the model never waits for this loop. Rows that stopped are
            fed their own tokens rather than padding; their output is padding either way.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    input_ids = input_ids.cpu().long()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.cpu().long()
    if s.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode completions")
    run = _Run(input_ids, mask, s, tokenizer, keep_logits)
    fetch = fetch or (lambda handle: handle)
    mb = _MicroBatches(input_ids, mask, groups, step, ahead, s.max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids)
    for depth in range(1, ahead + 1):  # in step order, so no stage waits behind a later step
        for k in range(len(mb.rows)):
            mb.top_up(k, depth)
    early = len(mb.rows) > 1 or ahead > 1  # submit before the stop check, to keep stages busy
    for t in range(s.max_new_tokens):
        picked = []
        for k, rows in enumerate(mb.rows):
            nxt = run.pick(fetch(mb.pending[k].popleft()), rows, t)
            picked.append(nxt)
            if ahead == 1:
                mb.advance(k, nxt[:, None])
            if early:
                mb.top_up(k, t + 1 + ahead)
        nxt = run.extend(picked)
        if streamer is not None:
            streamer.put(nxt)
        if run.all_done():
            break
        if not early:
            mb.top_up(0, t + 2)
    if streamer is not None:
        streamer.end()
    return Generated(sequences=run.seqs, finish_reasons=run.reasons, completion_tokens=run.counts,
                     logits=run.logits)


class _Run:
    """The sequences of one :func:`generate` call: tokens so far, which rows stopped and why."""

    def __init__(self, input_ids: torch.Tensor, mask: torch.Tensor, s: GenerationConfig, tokenizer,
                 keep_logits: bool):
        b = input_ids.shape[0]
        self.padding = (mask != 0).int().argmax(dim=1)  # [B] left padding of each row
        self.s, self.tokenizer, self.keep_logits = s, tokenizer, keep_logits
        self.prompt_len = input_ids.shape[1]
        self.seqs = input_ids
        self.done = torch.zeros(b, dtype=torch.bool)
        self.reasons, self.counts = ["length"] * b, [0] * b
        self.logits: list[torch.Tensor] = []
        self._step_logits: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(s.seed) if s.do_sample and s.seed is not None else None
        self.eos = torch.tensor(s.eos_ids or [-1])

    def pick(self, out: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        """The next token of ``rows`` from their fetched output (``[b]`` tokens or ``[b, V]`` logits)."""
        if out.dim() == 1:
            nxt = out.long()
        else:
            out = out.float().cpu()
            if self.keep_logits:
                self._step_logits.append(out)
            out = process_logits(out, self.seqs[rows], self.padding[rows], t, self.s)
            nxt = pick_next(out, self.s, self.gen)
        return torch.where(self.done[rows], torch.full_like(nxt, self.s.pad_token_id), nxt)

    def extend(self, picked: list[torch.Tensor]) -> torch.Tensor:
        """Append one step's tokens (one tensor per micro-batch) and mark rows that stop."""
        nxt = torch.cat(picked)
        if self._step_logits:
            self.logits.append(torch.cat(self._step_logits))
            self._step_logits = []
        self.seqs = torch.cat([self.seqs, nxt[:, None]], dim=1)
        for r in range(len(self.counts)):
            if not self.done[r]:
                self.counts[r] += 1
        stopped = torch.isin(nxt, self.eos) & ~self.done
        if self.s.stop:
            for r in range(len(self.counts)):
                if not self.done[r] and not stopped[r]:
                    text = self.tokenizer.decode(self.seqs[r, self.prompt_len:], skip_special_tokens=True)
                    stopped[r] = any(x in text for x in self.s.stop)
        for r in torch.nonzero(stopped).flatten().tolist():
            self.reasons[r] = "stop"
        self.done |= stopped
        return nxt

    def all_done(self) -> bool:
        """True once every row has stopped."""
        return bool(self.done.all())
