"""No silent wrong answers, no hangs: a store is checked against the model it serves, the
repair each store error advises does repair, and bad input is refused with one sentence
that says what to change, before any stage starts."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, ConfigError, LayerStore, OutputError, PlanError, StageError, StoreError, split
from distlayer.cli import main

HERE = Path(__file__).parent


@pytest.fixture
def llama(tiny_dir, tmp_path):
    """A private copy of the tiny llama checkpoint (tests change it)."""
    path = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), path, ignore=shutil.ignore_patterns("distlayer-shards*"))
    return path


def reference(model_dir, ids, n=6):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)


def ours(model_dir, ids, n=6, **kw):
    with AutoModel.from_pretrained(model_dir, stages=0, progress=False, **kw) as m:
        return m.generate(ids, max_new_tokens=n, eos_token_id=[])


def advised_command(message: str) -> list[str]:
    """The ``distlayer ...`` command an error advises, as arguments for ``cli.main``."""
    cmd = re.search(r"`(distlayer [^`]+)`", message).group(1)
    return shlex.split(cmd)[1:]


# --------------------------------------------------------------------------- store identity


def test_a_store_of_another_model_is_refused(llama, tiny_dir, tmp_path, capsys):
    other = split(tiny_dir("qwen2"), out=tmp_path / "qwen2-store", progress=False)
    assert main(["generate", str(llama), "w010", "--stages", "0", "--shards-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds the layer store of" in err and "another model" in err and "--shards-dir" in err
    assert main(["split", str(llama), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--out" in err and "--shards-dir" not in err  # split's own flags
    assert LayerStore(other).manifest["model_type"] == "qwen2"  # nothing was lost


def perturb(model_dir: Path) -> None:
    """A new fine-tune saved over the old one: same config, other weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    time.sleep(0.01)  # a new modification time even on coarse clocks
    hf.save_pretrained(model_dir)


def test_a_checkpoint_updated_in_place_is_split_again(llama, tmp_path):
    ids, _ = prompts(1)
    before = ours(llama, ids)
    assert before.tolist() == reference(llama, ids).tolist()
    perturb(llama)
    want = reference(llama, ids)
    assert want.tolist() != before.tolist()
    assert ours(llama, ids).tolist() == want.tolist()           # the default store follows the checkpoint
    named = tmp_path / "named-store"
    split(llama, out=named, progress=False)
    perturb(llama)
    with pytest.raises(StoreError, match=r"the checkpoint changed after the split \(model\.safetensors.*--force"):
        ours(llama, ids, shards_dir=named)                      # a named store is never rewritten behind one's back
    assert main(["split", str(llama), "--out", str(named), "--force"]) == 0
    assert ours(llama, ids, shards_dir=named).tolist() == reference(llama, ids).tolist()


def test_a_manifest_that_disagrees_with_the_config_is_refused(llama):
    store = split(llama, progress=False)
    mf = store / "manifest.json"
    data = json.loads(mf.read_text())
    data["num_layers"] -= 1
    data["units"] = [u for u in data["units"] if u["name"] != "layer.3"]
    mf.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="lists 3 layers but the model's config.json has num_hidden_layers=4"):
        AutoModel.from_pretrained(store, stages=0, progress=False)


@pytest.mark.parametrize("damage", ["missing unit", "missing checksum", "not json"])
def test_a_damaged_manifest_is_named_and_the_advice_repairs_it(llama, damage):
    store = split(llama, progress=False)
    mf = store / "manifest.json"
    data = json.loads(mf.read_text())
    if damage == "missing unit":
        data["units"] = [u for u in data["units"] if u["name"] != "norm"]
    elif damage == "missing checksum":
        del data["units"][2]["sha256"]
    mf.write_text("{half" if damage == "not json" else json.dumps(data))
    with pytest.raises(StoreError, match="distlayer split") as e:
        LayerStore(store)
    assert main(advised_command(str(e.value))) == 0
    ids, _ = prompts(1)
    assert ours(store, ids).tolist() == reference(llama, ids).tolist()


