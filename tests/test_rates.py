"""Measured rates (distlayer/rates.py): a tiny model's rates are positive and finite, a
measurement is cached per node and model shape and reused, and forcing measures again.
Nothing here asserts a time."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from distlayer import LayerStore, rates, split
from distlayer.cost import Rates
from distlayer.stage import StageActor


@pytest.fixture(autouse=True)
def small_reads(monkeypatch):
    """Small reads and few runs: the tests check what is measured, not how fast."""
    monkeypatch.setattr(rates, "READ_BYTES", 4 * 2**20)
    monkeypatch.setattr(rates, "PREFILL", 8)
    monkeypatch.setattr(rates, "REPEAT", 2)
    monkeypatch.delenv(rates.REMEASURE_ENV, raising=False)


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    def get(arch: str) -> LayerStore:
        path = tmp_path_factory.mktemp("rates") / arch
        shutil.copytree(tiny_dir(arch), path)
        return LayerStore(split(path, progress=False))
    return get


def check(r: Rates) -> None:
    assert isinstance(r, Rates) and r.h2d_bw is None  # a CPU
    for name in ("flops", "mem_bw", "disk_bw"):
        value = getattr(r, name)
        assert math.isfinite(value) and value > 0, (name, value)
    for name in ("step_overhead_s", "layer_overhead_s"):
        assert math.isfinite(getattr(r, name)) and getattr(r, name) >= 0


@pytest.mark.parametrize("arch,batch", [("llama", 1), ("gemma2", 2), ("qwen2_moe", 1)])
def test_rates_are_positive_and_finite(store, arch, batch, tmp_path):
    got = rates.measure_node(store(arch), torch.float32, "cpu", batch, cache_dir=tmp_path)
    check(Rates(**got["rates"]))
    assert not got["cached"] and got["key"]["batch"] == batch and got["page_cache_bw"] > 0
    assert got["mapped_page_cache_bw"] > 0  # a float32 store on a CPU: its stages map their shards
    assert got["timings"]["prefill_s"] > 0 and got["timings"]["layers"] == 4


def test_a_measurement_is_cached_and_reused(store, tmp_path, monkeypatch):
    s = store("llama")
    first = rates.measure_rates(s, torch.float32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(rates, "_measure", fail)
    again = rates.measure_node(s.path, torch.float32, cache_dir=tmp_path)
    assert again["cached"] and Rates(**again["rates"]) == first
    with pytest.raises(AssertionError, match="measured again"):  # another batch is another shape of work
        rates.measure_node(s, torch.float32, batch=3, cache_dir=tmp_path)


def test_forcing_measures_again(store, tmp_path, monkeypatch):
    s = store("llama")
    rates.measure_node(s, torch.float32, cache_dir=tmp_path)
    calls = []
    real = rates._measure
    monkeypatch.setattr(rates, "_measure", lambda *a: calls.append(a) or real(*a))
    assert not rates.measure_node(s, torch.float32, remeasure=True, cache_dir=tmp_path)["cached"]
    monkeypatch.setenv(rates.REMEASURE_ENV, "1")
    assert not rates.measure_node(s, torch.float32, cache_dir=tmp_path)["cached"]
    monkeypatch.setenv(rates.REMEASURE_ENV, "0")
    assert rates.measure_node(s, torch.float32, cache_dir=tmp_path)["cached"]
    assert len(calls) == 2 and len(list(tmp_path.glob("*.json"))) == 1


def test_a_damaged_or_stale_cache_file_is_measured_again(store, tmp_path):
    s = store("llama")
    got = rates.measure_node(s, torch.float32, cache_dir=tmp_path)
    (f,) = tmp_path.glob("*.json")
    f.write_text("{not json")
    assert not rates.measure_node(s, torch.float32, cache_dir=tmp_path)["cached"]
    f.write_text('{"key": %s, "rates": {"flops": 1}}' % __import__("json").dumps(got["key"]))
    assert not rates.measure_node(s, torch.float32, cache_dir=tmp_path)["cached"]


def test_a_stage_measures_where_it_runs_under_distlayer_home(store):
    s = store("llama")
    stage = StageActor(str(s.path), 0, "cpu", torch.float32)
    got = stage.measure_rates(batch=1, remeasure=True)
    check(Rates(**got["rates"]))
    assert rates.cache_file(got["key"]).is_file()  # under $DISTLAYER_HOME/rates
    assert stage.measure_rates(batch=1)["cached"]
    assert dataclasses.asdict(Rates(**got["rates"])) == got["rates"]


@pytest.mark.parametrize("num_layers, start, end, expected", [
    (30, 0, None, (13, 17)),   # 4 from the middle of the model
    (30, 0, 19, (7, 11)),      # 4 from the middle of a stage's range
    (30, 19, 30, (22, 26)),
    (30, 5, 7, (5, 7)),        # a range shorter than 4: all of it
    (30, 0, 1, (0, 1)),
])
def test_measured_layers(num_layers, start, end, expected):
    assert rates.measured_layers(num_layers, start, end) == expected


def test_a_node_measures_on_the_layers_asked_and_cached_only_measures_nothing(store, tmp_path):
    s = store("llama")
    assert rates.measure_node(s, torch.float32, cache_dir=tmp_path, cached_only=True) is None
    got = rates.measure_node(s, torch.float32, cache_dir=tmp_path, layers=(0, 1))
    assert got["timings"]["layers"] == 1 and 0 < got["cpu_share"] <= 1
    assert rates.measure_node(s, torch.float32, cache_dir=tmp_path, cached_only=True)["cached"]
    stage = StageActor(str(tmp_path / "no-store-here"), 0, "cpu", torch.float32)
    assert stage.measure_rates(cached_only=True) is None  # no store on its node yet: the driver fills it first


def test_a_link_is_timed_over_tcp():
    port = rates.link_listen(None, "127.0.0.1")
    got = rates.link_probe(None, "127.0.0.1", port)
    assert got["bytes"] == rates.LINK_BYTES and got["link_bw"] > 0 and 0 < got["link_latency_s"] < 1
    assert got["rtt_s"] == pytest.approx(2 * got["link_latency_s"])


SHARE = """
import json
from distlayer import hardware, rates
print(json.dumps({"quota": hardware.cpu_quota(), "share": rates.cpu_share(1, seconds=1.0),
                  "quota_share": [rates.quota_share(1), rates.quota_share(2)]}))
"""


@pytest.mark.exclusive  # it measures CPU shares: another worker's tests beside it would lower them
def test_a_cpu_quota_shows_in_the_measured_share(tmp_path):
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from ray_nodes import CPU_CGROUP, cpu_quota_problem

    why = cpu_quota_problem()
    if why:
        pytest.skip(why)
    group = __import__("pathlib").Path(CPU_CGROUP) / f"distlayer-test-{__import__('os').getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
        held = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable,
                               "-c", SHARE], capture_output=True, text=True, timeout=120)
        free = subprocess.run([sys.executable, "-c", SHARE], capture_output=True, text=True, timeout=120)
    finally:
        group.rmdir()
    held, free = json.loads(held.stdout), json.loads(free.stdout)
    assert held["quota"] == 0.5 and free["quota"] is None
    assert held["quota_share"] == [0.5, 0.25] and free["quota_share"] == [None, None]
    assert 0.4 < held["share"] < 0.6 and free["share"] > held["share"] + 0.2, (held, free)
