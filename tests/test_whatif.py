"""What-if planning: `distlayer plan MODEL --cluster FILE` from a config alone, on nodes
that need not exist; the example files in cluster/; bad files get sentences."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distlayer.cli import main
from distlayer.errors import ConfigError
from distlayer.whatif import KNOWN_DEVICES, MARKER, parse_cluster, shape_from_config

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"
WHATIF_FILES = ["four-8gb-gpus.yaml", "two-boxes-1gbe.yaml", "two-boxes-10gbe.yaml", "cpu-home.yaml"]

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M-Instruct): a small real model, tied head.
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000,
           "torch_dtype": "bfloat16", "tie_word_embeddings": True}


def config_dir(tmp_path, config: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def run_plan(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_70b_on_four_8gb_gpus_from_its_config_alone(tmp_path):
    model = config_dir(tmp_path, LLAMA_70B)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "distlayer", "plan", str(model), "--cluster",
                          str(CLUSTER / "four-8gb-gpus.yaml")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["stage", "node", "device", "threads"] and "bound" in lines[0]
    stages = [line.split() for line in lines[1:5]]
    assert [s[0] for s in stages] == ["0", "1", "2", "3"] and all(s[2] == "rtx-4060-8gb" for s in stages)
    assert stages[0][4].startswith("0-") and stages[3][4].endswith("-79")  # every layer placed
    assert all(s[-1] == "disk" for s in stages)  # 140 GB of weights on 32 GB of GPUs: streaming from disk
    assert "layers placed by bytes" in out.stdout  # one node: balance auto places by bytes
    assert "predicted decode step:" in out.stdout and "bottleneck: stage " in out.stdout
    assert "predicted tokens/s:" in out.stdout and "not yet checked against measurements" in out.stdout
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]  # no weights, no store written
    assert took < 30, f"took {took:.1f} s"  # about 7 s here: a generous bound


@pytest.mark.parametrize("host", [[], ["--host-memory", "0"]], ids=["pinned-host", "no-host-tier"])
def test_placement_by_speed_streams_on_one_gpu_and_keeps_three_whole(tmp_path, capsys, host):
    model = config_dir(tmp_path, LLAMA_70B)
    steps = {}
    for balance in ("bytes", "speed"):
        code, out, err = run_plan(capsys, model, "--cluster", CLUSTER / "four-8gb-gpus.yaml", "--json",
                                  "--balance", balance, *host)
        assert code == 0, err
        data = json.loads(out)
        steps[balance] = data["prediction"]["step_s"]
        assert data["balance"] == balance
    # one micro-batch: the stages take turns, so one GPU streaming everything that does not
    # fit beats four each keeping room for a streaming window
    assert steps["speed"] < steps["bytes"] * 0.95
    stages = data["stages"]
    assert [s["streamed_units"] == [] for s in stages] == [False, True, True, True]
    if host:
        assert all(s["host_bytes"] == 0 for s in stages)
    else:  # the stage that streams pins what the node's host budget holds: the others need none of it
        budget = sum(s["host_budget_bytes"] for s in stages)
        assert stages[0]["host_budget_bytes"] == budget > 0 and stages[0]["host_bytes"] > 0.9 * budget
    code, out, _ = run_plan(capsys, model, "--cluster", CLUSTER / "four-8gb-gpus.yaml", "--balance", "speed", *host)
    bounds = [line.split()[-1] for line in out.splitlines()[1:5]]
    assert bounds == ["disk", "memory", "memory", "memory"] and "layers placed by speed: predicted" in out


def test_a_transport_that_hands_micro_batches_on_alone_gets_no_blocks(tmp_path, capsys):
    model = config_dir(tmp_path, LLAMA_70B)
    got = {}
    for transport in ("auto", "ray"):
        code, out, err = run_plan(capsys, model, "--cluster", CLUSTER / "four-8gb-gpus.yaml", "--json",
                                  "--max-rows", "4", "--transport", transport)
        assert code == 0, err
        got[transport] = json.loads(out)
    assert got["auto"]["micro_batches"] == got["ray"]["micro_batches"] == 4
    assert all(s["blocks"] for s in got["auto"]["stages"]) and "as one block" in got["auto"]["block_note"]
    assert not any(s["blocks"] for s in got["ray"]["stages"])
    assert "the transport hands each micro-batch on alone" in got["ray"]["block_note"]
    # every micro-batch streams every unit again: the prediction follows the plan
    assert got["ray"]["prediction"]["step_s"] > 1.5 * got["auto"]["prediction"]["step_s"]


def test_json_has_the_plan_and_the_prediction(tmp_path, capsys):
    model = config_dir(tmp_path, LLAMA_70B)
    code, out, err = run_plan(capsys, model, "--cluster", CLUSTER / "four-8gb-gpus.yaml", "--json", "--max-rows", "2")
    assert code == 0, err
    data = json.loads(out)
    assert [s["node"] for s in data["stages"]] == ["box"] * 4
    assert data["stages"][0]["start"] == 0 and data["stages"][-1]["end"] == 80
    pred = data["prediction"]
    assert pred["batch"] == 2 and pred["tokens_per_s"] > 0 and pred["bottleneck"].startswith("stage ")
    assert len(pred["stages"]) == 4 and {"compute_s", "streaming_s", "handoff_s", "bound"} <= set(pred["stages"][0])


def test_example_cluster_files_are_marked_and_named_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    for name in WHATIF_FILES:
        assert yaml.safe_load((CLUSTER / name).read_text())[MARKER] == 1
        assert name in readme


@pytest.mark.parametrize("name", WHATIF_FILES)
def test_every_example_cluster_file_plans_a_small_real_config(name, tmp_path, capsys):
    code, out, err = run_plan(capsys, config_dir(tmp_path, SMOLLM2), "--cluster", CLUSTER / name, "--json")
    assert code == 0, err
    data = json.loads(out)
    devices = sum(len(n["devices"]) for n in yaml.safe_load((CLUSTER / name).read_text())["nodes"])
    assert len(data["stages"]) == devices and data["stages"][-1]["end"] == 30
    assert data["prediction"]["step_s"] > 0


def test_a_faster_link_predicts_at_least_as_fast(tmp_path, capsys):
    model = config_dir(tmp_path, SMOLLM2)
    speed = {}
    for net in ("1gbe", "10gbe"):
        code, out, err = run_plan(capsys, model, "--cluster", CLUSTER / f"two-boxes-{net}.yaml", "--json")
        assert code == 0, err
        speed[net] = json.loads(out)["prediction"]["tokens_per_s"]
    assert speed["10gbe"] > speed["1gbe"]


def test_shape_from_config_matches_the_store_it_would_split(tmp_path):
    """The meta-device count gives the manifest's sizes: a tied head counts its own copy."""
    import torch
    from tiny_models import make_tiny

    from distlayer.planner import ModelShape
    from distlayer.store import open_store

    src = make_tiny("llama", tmp_path / "tiny", tie=True)
    store = open_store(src)
    for dtype in (torch.float32, torch.bfloat16):
        want, got = ModelShape.from_store(store, dtype), shape_from_config(store.config, dtype)
        for field in ("layer_bytes", "embed", "norm", "head", "kv_bytes_per_token", "hidden", "vocab", "itemsize"):
            assert getattr(got, field) == getattr(want, field), field


