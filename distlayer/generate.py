"""Prefill, decode, sampling and stopping over a ``step`` callable.

Nothing here knows about stages, devices or Ray. ``step(ids, attention_mask,
position_ids)`` runs one forward of the whole model with its KV cache and returns
logits for the last position of every row, or, when it picks greedily itself, the
chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import threading

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


class GroupStop:
    """Ends several micro-batch generations of one batch together, at the step where the
    batch's last row stopped, as a single batched ``generate`` would.

    Args:
        n: number of micro-batches.
    """

    def __init__(self, n: int = 1):
        self.ends: list[int | None] = [None] * n
        self._lock = threading.Lock()

    def should_stop(self, k: int, steps: int, done: bool) -> bool:
        """Micro-batch ``k`` has taken ``steps`` steps; ``done``: all its rows stopped."""
        with self._lock:
            if done and self.ends[k] is None:
                self.ends[k] = steps
            return None not in self.ends and steps >= max(self.ends)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token from a left-padded ``[B, L]`` mask (padding gets 1, as in transformers)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


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
             tokenizer=None, streamer=None, keep_logits: bool = False, group: GroupStop | None = None,
             index: int = 0) -> Generated:
    """Generate up to ``s.max_new_tokens`` tokens for each row of a left-padded batch.

    Args:
        step: runs the model on new tokens, extending its KV cache; returns ``[B, V]`` logits,
            or ``[B]`` tokens when it picks greedily itself.
        input_ids: ``[B, T]`` prompt ids, left-padded.
        attention_mask: ``[B, T]``, 0 on padding; None means no padding.
        s: sampling and stopping settings.
        tokenizer: needed for ``stop_strings``.
        streamer: object with ``put(tensor)`` / ``end()`` like transformers' ``TextStreamer`` (batch 1).
        keep_logits: return each step's logits.
        group, index: when a batch runs as several concurrent micro-batch generations, the
            shared :class:`GroupStop` and this one's index.
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
    group = group or GroupStop(1)
    eos = torch.tensor(list(s.eos_token_ids) or [-1])
    done = torch.zeros(b, dtype=torch.bool)
    reasons = ["length"] * b
    counts = [0] * b
    seqs, all_logits = input_ids, []
    if streamer is not None:
        streamer.put(input_ids)
    new_ids, new_pos = input_ids, positions_from_mask(mask)
    for t in range(s.max_new_tokens):
        out = step(new_ids, mask, new_pos)  # [B, V] logits, or [B] chosen tokens
        if out.dim() == 1:
            nxt = out.long()
        else:
            if keep_logits:
                all_logits.append(out.float().cpu())
            nxt = pick_next(out.float().cpu(), s, gen)
        nxt = torch.where(done, torch.full_like(nxt, s.pad_token_id), nxt)
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
        if group.should_stop(index, t + 1, bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        new_ids, new_pos = nxt[:, None], (mask.sum(-1, keepdim=True) - 1)
    if streamer is not None:
        streamer.end()
    return Generated(sequences=seqs, finish_reasons=reasons, completion_tokens=counts, logits=all_logits)
