"""A stage's KV cache: a DynamicCache that holds only the stage's own layers but
answers sequence-length questions for every layer.

transformers sizes attention masks from the cache's first full-attention (or
sliding) layer. A stage that does not own that layer never fills it, so the stage
counts the tokens it has seen and answers for the layers it lacks.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer


class StageCache(DynamicCache):
    """KV cache of the layers in ``owned``; sizes for all other layers from a token count.

    Args:
        config: the model's transformers config.
        owned: indices of the decoder layers this stage runs.
    """

    def __init__(self, config, owned):
        super().__init__(config=config)
        self.owned = set(owned)
        self.seen = 0

    def advance(self, num_tokens: int) -> None:
        """Record that a forward of ``num_tokens`` new tokens finished."""
        self.seen += num_tokens
        for i, layer in enumerate(self.layers):
            if i not in self.owned and isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = self.seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self.owned:
            return super().get_seq_length(layer_idx)
        return self.seen

    def get_mask_sizes(self, query, layer_idx: int) -> tuple[int, int]:
        if layer_idx in self.owned or isinstance(self.layers[layer_idx], DynamicSlidingWindowLayer):
            return super().get_mask_sizes(query, layer_idx)
        # transformers before 5.5 passes the new tokens' cache positions, later their count
        query_length = query.shape[0] if isinstance(query, torch.Tensor) else query
        return self.seen + query_length, 0

    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total

    @classmethod
    def rows_can_join(cls, config) -> bool:
        """Whether a model's batches can take in rows of other batches: no layer of its
        cache drops old positions (a sliding window)."""
        return cls(config, range(config.get_text_config().num_hidden_layers)).mergeable

    @property
    def mergeable(self) -> bool:
        """Whether rows of another cache can join this one: every owned layer keeps all its
        positions (no sliding window that drops old ones)."""
        return not any(isinstance(self.layers[i], DynamicSlidingWindowLayer) for i in self.owned)

    def _filled(self):
        for i in sorted(self.owned):
            layer = self.layers[i]
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                yield layer

    def select_rows(self, rows: list[int], trim: int = 0) -> None:
        """Keep only ``rows`` (batch indices, in that order), and drop the first ``trim``
        positions, which no kept row attends to (all padding for them). A sliding-window
        layer holds only its window's last positions, so it loses only those of the
        ``trim`` it still holds, and counts ``trim`` fewer tokens seen."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self._filled():
            index = index.to(layer.keys.device)
            cut = max(0, trim - (self.seen - layer.keys.shape[2]))  # positions before it holds are gone already
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
        self.seen -= trim
        for layer in self.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = self.seen

    def merge(self, other: "StageCache") -> None:
        """Append the rows of ``other`` after this cache's rows; the shorter side is padded
        on the left with zeros (positions its rows' attention masks hide), as left padding
        in one batch would be."""
        if not (self.mergeable and other.mergeable):
            raise ValueError("caches with sliding-window layers cannot be merged")
        width = max(self.seen, other.seen)
        mine = {id(layer): layer for layer in self._filled()}
        for i in sorted(self.owned):
            a, b = self.layers[i], other.layers[i]
            if id(a) not in mine or getattr(b, "keys", None) is None or not b.keys.numel():
                raise ValueError(f"layer {i} of a cache to merge holds nothing: run a forward on both first")
            a.keys = torch.cat([_pad_left(a.keys, width), _pad_left(b.keys, width)], dim=0)
            a.values = torch.cat([_pad_left(a.values, width), _pad_left(b.values, width)], dim=0)
        self.seen = width


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, T, D]`` zero-padded on the left of T to ``width``."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))