GPU = {"kind": "cuda", "memory": "8GiB", "tflops": 15, "mem_gbps": 272, "h2d_gbps": 12}


def node(**over) -> dict:
    return {"name": "a", "host_ram": "32GiB", "disk_gbps": 3, "link_gbps": 10, "cores": 8, "devices": [GPU], **over}


@pytest.mark.parametrize("data, words", [
    ({"nodes": [node()]}, ["not a what-if cluster file", f"{MARKER}: 1"]),
    ({MARKER: 1}, ["missing required key 'nodes'"]),
    ({MARKER: 1, "nodes": [{k: v for k, v in node().items() if k != "host_ram"}]},
     ["missing required key 'nodes[0].host_ram'", "add `host_ram: ...`"]),
    ({MARKER: 1, "nodes": [node(host_ram="lots")]}, ["nodes[0].host_ram", "write it like 4GiB"]),
    ({MARKER: 1, "nodes": [node(disk_gbs=3)]}, ["unknown key 'nodes[0].disk_gbs'", "did you mean 'disk_gbps'"]),
    ({MARKER: 1, "nodes": [node(devices=[{"known": "rtx-4060"}])]},
     ["nodes[0].devices[0].known", "no known device 'rtx-4060'", "did you mean 'rtx-4060-8gb'"]),
    ({MARKER: 1, "nodes": [node(devices=[{"kind": "tpu"}])]}, ["nodes[0].devices[0].kind", "write cpu or cuda"]),
    ({MARKER: 1, "nodes": [node(devices=[{"known": ["t4-16gb"]}])]}, ["nodes[0].devices[0].known", "no known device"]),
    ({MARKER: 1, "nodes": [node(devices=[{"kind": "cuda", "memory": "8GiB", "tflops": 1, "mem_gbps": 1}])]},
     ["missing required key 'nodes[0].devices[0].h2d_gbps'"]),
    ({MARKER: 1, "nodes": [node(devices=[{**GPU, "memory": "8 bananas"}])]}, ["nodes[0].devices[0].memory"]),
    ({MARKER: 1, "nodes": [node(cores=0)]}, ["nodes[0].cores", "at least 1"]),
    ({MARKER: 1, "nodes": [node(devices=[GPU, {"kind": "cpu", "tflops": 1, "mem_gbps": 20}])]},
     ["one kind of device"]),
    ({MARKER: 1, "nodes": [node(), node()]}, ["two nodes are named 'a'"]),
])
def test_bad_cluster_files_get_sentences(data, words):
    with pytest.raises(ConfigError) as e:
        parse_cluster(data)
    for w in words:
        assert w in str(e.value)


