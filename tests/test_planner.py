"""Table tests of the stage planner (pure functions, no torch or Ray)."""

import dataclasses

import pytest

from distlayer.errors import PlanError
from distlayer.placement import PlacedStage, Placement
from distlayer.planner import (GPU_WORKSPACE, Layout, ModelShape, Site, StagePlan, pipeline_layout, plan_concurrency,
                               plan_pipeline, plan_stages)
from distlayer.report import format_plan

L10 = [10] * 8


def run_plan_stages(layers, budgets, embed=0, norm=0, head=0, **kw):
    return plan_stages(ModelShape(tuple(layers), embed, norm, head), budgets, **kw)


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
    assert run_plan_stages(layers, budgets, **kw) == expected


def test_streaming_plan_balances_streamed_bytes():
    # stage 0 has room to keep 3 layers resident, stage 1 none: stage 1 should get fewer layers
    plan = run_plan_stages([10] * 10, [50, 20])
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
        run_plan_stages(layers, budgets, **kw)
    for w in words:
        assert w in str(e.value)


def test_format_plan_is_a_table():
    text = format_plan([PlacedStage(StagePlan(0, 0, 4, False, "cpu", threads=2, resident_bytes=2**30),
                                    Placement("10.0.0.1", pid=11)),
                        PlacedStage(StagePlan(1, 4, 8, True, "cuda:0", budget_bytes=2**31, resident_bytes=2**30,
                                              streamed_bytes=2**29), Placement("10.0.0.2", pid=12))])
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["stage", "node", "pid", "device", "threads", "layers"]
    assert "0-3" in lines[1] and "unlimited" in lines[1] and "4-7" in lines[2] and "512.00 MiB" in lines[2]


SHAPE = ModelShape((10,) * 8, embed=20, norm=1, head=20, kv_bytes_per_token=1, hidden=4, vocab=8, itemsize=1)
ONE_NODE = [Site("a", "10.0.0.1", 1000, 2)] * 2
TWO_NODES = [Site("a", "10.0.0.1", 1000, 2), Site("b", "10.0.0.2", 300, 4)]
GPU_FREE = 2**32
TWO_GPUS = [Site("a", "10.0.0.1", GPU_FREE, 2, "GPU-0"), Site("a", "10.0.0.1", GPU_FREE, 2, "GPU-1")]
ONE_GPU = [Site("a", "10.0.0.1", GPU_FREE, 2, "GPU-0")] * 2


