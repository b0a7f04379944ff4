"""The tested version ranges and the guard: inside them distlayer gives transformers' own
tokens, outside them it refuses before anything runs, saying what to install.

The ``test_installed_*`` tests install a real transformers into a scratch folder (pip
``--target``, from PyPI) and run distlayer on it in a subprocess that puts the folder
first on ``PYTHONPATH``: 5.17, which a GPU image came with and which gave wrong tokens
before the cache keyword was asked for, and 5.3, below the floor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distlayer import VersionError, versions
from distlayer.sources import SHARDS_DIRNAME

ROOT = Path(__file__).parents[1]


def test_ranges_are_the_declared_requirements():
    """The guard reads pyproject.toml's ranges, and each guarded library has a floor and a
    ceiling."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    declared = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    ranges = versions.supported()
    assert set(ranges) == set(versions.GUARDED)
    for req in declared:
        if req.name in ranges:
            assert SpecifierSet(ranges[req.name]) == req.specifier
            assert ranges[req.name].startswith(">=") and ",<" in ranges[req.name]


def test_the_readme_states_the_same_ranges():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Supported versions"):]
    for name, spec in versions.supported().items():
        assert f"`{spec}`" in section.split("\n\n")[1], f"README's Supported versions table: {name} {spec}"


def test_this_environment_is_in_range():
    """CI's main environment and its floor environment both run inside the ranges."""
    assert all(c.ok for c in versions.checks()), versions.checks()
    versions.guard()


def test_a_version_outside_says_what_is_installed_what_is_tested_and_the_fix():
    low = versions.supported()["transformers"].split(",")[0][2:]
    old = f"{low.split('.')[0]}.{int(low.split('.')[1]) - 1}.0"
    with pytest.raises(VersionError) as e:
        versions.guard({"transformers": old, "torch": "2.13.0+cpu", "ray": None}, versions.LOCAL)
    text = str(e.value)
    spec = versions.supported()["transformers"]
    assert f"transformers {old} is installed" in text
    assert f"tested with transformers{spec}" in text
    assert f'pip install "transformers{spec}"' in text
    assert versions.ALLOW_ENV in text
    assert "torch" not in text.split("(")[0]  # torch is in range: only transformers is named


def test_a_missing_library_and_where_it_was_read():
    with pytest.raises(VersionError, match=r"ray is not installed on node 10\.0\.0\.2.*pip install \"ray>="):
        versions.guard({"transformers": None, "torch": None, "ray": None}, ("ray",), where="node 10.0.0.2")


def test_the_escape_hatch_warns_instead(monkeypatch):
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="answers are unchecked"):
        versions.guard({"transformers": "4.57.0", "torch": "2.13.0", "ray": "2.60.0"})


def test_torch_local_build_labels_are_in_range():
    assert versions.Check("torch", "2.13.0+cpu", ">=2.4,<2.14").ok
    assert versions.Check("torch", "2.11.0+cu130", ">=2.4,<2.14").ok
    assert not versions.Check("torch", "2.14.0", ">=2.4,<2.14").ok
    assert not versions.Check("torch", "not-a-version", ">=2.4,<2.14").ok


# --------------------------------------------------------------------------- real installs


def install(version: str, root: Path) -> Path:
    """transformers ``version`` and the huggingface_hub it needs, into ``root/version``."""
    target = root / version
    if not target.exists():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--target", str(target), f"transformers=={version}", "huggingface_hub<2"],
                           capture_output=True, text=True, timeout=900)
        if r.returncode:
            shutil.rmtree(target, ignore_errors=True)
            pytest.fail(f"pip could not install transformers {version} (PyPI needed):\n{r.stderr[-2000:]}")
    return target


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("transformers-installs")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint at ``src`` without the layer store an earlier test may have split beside it."""
    return shutil.copytree(src, dst, ignore=shutil.ignore_patterns(SHARDS_DIRNAME))


def run_with(target: Path, code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT / "tests")])}
    env.pop(versions.ALLOW_ENV, None)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=900)


COMPARE = """
import json, sys, torch, transformers
from conftest import prompts
from distlayer import AutoModel
from transformers import AutoModelForCausalLM
path = sys.argv[1]
ids, mask = prompts(4)
with torch.no_grad():
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
out = {"transformers": transformers.__version__, "transformers'": ref.tolist()}
for stages in (0, 3):
    with AutoModel.from_pretrained(path, stages=stages, in_process=True, progress=False) as model:
        out[f"{stages} stages"] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).tolist()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_installed_transformers_5_17_gives_transformers_tokens(arch, tiny_dir, scratch, tmp_path):
    target = install("5.17.0", scratch)
    path = copy_checkpoint(tiny_dir(arch), tmp_path / arch)  # split by 5.17's own loader
    r = run_with(target, COMPARE, path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out.pop("transformers") == "5.17.0"
    ref = out.pop("transformers'")
    for name, tokens in out.items():
        assert tokens == ref, f"{name} on transformers 5.17.0"


@pytest.mark.slow
def test_installed_transformers_below_the_floor_is_refused_before_anything_runs(tiny_dir, scratch, tmp_path):
    target = install("5.3.0", scratch)
    path = copy_checkpoint(tiny_dir("llama"), tmp_path / "llama")
    cli = "import sys; from distlayer.cli import main; sys.exit(main(sys.argv[1:]))"
    r = run_with(target, cli, "generate", path, "w005 w006", "--stages", "0", "--max-new-tokens", "2")
    spec = versions.supported()["transformers"]
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: transformers 5.3.0 is installed, but distlayer is tested with transformers{spec}" in r.stderr
    assert f'pip install "transformers{spec}"' in r.stderr
    assert "Traceback" not in r.stderr
    assert not (path / SHARDS_DIRNAME).exists(), "refused before splitting"