def test_known_devices_parse():
    for name, spec in KNOWN_DEVICES.items():
        (n,) = parse_cluster({MARKER: 1, "nodes": [node(devices=[{"known": name}])]})
        assert n.devices[0].label == name and n.devices[0].kind == spec["kind"] and n.devices[0].memory > 0


def test_the_cli_prints_errors_for_bad_files_and_models_that_do_not_fit(tmp_path, capsys):
    model = config_dir(tmp_path, LLAMA_70B)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({MARKER: 1, "nodes": [node(devices=[{"known": "rtx-9999"}])]}))
    code, _, err = run_plan(capsys, model, "--cluster", bad)
    assert code == 2 and err.startswith("error: ") and "no known device 'rtx-9999'" in err
    small = tmp_path / "small.yaml"  # a 70B layer is 1.6 GiB: a 1 GiB GPU cannot hold one
    small.write_text(yaml.safe_dump({MARKER: 1, "nodes": [node(devices=[{**GPU, "memory": "1GiB"}] * 2)]}))
    code, _, err = run_plan(capsys, model, "--cluster", small)
    assert code == 2 and "needs" in err and "stage" in err and "add a stage" in err
    code, _, err = run_plan(capsys, model, "--cluster", CLUSTER / "onprem.yaml")
    assert code == 2 and "not a what-if cluster file" in err
    code, _, err = run_plan(capsys, model, "--cluster", CLUSTER / "four-8gb-gpus.yaml", "--stages", "2")
    assert code == 2 and "leave --stages out" in err
    code, _, err = run_plan(capsys, tmp_path / "nowhere", "--cluster", CLUSTER / "four-8gb-gpus.yaml")
    assert code == 2 and "config.json" in err


def test_plan_shows_the_pinned_host_tier_of_gpu_stages(tmp_path, capsys):
    """A GPU too small for the model streams it; the node's host RAM holds what it streams
    (pinned, read from disk once), unless the host budget is 0."""
    model = config_dir(tmp_path, SMOLLM2)
    cluster = tmp_path / "one-small-gpu.yaml"
    cluster.write_text(yaml.safe_dump({MARKER: 1, "nodes": [
        {"name": "box", "host_ram": "4GiB", "disk_gbps": 1.0, "link_gbps": 10, "cores": 8,
         "devices": [{"kind": "cuda", "memory": "360MiB", "tflops": 10, "mem_gbps": 200, "h2d_gbps": 12}]}]}))
    code, out, err = run_plan(capsys, model, "--cluster", cluster, "--context", "256")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert ["resident", "pinned", "from"] == header.split()[7:10]
    assert row.split()[-1] == "h2d"  # the pinned units are copied, not read from disk
    assert "stage 0: pinned 31 of 32 streamed units" in out and "1 from disk (embed)" in out  # its 30 layers, norm, head
    assert "of its 1.00 GiB host budget (50% of the 4.00 GiB available RAM on box, less 1.00 GiB)" in out

    code, out, err = run_plan(capsys, model, "--cluster", cluster, "--context", "256", "--host-memory", "0")
    assert code == 0, err
    assert out.splitlines()[1].split()[-1] == "disk"
    assert "stage 0: disk (host_memory_per_node is 0: no pinned host tier)" in out

    code, out, err = run_plan(capsys, model, "--cluster", cluster, "--context", "256", "--json",
                              "--host-memory", "100MiB")
    assert code == 0, err
    (stage,) = json.loads(out)["stages"]
    assert stage["host_units"] and set(stage["host_units"]) < set(stage["streamed_units"])
    assert 0 < stage["host_bytes"] <= stage["host_budget_bytes"] == 100 * 2**20

    code, _, err = run_plan(capsys, model, "--cluster", cluster, "--host-memory", "8GiB")
    assert code == 2 and "lower host_memory_per_node (--host-memory)" in err
    code, _, err = run_plan(capsys, model, "--cluster", cluster, "--host-memory", "lots")
    assert code == 2 and "host_memory_per_node" in err and "0 turns the pinned host tier off" in err
