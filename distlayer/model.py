"""``AutoModel.from_pretrained``: the AirLLM-compatible entry point, and ``DistModel``,
which generates like a transformers model over a :class:`~distlayer.pipeline.Pipeline`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from . import arch
from .config import GenerationConfig, PipelineConfig, build
from .errors import ConfigError
from .generate import Generated
from .pipeline import Pipeline
from .scheduler import Group, Scheduler
from .store import LayerStore, open_configured

# Keywords AirLLM's from_pretrained takes that mean nothing here.
AIRLLM_IGNORED = ("profiling_mode",)
# transformers generate() keywords accepted for compatibility: the output is the same.
HF_IGNORED = ("use_cache", "generation_config")


class AutoModel:
    """Entry point with AirLLM's name: ``AutoModel.from_pretrained(...)``."""

    def __init__(self):
        raise TypeError("use AutoModel.from_pretrained(model)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, progress: bool = True,
                        **settings) -> "DistModel":
        """Split the checkpoint (once), plan the stages and start them.

        Args:
            pretrained_model_name_or_path: HF repo id, local model dir, ``.gguf`` file or layer store.
            progress: show a progress bar while splitting.
            **settings: the fields of :class:`~distlayer.config.PipelineConfig`: ``stages``
                (None: one per GPU in the cluster, else 1; ``0``: one in-process stage without
                Ray), ``memory_per_stage`` (None: 90% of what each stage's device has free),
                ``compression``, ``shards_dir``, ``address``, ``dtype``, ``prefetch``,
                ``hf_token``, ``device``, ``in_process``, ``placement``, ``stage_resources``,
                ``cpus_per_stage``, ``threads_per_stage``, ``micro_batches``, ``max_rows``,
                ``context``, ``transport``, ``connect_timeout``, ``gpus_per_stage``, and for
                lost stages ``step_timeout``, ``restart_timeout`` and ``max_restarts`` (README: "When a stage is
                lost"). AirLLM's ``layer_shards_saving_path`` is taken as ``shards_dir``.

        Raises:
            ConfigError: an unknown or bad setting (checked before anything is read or started).
        """
        if "layer_shards_saving_path" in settings:  # AirLLM's name for shards_dir
            path = settings.pop("layer_shards_saving_path")
            settings["shards_dir"] = settings.get("shards_dir") or path
        for key in AIRLLM_IGNORED:
            settings.pop(key, None)
        cfg = build(PipelineConfig, settings, "", "argument")
        return DistModel.load(pretrained_model_name_or_path, cfg, progress)


