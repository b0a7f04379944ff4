"""The Ray pipeline against transformers: 1, 2 and 3 actor stages, batch 1 and 8,
two architectures, budgets that force streaming, and stages on two Ray nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, ConfigError, LayerStore, split
from distlayer.generate import positions_from_mask
from distlayer.transport import Work

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_per_module")]
NEW = 6


def reference(hf, ids, mask):
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)


def check(model, hf, batch, seed=0):
    ids, mask = prompts(batch, seed=seed)
    ref = reference(hf, ids, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    # without logits, greedy tokens are picked on the last stage and fed back to the
    # first with steps in flight; rows that stop early must still match
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=3 * NEW, do_sample=False)
    long_ref = hf.generate(ids, attention_mask=mask, max_new_tokens=3 * NEW, do_sample=False)
    assert fast.tolist() == long_ref.tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_actors_match_transformers(arch, stages, tiny_dir, hf_model):
    import psutil
    import ray

    # llama: the default on one node, stages taking turns with the whole batch on all
    # cores; qwen2: one micro-batch per stage in flight at once, one core each
    micro = stages if arch == "qwen2" else None
    with AutoModel.from_pretrained(tiny_dir(arch), stages=stages, micro_batches=micro, progress=False) as model:
        plan = model.plan
        assert len(plan) == stages
        cores = int(ray.cluster_resources()["CPU"])  # one node
        assert model.pipeline.micro_batches(8) == (micro or 1)
        assert [p.threads for p in plan] == [max(1, cores // (micro or 1))] * stages
        # stages that take turns on all the node's cores bind their OpenMP threads, one per core
        binds = ray.get([a.__ray_call__.remote(lambda _: os.environ.get("OMP_PROC_BIND")) for a in model.pipeline.stages.actors])
        assert binds == ["close" if plan[0].threads == cores else None] * stages
        # no memory_per_stage: each stage budgets an equal share of the node's free RAM
        ram = psutil.virtual_memory().total
        assert all(0 < p.budget_bytes <= 0.9 * ram / stages for p in plan)
        assert plan[0].start == 0 and plan[-1].end == model.config.num_hidden_layers
        assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
        assert len({p.pid for p in plan}) == stages  # one actor process per stage
        assert model.pipeline.transport.name == "channel"  # one node: actor to actor over Unix sockets
        for batch in (1, 8):
            check(model, hf_model(arch), batch)
        stats = model.stats()
        assert len(stats) == stages
        for s in stats:
            assert s["compute_s"] > 0 and s["peak_weight_bytes"] > 0 and s["peak_rss_bytes"] > 0
            assert {"load_s", "transfer_s"} <= set(s)
            assert s["kv_bytes"] == 0  # generate returns once every stage has freed its KV cache


def test_ray_object_ref_transport_matches(tiny_dir, hf_model):
    with AutoModel.from_pretrained(tiny_dir("qwen2"), stages=2, transport="ray", progress=False) as model:
        assert model.pipeline.transport.name == "ray"
        check(model, hf_model("qwen2"), 8)


def test_a_stage_error_reaches_the_driver_through_the_channels(tiny_dir):
    """An error in stage 0 goes down the channels, so the last stage raises it instead of
    waiting forever, and the pipeline still works afterwards."""
    ids, mask = prompts(2)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=3, progress=False) as model:
        good = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        bad = ids.clone()
        bad[0, -1] = model.config.vocab_size + 5  # out of the embedding's range
        with pytest.raises(ConfigError, match="outside this model's vocabulary"):
            model.generate(bad, attention_mask=mask, max_new_tokens=NEW)  # refused before any stage runs
        t = model.pipeline.transport  # past that check, stage 0 fails on it
        with pytest.raises(IndexError):
            t.fetch(t.submit(Work("bad", "bad:0", mask, positions_from_mask(mask)), bad))
        t.drop("bad")
        assert model.generate(ids, attention_mask=mask, max_new_tokens=NEW).tolist() == good.tolist()


def test_seeded_sampling_does_not_depend_on_stages_or_micro_batches(tiny_dir):
    """Each row samples with its own generator in the driver: seeded runs repeat and equal
    the in-process run whatever the stages and the micro-batch split; top_k=1 is greedy
    (picked on the last stage, with steps in flight)."""
    ids, mask = prompts(4)
    kw = dict(attention_mask=mask, max_new_tokens=3 * NEW, do_sample=True, temperature=0.9, top_p=0.95)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=0, progress=False) as local:
        ref = local.generate(ids, seed=7, **kw)
        other = local.generate(ids, seed=8, **kw)
    assert ref.tolist() != other.tolist()
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, progress=False) as model:
        assert model.pipeline.micro_batches(4) == 1
        assert model.generate(ids, seed=7, **kw).tolist() == ref.tolist()
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, micro_batches=2, progress=False) as model:
        assert model.generate(ids, seed=7, **kw).tolist() == ref.tolist()
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=3 * NEW, do_sample=False)
        top1 = model.generate(ids, attention_mask=mask, max_new_tokens=3 * NEW, do_sample=True, top_k=1, seed=0)
        assert top1.tolist() == greedy.tolist()


def test_uneven_budgets_give_uneven_ranges_and_streaming_still_matches(tiny_dir, hf_model):
    path = tiny_dir("llama")
    store = LayerStore(split(path, progress=False))
    layer = store.unit_bytes("layer.0")
    ends = store.unit_bytes("embed") + store.unit_bytes("norm") + store.unit_bytes("head")
    # stage 0 can hold one layer beside the embeddings; stage 1 everything else
    budgets = [store.unit_bytes("embed") + layer + 16, ends + 4 * layer]
    with AutoModel.from_pretrained(path, stages=2, memory_per_stage=budgets, progress=False) as model:
        assert [(p.start, p.end) for p in model.plan] == [(0, 1), (1, 4)]
        assert all(p.streamed_bytes == 0 for p in model.plan)
        check(model, hf_model("llama"), 8)
    # the same two stages with a budget below each range's size: both stream, output unchanged
    small = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    with AutoModel.from_pretrained(path, stages=2, memory_per_stage=small, progress=False) as model:
        assert all(p.streamed_bytes > 0 for p in model.plan)
        check(model, hf_model("llama"), 8, seed=1)
        assert all(s["peak_weight_bytes"] <= small for s in model.stats())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_streaming_stages_read_each_unit_once_a_step_for_every_micro_batch(arch, tiny_dir, hf_model):
    path = tiny_dir(arch)
    store = LayerStore(split(path, progress=False))
    small = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    reads = {}
    for schedule in ("on", "auto"):  # on a CPU, auto runs each micro-batch by itself (no rates measured)
        with AutoModel.from_pretrained(path, stages=2, micro_batches=2, memory_per_stage=small, progress=False,
                                       block_schedule=schedule) as model:
            assert all(p.streamed_bytes > 0 for p in model.plan) and model.pipeline.micro_batches(8) == 2
            assert all(p.blocks == (schedule == "on") for p in model.plan)
            before = [s["stream_reads"] for s in model.stats()]
            ids, _ = prompts(1)
            model.generate(ids, max_new_tokens=NEW, do_sample=False)  # one micro-batch: a block of one a step
            one = [s["stream_reads"] - r for s, r in zip(model.stats(), before)]
            if schedule == "on":  # two micro-batches, logits to the driver, then picked tokens fed back
                check(model, hf_model(arch), 8)
            before = [s["stream_reads"] for s in model.stats()]
            ids, mask = prompts(8, seed=2)
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
            reads[schedule] = one, [s["stream_reads"] - r for s, r in zip(model.stats(), before)]
    # in blocks each step of the two micro-batches read every streamed unit once, as one micro-batch's did
    one, two = reads["on"]
    assert all(n > 0 for n in one) and two == one, reads
    one, two = reads["auto"]
    assert two == [2 * n for n in one], reads  # each micro-batch by itself: twice


def test_smollm_two_stages_matches_transformers(smollm_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    with AutoModel.from_pretrained(smollm_dir, stages=2, progress=False) as model:
        tok = model.tokenizer
        qs = ["What is the capital of France?", "Name a primary colour.", "What is 2+2?", "Say hello.",
              "Who wrote Hamlet?", "What is ice?", "Name a planet.", "What colour is the sky?"]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in qs]
        for batch in (1, 8):
            enc = tok(texts[:batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                ref = hf.generate(**enc, max_new_tokens=12, do_sample=False)
            out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12)
            assert out.tolist() == ref.tolist()
        answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer


DRIVER = textwrap.dedent("""
    import json, sys
    from distlayer import AutoModel
    from conftest import prompts
    path, address = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(path, stages=2, address=address, progress=False,
                                      stage_resources=[{"node_a": 1}, {"node_b": 1}], placement="spread")
    ids, mask = prompts(4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=%d, do_sample=False)
    print("RESULT " + json.dumps({"plan": [p.as_dict() for p in model.plan], "sequences": out.tolist(),
                                  "micro_batches": model.pipeline.micro_batches(4),
                                  "transport": model.pipeline.transport.name,
                                  "measured": model.survey.as_dicts(), "note": model.pipeline.balance_note,
                                  "predicted_s": model.prediction.step_s}))
    model.close()
