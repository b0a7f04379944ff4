"""Streaming on a CPU without copies: shards mapped in place and paged in and out within
the budget, embeddings read by row, a head larger than a layer run in vocabulary chunks.
Exact against transformers, and the kernel's own count of mapped pages within budget."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import prompts, save_tokenizer
from distlayer import AutoModel, LayerStore, split
from distlayer.bench.measure import drop_page_cache
from tiny_models import make_tiny

NEW = 8


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A tiny qwen2 with a 4096-token vocabulary: its untied head (1 MiB) is ten times a layer."""
    path = make_tiny("qwen2", tmp_path_factory.mktemp("bigvocab") / "qwen2", vocab=4096, tie=False)
    save_tokenizer(path)
    store = LayerStore(split(path, progress=False))
    return path, store, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def assert_same(out, ref) -> None:
    assert out.sequences.tolist() == ref.sequences.tolist()
    for ours, theirs in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def mapped_bytes(store_dir: Path) -> int:
    """Bytes of the store's shard files this process has mapped in, as the kernel counts them."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
                current = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Rss:" and current and current.startswith(str(store_dir)):
                total += int(parts[1]) * 1024
    return total


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stages", [0, 2])
def test_head_in_chunks_and_embeddings_by_row_match_transformers(big_vocab, batch, stages):
    path, store, hf = big_vocab
    layer = store.unit_bytes("layer.0")
    budget = 3 * layer  # the head and the embeddings are each ten times that
    ids, mask = prompts(batch)
    with torch.no_grad():
        ref = generate(hf, ids, mask)
    with AutoModel.from_pretrained(path, stages=stages, in_process=True, memory_per_stage=budget,
                                   progress=False) as model:
        for _ in range(2):  # the second run starts where the loader's cycle stands
            assert_same(generate(model, ids, mask), ref)
        plan, stats = model.plan, model.stats()
    first, last = plan[0], plan[-1]
    assert all(p.maps_shards for p in plan)
    assert "embed" in first.streamed_units and "head" in last.streamed_units
    assert last.head_chunks == -(-store.unit_bytes("head") // layer) > 1
    for s in stats:
        assert 0 < s["peak_weight_bytes"] <= budget
    # a step reads one row of the embeddings, and the head once, chunk by chunk
    row = store.unit_bytes("embed") // 4096
    assert first.streamed_bytes == row + sum(store.unit_bytes(u) for u in first.streamed_units if u != "embed")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_mapped_pages_stay_within_the_budget(big_vocab, tmp_path):
    """The kernel's count of the shard pages the stage holds mapped, after a run in which
    every unit streamed, is within the weight budget: pages are mapped out after use."""
    path, store, _ = big_vocab
    shards = Path(shutil.copytree(store.path, tmp_path / "store"))
    budget = 3 * store.unit_bytes("layer.0")
    total = sum(store.unit_bytes(u) for u in store.units)
    ids, mask = prompts(2)
    with AutoModel.from_pretrained(shards, stages=0, memory_per_stage=budget, progress=False) as model:
        generate(model, ids, mask)
        held = mapped_bytes(shards)
        stats = model.stats()[0]
    assert stats["peak_weight_bytes"] <= budget < total // 4
    assert 0 < held <= budget + 2 * 64 * 1024  # the kernel maps whole 64 KiB windows of a head chunk in
    assert mapped_bytes(shards) == 0  # closed: nothing left mapped


def test_streams_from_a_cold_page_cache(big_vocab, tmp_path):
    """With every shard dropped from the page cache before each step, units are read from
    disk as they are paged in, and the output is unchanged."""
    path, store, hf = big_vocab
    shards = Path(shutil.copytree(store.path, tmp_path / "store"))

    class DropEachStep:
        def put(self, value):
            drop_page_cache(shards.glob("*.safetensors"))

        def end(self):
            pass

    ids, mask = prompts(1)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=NEW, do_sample=False)
    with AutoModel.from_pretrained(shards, stages=0, memory_per_stage=3 * store.unit_bytes("layer.0"),
                                   progress=False) as model:
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, streamer=DropEachStep())
    assert out.tolist() == ref.tolist()
