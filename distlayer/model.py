"""``AutoModel.from_pretrained``: the AirLLM-compatible entry point."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from .errors import ConfigError
from .generate import Generated, SamplingSettings, generate, picking
from .pipeline import Pipeline, PipelineOptions
from .planner import budgets_from
from .runner import _config_dtype
from .store import LayerStore, open_store

AHEAD = 3  # decode steps in flight per micro-batch when the last stage picks the tokens
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or a name like ``"bfloat16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ConfigError(f"dtype={dtype!r}: use one of {', '.join(sorted(_DTYPES))}")


class AutoModel:
    """Entry point with AirLLM's name: ``AutoModel.from_pretrained(...)``."""

    def __init__(self):
        raise TypeError("use AutoModel.from_pretrained(model)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, stages: int | None = None,
                        memory_per_stage=None, compression: str | None = None, shards_dir=None, address=None,
                        dtype=None, prefetch: bool = True, hf_token: str | None = None, device: str | None = None,
                        progress: bool = True, **kwargs) -> "DistModel":
        """Split the checkpoint (once), plan the stages and start them.

        Args:
            pretrained_model_name_or_path: HF repo id, local model dir, ``.gguf`` file or layer store.
            stages: pipeline stages; None: one per GPU in the cluster, else 1. ``0`` runs one
                in-process stage without Ray.
            memory_per_stage: budget per stage (``"4GiB"``, bytes, or a list per stage); None:
                90% of what each stage's device has free (a GPU's memory, or on CPU an equal
                share of the node's available RAM among its stages).
            compression: None (``"8bit"`` / ``"4bit"`` are not available yet).
            shards_dir: where the per-layer shards live.
            address: None for a local Ray, ``"auto"`` or ``"host:port"`` to join a cluster.
            dtype: compute dtype (default: the checkpoint's).
            prefetch: stream units on a background thread ahead of use.
            hf_token: token for gated HF repos.
            device: ``"cpu"``, ``"cuda"``…; default CUDA when available.
            progress: show a progress bar while splitting.
            **kwargs: pipeline options (``in_process``, ``placement``, ``stage_resources``,
                ``cpus_per_stage``, ``threads_per_stage``, ``micro_batches``, ``batch_size``,
                ``context``); see ``PipelineOptions``.
        """
        if "layer_shards_saving_path" in kwargs:  # AirLLM's name for shards_dir
            shards_dir = shards_dir or kwargs.pop("layer_shards_saving_path")
        kwargs.pop("profiling_mode", None)
        opt_names = set(PipelineOptions.__dataclass_fields__) - {"stages", "address", "device"}
        unknown = set(kwargs) - opt_names
        if unknown:
            raise ConfigError(f"from_pretrained got unknown arguments {sorted(unknown)}; "
                              f"pipeline options are {sorted(opt_names)}")
        opts = PipelineOptions(stages=stages, address=address, device=device, **kwargs)
        # bad sizes fail here, before any checkpoint or Ray work
        budgets_from(memory_per_stage, stages or (len(memory_per_stage)
                                                 if isinstance(memory_per_stage, (list, tuple)) else 1))
        store = open_store(pretrained_model_name_or_path, shards_dir, compression, hf_token, progress)
        dt = resolve_dtype(dtype) or _config_dtype(store.config)
        return DistModel(store, Pipeline(store, memory_per_stage, dt, prefetch, opts), dt)


