"""The rates of the node and device a stage runs on, measured there, for the cost model
(:mod:`distlayer.cost`): a :class:`~distlayer.cost.Rates` from a few seconds of timing,
cached per node and model shape.

What is timed, and what each rate is:

- ``flops``: a prefill of :data:`PREFILL` tokens a row, at the batch asked, through one
  real decoder layer of the model (from the store, in the compute dtype, on the stage's
  device, through :class:`~distlayer.runner.LayerRunner` as a one-layer stage): its FLOPs
  by ``cost.unit_flops`` over the seconds. A prefill's matmuls are matrix products, so
  this is the rate arithmetic runs at; the seconds include one forward's overhead, a
  small share at that many tokens.
- ``mem_bw``: a large tensor read, not the model's: a matrix of :data:`READ_BYTES`
  (larger than any CPU cache) times one row, as a decode step's matmuls read their
  weights; its bytes over the seconds. One row whatever the batch: this is the memory's
  rate; what a matmul kernel loses at more rows shows in the overheads, measured at the
  batch asked.
- ``layer_overhead_s`` and ``step_overhead_s``: decode steps (one token a row at
  :data:`PREFILL` tokens of context) of a one-layer stage and of a stage of
  :data:`LAYERS` layers; each layer's seconds beyond what ``flops`` and ``mem_bw``
  predict for it is its overhead, and what the one-layer stage takes beyond one layer is
  the stage's: Python, dispatch, small kernels, and the matmuls' shortfall from
  ``mem_bw`` on the layer's small matrices. Before each timed forward the large read
  runs, so the layer's weights come from memory, as in a real step, not from a cache
  they would fit in. The measuring stages hold their layers as the planner's stage would
  (``planner.maps_shards``: mapped in place on a CPU, where the store allows).
- ``disk_bw``: a plain sequential read of the measured layers' shards (at most
  :data:`DISK_BYTES`, at least one) after asking the kernel to drop them from the page cache
  (``posix_fadvise(DONTNEED)``). The kernel keeps pages that some process maps (a stage
  holding the store), and then this is the page cache's rate; the result notes the warm
  read rate of the same files beside it (``page_cache_bw``), so a cold rate near it says
  the drop did not take; and, where the planner's stage maps its shards
  (``planner.maps_shards``), the rate it streams them from the page cache at, mapping
  their pages in and out (``pages.Mapping.page_in``, ``page_out``; ``mapped_page_cache_bw``,
  else None): no copy, so faster than a read.
- ``h2d_bw``: on a GPU, a copy of :data:`H2D_BYTES` from pinned host memory; None on a CPU.

Each timing is the best of :data:`REPEAT` runs: what the device does while it runs. How
much of the time it gets to run is measured apart, as the CPU share (``cpu_share``). A
node under a CPU quota (a cgroup's ``cpu.cfs_quota_us``) or busy with other work runs a
short forward at full speed within its share of a scheduling period and waits out the
rest, so a short timing misses the wait, and a mean depends on which run it falls on
(under a quota each timed run first waits :data:`REFILL_S`, to start a period with the
whole quota). The share is the CPU seconds the stage's threads get in :data:`WINDOW_S`
seconds of matrix products on all of them, over the wall seconds times the threads (at
most 1; the best of :data:`SHARES` windows). A quota and load differ. A quota grants so
much CPU time per period, which a stage that idles while others work banks: under one
the rates stay the device's at full speed, and the share (at most the quota's cores over
the threads; less where the node's other processes use part of the quota) goes into
``cpu_quota``, for the cost model to bound the step with (``cost.Timer.quota_s``).
Load takes its share while the stage runs: without a quota, on a CPU, ``flops``,
``mem_bw`` and the page-cache rates are multiplied by the share and the overheads
divided by it; on a GPU only the overheads (the host launches the work); the cold disk
read, which waits on the disk, not at all.

The timings run on the process's compute thread (``compute.run``), where its CPU stages'
forwards run too.

The layers measured are :data:`LAYERS` of the model's (by default from its middle;
``layers`` picks others, such as those a stage will hold, so a node needs only their
shards). Results are kept as JSON under ``$DISTLAYER_HOME/rates``
(``sources.home_dir``), one file per node, device, CPU quota, threads, dtype, batch, model
shape and store disk, and reused; ``remeasure=True`` or ``DISTLAYER_REMEASURE=1``
measures again.

:func:`link_listen` and :func:`link_probe` time the hop from one stage's node to
another's over TCP, as the stages' own hand-offs go: the round trip of a byte
(``link_latency_s``, half the best of :data:`LINK_PINGS`) and :data:`LINK_BYTES` sent
(``link_bw``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import arch, compute, devices, hardware
from .bench.measure import read_bandwidth
from .cost import Rates, unit_flops
from .planner import ModelShape, StagePlan, maps_shards
from .runner import LayerRunner
from .sources import home_dir
from .store import LayerStore
from .units import layer_unit

REMEASURE_ENV = "DISTLAYER_REMEASURE"
METHOD = 2                 # how rates are measured and what they mean: results of another are measured again
READ_BYTES = 256 * 2**20   # the large read (mem_bw), which also evicts caches before each timed forward
DISK_BYTES = 128 * 2**20   # at most this many bytes of layer shards are read for disk_bw
H2D_BYTES = 64 * 2**20     # a host-to-device copy of this many bytes (GPU)
PREFILL = 64               # tokens a row of the prefill that measures FLOP/s (and the decode steps' context)
LAYERS = 4                 # decoder layers of the longer stage the overheads are measured with
REPEAT = 5                 # runs of each timing; the best counts
STEPS = 4                  # decode steps a run of the overheads' timing takes the mean of, as a decode does
WINDOW_S = 0.5             # seconds the CPU share is measured over (several CPU-quota periods)
SHARES = 3                 # windows the share is measured in; the best counts, as the best run of a timing does
REFILL_S = 0.25            # under a CPU quota, the wait before a timed run (over two default periods)
LINK_BYTES = 16 * 2**20    # bytes sent to time a link's bandwidth
LINK_PINGS = 20            # one-byte round trips to time a link's latency
CACHE = "m"                # KV cache id of the measuring stages
RESULT_KEYS = ("rates", "page_cache_bw", "mapped_page_cache_bw", "cpu_share", "timings", "measured_at", "seconds")


def remeasure_asked(remeasure: bool = False) -> bool:
    """Whether to measure again: ``remeasure``, or ``DISTLAYER_REMEASURE`` set to anything but 0."""
    return remeasure or os.environ.get(REMEASURE_ENV, "").strip() not in ("", "0")


def node_key(store: LayerStore, dtype: torch.dtype, device: str, batch: int, threads: int | None) -> dict:
    """What a measurement holds for: this node and device, the threads, dtype and batch, the
    model's shape and the disk its store is on."""
    shape = ModelShape.from_store(store, dtype)
    dev = torch.device(device)
    name = devices.kind_of(dev).device_name(dev)
    return {"method": METHOD, "node": socket.gethostname(), "device": name, "cores": hardware.cores(), "cpu_quota": hardware.cpu_quota(),
            "threads": threads or torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "store_disk": os.stat(store.path).st_dev,
            "model": {"layers": len(shape.layer_bytes), "layer_bytes": max(shape.layer_bytes, default=0),
                      "hidden": shape.hidden, "vocab": shape.vocab, "kv_bytes_per_token": shape.kv_bytes_per_token}}


