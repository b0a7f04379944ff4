"""The block schedule: several micro-batches through one stage, each streamed unit read
once for all of them (``LayerRunner.forward_block``). Exact against transformers on
several architectures and every CPU memory tier, and counted: a step of M micro-batches
fetches each streamed unit once."""

from __future__ import annotations

import pytest
import torch

from conftest import prompts
from distlayer import LayerStore, split
from distlayer.errors import StoreError
from distlayer.generate import positions_from_mask
from distlayer.planner import ModelShape, StagePlan
from distlayer.runner import LayerRunner, Step
from distlayer.units import unit_order

NEW = 5


def streaming_plan(store: LayerStore, maps: bool, resident: int = 1) -> StagePlan:
    """One stage of the whole model: its first ``resident`` units resident, the rest
    streamed within a budget of the largest unit twice over."""
    order = unit_order(store.num_layers)
    dtype = torch.float32
    weights = sum(store.unit_bytes(u, dtype) for u in order[:resident]) + 2 * max(
        store.unit_bytes(u, dtype) for u in order)
    return StagePlan(0, 0, store.num_layers, True, "cpu", budget_bytes=weights, resident_units=order[:resident],
                     streamed_units=order[resident:], maps_shards=maps,
                     resident_bytes=sum(store.unit_bytes(u, dtype) for u in order[:resident]),
                     streamed_bytes=ModelShape.from_store(store, dtype).streamed_bytes(order[resident:]))


def reference(hf, batches):
    """transformers' greedy tokens and logits for each micro-batch, run alone."""
    out = []
    for ids, mask in batches:
        with torch.no_grad():
            got = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        out.append((got.sequences[:, ids.shape[1]:], torch.stack(got.logits, 1)))
    return out


def decode_in_blocks(stage: LayerRunner, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy decoding of every micro-batch at once, one block per step; checks that each
    step fetches each streamed unit once."""
    masks = [torch.ones_like(ids) if mask is None else mask for ids, mask in batches]
    inputs = [ids for ids, _ in batches]
    tokens, logits = [[] for _ in batches], [[] for _ in batches]
    for step in range(NEW):
        reads = stage.stats()["stream_reads"]
        steps = [Step(x, m, positions_from_mask(m)[:, -x.shape[1]:], f"mb{k}", 1)
                 for k, (x, m) in enumerate(zip(inputs, masks))]
        outs = stage.forward_block(steps)
        assert stage.stats()["stream_reads"] - reads == len(stage.order), (step, len(steps))
        for k, out in enumerate(outs):
            nxt = out[:, -1].argmax(-1)
            tokens[k].append(nxt)
            logits[k].append(out[:, -1])
            inputs[k] = nxt[:, None]
            masks[k] = torch.cat([masks[k], torch.ones_like(nxt[:, None])], 1)
    return [(torch.stack(t, 1), torch.stack(lg, 1)) for t, lg in zip(tokens, logits)]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2_moe"])
@pytest.mark.parametrize("maps", [False, True], ids=["host", "mapped"])
def test_a_block_reads_each_unit_once_and_matches_transformers(tiny_dir, hf_model, arch, maps):
    store = LayerStore(split(tiny_dir(arch), progress=False))
    # three micro-batches of different rows and prompt lengths (the third padded)
    batches = [prompts(1, 9, seed=1), prompts(2, 12, seed=2), prompts(3, 10, seed=3)]
    ref = reference(hf_model(arch), batches)
    stage = LayerRunner(store, streaming_plan(store, maps), "cpu", torch.float32)
    try:
        got = decode_in_blocks(stage, batches)
        stats = stage.stats()
    finally:
        stage.close()
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, ref, strict=True):
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert 0 < stats["peak_weight_bytes"] <= stage.budget
    assert stats["stream_reads"] == NEW * len(stage.order)  # M micro-batches a step, each unit once a step


def test_steps_one_at_a_time_read_each_unit_each_time(tiny_dir):
    store = LayerStore(split(tiny_dir("llama"), progress=False))
    stage = LayerRunner(store, streaming_plan(store, maps=False), "cpu", torch.float32)
    try:
        ids, _ = prompts(1)
        pos = torch.arange(ids.shape[1])[None]
        for k in range(3):
            stage.forward(ids, None, pos, f"c{k}")
        assert stage.stats()["stream_reads"] == 3 * len(stage.order)
        with pytest.raises(ValueError, match="one KV cache each"):
            stage.forward_block([Step(ids, None, pos, "same"), Step(ids, None, pos, "same")])
    finally:
        stage.close()


def test_a_failed_read_fails_the_block_and_the_next_block_recovers(tiny_dir, hf_model, tmp_path):
    store = LayerStore(split(tiny_dir("llama"), tmp_path / "store", progress=False))
    batches = [prompts(1, 9, seed=1), prompts(2, 12, seed=2)]
    ref = reference(hf_model("llama"), batches)
    stage = LayerRunner(store, streaming_plan(store, maps=False), "cpu", torch.float32, prefetch=False)
    shard = store.path / store.units[stage.order[1]]["file"]
    whole = shard.read_bytes()
    try:
        shard.write_bytes(whole[: len(whole) // 2])  # truncated on disk while the stage runs
        steps = [Step(ids, mask, positions_from_mask(torch.ones_like(ids) if mask is None else mask), f"bad{k}")
                 for k, (ids, mask) in enumerate(batches)]
        with pytest.raises(StoreError, match=stage.order[1]):
            stage.forward_block(steps)
        # what the block took is given back, once: the resident units alone are held
        assert stage.memory.held_bytes() == sum(stage.unit_bytes[u] for u in stage.resident)
        shard.write_bytes(whole)
        for k in range(len(batches)):
            stage.drop(f"bad{k}")
        got = decode_in_blocks(stage, batches)
    finally:
        stage.close()
    for (tokens, _), (ref_tokens, _) in zip(got, ref, strict=True):
        assert tokens.tolist() == ref_tokens.tolist()
