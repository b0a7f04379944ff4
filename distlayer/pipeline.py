"""The driver: plans stages, starts one StageActor per stage, and moves micro-batches
of hidden states through them.

With Ray, each stage is an actor on its own device (a GPU, or a share of a node's
CPUs), placed with a placement group; hidden states go from actor to actor, never
through the driver (over Unix sockets when the driver and every stage share a node, see
``channel``; else as ObjectRefs), and several micro-batches are in flight so every
stage works at once. ``in_process=True`` runs the same StageActor objects in
this process, one after another, without Ray. This is the only module that imports
``ray``.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from dataclasses import asdict, dataclass

import torch

from .channel import Link, Mailbox
from .errors import ConfigError, PlanError, StageError
from .generate import SamplingSettings
from .planner import budgets_from, plan_concurrency, plan_stages
from .runner import LayerRange
from .stage import StageActor
from .store import LayerStore

# libgomp's spin before an idle OpenMP thread sleeps. CPU stages on one node take
# turns on its cores, so a stage that just finished must not spin on the cores the
# next stage needs, yet a thread between two ops of a forward should not sleep.
# Measured on a 2-core node (SmolLM2, batch 16): the default 300000 gives 0.89x
# transformers' speed, 30000-100000 about 1.0x, 0 (sleep at once) 0.83x.
GOMP_SPINCOUNT = "50000"


@dataclass
class StagePlan:
    """Where one stage runs and what it holds (``model.plan`` entries)."""

    stage: int
    node_ip: str
    pid: int | None
    device: str
    start: int            # first decoder layer (inclusive)
    end: int              # last decoder layer (exclusive)
    budget_bytes: int | None
    resident_bytes: int
    streamed_bytes: int
    node_id: str = ""     # Ray node id ("" in-process)
    threads: int | None = None  # torch threads the stage computes with

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineOptions:
    """How stages are started and placed (everything but the model and budgets).

    Attributes:
        stages: number of stages; None: one per GPU in the cluster, else 1.
        in_process: run the stages in this process without Ray.
        address: None for a local Ray, ``"auto"`` or ``"host:port"`` for a cluster.
        device: ``"cpu"`` or ``"cuda"``; None: CUDA when the cluster has GPUs.
        placement: ``"pack"`` (fill one node first) or ``"spread"`` (one stage per node).
        stage_resources: extra Ray resources per stage, e.g. ``[{"node_a": 1}, {"node_b": 1}]``.
        cpus_per_stage: Ray CPUs per stage; default an equal share of the cluster, at most 1.
        threads_per_stage: torch threads per CPU stage; default: its node's CPUs, divided among
            the node's stages that can be busy at once (``planner.plan_concurrency``).
        micro_batches: micro-batches per batch; default one per device: per GPU stage, or per
            CPU node (stages sharing a node's cores take turns with the whole batch).
        batch_size, context: the job's largest batch and sequence (prompt + new tokens). With a
            context, each budget also reserves that KV cache and activations; without, a
            budget bounds weights alone.
        transport: how work goes from stage to stage on Ray. ``"auto"``: when the driver and
            every stage are on one node, from mailbox to mailbox over Unix sockets with no Ray
            call per step (``channel``), else as Ray object refs; ``"ray"``: always object refs.
    """

    stages: int | None = None
    in_process: bool = False
    address: str | None = None
    device: str | None = None
    placement: str = "pack"
    stage_resources: list[dict] | None = None
    cpus_per_stage: float | None = None
    threads_per_stage: int | None = None
    micro_batches: int | None = None
    batch_size: int = 1
    context: int | None = None
    transport: str = "auto"

    def __post_init__(self):
        if self.transport not in ("auto", "ray"):
            raise ConfigError(f"transport={self.transport!r}: use 'auto' or 'ray'")
        if self.placement not in ("pack", "spread"):
            raise ConfigError(f"placement={self.placement!r}: use 'pack' or 'spread'")
        if self.stages is not None and (not isinstance(self.stages, int) or self.stages < 0):
            raise ConfigError(f"stages={self.stages!r}: use a whole number of stages (0: in-process)")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ConfigError(f"micro_batches={self.micro_batches}: use 1 or more")


def kv_bytes_per_layer(config, batch_size: int, context: int, dtype: torch.dtype) -> int:
    """KV cache bytes one decoder layer needs for ``batch_size`` sequences of ``context`` tokens."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * batch_size * context * heads * head_dim * dtype.itemsize


def activation_bytes(config, batch_size: int, context: int, dtype: torch.dtype) -> int:
    """Rough activation bytes of a prefill: a few hidden-state copies plus last-position logits."""
    text = config.get_text_config()
    return batch_size * context * text.hidden_size * dtype.itemsize * 4 + batch_size * text.vocab_size * 4


def plan_ranges(store: LayerStore, budgets: list[int | None], dtype: torch.dtype, batch_size: int = 1,
                context: int | None = None) -> list[LayerRange]:
    """Contiguous layer ranges for stages with these budgets (see ``planner.plan_stages``)."""
    kv, reserve = _kv_and_reserve(store.config, batch_size, context, dtype)
    cuts = plan_stages(
        [store.unit_bytes(f"layer.{i}", dtype) for i in range(store.num_layers)], budgets,
        embed=store.unit_bytes("embed", dtype), norm=store.unit_bytes("norm", dtype),
        head=store.unit_bytes("head", dtype), kv_bytes_per_layer=kv, reserve_bytes=reserve,
    )
    return [LayerRange(a, b, first=i == 0, last=i == len(cuts) - 1) for i, (a, b) in enumerate(cuts)]


def weight_budgets(store: LayerStore, ranges: list[LayerRange], budgets: list[int | None], dtype, batch_size=1,
                   context=None) -> list[int | None]:
    """What each stage's runner may spend on weights: its budget less KV cache and activations."""
    kv, reserve = _kv_and_reserve(store.config, batch_size, context, dtype)
    return [None if b is None else b - kv * (r.end - r.start) - reserve for r, b in zip(ranges, budgets)]


def _kv_and_reserve(config, batch_size: int, context: int | None, dtype) -> tuple[int, int]:
    """KV bytes per layer and activation bytes to keep free; both 0 when no context is given,
    so a budget then bounds weights alone."""
    if not context:
        return 0, 0
    return kv_bytes_per_layer(config, batch_size, context, dtype), activation_bytes(config, batch_size, context, dtype)


@dataclass
class Handle:
    """A submitted step: the last stage's result (an ObjectRef on Ray, the value
    in-process), or its key in the driver's mailbox (``channel``)."""

    ref: object = None
    key: str | None = None
    picked: bool = False  # the last stage picked tokens, which also went to the first stage


def stage_env(device: str, all_cores: bool, environ=None) -> dict[str, str]:
    """OpenMP settings for a CPU stage's process, unless the user set their own.

    - ``GOMP_SPINCOUNT``: idle threads spin only briefly (see ``GOMP_SPINCOUNT`` above).
    - With ``all_cores`` (the stage computes on every core of its node, taking turns with
      the node's other stages), its OpenMP threads are bound one per core, in the same
      order in every stage. Measured on a 2-core node (SmolLM2, 2 stages, against
      transformers in the same run): batch 1 0.91x -> 0.95x, batch 4 1.06x -> 1.09x,
      batch 16 0.97x -> 1.04x, near the 1.08x of the same stages in one process. Stages
      that compute at once on one node (fewer threads each) are left unbound.
    """
    environ = os.environ if environ is None else environ
    if device != "cpu":
        return {}
    env = {}
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(environ):
        env["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    if all_cores and not {"OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY"} & set(environ):
        env.update(OMP_PROC_BIND="close", OMP_PLACES="cores")
    return env


def local_ip() -> str:
    """This machine's address (best effort)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Pipeline:
    """Stages of one model, in Ray actors or in this process.

    Args:
        store: the layer store (its path must exist on every node that runs a stage).
        memory_per_stage: budget per stage (weights + KV + activations): a size, a list
            per stage, or None for "what the device has" (see :meth:`_budgets`). A
            list's length is the number of stages when ``opts.stages`` is None.
        dtype: compute dtype.
        prefetch: stream units on a background thread.
        opts: placement and batching options.
    """

    def __init__(self, store: LayerStore, memory_per_stage, dtype: torch.dtype, prefetch: bool,
                 opts: PipelineOptions):
        self.opts, self.store, self.dtype = opts, store, dtype
        self._ray = None
        self._pg = None
        self.actors: list = []
        self.transport = "in-process"
        self._keys = itertools.count()
        self._inbox: Mailbox | None = None  # channel: results from the last stage
        self._link: Link | None = None      # channel: work to the first stage
        try:
            self._start(memory_per_stage, prefetch)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ start-up

    def _start(self, memory_per_stage, prefetch) -> None:
        o = self.opts
        if o.in_process or o.stages == 0:
            n = max(o.stages or 1, 1)
            device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.actors = [StageActor(str(self.store.path), i, device, self.dtype, prefetch) for i in range(n)]
            nodes = [(local_ip(), "")] * n
            self._micro, threads = 1, [None] * n  # stages never overlap here; torch's threads are the caller's
        else:
            n, device, threads = self._start_ray(prefetch, memory_per_stage)
            nodes = self._get([a.__ray_call__.remote(_node) for a in self.actors])
        node_ids = [node_id for _, node_id in nodes]
        budgets = self._budgets(budgets_from(memory_per_stage, n), device, node_ids)
        ranges = plan_ranges(self.store, budgets, self.dtype, o.batch_size, o.context)
        wb = weight_budgets(self.store, ranges, budgets, self.dtype, o.batch_size, o.context)
        infos = self._get([self._call(a, "setup", r, b, t) for a, r, b, t in zip(self.actors, ranges, wb, threads)])
        self.plan = [StagePlan(i, ip, info["pid"], info["device"], r.start, r.end, info["budget_bytes"],
                               info["resident_bytes"], info["streamed_bytes"], node_id, info["threads"])
                     for i, ((ip, node_id), info, r) in enumerate(zip(nodes, infos, ranges))]
        if self.remote:
            here = self._ray.get_runtime_context().get_node_id()
            self._connect(o.transport == "auto" and set(node_ids) == {here})

    def _connect(self, channels: bool) -> None:
        """With ``channels``, chain the stages' mailboxes: the driver's link to the first
        stage, each stage's to the next, the last stage's to the driver and (for the tokens
        it picks) to the first stage; then start their loops. Else hand-offs stay Ray
        object refs."""
        self.transport = "channel" if channels else "ray"
        if not channels:
            return
        n, key = len(self.actors), os.urandom(32)
        addrs = self._get([self._call(a, "listen", key, 2 if i == 0 else 1) for i, a in enumerate(self.actors)])
        self._inbox = Mailbox(key, "the driver")
        links = [{"next": (addrs[i + 1], f"stage {i + 1}")} for i in range(n - 1)]
        links.append({"driver": (self._inbox.address, "the driver"), "ring": (addrs[0], "stage 0")})
        self._get([self._call(a, "connect", key, ln) for a, ln in zip(self.actors, links)])
        self._link = Link(addrs[0], key, "the driver", "stage 0")
        self._get([self._call(a, "serve") for a in self.actors])

    def _budgets(self, budgets: list[int | None], device: str, node_ids: list[str]) -> list[int | None]:
        """A stage without a budget gets 90% of what its device has free: its GPU's memory,
        or on CPU an equal share of its node's available RAM among the node's stages."""
        if any(b is None for b in budgets):
            free = self._get([self._call(a, "free_memory") for a in self.actors])
            share = [node_ids.count(n) if device == "cpu" else 1 for n in node_ids]
            budgets = [b if b is not None else int(f * 0.9) // k for b, f, k in zip(budgets, free, share)]
        return budgets

    def _start_ray(self, prefetch, memory_per_stage) -> tuple[int, str, list[int | None]]:
        """Place the stages and start their actors; returns the number of stages, the
        device and each stage's torch threads (``planner.plan_concurrency``, from the nodes
        the placement group chose)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        o = self.opts
        self._ray = ray
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True)
            if o.address is None:
                ray.init(**kw)
            else:
                try:
                    ray.init(address=o.address, **kw)
                except ConnectionError as e:
                    raise StageError(
                        f"cannot join the Ray cluster at {o.address!r} ({e}): start one with `ray start --head` "
                        "on the head node, or pass address=None for a local Ray"
                    ) from e
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        device = o.device or ("cuda" if gpus else "cpu")
        if o.stages:
            n = o.stages
        elif isinstance(memory_per_stage, (list, tuple)):
            n = len(memory_per_stage)
        else:
            n = gpus if device == "cuda" and gpus else 1
        cpus = o.cpus_per_stage or max(0.01, min(1.0, math.floor(res.get("CPU", 1) / n * 100) / 100))
        bundles = []
        for i in range(n):
            b = {"CPU": cpus, **({"GPU": 1} if device == "cuda" else {})}
            if o.stage_resources:
                b.update(o.stage_resources[i])
            bundles.append(b)
        self._pg = placement_group(bundles, strategy="SPREAD" if o.placement == "spread" else "PACK")
        try:
            ray.get(self._pg.ready(), timeout=120)
        except Exception as e:
            raise StageError(
                f"the Ray cluster cannot place {n} stages of {bundles[0]} each (it has {dict(res)}): "
                "use fewer stages, lower cpus_per_stage, or add nodes"
            ) from e
        where = ray.util.placement_group_table(self._pg)["bundles_to_node_id"]
        node_ids = [where[i] for i in range(n)]
        cores = {node["NodeID"]: int(node["Resources"].get("CPU", 1)) for node in ray.nodes()}
        self._micro, threads = plan_concurrency(node_ids, cores, device, o.micro_batches, o.threads_per_stage)
        remote = ray.remote(StageActor)
        envs = [stage_env(device, t == cores[node]) for t, node in zip(threads, node_ids)]
        self.actors = [
            remote.options(
                num_cpus=bundles[i]["CPU"], num_gpus=bundles[i].get("GPU", 0), max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": envs[i]} if envs[i] else None,
            ).remote(str(self.store.path), i, device, self.dtype, prefetch)
            for i in range(n)
        ]
        return n, device, threads

    # ------------------------------------------------------------------ calls

    def _call(self, actor, method: str, *args):
        if self._ray is None:
            return getattr(actor, method)(*args)
        return getattr(actor, method).remote(*args)

    def _get(self, refs):
        if self._ray is None:
            return refs
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayActorError as e:
            ids = [a._actor_id.hex() for a in self.actors]
            which = f"stage {ids.index(e.actor_id)}" if getattr(e, "actor_id", None) in ids else "a pipeline stage"
            raise StageError(f"{which} died ({str(e).splitlines()[0]}); its KV caches are lost: close this "
                             "model and load it again") from e
        except self._ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
            raise (cause or e) from None

    # ------------------------------------------------------------------ running

    @property
    def remote(self) -> bool:
        """True when the stages run in Ray actors, not in this process."""
        return self._ray is not None

    def micro_batches(self, batch: int) -> int:
        """How many micro-batches a batch of ``batch`` rows is cut into (see
        ``planner.plan_concurrency``; one in-process, where stages cannot overlap)."""
        return max(1, min(self._micro, batch))

    def submit(self, ids, mask: torch.Tensor | None, pos: torch.Tensor, cache_id: str, logits_to_keep: int = 1,
               pick: SamplingSettings | None = None) -> Handle:
        """Start one micro-batch through every stage; returns a handle for :meth:`fetch`.

        ``ids`` is a ``[B, T]`` tensor, or the handle of an earlier step whose last stage
        picked the tokens (``pick``); those then go from the last stage to the first
        without passing the driver. The hidden states go from stage to stage without
        passing the driver too: through the stages' mailboxes (``transport="channel"``),
        or as ObjectRefs.
        """
        if self.transport == "channel":
            key = str(next(self._keys))
            x, ring_key = (ids, None) if isinstance(ids, torch.Tensor) else (None, ids.key)
            if ring_key is not None and not ids.picked:
                raise ValueError("a step's handle can feed the next step only when its last stage picked the tokens")
            self._link.send("q", key, cache_id, (x, ring_key, mask, pos, logits_to_keep, pick))
            return Handle(key=key, picked=pick is not None)
        msg = (ids, time.time()) if isinstance(ids, torch.Tensor) else ids.ref
        for i, a in enumerate(self.actors):
            last = i == len(self.actors) - 1
            msg = self._call(a, "forward", msg, mask, pos, cache_id, logits_to_keep, pick if last else None)
        return Handle(msg)

    def fetch(self, handle: Handle) -> torch.Tensor:
        """The last stage's logits ``[B, T, V]``, or with ``pick`` the next token of each
        row ``[B]``."""
        if handle.key is not None:
            return self._inbox.take(handle.key)[0]
        out, _ = self._get(handle.ref)
        return out

    def forward(self, ids, mask: torch.Tensor | None, pos: torch.Tensor, cache_id: str, logits_to_keep: int = 1,
                pick: SamplingSettings | None = None) -> torch.Tensor:
        """:meth:`submit` then :meth:`fetch`."""
        return self.fetch(self.submit(ids, mask, pos, cache_id, logits_to_keep, pick))

    def drop(self, cache_id: str) -> None:
        """Free a finished request's KV caches on every stage (with channels, each stage
        does so after the work it has queued); returns once all have."""
        if self.transport == "channel":
            self._inbox.discard(cache_id)
            key = f"drop {next(self._keys)}"
            self._link.send("q", key, cache_id, "drop")
            self._inbox.take(key)
        elif self.actors:
            self._get([self._call(a, "drop", cache_id) for a in self.actors])

    def stats(self) -> list[dict]:
        """One dict per stage: peak_weight_bytes, peak_rss_bytes, load_s, stall_s, compute_s, transfer_s, …"""
        return self._get([self._call(a, "stats") for a in self.actors])

    def close(self) -> None:
        """Stop the stages (and their actors and placement group)."""
        actors, self.actors = self.actors, []
        for end in (self._link, self._inbox):
            if end is not None:
                end.close()
        self._link = self._inbox = None
        if self._ray is None:
            for a in actors:
                a.close()
            return
        for a in actors:
            try:
                self._ray.kill(a)
            except Exception:
                pass
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None


def _node(_actor) -> tuple[str, str]:
    import ray

    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


def plan_model(model, stages: int = 1, memory_per_stage=None, shards_dir=None, dtype=None, batch_size: int = 1,
               context: int | None = None, progress: bool = True) -> list[StagePlan]:
    """The stage plan for ``model`` without loading weights or starting Ray.

    Splits the checkpoint first if it has no layer store yet (that reads weights once).
    """
    from .model import resolve_dtype
    from .planner import choose_resident
    from .runner import _config_dtype
    from .store import open_store

    store = open_store(model, shards_dir, None, None, progress)
    dt = resolve_dtype(dtype) or _config_dtype(store.config)
    budgets = budgets_from(memory_per_stage, stages)
    ranges = plan_ranges(store, budgets, dt, batch_size, context)
    wb = weight_budgets(store, ranges, budgets, dt, batch_size, context)
    plans = []
    for i, (r, b) in enumerate(zip(ranges, wb)):
        sizes = {u: store.unit_bytes(u, dt) for u in r.units()}
        resident = choose_resident(sizes, b, i)
        held = sum(sizes[u] for u in resident)
        plans.append(StagePlan(i, "-", None, "-", r.start, r.end, b, held, sum(sizes.values()) - held))
    return plans
