"""The cost model (distlayer/cost.py): hand-computed predictions, no timing."""

from __future__ import annotations

import dataclasses

import pytest

from distlayer.cost import Rates, predict, stage_cost, unit_flops
from distlayer.planner import ModelShape, Plan, StagePlan
from distlayer.units import EMBED, HEAD, NORM, layer_unit

# itemsize 2: a unit of B bytes has B / 2 parameters, so 2 x params = B FLOPs a row.
SHAPE = ModelShape(layer_bytes=(1000, 1000), embed=400, norm=8, head=400, hidden=2, vocab=100, itemsize=2)
ALL = (EMBED, layer_unit(0), layer_unit(1), NORM, HEAD)
FAST = dict(flops=1e12, mem_bw=1e12, disk_bw=1e12)


def one_stage(resident=ALL, streamed=(), streamed_bytes=0) -> Plan:
    return Plan((StagePlan(0, 0, 2, True, "cuda", resident_units=resident, streamed_units=streamed,
                           streamed_bytes=streamed_bytes),), 1)


def two_stages(micro_batches: int = 1) -> Plan:
    return Plan((StagePlan(0, 0, 1, False, "cuda", resident_units=(EMBED, layer_unit(0))),
                 StagePlan(1, 1, 2, True, "cuda", resident_units=(layer_unit(1), NORM, HEAD))), micro_batches)


def test_resident_stage_is_bound_by_memory_bandwidth():
    # reads 1000 + 1000 + 8 + 400 weight bytes and one 4-byte embedding row: 2412 bytes
    # at 1000 B/s; does 2408 FLOPs at 1e6 FLOP/s.
    pred = predict(SHAPE, one_stage(), [Rates(flops=1e6, mem_bw=1e3, disk_bw=1e3)])
    (c,) = pred.stages
    assert c.memory_s == pytest.approx(2.412) and c.flops_s == pytest.approx(2.408e-3)
    assert c.streaming_s == 0 and c.handoff_s == 0
    assert c.bound == "memory" and pred.step_s == pytest.approx(2.412)
    assert pred.tokens_per_s == pytest.approx(1 / 2.412) and pred.why == "stage 0: memory"


def test_compute_bound_at_a_large_batch():
    # 64 rows: 64 x 2408 FLOPs at 1e5 FLOP/s = 1.54 s; 2408 + 64 x 4 bytes at 1e4 B/s = 0.27 s
    pred = predict(SHAPE, one_stage(), [Rates(flops=1e5, mem_bw=1e4, disk_bw=1e3)], batch=64)
    assert pred.stages[0].bound == "compute"
    assert pred.step_s == pytest.approx(64 * 2408 / 1e5)
    assert pred.tokens_per_s == pytest.approx(64 / (64 * 2408 / 1e5))


def test_streaming_stage_is_bound_by_disk_and_overlaps_compute():
    plan = one_stage(resident=(EMBED, layer_unit(0)), streamed=(layer_unit(1), NORM, HEAD), streamed_bytes=1408)
    pred = predict(SHAPE, plan, [Rates(flops=1e6, mem_bw=1e3, disk_bw=100)])
    c = pred.stages[0]
    assert c.disk_s == pytest.approx(14.08) and c.h2d_s == 0  # a CPU: no host-to-device copy
    # max(compute 2.412, read 14.08), not their sum
    assert c.step_s == pytest.approx(14.08) and c.bound == "disk" and pred.why == "stage 0: disk"


def test_gpu_stage_is_bound_by_host_to_device_copies():
    plan = one_stage(resident=(EMBED, layer_unit(0)), streamed=(layer_unit(1), NORM, HEAD), streamed_bytes=1408)
    pred = predict(SHAPE, plan, [Rates(flops=1e6, mem_bw=1e6, disk_bw=1e4, h2d_bw=100)])
    c = pred.stages[0]
    assert c.disk_s == pytest.approx(0.1408) and c.h2d_s == pytest.approx(14.08)
    assert c.step_s == pytest.approx(14.2208) and c.bound == "h2d"