@pytest.mark.parametrize("sites, budgets, device, ranges, budget_bytes, sources", [
    # no budget: 90% of the free memory, shared by the stages of one node on CPU
    # (resident: compute is balanced, the head counts, an embedding lookup does not: 50 and 51 bytes)
    (ONE_NODE, [None, None], "cpu", [(0, 5), (5, 8)], [450, 450], ["90%", "shared by the node's 2"]),
    # one stage per node: each takes 90% of its own node's
    (TWO_NODES, [None, None], "cpu", [(0, 5), (5, 8)], [900, 270], ["90% of the 1000 B", "90% of the 300 B"]),
    # on GPUs each stage has its device to itself, less a workspace; stages on one GPU share it
    (TWO_GPUS, [None, None], "cuda", [(0, 5), (5, 8)], [int(GPU_FREE * 0.9) - GPU_WORKSPACE] * 2, ["GPU", "GPU"]),
    (ONE_GPU, [None, None], "cuda", [(0, 5), (5, 8)], [int(GPU_FREE * 0.9) // 2 - GPU_WORKSPACE] * 2,
     ["shared by the GPU's 2 stages"] * 2),
    # a given budget is kept and named; a small one gets fewer layers
    (ONE_NODE, [60, None], "cpu", [(0, 4), (4, 8)], [60, 450], ["memory_per_stage", "90%"]),
    (ONE_NODE, [40, None], "cpu", [(0, 2), (2, 8)], [40, 450], ["memory_per_stage", "90%"]),
])
def test_plan_pipeline_budgets_and_where_they_came_from(sites, budgets, device, ranges, budget_bytes, sources):
    conc = plan_concurrency([s.node_id for s in sites], {s.node_id: s.cores for s in sites}, device)
    plan = plan_pipeline(SHAPE, sites, budgets, device, conc)
    assert [(p.start, p.end) for p in plan.stages] == ranges
    assert [p.budget_bytes for p in plan.stages] == budget_bytes
    assert all(word in p.budget_source for p, word in zip(plan.stages, sources))
    assert [p.threads for p in plan.stages] == conc[1] and plan.micro_batches == conc[0]


def test_plan_pipeline_reserves_kv_and_streams_what_does_not_fit():
    # batch 2 x context 5: 10 B of KV per layer; activations 2*5*4*1*4 + 2*8*4 = 224 B
    plan = plan_pipeline(SHAPE, ONE_NODE, [400, 400], "cpu", (1, [2, 2]), batch_size=2, context=5)
    for p in plan.stages:
        assert p.reserve_bytes == 10 * (p.end - p.start) + 224
        assert p.weight_budget_bytes == 400 - p.reserve_bytes
        assert list(p.resident_units + p.streamed_units) == p.layer_range.units()
        assert p.resident_bytes + p.streamed_bytes == sum(SHAPE.unit_bytes(p.layer_range).values())
    tight = plan_pipeline(SHAPE, ONE_NODE, [45, 45], "cpu", (1, [2, 2]))
    # 45 B cannot hold the model's 101: the first stage streams, within the budget, and
    # reads its embedding by row (a step reads one 2-byte row of it, not its 20 bytes)
    first, last = tight.stages
    assert "embed" in first.streamed_units and "embed" not in first.resident_units
    assert first.streamed_bytes == 2 + 10 * (len(first.streamed_units) - 1)
    for p in tight.stages:
        assert sorted(p.resident_units + p.streamed_units) == sorted(p.layer_range.units())
        window = max((SHAPE.unit_bytes(p.layer_range)[u] for u in p.streamed_units if u != "embed"), default=0)
        assert p.resident_bytes + 2 * window <= 45
    with pytest.raises(PlanError, match="KV cache"):
        plan_pipeline(SHAPE, ONE_NODE, [60, 60], "cpu", (1, [2, 2]), batch_size=8, context=64)


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


@pytest.mark.parametrize("gpus, settings, placed, expected", [
    # no settings: CUDA with one stage per GPU when there are GPUs, else one CPU stage
    (0, {}, None, Layout("cpu", 1)),
    (4, {}, None, Layout("cuda", 4)),
    (4, dict(gpus_per_stage=2), None, Layout("cuda", 2)),
    (0.5, dict(gpus_per_stage=0.5), None, Layout("cuda", 1)),
    # the settings win; a device index names only the type
    (4, dict(device="cpu"), None, Layout("cpu", 1)),
    (4, dict(stages=3), None, Layout("cuda", 3)),
    (0, dict(device="cuda:1"), None, Layout("cuda", 1)),
    # once placed (or in one process), the concurrency too: plan_concurrency's rule
    (0, dict(stages=2), (["a", "b"], {"a": 2, "b": 4}), Layout("cpu", 2, 2, (2, 4))),
    (0, dict(stages=2, micro_batches=2), (["a", "a"], {"a": 2}), Layout("cpu", 2, 2, (1, 1))),
    (2, {}, (["a", "a"], {"a": 16}), Layout("cuda", 2, 2, (None, None))),
    (0, dict(stages=3, in_process=True, threads=2), None, Layout("cpu", 3, 1, (2, 2, 2))),
    (1, dict(stages=2, in_process=True), None, Layout("cuda", 2, 1, (None, None))),
])
def test_pipeline_layout(gpus, settings, placed, expected):
    stage_nodes, node_cores = placed or (None, None)
    assert pipeline_layout(gpus, **settings, stage_nodes=stage_nodes, node_cores=node_cores) == expected


def test_a_layout_before_placement_has_no_concurrency_to_give():
    with pytest.raises(ValueError, match="placed"):
        pipeline_layout(0).concurrency


def test_a_stage_plan_is_frozen_and_its_placement_is_the_drivers():
    plan = plan_pipeline(SHAPE, ONE_NODE, [45, 45], "cpu", (1, [2, 2]))
    p = plan.stages[0]
    for name, value in [("pid", 7), ("start", 1), ("resident_units", ())]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.micro_batches = 2
    assert isinstance(p.resident_units, tuple) and isinstance(plan.stages, tuple)
    assert isinstance(StagePlan(0, 0, 1, True, "cpu", resident_units=["layer.0"]).resident_units, tuple)
    # model.plan's entries join the plan and its placement, read-only; the driver writes the placement
    placed = PlacedStage(p, Placement("10.0.0.1", "a", pid=11))
    assert (placed.start, placed.end, placed.resident_bytes, placed.node_ip, placed.pid) == \
        (p.start, p.end, p.resident_bytes, "10.0.0.1", 11)
    with pytest.raises(dataclasses.FrozenInstanceError):
        placed.pid = 12
    placed.placement.pid = 12
    assert placed.pid == 12 and placed.as_dict()["pid"] == 12
    assert set(placed.as_dict()) == {f.name for f in dataclasses.fields(StagePlan)} | {
        "node_ip", "node_id", "pid", "store_path", "store_source", "fetched", "fetched_bytes"}


def test_stage_env_binds_only_stages_that_use_every_core_and_keeps_the_users_settings():
    from distlayer.pipeline import GOMP_SPINCOUNT, stage_env

    bound = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    assert stage_env("cpu", True, {}) == bound
    assert stage_env("cpu", False, {}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert stage_env("cuda", True, {}) == {}
    assert stage_env("cpu", True, {"GOMP_CPU_AFFINITY": "0-3"}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert stage_env("cpu", True, {"OMP_WAIT_POLICY": "passive"}) == {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


@pytest.mark.parametrize("setting, device, blocks, why", [
    ("auto", "cpu", False, "the default on cpu"),    # pages mapped from the page cache: cheap to map again
    ("auto", "cuda", True, "the default on cuda"),   # bound by the host link; stages sharing a GPU take turns
    ("on", "cpu", True, "block_schedule is on"),
    ("off", "cuda", False, "block_schedule is off"),
])
def test_the_block_schedule_by_setting_and_device_kind(setting, device, blocks, why):
    from distlayer.planner import choose_blocks

    stages = (StagePlan(0, 0, 1, False, device, resident_units=("layer.0",), streamed_units=("embed",)),
              StagePlan(1, 1, 2, True, device, resident_units=("layer.1",), streamed_units=("norm", "head")))
    chosen, note = choose_blocks(stages, setting, device)
    # the embeddings alone are read by row: no unit to read once for all, so no block
    assert [p.blocks for p in chosen] == [False, blocks] and why in note
    assert ("as one block" in note) == blocks
    resident = tuple(dataclasses.replace(p, streamed_units=()) for p in stages)
    assert choose_blocks(resident, "on", device) == (resident, "no stage streams units: no blocks")
    if setting != "on":  # a transport that hands each micro-batch on alone: no blocks, and the note says why
        chosen, note = choose_blocks(stages, setting, device, waves=False)
        assert not any(p.blocks for p in chosen) and "the transport hands each micro-batch on alone" in note