def cache_file(key: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """The JSON file a measurement for ``key`` is kept in."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (Path(cache_dir) if cache_dir else home_dir() / "rates") / f"{digest}.json"


def measured_layers(num_layers: int, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """The decoder layers a measurement runs: :data:`LAYERS` (fewer if the range is
    shorter) from the middle of ``[start, end)`` (default: the whole model)."""
    end = num_layers if end is None else end
    n = max(1, min(LAYERS, end - start))
    first = start + (end - start - n) // 2
    return first, first + n


def measure_node(store: LayerStore | str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu",
                 batch: int = 1, threads: int | None = None, remeasure: bool = False,
                 cache_dir: str | os.PathLike | None = None, layers: tuple[int, int] | None = None,
                 cached_only: bool = False) -> dict | None:
    """This node's rates for ``store``'s model (module docstring), from the cache when
    measured before.

    Args:
        store: the layer store (or its path) on this node.
        dtype: compute dtype; default the checkpoint's.
        device: the stage's device, ``"cpu"`` or ``"cuda:0"``.
        batch: rows a step decodes.
        threads: torch threads on a CPU (None: as set).
        remeasure: measure again even if cached (also ``DISTLAYER_REMEASURE=1``).
        cache_dir: the folder to keep results in (default ``$DISTLAYER_HOME/rates``).
        layers: the decoder layers ``[start, end)`` to measure with (:func:`measured_layers`);
            only their shards and the store's side files need be on this node.
        cached_only: return None rather than measure when nothing is cached.

    Returns:
        ``{"rates": Rates fields, "page_cache_bw", "mapped_page_cache_bw", "cpu_share", "timings", "key",
        "measured_at", "seconds", "cached"}``; ``Rates(**result["rates"])`` is the rates.
    """
    store = store if isinstance(store, LayerStore) else LayerStore(store)
    dtype = dtype or arch.checkpoint_dtype(store.config)
    key = node_key(store, dtype, device, batch, threads)
    path = cache_file(key, cache_dir)
    if not remeasure_asked(remeasure) and path.is_file():
        try:
            got = json.loads(path.read_text())
            if got.get("key") == key and all(k in got for k in RESULT_KEYS):
                Rates(**got["rates"])  # a file from another version of Rates is measured again
                return {**got, "cached": True}
        except (ValueError, TypeError, KeyError, OSError):
            pass
    if cached_only:
        return None
    t0 = time.perf_counter()
    got = compute.run(_measure, store, dtype, torch.device(device), batch, threads,
                      layers or measured_layers(store.num_layers))
    got.update(key=key, measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               seconds=round(time.perf_counter() - t0, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # a name of its own: nodes sharing a home may write at once
    tmp.write_text(json.dumps(got, indent=1))
    tmp.replace(path)
    return {**got, "cached": False}


def measure_rates(store, dtype=None, device: str = "cpu", batch: int = 1, threads: int | None = None,
                  remeasure: bool = False, cache_dir=None) -> Rates:
    """This node's :class:`~distlayer.cost.Rates` (:func:`measure_node`'s ``rates``)."""
    return Rates(**measure_node(store, dtype, device, batch, threads, remeasure, cache_dir)["rates"])


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    devices.kind_of(device).wait(device)


def _best(fn, device: torch.device, before=None, calls: int = 1) -> float:
    """Seconds of a call of ``fn``: the best of :data:`REPEAT` means of ``calls`` calls
    (``before`` runs untimed ahead of each call). Under a CPU quota each call waits
    :data:`REFILL_S` first, so it starts with a period's whole quota and runs as the
    device does, not as the quota lets it."""
    means, quota = [], hardware.cpu_quota() is not None
    for _ in range(REPEAT):
        timed = 0.0
        for _ in range(calls):
            if before is not None:
                before()
            _sync(device)
            if quota:
                time.sleep(REFILL_S)
            t = time.perf_counter()
            fn()
            _sync(device)
            timed += time.perf_counter() - t
        means.append(timed / calls)
    return min(means)


def cpu_share(threads: int, seconds: float = WINDOW_S) -> float:
    """The share of ``threads`` cores' time this process gets now: CPU seconds over wall
    seconds times ``threads`` while matrix products run on ``threads`` torch threads for
    ``seconds`` (at most 1; module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.full((384, 384), 0.5)
        torch.mm(a, a)  # warm-up: the threads start
        wall, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            torch.mm(a, a)
        return min(1.0, (time.process_time() - cpu) / ((time.perf_counter() - wall) * threads))
    finally:
        torch.set_num_threads(before)


class _LargeRead:
    """A ``[1, 2048]`` by ``[n, 2048]`` product over a matrix of about ``nbytes``: the
    weight reads of a decode step's matmuls, on a matrix no cache holds."""

    def __init__(self, device: torch.device, dtype: torch.dtype, nbytes: int, rows: int = 1):
        k = 2048
        self.w = torch.full((max(1, nbytes // (k * dtype.itemsize)), k), 0.01, dtype=dtype, device=device)
        self.x = torch.full((rows, k), 0.01, dtype=dtype, device=device)
        self.nbytes = self.w.numel() * self.w.element_size()

    @torch.inference_mode()
    def __call__(self) -> None:
        F.linear(self.x, self.w)


class _Stage:
    """A middle stage (no embeddings, no head) of decoder layers ``[start, end)``, all resident."""

    def __init__(self, store: LayerStore, dtype, device: torch.device, start: int, end: int, threads, batch: int):
        units = tuple(layer_unit(i) for i in range(start, end))
        maps = maps_shards(ModelShape.from_store(store, dtype), device.type)
        plan = StagePlan(1, start, end, False, str(device), threads=threads, resident_units=units, maps_shards=maps)
        self.runner = LayerRunner(store, plan, device=device, dtype=dtype, prefetch=False)
        self.batch, self.dtype = batch, dtype
        self.hidden = store.config.get_text_config().hidden_size
        self.pos = 0

    def forward(self, tokens: int) -> None:
        """Run ``tokens`` more tokens a row (a fresh cache when it is a prefill)."""
        if tokens > 1:
            self.runner.drop(CACHE)
            self.pos = 0
        g = torch.Generator().manual_seed(self.pos)
        x = 0.1 * torch.randn(self.batch, tokens, self.hidden, generator=g).to(self.dtype)
        pos = torch.arange(self.pos, self.pos + tokens).expand(self.batch, tokens)
        self.runner.forward(x, None, pos, CACHE, None)
        self.pos += tokens

    def close(self) -> None:
        self.runner.close()


def _measure(store: LayerStore, dtype, device: torch.device, batch: int, threads: int | None,
             layers: tuple[int, int]) -> dict:
    before = torch.get_num_threads()
    if threads and devices.kind_of(device).sets_threads:
        torch.set_num_threads(threads)
    try:
        rates, timings = _compute(store, dtype, device, batch, threads, layers)
    finally:
        torch.set_num_threads(before)
    disk = _disk(store, maps_shards(ModelShape.from_store(store, dtype), device.type), layers)
    share = max(cpu_share(threads or before) for _ in range(SHARES))
    quota = quota_share(threads or before)
    if quota is not None:  # what the stage gets of the quota, which the node's other processes share
        quota = min(quota, share)
    slowed = share if quota is None else 1.0  # under a quota the rates stay at full speed
    cpu = devices.kind_of(device).host
    rates = {**rates, "step_overhead_s": rates["step_overhead_s"] / slowed,
             "layer_overhead_s": rates["layer_overhead_s"] / slowed, "cpu_quota": quota}
    if cpu:
        rates.update(flops=rates["flops"] * slowed, mem_bw=rates["mem_bw"] * slowed)
    page_cache = {k: v * slowed if cpu and v is not None else v
                  for k, v in (("page_cache_bw", disk["page_cache_bw"]), ("mapped_page_cache_bw", disk["mapped_page_cache_bw"]))}
    rates.update(disk_bw=disk["disk_bw"], h2d_bw=None if devices.kind_of(device).host else _h2d(device))
    return {"rates": dataclasses.asdict(Rates(**rates)), **page_cache, "cpu_share": share,
            "timings": {**timings, "disk_read_bytes": disk["bytes"]}}


def quota_share(threads: int) -> float | None:
    """The share of ``threads`` cores' time this process's CPU quota allows (at most 1),
    or None without a quota (``hardware.cpu_quota``)."""
    quota = hardware.cpu_quota()
    return None if quota is None else min(1.0, quota / threads)


def _compute(store: LayerStore, dtype, device: torch.device, batch: int, threads,
             span: tuple[int, int]) -> tuple[dict, dict]:
    """flops, mem_bw and the overheads (module docstring) on decoder layers ``span``, and
    the timings they come from."""
    shape = ModelShape.from_store(store, dtype)
    start, layers = span[0], span[1] - span[0]
    unit, nbytes = layer_unit(start), shape.layer_bytes[start]
    flush = _LargeRead(device, dtype, READ_BYTES)
    flush()  # warm-up
    mem_bw = flush.nbytes / _best(flush, device)
    times = {}
    for span in sorted({1, layers}):
        stage = _Stage(store, dtype, device, start, start + span, threads, batch)
        try:
            stage.forward(PREFILL)  # warm-up
            stage.forward(1)
            if span == 1:
                times["prefill_s"] = _best(lambda: stage.forward(PREFILL), device, flush)
                stage.forward(PREFILL)
            times[f"step_{span}_s"] = _best(lambda: stage.forward(1), device, flush, STEPS)
        finally:
            stage.close()
    flops = unit_flops(shape, unit, nbytes, batch * PREFILL, (PREFILL + 1) // 2) / times["prefill_s"]
    # one layer's decode step as flops and mem_bw alone predict it
    layer_s = max(unit_flops(shape, unit, nbytes, batch, PREFILL) / flops,
                  (nbytes + batch * PREFILL * shape.kv_bytes_per_token) / mem_bw)
    one = times["step_1_s"]
    if layers > 1:
        per_layer = (times[f"step_{layers}_s"] - one) / (layers - 1)
        layer_overhead = max(0.0, per_layer - layer_s)
        step_overhead = max(0.0, one - layer_s - layer_overhead)
    else:
        layer_overhead, step_overhead = max(0.0, one - layer_s), 0.0
    rates = {"flops": flops, "mem_bw": mem_bw, "step_overhead_s": step_overhead, "layer_overhead_s": layer_overhead}
    timings = {**{k: round(v, 6) for k, v in times.items()}, "layer_s": round(layer_s, 6),
               "read_bytes": flush.nbytes, "layers": layers, "prefill": PREFILL}
    return rates, timings


def _disk(store: LayerStore, maps: bool, layers: tuple[int, int]) -> dict:
    """Read rates of the shards of ``layers``: dropped from the page cache first, and again
    warm; with ``maps``, also mapped in and out of memory from the page cache."""
    units, total = [], 0
    for i in range(*layers):
        size = (store.path / store.units[layer_unit(i)]["file"]).stat().st_size
        if units and total + size > DISK_BYTES:
            break
        units.append(layer_unit(i))
        total += size
    files = [store.path / store.units[u]["file"] for u in units]
    cold = read_bandwidth(files, cold=True)
    warm = read_bandwidth(files, cold=False)
    mapped = None
    if maps:
        maps_ = [store.map(u) for u in units]

        def page_through():
            for m in maps_:
                m.page_in(0, len(m.map))
                m.page_out(0, len(m.map))

        mapped = sum(len(m.map) for m in maps_) / _best(page_through, torch.device("cpu"))
    return {"disk_bw": cold["bytes_per_s"] or float("inf"), "page_cache_bw": warm["bytes_per_s"] or float("inf"),
            "mapped_page_cache_bw": mapped, "bytes": total}


def _h2d(device: torch.device) -> float:
    """Bytes/s of a copy from pinned host memory to ``device``."""
    host = torch.empty(H2D_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(H2D_BYTES, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    return H2D_BYTES / _best(lambda: dev.copy_(host, non_blocking=True), device)


# --------------------------------------------------------------------------- links between nodes


def link_listen(actor=None, host: str = "0.0.0.0") -> int:
    """Run in the receiving stage's process: listen for one :func:`link_probe` on ``host``
    (a thread answers it: echoes each ping byte, then acknowledges :data:`LINK_BYTES`
    with one byte) and return the port. ``actor`` is the stage the driver calls this in
    (unused)."""
    server = socket.create_server((host, 0))
    server.settimeout(60)

    def answer():
        with server:
            try:
                conn, _ = server.accept()
            except OSError:  # nobody came
                return
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(LINK_PINGS):
                    conn.sendall(conn.recv(1))
                left = LINK_BYTES
                while left > 0:
                    got = conn.recv(min(left, 1 << 20))
                    if not got:
                        return
                    left -= len(got)
                conn.sendall(b"k")

    threading.Thread(target=answer, daemon=True, name="link-probe").start()
    return server.getsockname()[1]


def link_probe(actor, host: str, port: int, timeout: float = 60.0) -> dict:
    """Run in the sending stage's process: time the hop to ``host:port`` (a
    :func:`link_listen`). Returns ``{"link_bw", "link_latency_s", "rtt_s", "bytes"}``: the
    bandwidth of :data:`LINK_BYTES` sent less one round trip, over the seconds, and half the
    best round trip of a byte."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(LINK_PINGS):
            t = time.perf_counter()
            conn.sendall(b"p")
            conn.recv(1)
            rtts.append(time.perf_counter() - t)
        rtt = min(rtts)
        payload = memoryview(bytearray(LINK_BYTES))
        t = time.perf_counter()
        conn.sendall(payload)
        conn.recv(1)
        seconds = max(time.perf_counter() - t - rtt, 1e-9)
    return {"link_bw": LINK_BYTES / seconds, "link_latency_s": rtt / 2, "rtt_s": rtt, "bytes": LINK_BYTES}
