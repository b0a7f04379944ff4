"""What-if planning: plan a model on a cluster described in a YAML file, whose nodes may
not exist yet, and predict how fast it decodes (``distlayer plan MODEL --cluster FILE``).

Works from the model's config alone: unit sizes are counted on the meta device
(:func:`shape_from_config`), no weights are read and no store is written. Planning is the
pure ``planner.plan_pipeline`` with each device's memory as what it has free, and the
prediction is :func:`distlayer.cost.predict`.

The file (examples in ``cluster/``)::

    distlayer_cluster: 1          # marks a what-if file (cluster/ also holds Ray's)
    nodes:
      - name: box                 # one stage per device, in this order
        host_ram: 32GiB
        disk_gbps: 3.0            # GB/s of reading the store
        link_gbps: 10             # Gbit/s to the other nodes (10 for 10GbE)
        link_latency_ms: 0.2      # optional: per hop to another node (default 0.2)
        cores: 8
        devices:
          - known: rtx-4060-8gb   # an entry of KNOWN_DEVICES, any field overridable
          - {kind: cuda, memory: 8GiB, tflops: 15, mem_gbps: 272, h2d_gbps: 13}
          - {kind: cpu, tflops: 0.5, mem_gbps: 40}   # memory: the node's host_ram, shared

``disk_gbps``, ``mem_gbps`` and ``h2d_gbps`` are gigabytes per second; ``link_gbps`` is
gigabits per second, as networks are sold.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from . import devices
from .config import PipelineConfig, parse_bytes
from .cost import Prediction, Rates, Timer, mean_context, predict
from .errors import ConfigError
from .planner import (ModelShape, Plan, Site, kv_bytes_per_token, micro_batch_choices, pipeline_layout,
                      plan_pipeline)
from .survey import balance_for
from .transport import delivers_waves
from .units import EMBED, HEAD, NORM, layer_unit

GB, Gbit = 1e9, 1e9 / 8
MARKER = "distlayer_cluster"
LINK_LATENCY_MS = 0.2     # a hop between nodes over Ethernet, through Ray, unless the file says
LOCAL_HOP_S = 50e-6       # a hop between stages on one node (shared memory)

# Approximate public figures: peak numbers from the vendors' spec sheets, so predictions
# with them are optimistic. h2d: the PCIe link's theoretical rate x 0.8 (what pinned
# copies reach in practice).
KNOWN_DEVICES: dict[str, dict] = {
    # NVIDIA GeForce RTX 4060 spec page: 8 GB GDDR6, 128-bit at 17 Gbps = 272 GB/s; 15.1
    # FP32 TFLOPS (TechPowerUp GPU database); PCIe 4.0 x8 = 15.8 GB/s.
    "rtx-4060-8gb": {"kind": "cuda", "memory": "8GiB", "tflops": 15.1, "mem_gbps": 272, "h2d_gbps": 12.6},
    # NVIDIA GeForce RTX 3060 spec page: 12 GB GDDR6, 192-bit at 15 Gbps = 360 GB/s; 12.7
    # FP32 TFLOPS (TechPowerUp); PCIe 4.0 x16 = 31.5 GB/s.
    "rtx-3060-12gb": {"kind": "cuda", "memory": "12GiB", "tflops": 12.7, "mem_gbps": 360, "h2d_gbps": 25.2},
    # NVIDIA GeForce GTX 1650 (GDDR5) spec page: 4 GB, 128-bit at 8 Gbps = 128 GB/s; 2.98
    # FP32 TFLOPS (TechPowerUp); PCIe 3.0 x16 = 15.8 GB/s.
    "gtx-1650-4gb": {"kind": "cuda", "memory": "4GiB", "tflops": 2.98, "mem_gbps": 128, "h2d_gbps": 12.6},
    # NVIDIA T4 datasheet: 16 GB GDDR6 at 320 GB/s, 65 FP16 tensor TFLOPS, PCIe 3.0 x16.
    "t4-16gb": {"kind": "cuda", "memory": "16GiB", "tflops": 65, "mem_gbps": 320, "h2d_gbps": 12.6},
    # Raspberry Pi 5 product brief: 4 Cortex-A76 cores at 2.4 GHz (2 x 128-bit FMA a cycle:
    # 4 x 2.4 GHz x 16 = 0.15 FP32 TFLOPS peak), LPDDR4X-4267 on 32 bits = 17 GB/s.
    "rpi5-8gb": {"kind": "cpu", "memory": "8GiB", "tflops": 0.15, "mem_gbps": 17},
    # A desktop CPU with dual-channel DDR4-3200 (JEDEC: 2 x 25.6 = 51.2 GB/s), 8 cores with
    # AVX2 at 3.5 GHz (2 FMA x 8 FP32 lanes: 8 x 3.5 GHz x 32 = 0.9 TFLOPS peak).
    "desktop-ddr4-8core": {"kind": "cpu", "tflops": 0.9, "mem_gbps": 51.2},
}

NODE_KEYS = {"name": True, "host_ram": True, "disk_gbps": True, "link_gbps": True, "cores": True, "devices": True,
             "link_latency_ms": False}
DEVICE_KEYS = {"known": False, "kind": False, "memory": False, "tflops": False, "mem_gbps": False, "h2d_gbps": False}
KINDS = tuple(devices.KINDS)  # the kinds a device of the file may be


@dataclass(frozen=True)
class Device:
    """One device of a what-if node: one stage runs on it."""

    node: str
    index: int
    kind: str
    memory: int
    tflops: float
    mem_gbps: float
    h2d_gbps: float | None
    label: str  # the known device's name, else its kind


@dataclass(frozen=True)
class Node:
    """One node of a what-if cluster."""

    name: str
    host_ram: int
    disk_gbps: float
    link_gbps: float
    link_latency_ms: float
    cores: int
    devices: tuple[Device, ...]


def check_keys(data, where: str, keys: dict[str, bool]) -> None:
    """``data`` is a mapping with every required key of ``keys`` (name: required) and no other;
    ``where`` prefixes the keys in messages (``"nodes[0]."``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.')}: got {data!r}; write a mapping of key: value")
    for key in data:
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(keys)}"
            raise ConfigError(f"unknown key '{where}{key}': {hint}")
    for key, required in keys.items():
        if required and key not in data:
            raise ConfigError(f"missing required key '{where}{key}': add `{key}: ...` to the cluster file")


