"""Table tests of the pure planning helpers: which units stay resident, and byte sizes."""

from __future__ import annotations

import random

import pytest

from distlayer import PlanError
from distlayer.config import parse_bytes
from distlayer.planner import choose_resident, fmt_bytes

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
