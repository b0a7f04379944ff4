"""A store on every node (``fill.py``) in one process, then for real on two hosts from
network namespaces: a Ray head on one, a worker on the other, token auth, separate
DISTLAYER_HOMEs, and only the driver's host holding the layer store at the start. The
driver runs on the head's host (``ip netns exec``); the worker's host cannot see the
driver's store (a tmpfs hides it in its mount namespace), so its stage's units are
pushed to its own store through Ray, and hidden states go between the hosts over TCP."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import prompts
from distlayer import LayerStore, split
from distlayer import fill
from distlayer.errors import StoreError
from distlayer.fill import file_sha256
from distlayer.sources import MANIFEST

NEW = 6
TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- in one process


class Here:
    """A stand-in for a stage actor and the driver's ``Stages``, in this process."""

    def __init__(self):
        self.actors = [self]
        self.store_path = ""
        self.chunks = 0

    def call_with(self, actor, fn, *args):
        self.chunks += fn is fill.receive
        return fn(actor, *args)

    def get(self, refs):
        return refs


@pytest.fixture
def small_store(tiny_dir, tmp_path, monkeypatch):
    """A split tiny llama, a node home of its own (DISTLAYER_HOME) and small chunks."""
    monkeypatch.setenv("DISTLAYER_HOME", str(tmp_path / "node"))
    monkeypatch.setattr(fill, "CHUNK_BYTES", 4096)
    model = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), model)
    return LayerStore(split(model, progress=False))


def test_push_fills_a_node_store_with_only_the_asked_units(small_store, capsys):
    store, here = small_store, Here()
    files = fill.unit_files(store, ["layer.1", "norm", "head"]) + fill.side_files(store)
    assert files[-1].name == MANIFEST  # the manifest comes last
    where = fill.locate(here, "/nowhere", store.source, fill.manifest_digest(store), files)
    assert where["source"] == "push" and set(where["missing"]) == {f.name for f in files}
    sent = fill.push(here, here, "10.0.0.2", store, where["path"], files, where["missing"])
    assert sent == {f.name: f.size for f in files}
    assert "node 10.0.0.2:" in capsys.readouterr().err
    node = Path(where["path"])
    assert node.parent == Path(os.environ["DISTLAYER_HOME"]) / "stores"
    assert sorted(f.name for f in node.glob("*.safetensors")) == ["head.safetensors", "layer.1.safetensors",
                                                                  "norm.safetensors"]
    again = fill.locate(here, "/nowhere", store.source, fill.manifest_digest(store), files)
    assert again == {"path": str(node), "source": "node store", "missing": {}}  # complete: reused


def test_a_cut_push_resumes_from_its_part_file(small_store):
    store, here = small_store, Here()
    files = fill.unit_files(store, ["layer.0"])
    digest = fill.manifest_digest(store)
    node = fill.node_store_dir(store.source, digest)
    node.mkdir(parents=True)
    data = (store.path / files[0].name).read_bytes()
    (node / (files[0].name + fill.PART)).write_bytes(data[:3 * fill.CHUNK_BYTES])  # what arrived before the cut
    where = fill.locate(here, "/nowhere", store.source, digest, files)
    assert where["missing"] == {files[0].name: 3 * fill.CHUNK_BYTES}
    sent = fill.push(here, here, "n", store, where["path"], files, where["missing"])
    assert sent == {files[0].name: len(data) - 3 * fill.CHUNK_BYTES}
    assert file_sha256(node / files[0].name) == files[0].sha256 and not list(node.glob("*.part"))


def test_a_damaged_arrival_is_deleted_and_named(small_store):
    store, here = small_store, Here()
    spec = fill.unit_files(store, ["embed"])[0]
    node = fill.node_store_dir(store.source, fill.manifest_digest(store))
    fill.receive(here, str(node), spec.name, 0, b"x" * spec.size)
    with pytest.raises(StoreError, match="another sha256.*load the model again"):
        fill.finish(here, str(node), spec)
    assert not list(node.iterdir())
    with pytest.raises(StoreError, match="offset 5"):  # a chunk out of order is refused
        fill.receive(here, str(node), spec.name, 5, b"y")


