"""Factory of tiny random Hugging Face checkpoints for tests (no model hub needed).

Each architecture gets a few-layer model with hidden size 64, built from its own config
class with transformers' defaults for everything not set here, re-initialised with large
weights so greedy decoding yields varied tokens, and saved with ``save_pretrained``.

Example:
    >>> path = make_tiny("qwen2", tmp_path / "qwen2")
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from distlayer.canary import build_random

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "mixtral", "qwen2_moe"]

PAD, BOS, EOS = 0, 1, 2

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

# Per-architecture overrides on top of _COMMON (transformers 5.x config keys).
_EXTRA = {
    "llama": {},
    "mistral": {"head_dim": 16},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {"original_max_position_embeddings": 256},
    # Sliding window 8 so prompts longer than 8 tokens exercise the sliding layers;
    # query_pre_attn_scalar must follow head_dim (default 256 would mis-scale scores).
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
    },
}


def tiny_config(arch: str, num_layers: int = 4, tie: bool | None = None, vocab: int | None = None):
    """Builds the tiny config for an architecture.

    Args:
        arch: One of :data:`ARCHS` (a transformers ``model_type``).
        num_layers: Number of decoder layers.
        tie: Force ``tie_word_embeddings``; ``None`` keeps the architecture's default.
        vocab: vocabulary size (default 320).

    Returns:
        A ``PretrainedConfig`` instance.
    """
    if arch not in _EXTRA:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kwargs = {**_COMMON, **_EXTRA[arch], "num_hidden_layers": num_layers}
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny(arch: str, seed: int = 0, num_layers: int = 4, tie: bool | None = None, std: float = 0.2,
               vocab: int | None = None):
    """Instantiates a tiny random float32 model (not saved).

    Weights as the doctor's canary draws them (``distlayer.canary.randomize``): matrices
    from N(0, std), 1-D parameters (norms, biases) nudged by N(0, 0.02), and Gemma2's
    embedding scaled down by sqrt(hidden_size) to offset its normalizer.

    Args:
        arch: One of :data:`ARCHS`.
        seed: Seed for ``torch.manual_seed``; same seed gives the same weights.
        num_layers: Number of decoder layers.
        tie: Force ``tie_word_embeddings``; ``None`` keeps the architecture's default.
        std: Standard deviation for >=2-D weights.
        vocab: vocabulary size (default 320).

    Returns:
        The model in eval mode.
    """
    model = build_random(tiny_config(arch, num_layers, tie, vocab), seed, std)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD, BOS, EOS
    return model.eval()


def make_tiny(arch: str, path, seed: int = 0, num_layers: int = 4, tie: bool | None = None,
              vocab: int | None = None) -> pathlib.Path:
    """Saves a tiny random checkpoint (single ``model.safetensors``).

    Args:
        arch: One of :data:`ARCHS`.
        path: Output directory (created).
        seed: Weight seed.
        num_layers: Number of decoder layers.
        tie: Force ``tie_word_embeddings``; ``None`` keeps the architecture's default.
        vocab: vocabulary size (default 320).

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    path = pathlib.Path(path)
    build_tiny(arch, seed, num_layers, tie, vocab=vocab).save_pretrained(path)
    return path


def make_sharded(arch: str, path, max_shard_size="50KB", seed: int = 0, num_layers: int = 4,
                 tie: bool | None = None) -> pathlib.Path:
    """Like :func:`make_tiny`, but saved as several safetensors shards plus
    ``model.safetensors.index.json``; ``max_shard_size`` goes to ``save_pretrained``
    (the 50KB default gives many shards)."""
    path = pathlib.Path(path)
    build_tiny(arch, seed, num_layers, tie).save_pretrained(path, max_shard_size=max_shard_size)
    return path


def make_bin(arch: str, path, seed: int = 0, num_layers: int = 4, tie: bool | None = None) -> pathlib.Path:
    """Saves a tiny checkpoint in the legacy ``pytorch_model.bin`` format.

    transformers 5 dropped ``safe_serialization=False``, so the model is saved normally
    and its safetensors file is rewritten with ``torch.save``. The tensors therefore
    carry the same on-disk names as :func:`make_tiny` (e.g. per-expert MoE weights,
    not the fused in-memory ones) and tied weights are left out. Arguments as for
    :func:`make_tiny`.
    """
    path = make_tiny(arch, path, seed, num_layers, tie)
    st = path / "model.safetensors"
    torch.save(load_file(st), path / "pytorch_model.bin")
    st.unlink()
    return path


def index_of(path) -> dict:
    """Returns the ``weight_map`` of a sharded checkpoint (tensor name -> shard file)."""
    return json.loads((pathlib.Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
