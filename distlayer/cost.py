"""A cost model: how fast a plan decodes on devices of given speeds, before any is bought.

Pure, like :mod:`distlayer.planner`: no torch, no Ray, no I/O. It takes the planner's
:class:`~distlayer.planner.ModelShape` and :class:`~distlayer.planner.Plan` and each
stage's :class:`Rates`, and predicts one decode step (one new token for every row).

One stage, for one micro-batch of ``rows`` rows at ``context`` tokens of KV cache:

- compute: ``max(FLOPs / flops, bytes read from memory / mem_bw)``. FLOPs are
  ``rows x (2 x params + 4 x context x hidden)`` for each decoder layer (a matmul does
  2 FLOPs per parameter per row; attention's scores and weighted sum over the context
  take ``2 x context x hidden`` each) and ``rows x 2 x params`` for the norm and head;
  an embedding lookup does none. Parameters are a unit's bytes over ``shape.itemsize``.
  Memory read is every weight the step touches once (the embeddings only one row per
  row), plus the KV cache, ``rows x context x kv_bytes_per_token`` per layer: decode is
  usually bound by reading weights, not by arithmetic.
- streaming: the bytes the plan streams per step (``StagePlan.streamed_bytes``) over
  ``disk_bw``, plus, on a GPU, the decoded bytes over ``h2d_bw``: a unit is read, then
  copied to the device.
- overhead: ``step_overhead_s`` for each forward of the stage plus ``layer_overhead_s``
  for each of its decoder layers: what a forward costs beyond its FLOPs and reads (Python,
  the framework's dispatch, small kernels, the rotary and mask set-up). Negligible for a
  large model on a GPU, where the rates of a cluster file leave it 0; it can decide a
  small model's decode step on a CPU. :mod:`distlayer.rates` measures both on the
  stage's own device, from a real decoder layer of the model.
- hand-off: the micro-batch's hidden state, ``rows x hidden x itemsize`` bytes, over
  ``link_bw``, plus ``link_latency_s``; none after the last stage.

Overlap assumption: the stage prefetches, so a streamed unit's read overlaps the compute
of the unit before it, and the stage's step is ``max(compute, streaming) + hand-off``,
not their sum; the overhead runs on the compute's thread, so it counts with compute. The
hand-off is not overlapped.

The pipeline, for ``m`` micro-batches through ``S`` stages of step times ``t_i`` (each
for ``batch / m`` rows):

- stages on separate devices work at once, a flow shop of identical jobs:
  ``sum(t_i) + (m - 1) x max(t_i)`` per batch. With one micro-batch that is the sum of
  the stages; with equal stages whose time scales with rows (compute-bound) it is the
  GPipe fill-and-drain ``t_slowest x (m + S - 1) / m``, ``t_slowest`` the slowest
  stage's time for the whole batch. When decode is bound by reading weights, a
  micro-batch costs a stage nearly what the whole batch does, and more micro-batches
  make the step slower.
- stages that share a device take turns, so the general form is ``sum(t_i) + (m - 1) x
  max over devices of the sum of its stages' t_i``: ``m x sum(t_i)`` when all share one.
- a stage that streams and runs a step's micro-batches as one block (the block schedule,
  ``StagePlan.blocks``, ``runner.LayerRunner.forward_block``) reads its streamed units
  once, for all ``m``, in ``max(m x compute, streaming) + m x hand-off``, and hands them
  on together. So the step is the sum of such blocks and of the flows (as above) of the
  stretches of other stages between them; with no such stage, the flow alone. (Where the
  transport runs each micro-batch by itself, ``transport="ray"``, a stage streams once
  per micro-batch; the model does not follow that setting.)
- a node under a CPU quota (``Rates.cpu_quota``) runs its stages at full speed while it
  has quota left, and banks quota while they wait on other stages; so the step is at
  least each such device's CPU seconds per step (``m`` micro-batches through its stages:
  their compute on a CPU, their overhead on a GPU) over its quota, and otherwise as above.

Predictions are checked against measured decode steps of SmolLM2-135M on a CPU by
``benchmarks/bench_cost.py`` (results: benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .planner import ModelShape, Plan, StagePlan
from .units import EMBED, HEAD, NORM


@dataclass(frozen=True)
class Rates:
    """How fast a stage's device and node are.

    Attributes:
        flops: FLOP/s the device sustains on this model's matmuls.
        mem_bw: bytes/s it reads weights from its own memory (a GPU's HBM, a CPU's RAM).
        disk_bw: bytes/s of reading the store from disk.
        h2d_bw: host-to-device bytes/s; None on a CPU.
        link_bw: bytes/s of the hop to the next stage; None: no hop (the last stage).
        link_latency_s: seconds the hop to the next stage adds to each hand-off.
        device: an id for the device; stages with the same non-empty id share it and
            take turns ("": a device of its own).
        step_overhead_s: seconds each forward of a stage costs beyond its units' FLOPs
            and reads, whatever its layers.
        layer_overhead_s: seconds each decoder layer's forward costs beyond its FLOPs and reads.
        cpu_quota: under a CPU quota on the stage's node (a cgroup's ``cpu.cfs_quota_us``),
            the share of its threads' time the stage gets of it (at most the quota's cores
            over its threads; less where the node's other processes use part of it), or
            None: no quota. The other rates are the device's at full speed; the quota
            bounds the step instead (:meth:`Timer.step_s`).
    """

    flops: float
    mem_bw: float
    disk_bw: float
    h2d_bw: float | None = None
    link_bw: float | None = None
    link_latency_s: float = 0.0
    device: str = ""
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    cpu_quota: float | None = None


@dataclass(frozen=True)
class StageCost:
    """One stage's predicted seconds for one micro-batch, and what bounds it.

    Attributes:
        stage: the stage's index.
        flops_s: FLOPs over the device's FLOP/s.
        memory_s: bytes read from device memory over its bandwidth.
        disk_s: streamed bytes over the disk's bandwidth.
        h2d_s: streamed bytes over host-to-device bandwidth (0 on a CPU).
        handoff_s: hidden state over the link, plus its latency.
        overhead_s: the forward's and its layers' overhead (``Rates.step_overhead_s``,
            ``Rates.layer_overhead_s``).
        blocks: the stage runs a step's micro-batches as one block (``StagePlan.blocks``;
            :meth:`block_s`).
    """

    stage: int
    flops_s: float
    memory_s: float
    disk_s: float
    h2d_s: float
    handoff_s: float
    overhead_s: float = 0.0
    blocks: bool = False

    @property
    def compute_s(self) -> float:
        """``max(FLOPs, reads) + overhead``: the seconds the stage's thread computes."""
        return max(self.flops_s, self.memory_s) + self.overhead_s

    @property
    def streaming_s(self) -> float:
        return self.disk_s + self.h2d_s

    def cpu_s(self, gpu: bool) -> float:
        """Seconds the stage's threads run on the CPU: its compute on a CPU, only the
        overhead (Python, launches) on a GPU."""
        return self.overhead_s if gpu else self.compute_s

    @property
    def step_s(self) -> float:
        """``max(compute, streaming) + hand-off``: prefetch overlaps reads with compute."""
        return max(self.compute_s, self.streaming_s) + self.handoff_s

    def block_s(self, m: int) -> float:
        """Seconds of ``m`` micro-batches run as one block: each streamed unit read once,
        for all of them; ``step_s`` for one."""
        return max(m * self.compute_s, self.streaming_s) + m * self.handoff_s

    @property
    def bound(self) -> str:
        """What the stage waits on most: ``compute``, ``memory``, ``overhead``, ``disk``,
        ``h2d`` or ``link``."""
        parts = {"compute": self.flops_s, "memory": self.memory_s, "overhead": self.overhead_s, "disk": self.disk_s,
                 "h2d": self.h2d_s, "link": self.handoff_s}
        if self.handoff_s <= max(self.compute_s, self.streaming_s):
            parts.pop("link")
        if self.streaming_s > self.compute_s:
            parts.pop("compute"), parts.pop("memory"), parts.pop("overhead")
        else:
            parts.pop("disk"), parts.pop("h2d")
        return max(parts, key=parts.__getitem__)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "step_s": self.step_s, "compute_s": self.compute_s,
                "streaming_s": self.streaming_s, "handoff_s": self.handoff_s, "flops_s": self.flops_s,
                "memory_s": self.memory_s, "overhead_s": self.overhead_s, "disk_s": self.disk_s, "h2d_s": self.h2d_s,
                "bound": self.bound, "blocks": self.blocks}


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted decode step.

    Attributes:
        stages: each stage's cost for one micro-batch.
        batch: rows decoded per step.
        micro_batches: micro-batches a batch runs as.
        context: tokens of KV cache each row attends over.
        step_s: seconds per decode step of the whole batch.
        formula: how ``step_s`` follows from the stages' times.
    """

    stages: tuple[StageCost, ...]
    batch: int
    micro_batches: int
    context: int
    step_s: float
    formula: str

    @property
    def bottleneck(self) -> StageCost:
        """The slowest stage."""
        return max(self.stages, key=lambda s: s.step_s)

    @property
    def why(self) -> str:
        """The bottleneck and what bounds it: ``"stage 2: disk"``."""
        b = self.bottleneck
        return f"stage {b.stage}: {b.bound}"

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second at :attr:`batch` rows: one new token per row per step."""
        return self.batch / self.step_s if self.step_s else float("inf")

    def as_dict(self) -> dict:
        return {"batch": self.batch, "micro_batches": self.micro_batches, "context": self.context,
                "step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "bottleneck": self.why,
                "formula": self.formula, "stages": [s.as_dict() for s in self.stages]}


