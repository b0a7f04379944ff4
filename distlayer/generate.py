"""Picking and stopping: positions from a mask, the settings that read earlier tokens,
sampling, stop texts, and what ``generate()`` returns.

Nothing here knows about stages, devices or Ray; the scheduler (``scheduler.py``) runs
the steps. Settings are a resolved ``config.GenerationConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import GenerationConfig


@dataclass
class Generated:
    """What ``DistModel.generate`` returns (with ``return_dict_in_generate``)."""

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