def test_stages_that_see_the_drivers_store_use_it_in_place(small_store):
    from distlayer.placement import PlacedStage, Placement
    from distlayer.planner import StagePlan

    store, here = small_store, Here()
    plans = [PlacedStage(StagePlan(0, 0, store.num_layers, True, "cpu"), Placement("10.0.0.1", "a"))]
    fill.fill_stages(here, plans, store)
    assert (plans[0].store_source, plans[0].fetched, here.store_path) == ("driver path", [], str(store.path))
    assert here.chunks == 0 and not (Path(os.environ["DISTLAYER_HOME"]) / "stores").exists()
    # a stage started again alone (after a failure): only it is filled
    plans.append(PlacedStage(StagePlan(1, 0, 1, False, "cpu"), Placement("10.0.0.2", "b")))
    here.actors = [here, object()]
    fill.fill_stages(here, plans, store, which=[0])
    assert plans[1].store_source == ""


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_store_is_named_before_any_node_is_asked(small_store, damage):
    from distlayer.placement import PlacedStage, Placement
    from distlayer.planner import StagePlan

    store, here = small_store, Here()
    shard = store.path / "layer.2.safetensors"
    size = shard.stat().st_size
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    asked = []
    here.call_with = lambda actor, fn, *args: asked.append(fn.__name__)
    plans = [PlacedStage(StagePlan(0, 0, store.num_layers, True, "cpu"), Placement("10.0.0.2", "b"))]
    words = "is missing" if damage == "missing" else f"is {size - 100} bytes but the manifest says {size}"
    with pytest.raises(StoreError, match=f"shard .*layer.2.safetensors of unit layer.2 {words}.*distlayer split"):
        fill.fill_stages(here, plans, store)
    assert asked == [] and not (Path(os.environ["DISTLAYER_HOME"]) / "stores").exists()


@pytest.mark.parametrize("fault", ["corrupt on the driver", "disk full on the node"])
def test_a_push_that_fails_midway_leaves_no_part_file(small_store, monkeypatch, fault):
    store, here = small_store, Here()
    files = fill.unit_files(store, ["layer.0", "layer.1"])
    if fault == "corrupt on the driver":  # same size, other bytes: found only by the sha256 read as it is sent
        shard = store.path / files[1].name
        data = bytearray(shard.read_bytes())
        data[-8:] = bytes(8)
        shard.write_bytes(bytes(data))
        words = "layer.1 fails its sha256 check.*distlayer split"
    else:
        pwrite, writes = os.pwrite, []

        def full(fd, data, offset):
            writes.append(offset)
            if len(writes) > 10:  # in the first file
                raise OSError(28, "No space left on device")
            return pwrite(fd, data, offset)

        monkeypatch.setattr(fill.os, "pwrite", full)
        words = "cannot write .*No space left on device"
    where = fill.locate(here, "/nowhere", store.source, fill.manifest_digest(store), files)
    with pytest.raises(StoreError, match=words):
        fill.push(here, here, "n", store, where["path"], files, where["missing"])
    node = Path(where["path"])
    assert here.chunks > 10 and not list(node.parent.rglob("*.part"))
    if fault == "corrupt on the driver":  # a file that arrived whole stays: the next push resumes after it
        assert [f.name for f in node.iterdir()] == [files[0].name]
    else:  # nothing arrived whole: no node store is left behind
        assert not node.parent.exists()


def test_a_push_cut_off_by_a_lost_stage_keeps_its_part_file(small_store):
    from distlayer.errors import StageLost

    store, here = small_store, Here()
    files = fill.unit_files(store, ["layer.0"])
    call_with = here.call_with

    def lost_midway(actor, fn, *args):
        if fn is fill.discard or here.chunks >= 3:
            raise StageLost("stage 0 died")
        return call_with(actor, fn, *args)

    here.call_with = lost_midway
    where = fill.locate(here, "/nowhere", store.source, fill.manifest_digest(store), files)
    with pytest.raises(StageLost):
        fill.push(here, here, "n", store, where["path"], files, where["missing"])
    assert fill.locate(here, "/nowhere", store.source, fill.manifest_digest(store), files)["missing"] == \
        {files[0].name: 3 * fill.CHUNK_BYTES}  # the next push resumes from what arrived


