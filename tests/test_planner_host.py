"""Table tests of the planner's tier choice for streamed units: a GPU stage keeps what its
share of the node's host budget holds in pinned host memory, the rest it reads from disk
(pure functions, no torch or Ray)."""

from __future__ import annotations

import pytest

from distlayer.errors import PlanError
from distlayer.planner import (HOST_FRACTION, HOST_RESERVE, ModelShape, Site, StagePlan, choose_host, host_budgets,
                               plan_pipeline)
from distlayer.report import tier_note
from distlayer.units import EMBED, HEAD, NORM, layer_unit

# 8 layers of 10 bytes, embed 20, norm 1, head 20; no KV cache or activations to reserve
SHAPE = ModelShape((10,) * 8, embed=20, norm=1, head=20)
L = [layer_unit(i) for i in range(8)]
RAM = 10**6  # a node's available RAM, where the test does not size the budget from it


def gpus(*nodes: tuple[str, int], per_node: int = 1) -> list[Site]:
    """``per_node`` GPU stages on each ``(node, available RAM)``, each on a GPU of its own."""
    return [Site(n, f"ip-{n}", 10**6, 8, f"{n}/GPU-{k}", "cuda:0", ram) for n, ram in nodes for k in range(per_node)]


def ram_for(budget: int) -> int:
    """Available RAM that gives a node a default host budget of ``budget`` bytes."""
    return int((budget + HOST_RESERVE) / HOST_FRACTION)


def plan(sites, host_memory=None, budget=45, device="cuda"):
    n = len(sites)
    return plan_pipeline(SHAPE, sites, [budget] * n, device, (n, [None] * n), host_memory=host_memory).stages


@pytest.mark.parametrize("sites, host_memory, host_units, host_bytes, streamed_bytes, source", [
    # enough host RAM for every streamed unit: a step reads only the embedding's rows from disk
    (gpus(("a", RAM), per_node=2), 200, [L[2:5], [*L[5:], NORM, HEAD]], [30, 51], [20, 0],
     "host_memory_per_node 200 B on ip-a, shared by the node's 2 GPU stages"),
    # room for some: in forward order, each unit that still fits (the 1-byte norm after a layer that does not)
    (gpus(("a", RAM), per_node=2), 30, [L[2:3], [L[5], NORM]], [10, 11], [40, 40], "host_memory_per_node 30 B"),
    (gpus(("a", RAM), per_node=2), 60, [L[2:5], L[5:]], [30, 30], [20, 21], "host_memory_per_node 60 B"),
    # a zero host budget turns the tier off: everything streamed is read from disk
    (gpus(("a", RAM), per_node=2), 0, [[], []], [0, 0], [50, 51], "host_memory_per_node is 0"),
    # the default: a share of the node's available RAM less a reserve, shared by its GPU stages
    (gpus(("a", ram_for(60)), per_node=2), None, [L[2:5], L[5:]], [30, 30], [20, 21], "50% of the"),
    # a node that has no more than the reserve to spare pins nothing
    (gpus(("a", ram_for(0)), per_node=2), None, [[], []], [0, 0], [50, 51], "less 1.00 GiB"),
    # the node's RAM unknown: nothing pinned, and the plan says how to set it
    (gpus(("a", 0), per_node=2), None, [[], []], [0, 0], [50, 51], "unknown (set --host-memory)"),
    # two nodes with different RAM: each stage gets its own node's budget
    (gpus(("a", ram_for(30)), ("b", ram_for(10))), None, [L[2:5], L[5:6]], [30, 10], [20, 41], "50% of the"),
])
def test_tier_choice(sites, host_memory, host_units, host_bytes, streamed_bytes, source):
    stages = plan(sites, host_memory)
    assert [list(p.host_units) for p in stages] == host_units
    assert [p.host_bytes for p in stages] == host_bytes
    assert [p.streamed_bytes for p in stages] == streamed_bytes  # bytes a step reads from the store
    for p in stages:
        assert source in p.host_source
        assert p.host_bytes <= p.host_budget_bytes
        assert set(p.host_units) <= set(p.streamed_units) and EMBED not in p.host_units
        # resident units are as they are without the tier
        assert p.resident_units == plan(sites, 0)[p.stage].resident_units