class DistModel:
    """A model split into stages; generates like a transformers model."""

    def __init__(self, store: LayerStore, pipeline, dtype: torch.dtype):
        self.store, self.pipeline, self.dtype = store, pipeline, dtype
        self.config = store.config
        self.tokenizer = _load_tokenizer(store.path)
        self.generation_config = _load_generation_config(store.path)

    @property
    def plan(self):
        """One entry per stage: node_ip, pid, device, start, end, resident_bytes, streamed_bytes."""
        return self.pipeline.plan

    def stats(self) -> list[dict]:
        """One dict per stage: peak_weight_bytes, peak_rss_bytes, load_s, compute_s, transfer_s, …"""
        return self.pipeline.stats()

    def close(self) -> None:
        """Stop the stages and free their memory."""
        self.pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sampling_settings(self, **kw) -> SamplingSettings:
        """Sampling settings from the model's generation_config, overridden by ``kw`` (HF names)."""
        gc = self.generation_config
        max_new = kw.pop("max_new_tokens", None)
        eos = kw.pop("eos_token_id", None)
        if eos is None:
            eos = getattr(gc, "eos_token_id", None) if gc is not None else None
            if eos is None:
                eos = getattr(self.config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = kw.pop("pad_token_id", None)
        if pad is None:
            pad = next((v for v in (getattr(gc, "pad_token_id", None), getattr(self.config, "pad_token_id", None))
                        if v is not None), eos_ids[0] if eos_ids else 0)
        def pick(name, default):
            v = kw.pop(name, None)
            if v is None and gc is not None:
                v = getattr(gc, name, None)
            return default if v is None else v
        s = SamplingSettings(
            max_new_tokens=20 if max_new is None else max_new,
            do_sample=bool(pick("do_sample", False)),
            temperature=float(pick("temperature", 1.0)),
            top_k=pick("top_k", None),
            top_p=pick("top_p", None),
            seed=kw.pop("seed", None),
            eos_token_ids=eos_ids,
            stop_strings=list(kw.pop("stop_strings", None) or []),
            pad_token_id=int(pad),
        )
        return s

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int = 20, use_cache: bool = True,
                 return_dict_in_generate: bool = False, streamer=None, output_logits: bool = False, **kwargs):
        """Generate like ``transformers``' ``generate``.

        ``use_cache`` is accepted for compatibility; the KV cache is always used (the
        output is the same). Sampling keys: ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``seed``; stopping: ``eos_token_id``, ``stop_strings``.

        Returns:
            ``sequences`` ``[B, T + new]``, or with ``return_dict_in_generate`` an object with
            ``.sequences``, ``.finish_reasons``, ``.completion_tokens`` and (``output_logits``) ``.logits``.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ConfigError("generate() needs input_ids")
        kwargs.pop("generation_config", None)
        allowed = {"do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_id", "pad_token_id", "stop_strings"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise ConfigError(f"generate() got unsupported arguments {sorted(unknown)}; supported: {sorted(allowed)}")
        try:
            s = self.sampling_settings(max_new_tokens=max_new_tokens, **kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        # The batch runs as micro-batches (one per device that works at once). Unless logits
        # are wanted, the last stage picks each token (greedy or sampled, each micro-batch
        # with its own seed), and on Ray actors a few steps stay in flight, the first stage
        # taking the last stage's tokens straight from it, so no stage waits on this process.
        groups = 1 if streamer is not None else self.pipeline.micro_batches(input_ids.shape[0])
        picks = None if output_logits else [picking(s, k) for k in range(groups)]
        ahead = AHEAD if picks and self.pipeline.remote else 1
        cache_id = uuid.uuid4().hex

        def step(k, ids, mask, pos):
            return self.pipeline.submit(ids, mask, pos, f"{cache_id}:{k}", pick=picks and picks[k])

        def fetch(handle):
            out = self.pipeline.fetch(handle)
            return out if picks else out[:, -1, :]

        try:
            out = generate(step, input_ids, attention_mask, s, tokenizer=self.tokenizer, streamer=streamer,
                           keep_logits=output_logits, fetch=fetch, groups=groups, ahead=ahead)
        finally:
            self.pipeline.drop(cache_id)
        out.sequences = out.sequences.to(device)
        return out if return_dict_in_generate else out.sequences

    def __call__(self, *args, **kwargs) -> Generated:
        return self.generate(*args, return_dict_in_generate=True, **kwargs)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation pads on the left
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_generation_config(path: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
