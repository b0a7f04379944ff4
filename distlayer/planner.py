"""Pure planning: which layers each stage owns, what its budget is and where that number
came from, which units it keeps resident and which it streams (on a GPU, which of those it
keeps in pinned host memory and which it reads from disk), and how many micro-batches
and threads the stages run with. No torch, no Ray, no I/O: the driver measures (unit
bytes from the manifest, each stage's node, free memory and cores), :func:`pipeline_layout`
decides the device, the number of stages and their concurrency, and :func:`plan_pipeline`
the rest. ``distlayer plan`` and ``from_pretrained`` both call them, so the plan printed
is the plan run. A :class:`StagePlan` is frozen: where a started stage runs (its node,
pid and store) is the driver's record, ``placement.Placement``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from . import devices
from .errors import PlanError
from .units import EMBED, HEAD, NORM, LayerRange, layer_unit, unit_order

GiB = 2**30

# What a budget of each device kind reserves is its record's (devices.DeviceKind); on a GPU,
# budgets reserve KV cache and activations for sequences of GPU_CONTEXT tokens (prompt +
# new) when no context is set (`context` overrides it), and a budget taken from free
# memory also leaves GPU_WORKSPACE for what the KV and activation estimate does not count.
GPU_CONTEXT = devices.CUDA.context
GPU_WORKSPACE = devices.CUDA.workspace_bytes
# The pinned host tier (:func:`host_budgets`): without host_memory_per_node, the GPU stages
# of a node may pin this share of its available RAM between them, less HOST_RESERVE for
# what the node runs besides (the OS, Ray, the stages' staging buffers, the page cache).
HOST_FRACTION = 0.5
HOST_RESERVE = 2**30
# Placement by speed keeps the bytes-balanced ranges unless its own are predicted at least
# this share faster: noise in the measured rates of like nodes must not move layers.
SPEED_MARGIN = 0.05
# Step-time limits the speed search tries between the least possible slowest stage and
# the slowest stage of the least total (:meth:`_Cuts.fastest`).
SPEED_LIMITS = 48


def fmt_bytes(n: float) -> str:
    """Human-readable byte count: ``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def choose_resident(unit_bytes: dict[str, int], budget: int | None, stage: int = 0,
                    window: dict[str, int] | None = None) -> list[str]:
    """Pick the units a stage keeps resident within ``budget`` bytes of weights.

    Everything stays resident when it fits. Otherwise the rest is streamed, and the
    budget must also hold the streaming window: two of the largest piece a streamed
    unit takes at once (one running, one prefetched) when they fit, else one. Units are
    kept resident in forward order, so the first layers of a step never wait on disk;
    a unit read by row (window 0: the embeddings) is never kept, since a step reads
    only a row of it per token.

    Args:
        unit_bytes: bytes of each unit, in forward order.
        budget: bytes of weights the stage may hold; None means unlimited.
        stage: stage index, for error messages.
        window: bytes a streamed unit takes at once, where not all of it: 0 for one read
            by row, a chunk's bytes for one streamed in chunks.

    Returns:
        The names of the resident units, in forward order.

    Raises:
        PlanError: a single unit is larger than the budget.
    """
    if budget is None or sum(unit_bytes.values()) <= budget:
        return list(unit_bytes)
    window = {**unit_bytes, **(window or {})}
    names = [n for n in unit_bytes if window[n]]  # candidates, in forward order
    if not names:
        return []
    biggest = max(names, key=window.__getitem__)
    if window[biggest] > budget:
        raise PlanError(
            f"unit {biggest} needs {fmt_bytes(window[biggest])} but stage {stage} has a budget of "
            f"{fmt_bytes(budget)}: raise memory_per_stage (--memory-per-stage) or add a stage"
        )
    copies = 2 if 2 * window[biggest] <= budget else 1
    sizes = [window[n] for n in names]
    suffix_max = sizes[:]
    for k in range(len(sizes) - 2, -1, -1):
        suffix_max[k] = max(sizes[k], suffix_max[k + 1])
    best, held = 0, 0
    for k in range(len(names)):  # the first k units resident, the rest streamed
        if held + copies * suffix_max[k] <= budget:
            best = k
        held += unit_bytes[names[k]]
    return names[:best]


