"""The correctness canary: a tiny random model of a checkpoint's own architecture, run
through distlayer and through transformers' own ``generate``, greedy tokens compared.

The model keeps the checkpoint's config (``model_type``, attention and rope settings,
norms, tied embeddings, per-layer kinds) and shrinks only its sizes, so it runs the same
transformers code as the real model in a second. Its weights are random but large
(std 0.2), so greedy decoding picks varied tokens and a wrong cache, mask or position
shows up as a different token. Nothing is downloaded: the config comes from the model's
directory, the HF cache, or the embedded default's GGUF header.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import versions
from .errors import ConfigError
from .planner import head_dim

LAYERS = 2
VOCAB = 512
SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
INTERMEDIATE = 128   # every *intermediate_size (dense, MoE expert, shared expert)
SLIDING_WINDOW = 8   # a sliding window shorter than prompt + new tokens, so it slides
STD = 0.2            # of the random matrices: large enough that greedy tokens vary
NEW_TOKENS = 8
PROMPT_TOKENS = 10
BATCH = 2            # prompts, the second left-padded


def model_config(model: str):
    """``model``'s transformers config, without reading or downloading any weights.

    Args:
        model: ``"default"`` (the embedded SmolLM2), a local model dir, layer store or
            ``.gguf`` file, or an HF repo id (its config from the HF cache, or the Hub's
            ``config.json`` alone when online).

    Raises:
        StoreError: a local path that does not exist or holds no checkpoint.
        ConfigError: the embedded default is not installed, or a repo id's config cannot be had.
    """
    from transformers import AutoConfig

    from .smollm import default_config, is_default
    from .sources import is_repo_id, resolve_source

    if is_default(model):
        try:
            return default_config()
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if not is_repo_id(model) or Path(model).expanduser().exists():
        source = resolve_source(model)  # a path that does not exist gets the path's own error
        if source.kind == "gguf":
            return AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        return AutoConfig.from_pretrained(source.path)
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as e:  # huggingface_hub raises many types; all mean "not available"
        raise ConfigError(f"cannot read the config of {model!r} ({type(e).__name__}): pass a local model directory, "
                          f"or fetch it where the Hub is reachable (`hf download {model} config.json`)") from None


def shrink_config(config, layers: int = LAYERS, vocab: int = VOCAB):
    """A copy of ``config`` with the canary's sizes and everything else kept.

    Sets :data:`SIZES` (``num_key_value_heads`` and ``head_dim`` only where the config has
    them), every ``*intermediate_size`` to :data:`INTERMEDIATE`, ``layers`` layers (per-layer
    lists such as ``layer_types`` cut to match), ``vocab`` tokens (token ids past it
    clamped to its last), a sliding window of at most :data:`SLIDING_WINDOW`, Gemma's
    ``query_pre_attn_scalar`` to the new head size, rope factor lists to the new rotary size.
    """
    config = copy.deepcopy(config)
    text = config.get_text_config()
    was = text.num_hidden_layers
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == was and was > layers:
            setattr(text, key, value[:layers])
        elif key.endswith("intermediate_size") and isinstance(value, int):
            setattr(text, key, INTERMEDIATE)
        elif key.endswith("_token_id"):
            setattr(text, key, _clamp_ids(value, vocab))
    for key, value in SIZES.items():
        if key in ("hidden_size", "num_attention_heads") or getattr(text, key, None) is not None:
            setattr(text, key, value)
    text.num_hidden_layers, text.vocab_size = layers, vocab
    if isinstance(getattr(text, "sliding_window", None), int):
        text.sliding_window = min(text.sliding_window, SLIDING_WINDOW)
    if getattr(text, "query_pre_attn_scalar", None) is not None:
        text.query_pre_attn_scalar = SIZES["head_dim"]
    _fit_rope(text)
    return config


def _clamp_ids(value, vocab: int):
    """Token ids (an int, a list, or None) moved inside a ``vocab``-token vocabulary."""
    if isinstance(value, int):
        return min(value, vocab - 1)
    if isinstance(value, list):
        return [min(v, vocab - 1) for v in value]
    return value


def _fit_rope(text) -> None:
    """Rope factor lists (one factor per rotary frequency, e.g. Phi-3's long rope) cut to
    the shrunk head's frequencies, in ``rope_parameters`` (per layer kind where it is split so)."""
    head = head_dim(text)
    freqs = int(head * (getattr(text, "partial_rotary_factor", None) or 1.0)) // 2

    def fit(params):
        if not isinstance(params, dict):
            return params
        return {k: v[:freqs] if isinstance(v, list) and k.endswith("_factor") else fit(v) for k, v in params.items()}

    if isinstance(getattr(text, "rope_parameters", None), dict):
        text.rope_parameters = fit(text.rope_parameters)


def randomize(model, std: float = STD) -> None:
    """Draw ``model``'s matrices (and stacked expert tensors) from N(0, std); 1-D
    parameters (norms, biases) keep their value plus N(0, 0.02) noise, so a mis-loaded
    norm or bias changes the output while norms stay near neutral. A model that scales
    its embeddings (Gemma's ``embed_scale``, sqrt(hidden)) gets them scaled down to match,
    else the embedding dominates the residual and greedy decoding repeats one token."""
    with torch.no_grad():
        for p in model.parameters():  # tied tensors come once
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.add_(torch.randn_like(p) * 0.02)
        embed = model.get_input_embeddings()
        scale = getattr(embed, "scalar_embed_scale", None)
        if scale:
            embed.weight.mul_(1.0 / scale)


def build_random(config, seed: int = 0, std: float = STD):
    """A float32 model of ``config`` with seeded random weights (:func:`randomize`), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, std)
    return model.eval()


def make_canary(config, out: Path, seed: int = 0) -> Path:
    """Save a random model of ``config`` shrunk (:func:`shrink_config`) into ``out``."""
    model = build_random(shrink_config(config), seed)
    gen = model.generation_config
    if gen.pad_token_id is None:  # left padding needs one; both sides read it from here
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    model.save_pretrained(out)
    return out


def prompts(config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts of the canary of ``config``, the second left-padded; ids, mask, pad id."""
    text = config.get_text_config()
    pad = _clamp_ids(text.pad_token_id if text.pad_token_id is not None else text.eos_token_id, VOCAB)
    pad = pad[0] if isinstance(pad, list) else (pad or 0)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, VOCAB - 16, (BATCH, PROMPT_TOKENS), generator=g)  # clear of the special ids
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = pad, 0
    return ids, mask, pad


