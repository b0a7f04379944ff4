"""LayerRunner: one device, one contiguous layer range, a weight budget. No Ray.

The runner builds the model's own transformers class on the meta device, stubs out
the layers it does not own, and runs the model's own forward. Units (embeddings,
decoder layers, final norm, head) that fit the budget stay resident; the rest are
streamed from the layer store by a background thread that loads ahead, in step
order and across step boundaries, as far as the budget allows
(``streaming.Streamer``). Where the weights live and how forwards are timed is the
device's business, behind one seam (``memory.WeightMemory``): ``streaming.MappedMemory``
on a CPU stage that maps its shards, ``streaming.HostMemory`` on another CPU stage,
``cuda_stream.CudaMemory`` on a GPU: the one its device kind names (``devices.DeviceKind``).
The runner takes it and then asks only what the seam offers: whether streamed units keep
their tensors (``keeps_tensors``) is the tier's to say, not a type test.

Several micro-batches at once (:meth:`LayerRunner.forward_block`, the block schedule):
each micro-batch runs the model's own forward, and all of them advance unit by unit in
lock-step (a greenlet each, switched on one thread: the compute thread on a CPU), so each
streamed unit is taken from the streamer once, runs for every micro-batch, and is then
released. A step of M micro-batches reads the stage's streamed bytes once, not M times.
"""

from __future__ import annotations

from dataclasses import dataclass

import greenlet
import torch
import torch.nn.functional as F
from torch import nn

from . import arch, compute, devices
from .cache import StageCache
from .errors import PlanError, StoreError
from .hardware import peak_rss_bytes
from .memory import WeightMemory
from .planner import StagePlan
from .store import LayerStore
from .streaming import Streamer
from .units import chunk_unit, layer_index

class _Streamed(nn.Module):
    """Wraps a streamed unit's module: its weights arrive just before it runs and
    leave right after."""

    def __init__(self, runner: "LayerRunner", unit: str, inner: nn.Module):
        super().__init__()
        self.runner, self.unit, self.inner = runner, unit, inner
        for name in arch.LAYER_ATTRS:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def forward(self, *args, **kwargs):
        self.runner._materialize(self.unit, self.inner)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.runner._evict(self.unit, self.inner)


class _ChunkedHead(nn.Module):
    """A streamed head run in vocabulary chunks: each chunk's rows of the weight arrive,
    give their share of the logits, and leave, so the head is never held whole."""

    def __init__(self, runner: "LayerRunner", names: list[str], inner: nn.Linear):
        super().__init__()
        self.runner, self.names, self.inner = runner, names, inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = []
        for name in self.names:
            chunk = self.runner._take(name)
            try:
                out.append(F.linear(hidden, chunk["lm_head.weight"], chunk.get("lm_head.bias")))
            finally:
                self.runner._give_back(name)
        return torch.cat(out, dim=-1)


