"""Turn a transformers causal-LM class into embed / layers / norm / head units.

Nothing here knows about devices, budgets or Ray: the model is built on the meta
device and the caller decides which units get real weights.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .units import EMBED, HEAD, NORM, layer_unit, unit_order  # noqa: F401 (unit_order: used by store)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# Attributes the models' forward loops read off a decoder layer.
LAYER_ATTRS = ("attention_type", "is_block_boundary")

TESTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "mixtral", "qwen2_moe",
)


def unit_of_raw_key(key: str) -> str:
    """Which unit a checkpoint tensor belongs to, from its name alone."""
    m = _LAYER_RE.search(key)
    if m:
        return layer_unit(int(m.group(1)))
    if key.startswith("lm_head."):
        return HEAD
    if re.match(r"^(?:model\.)?(?:norm|final_layernorm|final_norm)\.", key):
        return NORM
    return EMBED


@dataclass
class Parts:
    """Handles on the pieces of a decoder-only causal LM."""

    model: nn.Module          # the *ForCausalLM
    base: nn.Module           # its decoder (model.model)
    layers: nn.ModuleList     # decoder layers
    prefixes: dict[str, str]  # unit name -> state-dict prefix of its module(s)


def _unsupported(config, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model type {getattr(config, 'model_type', '?')!r} is not supported: {why}. distlayer runs "
        "decoder-only causal LMs whose transformers class has model.layers, model.norm and lm_head "
        f"(tested: {', '.join(TESTED_MODEL_TYPES)})."
    )


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """Build the full causal-LM class with parameters on the meta device.

    Non-persistent buffers (rotary ``inv_freq``, embedding scales) get real values,
    since checkpoints do not hold them.

    Args:
        config: a transformers ``PretrainedConfig``.
        dtype: dtype the parameters will have once loaded.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(config, "encoder-decoder models are not layered decoders")
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise _unsupported(config, f"transformers has no causal-LM class for it ({e})") from e
    return model.eval()


def parts(model: nn.Module) -> Parts:
    """Find the decoder, its layers, final norm and head of ``model``."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise _unsupported(model.config, "no model.layers list of decoder layers")
    if not isinstance(getattr(base, "norm", None), nn.Module):
        raise _unsupported(model.config, "no model.norm final norm")
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise _unsupported(model.config, "no lm_head")
    prefixes = {layer_unit(i): f"model.layers.{i}." for i in range(len(layers))}
    prefixes.update({NORM: "model.norm.", HEAD: "lm_head."})
    return Parts(model=model, base=base, layers=layers, prefixes=prefixes)


def cache_keyword(p: Parts) -> str:
    """The keyword the decoder's forward takes its KV cache under: ``cache`` from
    transformers 5.24, ``past_key_values`` before. An older forward swallows an unknown
    ``cache=`` in its ``**kwargs`` and runs every step without a cache, so asking is what
    keeps decoding exact on both."""
    params = inspect.signature(type(p.base).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise _unsupported(p.model.config, "its decoder's forward takes no KV cache (neither cache nor past_key_values)")


def unit_of_key(p: Parts, key: str) -> str:
    """Which unit a model state-dict key belongs to (everything else is the embed unit)."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    if m:
        return layer_unit(int(m.group(1)))
    if key.startswith("model.norm."):
        return NORM
    if key.startswith("lm_head."):
        return HEAD
    return EMBED


def unit_params(p: Parts, unit: str) -> dict[str, nn.Parameter]:
    """The parameters (and persistent buffers) of one unit, by full model key.

    Tied parameters are listed under every name they have, so the head of a tied
    model lists ``lm_head.weight`` even though it is the embedding's tensor.
    """
    out = {}
    for key, t in p.model.state_dict(keep_vars=True).items():
        if unit_of_key(p, key) == unit:
            out[key] = t
    return out


def tie_head(p: Parts, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill head tensors a tied checkpoint leaves out from the tensors they are tied to."""
    config = p.model.config.get_text_config()
    tied = getattr(p.model, "_tied_weights_keys", None)
    if not getattr(config, "tie_word_embeddings", False) or not isinstance(tied, dict):
        return head
    state = p.model.state_dict(keep_vars=True)
    out = dict(head)
    for key, t in head.items():
        src = state.get(tied.get(key, ""))
        if t.device.type == "meta" and src is not None and src.device.type != "meta":
            out[key] = src
    return out


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer another stage owns: hidden states pass through."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for name in LAYER_ATTRS:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's config declares (float32 if none)."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def compute_dtype(name: str | None, config) -> torch.dtype:
    """The torch dtype named ``name`` (a canonical name from ``config.DTYPES``), else the checkpoint's."""
    return getattr(torch, name) if name else checkpoint_dtype(config)