def test_gpu_stages_of_one_node_share_its_host_budget():
    alone = plan(gpus(("a", RAM)), 120, budget=45)
    assert [p.host_budget_bytes for p in alone] == [120]
    four = plan(gpus(("a", RAM), per_node=4), 120, budget=25)  # each streams
    # shared by need: stage 0 streams one layer (10 B; the embeddings are read by row), the
    # others 20, 20 and 41 B; what stage 0 leaves of its 30 goes to the others
    assert [p.host_budget_bytes for p in four] == [10, 30, 30, 50]
    assert all("shared by the node's 4 GPU stages" in p.host_source for p in four)
    assert "by need: 10 B, it needs only that" in four[0].host_source
    assert "by need: 50 B, what the node's other GPU stages leave" in four[3].host_source
    assert sum(p.host_budget_bytes for p in four) == 120 and all(p.host_bytes for p in four)
    assert [p.streamed_bytes for p in four] == [20, 0, 0, 0]  # only the embeddings' rows from disk
    # a stage that keeps everything resident leaves its whole share to the one that streams
    two = plan_pipeline(SHAPE, gpus(("a", RAM), per_node=2), [1000, 25], "cuda", (2, [None] * 2),
                        host_memory=60).stages
    assert not two[0].streamed_units and two[1].streamed_units
    assert [p.host_budget_bytes for p in two] == [0, 60] and two[1].host_bytes > 30
    # one stage a node: each has its node's budget to itself
    two_nodes = plan(gpus(("a", RAM), ("b", RAM)), 120, budget=45)
    assert [p.host_budget_bytes for p in two_nodes] == [120, 120]


def test_cpu_stages_never_pin():
    sites = [Site("a", "ip-a", 1000, 8, host_free_bytes=ram_for(1000))] * 2
    for host_memory in (None, 500):
        for p in plan(sites, host_memory, device="cpu"):
            assert p.streamed_units and not p.host_units and p.host_bytes == 0 and p.host_budget_bytes == 0
            assert "CPU stage" in p.host_source


def test_a_host_budget_over_the_available_ram_says_what_to_change():
    with pytest.raises(PlanError) as e:
        plan(gpus(("a", 2**30)), 2 * 2**30)
    assert "2.00 GiB" in str(e.value) and "ip-a" in str(e.value) and "--host-memory" in str(e.value)


@pytest.mark.parametrize("streamed, budget, chosen", [
    ([EMBED, L[0], L[1], HEAD], 100, [L[0], L[1], HEAD]),  # the embeddings are read by row: never pinned
    ([L[0], HEAD, L[1]], 25, [L[0], L[1]]),                 # the head does not fit; a layer after it does
    ([L[0], L[1]], 9, []),
    ([], 100, []),
])
def test_choose_host(streamed, budget, chosen):
    sizes = {EMBED: 20, L[0]: 10, L[1]: 10, HEAD: 20}
    assert choose_host(sizes, streamed, budget, (EMBED,)) == chosen


def test_host_budgets_follow_the_sites_device():
    sites = [Site("a", "ip-a", 1, 8, "g0", "cuda:0", RAM), Site("a", "ip-a", 1, 8, "", "cpu", RAM)]
    (gpu_budget, _), (cpu_budget, why) = host_budgets(sites, "cuda", 100)
    assert gpu_budget == 100 and cpu_budget == 0 and "CPU" in why


def test_a_host_unit_is_a_streamed_unit():
    with pytest.raises(ValueError, match="not streamed units"):
        StagePlan(0, 0, 1, True, "cuda:0", resident_units=[L[0]], host_units=[L[0]])
    assert StagePlan(0, 0, 1, True, "cuda:0", streamed_units=[L[0]], host_units=[L[0]]).host_units == (L[0],)


def test_tier_notes_say_where_and_why():
    some, none_ = plan(gpus(("a", RAM)), 30)[0], plan(gpus(("a", RAM)), 0)[0]
    all_ = plan(gpus(("a", RAM)), 30, budget=1000)[0]
    assert tier_note(some).startswith("stage 0: pinned 3 of ") and "30 B host budget" in tier_note(some)
    assert "from disk" in tier_note(some)
    assert tier_note(none_) == "stage 0: disk (host_memory_per_node is 0: no pinned host tier)"
    assert tier_note(all_) == "stage 0: all resident, nothing streams"


@pytest.mark.parametrize("units, words", [
    (["embed", "layer.6", "layer.7", "layer.8", "layer.10", "head"], "embed, layer.6-8, layer.10, head"),
    (["layer.3"], "layer.3"),
    (["layer.0", "layer.1", "norm", "layer.2"], "layer.0-1, norm, layer.2"),
    ([], ""),
])
def test_units_are_named_with_consecutive_layers_as_ranges(units, words):
    from distlayer.units import unit_names

    assert unit_names(units) == words
