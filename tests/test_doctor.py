"""``distlayer doctor``: every check passes on this machine with the embedded default, and
each failure it exists for is reported with its cause and fix: a library outside its
tested range, a canary whose tokens differ from transformers', an unreachable Ray address.

Each run is a real ``distlayer doctor`` process. The faults are real too: a
``transformers`` whose installed metadata says 5.3.0 (what the guard reads), and a
``sitecustomize`` that makes distlayer hand its KV cache to the forward under a keyword
the model swallows, so every step decodes without its cache (the old wrong-token bug).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distlayer import canary, versions
from distlayer.cli import main

ROOT = Path(__file__).resolve().parent.parent


def doctor(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``distlayer doctor ARGS`` in its own process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "distlayer", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def rows_of(done: subprocess.CompletedProcess) -> dict[str, dict]:
    """The ``--json`` rows by check name."""
    return {r["check"]: r for r in json.loads(done.stdout)}


@pytest.fixture(scope="module")
def cluster():
    """A `ray start` head of its own (2 CPUs, token auth), stopped at the end: the
    doctor runs that join it skip starting a Ray of their own."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ray_nodes import RayNodes

    nodes = RayNodes([{}], cpus=2)
    yield nodes
    nodes.stop()


@pytest.mark.slow
def test_doctor_passes_on_the_default_model():
    start = time.monotonic()
    done = doctor("--json")
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    rows = rows_of(done)
    assert list(rows) == ["transformers version", "torch version", "ray version", "cpu", "ray cluster", "disk",
                          "canary cpu, in process", "canary cpu, 2 Ray stages streaming"]
    assert all(r["status"] == "ok" and r["ok"] is True for r in rows.values()), rows
    assert rows["ray cluster"]["nodes"][0]["cpus"] >= 1 and rows["ray cluster"]["token_auth"] is True
    assert rows["disk"]["read_gb_s"] > 0
    for name in ("canary cpu, in process", "canary cpu, 2 Ray stages streaming"):
        assert rows[name]["identical"] is True and rows[name]["tokens_per_s"] > 0
    assert rows["canary cpu, 2 Ray stages streaming"]["streamed_bytes"] > 0
    print(f"distlayer doctor took {took:.1f}s")  # the Ray start dominates


def test_unreachable_address_fails_fast_naming_it(tiny_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    done = doctor(str(tiny_dir("llama")), "--address", f"127.0.0.1:{port}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - start < 90  # Ray itself would retry for minutes
    lines = {ln.split("  ")[0]: ln for ln in done.stdout.splitlines()}
    ray = lines["ray cluster"]
    assert " FAIL " in ray and f"127.0.0.1:{port}" in ray and "ray start --head" in ray
    assert " skip " in lines["canary cpu, 2 Ray stages streaming"]
    assert " ok " in lines["canary cpu, in process"]  # what does not need Ray still runs


@pytest.mark.slow
def test_out_of_range_version_fails_with_the_fix(tiny_dir, tmp_path, cluster):
    fake = tmp_path / "site" / "transformers-5.3.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.3.0\n")
    done = doctor(str(tiny_dir("llama")), "--address", cluster.address, "--json",
                  env={**cluster.env, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 1, done.stdout + done.stderr
    rows = rows_of(done)
    row = rows["transformers version"]
    wanted = row["supported"]  # the range declared in distlayer's own metadata
    assert row["status"] == "FAIL" and row["installed"] == "5.3.0" and ">=" in wanted
    assert "transformers 5.3.0 is installed" in row["detail"] and f"tested with transformers{wanted}" in row["detail"]
    assert f'pip install "transformers{wanted}"' in row["detail"]
    # the canary still runs, on the code that is really installed, and says whether it is right
    assert all(r["status"] == "ok" for name, r in rows.items() if name.startswith("canary")), rows


@pytest.mark.slow
def test_canary_whose_tokens_differ_fails_naming_the_step(tiny_dir, tmp_path, cluster):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import distlayer.arch\n"
        "distlayer.arch.cache_keyword = lambda parts: 'kv_cache'  # a keyword the forward swallows\n")
    done = doctor(str(tiny_dir("llama")), "--address", cluster.address, "--json",
                  env={**cluster.env, "PYTHONPATH": str(shim)})
    assert done.returncode == 1, done.stdout + done.stderr
    row = rows_of(done)["canary cpu, in process"]
    assert row["status"] == "FAIL" and row["identical"] is False and row["first_difference_step"] >= 1
    assert f"at new token {row['first_difference_step']} of {canary.NEW_TOKENS}" in row["detail"]
    assert f"transformers {versions.installed()['transformers']}" in row["detail"]
    assert 'pip install "transformers' in row["detail"]


def test_bad_model_is_an_input_error(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "qwen2_moe"])
def test_canary_is_the_checkpoints_architecture_shrunk(arch):
    from transformers import AutoConfig

    full = AutoConfig.for_model(arch, num_hidden_layers=6)
    small = canary.shrink_config(full)
    assert small.model_type == full.model_type and small.num_hidden_layers == canary.LAYERS
    assert small.hidden_size == 64 and small.vocab_size == canary.VOCAB
    if getattr(full, "layer_types", None):
        assert small.layer_types == full.layer_types[:canary.LAYERS]
    model = canary.build_random(small)
    ids, mask, pad = canary.prompts(small)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=canary.NEW_TOKENS, do_sample=False)
    assert len(set(out[:, ids.shape[1]:].flatten().tolist())) > 4  # greedy tokens vary