def test_two_stages_sum_with_one_micro_batch_and_name_the_bottleneck():
    fast = Rates(flops=1e6, mem_bw=1e4, disk_bw=1e3, link_bw=4, link_latency_s=0.5)
    slow = Rates(flops=1e6, mem_bw=100, disk_bw=1e3)
    pred = predict(SHAPE, two_stages(), [fast, slow])
    s0, s1 = pred.stages
    assert s0.handoff_s == pytest.approx(1 * 2 * 2 / 4 + 0.5)  # rows x hidden x itemsize over the link, + latency
    assert s0.memory_s == pytest.approx(1004 / 1e4) and s0.bound == "link"
    assert s1.memory_s == pytest.approx(1408 / 100) and s1.handoff_s == 0  # the last stage hands off nothing
    assert pred.step_s == pytest.approx(s0.step_s + s1.step_s) and pred.formula == "sum(stage)"
    assert pred.bottleneck is s1 and pred.why == "stage 1: memory"


def test_attention_flops_and_kv_reads_grow_with_context():
    shape = ModelShape(layer_bytes=(1000,), embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2,
                       kv_bytes_per_token=8)
    assert unit_flops(shape, layer_unit(0), 1000, rows=3, context=10) == 3 * (1000 + 4 * 10 * 2)
    assert unit_flops(shape, EMBED, 400, rows=3, context=10) == 0
    assert unit_flops(shape, HEAD, 400, rows=3, context=10) == 3 * 400
    p = StagePlan(0, 0, 1, True, "cpu", resident_units=(EMBED, layer_unit(0), NORM, HEAD))
    c = stage_cost(shape, p, Rates(flops=1, mem_bw=1, disk_bw=1), rows=3, context=10)
    assert c.memory_s == 1000 + 3 * 10 * 8  # weights once, each row's KV cache


# Compute-bound (1000 FLOP/s, 1000 FLOPs a row a stage: t = rows seconds) against
# weight-bound (1000 B/s: t = 1 s whatever the rows) stages, batch 4.
COMPUTE_BOUND = dict(flops=1e3, mem_bw=1e12, disk_bw=1e12)
WEIGHT_BOUND = dict(flops=1e12, mem_bw=1e3, disk_bw=1e12)
BARE = ModelShape(layer_bytes=(1000, 1000), embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2)


@pytest.mark.parametrize("kind, devices, micro, step", [
    (COMPUTE_BOUND, ("", ""), 1, 4 + 4),              # one micro-batch: the sum
    (COMPUTE_BOUND, ("", ""), 2, 2 + 2 + 1 * 2),      # sum + (m - 1) x slowest, of 2-row micro-batches
    (COMPUTE_BOUND, ("", ""), 4, 1 + 1 + 3 * 1),      # = t_slowest(4 rows) x (m + S - 1) / m = 4 x 5 / 4
    (COMPUTE_BOUND, ("gpu", "gpu"), 2, 2 * (2 + 2)),  # one device: the stages take turns, no faster
    (COMPUTE_BOUND, ("gpu", "gpu"), 4, 4 * (1 + 1)),
    (WEIGHT_BOUND, ("", ""), 1, 1 + 1),
    (WEIGHT_BOUND, ("", ""), 2, 1 + 1 + 1),           # each micro-batch reads the weights again: slower
])
def test_micro_batches_pay_only_on_separate_devices(kind, devices, micro, step):
    rates = [Rates(**kind, device=d) for d in devices]
    pred = predict(BARE, two_stages(), rates, batch=4, micro_batches=micro)
    assert pred.micro_batches == micro and pred.step_s == pytest.approx(step)
    assert pred.tokens_per_s == pytest.approx(4 / step)


THREE = ModelShape(layer_bytes=(1000, 1000, 1000), embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2)


