"""``benchmarks/bench_loader.py`` on a tiny store: every configuration runs, counts the
bytes of the layer units' shards, and stages exactly the files' bytes (no timing checked)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib

import pytest

from distlayer import LayerStore, split

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_loader", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digests(f: pathlib.Path) -> tuple[str, str, int]:
    """sha256 of the whole shard, of its tensors' bytes (after the safetensors header), and
    the tensors' byte count."""
    data = f.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(data[start:]).hexdigest(), len(data) - start


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_bench_loader_stages_every_unit_exactly(tiny_dir, tmp_path, bench):
    store = LayerStore(split(tiny_dir("llama"), tmp_path / "store", progress=False))
    out = tmp_path / "rows.json"
    assert bench.main(["--model", str(store.path), "--threads", "1", "2", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())

    layers = [u for u in store.units if u.startswith("layer.")]
    assert len(layers) == store.num_layers
    files = {u: store.path / store.units[u]["file"] for u in layers}
    whole = {u: digests(f) for u, f in files.items()}
    shard_bytes = sum(f.stat().st_size for f in files.values())
    tensor_bytes = sum(w[2] for w in whole.values())

    h2d = (False, True) if bench.torch.cuda.is_available() else (False,)
    want = {(m + ("+h2d" if h else ""), t) for h in h2d for m in ("readinto", "read_into") for t in (1, 2)}
    assert {(r["method"], r["threads"]) for r in rows} == want
    for r in rows:
        base = r["method"].removesuffix("+h2d")
        assert r["units"] == len(layers)
        assert r["bytes"] == (shard_bytes if base == "readinto" else tensor_bytes)
        assert r["GBps"] > 0 and r["GBps_median"] > 0 and r["ratio"] > 0
        assert r["runs"] == 1 and r["verified"] is True
        # what landed in the staging buffers, hashed as it landed, against the files' bytes
        expected = {u: w[0] if base == "readinto" else w[1] for u, w in whole.items()}
        assert r["digests"] == expected
        assert r["staging"].startswith("pinned" if bench.torch.cuda.is_available() else "pageable")


def test_bench_loader_check_catches_a_wrong_copy(tiny_dir, tmp_path, bench, monkeypatch):
    """The benchmark's own check fails a run whose staged bytes differ from the file."""
    store = LayerStore(split(tiny_dir("llama"), tmp_path / "store", progress=False))
    real = bench.stage_readinto

    def corrupt(store, unit, buf):
        spans = real(store, unit, buf)
        buf[spans[0][0] + 100] ^= 0xFF
        return spans

    monkeypatch.setitem(bench.STAGE, "readinto", corrupt)
    with pytest.raises(AssertionError, match="staged bytes differ"):
        bench.main(["--model", str(store.path), "--threads", "1", "--repeat", "1"])