def unit_flops(shape: ModelShape, unit: str, unit_bytes: int, rows: int, context: int) -> float:
    """FLOPs ``unit`` (of ``unit_bytes`` bytes) takes to decode one token for ``rows`` rows
    at ``context`` tokens: 2 per parameter per row, plus ``4 x context x hidden`` per row
    for a layer's attention; none for an embedding lookup."""
    if unit == EMBED:
        return 0.0
    attention = 4 * context * shape.hidden if unit not in (NORM, HEAD) else 0
    return rows * (2 * unit_bytes / shape.itemsize + attention)


def stage_cost(shape: ModelShape, p: StagePlan, rates: Rates, rows: int, context: int = 0) -> StageCost:
    """Predicted seconds of stage ``p`` for one micro-batch of ``rows`` rows (module docstring)."""
    sizes = shape.unit_bytes(p.layer_range)
    flops = sum(unit_flops(shape, u, b, rows, context) for u, b in sizes.items())
    touched = sum(b for u, b in sizes.items() if u != EMBED)
    if EMBED in sizes:  # a lookup reads one row of the embeddings per row
        touched += rows * sizes[EMBED] // max(shape.vocab, 1)
    touched += rows * context * shape.kv_bytes_per_token * (p.end - p.start)
    # every streamed unit is copied to the device each step, a pinned host unit (one of them,
    # StagePlan.host_units) too; only p.streamed_bytes, which leaves host units out, is read from disk
    decoded = sum(sizes[u] for u in p.streamed_units if u != EMBED)
    handoff = 0.0
    if not p.last and rates.link_bw:
        handoff = rows * shape.hidden * shape.itemsize / rates.link_bw + rates.link_latency_s
    return StageCost(
        stage=p.stage, flops_s=flops / rates.flops, memory_s=touched / rates.mem_bw,
        disk_s=p.streamed_bytes / rates.disk_bw,
        h2d_s=decoded / rates.h2d_bw if rates.h2d_bw and not p.maps_shards else 0.0, handoff_s=handoff,
        overhead_s=rates.step_overhead_s + (p.end - p.start) * rates.layer_overhead_s,
        blocks=p.blocks)