@pytest.mark.parametrize("disk_bw, micro, step", [
    # stage 1 streams its layer (1000 B: 8 s from a 125 B/s disk) between two resident stages, each
    # compute-bound (t = rows seconds): its micro-batches run as one block, the layer read once
    (125, 1, 4 + 8 + 4),
    (125, 2, (2 + 2) + max(2 * 2, 8) + (2 + 2)),   # each stretch's flow, and the block; not 2+8+2 + 8 = 20
    (125, 4, (1 + 3) + max(4 * 1, 8) + (1 + 3)),   # not 1+8+1 + 3 x 8 = 34
    (250, 2, (2 + 2) + max(2 * 2, 4) + (2 + 2)),
    # a stage that streams little still runs a block, and the stages do not overlap around it
    (1e12, 2, (2 + 2) + 2 * 2 + (2 + 2)),          # where flowing through would take 2+2+2 + 2 = 8
])
def test_a_streaming_stage_runs_its_micro_batches_as_one_block(disk_bw, micro, step):
    plan = Plan((StagePlan(0, 0, 1, False, "cuda", resident_units=(EMBED, layer_unit(0))),
                 StagePlan(1, 1, 2, False, "cuda", streamed_units=(layer_unit(1),), streamed_bytes=1000, blocks=True),
                 StagePlan(2, 2, 3, True, "cuda", resident_units=(layer_unit(2), NORM, HEAD))), micro)
    rates = [Rates(flops=1e3, mem_bw=1e12, disk_bw=disk_bw)] * 3
    pred = predict(THREE, plan, rates, batch=4)
    assert [c.blocks for c in pred.stages] == [False, True, False]
    assert pred.step_s == pytest.approx(step)
    assert ("blocks" in pred.formula) == (micro > 1)
    unblocked = Plan(tuple(dataclasses.replace(p, blocks=False) for p in plan.stages), micro)
    flowing = 4 + 8 + 4 if micro == 1 else (4 / micro) * 2 + 8 + (micro - 1) * 8  # each micro-batch streams again
    if disk_bw == 125:
        assert predict(THREE, unblocked, rates, batch=4).step_s == pytest.approx(flowing)


def test_micro_batches_raise_throughput_only_on_separate_devices():
    def tps(devices, m):
        return predict(BARE, two_stages(), [Rates(**COMPUTE_BOUND, device=d) for d in devices], 4, m).tokens_per_s

    assert tps(("", ""), 1) < tps(("", ""), 2) < tps(("", ""), 4)
    assert tps(("gpu", "gpu"), 1) == pytest.approx(tps(("gpu", "gpu"), 2)) == pytest.approx(tps(("gpu", "gpu"), 4))


def test_predict_refuses_mismatched_rates_and_caps_micro_batches_at_the_batch():
    with pytest.raises(ValueError, match="one per stage"):
        predict(SHAPE, two_stages(), [Rates(**FAST)])
    assert predict(SHAPE, two_stages(), [Rates(**FAST)] * 2, batch=1, micro_batches=4).micro_batches == 1


@pytest.mark.parametrize("step_over,layer_over,stage_s,bound", [
    (0.0, 0.0, 2.412, "memory"),          # no overhead: as before
    (0.5, 0.0, 2.912, "memory"),          # one forward's overhead, once per stage
    (0.0, 1.5, 5.412, "overhead"),        # two decoder layers' overhead outweighs the reads
    (0.5, 1.0, 4.912, "overhead"),
])
def test_overheads_add_to_compute_per_forward_and_per_layer(step_over, layer_over, stage_s, bound):
    r = Rates(flops=1e6, mem_bw=1e3, disk_bw=1e3, step_overhead_s=step_over, layer_overhead_s=layer_over)
    (c,) = predict(SHAPE, one_stage(), [r]).stages
    assert c.overhead_s == pytest.approx(step_over + 2 * layer_over)
    assert c.compute_s == pytest.approx(stage_s) and c.step_s == pytest.approx(stage_s) and c.bound == bound
    assert c.as_dict()["overhead_s"] == pytest.approx(c.overhead_s)


def test_overheads_count_each_stages_own_layers_and_overlap_streaming():
    r = Rates(flops=1e6, mem_bw=1e6, disk_bw=100, step_overhead_s=0.25, layer_overhead_s=1.0)
    a, b = predict(SHAPE, two_stages(), [r, r]).stages
    assert a.overhead_s == b.overhead_s == pytest.approx(1.25)
    plan = one_stage(resident=(EMBED, layer_unit(0)), streamed=(layer_unit(1), NORM, HEAD), streamed_bytes=1408)
    (c,) = predict(SHAPE, plan, [r]).stages
    # compute with overhead 2.25 + 0.0024 s < streaming 14.08 s: the read still bounds it
    assert c.step_s == pytest.approx(14.08) and c.bound == "disk"


# --------------------------------------------------------------------------- placement by speed

import itertools  # noqa: E402

from distlayer.cost import Timer  # noqa: E402
from distlayer.planner import SPEED_MARGIN, Site, plan_pipeline  # noqa: E402

# 12 equal layers of 1000 bytes, no head: at mem_bw 1e3 B/s a layer takes 1 s to read.
EVEN = ModelShape(layer_bytes=(1000,) * 12, embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2)


def sites(n: int, node=lambda i: f"n{i}") -> list[Site]:
    return [Site(node(i), f"10.0.0.{i}", 10**9, 1) for i in range(n)]


