"""Placement by speed in one process (``balance="speed"``): the stages' node is measured
(``survey.py`` over ``rates.py``), the plan carries the rates and the cost model's
prediction, and the answers stay transformers' own. The planner's search is table-tested
in test_cost.py; two Ray nodes in test_pipeline.py; a slowed host in test_placement_hosts.py."""

from __future__ import annotations

import json

import pytest

from conftest import prompts
from distlayer import AutoModel
from distlayer.cli import main
from distlayer.placement import PlacedPlan, PlacedStage, Placement
from distlayer.planner import Plan, StagePlan
from distlayer.survey import balance_for, stage_rates, warm_disk


@pytest.mark.parametrize("setting, nodes, expected", [
    ("auto", ["a", "a", "a"], "bytes"),   # one node: every stage's device is alike
    ("auto", ["a", "b"], "speed"),
    ("bytes", ["a", "b"], "bytes"),
    ("speed", ["a"], "speed"),
])
def test_balance_for(setting, nodes, expected):
    assert balance_for(setting, nodes) == expected


NODE = {"rates": {"flops": 1e9, "mem_bw": 1e9, "disk_bw": 1e8}, "page_cache_bw": 5e9, "mapped_page_cache_bw": 2e10,
        "key": {"cores": 4}}


def test_a_stage_streams_from_the_page_cache_when_the_node_holds_the_model():
    assert warm_disk(NODE, free_bytes=10**9, model_bytes=10**8) == 2e10
    assert warm_disk({**NODE, "mapped_page_cache_bw": None}, 10**9, 10**8) == 5e9
    assert warm_disk(NODE, free_bytes=10**8, model_bytes=10**9) == 1e8  # it cannot: from disk


def placed(nodes: list[str], threads: list[int], device="cpu") -> PlacedPlan:
    stages = tuple(PlacedStage(StagePlan(i, i, i + 1, i == len(nodes) - 1, device, threads=t), Placement("ip", n))
                   for i, (n, t) in enumerate(zip(nodes, threads)))
    return PlacedPlan(Plan(tuple(s.plan for s in stages), 1), stages)


def test_stage_rates_share_a_device_where_the_stages_take_turns():
    link = {"link_bw": 1e8, "link_latency_s": 1e-4}
    # two stages on node a, each on all 4 cores (they take turns), one on node b
    got = stage_rates(placed(["a", "a", "b"], [4, 4, 4]), [NODE] * 3, [None, link, None], [10**9] * 3,
                      ["", "", ""], 10**8)
    assert [r.device for r in got] == ["a", "a", ""]
    assert got[1].link_bw == 1e8 and got[1].link_latency_s == 1e-4 and got[0].link_bw is None
    assert all(r.disk_bw == 2e10 for r in got)
    # 2 threads each of 4 cores: they work at once, each a device of its own; GPUs by their id
    assert [r.device for r in stage_rates(placed(["a", "a"], [2, 2]), [NODE] * 2, [None] * 2, [10**9] * 2,
                                          ["", ""], 10**8)] == ["", ""]
    assert [r.device for r in stage_rates(placed(["a", "a"], [None, None], "cuda:0"), [NODE] * 2, [None] * 2,
                                          [10**9] * 2, ["gpu-1", "gpu-1"], 10**8)] == ["gpu-1", "gpu-1"]


def test_in_process_stages_measured_for_speed_answer_as_transformers(tiny_dir, hf_model):
    path = tiny_dir("llama")
    ids, mask = prompts(2)
    ref = hf_model("llama").generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for attempt in (0, 1):
        with AutoModel.from_pretrained(path, stages=2, in_process=True, balance="speed", max_rows=2,
                                       progress=False, dtype="float32") as model:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            assert out.tolist() == ref.tolist()
            s, pred = model.survey, model.prediction
            assert s.measured_by == (0, 0) and s.links == (None, None)  # one node, measured once, no hops
            assert s.nodes[0]["cached"] == bool(attempt)  # the second start reads the first's measurement
            assert all(r.flops > 0 and r.mem_bw > 0 for r in s.rates)
            assert pred.batch == 2 and len(pred.stages) == 2 and pred.step_s > 0
            assert model.pipeline.balance_note.startswith(("by speed", "by bytes: placing by speed"))


def test_bytes_balance_measures_nothing(tiny_dir):
    with AutoModel.from_pretrained(tiny_dir("qwen2"), stages=2, in_process=True, progress=False) as model:
        assert model.survey is None and model.prediction is None  # auto on one node: by bytes, nothing measured


def test_plan_shows_measured_rates_and_the_prediction(tiny_dir, capsys):
    path = str(tiny_dir("qwen2"))
    assert main(["plan", path, "--stages", "2", "--in-process"]) == 0
    out = capsys.readouterr().out
    for words in ("GFLOP/s", "mem GB/s", "stream GB/s", "predicted decode step", "bottleneck: stage",
                  "predicted tokens/s", "layers placed by bytes: the stages share one node"):
        assert words in out, out
    assert main(["plan", path, "--stages", "2", "--in-process", "--balance", "speed", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["balance"] in ("speed", "bytes") and got["balance_note"].startswith("by ")
    assert len(got["measured"]) == 2 and got["prediction"]["tokens_per_s"] > 0
    assert main(["plan", path, "--stages", "2", "--in-process", "--balance", "bytes"]) == 0
    assert "GFLOP/s" not in capsys.readouterr().out  # nothing measured
