"""A stage's KV cache: a DynamicCache that holds only the stage's own layers but
answers sequence-length questions for every layer.

transformers sizes attention masks from the cache's first full-attention (or
sliding) layer. A stage that does not own that layer never fills it, so the stage
counts the tokens it has seen and answers for the layers it lacks.
"""

from __future__ import annotations

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

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx in self.owned or isinstance(self.layers[layer_idx], DynamicSlidingWindowLayer):
            return super().get_mask_sizes(query_length, layer_idx)
        return self.seen + query_length, 0

    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total