def speed_plan(shape, rates, budgets=None, batch=1, micro=1):
    n = len(rates)
    timer = Timer(shape, tuple(rates), batch, micro)
    plan = plan_pipeline(shape, sites(n), budgets or [None] * n, "cpu", (micro, [1] * n), batch, timer=timer)
    return plan, timer


def ranges(plan) -> list[tuple[int, int]]:
    return [(p.start, p.end) for p in plan.stages]


def every_cut(n_layers: int, stages: int):
    for cut in itertools.combinations(range(1, n_layers), stages - 1):
        bounds = (0, *cut, n_layers)
        yield list(zip(bounds, bounds[1:]))


def brute_force(shape, timer, n_stages) -> float:
    """The least predicted step over every way of cutting the layers (all resident)."""
    best = float("inf")
    for cuts in every_cut(len(shape.layer_bytes), n_stages):
        plans = [StagePlan(i, a, b, i == n_stages - 1, "cpu", resident_units=tuple(
            shape.unit_bytes(StagePlan(i, a, b, i == n_stages - 1, "cpu").layer_range)))
            for i, (a, b) in enumerate(cuts)]
        best = min(best, timer.step_s(plans))
    return best


def test_like_nodes_keep_the_bytes_balanced_ranges():
    plan, _ = speed_plan(EVEN, [Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3)] * 3)
    assert ranges(plan) == [(0, 4), (4, 8), (8, 12)]
    assert plan.balance == "bytes" and "no faster ranges" in plan.balance_note


@pytest.mark.parametrize("micro, batch, slow_layers", [
    (1, 1, 1),   # one micro-batch: the step is the sum, so the slow stage keeps one layer
    (4, 4, 4),   # four in flight: sum + 3 x max; the slow (half-speed) stage gets a third of the work
])
def test_a_slow_node_gets_fewer_layers(micro, batch, slow_layers):
    slow, fast = Rates(flops=1e12, mem_bw=500, disk_bw=1e3), Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3)
    plan, timer = speed_plan(EVEN, [slow, fast], batch=batch, micro=micro)
    assert ranges(plan) == [(0, slow_layers), (slow_layers, 12)]
    assert plan.balance == "speed" and "faster than balancing bytes" in plan.balance_note
    assert predict(EVEN, plan, [slow, fast], batch, micro).step_s == pytest.approx(brute_force(EVEN, timer, 2))


@pytest.mark.parametrize("flops", [(1, 1, 1), (1, 2, 3), (3, 1, 2), (1, 5, 1)])
@pytest.mark.parametrize("micro", [1, 3])
def test_the_speed_search_finds_the_least_step_of_every_cut(flops, micro):
    # compute-bound, 3 stages of relative speeds ``flops``, overheads per stage and layer
    shape = ModelShape(layer_bytes=(900, 1100, 1000, 1300, 700, 1000, 1200, 800, 1000), embed=0, norm=0,
                       head=0, hidden=2, vocab=100, itemsize=2)
    rates = [Rates(flops=1e3 * f, mem_bw=1e12, disk_bw=1e12, step_overhead_s=0.3, layer_overhead_s=0.1 / f)
             for f in flops]
    plan, timer = speed_plan(shape, rates, batch=3, micro=micro)
    got = predict(shape, plan, rates, 3, micro).step_s
    assert got <= brute_force(shape, timer, 3) * (1 + SPEED_MARGIN) + 1e-9


def test_a_small_margin_keeps_the_bytes_ranges_and_says_so():
    # 2% slower: moving a layer gains less than the margin
    slow, fast = Rates(flops=1e12, mem_bw=980, disk_bw=1e3), Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3)
    plan, _ = speed_plan(EVEN, [slow, fast], batch=2, micro=2)
    assert ranges(plan) == [(0, 6), (6, 12)] and plan.balance == "bytes"


def test_placement_by_speed_stays_within_the_budgets():
    # the fast stage would take every layer but one; its budget holds 8 (the rest would
    # stream from a slow disk): it takes what it can hold resident
    slow = Rates(flops=1e12, mem_bw=500, disk_bw=1e3)
    fast = Rates(flops=1e12, mem_bw=1e3, disk_bw=1)
    plan, _ = speed_plan(EVEN, [slow, fast], budgets=[12_000, 8_000])
    assert ranges(plan) == [(0, 4), (4, 12)] and plan.stages[1].streamed_units == ()
    assert plan.balance == "speed"