def reference(path: Path, ids: torch.Tensor, mask: torch.Tensor, device: str) -> torch.Tensor:
    """transformers' own greedy ``generate`` of the model at ``path`` on ``device``, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out.cpu()


@dataclass
class Run:
    """One distlayer run of the canary: its sequences and how fast it generated."""

    sequences: torch.Tensor
    seconds: float
    new_tokens: int
    streamed_bytes: int   # of the plan: weights the stages stream rather than keep

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def run_distlayer(path: Path, ids: torch.Tensor, mask: torch.Tensor, **settings) -> Run:
    """Greedy generation of the canary at ``path`` through distlayer with ``settings``
    (``from_pretrained`` keywords), float32; the generate call alone is timed."""
    from .model import AutoModel

    with allow_untested(), AutoModel.from_pretrained(path, progress=False, dtype="float32", **settings) as model:
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
        seconds = time.perf_counter() - t
        streamed = sum(p.streamed_bytes for p in model.plan)
    return Run(out.sequences.cpu(), seconds, sum(out.completion_tokens), streamed)


def streaming_settings(path: Path) -> dict:
    """``from_pretrained`` settings under which each stage streams the canary at ``path``
    (its layer store split once): a weight budget of 1.5 times the largest unit, so at
    most one streamed unit fits beside the rest, plus the KV cache and activations of
    the canary's batch and context, which a GPU stage reserves."""
    from .planner import ModelShape
    from .store import LayerStore, split

    with allow_untested():
        store = LayerStore(split(path, progress=False))
    shape, context = ModelShape.from_store(store, torch.float32), PROMPT_TOKENS + NEW_TOKENS
    weights = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    reserve = shape.kv_bytes_per_layer(BATCH, context) * store.num_layers + shape.activation_bytes(BATCH, context)
    return {"memory_per_stage": weights + reserve, "max_rows": BATCH, "context": context}


def first_difference(ours: torch.Tensor, theirs: torch.Tensor, prompt: int, pad: int):
    """The first new-token step where two greedy outputs differ, as ``(step, row, our token,
    their token)`` (step 1 is the first new token), or None when they are identical.
    A row that stopped early is padded with ``pad``."""
    steps = max(ours.shape[1], theirs.shape[1]) - prompt
    a, b = (_pad_to(t[:, prompt:], steps, pad) for t in (ours, theirs))
    for step in range(steps):
        rows = (a[:, step] != b[:, step]).nonzero().flatten().tolist()
        if rows:
            r = rows[0]
            return step + 1, r, int(a[r, step]), int(b[r, step])
    return None


def _pad_to(t: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    return torch.cat([t, torch.full((t.shape[0], n - t.shape[1]), pad, dtype=t.dtype)], dim=1)


@contextlib.contextmanager
def allow_untested():
    """Let distlayer run outside the tested version ranges (its guard warns instead of
    refusing, and the warning is dropped): the canary is how one learns whether such a
    stack gives right answers. The doctor reports the ranges in rows of their own."""
    before = os.environ.get(versions.ALLOW_ENV)
    os.environ[versions.ALLOW_ENV] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if before is None:
            os.environ.pop(versions.ALLOW_ENV, None)
        else:
            os.environ[versions.ALLOW_ENV] = before