class DistModel:
    """A model split into stages; generates like a transformers model."""

    def __init__(self, store: LayerStore, pipeline: Pipeline, dtype: torch.dtype):
        self.store, self.pipeline, self.dtype = store, pipeline, dtype
        self.config = store.config
        self.tokenizer = load_tokenizer(store.path)
        self.generation_config = load_generation_config(store.path)
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None

    @classmethod
    def load(cls, model: str | os.PathLike, cfg: PipelineConfig, progress: bool = True) -> "DistModel":
        """Open (or split) ``model``'s layer store and start a pipeline with ``cfg``."""
        return cls.start(open_configured(model, cfg, progress), cfg)

    @classmethod
    def start(cls, store: LayerStore, cfg: PipelineConfig) -> "DistModel":
        """Start a pipeline with ``cfg`` over an opened store."""
        dtype = arch.compute_dtype(cfg.dtype, store.config)
        return cls(store, Pipeline(store, cfg, dtype), dtype)

    @property
    def plan(self):
        """One entry per stage (``placement.PlacedStage``, read-only): its frozen plan
        (``planner.StagePlan``: device, start, end, budget_bytes, budget_source, resident
        and streamed units and bytes, threads) and where it runs (``placement.Placement``:
        node_ip, node_id, pid, store_path, store_source, fetched, fetched_bytes)."""
        return self.pipeline.plan

    @property
    def prediction(self):
        """The cost model's decode step for the plan running, at ``max_rows`` rows
        (``cost.Prediction``: ``step_s``, ``tokens_per_s``, each stage's cost and bound),
        where the nodes were measured (``balance="speed"``, or ``"auto"`` on several
        nodes); else None."""
        return self.pipeline.prediction

    @property
    def survey(self):
        """What was measured of the stages' nodes and links for placement by speed
        (``survey.Survey``: each stage's rates, how they were measured, its link to the
        next), and ``model.pipeline.balance_note`` says how the ranges were chosen; None
        when nothing was measured."""
        return self.pipeline.survey

    def stats(self) -> list[dict]:
        """One dict per stage: peak_weight_bytes, peak_rss_bytes, kv_bytes, load_s, compute_s, transfer_s, …"""
        return self.pipeline.stats()

    def close(self) -> None:
        """Stop the scheduler and the stages, and free their memory."""
        if self._scheduler is not None:
            self._scheduler.close()
        self.pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generation_settings(self, **kw) -> GenerationConfig:
        """Settings from ``kw`` (``GenerationConfig`` fields; transformers' ``stop_strings``
        is ``stop``), with what is left unset taken from the model's generation_config."""
        if "stop_strings" in kw:
            kw["stop"] = kw.pop("stop_strings")
        for key in HF_IGNORED:
            kw.pop(key, None)
        return build(GenerationConfig, kw, "", "argument").resolved(self.generation_config, self.config)

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int = 20,
                 return_dict_in_generate: bool = False, streamer=None, output_logits: bool = False, **kwargs):
        """Generate like ``transformers``' ``generate``.

        Keywords are :class:`~distlayer.config.GenerationConfig` fields (``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``min_new_tokens``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``eos_token_id``, ``pad_token_id``,
        ``stop_strings``/``stop``); ``use_cache`` is accepted (the KV cache is always used).

        Returns:
            ``sequences`` ``[B, T + new]``, or with ``return_dict_in_generate`` an object with
            ``.sequences``, ``.finish_reasons``, ``.completion_tokens`` and (``output_logits``) ``.logits``.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ConfigError("generate() needs input_ids")
        s = self.generation_settings(max_new_tokens=max_new_tokens, **kwargs)
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        input_ids, attention_mask = check_inputs(input_ids, attention_mask, self.config.get_text_config().vocab_size)
        out = self._run(input_ids, attention_mask, s, streamer, output_logits)
        out.sequences = out.sequences.to(device)
        return out if return_dict_in_generate else out.sequences

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler that runs this model's requests, ``generate()``'s included: at most
        ``max_rows`` sequences at once (a larger ``generate()`` batch runs when nothing
        else does), each at most ``context`` tokens (None: no limit). Made on first use, and
        again after one that failed (a stage lost for good)."""
        with self._lock:
            if self._scheduler is None or not self._scheduler.running:
                cfg = self.pipeline.cfg
                self._scheduler = Scheduler(self, cfg.max_rows, cfg.context)
            return self._scheduler

    def _run(self, input_ids, attention_mask, s: GenerationConfig, streamer, output_logits: bool) -> Generated:
        """Run the batch's rows as one group of requests on the scheduler; each row's
        sampling has its own seed (``seed + row``). With ``output_logits`` the rows stay
        together until the last has stopped, so every step has logits for every row."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        rows = [(input_ids[r][mask[r] != 0].tolist(), s.for_row(r))
                for r in range(input_ids.shape[0])]
        reqs = self.scheduler.submit_many(rows, group=Group(hold=output_logits))
        try:
            if streamer is not None:
                stream(streamer, input_ids, reqs, s.pad_token_id)
            for r in reqs:
                r.result()
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        new = max(len(r.tokens) for r in reqs)
        sequences = torch.full((len(reqs), input_ids.shape[1] + new), s.pad_token_id, dtype=torch.long)
        sequences[:, :input_ids.shape[1]] = input_ids
        for i, r in enumerate(reqs):
            sequences[i, input_ids.shape[1]:input_ids.shape[1] + len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        logits = [torch.stack([r.logits[t] for r in reqs]) for t in range(new)] if output_logits else []
        return Generated(sequences, [r.finish_reason for r in reqs], [len(r.tokens) for r in reqs], logits)

    def __call__(self, *args, **kwargs) -> Generated:
        return self.generate(*args, return_dict_in_generate=True, **kwargs)


def stream(streamer, input_ids: torch.Tensor, reqs: list, pad_id: int) -> None:
    """Feed a transformers streamer as ``generate`` does: the prompt, then each step's
    tokens (padding for a row that has stopped), then ``end()``."""
    streamer.put(input_ids)
    rows = [r.stream() for r in reqs]
    while True:
        step = [next(it, None) for it in rows]
        if all(t is None for t in step):
            break
        streamer.put(torch.tensor([pad_id if t is None else t for t in step]))
    streamer.end()


def check_inputs(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` as a ``[B, T]`` tensor and its mask, or a :class:`ConfigError` that says
    what is wrong with them: not token ids, empty, outside the vocabulary, a mask of another
    shape, or a row that is all padding."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"input_ids cannot be read as token ids ({e}): pass a [batch, tokens] tensor of ints") from None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}: pass token ids as a "
                          "[batch, tokens] (or [tokens]) tensor of ints, as the tokenizer returns them")
    if ids.numel() == 0:
        raise ConfigError(f"input_ids of shape {tuple(ids.shape)} is empty: the prompt has no tokens; write a prompt")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ConfigError(f"input_ids holds {sorted(set(bad.tolist()))[:5]}, outside this model's vocabulary of "
                          f"{vocab_size} ids (0 to {vocab_size - 1}): tokenize with this model's tokenizer")
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: pass the "
                          "mask the tokenizer returned with these ids (1 for tokens, 0 for padding)")
    empty = [r for r in range(mask.shape[0]) if not bool(mask[r].any())]
    if empty:
        raise ConfigError(f"row {empty[0]} of the batch is all padding (attention_mask all 0): its prompt is empty; "
                          "write a prompt or leave the row out")
    return ids, mask


def load_tokenizer(path: Path):
    """The model's tokenizer from ``path`` (left padding for generation), or None if it has none."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation pads on the left
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_generation_config(path: Path):
    """The model's transformers ``GenerationConfig`` from ``path``, or None."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(path)
    except OSError:
        return None