def test_a_busy_node_with_more_overhead_per_layer_gets_fewer_layers():
    quiet = Rates(flops=1e12, mem_bw=1e12, disk_bw=1e12, layer_overhead_s=1.0)
    busy = Rates(flops=1e12, mem_bw=1e12, disk_bw=1e12, layer_overhead_s=3.0)
    plan, _ = speed_plan(EVEN, [quiet, busy, quiet], batch=3, micro=3)
    counts = [p.end - p.start for p in plan.stages]
    assert counts[1] < counts[0] and counts[1] < counts[2] and sum(counts) == 12


@pytest.mark.parametrize("device, nodes, micro, given, expected", [
    ("cpu", ["a", "b", "c"], 3, False, (1, 2, 3)),  # a stage per node: the threads do not depend on the count
    ("cpu", ["a", "a", "b"], 2, False, ()),         # two stages of node a share its cores by the count
    ("cuda", ["a", "a"], 2, False, (1, 2)),
    ("cpu", ["a", "b"], 2, True, ()),               # the settings fix the count
])
def test_micro_batch_choices(device, nodes, micro, given, expected):
    from distlayer.planner import micro_batch_choices

    assert micro_batch_choices(device, nodes, micro, given) == expected


def test_placement_by_speed_also_picks_the_micro_batches():
    # weight-bound: each micro-batch reads every weight again, so one is best once the
    # slow stage keeps a single layer and cannot work beside the other to any purpose
    slow = Rates(flops=1e12, mem_bw=500, disk_bw=1e3)
    fast = Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3)
    timer = Timer(EVEN, (slow, fast), 4, 2)
    plan = plan_pipeline(EVEN, sites(2), [None, None], "cpu", (2, [1, 1]), 4, timer=timer, micro_choices=(1, 2))
    assert plan.micro_batches == 1 and ranges(plan) == [(0, 1), (1, 12)]
    assert "in 1 micro-batch rather than 2" in plan.balance_note
    # compute-bound like stages: two micro-batches let them work at once, and stay
    like = Rates(flops=1e3, mem_bw=1e12, disk_bw=1e12)
    plan = plan_pipeline(EVEN, sites(2), [None, None], "cpu", (2, [1, 1]), 4,
                         timer=Timer(EVEN, (like, like), 4, 2), micro_choices=(1, 2))
    assert plan.micro_batches == 2 and ranges(plan) == [(0, 6), (6, 12)] and plan.balance == "bytes"


@pytest.mark.parametrize("host_memory, host_units, disk_bytes, bound", [
    (0, (), 3412, "disk"),                                     # no host tier: every streamed unit from disk
    (3000, (layer_unit(1), layer_unit(2), layer_unit(3)), 412, "disk"),  # the layers pinned, norm and head not
    (10**5, (layer_unit(1), layer_unit(2), layer_unit(3), NORM, HEAD), 4, "h2d"),  # all but the embedding's row
])
def test_a_pinned_host_unit_takes_host_to_device_time_and_no_disk_time(host_memory, host_units, disk_bytes, bound):
    # one GPU stage of 4 layers of 1000 bytes that keeps layer 0 resident and streams the rest:
    # whichever tier a streamed unit is in, a step copies it to the device (3408 decoded
    # bytes at 1e4 B/s); only the units not pinned are read from disk (at 1e3 B/s)
    shape = ModelShape(layer_bytes=(1000,) * 4, embed=400, norm=8, head=400, hidden=2, vocab=100, itemsize=2)
    gpu = [Site("a", "10.0.0.1", 10**6, 8, "GPU-0", "cuda:0", host_free_bytes=10**6)]
    (p,) = plan_pipeline(shape, gpu, [3500], "cuda", (1, [None]), context=1, host_memory=host_memory).stages
    assert p.resident_units == (layer_unit(0),) and p.host_units == host_units
    c = stage_cost(shape, p, Rates(flops=1e12, mem_bw=1e12, disk_bw=1e3, h2d_bw=1e4), rows=1)
    assert p.streamed_bytes == disk_bytes and c.disk_s == pytest.approx(disk_bytes / 1e3)
    assert c.h2d_s == pytest.approx(3408 / 1e4) and c.bound == bound


