"""What the driver measures of the nodes its stages run on, for placement by speed
(``balance="speed"``): each node's rates (:mod:`distlayer.rates`, measured in one of
its stages' processes and cached there) and the links between consecutive stages on
different nodes, turned into one :class:`~distlayer.cost.Rates` per stage for the
planner's :class:`~distlayer.cost.Timer`.

One stage per node (per GPU, on GPUs) is measured, on decoder layers from the middle of
its range in the bytes-balanced plan (``rates.measured_layers``): the layers it most
likely keeps, so a node whose store the driver fills (``fill.py``) is sent only shards
it would get anyway, before the plan is final. Nodes are measured one after another,
not at once: nodes of a test cluster on one machine share its cores, and one node's
timing must not take another's CPU. Nothing here imports Ray: the driver's ``Stages``
runs the measuring in the stage processes (``call`` and ``call_with``).
"""

from __future__ import annotations

import dataclasses

from . import devices
from .cost import Rates, Timer, mean_context
from .fill import fill_stages
from .placement import PlacedPlan, PlacedStage, Placement
from .planner import ModelShape, Plan, StagePlan
from .rates import link_listen, link_probe, measured_layers

AUTO_NODES = 2  # balance="auto" measures and places by speed from this many nodes up


def balance_for(setting: str, node_ids: list[str]) -> str:
    """``"speed"`` or ``"bytes"``: the setting, or for ``"auto"`` speed when the stages
    run on :data:`AUTO_NODES` nodes or more (nodes may differ), else bytes (one node:
    every stage's device is alike, and nothing need be measured)."""
    if setting != "auto":
        return setting
    return "speed" if len(set(node_ids)) >= AUTO_NODES else "bytes"


@dataclasses.dataclass(frozen=True)
class Survey:
    """What was measured: each stage's node result (``rates.measure_node``'s dict, shared
    by the stages measured through one), the link from each stage to the next (None: the
    last stage, or both on one node), and the rates the planner gets.

    Attributes:
        nodes: per stage, the measurement of its node and device.
        links: per stage, ``rates.link_probe``'s dict for its hop to the next stage, or None.
        rates: per stage, the :class:`Rates` the cost model uses (:func:`stage_rates`).
        measured_by: per stage, the index of the stage whose process measured its node.
        pushed: by node id, the bytes of each shard sent to it to measure with
            (``fill.fill_stages``'s result; the plan's own fill counts them as its own).
    """

    nodes: tuple[dict, ...]
    links: tuple[dict | None, ...]
    rates: tuple[Rates, ...]
    measured_by: tuple[int, ...]
    pushed: dict = dataclasses.field(default_factory=dict)

    def as_dicts(self) -> list[dict]:
        """Per stage, what was measured and the rates used (JSON-ready)."""
        return [{"measured_by": by, "cached": n.get("cached"), "seconds": n.get("seconds"),
                 "measured_at": n.get("measured_at"), "rates": dataclasses.asdict(r),
                 "page_cache_bw": n.get("page_cache_bw"), "mapped_page_cache_bw": n.get("mapped_page_cache_bw"),
                 "link": link}
                for n, link, r, by in zip(self.nodes, self.links, self.rates, self.measured_by)]


def warm_disk(node: dict, free_bytes: int, model_bytes: int) -> float:
    """The rate a stage streams its units at: from the page cache (mapped, where its stage
    maps its shards, else read) when the node's available RAM holds the whole model,
    else from disk."""
    if free_bytes >= model_bytes:
        return node.get("mapped_page_cache_bw") or node.get("page_cache_bw") or node["rates"]["disk_bw"]
    return node["rates"]["disk_bw"]


