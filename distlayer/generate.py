"""Prefill, decode, sampling and stopping over a ``step`` callable.

Nothing here knows about stages, devices or Ray. ``step(ids, attention_mask,
position_ids)`` runs one forward of the whole model with its KV cache and returns
logits for the last position of every row, or, when it picks greedily itself, the
chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from collections import deque

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplingSettings:
    """How the next token is picked and when a row stops.

    Attributes:
        max_new_tokens: most tokens to add per row.
        do_sample: False for greedy (argmax).
        temperature, top_k, top_p: sampling filters, applied in that order.
        seed: seed of the sampling generator; None draws from torch's global one.
        eos_token_ids: token ids that end a row.
        stop_strings: texts that end a row once they appear in its completion (needs a tokenizer).
        pad_token_id: token written into rows that already stopped.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be 0 or more")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when sampling (or set do_sample=False)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be 0 (off) or more")


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


def picking(s: SamplingSettings, group: int = 0) -> SamplingSettings:
    """What the stage that picks tokens needs from ``s``: the sampling filters, with the
    seed of micro-batch ``group`` (``seed + group``), and nothing about stopping."""
    return SamplingSettings(max_new_tokens=0, do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, seed=None if s.seed is None else s.seed + group)


def pick_next(logits: torch.Tensor, s: SamplingSettings, gen: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row from ``[B, V]`` logits."""
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


def generate(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: SamplingSettings,
             tokenizer=None, streamer=None, keep_logits: bool = False, fetch: Callable | None = None,
             groups: int = 1, ahead: int = 1) -> Generated:
    """Generate up to ``s.max_new_tokens`` tokens for each row of a left-padded batch.

    The batch may run as several micro-batches (``groups``) whose forwards are submitted
    in step order, micro-batch after micro-batch, so a pipeline works on one while the
    next waits; and, when ``step`` picks tokens itself, ``ahead`` steps deep.

    Args:
        step: ``step(k, ids, mask, pos)`` starts micro-batch ``k``'s next forward, extending
            its KV cache, and returns a handle; :func:`fetch` of it gives ``[b, V]`` logits, or
            ``[b]`` tokens when the step picks greedily itself.
        input_ids: ``[B, T]`` prompt ids, left-padded.
        attention_mask: ``[B, T]``, 0 on padding; None means no padding.
        s: sampling and stopping settings.
        tokenizer: needed for ``stop_strings``.
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
    b = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.cpu().long()
    if s.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode completions")
    gen = None
    if s.do_sample and s.seed is not None:
        gen = torch.Generator().manual_seed(s.seed)
    fetch = fetch or (lambda handle: handle)
    eos = torch.tensor(list(s.eos_token_ids) or [-1])
    done = torch.zeros(b, dtype=torch.bool)
    reasons = ["length"] * b
    counts = [0] * b
    seqs, all_logits = input_ids, []
    if streamer is not None:
        streamer.put(input_ids)

    rows = [r for r in torch.arange(b).tensor_split(groups) if len(r)]
    masks = [mask[r] for r in rows]
    inputs = [input_ids[r] for r in rows]
    positions = [positions_from_mask(m) for m in masks]
    pending = [deque() for _ in rows]
    submitted = [0] * len(rows)

    def advance(k: int, new_ids) -> None:
        masks[k] = torch.cat([masks[k], torch.ones(len(rows[k]), 1, dtype=mask.dtype)], dim=1)
        inputs[k], positions[k] = new_ids, masks[k].sum(-1, keepdim=True) - 1

    def top_up(k: int, steps: int) -> None:
        while submitted[k] < min(steps, s.max_new_tokens):
            pending[k].append(step(k, inputs[k], masks[k], positions[k]))
            submitted[k] += 1
            if ahead > 1:  # the next step's input is this step's tokens, still on their way
                advance(k, pending[k][-1])

    for depth in range(1, ahead + 1):  # in step order, so no stage waits behind a later step
        for k in range(len(rows)):
            top_up(k, depth)
    early = len(rows) > 1 or ahead > 1  # submit before the stop check, to keep stages busy
    for t in range(s.max_new_tokens):
        picked = []
        for k in range(len(rows)):
            out = fetch(pending[k].popleft())  # [b, V] logits, or [b] chosen tokens
            if out.dim() == 1:
                nxt = out.long()
            else:
                if keep_logits:
                    all_logits.append(out.float().cpu())
                nxt = pick_next(out.float().cpu(), s, gen)
            nxt = torch.where(done[rows[k]], torch.full_like(nxt, s.pad_token_id), nxt)
            picked.append(nxt)
            if ahead == 1:
                advance(k, nxt[:, None])
            if early:
                top_up(k, t + 1 + ahead)
        nxt = torch.cat(picked)
        if keep_logits and len(rows) > 1:
            all_logits[-len(rows):] = [torch.cat(all_logits[-len(rows):])]
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        for r in range(b):
            if not done[r]:
                counts[r] += 1
        if streamer is not None:
            streamer.put(nxt.cpu())
        stopped = torch.isin(nxt, eos) & ~done
        if s.stop_strings:
            for r in range(b):
                if not done[r] and not stopped[r]:
                    text = tokenizer.decode(seqs[r, input_ids.shape[1]:], skip_special_tokens=True)
                    stopped[r] = any(t in text for t in s.stop_strings)
        for r in torch.nonzero(stopped).flatten().tolist():
            reasons[r] = "stop"
        done |= stopped
        if bool(done.all()):
            break
        if not early:
            top_up(0, t + 2)
    if streamer is not None:
        streamer.end()
    return Generated(sequences=seqs, finish_reasons=reasons, completion_tokens=counts, logits=all_logits)
