"""Table tests of the pure planning helpers: which units stay resident, and byte sizes."""

from __future__ import annotations

import random

import pytest

from distlayer import PlanError
from distlayer.config import parse_bytes
from distlayer.planner import ModelShape, choose_resident, fmt_bytes, stage_units
from distlayer.units import LayerRange

# embed 10, four layers of 20, norm 1, head 10: 101 bytes in all
UNITS = {"embed": 10, "layer.0": 20, "layer.1": 20, "layer.2": 20, "layer.3": 20, "norm": 1, "head": 10}
ORDER = list(UNITS)


@pytest.mark.parametrize("budget, resident", [
    (None, ORDER),                       # no limit
    (101, ORDER),                        # exactly fits
    (10**9, ORDER),
    (100, ORDER[:3]),                    # 50 resident + two 20-byte streaming slots
    (90, ORDER[:3]),                     # the same, exactly
    (89, ORDER[:2]),                     # 30 + 40
    (50, ORDER[:1]),                     # embed + two slots of 20
    (49, []),                            # 10 + 40 > 49: everything streamed
    (40, []),                            # just two slots
    (39, ORDER[:1]),                     # one slot only (2*20 > 39): embed + 20 <= 39
    (30, ORDER[:1]),                     # one slot: 10 + 20
    (29, []),
    (20, []),                            # exactly the largest unit
])
def test_choose_resident(budget, resident):
    assert choose_resident(UNITS, budget) == resident


@pytest.mark.parametrize("budget, stage", [(19, 0), (1, 3)])
def test_budget_below_largest_unit(budget, stage):
    with pytest.raises(PlanError) as e:
        choose_resident(UNITS, budget, stage=stage)
    msg = str(e.value)
    assert "layer.0" in msg and "20 B" in msg and f"stage {stage}" in msg and f"{budget} B" in msg
    assert "memory_per_stage" in msg and "add a stage" in msg


def test_error_names_the_largest_unit_in_gib():
    units = {"embed": 2**30, "layer.0": 3 * 2**30, "head": 2**30}
    with pytest.raises(PlanError, match=r"unit layer\.0 needs 3\.00 GiB .* budget of 2\.00 GiB"):
        choose_resident(units, 2 * 2**30, stage=1)


def test_single_unit():
    assert choose_resident({"layer.5": 7}, 7) == ["layer.5"]
    assert choose_resident({}, 0) == []


@pytest.mark.parametrize("seed", range(40))
def test_window_invariants(seed):
    """Resident units are a prefix; they plus the streaming window fit the budget; the window
    is two units when two of the largest unit fit; nothing more could be made resident."""
    rnd = random.Random(seed)
    units = {f"u{i}": rnd.randint(1, 100) for i in range(rnd.randint(2, 12))}
    biggest = max(units.values())
    budget = rnd.randint(biggest, sum(units.values()) + 10)
    resident = choose_resident(units, budget)
    names = list(units)
    assert resident == names[:len(resident)]
    if len(resident) == len(names):
        assert sum(units.values()) <= budget
        return
    copies = 2 if 2 * biggest <= budget else 1
    held = sum(units[n] for n in resident)
    streamed = [units[n] for n in names[len(resident):]]
    assert held + copies * max(streamed) <= budget
    for k in range(len(resident) + 1, len(names)):  # the largest such prefix
        assert sum(units[n] for n in names[:k]) + copies * max(units[n] for n in names[k:]) > budget


@pytest.mark.parametrize("text, value", [
    (None, None),
    (0, 0),
    (2000, 2000),
    (1.5e3, 1500),
    ("2000000000", 2_000_000_000),
    ("100B", 100),
    ("10K", 10_000),
    ("3kb", 3_000),
    ("2KiB", 2048),
    ("512MB", 512_000_000),
    ("512MiB", 512 * 2**20),
    ("1.5G", 1_500_000_000),
    ("4GiB", 4 * 2**30),
    ("4 GiB", 4 * 2**30),
    ("4gib", 4 * 2**30),
    (" 0.5GiB ", 2**29),
    ("2TB", 2 * 10**12),
    ("1TiB", 2**40),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "GiB", "4XB", "4 GiBs", "1.2.3G", "4Gi", "four GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_bytes(text)
    assert repr(text) in str(e.value) and "4GiB" in str(e.value)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (2048, "2.00 KiB"), (3 * 2**20, "3.00 MiB"), (int(1.5 * 2**30), "1.50 GiB"),
])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


@pytest.mark.parametrize("budget, window, resident", [
    # the embeddings read by row take no room and are never kept (unless everything fits)
    (101, {"embed": 0}, ORDER),
    (90, {"embed": 0}, ORDER[1:3]),      # two layers + two slots of 20; the embeddings' 10 bytes go to nothing
    (70, {"embed": 0}, ORDER[1:2]),      # 20 + 40
    (40, {"embed": 0}, []),
    # a head streamed in chunks of 5 (and a layer of 20 still the largest piece)
    (89, {"embed": 0, "head": 5}, ORDER[1:3]),
    # every layer and the norm resident: the window is two of the head's 5-byte chunks
    (91, {"embed": 0, "head": 5}, ORDER[1:6]),   # 81 resident + 2 * 5
])
def test_choose_resident_with_windows(budget, window, resident):
    assert choose_resident(UNITS, budget, window=window) == resident


SHAPE = ModelShape((20,) * 4, embed=40, norm=1, head=40, hidden=4, vocab=10, itemsize=1)


@pytest.mark.parametrize("r, budget, maps, resident, chunks", [
    # a stage that maps its shards cuts a 40-byte head into chunks no larger than a 20-byte layer
    (LayerRange(0, 4, True, True), 100, True, ["layer.0", "layer.1", "layer.2"], 2),
    # without maps (a GPU, a compressed store) the head streams whole: two 40-byte slots and one layer
    (LayerRange(0, 4, True, True), 100, False, ["layer.0"], 1),
    # a resident head is not cut
    (LayerRange(2, 4, False, True), 200, True, ["layer.2", "layer.3", "norm", "head"], 1),
    # a first stage: the embeddings never stay when layers stream
    (LayerRange(0, 2, True, False), 60, True, ["layer.0"], 1),
    # no layers to size chunks by: the head is whole
    (LayerRange(4, 4, False, True), 100, True, ["norm", "head"], 1),
])
def test_stage_units(r, budget, maps, resident, chunks):
    assert stage_units(SHAPE, r, budget, maps) == (resident, chunks)