# A node under a CPU quota runs at full speed while it has quota left: the quota bounds
# the step by the device's CPU seconds over it, instead of slowing every forward.
@pytest.mark.parametrize("quota, micro, batch, step", [
    (None, 1, 1, 8 + 4),         # no quota: the sum of the stages
    (0.9, 1, 1, 8 + 4),          # 8 s of work in a 12 s step: under 90%
    (0.5, 1, 1, 16),             # 8 s over half a core: 16 s, more than 12
    (0.25, 1, 1, 32),
    (0.5, 2, 2, 2 * 8 / 0.5),    # two micro-batches: the device works 2 x 8 s a step
])
def test_a_cpu_quota_bounds_the_step_by_the_work_over_it(quota, micro, batch, step):
    shape = ModelShape(layer_bytes=(1000,) * 12, embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2)
    plan = Plan((StagePlan(0, 0, 8, False, "cpu", resident_units=tuple(f"layer.{i}" for i in range(8))),
                 StagePlan(1, 8, 12, True, "cpu", resident_units=tuple(f"layer.{i}" for i in range(8, 12)))), micro)
    # each layer reads 1000 bytes at 1000 B/s per row: 1 s a layer and row
    quotaed = Rates(flops=1e12, mem_bw=1e3 * (batch // micro), disk_bw=1e3, cpu_quota=quota)
    pred = predict(shape, plan, [quotaed, Rates(flops=1e12, mem_bw=1e3 * (batch // micro), disk_bw=1e3)],
                   batch, micro)
    assert pred.step_s == pytest.approx(step)
    assert ("quota" in pred.formula) == (step > 8 + 4 + (micro - 1) * 8)


def test_a_gpu_stage_under_a_quota_counts_only_its_overhead_as_cpu_time():
    shape = ModelShape(layer_bytes=(1000,) * 4, embed=0, norm=0, head=0, hidden=2, vocab=100, itemsize=2)
    plan = Plan((StagePlan(0, 0, 4, True, "cuda:0", resident_units=tuple(f"layer.{i}" for i in range(4))),), 1)
    gpu = Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3, h2d_bw=1e3, layer_overhead_s=0.25, cpu_quota=0.5)
    assert predict(shape, plan, [gpu]).step_s == pytest.approx(4 + 1)   # 1 s of overhead over 0.5: 2 s < 5 s
    slow_host = dataclasses.replace(gpu, cpu_quota=0.1)
    assert predict(shape, plan, [slow_host]).step_s == pytest.approx(1 / 0.1)


def test_placement_by_speed_moves_layers_off_a_quota_bound_node():
    quotaed = Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3, cpu_quota=0.25)
    free = Rates(flops=1e12, mem_bw=1e3, disk_bw=1e3)
    plan, timer = speed_plan(EVEN, [quotaed, free])
    assert plan.balance == "speed" and ranges(plan)[0][1] < 6
    assert predict(EVEN, plan, [quotaed, free]).step_s == pytest.approx(brute_force(EVEN, timer, 2))


@pytest.mark.parametrize("flops, disk_bw, device, setting, blocks", [
    # two stages on separate devices, each streaming all but 2 of its 6 layers (4000 B a step)
    (1e12, 1e3, "", "auto", True),       # bound by the disk: blocks read once a step, not once per micro-batch
    (1e3, 1e12, "", "auto", False),      # bound by compute: blocks would stop the stages overlapping
    (1e12, 1e3, "dev0", "auto", True),   # one device: the stages take turns anyway, and blocks read less
    (1e3, 1e12, "dev0", "auto", False),  # ... but bound by compute it is a tie: the kind's default (off on a CPU)
    (1e12, 1e3, "", "off", False),       # the setting wins over the prediction
    (1e3, 1e12, "", "on", True),
])
def test_the_measured_rates_decide_the_block_schedule(flops, disk_bw, device, setting, blocks):
    rates = (Rates(flops=flops, mem_bw=1e12, disk_bw=disk_bw, device=device),) * 2
    budget = 2 * 1000 + 1000  # two layers resident, room for one more streaming
    plan = plan_pipeline(EVEN, sites(2), [budget] * 2, "cpu", (2, [1, 1]), 4, timer=Timer(EVEN, rates, 4, 2),
                         block_schedule=setting)
    assert any(p.streamed_units for p in plan.stages)
    assert [p.blocks for p in plan.stages] == [blocks and bool(p.streamed_units) for p in plan.stages]
    assert ("as one block" in plan.block_note) == blocks and (setting in plan.block_note) == (setting != "auto")