def mean_context(context: int | None) -> int:
    """Tokens of KV cache the mean decode step attends over when sequences grow to
    ``context`` tokens (prompt and new): half of it; 0 without one."""
    return (context or 0) // 2


def predict(shape: ModelShape, plan: Plan, rates: list[Rates], batch: int = 1, micro_batches: int | None = None,
            context: int = 0) -> Prediction:
    """Predict ``plan``'s decode step on devices of ``rates`` (one per stage).

    Args:
        shape: the model's unit sizes, as the plan was made with.
        plan: the plan.
        rates: each stage's device and node speeds.
        batch: rows decoded at once.
        micro_batches: micro-batches a batch runs as (default: the plan's), at most ``batch``.
        context: tokens of KV cache each row attends over at the step predicted.

    Raises:
        ValueError: not one :class:`Rates` per stage, or a batch under 1.
    """
    if len(rates) != len(plan.stages):
        raise ValueError(f"{len(rates)} rates for {len(plan.stages)} stages: give one per stage")
    if batch < 1:
        raise ValueError(f"batch={batch}: use 1 or more")
    timer = Timer(shape, tuple(rates), batch, micro_batches or plan.micro_batches, context)
    costs = tuple(timer.stage_cost(p) for p in plan.stages)
    formula = "sum(stage) + (micro_batches - 1) x max(device)" if timer.micro_batches > 1 else "sum(stage)"
    if timer.micro_batches > 1 and any(c.blocks for c in costs):
        formula = ("the streaming stages' blocks (micro_batches x compute or the streaming, whichever is more) "
                   "plus the flow of the others between them")
    step = timer.step_s(plan.stages)
    if step > timer.flow_s(costs) * (1 + 1e-9):
        formula = "a CPU quota: micro_batches x the device's CPU seconds / its quota"
    return Prediction(costs, batch, timer.micro_batches, context, step, formula)