def head_chunks(shape: "ModelShape", r: LayerRange) -> int:
    """How many vocabulary chunks a stage that maps its shards streams its head in: as
    many as make a chunk no larger than the stage's largest layer (1: whole)."""
    biggest = max(shape.layer_bytes[r.start:r.end], default=0)
    if not (r.last and shape.vocab and biggest) or shape.head <= biggest:
        return 1
    return min(shape.vocab, -(-shape.head // biggest))


def stage_units(shape: "ModelShape", r: LayerRange, budget: int | None, maps: bool, stage: int = 0) -> tuple[list[str], int]:
    """A stage's resident units, and how many chunks its head streams in.

    A streamed embedding is read by row. A stage that maps its shards (``maps``: a CPU
    stage of a store it can map in place) streams a head larger than its layers in
    vocabulary chunks.

    Raises:
        PlanError: a unit (or chunk) larger than the budget.
    """
    sizes = shape.unit_bytes(r)
    chunks = head_chunks(shape, r) if maps else 1
    window = {EMBED: 0} if r.first else {}
    if chunks > 1:
        window[HEAD] = -(-shape.head * -(-shape.vocab // chunks) // shape.vocab)
    resident = choose_resident(sizes, budget, stage, window)
    return resident, chunks if r.last and HEAD not in resident else 1


def head_dim(text) -> int:
    """Width of one attention head of a model's text config: its ``head_dim``, else hidden
    size over heads."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_bytes_per_token(text, itemsize: int) -> int:
    """KV cache bytes one token takes in one decoder layer: keys and values of every
    key-value head (all heads without grouped-query attention)."""
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * heads * head_dim(text) * itemsize


@dataclass(frozen=True)
class ModelShape:
    """What planning needs to know of a model, in its compute dtype.

    A unit costs its weight bytes in memory, whether it stays resident or takes a turn
    in the streaming window (a head streamed in chunks, a chunk at a time; embeddings
    read by row, nothing); a streamed unit also costs the bytes each step reads of it,
    which are fewer for a compressed store (compressed on disk, decoded as it loads).

    Attributes:
        layer_bytes: weight bytes of each decoder layer.
        embed, norm, head: weight bytes of those units.
        kv_bytes_per_token: keys and values one token takes in one layer's KV cache.
        hidden: hidden size.
        vocab: vocabulary size.
        itemsize: bytes per element of the compute dtype.
        read_bytes: bytes one read of each unit costs, in forward order (embed, each
            layer, norm, head); None: its weight bytes.
        in_place: the store's units can be mapped as they are (uncompressed, in the
            compute dtype), so a CPU stage streams them with no copy.
    """

    layer_bytes: tuple[int, ...]
    embed: int
    norm: int
    head: int
    kv_bytes_per_token: int = 0
    hidden: int = 0
    vocab: int = 0
    itemsize: int = 4
    read_bytes: tuple[int, ...] | None = None
    in_place: bool = False

    @classmethod
    def from_store(cls, store, dtype) -> "ModelShape":
        """What the planner needs of ``store``'s model in ``dtype`` (a ``LayerStore`` and a
        ``torch.dtype``, passed in: this module imports neither): unit bytes from the
        manifest, KV bytes per token and layer, hidden and vocabulary sizes from the config."""
        text = store.config.get_text_config()
        return cls(
            layer_bytes=tuple(store.unit_bytes(layer_unit(i), dtype) for i in range(store.num_layers)),
            embed=store.unit_bytes(EMBED, dtype), norm=store.unit_bytes(NORM, dtype), head=store.unit_bytes(HEAD, dtype),
            kv_bytes_per_token=kv_bytes_per_token(text, dtype.itemsize), hidden=text.hidden_size,
            vocab=text.vocab_size, itemsize=dtype.itemsize,
            read_bytes=tuple(store.read_bytes(u, dtype) for u in unit_order(store.num_layers)),
            in_place=store.maps_in_place(dtype),
        )

    def unit_bytes(self, r: LayerRange) -> dict[str, int]:
        """Weight bytes of each unit of ``r`` in memory, in forward order."""
        units = {EMBED: self.embed} if r.first else {}
        units.update({layer_unit(i): self.layer_bytes[i] for i in range(r.start, r.end)})
        if r.last:
            units.update({NORM: self.norm, HEAD: self.head})
        return units

    def streamed_bytes(self, units: list[str]) -> int:
        """Bytes a step reads to stream ``units`` at batch 1: :attr:`read_bytes`
        (compressed, for a compressed store) while memory holds them decoded
        (:meth:`unit_bytes`); an embedding is read by row, one row a token."""
        costs = list(self.read_bytes or (self.embed, *self.layer_bytes, self.norm, self.head))
        if self.vocab:
            costs[0] //= self.vocab
        index = {u: k for k, u in enumerate(unit_order(len(self.layer_bytes)))}
        return sum(costs[index[u]] for u in units)

    def kv_bytes_per_layer(self, batch_size: int, context: int | None) -> int:
        """KV cache bytes one decoder layer needs for ``batch_size`` sequences of ``context``
        tokens (0 without a context)."""
        return batch_size * (context or 0) * self.kv_bytes_per_token

    def activation_bytes(self, batch_size: int, context: int | None) -> int:
        """Rough activation bytes of a prefill: a few hidden-state copies plus last-position
        logits (0 without a context)."""
        if not context:
            return 0
        return batch_size * context * self.hidden * self.itemsize * 4 + batch_size * self.vocab * 4


class _Cuts:
    """Per-stage costs of candidate ranges, for :func:`plan_stages`."""

    def __init__(self, shape: ModelShape, budgets: list[int | None], kv_per_layer: int, reserve: int, maps: bool):
        self.shape, self.budgets, self.kv, self.reserve, self.maps = shape, budgets, kv_per_layer, reserve, maps
        self.n, self.s = len(shape.layer_bytes), len(budgets)

    def units(self, i: int, a: int, b: int) -> dict[str, int]:
        return self.shape.unit_bytes(LayerRange(a, b, i == 0, i == self.s - 1))

    def weight_budget(self, i: int, a: int, b: int) -> int | None:
        return None if self.budgets[i] is None else self.budgets[i] - self.kv * (b - a) - self.reserve

    def streamed(self, i: int, a: int, b: int) -> float:
        """Bytes stage ``i`` streams per step with layers ``[a, b)`` (inf: cannot fit)."""
        u, wb = self.units(i, a, b), self.weight_budget(i, a, b)
        if wb is None:
            return 0
        try:
            resident = set(stage_units(self.shape, LayerRange(a, b, i == 0, i == self.s - 1), wb, self.maps)[0])
        except PlanError:
            return float("inf")
        return self.shape.streamed_bytes([k for k in u if k not in resident])

    def work(self, i: int, a: int, b: int) -> int:
        """Compute of a resident stage, in weight bytes read per token: an embedding lookup
        reads one row, every other unit all of its bytes."""
        return sum(self.units(i, a, b).values()) - (self.shape.embed if i == 0 else 0)

    def greedy(self, ok) -> list[tuple[int, int]] | None:
        """Cut left to right, each stage taking as many layers as ``ok`` allows."""
        cuts, a = [], 0
        for i in range(self.s):
            if i == self.s - 1:
                b = self.n
            else:
                b = a + 1
                while b < self.n - (self.s - 1 - i) and ok(i, a, b + 1):
                    b += 1
            if not ok(i, a, b):
                return None
            cuts.append((a, b))
            a = b
        return cuts

    def least(self, ok_under, total: int) -> int:
        """The least limit ``T`` in ``[0, total]`` for which ``greedy(ok_under(T))`` finds a plan."""
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if self.greedy(ok_under(mid)) is not None:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fastest(self, time_of, step_of, bound_of=None) -> list[tuple[int, int]] | None:
        """Cuts whose stage times (``time_of(i, a, b)``, inf where stage ``i`` cannot
        hold layers ``[a, b)``) give the least step (``step_of(cuts)``); None when no cuts fit.

        Exact for the sum of the stages (one micro-batch: one stage works at a time) and
        for their maximum; for ``sum + k x max`` (micro-batches in flight) it takes, for
        each of :data:`SPEED_LIMITS` limits on the slowest stage between the least
        possible and the slowest stage of the least sum, the least sum within it. A
        stage's ``bound_of(i, a, b)`` (the least step it allows alone, such as a CPU
        quota's) counts toward the limits as its time does.
        """
        n, s = self.n, self.s
        t = {(i, a, b): time_of(i, a, b) for i in range(s) for a in range(i, n - s + i + 1)
             for b in range(a + 1, n - s + i + 2)}
        held = t if bound_of is None else {k: max(v, bound_of(*k)) for k, v in t.items()}

        def best(limit: float, join) -> list[tuple[int, int]] | None:
            # score[b]: the best score of stages 0..i ending at layer b; back[i][b]: where stage i began
            inf = float("inf")
            score = {b: t[0, 0, b] if held[0, 0, b] <= limit else inf for b in range(1, n - s + 2)}
            back = [{b: 0 for b in score}]
            for i in range(1, s):
                nxt, came = {}, {}
                for b in range(i + 1, n - s + i + 2):
                    nxt[b], came[b] = inf, None
                    for a in range(i, b):
                        if score.get(a, inf) == inf or held[i, a, b] > limit:
                            continue
                        v = join(score[a], t[i, a, b])
                        if v < nxt[b]:
                            nxt[b], came[b] = v, a
                score = nxt
                back.append(came)
            if score.get(n, inf) == inf:
                return None
            cuts, b = [], n
            for i in range(s - 1, -1, -1):
                a = back[i][b]
                cuts.append((a, b))
                b = a
            return cuts[::-1]

        def most(cuts):
            return max(held[i, a, b] for i, (a, b) in enumerate(cuts))

        quickest = best(float("inf"), lambda x, y: x + y)
        if quickest is None:
            return None
        lo, hi = most(best(float("inf"), max)), most(quickest)
        found = [quickest]
        for k in range(SPEED_LIMITS + 1):
            if hi <= lo * (1 + 1e-9):
                break
            cuts = best(lo * (hi / lo) ** (k / SPEED_LIMITS) * (1 + 1e-9) if lo > 0 else hi * k / SPEED_LIMITS,
                        lambda x, y: x + y)
            if cuts is not None:
                found.append(cuts)
        return min(found, key=step_of)


def plan_stages(shape: ModelShape, budgets: list[int | None], kv_bytes_per_layer: int = 0,
                reserve_bytes: int = 0, maps: bool = False) -> list[tuple[int, int]]:
    """Assign each stage a contiguous ``(start, end)`` range of decoder layers.

    The first stage also holds the embeddings, the last the final norm and head. Each
    stage's budget covers its weights, the KV cache of its layers (``kv_bytes_per_layer``
    each) and ``reserve_bytes`` of activations.

    When every stage can keep its range resident, ranges are balanced by compute (the
    bytes each token reads: all of every layer and the head, one row of the embeddings)
    within each budget, and uneven budgets give uneven ranges. Otherwise ranges are
    chosen so the most bytes any stage streams per step is as small as possible:
    streaming time is balanced across stages.

    Args:
        shape: the model's unit sizes.
        budgets: bytes per stage; None means unlimited.
        kv_bytes_per_layer: KV cache bytes one layer needs for the job's batch and context.
        reserve_bytes: activation bytes each stage keeps free.
        maps: the stages map their shards (:func:`stage_units`).

    Raises:
        PlanError: more stages than layers, or a budget that cannot hold a layer.
    """
    c = _Cuts(shape, budgets, kv_bytes_per_layer, reserve_bytes, maps)
    if not 1 <= c.s <= c.n:
        raise PlanError(f"stages={c.s}: the model has {c.n} layers, so use 1 to {c.n} stages")
    total = max(sum(shape.layer_bytes) + shape.embed + shape.norm + shape.head, sum(shape.read_bytes or ()))
    if c.greedy(lambda i, a, b: c.streamed(i, a, b) <= total) is None:
        raise _too_small(shape, budgets, kv_bytes_per_layer, reserve_bytes)
    limit = c.least(lambda t: lambda i, a, b: c.streamed(i, a, b) <= t, total)
    if limit > 0:  # something streams: balance the bytes streamed per step
        return c.greedy(lambda i, a, b: c.streamed(i, a, b) <= limit)
    # all resident: balance compute
    limit = c.least(lambda t: lambda i, a, b: c.streamed(i, a, b) == 0 and c.work(i, a, b) <= t, total)
    return c.greedy(lambda i, a, b: c.streamed(i, a, b) == 0 and c.work(i, a, b) <= limit)

def check_stages(shape: ModelShape, budgets: list[int | None], device: str, batch_size: int = 1,
                 context: int | None = None) -> None:
    """Check what can be checked before any stage starts: the number of stages against
    the layers, and the budgets that are given (others taken as unlimited) against the
    units, KV cache and activations they must hold.

    Raises:
        PlanError: too many stages, or a budget too small, with what to change.
    """
    plan_stages(shape, budgets, shape.kv_bytes_per_layer(batch_size, context), shape.activation_bytes(batch_size, context),
                maps_shards(shape, device))


def maps_shards(shape: ModelShape, device: str) -> bool:
    """Whether stages on ``device`` map their shards in place: CPU stages of a store that
    holds its units as they are computed (``ModelShape.in_place``)."""
    return shape.in_place and devices.kind_of(device).maps_shards


def _too_small(shape: ModelShape, budgets, kv: int, reserve: int) -> PlanError:
    named = {EMBED: shape.embed, NORM: shape.norm, HEAD: shape.head,
             **{f"layer {i}": b for i, b in enumerate(shape.layer_bytes)}}
    big_name = max(named, key=named.__getitem__)
    i = min(range(len(budgets)), key=lambda k: budgets[k] if budgets[k] is not None else float("inf"))
    room = budgets[i] - kv - reserve
    extra = f" after {fmt_bytes(kv + reserve)} of KV cache and activations" if kv or reserve else ""
    return PlanError(
        f"{big_name} needs {fmt_bytes(named[big_name])} but stage {i} has {fmt_bytes(max(room, 0))}{extra} "
        f"(budget {fmt_bytes(budgets[i])}): raise memory_per_stage (--memory-per-stage) or add a stage"
    )


def plan_concurrency(stage_nodes: list[str], node_cores: dict[str, int], device: str,
                     micro_batches: int | None = None, threads: int | None = None,
                     in_process: bool = False) -> tuple[int, list[int | None]]:
    """How many micro-batches a batch runs as, and how many torch threads each stage uses.

    Stages on separate devices work at once, so a batch is cut into one micro-batch per
    device: per GPU stage, or per CPU node. CPU stages that share a node share its cores;
    with one micro-batch they take turns, so each may use all of them. Cutting a batch
    for them instead would only read every weight once more per step, on cores that are
    already busy (measurements: benchmarks/README.md).

    Args:
        stage_nodes: the node id of each stage.
        node_cores: CPU cores of each node.
        device: ``"cpu"`` or ``"cuda"``.
        micro_batches: the caller's choice, kept if given.
        threads: the caller's threads per stage, kept if given.
        in_process: the stages run one after another in one process: one micro-batch,
            and the caller's threads (None: torch's default).

    Returns:
        ``(micro_batches, threads per stage)``; threads are None on GPUs (torch's default).
    """
    if in_process:
        return 1, [threads] * len(stage_nodes)
    if not devices.kind_of(device).shares_node:
        return micro_batches or len(stage_nodes), [threads] * len(stage_nodes)
    m = micro_batches or len(set(stage_nodes))
    out = []
    for node in stage_nodes:
        sharing = min(m, stage_nodes.count(node))  # stages of this node that can be busy at once
        out.append(threads or max(1, node_cores[node] // sharing))
    return m, out


def micro_batch_choices(device: str, stage_nodes: list[str], micro_batches: int, given: bool) -> tuple[int, ...]:
    """The micro-batch counts placement by speed may choose among (``plan_pipeline``'s
    ``micro_choices``): none when the settings fix them; else 1 up to the layout's, on
    GPUs, and on CPUs when no node runs two stages (the threads of stages that share a
    node depend on the count, :func:`plan_concurrency`, and are set before they start)."""
    if given or (devices.kind_of(device).shares_node and len(set(stage_nodes)) < len(stage_nodes)):
        return ()
    return tuple(range(1, micro_batches + 1))


@dataclass(frozen=True)
class Layout:
    """How a pipeline runs, as :func:`pipeline_layout` decides it.

    Attributes:
        device: the stages' device type, ``"cpu"`` or ``"cuda"``.
        stages: how many stages there are.
        micro_batches: how many micro-batches a batch runs as; None until the stages are placed.
        threads: torch threads of each stage (None: torch's default); None until the stages are placed.
    """

    device: str
    stages: int
    micro_batches: int | None = None
    threads: tuple[int | None, ...] | None = None

    @property
    def concurrency(self) -> tuple[int, list[int | None]]:
        """``(micro_batches, threads per stage)``, as :func:`plan_pipeline` takes it."""
        if self.micro_batches is None or self.threads is None:
            raise ValueError("the concurrency of Ray stages is decided once they are placed: "
                             "call pipeline_layout again with their stage_nodes and node_cores")
        return self.micro_batches, list(self.threads)


def pipeline_layout(gpus: float, device: str | None = None, stages: int | None = None,
                    gpus_per_stage: float | None = None, micro_batches: int | None = None,
                    threads: int | None = None, in_process: bool = False,
                    stage_nodes: list[str] | None = None, node_cores: dict[str, int] | None = None) -> Layout:
    """The one rule for a pipeline's device, number of stages and concurrency.

    - Device: the given one (its type: ``"cuda:1"`` is ``"cuda"``), else CUDA when there
      are GPUs, else CPU.
    - Stages: the given number, else on CUDA one per ``gpus_per_stage`` GPUs (at least one
      GPU), else 1.
    - Concurrency (:func:`plan_concurrency`): in one process, one micro-batch and the
      given threads. Ray stages are placed on nodes after their device and number are
      known, so their concurrency is decided by a second call, with ``stage_nodes`` and
      ``node_cores``; until then the layout leaves it None.

    Args:
        gpus: GPUs the pipeline may use: a Ray cluster's, a share of them, or this machine's.
        device, stages, gpus_per_stage, micro_batches, threads: the settings; None: decided here.
        in_process: the stages run one after another in this process.
        stage_nodes, node_cores: where each stage was placed, and each node's CPU cores.
    """
    kind = devices.kind_of(device) if device else devices.default({"GPU": gpus})
    device = kind.name
    per_gpu = int(gpus / (gpus_per_stage or 1) + 1e-6)
    n = stages if stages is not None else per_gpu if kind.ray_resource == "GPU" and per_gpu else 1
    if in_process:
        stage_nodes, node_cores = ["local"] * n, {}
    elif stage_nodes is None:
        return Layout(device, n)
    micro, per_stage = plan_concurrency(stage_nodes, node_cores, device, micro_batches, threads, in_process)
    return Layout(device, n, micro, tuple(per_stage))


@dataclass(frozen=True)
class Site:
    """Where a stage runs, as the driver measured it before planning.

    Attributes:
        node_id: the node's id (Ray's node id; any label in one process).
        node_ip: the node's address, for people.
        free_bytes: memory the stage's device has free (a GPU's, or the node's available RAM).
        cores: CPU cores of the node.
        gpu: which physical GPU the stage runs on (its UUID; stages with the same one
            share its memory); ``""`` on a CPU, or when unknown (a GPU of its own).
    """

    node_id: str
    node_ip: str
    free_bytes: int
    cores: int
    gpu: str = ""
    device: str = ""  # the stage's device as it names it (``"cuda:0"``: its own GPU); "": the pipeline's
    host_free_bytes: int = 0  # the node's available RAM (0: unknown), for the pinned host tier of GPU stages

    def on_gpu(self, device: str) -> bool:
        """Whether the stage runs on a GPU: its own device if it names one, else the pipeline's ``device``."""
        return devices.kind_of(self.device or device).pinned_host


@dataclass(frozen=True)
class StagePlan:
    """One stage's plan, as the planner decided it; frozen. Where the stage runs once
    started (node, pid, store) is the driver's record, ``placement.Placement``, and
    ``model.plan`` shows both (``placement.PlacedStage``)."""

    stage: int
    start: int                      # first decoder layer (inclusive)
    end: int                        # last decoder layer (exclusive)
    last: bool                      # holds the final norm and head
    device: str
    threads: int | None = None      # torch threads the stage computes with (None: torch's default)
    budget_bytes: int | None = None  # weights + KV cache + activations; None: unlimited
    budget_source: str = "unlimited"
    reserve_bytes: int = 0          # of the budget, kept for KV cache and activations
    resident_units: tuple[str, ...] = ()
    streamed_units: tuple[str, ...] = ()
    resident_bytes: int = 0         # weight bytes of the resident units in memory
    streamed_bytes: int = 0         # bytes a step reads of the streamed units from the store (compressed, in a
    #                                 compressed store); host units are not read from it after start
    maps_shards: bool = False       # streams by mapping its shards' pages in and out (a CPU stage, no copy)
    head_chunks: int = 1            # vocabulary chunks a streamed head runs in
    host_units: tuple[str, ...] = ()  # streamed units a GPU stage keeps in pinned host memory, filled once at
    #                                   start; each step copies them host-to-device, with no read from the store
    host_bytes: int = 0             # pinned host bytes of the host units (counted against the node's host budget)
    host_budget_bytes: int = 0      # the stage's share of its node's pinned host budget (:func:`host_budgets`)
    host_source: str = ""           # where that share came from, in words
    blocks: bool = False            # runs a step's micro-batches as one block, each streamed unit read once for all

    def __post_init__(self):
        for name in ("resident_units", "streamed_units", "host_units"):  # a list given is kept as a tuple
            object.__setattr__(self, name, tuple(getattr(self, name)))
        stray = set(self.host_units) - set(self.streamed_units)
        if stray:
            raise ValueError(f"stage {self.stage}: host units {sorted(stray)} are not streamed units: a pinned host "
                             "unit is one of the units a step streams")

    @property
    def layer_range(self) -> LayerRange:
        """The units this stage owns."""
        return LayerRange(self.start, self.end, self.stage == 0, self.last)

    @property
    def weight_budget_bytes(self) -> int | None:
        """What the stage may spend on weights: its budget less the KV and activation reserve."""
        return None if self.budget_bytes is None else self.budget_bytes - self.reserve_bytes

    def as_dict(self) -> dict:
        """The plan as plain data (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The whole pipeline's plan: one :class:`StagePlan` per stage, how many
    micro-batches a batch runs as, and how its ranges were chosen: ``balance`` is
    ``"bytes"`` or ``"speed"`` (:func:`plan_pipeline`), ``balance_note`` says why in a
    sentence ("by bytes" alone when no speeds were given); ``block_note`` says whether and
    why the stages that stream run a step's micro-batches as one block (:func:`choose_blocks`)."""

    stages: tuple[StagePlan, ...]
    micro_batches: int
    balance: str = "bytes"
    balance_note: str = ""
    block_note: str = ""


def default_budgets(budgets: list[int | None], sites: list[Site], device: str,
                    fraction: float | None = None) -> list[tuple[int | None, str]]:
    """Each stage's budget and where it came from. A stage without one gets ``fraction``
    (default: its device kind's ``free_fraction``) of what its device has free, shared
    equally by the stages on that device: on CPU the node's available RAM among the node's
    stages; on a GPU its free memory among the stages on the same physical GPU, less its
    kind's ``workspace_bytes`` (:data:`GPU_WORKSPACE`)."""
    kind = devices.kind_of(device)
    fraction = kind.free_fraction if fraction is None else fraction
    out = []
    for b, site in zip(budgets, sites):
        if b is not None:
            out.append((b, "memory_per_stage"))
            continue
        if kind.shares_node:
            share, what = sum(s.node_id == site.node_id for s in sites), "available RAM"
            shared = f", shared by the node's {share} stages"
        else:
            share, what = sum(s.gpu == site.gpu for s in sites) if site.gpu else 1, "free memory of its GPU"
            shared = f", shared by the GPU's {share} stages"
        budget = int(site.free_bytes * fraction) // share
        source = f"{fraction:.0%} of the {fmt_bytes(site.free_bytes)} {what} on {site.node_ip}" \
            + (shared if share > 1 else "")
        if kind.workspace_bytes:
            budget = max(0, budget - kind.workspace_bytes)
            source += f", less {fmt_bytes(kind.workspace_bytes)} for {kind.workspace_note}"
        out.append((budget, source))
    return out


def host_budgets(sites: list[Site], device: str, host_memory: int | None = None) -> list[tuple[int, str]]:
    """Each stage's pinned host budget (bytes of its streamed units it may keep in pinned
    host memory, :func:`choose_host`) and where it came from.

    The GPU stages of a node share its host budget equally (and :func:`plan_pipeline`
    then by need, :func:`share_host`): ``host_memory`` bytes when
    given (0: no host tier), else :data:`HOST_FRACTION` of the node's available RAM (the
    least any of its stages reported) less :data:`HOST_RESERVE`. A CPU stage gets none:
    its weights are in host memory already (it maps or holds them there).

    Raises:
        PlanError: ``host_memory`` is more than a node has available.
    """
    gpu_sites = [s for s in sites if s.on_gpu(device)]
    out = []
    for site in sites:
        if not site.on_gpu(device):
            out.append((0, "a CPU stage computes from host memory: nothing to pin"))
            continue
        mine = [s for s in gpu_sites if s.node_id == site.node_id]
        share = len(mine)
        free = min(s.host_free_bytes for s in mine)
        shared = f", shared by the node's {share} GPU stages" if share > 1 else ""
        if host_memory == 0:
            out.append((0, "host_memory_per_node is 0: no pinned host tier"))
        elif host_memory is not None:
            if free and host_memory > free:
                raise PlanError(
                    f"host_memory_per_node is {fmt_bytes(host_memory)} but {site.node_ip} has {fmt_bytes(free)} of RAM "
                    f"available: lower host_memory_per_node (--host-memory) to at most that, or leave it out for "
                    f"{HOST_FRACTION:.0%} of the available RAM less {fmt_bytes(HOST_RESERVE)}")
            out.append((host_memory // share,
                        f"host_memory_per_node {fmt_bytes(host_memory)} on {site.node_ip}{shared}"))
        elif not free:
            out.append((0, f"the available RAM of {site.node_ip} is unknown (set --host-memory)"))
        else:
            out.append((max(0, int(free * HOST_FRACTION) - HOST_RESERVE) // share,
                        f"{HOST_FRACTION:.0%} of the {fmt_bytes(free)} available RAM on {site.node_ip}, less "
                        f"{fmt_bytes(HOST_RESERVE)}{shared}"))
    return out


def share_host(needs: list[int], hosted: list[tuple[int, str]], sites: list[Site]) -> list[tuple[int, str]]:
    """The GPU stages of a node share its pinned host budget (the sum of their equal
    shares, :func:`host_budgets`) by need: a stage whose ``needs`` (bytes of its streamed
    units that may be pinned) are under an equal share of what is left takes only them,
    and the rest is shared by the stages that need more, the same way (water-filling;
    the one that needs most keeps what is left). So stages that keep their units
    resident leave their share to one that streams.
    Returns each stage's budget and where it came from."""
    out = list(hosted)
    for node in dict.fromkeys(s.node_id for s in sites):
        mine = sorted((i for i, s in enumerate(sites) if s.node_id == node and hosted[i][0] > 0),
                      key=lambda i: needs[i])
        left = sum(hosted[i][0] for i in mine)
        for k, i in enumerate(mine):
            last = k == len(mine) - 1  # the one that needs most keeps what is left
            share = left if last else min(needs[i], left // (len(mine) - k))
            left -= share
            if share != hosted[i][0]:
                why = "it needs only that" if share < hosted[i][0] else "what the node's other GPU stages leave"
                out[i] = (share, f"{hosted[i][1]}; by need: {fmt_bytes(share)}, {why}")
    return out


def choose_host(unit_bytes: dict[str, int], streamed: list[str], budget: int,
                row_read: tuple[str, ...] = ()) -> list[str]:
    """The streamed units a GPU stage keeps in pinned host memory within ``budget`` bytes.

    Each pinned unit spares a step its read from the store and costs its bytes in
    memory, so the most bytes pinned spare the most reads: units are taken in forward
    order, each that still fits (a unit after one that does not fit may). A unit read
    by row (``row_read``: the embeddings) is not pinned: a step reads one row of it.

    Args:
        unit_bytes: bytes of each unit in memory.
        streamed: the stage's streamed units, in forward order.
        budget: the stage's pinned host budget (:func:`host_budgets`).
        row_read: units a step reads by row.

    Returns:
        The names of the pinned host units, in forward order.
    """
    chosen, held = [], 0
    for u in streamed:
        if u not in row_read and held + unit_bytes[u] <= budget:
            chosen.append(u)
            held += unit_bytes[u]
    return chosen


def reserved_context(context: int | None, device: str) -> int | None:
    """The tokens per sequence budgets reserve KV cache and activations for: ``context``
    if given; else the device kind's ``context`` (on a GPU, :data:`GPU_CONTEXT`; on a CPU
    None: a CPU budget bounds weights alone)."""
    return context if context is not None else devices.kind_of(device).context


class StageTimer(Protocol):
    """What placement by speed asks of a cost model (``cost.Timer``): a stage's predicted
    seconds for one micro-batch, the pipeline's step through given stages, the least
    step a stage allows alone (a CPU quota's bound; 0 for none), and the same timer for
    another number of micro-batches; ``micro_batches``: those it times (a batch of fewer
    rows runs as one micro-batch a row)."""

    micro_batches: int

    def stage_s(self, plan: StagePlan) -> float: ...

    def step_s(self, plans: list["StagePlan"]) -> float: ...

    def bound_s(self, plan: "StagePlan") -> float: ...

    def with_micro_batches(self, m: int) -> "StageTimer": ...


def streams_units(p: StagePlan) -> bool:
    """Whether stage ``p`` streams units each step (an embedding alone is read by row)."""
    return any(u != EMBED for u in p.streamed_units)


def choose_blocks(stages: tuple[StagePlan, ...], setting: str, device: str,
                  step_of=None, waves: bool = True) -> tuple[tuple[StagePlan, ...], str]:
    """The stages with ``blocks`` set where they run a step's micro-batches as one block
    (each streamed unit read once for all of them; only stages that stream units), and
    why, in a sentence. ``setting`` (``block_schedule``): ``"on"``, ``"off"``, or
    ``"auto"``: with ``step_of`` (a step's predicted seconds through given stages, from
    measured rates) blocks where they are predicted faster, else the device kind's
    default (``devices.DeviceKind.blocks``). ``waves`` False: the transport hands each
    micro-batch on by itself, so no stage can run blocks (``setting`` is then not ``"on"``:
    ``PipelineConfig`` refuses that)."""
    if not any(streams_units(p) for p in stages):
        return stages, "no stage streams units: no blocks"
    if not waves:
        return stages, "each micro-batch streams by itself (the transport hands each micro-batch on alone)"

    def blocked(on: bool) -> tuple[StagePlan, ...]:
        return tuple(replace(p, blocks=on and streams_units(p)) for p in stages)

    kind = devices.kind_of(device)
    if setting in ("on", "off"):
        on, why = setting == "on", f"block_schedule is {setting}"
    else:
        on, why = kind.blocks, f"the default on {kind.name}"
        if step_of is not None:
            with_, without = step_of(blocked(True)), step_of(blocked(False))
            if with_ != without:
                on = with_ < without
                why = f"predicted {with_:.4g} s a step in blocks against {without:.4g} s without"
    what = "stages that stream run a step's micro-batches as one block" if on else \
        "each micro-batch streams by itself"
    return blocked(on), f"{what} ({why})"


def plan_pipeline(shape: ModelShape, sites: list[Site], budgets: list[int | None], device: str,
                  concurrency: tuple[int, list[int | None]], batch_size: int = 1,
                  context: int | None = None, timer: StageTimer | None = None,
                  micro_choices: tuple[int, ...] = (), host_memory: int | None = None,
                  block_schedule: str = "auto", waves: bool = True) -> Plan:
    """The complete plan of a pipeline: ranges, budgets and where they came from, KV and
    activation reserves, resident, pinned host and streamed units, threads and micro-batches.

    A GPU stage keeps the streamed units its share of the node's host budget holds in
    pinned host memory (:func:`host_budgets`, shared by need: :func:`share_host`;
    :func:`choose_host`); the rest it reads from the store each step.

    Ranges are balanced by bytes (:func:`plan_stages`: the bytes streamed to the device, from
    either tier). With a ``timer`` (the cost model over each stage's measured rates), the
    ranges that minimise the predicted step are found too, within the same budgets, and
    taken when they are predicted at least :data:`SPEED_MARGIN` faster: a slow stage gets
    fewer layers. With ``micro_choices``,
    each of those micro-batch counts is tried as well (fewer micro-batches read every
    weight fewer times a step; more let separate devices work at once).

    Args:
        shape: the model's unit sizes in the compute dtype.
        sites: where each stage runs (one per stage).
        budgets: bytes per stage from the settings; None: a share of the free memory.
        device: ``"cpu"`` or ``"cuda"``/``"cuda:0"``.
        concurrency: ``(micro_batches, threads per stage)``: ``Layout.concurrency`` from
            :func:`pipeline_layout`, decided once, before the stages start (their
            environment depends on it).
        batch_size, context: the largest batch and sequence to reserve KV cache and
            activations for; without a context a CPU budget bounds weights alone, and a
            GPU budget reserves for ``GPU_CONTEXT`` tokens (:func:`reserved_context`).
        timer: predicts stage and step times (``cost.Timer``); None: by bytes alone.
        micro_choices: other micro-batch counts placement by speed may take instead of
            ``concurrency``'s (those that leave every stage's threads as they are).
        host_memory: bytes of pinned host memory per node for its GPU stages; None: a
            share of its available RAM (:func:`host_budgets`); 0: none.
        block_schedule: ``"auto"``, ``"on"`` or ``"off"``: whether the stages that stream
            run a step's micro-batches as one block (:func:`choose_blocks`; with a
            ``timer``, auto decides by the predicted step).
        waves: whether the transport hands a wave's micro-batches to a stage together
            (``transport.delivers_waves``); False: no blocks.

    Raises:
        PlanError: the stages or budgets cannot hold the model, or ``host_memory`` is
            more than a node has.
    """
    budgeted = default_budgets(budgets, sites, device)
    hosted = host_budgets(sites, device, host_memory)
    # what a stage could pin at most: its node's whole host budget (the speed search's
    # ranges, before the others' needs are known)
    node_host = [(sum(h for (h, _), t in zip(hosted, sites) if t.node_id == s.node_id), "")
                 for s in sites]
    context = reserved_context(context, device)
    kv = shape.kv_bytes_per_layer(batch_size, context)
    act = shape.activation_bytes(batch_size, context)
    maps = maps_shards(shape, device)
    micro, stage_threads = concurrency
    n = len(budgeted)

    @functools.cache  # the speed search asks for each range once per micro-batch count
    def stage(i: int, a: int, b: int, host_budget: tuple[int, str] | None = None) -> StagePlan:
        """Stage ``i`` of layers ``[a, b)`` with ``host_budget`` (bytes, where from) of
        pinned host memory; None: as much as its node has (:func:`placed`)."""
        budget, source = budgeted[i]
        r = LayerRange(a, b, i == 0, i == n - 1)
        reserve = kv * (b - a) + act if budget else 0
        sizes = shape.unit_bytes(r)
        resident, chunks = stage_units(shape, r, None if budget is None else budget - reserve, maps, i)
        streamed = [u for u in sizes if u not in resident]
        host_budget, host_source = host_budget or node_host[i]
        host = choose_host(sizes, streamed, host_budget, (EMBED,))
        return StagePlan(
            i, a, b, r.last, sites[i].device or device, threads=stage_threads[i], budget_bytes=budget,
            budget_source=source, reserve_bytes=reserve, resident_units=tuple(resident),
            streamed_units=tuple(streamed), resident_bytes=sum(sizes[u] for u in resident),
            streamed_bytes=shape.streamed_bytes([u for u in streamed if u not in host]), maps_shards=maps,
            head_chunks=chunks, host_units=tuple(host), host_bytes=sum(sizes[u] for u in host),
            host_budget_bytes=host_budget, host_source=host_source)

    cuts = plan_stages(shape, [b for b, _ in budgeted], kv, act, maps)

    def placed(cuts_) -> tuple[StagePlan, ...]:
        """The stages of ``cuts_``, each node's host budget shared by need (:func:`share_host`;
        a stage's need: what it would pin with its node's whole budget)."""
        needs = [stage(i, a, b).host_bytes for i, (a, b) in enumerate(cuts_)]
        return tuple(stage(i, a, b, h) for (i, (a, b)), h in zip(enumerate(cuts_), share_host(needs, hosted, sites)))

    def planned(cuts_, m: int, balance: str, note: str) -> Plan:
        stages = placed(cuts_)
        step = None if timer is None else timer.with_micro_batches(m).step_s
        stages, blocks = choose_blocks(stages, block_schedule, device, step, waves)
        return Plan(stages, m, balance, note, blocks)

    if timer is None:
        return planned(cuts, micro, "bytes", "by bytes")

    def step_of(t: StageTimer, cuts_: list[tuple[int, int]]) -> float:
        try:
            return t.step_s(placed(cuts_))
        except PlanError:  # a stage's budget cannot hold its layers
            return float("inf")

    def time_of(t: StageTimer, i: int, a: int, b: int, host: tuple[int, str] | None) -> float:
        try:
            return t.stage_s(stage(i, a, b, host))
        except PlanError:  # the stage's budget cannot hold these layers
            return float("inf")

    def bound_of(t: StageTimer, i: int, a: int, b: int, host: tuple[int, str] | None) -> float:
        try:
            return t.bound_s(stage(i, a, b, host))
        except PlanError:
            return float("inf")

    # The search scores each range alone, before the other stages' needs for the node's
    # host budget are known: once with the node's whole budget (None), and once with none,
    # which finds the ranges that keep most stages whole and stream on one, where that
    # stage then gets the budget the others leave (:func:`placed`)
    host_guesses = (None, (0, "")) if any(h for h, _ in node_host) else (None,)

    by_bytes = step_of(timer.with_micro_batches(micro), cuts)
    best = (by_bytes, micro, cuts)
    timers = {}  # one search per number of micro-batches timed: the plan's first, so that ties keep them
    for m in (micro, *micro_choices):
        t = timer.with_micro_batches(m)
        timers.setdefault(t.micro_batches, (m, t))
    search = _Cuts(shape, [b for b, _ in budgeted], kv, act, maps)
    for m, t in timers.values():
        for g in host_guesses:
            found = search.fastest(
                lambda i, a, b, t=t, g=g: time_of(t, i, a, b, g), lambda c, t=t: step_of(t, c),
                lambda i, a, b, t=t, g=g: bound_of(t, i, a, b, g)) or cuts
            step = step_of(t, found)
            if step < best[0]:
                best = (step, m, found)
    by_speed, m, fast = best
    gain = 1 - by_speed / by_bytes if by_bytes else 0.0
    if (fast, m) != (cuts, micro) and gain >= SPEED_MARGIN:
        also = f", in {m} micro-batch{'es' * (m > 1)} rather than {micro}" if m != micro else ""
        return planned(fast, m, "speed", f"by speed: predicted {gain:.0%} faster than balancing bytes{also} "
                                         f"({by_speed:.4g} s against {by_bytes:.4g} s a step)")
    why = "no faster ranges" if (fast, m) == (cuts, micro) or gain < 0.005 else \
        f"ranges predicted only {gain:.0%} faster, under the {SPEED_MARGIN:.0%} margin"
    return planned(cuts, micro, "bytes", f"by bytes: placing by speed finds {why} ({by_bytes:.4g} s a step predicted)")
