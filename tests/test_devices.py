"""The device kinds (``devices.KINDS``): device strings map to their kind, unknown ones are
refused with what to use, every kind names a memory tier of ``memory.TIERS`` and functions
that exist, and the modules converted to the records no longer compare a device string to
a kind's name."""

from __future__ import annotations

import pathlib
import re

import pytest

from distlayer import config, devices, memory, planner
from distlayer.errors import ConfigError

PKG = pathlib.Path(devices.__file__).parent


@pytest.mark.parametrize("device, kind", [
    ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda"), ("cuda:1", "cuda"), ("cpu:0", "cpu"),
])
def test_kind_of_a_device_string(device, kind):
    assert devices.kind_of(device) is devices.KINDS[kind]


def test_kind_of_a_torch_device():
    torch = pytest.importorskip("torch")
    assert devices.kind_of(torch.device("cuda:1")) is devices.CUDA
    assert devices.kind_of(torch.device("cpu")) is devices.CPU


@pytest.mark.parametrize("device", ["mps", "gpu", "rocm:0", "", "CUDA", "tpu:1"])
def test_an_unknown_device_says_what_to_use(device):
    with pytest.raises(ConfigError) as e:
        devices.kind_of(device)
    message = str(e.value)
    assert repr(device) in message and "use one of cpu, cuda" in message and "devices.KINDS" in message


@pytest.mark.parametrize("kind", devices.KINDS.values(), ids=lambda k: k.name)
def test_every_kind_names_a_listed_tier(kind):
    named = [kind.tier] + ([kind.mapped_tier] if kind.mapped_tier else [])
    for dotted in named:
        assert dotted in memory.TIERS, f"{kind.name}'s tier {dotted} is not in memory.TIERS"
    pytest.importorskip("torch")
    assert kind.tier_class().__name__ == kind.tier.rsplit(".", 1)[1]
    if kind.maps_shards:
        assert kind.tier_class(True).__name__ == kind.mapped_tier.rsplit(".", 1)[1]
    else:
        with pytest.raises(ValueError, match="plan it again"):
            kind.tier_class(True)


@pytest.mark.parametrize("kind", devices.KINDS.values(), ids=lambda k: k.name)
def test_every_kind_names_functions_that_exist(kind):
    pytest.importorskip("torch")
    for dotted in (kind.free_bytes, kind.physical_id, kind.current, kind.sync):
        if dotted is not None:
            assert callable(devices.resolve(dotted)), dotted
    assert kind.name == devices.type_of(kind.stage_device or kind.name)
    assert 0 < kind.free_fraction <= 1 and kind.workspace_bytes >= 0
    assert bool(kind.workspace_bytes) == bool(kind.workspace_note)


def test_the_registry_is_the_settings_and_the_planner_constants():
    assert config.DEVICES == tuple(devices.KINDS)
    assert planner.GPU_CONTEXT == devices.CUDA.context and planner.GPU_WORKSPACE == devices.CUDA.workspace_bytes
    assert devices.CPU.free(devices.CPU.name) > 0  # the node's available RAM, without torch


@pytest.mark.parametrize("resources, kind", [({}, "cpu"), ({"GPU": 0}, "cpu"), ({"GPU": 0.5}, "cuda"), ({"GPU": 2}, "cuda")])
def test_the_default_kind(resources, kind):
    assert devices.default(resources) is devices.KINDS[kind]


# Modules whose device branches are lookups of the records now (issue 22, item 1).
CONVERTED = ("config.py", "hardware.py", "stage.py", "planner.py", "pipeline.py", "runner.py", "survey.py", "data.py",
             "rates.py", "doctor.py", "whatif.py")
# What may still match there, and why: (file, the line, stripped).
ALLOWED = {
    # cgroup v1's controller is called "cpu": not a device
    ("hardware.py", 'if "cpu" in controllers.split(","):'),
}
# A device string compared to a kind's name, tested for one by prefix, or cut to its type by hand.
KIND = r"""["'](cpu|cuda)(:\d+)?["']"""
BRANCH = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*{KIND}|{KIND}\s*(==|!=|in\b)|startswith\(\s*{KIND}|split\(["']:["']\)\[0\]""")


def test_the_branch_pattern():
    for line in ('device == "cpu"', "d.type != 'cuda'", 'x if device.startswith("cuda") else y', '"cuda:0" == d',
                 'device.split(":")[0]', 'kind in ("cuda", "cpu")', '"cpu" in controllers'):
        assert BRANCH.search(line), line
    for line in ('free_bytes("cpu")', 'device: str = "cpu"', 'b.device.type != "meta"', 'kind_of(device).host'):
        assert not BRANCH.search(line), line


def test_the_allow_list_is_current():
    for name, line in ALLOWED:
        assert line in [t.strip() for t in (PKG / name).read_text().splitlines()], (name, line)


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_modules_do_not_branch_on_device_strings(name):
    found = [line.strip() for line in (PKG / name).read_text().splitlines()
             if BRANCH.search(line) and (name, line.strip()) not in ALLOWED]
    assert not found, f"{name} branches on a device string; look up devices.kind_of(device) instead: {found}"


def test_which_kinds_are_here_and_their_device_names():
    import torch

    assert devices.CPU.here() and devices.CUDA.here() == torch.cuda.is_available()
    assert devices.CPU.device_name("cpu") == "cpu"
    if torch.cuda.is_available():
        assert devices.CUDA.device_name("cuda:0") == torch.cuda.get_device_name(0)