class _RowEmbedding(nn.Module):
    """A streamed embedding read by row: a forward looks up only the rows of its token
    ids in the mapped shard, and the model's own embedding module runs over those rows
    (any scaling it applies is its own); the pages touched are mapped out after. The
    rest of the matrix is never read."""

    def __init__(self, inner: nn.Module, store: LayerStore, key: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.inner, self.store, self.key = inner, store, key
        self.mapping = store.map(arch.EMBED, random=True)
        self.device, self.dtype = device, dtype
        if getattr(inner, "padding_idx", None) is not None:
            inner.padding_idx = None  # it indexes the whole matrix, not the rows looked up (and only matters to gradients)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.store.shard(arch.EMBED)  # a shard changed under its map must not be read
        ids, inverse = torch.unique(input_ids.cpu(), return_inverse=True)
        try:
            rows = self.mapping.tensors[self.key][ids].to(self.device, self.dtype)
        finally:
            self.mapping.page_out(0, len(self.mapping.map))
        meta = self.inner.weight
        self.inner._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        try:
            return self.inner(inverse.to(self.device))
        finally:
            self.inner._parameters["weight"] = meta


@dataclass
class Step:
    """One micro-batch's forward through a stage: the arguments of :meth:`LayerRunner.forward`."""

    x: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    cache_id: str = "default"
    logits_to_keep: int | None = 1


class _Block:
    """Micro-batches running in lock-step over a stage's streamed units, one greenlet
    each: a forward that reaches a streamed unit switches back to the loop
    (:meth:`LayerRunner._run_block`), which runs the others up to it too, so by the time
    any forward runs the unit every one has reached it. The first takes it from the
    streamer; the last to run it releases it."""

    def __init__(self, streamer: Streamer, forwards: int):
        self.streamer, self.forwards = streamer, forwards
        self.loop = greenlet.getcurrent()
        self.units: dict[str, list] = {}  # name -> [tensors, forwards that ran it]

    def take(self, name: str) -> dict[str, torch.Tensor]:
        self.loop.switch()
        if name not in self.units:
            self.units[name] = [self.streamer.take(name), 0]
        return self.units[name][0]

    def first(self, name: str) -> bool:
        """No forward of the block has run ``name`` yet."""
        return self.units[name][1] == 0

    def last(self, name: str) -> bool:
        """The forward about to give ``name`` back is the last to run it."""
        return self.units[name][1] == self.forwards - 1

    def give_back(self, name: str) -> bool:
        """One forward is done with ``name``; True when it was the last (``name`` released)."""
        entry = self.units[name]
        entry[1] += 1
        if entry[1] < self.forwards:
            return False
        del self.units[name]
        self.streamer.release(name)
        return True


class LayerRunner:
    """Runs one stage's layers on one device within a weight budget.

    Args:
        store: the layer store to read units from.
        plan: the stage's plan: its range, weight budget, resident and streamed units, threads.
        device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        dtype: compute dtype; default the checkpoint's.
        prefetch: load streamed units on a background thread ahead of use.
    """

    def __init__(self, store: LayerStore, plan: StagePlan, device="cpu", dtype=None, prefetch: bool = True):
        self.device = torch.device(device)
        self.kind = devices.kind_of(self.device)
        if self.kind.sets_threads:  # a CPU stage is set up and computes on the process's compute thread
            compute.run(self._setup, store, plan, dtype, prefetch)
        else:
            self._setup(store, plan, dtype, prefetch)

    def _setup(self, store: LayerStore, plan: StagePlan, dtype, prefetch: bool) -> None:
        self.store, self.range, self.stage = store, plan.layer_range, plan.stage
        config = store.config
        self.config = config
        self.dtype = dtype or arch.checkpoint_dtype(config)
        self.budget = plan.weight_budget_bytes
        self.threads = plan.threads if self.kind.sets_threads else None
        self.unit_bytes = {u: store.unit_bytes(u, self.dtype) for u in self.range.units()}
        self.resident = list(plan.resident_units)
        self.streamed = list(plan.streamed_units)
        self.streamed_bytes = plan.streamed_bytes  # a step's reads from the store, at batch 1 (the planner's count)
        self.host_bytes = plan.host_bytes  # of the streamed units, those kept in pinned host memory
        if set(self.resident) | set(self.streamed) != set(self.unit_bytes):
            raise PlanError(f"stage {self.stage}'s plan names units {sorted(set(self.resident) | set(self.streamed))} "
                            f"but its range holds {sorted(self.unit_bytes)}: plan it again for this store")
        self.caches: dict[str, StageCache] = {}
        # The units the streamer hands over, in step order: an embedding streams by row
        # instead, and a head in chunks streams chunk by chunk.
        self.head_chunks = plan.head_chunks if arch.HEAD in self.streamed else 1
        self.order = [c for u in self.streamed if u != arch.EMBED for c in (
            [chunk_unit(u, j) for j in range(self.head_chunks)] if u == arch.HEAD and self.head_chunks > 1 else [u])]
        self._taken: set[str] = set()  # handed to the running forward(s), not yet given back
        self._block: _Block | None = None  # micro-batches in lock-step, while forward_block runs them
        self.blocks = plan.blocks and bool(self.order)  # the plan runs waves of micro-batches as blocks
        self.memory: WeightMemory
        if plan.maps_shards and not self.kind.maps_shards:
            raise PlanError(f"stage {self.stage}'s plan maps its shards in place, which only a CPU stage does, but it "
                            f"runs on {self.device}: plan it again for this device")
        tier = self.kind.tier_class(plan.maps_shards)  # its device kind's memory tier (devices.DeviceKind)
        if plan.host_units and (plan.maps_shards or not self.kind.pinned_host):  # which ones, the tier checks
            raise PlanError(f"stage {self.stage}'s plan keeps units in pinned host memory, which only a GPU stage "
                            f"does, but it runs on {self.device}: plan it again for this device")
        if plan.maps_shards:
            self.memory = tier(store, self.dtype, self.device, self.budget, self.unit_bytes, self.stage,
                               {arch.HEAD: self.head_chunks} if self.head_chunks > 1 else None)
        elif self.head_chunks > 1:
            raise PlanError(f"stage {self.stage}'s plan streams the head in chunks, which only a CPU stage that "
                            "maps its shards does: plan it again for this store and device")
        else:
            host = {"host_units": plan.host_units} if plan.host_units else {}
            self.memory = tier(store, self.dtype, self.device, self.budget, self.unit_bytes, self.stage, **host)

        self.model = arch.build_skeleton(config, dtype=self.dtype)
        self.parts = arch.parts(self.model)
        self.cache_keyword = arch.cache_keyword(self.parts)
        _buffers_to(self.model, self.device)  # no-op on the CPU
        self._prepare_modules()
        for unit in self.resident:
            self._assign(unit, self.memory.load_resident(unit))
        if self.memory.keeps_tensors:  # streamed units keep their tensors: assigned once, here
            for unit in self.order:
                if unit in self.unit_bytes:  # a whole unit, not a chunk
                    self._assign(unit, self.memory.tensors(unit))
        self.memory.prepare(self.order)
        self.streamer = Streamer(self.memory, self.order, self.stage, prefetch)
        self.streamer.start()

    # ------------------------------------------------------------------ setup

    def _prepare_modules(self) -> None:
        r, p = self.range, self.parts
        for i in range(len(p.layers)):
            if not r.start <= i < r.end:
                p.layers[i] = arch.SkippedLayer(p.layers[i])
        if not r.last:
            p.base.norm = nn.Identity()
            p.model.lm_head = nn.Identity()
        streamed = set(self.streamed)
        if arch.EMBED in streamed:
            self._row_embedding()
        for i in range(r.start, r.end):
            if arch.layer_unit(i) in streamed:
                p.layers[i] = _Streamed(self, arch.layer_unit(i), p.layers[i])
        if arch.NORM in streamed:
            p.base.norm = _Streamed(self, arch.NORM, p.base.norm)
        if arch.HEAD in streamed and self.head_chunks > 1:
            if not isinstance(p.model.lm_head, nn.Linear):
                raise PlanError(f"stage {self.stage}'s plan streams the head in chunks but this model's head is a "
                                f"{type(p.model.lm_head).__name__}, not a Linear: give the stage a budget that "
                                "holds the head whole")
            p.model.lm_head = _ChunkedHead(self, self.order[-self.head_chunks:], p.model.lm_head)
        elif arch.HEAD in streamed:
            p.model.lm_head = _Streamed(self, arch.HEAD, p.model.lm_head)

    def _row_embedding(self) -> None:
        """Make the streamed embedding one read by row; the embed unit's other tensors, if
        any, are loaded whole (on the stage's device, in the compute dtype)."""
        key = "model.embed_tokens.weight"
        rows = _RowEmbedding(self.parts.base.embed_tokens, self.store, key, self.device, self.dtype)
        tensors = rows.mapping.tensors
        if key not in tensors:
            raise StoreError(f"the embed unit of {self.store.path} has no {key}: the store does not match this model")
        others = {k: t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
                  for k, t in tensors.items() if k != key}
        if others:
            self.model.load_state_dict(others, strict=False, assign=True)
        self.parts.base.embed_tokens = rows

    def _module(self, unit: str) -> nn.Module:
        p = self.parts
        mod = {arch.EMBED: lambda: p.base.embed_tokens, arch.NORM: lambda: p.base.norm,
               arch.HEAD: lambda: p.model.lm_head}.get(unit, lambda: p.layers[layer_index(unit)])()
        return mod.inner if isinstance(mod, _Streamed) else mod

    def _assign(self, unit: str, tensors: dict[str, torch.Tensor], module: nn.Module | None = None) -> None:
        """Put a unit's tensors into its module(s) without copying."""
        if module is None and unit == arch.EMBED:
            missing = set(tensors) - set(self.model.state_dict(keep_vars=True))
            if missing:
                raise StoreError(f"embed unit has tensors {sorted(missing)[:3]} this model does not: wrong store")
            self.model.load_state_dict(tensors, strict=False, assign=True)
            return
        module = module or self._module(unit)
        prefix = self.parts.prefixes.get(unit, "model.embed_tokens.")
        local = {k[len(prefix):]: t for k, t in tensors.items()}
        module.load_state_dict(local, strict=True, assign=True)

    # ------------------------------------------------------------------ streaming

    def _take(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of the streamed unit or chunk the forward runs next."""
        tensors = self.streamer.take(name) if self._block is None else self._block.take(name)
        self._taken.add(name)  # once taken: a forward ended before (in a block, at the switch) took nothing
        return tensors

    def _give_back(self, name: str) -> None:
        if self._block is None:
            self.streamer.release(name)
        elif not self._block.give_back(name):
            return  # other forwards of the block run it yet
        self._taken.discard(name)

    def _materialize(self, unit: str, module: nn.Module) -> None:
        tensors = self._take(unit)
        if not self.memory.keeps_tensors and (self._block is None or self._block.first(unit)):
            self._assign(unit, tensors, module)  # else the module holds them (since set-up, or the block's first)

    def _evict(self, unit: str, module: nn.Module) -> None:
        if not self.memory.keeps_tensors and (self._block is None or self._block.last(unit)):
            _to_meta(module)
        self._give_back(unit)

    def _resync_stream(self) -> None:
        """After a failed forward the prefetch order is lost: restart it at the step's start."""
        self.streamer.stop()
        dropped = sorted(self._taken)  # taken and never given back
        self._taken.clear()
        if not self.memory.keeps_tensors:
            for unit in dropped:
                _to_meta(self._module(unit))
        self.streamer.restart(dropped)

    # ------------------------------------------------------------------ running

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache_id: str = "default", logits_to_keep: int | None = 1) -> torch.Tensor:
        """Run this stage's units on one micro-batch.

        Args:
            x: token ids ``[B, T]`` on the first stage, else hidden states ``[B, T, H]``.
            attention_mask: ``[B, past + T]``, 1 for real tokens, 0 for padding; or None.
            position_ids: ``[B, T]`` positions of the new tokens.
            cache_id: which sequence group's KV cache to extend.
            logits_to_keep: on the last stage, how many final positions get logits (0: all;
                None: none, only the KV cache is extended).

        Returns:
            Hidden states ``[B, T, H]``, or logits ``[B, logits_to_keep or T, V]`` on the last
            stage (``[B, 0, H]`` there with ``logits_to_keep`` None).
        """
        return self.forward_block([Step(x, attention_mask, position_ids, cache_id, logits_to_keep)])[0]

    @torch.inference_mode()
    def forward_block(self, steps: list[Step]) -> list[torch.Tensor]:
        """Run this stage's units on several micro-batches at once, each streamed unit read
        once for all of them (the block schedule: the module docstring); each output is
        what :meth:`forward` gives for its step. The steps must extend different KV caches.
        If one step fails the whole block raises, and streaming restarts at the step's
        first unit, as after a failed :meth:`forward`."""
        if self.kind.sets_threads and not compute.current():
            return compute.run(self.forward_block, steps)
        if len({s.cache_id for s in steps}) < len(steps):
            raise ValueError("a block's micro-batches extend one KV cache each: run steps of one cache one after another")
        with self.kind.make_current(self.device):
            begun = self.memory.begin_forward()
            self._set_threads()
            try:
                if len(steps) > 1 and self.order:
                    outs = self._run_block(steps)
                else:
                    outs = [self._run(s) for s in steps]
            except BaseException:
                self._resync_stream()
                raise
            self.memory.end_forward(begun)
            return outs

    def _run_block(self, steps: list[Step]) -> list[torch.Tensor]:
        """Each step's forward in a greenlet of its own, advanced in lock-step (:class:`_Block`).
        Steps that stop short of the head (``logits_to_keep`` None on the last stage) take
        fewer units, so they run as a block of their own."""
        outs: list = [None] * len(steps)
        groups = [[i for i, s in enumerate(steps) if (s.logits_to_keep is None) == short] for short in (False, True)]
        for group in (g for g in groups if g):
            self._block = _Block(self.streamer, len(group))
            forwards = {i: greenlet.greenlet(lambda i=i: self._run(steps[i])) for i in group}
            try:
                while forwards:
                    for i, g in list(forwards.items()):
                        out = g.switch()  # runs it to its next streamed unit, or to its end
                        if g.dead:
                            outs[i] = out
                            del forwards[i]
            finally:
                for g in forwards.values():  # one failed: end the others where they wait
                    g.throw(greenlet.GreenletExit)
                self._block = None
        return outs

    def _run(self, step: Step) -> torch.Tensor:
        """One step's forward through the model's own code (in :meth:`forward_block`)."""
        cache = self.caches.get(step.cache_id)
        if cache is None:
            cache = self.caches[step.cache_id] = StageCache(self.config, range(self.range.start, self.range.end))
        x = self.memory.to_device(step.x)
        mask = step.attention_mask
        kw = dict(attention_mask=None if mask is None else self.memory.to_device(mask),
                  position_ids=self.memory.to_device(step.position_ids), use_cache=True)
        kw[self.cache_keyword] = cache
        if self.range.first:
            kw["input_ids"] = x
        else:
            kw["inputs_embeds"] = x.to(self.dtype)
        if self.range.last and step.logits_to_keep is not None:
            out = self.model(**kw, logits_to_keep=step.logits_to_keep).logits
        elif self.range.last:  # no head: a replayed step whose output nobody reads
            out = self.model.model(**kw).last_hidden_state[:, :0]
        else:
            out = self.model.model(**kw).last_hidden_state
        cache.advance(x.shape[1])
        return out

    def _set_threads(self) -> None:
        """CPU forwards run on the stage's threads, small ones too (measurements:
        benchmarks/README.md). OpenMP's thread count is per calling thread, so this is set
        on the thread that runs the forward."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def drop(self, cache_id: str) -> None:
        """Free the KV cache of a finished sequence group."""
        self.caches.pop(cache_id, None)

    def kv_bytes(self) -> int:
        """Bytes currently held by this stage's KV caches."""
        return sum(c.nbytes() for c in self.caches.values())

    def stats(self) -> dict:
        """Peak weight bytes, budget, resident / streamed units, how many streamed units were
        fetched for forwards, load and compute seconds (on a GPU measured with CUDA events,
        plus host-to-device bytes and seconds)."""
        measured = self.memory.stats()
        return {
            "peak_weight_bytes": measured.pop("peak_weight_bytes"),
            "budget_bytes": self.budget,
            "resident_bytes": sum(self.unit_bytes[u] for u in self.resident),
            "streamed_bytes": self.streamed_bytes,
            "resident_units": list(self.resident),
            "streamed_units": list(self.streamed),
            "host_bytes": self.host_bytes,
            "stream_reads": self.streamer.taken,  # streamed units (or head chunks) fetched for forwards
            "kv_bytes": self.kv_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            **measured,
        }

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A forward's output in host memory, ready to hand to the next stage (pinned on a GPU)."""
        return self.memory.to_host(t)

    def close(self) -> None:
        """Stop the prefetch thread and free the device's buffers."""
        self.streamer.stop(timeout=10)
        self.memory.close()


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    """Move the buffers the skeleton built with real values (rotary frequencies, embedding
    scales: not in the checkpoint) to ``device``; meta ones are loaded with their unit."""
    for m in module.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device.type != "meta":
                m._buffers[k] = b.to(device)


def _to_meta(module: nn.Module) -> None:
    """Drop a module's weights (parameters and persistent buffers). Non-persistent
    buffers, such as Gemma's embedding scale, are not in the checkpoint and stay."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None and k not in m._non_persistent_buffers_set:
                m._buffers[k] = b.to("meta")