def number(where: str, value, positive: bool = True) -> float:
    """``value`` as a number above 0 (or at least 0), else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 or not positive and value >= 0):
        raise ConfigError(f"{where}: got {value!r}; write a number {'above' if positive else 'of at least'} 0")
    return float(value)


def size(where: str, value) -> int:
    """``value`` as a byte size above 0 (``config.parse_bytes``), else a ConfigError."""
    try:
        n = parse_bytes(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not n or n <= 0:
        raise ConfigError(f"{where}: got {value!r}; write a size above 0 like 8GiB")
    return n


def parse_device(data, where: str, node: str, index: int, default_memory: int) -> Device:
    """One ``devices:`` entry: a known device (fields overridable) or all of its fields."""
    check_keys(data, where + ".", DEVICE_KEYS)
    spec = {}
    if "known" in data:
        known = data["known"]
        if not isinstance(known, str) or known not in KNOWN_DEVICES:
            close = difflib.get_close_matches(str(known), list(KNOWN_DEVICES), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "or give kind, memory, tflops, mem_gbps (and h2d_gbps)"
            raise ConfigError(f"{where}.known: no known device {known!r}; known: {', '.join(KNOWN_DEVICES)}; {hint}")
        spec = dict(KNOWN_DEVICES[known])
    spec.update({k: v for k, v in data.items() if k != "known"})
    if spec.get("kind") not in KINDS:
        raise ConfigError(f"{where}.kind: got {spec.get('kind')!r}; write {' or '.join(KINDS)} "
                          "(or known: a known device)")
    kind = spec["kind"]
    need = ("tflops", "mem_gbps", *(() if devices.kind_of(kind).host else ("memory", "h2d_gbps")))
    for key in need:
        if key not in spec:
            raise ConfigError(f"missing required key '{where}.{key}': a {kind} device needs "
                              f"{', '.join(need)} (or known: a known device)")
    if devices.kind_of(kind).host and spec.get("h2d_gbps") is not None:
        raise ConfigError(f"{where}.h2d_gbps: a cpu device copies nothing to a device; leave h2d_gbps out")
    memory = size(f"{where}.memory", spec["memory"]) if "memory" in spec else default_memory
    return Device(node, index, kind, memory, number(f"{where}.tflops", spec["tflops"]),
                  number(f"{where}.mem_gbps", spec["mem_gbps"]),
                  None if devices.kind_of(kind).host else number(f"{where}.h2d_gbps", spec["h2d_gbps"]),
                  data.get("known") or kind)


def parse_node(data, where: str) -> Node:
    check_keys(data, where + ".", NODE_KEYS)
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name: got {name!r}; write a non-empty name")
    ram = size(f"{where}.host_ram", data["host_ram"])
    cores = data["cores"]
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ConfigError(f"{where}.cores: got {cores!r}; write a whole number of at least 1")
    listed = data["devices"]
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{where}.devices: got {listed!r}; write a list of devices, one stage each")
    named = [d.get("kind") or KNOWN_DEVICES.get(str(d.get("known")), {}).get("kind") for d in listed
             if isinstance(d, dict)]
    hosts = sum(1 for k in named if isinstance(k, str) and k in devices.KINDS and devices.KINDS[k].host)  # share RAM
    parsed = tuple(parse_device(d, f"{where}.devices[{k}]", name, k, ram // max(hosts, 1))
                   for k, d in enumerate(listed))
    return Node(name, ram, number(f"{where}.disk_gbps", data["disk_gbps"]),
                number(f"{where}.link_gbps", data["link_gbps"]),
                number(f"{where}.link_latency_ms", data.get("link_latency_ms", LINK_LATENCY_MS), positive=False),
                cores, parsed)


def parse_cluster(data, where: str = "cluster file") -> list[Node]:
    """The nodes of a what-if cluster file's contents.

    Raises:
        ConfigError: a missing or unknown key, a bad value, or devices of both kinds.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {data!r}; write a mapping with {MARKER}: 1 and nodes:")
    if data.get(MARKER) != 1:
        raise ConfigError(f"{where}: not a what-if cluster file; add `{MARKER}: 1` and a list of nodes "
                          "(a Ray cluster-launcher file is for `ray up`, not --cluster)")
    check_keys({k: v for k, v in data.items() if k != MARKER}, "", {"nodes": True})
    nodes = data["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError(f"{where}.nodes: got {nodes!r}; write a list of nodes")
    parsed = [parse_node(n, f"nodes[{i}]") for i, n in enumerate(nodes)]
    names = [n.name for n in parsed]
    if len(set(names)) < len(names):
        raise ConfigError(f"nodes: two nodes are named {max(names, key=names.count)!r}; give each its own name")
    kinds = {d.kind for n in parsed for d in n.devices}
    if len(kinds) > 1:
        raise ConfigError("nodes: a pipeline runs on one kind of device, but the file has cuda and cpu devices; "
                          "describe only the cuda devices or only the cpu ones")
    return parsed


def load_cluster(path) -> list[Node]:
    """Read and check a what-if cluster file (:func:`parse_cluster`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"--cluster {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--cluster {path}: not YAML ({e})") from None
    return parse_cluster(data, str(path))


def stage_rates(nodes: list[Node]) -> list[Rates]:
    """Each stage's :class:`Rates`, one per device in file order: the hop to the next stage
    is over the node's memory (GPU: two copies over host) on one node, else over the
    slower of the two nodes' links."""
    devices = [(n, d) for n in nodes for d in n.devices]
    out = []
    for k, (node, d) in enumerate(devices):
        link_bw, latency = None, 0.0
        if k + 1 < len(devices):
            nxt = devices[k + 1][0]
            if nxt is node:
                link_bw, latency = (d.h2d_gbps * GB / 2 if d.h2d_gbps else d.mem_gbps * GB), LOCAL_HOP_S
            else:
                link_bw = min(node.link_gbps, nxt.link_gbps) * Gbit
                latency = max(node.link_latency_ms, nxt.link_latency_ms) / 1000
        out.append(Rates(flops=d.tflops * 1e12, mem_bw=d.mem_gbps * GB, disk_bw=node.disk_gbps * GB,
                         h2d_bw=d.h2d_gbps * GB if d.h2d_gbps else None, link_bw=link_bw, link_latency_s=latency,
                         device=f"{node.name}/{d.index}"))
    return out


def sites(nodes: list[Node]) -> list[Site]:
    """One planner ``Site`` per device, its memory as what it has free (and its node's
    ``host_ram`` as the RAM free for the pinned host tier)."""
    return [Site(n.name, n.name, d.memory, n.cores, "" if devices.kind_of(d.kind).host else f"{n.name}/{d.index}",
                 devices.kind_of(d.kind).stage_device or d.kind, n.host_ram)
            for n in nodes for d in n.devices]


def load_config(model: str):
    """The transformers config of ``model`` (a directory with config.json, or a repo id)."""
    from transformers import AutoConfig

    from .errors import StoreError

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise StoreError(f"{model}: cannot read the model's config.json ({e}); give a directory that holds it") from None


def shape_from_config(config, dtype) -> ModelShape:
    """What the planner needs of a model, from its config alone: each unit's parameters
    counted on the meta device (``arch.build_skeleton``), in ``dtype``; no weights read.
    A tied head counts its own copy, as the store writes it. The counterpart of
    ``ModelShape.from_store``, whose fields it fills the same way."""
    from . import arch

    p = arch.parts(arch.build_skeleton(config, dtype))
    sizes: dict[str, int] = {}
    for key, t in p.model.state_dict(keep_vars=True).items():
        unit = arch.unit_of_key(p, key)
        sizes[unit] = sizes.get(unit, 0) + t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    text = config.get_text_config()
    return ModelShape(
        layer_bytes=tuple(sizes.get(layer_unit(i), 0) for i in range(len(p.layers))),
        embed=sizes.get(EMBED, 0), norm=sizes.get(NORM, 0), head=sizes.get(HEAD, 0),
        kv_bytes_per_token=kv_bytes_per_token(text, dtype.itemsize), hidden=text.hidden_size, vocab=text.vocab_size,
        itemsize=dtype.itemsize, in_place=dtype == arch.checkpoint_dtype(config))


@dataclass(frozen=True)
class WhatIf:
    """A what-if plan and its prediction."""

    nodes: tuple[Node, ...]
    shape: ModelShape
    plan: Plan
    prediction: Prediction
    dtype: str

    def devices(self) -> list[tuple[Node, Device]]:
        return [(n, d) for n in self.nodes for d in n.devices]


def plan_cluster(model: str, cluster, cfg: PipelineConfig) -> WhatIf:
    """Plan ``model`` (from its config) on the what-if cluster file ``cluster`` with ``cfg``'s
    budgets, dtype, micro-batches, rows and context, and predict its decode step at
    ``cfg.max_rows`` rows for sequences of ``cfg.context`` tokens (``cost.mean_context``:
    the mean step attends over half of them; 0 if unset).

    Raises:
        ConfigError: a bad cluster file, or settings that the file decides.
        PlanError: the model does not fit the devices.
    """
    from . import arch

    for name, why in (("stages", "one stage per device in the file"), ("address", "no live cluster is asked")):
        if getattr(cfg, name) is not None:
            raise ConfigError(f"--{name} with --cluster: {why}; leave --{name} out")
    nodes = load_cluster(cluster)
    config = load_config(model)
    dtype = arch.compute_dtype(cfg.dtype, config)
    shape = shape_from_config(config, dtype)
    where = sites(nodes)
    device = "cuda" if where[0].gpu else "cpu"
    gpus = sum(1 for s in where if s.gpu)
    layout = pipeline_layout(gpus, device, len(where), None, cfg.micro_batches, cfg.threads_per_stage,
                             stage_nodes=[s.node_id for s in where], node_cores={n.name: n.cores for n in nodes})
    rates = stage_rates(nodes)
    timer = None if balance_for(cfg.balance, [s.node_id for s in where]) == "bytes" else \
        Timer(shape, tuple(rates), cfg.max_rows, layout.concurrency[0], mean_context(cfg.context))
    choices = micro_batch_choices(device, [s.node_id for s in where], layout.concurrency[0],
                                  cfg.micro_batches is not None)
    plan = plan_pipeline(shape, where, cfg.budgets(len(where)), device, layout.concurrency, cfg.max_rows, cfg.context,
                         timer, choices, cfg.host_memory_per_node, cfg.block_schedule,
                         delivers_waves(cfg.transport))
    prediction = predict(shape, plan, rates, cfg.max_rows, plan.micro_batches, mean_context(cfg.context))
    return WhatIf(tuple(nodes), shape, plan, prediction, str(dtype).removeprefix("torch."))
