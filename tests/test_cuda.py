"""The GPU path.

Tests marked ``cuda`` need a CUDA GPU and skip without one; ``benchmarks/gpu_check.sh``
runs them on a GPU machine. They compare distlayer with transformers on the same GPU and
dtype (greedy tokens identical, logits within :data:`TOLERANCE`) for one stage with every
unit resident, one stage streaming at a quarter of the weights, and two and four stages
sharing the GPU while streaming; check that the device's peak allocation stays within the
stages' budgets; and that a stage whose loader or process dies while streaming fails
with a clear error instead of hanging.

The other tests run anywhere: the pieces of the GPU path that are plain Python (reading
a shard into a flat buffer, the arena's first-in first-out allocation, GPU budgets and
reserves in the plan), and ``cuda_stream.CudaMemory`` driving real forwards on the CPU
with stand-ins for CUDA's streams, events and pinned memory, which checks its
bookkeeping (arena slices, offsets, the loader thread, recovery) but not GPU ordering.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import threading
import time

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, LayerStore, StageError, split
from distlayer import cuda_stream, devices, planner, runner
from distlayer.config import PipelineConfig
from distlayer.errors import ConfigError, PlanError, StoreError
from distlayer.streaming import Streamer
from distlayer.units import unit_order
from distlayer.planner import (GPU_CONTEXT, GPU_WORKSPACE, ModelShape, Site, plan_concurrency, plan_pipeline,
                               reserved_context)

NEW = 8
CONTEXT = 64  # tokens per sequence the cuda tests' budgets reserve KV cache and activations for
# What a budget set by hand leaves out (README, GPUs): attention and cuBLAS workspaces that
# come and go within a forward, and the rotary tables and other buffers no unit holds.
OUTSIDE_BUDGET = 16 * 2**20
# Logits against transformers on the same GPU and dtype: (rtol, atol).
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 5e-2), torch.bfloat16: (2e-2, 2.5e-1)}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def generate(model, ids, mask, new=NEW):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def assert_same(out, ref, dtype=torch.float32) -> None:
    rtol, atol = TOLERANCE[dtype]
    assert out.sequences.tolist() == ref.sequences.tolist()
    for step, (ours, theirs) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(ours.float().cpu(), theirs.float().cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"step {step}: {m}")


def budget(store: LayerStore, dtype: torch.dtype, weights: int, batch: int) -> int:
    """A per-stage budget of ``weights`` bytes of weights plus the KV cache of every layer
    and the activations for ``batch`` sequences of :data:`CONTEXT` tokens."""
    shape = ModelShape.from_store(store, dtype)
    return weights + shape.kv_bytes_per_layer(batch, CONTEXT) * store.num_layers \
        + shape.activation_bytes(batch, CONTEXT)


# --------------------------------------------------------------------------- anywhere


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_read_into_a_flat_buffer_matches_load(tiny_dir, dtype):
    store = LayerStore(split(tiny_dir("gemma2"), progress=False))
    for unit in store.units:
        buf = torch.empty(store.packed_bytes(unit, dtype), dtype=torch.uint8)
        got = store.read_into(unit, dtype, buf)
        want = store.load(unit, dtype)
        assert set(got) == set(want)
        for k, t in want.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
            assert (got[k].data_ptr() - buf.data_ptr()) % 256 == 0
    with pytest.raises(StoreError, match="packed_bytes"):
        store.read_into("layer.0", dtype, torch.empty(16, dtype=torch.uint8))


def test_ring_hands_out_slices_first_in_first_out():
    ring = cuda_stream.Ring(100)
    assert [ring.alloc(40), ring.alloc(40), ring.alloc(40)] == [0, 40, None]  # no room for a third yet
    assert ring.free() == (0, 40)
    assert ring.alloc(30) == 0                       # wraps to the start
    assert ring.alloc(20) is None                    # [30, 40) is too small
    assert ring.free() == (40, 80) and ring.alloc(50) == 30
    assert ring.alloc(21) is None and ring.alloc(20) == 80  # [0, 80) in use: 20 B left at the end
    assert ring.alloc(1) is None
    ring.clear()
    assert ring.alloc(100) == 0
    with pytest.raises(ValueError):
        cuda_stream.Ring(10).alloc(11)


SHAPE = ModelShape((100,) * 8, embed=200, norm=10, head=200, kv_bytes_per_token=2, hidden=4, vocab=8, itemsize=2)


def test_gpu_budgets_share_a_gpu_and_reserve_kv_by_default():
    free = 2**32
    one_gpu = [Site("n", "10.0.0.1", free, 8, "GPU-a")] * 4
    four_gpus = [Site("n", "10.0.0.1", free, 8, f"GPU-{i}") for i in range(4)]
    conc = plan_concurrency(["n"] * 4, {"n": 8}, "cuda")
    shared = plan_pipeline(SHAPE, one_gpu, [None] * 4, "cuda", conc)
    own = plan_pipeline(SHAPE, four_gpus, [None] * 4, "cuda", conc)
    for p in shared.stages:  # four stages on one GPU split its memory
        assert p.budget_bytes == int(free * 0.9) // 4 - GPU_WORKSPACE
        assert "shared by the GPU's 4 stages" in p.budget_source and "workspace" in p.budget_source
    assert all(p.budget_bytes == int(free * 0.9) - GPU_WORKSPACE for p in own.stages)
    # without a context a GPU stage reserves KV cache and activations for GPU_CONTEXT tokens
    assert reserved_context(None, "cuda:0") == GPU_CONTEXT and reserved_context(None, "cpu") is None
    assert reserved_context(100, "cuda") == 100
    act = SHAPE.activation_bytes(1, GPU_CONTEXT)
    for p in own.stages:
        assert p.reserve_bytes == SHAPE.kv_bytes_per_layer(1, GPU_CONTEXT) * (p.end - p.start) + act
    # a given context and batch replace the default; a given budget is kept whole
    given = plan_pipeline(SHAPE, four_gpus, [10**6] * 4, "cuda", conc, batch_size=2, context=100)
    for p in given.stages:
        assert p.budget_bytes == 10**6 and p.budget_source == "memory_per_stage"
        assert p.reserve_bytes == 2 * 100 * 2 * (p.end - p.start) + SHAPE.activation_bytes(2, 100)
    # on a CPU nothing changes: no reserve without a context
    cpu = plan_pipeline(SHAPE, four_gpus, [None] * 4, "cpu", plan_concurrency(["n"] * 4, {"n": 8}, "cpu"))
    assert all(p.reserve_bytes == 0 for p in cpu.stages)


@pytest.mark.parametrize("value", [0, -1, 1.5, "x", True])
def test_gpus_per_stage_is_checked(value):
    with pytest.raises(ConfigError, match="gpus_per_stage"):
        PipelineConfig(gpus_per_stage=value)
    assert PipelineConfig(gpus_per_stage=0.25).gpus_per_stage == 0.25


class StandInEvent:
    """A CUDA event on the CPU: work is done when it is queued."""

    def __init__(self, enable_timing=False, **_):
        pass

    def record(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 0.0


class StandInStream:
    def __init__(self, device=None, **_):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


class StandInCudart:
    """CUDA's runtime on the CPU: page-locking host memory succeeds, and is recorded."""

    def __init__(self):
        self.registered: dict[int, int] = {}  # address -> bytes, registered now
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 (CUDA's name)
        assert ptr not in self.registered and nbytes > 0 and flags == cuda_stream.HOST_REGISTER_FLAGS
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0 if self.registered.pop(ptr, None) else 1


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """``cuda_stream.CudaMemory`` as every stage's memory, on the CPU, with CUDA's
    streams, events, runtime and pinned memory replaced by stand-ins; returns the
    runtime's stand-in (:class:`StandInCudart`)."""
    cudart = StandInCudart()
    for name, value in {"Event": StandInEvent, "Stream": StandInStream, "current_stream": lambda device=None:
                        StandInStream(), "stream": lambda s: contextlib.nullcontext(),
                        "device": lambda d: contextlib.nullcontext(), "max_memory_allocated": lambda d=None: 0,
                        "cudart": lambda: cudart}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(cuda_stream, "pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    # a CPU stage's memory is CUDA's tier, which keeps host units where its plan names them
    monkeypatch.setitem(devices.KINDS, "cpu", dataclasses.replace(devices.CPU, tier=devices.CUDA.tier, pinned_host=True))
    monkeypatch.setattr(planner, "maps_shards", lambda shape, device: False)  # as a GPU stage: no mapped shards
    # the planner still gives no pinned host tier, as to a CPU stage; the tests that want one name its units
    monkeypatch.setattr(planner, "host_budgets", lambda sites, device, host_memory=None: [
        (0, "a CPU stage computes from host memory: nothing to pin")] * len(sites))
    return cudart


@pytest.mark.parametrize("arch, stages, units", [
    # room for one unit and a half: slices wrap around the arena; for three and a third:
    # the loader runs ahead, several slices in flight
    ("llama", 0, 1.5), ("llama", 0, 3.3), ("gemma2", 0, 1.5), ("llama", 3, 1.5), ("qwen2_moe", 2, 1.5),
])
def test_cuda_memory_bookkeeping_streams_exactly(stand_in_cuda, arch, stages, units, tiny_dir, hf_model):
    path = tiny_dir(arch)
    store = LayerStore(split(path, progress=False))
    largest = max(store.packed_bytes(u) for u in store.units)
    weights = int(units * largest)
    ids, mask = prompts(4)
    with torch.no_grad():
        ref = hf_model(arch).generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
    with AutoModel.from_pretrained(path, stages=stages, in_process=True, memory_per_stage=weights, device="cpu",
                                   progress=False) as model:
        for _ in range(2):  # the second run starts where the loader's cycle stands
            assert_same(generate(model, ids, mask), ref)
        stats = model.stats()
    assert sum(s["streamed_bytes"] for s in stats) > 0
    for s in stats:
        assert s["peak_weight_bytes"] <= weights + 256 * len(store.units["layer.0"]["tensors"])
        assert s["h2d_bytes"] > 0 or not s["streamed_units"]


class CountingStore(LayerStore):
    """A layer store that counts its reads into buffers (the reads a GPU stage streams
    with) per unit, how many ran at once at most, and can slow them (``delay`` seconds,
    longer for even layers, so reads started later may finish first) or fail one read
    (``fail``: a unit, and which of its reads, from 1)."""

    def __init__(self, path, delay: float = 0.0):
        super().__init__(path)
        self.reads: collections.Counter[str] = collections.Counter()
        self.delay, self.fail = delay, None
        self.lock = threading.Lock()
        self.running = self.most_at_once = 0

    def read_into(self, name, dtype, out, *args, **kwargs):
        with self.lock:
            self.reads[name] += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay * (3 if name.endswith(("0", "2")) else 1))
            if (name, self.reads[name]) == self.fail:
                raise StoreError(f"unit {name}: this read fails (the test's store)")
            return super().read_into(name, dtype, out, *args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def units_and_host(store: LayerStore) -> tuple[list[str], list[str], list[str]]:
    """A stage's streamed units (all but the embeddings, in forward order), the host units
    among them (interleaved with the others), and those read from the store each step."""
    order = unit_order(store.num_layers)[1:]
    host = [order[1], order[-1]]
    return order, host, [u for u in order if u not in host]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_host_units_are_read_once_and_the_others_once_a_step(stand_in_cuda, tiny_dir, prefetch):
    store = CountingStore(split(tiny_dir("llama"), progress=False), delay=0.01)
    dtype = torch.float32
    order, host, from_store = units_and_host(store)
    packed = {u: store.packed_bytes(u, dtype) for u in order}
    budget = int(2.5 * max(packed.values()))  # room for two units and a half: the loader waits for room
    want = {u: store.load(u, dtype) for u in order}
    unit_bytes = {u: store.unit_bytes(u, dtype) for u in order}
    mem = cuda_stream.CudaMemory(store, dtype, torch.device("cpu"), budget, unit_bytes, 0, host_units=host)
    mem.prepare(order)
    assert store.reads == {u: 1 for u in host}  # at start, before any step
    slots = min(cuda_stream.STAGING_SLOTS, len(from_store))
    # one pinned region of exactly the host units' bytes, one of the staging slots'
    assert sorted(stand_in_cuda.registered.values()) == sorted(
        [sum(packed[u] for u in host), slots * max(packed[u] for u in from_store)])
    streamer = Streamer(mem, order, 0, prefetch)
    streamer.start()
    steps = 3
    try:
        for step in range(steps):
            begun = mem.begin_forward()
            for u in order:
                got = streamer.take(u)
                assert mem.held_bytes() <= budget, u
                for k, t in want[u].items():
                    assert torch.equal(got[k], t), (step, u, k)
                # read once a step: this step's read, and perhaps the next step's, ahead
                assert store.reads[u] == 1 if u in host else step + 1 <= store.reads[u] <= step + 2, (step, u)
                streamer.release(u)
            mem.end_forward(begun)
        stats = mem.stats()
    finally:
        streamer.stop(timeout=10)
        mem.close()
    assert all(store.reads[u] == 1 for u in host)
    # the loader may have fetched into the next step, each unit it fetched read ahead once more
    assert all(steps <= store.reads[u] <= steps + 2 for u in from_store), store.reads
    assert store.most_at_once >= 2  # the loader threads read side by side
    assert stats["host_pinned_bytes"] == sum(packed[u] for u in host) and stats["host_units"] == len(host)
    assert stats["pinned_bytes"] == slots * max(packed[u] for u in from_store)
    assert stats["peak_weight_bytes"] <= budget
    assert not stand_in_cuda.registered and len(stand_in_cuda.unregistered) == 2  # both unpinned at close


def host_plan(store: LayerStore, dtype: torch.dtype, weights: int, host: list[str], device: str = "cpu",
              reserve: int = 0) -> planner.StagePlan:
    """One stage of the whole model: the embeddings resident, the rest streamed within
    ``weights`` bytes of weights (``reserve`` more for KV cache and activations), ``host``
    of them kept in pinned host memory."""
    order = unit_order(store.num_layers)
    streamed = order[1:]
    shape = ModelShape.from_store(store, dtype)
    return planner.StagePlan(0, 0, store.num_layers, True, device, budget_bytes=weights + reserve,
                             reserve_bytes=reserve, resident_units=order[:1], streamed_units=streamed,
                             resident_bytes=store.unit_bytes(order[0], dtype),
                             streamed_bytes=shape.streamed_bytes([u for u in streamed if u not in host]),
                             host_units=host, host_bytes=sum(store.unit_bytes(u, dtype) for u in host))


@pytest.mark.timeout(120)
def test_a_stage_with_host_units_matches_transformers_and_a_failed_read_fails_the_forward(
        stand_in_cuda, tiny_dir, hf_model):
    store = CountingStore(split(tiny_dir("llama"), progress=False))
    dtype = torch.float32
    order, host, from_store = units_and_host(store)
    weights = int(2.5 * max(store.packed_bytes(u, dtype) for u in order)) + store.unit_bytes("embed", dtype)
    ids, _ = prompts(1)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = hf_model("llama")(ids).logits
    store.fail = (from_store[1], 2)  # the second step's read (read ahead during the first, perhaps)
    stage = runner.LayerRunner(store, host_plan(store, dtype, weights, host), "cpu", dtype)
    try:
        torch.testing.assert_close(stage.forward(ids, None, positions, "a", logits_to_keep=0), ref)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="this read fails"):
            stage.forward(ids, None, positions, "b", logits_to_keep=0)
        assert time.monotonic() - t0 < 30
        torch.testing.assert_close(stage.forward(ids, None, positions, "c", logits_to_keep=0), ref)
        stats = stage.stats()
    finally:
        stage.close()
    assert all(store.reads[u] == 1 for u in host)  # read at start only, through a failed step too
    assert all(store.reads[u] >= 3 for u in from_store)
    assert stats["host_bytes"] == sum(store.unit_bytes(u, dtype) for u in host) and stats["host_pinned_bytes"] > 0
    assert not stand_in_cuda.registered


def test_host_units_are_a_gpu_stages_own(tiny_dir, stand_in_cuda, monkeypatch):
    store = LayerStore(split(tiny_dir("llama"), progress=False))
    dtype = torch.float32
    weights = 10 * max(store.packed_bytes(u, dtype) for u in store.units)
    # a unit that is not streamed from the arena (the embeddings, read by row) cannot be a host unit
    plan = host_plan(store, dtype, weights, ["layer.0"])
    with pytest.raises(PlanError, match=r"keeps \['embed'\] in pinned host memory.*plan it again"):
        runner.LayerRunner(store, dataclasses.replace(plan, host_units=("embed",), resident_units=(),
                                                      streamed_units=tuple(store.units)), "cpu", dtype)
    monkeypatch.setitem(devices.KINDS, "cpu", devices.CPU)  # a CPU stage again
    with pytest.raises(PlanError, match="only a GPU stage does"):
        runner.LayerRunner(store, plan, "cpu", dtype)


def test_a_host_that_cannot_pin_says_what_to_change(tiny_dir, stand_in_cuda, monkeypatch):
    store = LayerStore(split(tiny_dir("llama"), progress=False))
    dtype = torch.float32
    order, host, _ = units_and_host(store)
    monkeypatch.setattr(stand_in_cuda, "cudaHostRegister", lambda ptr, n, flags: 2)  # cudaErrorMemoryAllocation
    mem = cuda_stream.CudaMemory(store, dtype, torch.device("cpu"), None, {}, 3, host_units=host)
    with pytest.raises(StageError, match="stage 3's host units.*cudaError 2.*lower .*host_memory_per_node"):
        mem.prepare(order)
    mem.close()


def kill_the_loader(model) -> None:
    """End the first streaming stage's loader thread once, the way no ``except`` sees."""
    memory = next(a for a in model.pipeline.stages.actors if a.runner.streamed).runner.memory
    fetch = memory.fetch

    def die_once(*args, **kwargs):
        memory.fetch = fetch
        raise SystemExit  # ends the thread; the loader passes on only Exceptions

    memory.fetch = die_once
    next(a for a in model.pipeline.stages.actors if a.runner.streamed).runner.streamer.restart([])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_loader_fails_the_step_instead_of_hanging(tiny_dir):
    path = tiny_dir("llama")
    store = LayerStore(split(path, progress=False))
    weights = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    ids, mask = prompts(2)
    with AutoModel.from_pretrained(path, stages=0, memory_per_stage=weights, device="cpu", progress=False) as model:
        before = generate(model, ids, mask)
        kill_the_loader(model)
        t0 = time.monotonic()
        with pytest.raises(StageError, match="weight loader ended.*the next restarts the loader"):
            generate(model, ids, mask)
        assert time.monotonic() - t0 < 30
        assert generate(model, ids, mask).sequences.tolist() == before.sequences.tolist()


# --------------------------------------------------------------------------- on a GPU


def hf_on_gpu(path, dtype):
    from transformers import AutoModelForCausalLM

    # loaded on the CPU then moved, as distlayer's stages compute their rotary tables
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


def quarter(s: LayerStore, d: torch.dtype) -> int:
    """A quarter of the weights, and at least a unit and a tenth."""
    return max(sum(s.unit_bytes(u, d) for u in s.units) // 4, int(1.1 * max(s.packed_bytes(u, d) for u in s.units)))


def one_and_a_half(s: LayerStore, d: torch.dtype) -> int:
    return int(1.5 * max(s.packed_bytes(u, d) for u in s.units))


def half_the_layers(s: LayerStore, d: torch.dtype) -> int:
    """Pinned host memory for about half of the decoder layers."""
    return sum(s.unit_bytes(f"layer.{i}", d) for i in range(s.num_layers // 2)) + 1


MODES = {  # name: (stages, weights per stage, pinned host memory per node: functions of the store and dtype)
    "resident": (0, lambda s, d: sum(s.unit_bytes(u, d) for u in s.units), lambda s, d: 0),
    "streamed-25%": (0, quarter, lambda s, d: 0),
    "streamed-25%-host": (0, quarter, half_the_layers),  # some units pinned in host memory, the rest read
    "2-stages-sharing": (2, one_and_a_half, lambda s, d: 0),
    "4-stages-sharing": (4, one_and_a_half, lambda s, d: 0),
}


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_matches_transformers_within_budget(arch, mode, dtype, tiny_dir):
    path = tiny_dir(arch)
    store = LayerStore(split(path, progress=False))
    stages, weights, host = MODES[mode]
    batch = 4
    ids, mask = prompts(batch)
    hf = hf_on_gpu(path, dtype)
    with torch.no_grad():
        ref = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    per_stage = budget(store, dtype, weights(store, dtype), batch)
    with AutoModel.from_pretrained(path, stages=stages, in_process=True, device="cuda", dtype=str(dtype),
                                   memory_per_stage=per_stage, max_rows=batch, context=CONTEXT,
                                   host_memory_per_node=host(store, dtype), progress=False) as model:
        loaded = torch.cuda.memory_allocated() - base  # the weights: resident units and arenas
        out = generate(model, ids, mask)
        stats = model.stats()
        plan = model.plan
    torch.cuda.synchronize()
    assert_same(out, ref, dtype)
    assert all(p.device == "cuda:0" for p in plan)
    streamed = sum(p.streamed_bytes for p in plan)
    assert (streamed == 0) == (mode == "resident")
    hosted = [u for p in plan for u in p.host_units]
    assert bool(hosted) == mode.endswith("-host"), plan
    # the budget holds on the device: the weights within the weight budgets from the start,
    # and at the peak weights, KV cache and activations within the budgets
    assert loaded <= sum(p.weight_budget_bytes for p in plan) + 2**16, (loaded, plan)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= per_stage * len(plan) + OUTSIDE_BUDGET, f"{peak} B at the peak, budgets {per_stage} x {len(plan)}"
    for s, p in zip(stats, plan):
        assert s["peak_weight_bytes"] <= p.weight_budget_bytes + 256 * len(store.units["layer.0"]["tensors"])
        assert s["compute_s"] > 0 and s["stall_s"] >= 0
        assert (s["h2d_bytes"] > 0) == bool(p.streamed_units) and s["load_s"] >= s["h2d_s"]
        assert s["host_units"] == len(p.host_units) and (s["host_pinned_bytes"] >= p.host_bytes)
        assert (s["pinned_bytes"] > 0) == bool(set(p.streamed_units) - set(p.host_units) - {"embed"})


def block_steps(device: str = "cpu") -> tuple[list[runner.Step], list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Three micro-batches' prefill steps (different rows and prompts), and their prompts."""
    batches = [prompts(1, 9, seed=1), prompts(2, 12, seed=2), prompts(3, 10, seed=3)]
    steps = []
    for k, (ids, mask) in enumerate(batches):
        m = torch.ones_like(ids) if mask is None else mask
        steps.append(runner.Step(ids.to(device), None if mask is None else mask.to(device),
                                 (m.cumsum(-1) - 1).clamp(min=0).to(device), f"mb{k}", logits_to_keep=0))
    return steps, batches


@pytest.mark.timeout(120)
def test_a_block_of_micro_batches_reads_each_unit_once_with_host_units(stand_in_cuda, tiny_dir, hf_model):
    store = CountingStore(split(tiny_dir("llama"), progress=False), delay=0.002)
    dtype = torch.float32
    order, host, from_store = units_and_host(store)
    weights = int(2.5 * max(store.packed_bytes(u, dtype) for u in order)) + store.unit_bytes("embed", dtype)
    steps, batches = block_steps()
    stage = runner.LayerRunner(store, host_plan(store, dtype, weights, host), "cpu", dtype)
    try:
        for n in range(1, 4):  # three steps, each a block of three micro-batches
            outs = stage.forward_block([dataclasses.replace(s, cache_id=f"{s.cache_id}-{n}") for s in steps])
            for out, (ids, mask), s in zip(outs, batches, steps):
                with torch.no_grad():
                    ref = hf_model("llama")(ids, attention_mask=mask, position_ids=s.position_ids).logits
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            # read once a step for all three micro-batches (and perhaps ahead, into the next)
            assert all(n <= store.reads[u] <= n + 2 for u in from_store), (n, store.reads)
        stats = stage.stats()
    finally:
        stage.close()
    assert all(store.reads[u] == 1 for u in host)
    assert stats["stream_reads"] == 3 * len(order) and stats["peak_weight_bytes"] <= weights


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_a_block_of_micro_batches_matches_transformers_and_reads_once(dtype, tiny_dir):
    path = tiny_dir("llama")
    store = CountingStore(split(path, progress=False))
    order, host, from_store = units_and_host(store)
    weights = int(2.5 * max(store.packed_bytes(u, dtype) for u in order)) + store.unit_bytes("embed", dtype)
    per_stage = budget(store, dtype, weights, 6)
    steps, batches = block_steps("cuda")
    hf = hf_on_gpu(path, dtype)
    stage = runner.LayerRunner(store, host_plan(store, dtype, weights, host, "cuda:0", per_stage - weights),
                               "cuda:0", dtype)
    try:
        outs = stage.forward_block(steps)
        rtol, atol = TOLERANCE[dtype]
        for out, (ids, mask), s in zip(outs, batches, steps):
            with torch.no_grad():
                ref = hf(ids.cuda(), attention_mask=None if mask is None else mask.cuda(),
                         position_ids=s.position_ids).logits
            torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)
        torch.cuda.synchronize()
        stats = stage.stats()
    finally:
        stage.close()
    assert all(1 <= store.reads[u] <= 3 for u in from_store) and all(store.reads[u] == 1 for u in host)
    assert stats["stream_reads"] == len(order)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_host_units_and_parallel_reads_match_transformers_within_budget(dtype, tiny_dir):
    """One stage run by its runner from a plan made here: two streamed units pinned in host
    memory, the others read by the loader threads; logits as transformers' on the same GPU,
    host units read once, the device within the budget, every pinned byte unpinned at close."""
    path = tiny_dir("llama")
    store = CountingStore(split(path, progress=False), delay=0.002)
    order, host, from_store = units_and_host(store)
    weights = int(2.5 * max(store.packed_bytes(u, dtype) for u in order)) + store.unit_bytes("embed", dtype)
    per_stage = budget(store, dtype, weights, 1)
    ids, _ = prompts(1)
    positions = torch.arange(ids.shape[1])[None]
    hf = hf_on_gpu(path, dtype)
    with torch.no_grad():
        ref = hf(ids.cuda()).logits
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stage = runner.LayerRunner(store, host_plan(store, dtype, weights, host, "cuda:0", per_stage - weights),
                               "cuda:0", dtype)
    try:
        for step in range(3):
            got = stage.forward(ids, None, positions, f"step{step}", logits_to_keep=0)
            rtol, atol = TOLERANCE[dtype]
            torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)
        torch.cuda.synchronize()
        stats = stage.stats()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        stage.close()
    assert all(store.reads[u] == 1 for u in host)
    assert all(3 <= store.reads[u] <= 5 for u in from_store), store.reads
    assert store.most_at_once >= 2
    assert stats["peak_weight_bytes"] <= weights + 256 * len(store.units["layer.0"]["tensors"])
    assert peak <= per_stage + OUTSIDE_BUDGET, (peak, per_stage)
    assert stats["host_pinned_bytes"] == sum(store.packed_bytes(u, dtype) for u in host)
    assert stats["h2d_bytes"] >= 3 * sum(store.unit_bytes(u, dtype) for u in order)


@pytest.mark.cuda
@gpu
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_gpu_dead_loader_fails_the_step_instead_of_hanging(tiny_dir):
    path = tiny_dir("llama")
    store = LayerStore(split(path, progress=False))
    weights = int(1.5 * max(store.packed_bytes(u, torch.float16) for u in store.units))
    ids, mask = prompts(2)
    with AutoModel.from_pretrained(path, stages=2, in_process=True, device="cuda", dtype="float16",
                                   memory_per_stage=budget(store, torch.float16, weights, 2), max_rows=2,
                                   context=CONTEXT, progress=False) as model:
        before = generate(model, ids, mask)
        kill_the_loader(model)
        with pytest.raises(StageError, match="weight loader ended"):
            generate(model, ids, mask)
        assert generate(model, ids, mask).sequences.tolist() == before.sequences.tolist()


def ray_or_skip():
    return pytest.importorskip("ray", reason="the Ray stages of the GPU path need ray")


@pytest.mark.cuda
@gpu
def test_gpu_ray_stages_share_one_gpu_and_a_killed_stage_does_not_hang(tiny_dir):
    ray = ray_or_skip()
    path = tiny_dir("llama")
    store = LayerStore(split(path, progress=False))
    dtype = torch.float16
    weights = int(1.5 * max(store.packed_bytes(u, dtype) for u in store.units))
    per_stage = budget(store, dtype, weights, 2)
    ids, mask = prompts(2)
    hf = hf_on_gpu(path, dtype)
    with torch.no_grad():
        ref = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    try:
        with AutoModel.from_pretrained(path, stages=4, gpus_per_stage=0.25, device="cuda", dtype="float16",
                                       memory_per_stage=per_stage, max_rows=2, context=CONTEXT,
                                       max_restarts=0, progress=False) as model:
            assert_same(generate(model, ids, mask), ref, dtype)
            stats = model.stats()
            assert len({p.pid for p in model.plan}) == 4
            for s in stats:  # each stage its own process: its own peak, within its budget and a workspace
                assert s["device_peak_bytes"] <= per_stage + GPU_WORKSPACE
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(generate, model, ids, mask, 200)
                time.sleep(1.0)
                os.kill(model.plan[2].pid, signal.SIGKILL)
                with pytest.raises(StageError, match=r"stage \d on .* died"):
                    running.result(timeout=120)
    finally:
        ray.shutdown()