# --------------------------------------------------------------------------- two hosts


def can_make_hosts() -> str | None:
    """Why this machine cannot build namespace hosts, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tiny_dir):
    """Two hosts; host 0 (the head, the driver's) holds a tiny qwen2 model and its store."""
    why = can_make_hosts()
    if why:
        pytest.skip(why)
    from ray_nodes import NetnsHosts

    root = tmp_path_factory.mktemp("hosts")
    homes = [root / "home0", root / "home1"]
    for h in homes:
        h.mkdir()
    model = homes[0] / "qwen2"
    shutil.copytree(tiny_dir("qwen2"), model)
    split(model, progress=False)  # the store lives on host 0 only
    h = NetnsHosts(homes, hide=[[], [homes[0]]])
    h.model = model
    yield h
    h.stop()
    assert not h.pids()


def drive(hosts, script: str, timeout: int = 240) -> dict:
    """Run ``script`` as the driver on host 0; returns what it printed after ``RESULT ``."""
    env_path = os.pathsep.join([str(TESTS), *sys.path])
    cmd = ["env", f"PYTHONPATH={env_path}", "HF_HUB_OFFLINE=1", sys.executable, "-c", script,
           str(hosts.model), hosts.address]
    run = hosts.run(0, cmd, timeout=timeout, cwd=str(TESTS))
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, run.stdout[-4000:] + run.stderr[-6000:]
    return {**json.loads(line[0][len("RESULT "):]), "stderr": run.stderr}


def host_store(hosts, host: int) -> Path:
    """The one store under ``host``'s DISTLAYER_HOME."""
    stores = list((Path(hosts.homes[host]) / "stores").iterdir())
    assert len(stores) == 1, stores
    return stores[0]


def check_holds_exactly(path: Path, units: list[str], manifest: dict) -> None:
    """``path`` holds the units ``units`` (and the store's side files), each with its sha256."""
    by_name = {u["name"]: u for u in manifest["units"]}
    files = {f.name for f in path.iterdir()}
    shards = {f for f in files if f.endswith(".safetensors")}
    assert shards == {by_name[u]["file"] for u in units}
    assert not [f for f in files if f.endswith(".part")]
    for u in units:
        assert file_sha256(path / by_name[u]["file"]) == by_name[u]["sha256"], u
    assert json.loads((path / MANIFEST).read_text()) == manifest


GENERATE = textwrap.dedent("""
    import json, sys
    from distlayer import AutoModel
    from conftest import prompts
    path, address = sys.argv[1], sys.argv[2]
    with AutoModel.from_pretrained(path, stages=2, address=address, placement="spread", progress=False) as model:
        ids, mask = prompts(4)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=%d, do_sample=False)
        print("RESULT " + json.dumps({"plan": [p.as_dict() for p in model.plan], "sequences": out.tolist(),
                                      "transport": model.pipeline.transport.name}))
""" % NEW)


@pytest.mark.slow
def test_two_hosts_fill_the_second_store_and_match_transformers(hosts, hf_model):
    got = drive(hosts, GENERATE)
    plan = got["plan"]
    assert {p["node_ip"] for p in plan} == set(hosts.ips)  # one stage on each host
    assert got["transport"] == "tcp"
    ids, mask = prompts(4)
    ref = hf_model("qwen2").generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert got["sequences"] == ref.tolist()

    manifest = LayerStore(hosts.model / "distlayer-shards").manifest
    here = next(p for p in plan if p["node_ip"] == hosts.ips[0])
    there = next(p for p in plan if p["node_ip"] == hosts.ips[1])
    assert here["store_source"] == "driver path" and here["fetched"] == []
    there_units = ([] if there["stage"] else ["embed"]) + [f"layer.{i}" for i in range(there["start"], there["end"])] \
        + (["norm", "head"] if there["last"] else [])
    assert there["store_source"] == "push" and there["fetched"] == there_units
    assert f"node {hosts.ips[1]}:" in got["stderr"]  # its progress line
    store = host_store(hosts, 1)
    assert there["store_path"] == str(store)
    check_holds_exactly(store, there_units, manifest)
    assert not (Path(hosts.homes[0]) / "stores").exists()  # the driver's host used its own store in place


RESUME = textwrap.dedent("""
    import json, os, signal, sys
    from distlayer import AutoModel, fill
    from conftest import prompts
    path, address = sys.argv[1], sys.argv[2]
    fill.CHUNK_BYTES, fill.PROGRESS_EVERY = 8192, 0.0
    killed, receiver, push, report = [], {}, fill.push, fill.report_progress

    def remember_receiver(stages, actor, node, *args):
        receiver[node] = stages.get(stages.call_with(actor, lambda a: os.getpid()))
        return push(stages, actor, node, *args)

    def kill_halfway(node, done, total, *args):
        report(node, done, total, *args)
        if not killed and done * 2 >= total:
            os.kill(receiver[node], signal.SIGKILL)
            killed.append(receiver[node])

    fill.push, fill.report_progress = remember_receiver, kill_halfway
    kw = dict(stages=2, address=address, progress=False, stage_resources=[{"host_0": 1}, {"host_1": 1}],
              balance="bytes")  # the plan's own push is cut (balance="speed" pushes the layers it measures first)
    try:
        AutoModel.from_pretrained(path, **kw)
        first = "started"
    except Exception as e:
        first = f"{type(e).__name__}: {e}"
    with AutoModel.from_pretrained(path, **kw) as model:
        ids, mask = prompts(4)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=%d, do_sample=False)
        print("RESULT " + json.dumps({"first": first, "killed": killed, "sequences": out.tolist(),
                                      "plan": [p.as_dict() for p in model.plan]}))
""" % NEW)


@pytest.mark.slow
def test_an_interrupted_push_resumes_and_ends_verified(hosts, hf_model):
    shutil.rmtree(Path(hosts.homes[1]) / "stores", ignore_errors=True)
    got = drive(hosts, RESUME)
    assert got["killed"], got["stderr"][-3000:]
    assert "died" in got["first"], got["first"]
    there = next(p for p in got["plan"] if p["node_ip"] == hosts.ips[1])
    units = ([] if there["stage"] else ["embed"]) + [f"layer.{i}" for i in range(there["start"], there["end"])] \
        + (["norm", "head"] if there["last"] else [])
    manifest = LayerStore(hosts.model / "distlayer-shards").manifest
    sizes = {u["name"]: u["bytes"] for u in manifest["units"]}
    # the second start sent only what the first had not: whole units left, and the rest of the cut one
    assert there["stage"] == 1 and there["store_source"] == "push", there
    assert there["fetched"] and set(there["fetched"]) <= set(units), there
    assert there["fetched_bytes"] < sum(sizes[u] for u in units), there
    assert there["fetched_bytes"] < sum(sizes[u] for u in there["fetched"]), (there, got["stderr"][-3000:])
    check_holds_exactly(host_store(hosts, 1), units, manifest)
    ids, mask = prompts(4)
    ref = hf_model("qwen2").generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert got["sequences"] == ref.tolist()


@pytest.mark.slow
def test_plan_verb_shows_the_plan_on_the_live_cluster(hosts):
    cmd = ["env", "HF_HUB_OFFLINE=1", sys.executable, "-m", "distlayer", "plan", str(hosts.model), "--address",
           hosts.address, "--stages", "2", "--placement", "spread", "--json"]
    run = hosts.run(0, cmd, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    plan = json.loads(run.stdout)
    assert sorted(p["node_ip"] for p in plan["stages"]) == hosts.ips
