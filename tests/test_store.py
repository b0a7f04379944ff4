"""The layer store: splitting from every source format, resuming, reuse, and the
errors a user sees for damaged or missing inputs (each names the file and what to do)."""

from __future__ import annotations

import collections
import json
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, LayerStore, StoreError, UnsupportedModelError, split
from distlayer.store import writer as store_mod
from distlayer.units import layer_index, layer_unit, unit_order
from tiny_models import make_bin, make_sharded, make_tiny

UNITS = ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "norm", "head"]


def greedy(path, **kw) -> list[list[int]]:
    ids, mask = prompts(4)
    with AutoModel.from_pretrained(path, stages=0, progress=False, **kw) as model:
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()


def manifest_tensors(store_dir) -> dict:
    """What must not depend on the source format: each unit's tensors and content hash."""
    m = json.loads((store_dir / "manifest.json").read_text())
    return {u["name"]: (u["tensors"], u["weight_bytes"], u["sha256"]) for u in m["units"]}


def mtimes(d) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in d.iterdir()}


def small_split(tmp_path, arch="llama"):
    """A fresh tiny checkpoint and its layer store, private to one test."""
    src = make_tiny(arch, tmp_path / "src")
    return src, split(src, out=tmp_path / "store", progress=False)


def flip_bytes(f, offset_from_end=16) -> None:
    """Corrupt a file without changing its size."""
    data = bytearray(f.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 8):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_single_sharded_and_bin_sources_agree(arch, tmp_path):
    sources = {
        "single": make_tiny(arch, tmp_path / "single"),
        "sharded": make_sharded(arch, tmp_path / "sharded"),
        "bin": make_bin(arch, tmp_path / "bin"),
    }
    assert len(list(sources["sharded"].glob("*.safetensors"))) > 1
    assert (sources["sharded"] / "model.safetensors.index.json").is_file()
    assert not list(sources["bin"].glob("*.safetensors"))
    stores = {k: split(p, progress=False) for k, p in sources.items()}
    for k, d in stores.items():
        assert d == sources[k] / "distlayer-shards"
        assert [u["name"] for u in json.loads((d / "manifest.json").read_text())["units"]] == UNITS
    ref = manifest_tensors(stores["single"])
    assert manifest_tensors(stores["sharded"]) == ref
    assert manifest_tensors(stores["bin"]) == ref
    outs = {k: greedy(p) for k, p in sources.items()}
    assert outs["sharded"] == outs["single"] and outs["bin"] == outs["single"]


