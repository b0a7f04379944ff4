"""Table tests of the stage planner (pure functions, no torch or Ray)."""

import pytest

from distlayer.errors import PlanError
from distlayer.planner import plan_concurrency, plan_stages
from distlayer.report import format_plan

L10 = [10] * 8


@pytest.mark.parametrize("layers, budgets, kw, expected", [
    # unlimited budgets: equal bytes per stage
    (L10, [None], {}, [(0, 8)]),
    (L10, [None, None], {}, [(0, 4), (4, 8)]),
    (L10, [None] * 4, {}, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    # the head's matmul counts toward balance; an embedding lookup does not
    (L10, [None] * 3, dict(embed=15, head=15), [(0, 3), (3, 6), (6, 8)]),
    (L10, [None] * 2, dict(embed=40, head=40), [(0, 6), (6, 8)]),
    # uneven budgets: the small stage gets fewer layers
    (L10, [30, 70], {}, [(0, 3), (3, 8)]),
    (L10, [70, 30], {}, [(0, 5), (5, 8)]),
    (L10, [25, 40, 40], {}, [(0, 2), (2, 5), (5, 8)]),
    # KV cache counts against the budget: 30 bytes hold two layers + their KV, not three
    (L10, [30, 100], dict(kv_bytes_per_layer=5), [(0, 2), (2, 8)]),
    # everything must stream: streamed bytes per stage are balanced
    (L10, [20, 20], {}, [(0, 4), (4, 8)]),
    ([40, 10, 10, 10, 10, 10, 10, 40], [80, 80], {}, [(0, 4), (4, 8)]),
    # uneven layer sizes, all resident: balance bytes
    ([30, 10, 10, 10, 10, 10], [None, None], {}, [(0, 2), (2, 6)]),
])
def test_plan_stages(layers, budgets, kw, expected):
    assert plan_stages(layers, budgets, **kw) == expected


def test_streaming_plan_balances_streamed_bytes():
    # stage 0 has room to keep 3 layers resident, stage 1 none: stage 1 should get fewer layers
    plan = plan_stages([10] * 10, [50, 20])
    a, b = plan
    assert a[1] - a[0] > b[1] - b[0]


@pytest.mark.parametrize("layers, budgets, kw, words", [
    (L10, [5, 100], {}, ["layer 0", "10 B", "stage 0", "memory-per-stage"]),
    (L10, [100, 100], dict(head=200), ["head", "200 B"]),
    (L10, [12, 100], dict(kv_bytes_per_layer=5), ["KV cache", "stage 0"]),
    (L10, [None] * 9, {}, ["stages=9", "8 layers"]),
])
def test_plan_errors_say_what_to_change(layers, budgets, kw, words):
    with pytest.raises(PlanError) as e:
        plan_stages(layers, budgets, **kw)
    for w in words:
        assert w in str(e.value)


def test_format_plan_is_a_table():
    from distlayer.pipeline import StagePlan

    text = format_plan([StagePlan(0, "10.0.0.1", 11, "cpu", 0, 4, None, 2**30, 0, threads=2),
                        StagePlan(1, "10.0.0.2", 12, "cuda:0", 4, 8, 2**31, 2**30, 2**29)])
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["stage", "node", "pid", "device", "threads", "layers"]
    assert "0-3" in lines[1] and "unlimited" in lines[1] and "4-7" in lines[2] and "512.00 MiB" in lines[2]


def test_plan_model_reads_only_the_manifest(tiny_dir):
    from distlayer.pipeline import plan_model

    plans = plan_model(tiny_dir("llama"), stages=2, memory_per_stage="1MiB", progress=False)
    assert [(p.start, p.end) for p in plans] == [(0, 2), (2, 4)]
    assert all(p.budget_bytes == 2**20 and p.streamed_bytes == 0 for p in plans)
    unlimited = plan_model(tiny_dir("llama"), stages=2, progress=False)  # no budget: nothing streams
    assert [(p.start, p.end, p.budget_bytes, p.streamed_bytes) for p in unlimited] == [(0, 2, None, 0), (2, 4, None, 0)]


@pytest.mark.parametrize("nodes, cores, device, mb, threads, expected", [
    # CPU stages sharing one node take turns with the whole batch, each on all its cores
    (["a", "a"], {"a": 2}, "cpu", None, None, (1, [2, 2])),
    (["a", "a", "a"], {"a": 8}, "cpu", None, None, (1, [8, 8, 8])),
    # one stage per node: one micro-batch per node, every stage on its node's cores
    (["a", "b"], {"a": 2, "b": 4}, "cpu", None, None, (2, [2, 4])),
    # two nodes, two stages each: two micro-batches, so two busy stages share a node
    (["a", "a", "b", "b"], {"a": 8, "b": 8}, "cpu", None, None, (2, [4, 4, 4, 4])),
    # the caller's choices win; micro-batches on one node split its cores
    (["a", "a"], {"a": 2}, "cpu", 2, None, (2, [1, 1])),
    (["a", "a"], {"a": 2}, "cpu", None, 3, (1, [3, 3])),
    (["a", "a"], {"a": 1}, "cpu", 2, None, (2, [1, 1])),
    # GPU stages are separate devices: one micro-batch each, torch's default threads
    (["a", "a"], {"a": 16}, "cuda", None, None, (2, [None, None])),
])
def test_plan_concurrency(nodes, cores, device, mb, threads, expected):
    assert plan_concurrency(nodes, cores, device, mb, threads) == expected


def test_stage_env_binds_only_stages_that_use_every_core_and_keeps_the_users_settings():
    from distlayer.pipeline import GOMP_SPINCOUNT, stage_env

    bound = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    assert stage_env("cpu", True, {}) == bound
    assert stage_env("cpu", False, {}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert stage_env("cuda", True, {}) == {}
    assert stage_env("cpu", True, {"GOMP_CPU_AFFINITY": "0-3"}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert stage_env("cpu", True, {"OMP_WAIT_POLICY": "passive"}) == {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
