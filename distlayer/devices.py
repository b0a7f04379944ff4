"""What differs between the kinds of device a stage runs on: one :class:`DeviceKind`
record per kind, in :data:`KINDS`.

Code that needs to know something about a device looks it up here
(``devices.kind_of(device).maps_shards``) instead of comparing the device string to
``"cpu"`` or ``"cuda"``. A new kind (MPS, a ROCm GPU) is one more entry in :data:`KINDS`
plus its memory tier (a class listed in ``memory.TIERS``, checked by
``tests/test_memory_contract.py``); ``tests/test_devices.py`` checks every entry.

No torch import: what needs torch (a kind's memory tier, free-bytes function, clock) is
named by its dotted name and imported when first used, so the planner and the config
stay importable without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def resolve(dotted: str) -> Any:
    """The object a dotted name (``"distlayer.streaming.HostMemory"``) names, imported."""
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DeviceKind:
    """One kind of device and everything that differs between kinds.

    Attributes:
        name: the kind, as torch names a device's type and the settings spell it
            (``"cuda"``; ``"cuda:1"`` is one device of that kind).
        ray_resource: the Ray resource a stage on it reserves besides CPUs (``"GPU"``,
            ``gpus_per_stage`` of it), and that the cluster counts to default to this kind;
            None: its stages take CPUs only.
        free_fraction: the share of the device's free memory a stage without a budget takes.
        workspace_bytes: what such a budget leaves besides, for what the KV and activation
            estimate does not count (0: nothing); ``workspace_note`` says for what.
        context: tokens per sequence a budget reserves KV cache and activations for when no
            context is set; None: its budgets bound weights alone.
        host: its memory is the node's RAM, and it computes on the node's cores: stages
            of one node share that RAM and those cores, each with its own torch threads
            (and OpenMP settings), set up and run on the process's compute thread
            (``compute.run``); they take turns rather than split a batch. Otherwise each
            stage's memory is its device's (stages on one physical device, ``physical_id``,
            share it) and its inputs are copied to the device.
        pinned_host: a stage on it may keep streamed units in pinned host memory (the
            planner gives it a share of its node's host budget, its tier takes ``host_units``).
        mapped_tier: the memory tier of a stage on it that maps its shards in place
            (dotted name; where the store allows it, ``planner.maps_shards``); None: its
            stages never map their shards.
        tier: the memory tier of its other stages (dotted name; in ``memory.TIERS``).
        free_bytes: a function of the device string giving its free bytes (dotted name).
        physical_id: a function of the device string giving which physical device it is,
            the same in every process (dotted name); None: no such id (``""``).
        stage_device: what a stage process calls its device (a Ray actor sees the GPU it
            was given as ``"cuda:0"``); None: the device as named.
        current: a context manager of the device that makes it current for a forward
            (dotted name, called with the device); None: nothing to make current.
        sync: its timing clock: a function of the device that waits for its queued work,
            so the wall clock times that work (dotted name; its memory tier times forwards
            with CUDA events); None: work is done when the call returns.
        present: a function of no arguments saying whether this machine has a device of
            the kind (dotted name); None: always (the CPU).
        model_name: a function of the device giving the device model's name, for the rates
            cache (dotted name); None: the kind's name.
        blocks: whether a stage on it that streams runs a step's micro-batches as one block
            by default (``block_schedule`` auto, where no rates were measured): on a GPU,
            streaming is bound by the host link, and stages sharing one GPU take turns
            anyway; a CPU stage maps its streamed pages from the page cache, cheap to map
            again, while blocks would cost stages on separate cores their overlap.
    """

    name: str
    ray_resource: str | None
    free_fraction: float
    workspace_bytes: int
    workspace_note: str
    context: int | None
    host: bool
    pinned_host: bool
    mapped_tier: str | None
    tier: str
    free_bytes: str
    physical_id: str | None = None
    stage_device: str | None = None
    current: str | None = None
    sync: str | None = None
    present: str | None = None
    model_name: str | None = None
    blocks: bool = False

    @property
    def maps_shards(self) -> bool:
        """Whether its stages map their shards in place (where the store allows it)."""
        return self.mapped_tier is not None

    @property
    def sets_threads(self) -> bool:
        """Whether a stage on it computes with torch threads of its own on the node's cores."""
        return self.host

    @property
    def shares_node(self) -> bool:
        """Whether its stages on one node share the node's memory and cores (and take turns)."""
        return self.host

    def tier_class(self, maps_shards: bool = False) -> type:
        """The memory tier class of a stage on it (``maps_shards``: one that maps its shards; imports torch).

        Raises:
            ValueError: ``maps_shards`` on a kind whose stages never map their shards.
        """
        if maps_shards and self.mapped_tier is None:
            raise ValueError(f"a {self.name} stage does not map its shards in place: plan it again for this device")
        return resolve(self.mapped_tier if maps_shards else self.tier)

    def free(self, device: str) -> int:
        """Bytes ``device`` (of this kind) has free now."""
        return int(resolve(self.free_bytes)(device))

    def physical(self, device: str) -> str:
        """Which physical device ``device`` is; ``""`` where the kind has no such id."""
        return "" if self.physical_id is None else str(resolve(self.physical_id)(device))

    def make_current(self, device) -> Any:
        """A context manager that makes ``device`` current for a forward (or does nothing)."""
        import contextlib

        return contextlib.nullcontext() if self.current is None else resolve(self.current)(device)

    def here(self) -> bool:
        """Whether this machine has a device of this kind."""
        return self.present is None or bool(resolve(self.present)())

    def device_name(self, device) -> str:
        """The device model's name (``"NVIDIA H100 80GB HBM3"``), or the kind's."""
        return self.name if self.model_name is None else str(resolve(self.model_name)(device))

    def wait(self, device) -> None:
        """Wait for ``device``'s queued work (nothing where calls finish their work)."""
        if self.sync is not None:
            resolve(self.sync)(device)


CPU = DeviceKind(
    "cpu", ray_resource=None, free_fraction=0.9, workspace_bytes=0, workspace_note="", context=None, host=True,
    pinned_host=False,
    mapped_tier="distlayer.streaming.MappedMemory", tier="distlayer.streaming.HostMemory",
    free_bytes="distlayer.hardware.ram_free_bytes")

CUDA = DeviceKind(
    "cuda", ray_resource="GPU", free_fraction=0.9,
    # leaves room for cuBLAS workspaces, prefill temporaries (MLP intermediates, attention
    # scores) and the allocator's rounding
    workspace_bytes=256 * 2**20, workspace_note="cuBLAS workspaces and temporaries",
    context=2048, host=False, pinned_host=True, mapped_tier=None, tier="distlayer.cuda_stream.CudaMemory",
    free_bytes="distlayer.hardware.cuda_free_bytes", physical_id="distlayer.hardware.cuda_id",
    stage_device="cuda:0", current="torch.cuda.device", sync="torch.cuda.synchronize",
    present="torch.cuda.is_available", model_name="torch.cuda.get_device_name", blocks=True)

# Every kind, by name; the first is the default where the cluster has none of the others' resources.
KINDS: dict[str, DeviceKind] = {k.name: k for k in (CPU, CUDA)}


def type_of(device: str) -> str:
    """The kind's name in a device string: ``"cuda:1"`` -> ``"cuda"`` (not checked)."""
    return str(device).split(":")[0]


def kind_of(device) -> DeviceKind:
    """The kind of ``device``: a name (``"cpu"``), a device string (``"cuda:1"``) or a
    ``torch.device``.

    Raises:
        ConfigError: no such kind, saying which there are.
    """
    name = type_of(getattr(device, "type", device))
    kind = KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown device {str(device)!r}: use one of {', '.join(KINDS)} (a device of a kind "
                          f"as kind:index, e.g. 'cuda:0'), or add a DeviceKind for it to distlayer.devices.KINDS")
    return kind


def default(resources: dict[str, float]) -> DeviceKind:
    """The kind a pipeline runs on when none is set: the first whose Ray resource the
    cluster (or this machine) has some of, else the first kind (CPU)."""
    first = next(iter(KINDS.values()))
    return next((k for k in KINDS.values() if k.ray_resource and resources.get(k.ray_resource)), first)