""" % NEW)


def test_two_ray_nodes_one_stage_each(tiny_dir, hf_model, tmp_path):
    from ray_nodes import RayNodes

    path = tiny_dir("qwen2")
    split(path, progress=False)  # both nodes share this disk, so both find the store
    nodes = RayNodes([{"node_a": 1}, {"node_b": 1}])
    try:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        env = {**nodes.env, "PYTHONPATH": str(tmp_path.parent) + ":" + ":".join(sys.path)}
        run = subprocess.run([sys.executable, str(script), str(path), nodes.address], env=env, capture_output=True,
                             text=True, timeout=400, cwd=str(__import__("pathlib").Path(__file__).parent))
    finally:
        nodes.stop()
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, run.stdout + run.stderr
    got = json.loads(line[0][len("RESULT "):])
    node_ids = [p["node_id"] for p in got["plan"]]
    assert len(set(node_ids)) == 2 and all(node_ids)
    # stages on separate nodes work at once, in two micro-batches, unless placement by speed
    # predicts one faster (each micro-batch reads every weight again) and says so
    assert got["micro_batches"] == (1 if "in 1 micro-batch rather than 2" in got["note"] else 2), got["note"]
    assert got["transport"] == "tcp"  # between nodes the channel runs over TCP
    # on two nodes, balance="auto" measures them (each once, in its own stage) and the link between
    measured = got["measured"]
    assert [m["measured_by"] for m in measured] == [0, 1] and got["predicted_s"] > 0
    assert measured[0]["link"]["link_bw"] > 0 and measured[0]["link"]["link_latency_s"] > 0
    assert measured[1]["link"] is None and all(m["rates"]["flops"] > 0 for m in measured)
    assert got["note"].startswith(("by speed", "by bytes: placing by speed")), got["note"]
    ids, mask = prompts(4)
    assert got["sequences"] == reference(hf_model("qwen2"), ids, mask).sequences.tolist()


def test_dead_stage_gives_a_clear_error(tiny_dir):
    import os
    import signal

    from distlayer import StageError

    # max_restarts=0: a lost stage is not replaced (tests/test_recovery.py: when it is)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, max_restarts=0, progress=False) as model:
        ids, mask = prompts(2)
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
        os.kill(model.plan[1].pid, signal.SIGKILL)
        with pytest.raises(StageError, match="stage 1 on .* died .*load it again"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
    # the first stage: the next stage learns it from its closed channel
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, max_restarts=0, progress=False) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
        os.kill(model.plan[0].pid, signal.SIGKILL)
        with pytest.raises(StageError, match="stage 0 on .* died .*load it again"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