# --------------------------------------------------------------------------- repairs that repair


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_the_advised_command_rewrites_exactly_the_bad_shard(llama, damage):
    store = split(llama, progress=False)
    shard = store / "layer.2.safetensors"
    times = {f.name: f.stat().st_mtime_ns for f in store.glob("*.safetensors")}
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[-8:] = bytes(8)
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    with pytest.raises(StoreError) as e:
        LayerStore(store).load("layer.2")
    assert "layer.2" in str(e.value)
    args = advised_command(str(e.value))
    assert args[:2] == ["split", str(llama.resolve())] and args[-2:] == ["--out", str(store)]
    assert main(args) == 0
    after = {f.name: f.stat().st_mtime_ns for f in store.glob("*.safetensors")}
    assert [n for n in after if after[n] != times.get(n)] == ["layer.2.safetensors"]  # only the bad one
    whole = LayerStore(store)
    for name in whole.units:
        whole.load(name)                                         # every shard passes its sha256 again
    ids, _ = prompts(1)
    assert ours(store, ids).tolist() == reference(llama, ids).tolist()


def test_a_shard_changed_under_a_loaded_model_is_caught(llama):
    ids, _ = prompts(1)
    store = split(llama, progress=False)
    with AutoModel.from_pretrained(store, stages=0, memory_per_stage="300KiB", progress=False) as m:
        assert "layer.3" in m.plan[0].streamed_units
        first = m.generate(ids, max_new_tokens=4, eos_token_id=[])
        assert first.tolist() == reference(llama, ids, 4).tolist()
        # overwrite a streamed shard with another of the same size (layer 1's bytes)
        (store / "layer.3.safetensors").write_bytes((store / "layer.1.safetensors").read_bytes())
        with pytest.raises(StoreError, match=r"layer\.3.*sha256.*changed"):
            m.generate(ids, max_new_tokens=4, eos_token_id=[])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_a_damaged_store_on_a_ray_stage_is_named_and_nothing_is_copied(llama, tmp_path, damage):
    """The driver checks the store before it fills any node: no node store is written, no traceback."""
    store = split(llama, progress=False)
    shard = store / "layer.2.safetensors"
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
        words = "is missing"
    elif damage == "truncated":
        shard.write_bytes(data[:-100])
        words = f"is {len(data) - 100} bytes but the manifest says {len(data)}"
    else:  # same size: found by the stage's first load, from the driver's store in place
        shard.write_bytes(data[:-8] + bytes(8))
        words = "fails its sha256 check"
    home = tmp_path / "home"
    env = {**os.environ, "DISTLAYER_HOME": str(home)}
    cmd = [sys.executable, "-m", "distlayer", "generate", str(store), "w010", "--stages", "1",
           "--max-new-tokens", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=HERE)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(rf"^error: shard \S*layer.2.safetensors of unit layer.2 {words}.*`distlayer split ",
                     done.stderr, re.M), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "from the driver's node" not in done.stderr, done.stderr[-3000:]
    stores = home / "stores"
    assert not stores.exists() or not any(stores.iterdir()), sorted(stores.rglob("*"))


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def model(tiny_dir):
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=0, progress=False) as m:
        yield m


@pytest.mark.parametrize("ids, mask, words", [
    (torch.zeros(1, 0, dtype=torch.long), None, "the prompt has no tokens"),
    (torch.tensor([[5, 6, 900]]), None, "[900], outside this model's vocabulary of 320"),
    (torch.tensor([[5, -1]]), None, "[-1], outside"),
    (torch.ones(1, 2, 3, dtype=torch.long), None, "has shape (1, 2, 3)"),
    (torch.tensor([[0.5, 1.0]]), None, "tensor of ints"),
    (torch.tensor([[5, 6, 7]]), torch.ones(1, 2), "attention_mask has shape (1, 2) but input_ids (1, 3)"),
    (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]), "row 1 of the batch is all padding"),
])
def test_bad_input_ids_get_one_sentence(model, ids, mask, words):
    with pytest.raises(ConfigError) as e:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert words in str(e.value)