@dataclass(frozen=True)
class Timer:
    """Stage and step times of plans on devices of given rates, for one batch: what
    :func:`predict` sums up, and what ``planner.plan_pipeline`` places layers by
    (``planner.StageTimer``).

    Attributes:
        shape: the model's unit sizes.
        rates: each stage's device and node speeds, by stage index.
        batch: rows decoded at once.
        micro_batches: micro-batches a batch runs as (at most ``batch`` count).
        context: tokens of KV cache each row attends over.
    """

    shape: ModelShape
    rates: tuple[Rates, ...]
    batch: int = 1
    micro_batches: int = 1
    context: int = 0

    def __post_init__(self):
        object.__setattr__(self, "micro_batches", max(1, min(self.micro_batches, self.batch)))
        # each stage plan's cost, computed once: the speed search asks for a range's time and
        # its bound (planner.plan_pipeline), and for the same ranges in many cuts
        object.__setattr__(self, "_costs", {})

    @property
    def rows(self) -> int:
        """Rows of one micro-batch."""
        return -(-self.batch // self.micro_batches)

    def stage_cost(self, plan: StagePlan) -> StageCost:
        cost = self._costs.get(plan)
        if cost is None:
            cost = self._costs[plan] = stage_cost(self.shape, plan, self.rates[plan.stage], self.rows, self.context)
        return cost

    def with_micro_batches(self, m: int) -> "Timer":
        """This timer for the batch in ``m`` micro-batches."""
        return dataclasses.replace(self, micro_batches=m)

    def stage_s(self, plan: StagePlan) -> float:
        """Seconds of stage ``plan`` for one micro-batch."""
        return self.stage_cost(plan).step_s

    def step_s(self, plans) -> float:
        """Seconds of a decode step of the whole batch through stages ``plans`` (module
        docstring): the flow of micro-batches (:meth:`flow_s`), or, where a node's CPU
        quota is the tighter bound, a device's CPU seconds per step over its quota."""
        costs = [self.stage_cost(p) for p in plans]
        return max(self.flow_s(costs), self.quota_s(costs))

    def bound_s(self, plan: StagePlan) -> float:
        """The least step stage ``plan`` allows alone: its CPU seconds per step over its
        node's CPU quota (:meth:`quota_s`), 0 without one."""
        return self.quota_s([self.stage_cost(plan)])

    def flow_s(self, costs) -> float:
        """From each stage's cost for one micro-batch: the blocks of the stages that stream
        (:meth:`StageCost.block_s`), plus, for each stretch of other stages between them,
        ``sum + (m - 1) x`` its busiest device's seconds (module docstring)."""
        total, stretch = 0.0, []
        for c in costs:
            if c.blocks:
                total += self._stretch_s(stretch) + c.block_s(self.micro_batches)
                stretch = []
            else:
                stretch.append(c)
        return total + self._stretch_s(stretch)

    def _stretch_s(self, costs) -> float:
        """``sum + (m - 1) x`` the busiest device's seconds of stages that pass each
        micro-batch on as it is done."""
        busy: dict[str, float] = {}  # each device's seconds per micro-batch
        for c in costs:
            key = self.rates[c.stage].device or f"stage {c.stage}"
            busy[key] = busy.get(key, 0.0) + c.step_s
        return sum(c.step_s for c in costs) + (self.micro_batches - 1) * max(busy.values(), default=0.0)

    def quota_s(self, costs) -> float:
        """The least step a CPU quota allows: each quota'd device's CPU seconds per step
        (every micro-batch through its stages) over its quota; 0 without quotas.

        A quota (a cgroup's CFS bandwidth) grants so much CPU time per period: a stage
        runs at full speed while its node has quota left, and a stage that idles while
        others work banks it. So a quota slows a step only when the device's CPU seconds
        per step exceed the quota's share of the whole step, and then the step is that
        work over the quota, not each forward slowed by it."""
        work: dict[str, tuple[float, float]] = {}  # device: (CPU seconds per micro-batch, quota)
        for c in costs:
            r = self.rates[c.stage]
            if r.cpu_quota:
                key = r.device or f"stage {c.stage}"
                seconds = work.get(key, (0.0, r.cpu_quota))[0] + c.cpu_s(r.h2d_bw is not None)
                work[key] = (seconds, r.cpu_quota)
        return max((self.micro_batches * w / q for w, q in work.values()), default=0.0)

