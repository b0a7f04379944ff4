"""The memory seam (``memory.WeightMemory``): every tier in ``memory.TIERS`` has each of its
members, every ``*Memory`` class of ``streaming.py`` and ``cuda_stream.py`` is in
``memory.TIERS``, the runner and the streamer call nothing on a memory that the seam does
not name, and each tier keeps the contract through the calls a runner and its streamer
make: resident units loaded, streamed units prepared, fetched, made ready and released
in forward order (loaded ahead by the loader thread, or by each forward itself), a
failed forward reset, streaming again, close. Each unit's tensors equal the store's own,
the weights held stay within the budget and come back to the resident units' bytes, and
``stats()`` has the keys the runner reads.

``CudaMemory`` runs on a CUDA GPU (skipped without one) and on the CPU with
``test_cuda``'s stand-ins for CUDA's streams, events and pinned memory, which checks its
bookkeeping but not GPU ordering.
"""

from __future__ import annotations

import contextlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import test_cuda
from distlayer import LayerStore, arch, cuda_stream, memory, split, streaming
from distlayer.streaming import Streamer
from distlayer.units import unit_order

stand_in_cuda = test_cuda.stand_in_cuda  # a fixture: the GPU path on the CPU, with stand-ins for CUDA

PKG = pathlib.Path(memory.__file__).parent
TIERS = memory.tiers()
# (tier, how it runs): every tier as it runs, and CudaMemory on the CPU with stand-ins too
RUNS = [pytest.param(t, "cpu", id=t.__name__) for t in TIERS if t is not cuda_stream.CudaMemory] + [
    pytest.param(cuda_stream.CudaMemory, "cuda", id="CudaMemory", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CudaMemory on a GPU needs CUDA (the stand-in run checks it on the CPU)")),
    pytest.param(cuda_stream.CudaMemory, "stand-in", id="CudaMemory-stand-ins"),
]


def test_every_memory_class_is_a_listed_tier():
    """A new ``*Memory`` class in either module is a tier, checked by the tests below."""
    found = {f"{m.__name__}.{name}" for m in (streaming, cuda_stream) for name, c in vars(m).items()
             if isinstance(c, type) and name.endswith("Memory") and c.__module__ == m.__name__}
    assert found == set(memory.TIERS)


def test_the_seam_names_every_call_on_a_memory():
    """What the runner and the streamer call on ``self.memory`` is a member of the seam."""
    called = {name for f in ("runner.py", "streaming.py")
              for name in re.findall(r"self\.memory\.(\w+)", (PKG / f).read_text())}
    assert called and called <= memory.members(), sorted(called - memory.members())


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.__name__)
def test_tier_has_every_member(tier):
    """Each member on the class itself (a capability is a class attribute), and each
    method takes the seam's arguments positionally, as its callers pass them."""
    for name in sorted(memory.members()):
        assert hasattr(tier, name), f"{tier.__name__} lacks {name} (memory.WeightMemory)"
        want = getattr(memory.WeightMemory, name, None)
        if callable(want):
            got = getattr(tier, name)
            assert callable(got), f"{tier.__name__}.{name} is not a method"
            args = list(inspect.signature(want).parameters)[1:]  # less self
            try:
                inspect.signature(got).bind(None, *args)
            except TypeError as e:
                pytest.fail(f"{tier.__name__}.{name} does not take {args}: {e}")
    assert isinstance(tier.keeps_tensors, bool)


def test_the_seam_imports_no_torch():
    """``memory.py`` names tensors in annotations only: importing it loads no torch."""
    code = "import sys, distlayer.memory as m; m.members(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def assert_tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], unit: str) -> None:
    assert set(got) == set(want), unit
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].cpu(), t), f"{unit}: {k}"


@pytest.mark.timeout(120)  # a tier that never gives bytes back leaves the loader waiting for room
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("tier, where", RUNS)
def test_tier_keeps_the_contract(tier, where, prefetch, tiny_dir, request):
    if where == "stand-in":
        request.getfixturevalue("stand_in_cuda")
    store = LayerStore(split(tiny_dir("llama"), progress=False))
    dtype = arch.checkpoint_dtype(store.config)  # the stored one: MappedMemory maps in place
    device = torch.device("cuda:0" if where == "cuda" else "cpu")
    unit_bytes = {u: store.unit_bytes(u, dtype) for u in store.units}
    resident, order = ["embed"], unit_order(store.num_layers)[1:]
    resident_bytes = sum(unit_bytes[u] for u in resident)
    # room for two streamed units and a half: the loader runs ahead, and waits for room
    budget = resident_bytes + int(2.5 * max(store.packed_bytes(u, dtype) for u in order))
    want = {u: store.load(u, dtype) for u in store.units}

    mem = tier(store, dtype, device, budget, dict(unit_bytes), 0)
    assert isinstance(mem, memory.WeightMemory)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    streamer = Streamer(mem, order, 0, prefetch)
    with on_device:
        try:
            for u in resident:
                assert_tensors_equal(mem.load_resident(u), want[u], u)
            assert mem.held_bytes() == resident_bytes
            if mem.keeps_tensors:
                kept = {u: mem.tensors(u) for u in order}
            else:
                with pytest.raises(TypeError, match="keeps none"):
                    mem.tensors(order[0])
            mem.prepare(order)
            streamer.start()

            def forward():
                begun = mem.begin_forward()
                for u in order:
                    got = streamer.take(u)
                    assert mem.held_bytes() <= budget, u
                    assert_tensors_equal(got, want[u], u)
                    if mem.keeps_tensors:  # the very tensors the runner assigned at set-up
                        assert all(got[k].data_ptr() == kept[u][k].data_ptr() for k in got), u
                    streamer.release(u)
                mem.end_forward(begun)

            forward()
            forward()  # the loader's order wraps around to the step's first unit
            # a failed forward: it took the first unit and never released it
            mem.begin_forward()
            streamer.take(order[0])
            streamer.restart([order[0]])
            forward()

            x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
            y = mem.to_device(x)
            assert y.device.type == device.type
            back = mem.to_host(y * 2)
            assert back.device.type == "cpu" and torch.equal(back, x * 2)
            stats = mem.stats()
        finally:
            streamer.stop(timeout=10)
            mem.close()
    # every streamed unit given back: what is held is the resident units again
    assert mem.held_bytes() == resident_bytes
    assert set(memory.STATS_KEYS) <= set(stats), sorted(stats)
    assert resident_bytes < stats["peak_weight_bytes"] <= budget
    assert all(stats[k] >= 0 for k in memory.STATS_KEYS)
