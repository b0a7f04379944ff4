"""Placement by measured speed on two hosts from network namespaces (``test_hosts``), one
of them held to half a core by a cgroup v1 cpu quota (``ray_nodes.NetnsHosts(cpu_quota=)``):
the slowed host's stage gets fewer layers with ``balance="speed"`` than with
``balance="bytes"``, and both placements give transformers' own greedy tokens."""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap

import pytest
import torch

from test_hosts import can_make_hosts, drive

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]  # it measures speeds and CPU shares
NEW = 8
QUOTA = 0.5  # cores of host 0, where stage 0 runs

PLACE = textwrap.dedent("""
    import json, sys
    from distlayer import AutoModel
    path, address = sys.argv[1], sys.argv[2]
    kw = dict(stages=2, address=address, progress=False, dtype="float32", max_rows=1,
              stage_resources=[{"host_0": 0.1}, {"host_1": 0.1}], cpus_per_stage=0.5, threads_per_stage=1)
    out = {}
    for balance in ("bytes", "speed"):
        with AutoModel.from_pretrained(path, balance=balance, **kw) as model:
            ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                      add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            seq = model.generate(ids, max_new_tokens=%d, do_sample=False)
            pred = model.prediction
            out[balance] = {"ranges": [[p.start, p.end] for p in model.plan], "nodes": [p.node_ip for p in model.plan],
                            "ids": ids.tolist(), "sequences": seq.tolist(),
                            "predicted_s": pred.step_s if pred else None, "why": pred.why if pred else None}
    print("RESULT " + json.dumps(out))
""" % NEW)


BUSY = textwrap.dedent("""
    import time
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < 2:
        pass
    print((time.process_time() - cpu) / (time.perf_counter() - wall))
""")


def test_a_quota_holds_a_hosts_processes_to_its_share_of_a_core():
    from ray_nodes import NetnsHosts, cpu_quota_problem

    why = can_make_hosts() or cpu_quota_problem()
    if why:
        pytest.skip(why)
    with tempfile.TemporaryDirectory() as home:
        hosts = NetnsHosts([home, home], ray=False, cpu_quota=[QUOTA, None])
        try:
            groups = list(hosts.cgroups)
            assert groups[0] and groups[1] is None
            share = []
            for i in (0, 1):  # one after the other: this machine may have only two cores
                run = hosts.run(i, [sys.executable, "-c", BUSY], timeout=30)
                assert run.returncode == 0, run.stderr
                share.append(float(run.stdout))
            where = hosts.run(0, ["cat", "/proc/self/cgroup"], timeout=30).stdout
        finally:
            hosts.stop()
    assert 0.3 < share[0] <= QUOTA + 0.1 < share[1], share  # a busy loop gets the quota; unlimited, more
    assert f"cpu:/{groups[0].rsplit('/', 1)[1]}" in where
    assert hosts.cgroups == [None, None] and not os.path.exists(groups[0])  # stop() removed the group


@pytest.fixture(scope="module")
def slowed_hosts(tmp_path_factory, smollm_dir, smollm_store):
    """Two hosts, host 0 (the head, the driver's) held to :data:`QUOTA` cores; both see
    SmolLM2's store in place."""
    from ray_nodes import NetnsHosts, cpu_quota_problem

    why = can_make_hosts() or cpu_quota_problem()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slowed-hosts")
    homes = [root / "home0", root / "home1"]
    for h in homes:
        h.mkdir()
    h = NetnsHosts(homes, cpus=2, cpu_quota=[QUOTA, None])
    h.model = smollm_dir
    yield h
    h.stop()
    assert not h.pids() and h.cgroups == [None, None]


def test_the_slowed_host_gets_fewer_layers_and_tokens_stay_transformers(slowed_hosts, smollm_dir):
    from transformers import AutoModelForCausalLM

    got = drive(slowed_hosts, PLACE, timeout=180)
    by_bytes, by_speed = got["bytes"], got["speed"]
    assert by_bytes["nodes"] == by_speed["nodes"] == slowed_hosts.ips  # stage 0 on the slowed host 0
    layers = {k: [b - a for a, b in v["ranges"]] for k, v in got.items() if k in ("bytes", "speed")}
    assert layers["speed"][0] < layers["bytes"][0], (layers, by_speed["why"])
    assert sum(layers["speed"]) == sum(layers["bytes"])
    assert by_speed["predicted_s"] and by_speed["predicted_s"] > 0

    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    ids = torch.tensor(by_speed["ids"])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False).tolist()
    assert by_speed["sequences"] == want
    assert by_bytes["sequences"] == want