def stage_rates(plan: PlacedPlan, nodes: list[dict], links: list[dict | None], free: list[int], gpus: list[str],
                model_bytes: int) -> list[Rates]:
    """One :class:`Rates` per stage: its node's measured rates, the disk rate it streams at
    (:func:`warm_disk`), the link to the next stage, and the device it shares: its GPU, or
    on a CPU its node when the node's stages take turns on all its cores."""
    out = []
    for i, (p, node, link) in enumerate(zip(plan.stages, nodes, links)):
        on_node = [q for q in plan.stages if q.node_id == p.node_id]
        turns = devices.kind_of(p.device).shares_node and len(on_node) > 1 and p.threads is not None and \
            p.threads >= node["key"]["cores"]
        device = gpus[i] or (p.node_id if turns else "")
        fields = {**node["rates"], "disk_bw": warm_disk(node, free[i], model_bytes), "device": device}
        if link is not None:
            fields.update(link_bw=link["link_bw"], link_latency_s=link["link_latency_s"])
        out.append(Rates(**fields))
    return out


def survey(stages, plan: PlacedPlan, store, shape: ModelShape, rows: int, free: list[int], gpus: list[str]) -> Survey:
    """Measure the nodes and links of ``stages`` (a ``Stages``: ``stages.actors[i]`` runs
    stage ``i`` of ``plan``, the bytes-balanced plan) for ``rows`` rows a micro-batch of
    the model of ``store`` (``shape``, in the compute dtype). ``free`` is each stage's
    node's available RAM (or its GPU's memory), ``gpus`` each stage's physical GPU (""
    on a CPU). A node's cached measurement is used (``DISTLAYER_REMEASURE=1`` there
    measures again). Filling a node's store with the measured shards records nothing in
    ``plan``'s placements; :attr:`Survey.pushed` says what was sent."""
    first: dict[tuple[str, str], int] = {}  # (node, gpu): the stage measuring it
    for i, p in enumerate(plan.stages):
        first.setdefault((p.node_id, gpus[i]), i)
    by = [first[p.node_id, gpus[i]] for i, p in enumerate(plan.stages)]
    layers = {i: measured_layers(store.num_layers, plan.stages[i].start, plan.stages[i].end) for i in first.values()}

    def measure(i: int, cached_only: bool):
        return stages.call(stages.actors[i], "measure_rates", rows, False, plan.stages[i].threads, layers[i],
                           cached_only)

    got = dict(zip(layers, stages.get([measure(i, True) for i in layers])))
    todo = [i for i, r in got.items() if r is None]
    pushed = {}
    if todo and stages.remote:  # the measured layers' shards on each node, as the stage's own would be
        probe = [PlacedStage(StagePlan(i, *layers.get(i, (p.start, p.end)), False, p.device),
                             Placement(p.node_ip, p.node_id)) for i, p in enumerate(plan.stages)]
        pushed = fill_stages(stages, probe, store, which=todo)
    for i in todo:  # one node at a time
        got[i] = stages.get(measure(i, False))
    nodes = [got[b] for b in by]
    links = _links(stages, plan) if stages.remote else [None] * len(by)
    model_bytes = sum(shape.layer_bytes) + shape.embed + shape.norm + shape.head
    return Survey(tuple(nodes), tuple(links), tuple(stage_rates(plan, nodes, links, free, gpus, model_bytes)),
                  tuple(by), pushed)


def _links(stages, plan: PlacedPlan) -> list[dict | None]:
    """The hop from each stage to the next where they are on different nodes."""
    out = []
    for i, p in enumerate(plan.stages):
        nxt = plan.stages[i + 1] if i + 1 < len(plan.stages) else None
        if nxt is None or nxt.node_id == p.node_id:
            out.append(None)
            continue
        port = stages.get(stages.call_with(stages.actors[i + 1], link_listen))
        out.append(stages.get(stages.call_with(stages.actors[i], link_probe, nxt.node_ip, port)))
    return out


def timer_for(shape: ModelShape, rates: list[Rates], plan: Plan, rows: int, context: int | None) -> Timer:
    """The cost model's timer for ``plan``'s pipeline at ``rows`` rows a step, for
    sequences of ``context`` tokens (``cost.mean_context``)."""
    return Timer(shape, tuple(rates), rows, plan.micro_batches, mean_context(context))