def test_store_keeps_checkpoint_dtype(tmp_path):
    from tiny_models import build_tiny

    build_tiny("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    store = LayerStore(split(tmp_path / "bf16", progress=False))
    dtypes = {t["dtype"] for u in store.units.values() for t in u["tensors"].values()}
    assert dtypes == {"bfloat16"}
    assert store.unit_bytes("layer.0") == store.unit_bytes("layer.0", torch.float32) // 2


def test_repo_id_from_hf_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    make_tiny("llama", repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = split("tiny-org/tiny-llama", progress=False)
    assert out == cache / "distlayer" / "tiny-org--tiny-llama" / rev / "distlayer-shards"
    assert greedy("tiny-org/tiny-llama") == greedy(repo / "snapshots" / rev)


@pytest.mark.slow
def test_gguf_source(tmp_path, smollm_store):
    """Splitting the GGUF file directly gives the same shards as splitting its HF conversion."""
    from distlayer.smollm import find_gguf

    out = split(find_gguf(), out=tmp_path / "store", progress=False)
    store = LayerStore(out)
    assert store.num_layers == 30 and store.manifest["model_type"] == "llama"
    assert not (out / "gguf-converted").exists()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert manifest_tensors(out) == manifest_tensors(smollm_store)


# --------------------------------------------------------------------------- reuse and resume


def test_finished_split_is_reused(tmp_path):
    src, out = small_split(tmp_path)
    before = mtimes(out)
    assert split(src, out=out, progress=False) == out
    with AutoModel.from_pretrained(src, shards_dir=out, stages=0, progress=False):
        pass
    with AutoModel.from_pretrained(out, stages=0, progress=False):
        pass
    assert mtimes(out) == before


def _count_writes(monkeypatch) -> list[str]:
    written = []
    real = store_mod._write_unit

    def spy(out, unit, tensors):
        written.append(unit)
        return real(out, unit, tensors)

    monkeypatch.setattr(store_mod, "_write_unit", spy)
    return written


def test_interrupted_split_resumes(tmp_path, monkeypatch):
    src = make_tiny("llama", tmp_path / "src")
    ref = split(src, out=tmp_path / "clean", progress=False)
    out = tmp_path / "store"
    real, calls = store_mod._write_unit, []

    def interrupted(o, unit, tensors):
        calls.append(unit)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(o, unit, tensors)

    monkeypatch.setattr(store_mod, "_write_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split(src, out=out, progress=False)
    assert not (out / "manifest.json").exists()
    partial = json.loads((out / "manifest.partial.json").read_text())
    assert [u["name"] for u in partial["units"]] == ["embed", "head", "layer.0"]
    with pytest.raises(StoreError, match="interrupted.*distlayer split"):
        LayerStore(out)
    kept = mtimes(out)

    written = _count_writes(monkeypatch)
    assert split(src, out=out, progress=False) == out
    assert written == ["layer.1", "layer.2", "layer.3", "norm"]
    now = mtimes(out)
    assert all(now[f"{u}.safetensors"] == kept[f"{u}.safetensors"] for u in ["embed", "head", "layer.0"])
    assert not (out / "manifest.partial.json").exists()
    assert manifest_tensors(out) == manifest_tensors(ref)
    assert greedy(out) == greedy(ref)


def test_killed_split_resumes(tmp_path, monkeypatch):
    """A split killed with SIGKILL half-way through writing a unit resumes where it stopped."""
    src = make_tiny("llama", tmp_path / "src")
    out = tmp_path / "store"
    script = textwrap.dedent("""
        import os, signal, sys
        from distlayer.store import writer
        real, calls = writer._write_unit, []
        def dying(out, unit, tensors):
            calls.append(unit)
            if len(calls) == 5:  # embed, head, layer.0, layer.1 are written
                (out / f"{unit}.safetensors.tmp").write_bytes(b"half a unit")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(out, unit, tensors)
        writer._write_unit = dying
        writer.split(sys.argv[1], out=sys.argv[2], progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists()
    assert [u["name"] for u in json.loads((out / "manifest.partial.json").read_text())["units"]] == \
        ["embed", "head", "layer.0", "layer.1"]
    written = _count_writes(monkeypatch)
    split(src, out=out, progress=False)
    assert written == ["layer.2", "layer.3", "norm"]
    assert [u["name"] for u in LayerStore(out).manifest["units"]] == UNITS
    assert greedy(out) == greedy(split(src, out=tmp_path / "clean", progress=False))


def test_resume_rewrites_a_unit_with_the_wrong_size(tmp_path, monkeypatch):
    src, out = small_split(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    (out / "manifest.partial.json").write_text(json.dumps({"units": manifest["units"][:4]}))
    (out / "layer.1.safetensors").write_bytes(b"truncated")
    written = _count_writes(monkeypatch)
    split(src, out=out, progress=False)
    assert "layer.1" in written and "layer.0" not in written
    assert LayerStore(out).load("layer.1")


# --------------------------------------------------------------------------- damaged stores


def test_corrupt_shard_is_named(tmp_path):
    _, out = small_split(tmp_path)
    flip_bytes(out / "layer.2.safetensors")
    store = LayerStore(out)
    store.load("layer.1")
    with pytest.raises(StoreError) as e:
        store.load("layer.2")
    msg = str(e.value)
    assert "layer.2.safetensors" in msg and "unit layer.2" in msg and "sha256" in msg and "corrupt" in msg
    assert "distlayer split" in msg


def test_corrupt_resident_shard_fails_at_load(tmp_path):
    src, out = small_split(tmp_path)
    flip_bytes(out / "layer.0.safetensors")
    with pytest.raises(StoreError, match=r"unit layer\.0 fails its sha256"):
        AutoModel.from_pretrained(out, stages=0, progress=False)


def test_corrupt_streamed_shard_fails_at_generate(tmp_path):
    _, out = small_split(tmp_path)
    store = LayerStore(out)
    budget = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    flip_bytes(out / "layer.3.safetensors")
    with AutoModel.from_pretrained(out, stages=0, memory_per_stage=budget, progress=False) as model:
        assert model.plan[0].streamed_bytes > 0
        ids, _ = prompts(1)
        with pytest.raises(StoreError, match=r"unit layer\.3 fails its sha256"):
            model.generate(ids, max_new_tokens=3)


def test_truncated_shard_is_named(tmp_path):
    _, out = small_split(tmp_path)
    f = out / "layer.1.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    with pytest.raises(StoreError) as e:
        LayerStore(out).load("layer.1")
    msg = str(e.value)
    assert "layer.1.safetensors" in msg and f"{size - 100} bytes" in msg and f"says {size}" in msg
    assert "truncated" in msg and "distlayer split" in msg


def test_missing_shard_is_named(tmp_path):
    _, out = small_split(tmp_path)
    (out / "norm.safetensors").unlink()
    with pytest.raises(StoreError, match=r"norm\.safetensors of unit norm is missing.*distlayer split"):
        LayerStore(out).load("norm")


def test_missing_manifest(tmp_path):
    _, out = small_split(tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(StoreError) as e:
        LayerStore(out)
    assert f"no manifest.json in {out}" in str(e.value) and "distlayer split" in str(e.value)
    with pytest.raises(StoreError) as e:
        AutoModel.from_pretrained(out, stages=0, progress=False)
    assert str(out) in str(e.value) and "manifest.json" in str(e.value) and "distlayer split" in str(e.value)
    assert not (out / "distlayer-shards").exists()  # it did not re-split the shards as a checkpoint


def test_damaged_manifest(tmp_path):
    _, out = small_split(tmp_path)
    (out / "manifest.json").write_text("{ not json")
    with pytest.raises(StoreError, match=r"manifest\.json is damaged.*distlayer split"):
        LayerStore(out)


# --------------------------------------------------------------------------- bad sources


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(StoreError) as e:
        AutoModel.from_pretrained(missing, stages=0, progress=False)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value) and "check the path" in str(e.value)


def test_unknown_repo_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(StoreError) as e:
        AutoModel.from_pretrained("no-such-org/no-such-model", stages=0, progress=False)
    msg = str(e.value)
    assert "'no-such-org/no-such-model'" in msg and "HF_HUB_OFFLINE=1" in msg and "not in the local HF cache" in msg
    assert "hf download no-such-org/no-such-model" in msg


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="holds no config.json"):
        split(tmp_path / "empty", progress=False)


def test_config_without_weights(tmp_path):
    src = make_tiny("llama", tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(StoreError, match=r"no weights.*download is incomplete"):
        split(src, progress=False)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(StoreError, match=r"not a \.gguf checkpoint.*directory"):
        split(f, progress=False)


def test_not_enough_disk_space(tmp_path, monkeypatch):
    src = make_tiny("llama", tmp_path / "src")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(StoreError) as e:
        split(src, out=tmp_path / "store", progress=False)
    msg = str(e.value)
    assert str(tmp_path / "store") in msg and "free" in msg and "pass out on another disk" in msg
    assert not list((tmp_path / "store").glob("*.safetensors"))


def test_disk_check_counts_a_tied_head(tmp_path, monkeypatch):
    """The space asked for covers the whole store, including the head copy of tied embeddings."""
    src = make_tiny("llama", tmp_path / "src", tie=True)
    asked = []
    real = store_mod._check_disk
    monkeypatch.setattr(store_mod, "_check_disk", lambda out, need, *a: (asked.append(need), real(out, need, *a)))
    out = split(src, out=tmp_path / "store", progress=False)
    written = sum(u["weight_bytes"] for u in LayerStore(out).units.values())
    assert written > (src / "model.safetensors").stat().st_size
    assert asked == [written]


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_unsupported_architecture(model_type, tmp_path):
    from transformers import AutoConfig, AutoModel as HFAutoModel

    config = AutoConfig.for_model(model_type, vocab_size=64, n_layer=2, n_head=2, n_embd=32, d_model=32,
                                  d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    HFAutoModel.from_config(config).save_pretrained(tmp_path / model_type)
    with pytest.raises(UnsupportedModelError) as e:
        AutoModel.from_pretrained(tmp_path / model_type, stages=0, progress=False)
    msg = str(e.value)
    assert repr(model_type) in msg and "not supported" in msg
    for t in ["llama", "mistral", "qwen2", "gemma2", "mixtral"]:
        assert t in msg


def test_unknown_compression(tmp_path):
    from distlayer import ConfigError

    with pytest.raises(ConfigError, match="compression='2bit'"):
        split(tmp_path, compression="2bit")


def test_load_casts_dtype(tmp_path):
    _, out = small_split(tmp_path)
    t = LayerStore(out).load("layer.0", dtype=torch.bfloat16)
    assert {v.dtype for v in t.values()} == {torch.bfloat16}


def test_a_store_config_edited_after_the_split_is_refused_and_repaired(tmp_path):
    """The store's own config.json is fingerprinted like the checkpoint's: an edit is
    named, and the advised split restores it."""
    from distlayer.store import open_store

    src, out = small_split(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 2  # same layer count, another model
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match=r"config\.json changed after the split.*restore it, or repair it with "
                                         r"`distlayer split"):
        open_store(out)
    split(src, out=out, progress=False, verify=True)           # what `distlayer split` runs
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert open_store(out).num_layers == 4


@pytest.mark.parametrize("unit, index", [
    ("layer.0", 0), ("layer.7", 7), ("layer.123", 123),
    ("embed", None), ("norm", None), ("head", None), ("head:0", None),
    ("layer", None), ("layer.", None), ("layer.x", None), ("layer.-1", None), ("layer.01", None),
    ("layer.3:1", None), ("layer.1.2", None), ("layers.3", None), ("", None),
])
def test_layer_index(unit, index):
    """``layer_index`` is ``layer_unit``'s inverse, and None for every other name."""
    assert layer_index(unit) == index
    if index is not None:
        assert layer_unit(index) == unit


def test_layer_index_of_every_unit():
    assert [layer_index(u) for u in unit_order(3)] == [None, 0, 1, 2, None, None]


@pytest.mark.parametrize("shape, dtype, nbytes", [
    ((), torch.float32, 4), ((0, 5), torch.float16, 0), ((3, 4), torch.bfloat16, 24),
    ((2, 3, 4), torch.int8, 24), ((7,), torch.float64, 56), ([5], torch.bool, 5),
])
def test_tensor_bytes(shape, dtype, nbytes):
    from distlayer.store.format import tensor_bytes

    assert tensor_bytes(shape, dtype) == nbytes == torch.empty(shape, dtype=dtype).nbytes


@pytest.mark.parametrize("n, align, up", [(0, 256, 0), (1, 256, 256), (256, 256, 256), (257, 256, 512), (5, 4, 8)])
def test_align_up(n, align, up):
    from distlayer.store.format import align_up

    assert align_up(n, align) == up


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """A write that fails leaves the file as it was and no temporary file; one that
    finishes replaces it whole."""
    import hashlib

    from distlayer.files import atomic_write, file_sha256

    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(OSError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with atomic_write(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert file_sha256(path) == hashlib.sha256(b"new").hexdigest()