@pytest.mark.parametrize("kw, words", [
    (dict(stop_strings=[""]), "generation.stop"),
    (dict(stop=""), "non-empty texts"),
    (dict(seed="abc"), "generation.seed: got 'abc'"),
    (dict(num_beams=2), "unknown argument 'num_beams'"),
])
def test_bad_generation_settings(model, kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **kw)


@pytest.mark.parametrize("kw, words", [
    (dict(memory_per_stage=True), "not a byte size"),
    (dict(memory_per_stage=float("inf")), "finite"),
    (dict(memory_per_stage="inf"), "not a byte size"),
    (dict(address="nohost"), "pipeline.address: got 'nohost'"),
    (dict(stages=5), "stages=5: the model has 4 layers"),
    (dict(stages=2, memory_per_stage="1KiB"), "raise memory_per_stage"),
])
def test_bad_pipeline_settings_fail_before_any_stage_starts(tiny_dir, kw, words):
    code = ("import sys, time; from math import inf; from distlayer import AutoModel, DistlayerError\n"
            f"t = time.time()\ntry:\n    AutoModel.from_pretrained({str(tiny_dir('llama'))!r}, progress=False, **{kw!r})\n"
            "except DistlayerError as e:\n    print(type(e).__name__, e)\n"
            "print('ray started:', 'ray' in sys.modules and sys.modules['ray'].is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert words in done.stdout, done.stdout + done.stderr[-2000:]
    assert "ray started: False" in done.stdout


def test_generate_verb_checks_prompt_and_settings_first(tiny_dir, capsys):
    model = str(tiny_dir("llama"))
    assert main(["generate", model, "  ", "--stages", "0"]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert main(["generate", model, "w010", "--stages", "0", "--stop", ""]) == 2
    assert "generation.stop" in capsys.readouterr().err
    assert main(["generate", model, "w010 " * 250, "--stages", "0", "--max-new-tokens", "10"]) == 2
    assert "over the context of 256 tokens: shorten the prompt or lower --max-new-tokens" in capsys.readouterr().err


def test_junk_gguf_and_a_failed_split_leaves_no_empty_store(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(512))
    out = tmp_path / "store"
    with pytest.raises(StoreError, match="is not a GGUF checkpoint distlayer can read"):
        split(junk, out=out, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------- hangs


def test_an_address_where_nothing_answers_fails_fast(tiny_dir):
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"nothing answers at the Ray cluster address 127\.0\.0\.1:1 within 2s"):
        AutoModel.from_pretrained(tiny_dir("llama"), stages=1, address="127.0.0.1:1", connect_timeout=2,
                                  progress=False)
    assert time.monotonic() - t < 30


@pytest.mark.slow
def test_no_address_is_a_private_local_ray_whatever_was_recorded(tiny_dir):
    """``address=None`` never joins a cluster named by RAY_ADDRESS or an earlier ``ray start``."""
    code = ("from distlayer import AutoModel\nimport torch\n"
            f"with AutoModel.from_pretrained({str(tiny_dir('llama'))!r}, stages=1, progress=False) as m:\n"
            "    print('OK', m.generate(torch.tensor([[5, 6]]), max_new_tokens=2).shape)")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=HERE)
    assert "OK torch.Size([1, 4])" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_ends_like_ctrl_c(smollm_dir):
    import psutil

    cmd = [sys.executable, "-m", "distlayer", "generate", str(smollm_dir), "Tell me a long story.", "--chat",
           "--stages", "1", "--max-new-tokens", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        first = proc.stdout.read(20)                      # tokens are streaming: the stage is running
        assert first
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family                                     # Ray's processes and the stage
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(0.5)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), for a disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_job_whose_disk_fills_up_stops_cleanly_and_resumes(tiny_dir, tmp_path, small_disk):
    from distlayer import run_job

    rows = [{"id": i, "prompt": "w010 w011"} for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * (256 * 1024 - 4096))             # about one page left: a few records fit
    job = {"model": str(tiny_dir("llama")), "input": str(tmp_path / "in.jsonl"),
           "output": str(small_disk / "out.jsonl"), "batch_size": 4, "pipeline": {"stages": 0},
           "generation": {"max_new_tokens": 40}}
    with pytest.raises(OutputError, match=r"cannot write to output .*No space left.*free some disk space"):
        run_job(job, progress=False)
    written = (small_disk / "out.jsonl").read_text()
    assert written.endswith("\n") and 0 < written.count("\n") < 40  # only whole lines
    filler.unlink()
    run_job(job, progress=False)
    ids = [json.loads(line)["id"] for line in (small_disk / "out.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(40))                        # every id exactly once


def test_a_split_whose_disk_fills_up_says_so_and_resumes(tiny_dir, tmp_path, capsys, monkeypatch):
    """A real file system fills up during ``distlayer split`` (another writer takes the room
    after the up-front check): one sentence naming the disk, what is needed and --out, exit
    2; the same command finishes the store once space is freed, keeping what was written."""
    from distlayer.store import writer as store_mod

    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        src, out, filler = tiny_dir("llama"), mnt / "store", mnt / "filler"
        real = store_mod._check_disk

        def check_then_fill(o, need, *a):
            real(o, need, *a)                                  # the check passes: there is room now
            filler.write_bytes(b"x" * (shutil.disk_usage(mnt).free - need // 2))  # then only half is left

        monkeypatch.setattr(store_mod, "_check_disk", check_then_fill)
        assert main(["split", str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err.split("\r")[-1]         # after the progress bar
        assert re.fullmatch(r"[^\n]*\nerror: cannot write layer\.[^\n]*\n", err) and "Traceback" not in err, err
        assert "No space left on device" in err and f"the disk at {mnt} has" in err and "more is needed" in err
        assert "pass --out on another disk" in err and "resumes after the 3 units already written" in err
        assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
        kept = {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")}
        assert set(kept) == {"embed.safetensors", "head.safetensors", "layer.0.safetensors"}
        monkeypatch.setattr(store_mod, "_check_disk", real)
        filler.unlink()                                        # space freed: the same command again
        assert main(["split", str(src), "--out", str(out)]) == 2 - 2
        assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())  # resumed, not redone
        clean = split(src, out=tmp_path / "clean", progress=False)
        assert {u: v["sha256"] for u, v in LayerStore(out).units.items()} == \
            {u: v["sha256"] for u, v in LayerStore(clean).units.items()}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_auto_address_names_rays_own_temp_dir_in_the_callers_words(tiny_dir, tmp_path, capsys, monkeypatch):
    """``address="auto"`` with nothing recorded names the file Ray reads (under RAY_TMPDIR),
    and says how to leave the address out in the words of where it was set."""
    import ray

    ray.shutdown()  # as in a new process: a Ray an earlier test left connected would answer "auto" itself
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    recorded = str(tmp_path / "raytmp" / "ray" / "ray_current_cluster")
    assert main(["plan", str(tiny_dir("llama")), "--address", "auto"]) == 2
    err = capsys.readouterr().err
    assert recorded in err and "--address auto but" in err and "leave out --address" in err, err
    assert "address=None" not in err and "/tmp/ray/" not in err
    with pytest.raises(ConfigError) as e:
        AutoModel.from_pretrained(tiny_dir("llama"), stages=1, address="auto", progress=False)
    assert recorded in str(e.value) and "address='auto' but" in str(e.value) and "pass address=None" in str(e.value)


def test_a_failed_address_in_the_cli_uses_flag_words(tiny_dir, capsys):
    assert main(["plan", str(tiny_dir("llama")), "--address", "127.0.0.1:1", "--connect-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "nothing answers at the Ray cluster address 127.0.0.1:1" in err and "leave out --address" in err
    assert "address=None" not in err
