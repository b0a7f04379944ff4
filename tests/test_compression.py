"""Compressed shards (``compression="8bit"`` / ``"4bit"``): the quantizer's error per
block, what a compressed store holds and how many bytes, loading and generating from it,
the errors for a store of the wrong compression or a damaged compressed shard, the
planner's bytes, and on the real model perplexity and the answer to a question."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, prompts, save_tokenizer
import test_cuda
from test_store import flip_bytes
from distlayer import AutoModel, LayerStore, StoreError, quant, split
from distlayer.cli import main as cli_main
from distlayer.planner import ModelShape, Site, plan_pipeline
from tiny_models import make_tiny

TEXT = Path(__file__).parent / "data" / "alice_ch1.txt"
stand_in_cuda = test_cuda.stand_in_cuda  # a fixture: the GPU path on the CPU, with stand-ins for CUDA
# Shards of decoder layers against the same layers in float16 (the targets).
MAX_LAYER_RATIO = {"8bit": 0.55, "4bit": 0.30}


def layer_ratio(store: LayerStore) -> float:
    """Bytes of the decoder layers' shards over the same tensors in float16."""
    layers = [u for u in store.units if u.startswith("layer.")]
    return sum(store.units[u]["bytes"] for u in layers) / sum(store.unit_bytes(u, torch.float16) for u in layers)


def blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` flattened and zero-padded to rows of ``size`` values, as the quantizer cuts it."""
    flat = t.reshape(-1).float()
    return torch.cat([flat, flat.new_zeros(-flat.numel() % size)]).view(-1, size)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    path = make_tiny("llama", tmp_path_factory.mktemp("quant") / "llama")
    save_tokenizer(path)
    return path


# --------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("shape", [(96, 64), (7, 33), (3, 4, 40), (5, 300)])
def test_int8_round_trip_within_half_a_step_per_block(shape):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    back = quant.dequantize(quant.quantize(t, "int8"), "int8", t.shape, torch.float32)
    x, err = blocks(t, quant.INT8_BLOCK), blocks(back - t, quant.INT8_BLOCK)
    step = x.abs().amax(1) / 127  # stored as float16 rounded up: within 2**-10, or 2**-24 where subnormal
    assert (err.abs().amax(1) <= (step * (1 + 2**-10) + 2**-24) / 2).all()


@pytest.mark.parametrize("shape", [(96, 64), (7, 33), (3, 4, 40), (5, 300)])
def test_int4_round_trip_within_half_a_step_per_block(shape):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(shape, generator=g) + torch.linspace(-3, 5, math.prod(shape)).view(shape)  # off-centre blocks
    back = quant.dequantize(quant.quantize(t, "int4"), "int4", t.shape, torch.float32)
    per_super = quant.INT4_BLOCK * quant.INT4_SUPER
    x = blocks(t, per_super).view(-1, quant.INT4_SUPER, quant.INT4_BLOCK)
    err = blocks(back - t, per_super).view(-1, quant.INT4_SUPER, quant.INT4_BLOCK).abs().amax(2)
    lo, hi = x.amin(2), x.amax(2)
    # a block's step is its range / 15, widened by the rounding of its low and step to one byte each
    low_unit = lo.abs().amax(1, keepdim=True) / 127 * 1.01
    step_unit = ((hi - lo + low_unit) / 15).amax(1, keepdim=True) / 255 * 1.01
    bound = ((hi - lo + low_unit) / 15 + step_unit) / 2
    assert (err <= bound + 1e-6).all()
    assert err.mean() < ((hi - lo) / 15).mean()  # and most blocks much better than the bound


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_zeros_and_constant_blocks_decode_exactly(scheme):
    t = torch.zeros(4, 512)
    t[1] = 127 / 512  # a scale float16 holds exactly
    back = quant.dequantize(quant.quantize(t, scheme), scheme, t.shape, torch.float32)
    torch.testing.assert_close(back, t, rtol=0, atol=1e-3 if scheme == "int4" else 0)


def test_decodes_into_half_precision_and_refuses_non_finite():
    t = torch.randn(64, 64)
    for scheme in ("int8", "int4"):
        parts = quant.quantize(t, scheme)
        torch.testing.assert_close(quant.dequantize(parts, scheme, t.shape, torch.bfloat16),
                                   quant.dequantize(parts, scheme, t.shape, torch.float32).bfloat16())
    t[3, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        quant.quantize(t, "int8")
    with pytest.raises(ValueError, match="beyond float16's range"):
        quant.quantize(torch.full((2, 64), 1e8), "int8")


def test_which_tensors_are_compressed():
    w, norm = torch.zeros(8, 64), torch.zeros(64)
    assert quant.scheme_for("4bit", "layer.0", w) == "int4"
    assert quant.scheme_for("8bit", "layer.0", w) == "int8"
    assert quant.scheme_for("4bit", "head", w) == "int8"  # the head keeps 8 bits
    assert quant.scheme_for("4bit", "embed", w) is None
    assert quant.scheme_for("4bit", "layer.0", norm) is None


# --------------------------------------------------------------------------- stores


@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_split_writes_a_store_of_its_own_with_layouts_and_fewer_bytes(tiny_src, compression):
    plain = LayerStore(split(tiny_src, progress=False))
    store = LayerStore(split(tiny_src, compression=compression, progress=False))
    assert store.path.name == f"distlayer-shards-{compression}" and store.path != plain.path
    assert store.compression == compression and plain.compression is None
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["compression"] == compression
    layer = store.units["layer.0"]["tensors"]
    assert layer.keys() == plain.units["layer.0"]["tensors"].keys()
    lay = layer["model.layers.0.self_attn.q_proj.weight"]["compressed"]
    assert lay["scheme"] == ("int4" if compression == "4bit" else "int8") and lay["block"] in (32, 64)
    assert {"q", "scale"} <= set(lay["parts"]) and all("offset" in p for p in lay["parts"].values())
    assert "compressed" not in layer["model.layers.0.input_layernorm.weight"]
    assert all("compressed" not in t for t in store.units["embed"]["tensors"].values())
    assert layer_ratio(store) <= MAX_LAYER_RATIO[compression]
    for unit in store.units:  # what a unit decodes to, and its bytes in memory, are the uncompressed unit's
        assert store.unit_bytes(unit) == plain.unit_bytes(unit)
        assert store.read_bytes(unit) == store.units[unit]["bytes"]
        got, want = store.load(unit), plain.load(unit)
        assert {k: (t.dtype, t.shape) for k, t in got.items()} == {k: (t.dtype, t.shape) for k, t in want.items()}
    torch.testing.assert_close(store.load("embed"), plain.load("embed"), rtol=0, atol=0)
    torch.testing.assert_close(store.load("norm"), plain.load("norm"), rtol=0, atol=0)


def test_read_into_decodes_like_load(tiny_src):
    store = LayerStore(split(tiny_src, compression="4bit", progress=False))
    for dtype in (torch.float32, torch.float16):
        buf = torch.empty(store.packed_bytes("layer.1", dtype), dtype=torch.uint8)
        got = store.read_into("layer.1", dtype, buf)
        want = store.load("layer.1", dtype)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].data_ptr() >= buf.data_ptr()
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("compression, arch", [("8bit", "llama"), *(("4bit", a) for a in ARCHS)])
def test_generate_resident_and_streamed_agree(tiny_src, tiny_dir, tmp_path, compression, arch):
    src = tiny_src if arch == "llama" else shutil.copytree(tiny_dir(arch), tmp_path / arch)
    ids, mask = prompts(2)
    kw = dict(compression=compression, stages=0, progress=False)
    with AutoModel.from_pretrained(src, **kw) as model:
        resident = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()
    store = LayerStore(split(src, compression=compression, progress=False))
    budget = int(1.5 * max(store.unit_bytes(u) for u in store.units))
    with AutoModel.from_pretrained(src, memory_per_stage=budget, **kw) as model:
        streamed = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()
        stats = model.stats()[0]
    assert streamed == resident
    # a step reads each streamed unit's compressed shard, and one row of the embeddings (kept as they are)
    row = store.read_bytes("embed") // store.config.vocab_size
    assert stats["streamed_units"] and stats["streamed_bytes"] == sum(
        row if u == "embed" else store.read_bytes(u) for u in stats["streamed_units"])
    assert stats["peak_weight_bytes"] <= budget


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resident_and_streamed_agree(tiny_src):
    """On a GPU, streamed units are decoded into the pinned staging buffer (read_into)."""
    store = LayerStore(split(tiny_src, compression="4bit", progress=False))
    ids, mask = prompts(2)
    budget = int(1.5 * max(store.unit_bytes(u) for u in store.units)) + 2**18  # and KV, activations for 32 tokens
    runs = []
    for kw in ({}, {"memory_per_stage": budget}):
        with AutoModel.from_pretrained(tiny_src, compression="4bit", stages=0, device="cuda", context=32,
                                       host_memory_per_node=0, progress=False, **kw) as model:  # read each step
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist())
            streams = bool(model.plan[0].streamed_units)
    assert streams and runs[0] == runs[1]


def test_cuda_memory_decodes_into_its_staging_buffers(stand_in_cuda, tiny_src):
    """The GPU path's bookkeeping on the CPU (``test_cuda.stand_in_cuda``): streamed units
    of a compressed store are decoded into the staging buffers and streamed through the arena."""
    store = LayerStore(split(tiny_src, compression="4bit", progress=False))
    ids, mask = prompts(2)
    with AutoModel.from_pretrained(tiny_src, compression="4bit", stages=0, progress=False) as model:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()
    weights = int(1.5 * max(store.packed_bytes(u) for u in store.units))
    with AutoModel.from_pretrained(tiny_src, compression="4bit", stages=0, memory_per_stage=weights, device="cpu",
                                   progress=False) as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False).tolist()
        stats = model.stats()[0]
    assert got == want
    assert stats["streamed_units"] and stats["h2d_bytes"] > 0


def test_split_verb_and_generate_verb(tiny_src, tmp_path, capsys):
    out = tmp_path / "s4"
    assert cli_main(["split", str(tiny_src), "--out", str(out), "--compression", "4bit"]) in (0, None)
    assert LayerStore(out).compression == "4bit"
    capsys.readouterr()
    code = cli_main(["generate", str(out), "w005 w009", "--compression", "4bit", "--stages", "0",
                     "--max-new-tokens", "3"])
    assert code in (0, None)
    assert capsys.readouterr().out.strip()


def test_job_file_compression(tiny_src, tmp_path):
    from distlayer import run_job

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "w005 w009 w033"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tiny_src}\ninput: {tmp_path / 'in.jsonl'}\noutput: {tmp_path / 'out.jsonl'}\n"
                   "pipeline: {stages: 0, compression: 8bit}\ngeneration: {max_new_tokens: 3}\n")
    run_job(job, progress=False)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["id"] == "a" and "error" not in row
    assert (tiny_src / "distlayer-shards-8bit" / "manifest.json").is_file()


def test_wrong_compression_is_refused_with_what_to_change(tiny_src, tmp_path):
    out = split(tiny_src, out=tmp_path / "s8", compression="8bit", progress=False)
    with pytest.raises(StoreError) as e:
        AutoModel.from_pretrained(out, compression="4bit", stages=0, progress=False)
    msg = str(e.value)
    assert "holds 8bit shards" in msg and "compression='8bit'" in msg and "--compression 4bit --force" in msg
    with pytest.raises(StoreError, match="compression='8bit'"):  # no compression asked: also refused
        AutoModel.from_pretrained(out, stages=0, progress=False)
    with pytest.raises(StoreError, match=r"holds 8bit shards of .*, not 4bit ones.*--compression 4bit --force"):
        split(tiny_src, out=out, compression="4bit", progress=False)
    with pytest.raises(StoreError, match="holds uncompressed shards"):
        AutoModel.from_pretrained(split(tiny_src, progress=False), compression="8bit", stages=0, progress=False)
    again = split(tiny_src, out=out, compression="4bit", progress=False, force=True)
    assert LayerStore(again).compression == "4bit"


def test_corrupt_compressed_shard_is_named(tiny_src, tmp_path):
    out = split(tiny_src, out=tmp_path / "s4", compression="4bit", progress=False)
    flip_bytes(out / "layer.2.safetensors")
    with pytest.raises(StoreError) as e:
        LayerStore(out).load("layer.2")
    msg = str(e.value)
    assert "layer.2.safetensors" in msg and "sha256" in msg and "distlayer split" in msg and "--out" in msg
    split(tiny_src, out=out, compression="4bit", progress=False, verify=True)  # the advised repair
    LayerStore(out).load("layer.2")


def test_layout_that_does_not_fit_its_shard_is_named(tiny_src, tmp_path):
    out = Path(shutil.copytree(split(tiny_src, compression="8bit", progress=False), tmp_path / "s8"))
    mf = out / "manifest.json"
    manifest = json.loads(mf.read_text())
    unit = next(u for u in manifest["units"] if u["name"] == "layer.1")
    part = unit["tensors"]["model.layers.1.mlp.up_proj.weight"]["compressed"]["parts"]["scale"]
    part["offset"] += 10**6
    mf.write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as e:
        LayerStore(out).load("layer.1")
    msg = str(e.value)
    assert "layer.1.safetensors" in msg and "up_proj" in msg and "distlayer split" in msg


# --------------------------------------------------------------------------- planning


def test_planner_balances_bytes_read_but_holds_decoded_bytes():
    # eight layers of 10 bytes in memory; the first four read 1 byte each, the rest 10
    shape = ModelShape((10,) * 8, embed=0, norm=0, head=0, read_bytes=(0, 1, 1, 1, 1, 10, 10, 10, 10, 0, 0))
    sites = [Site("n", "ip", 10**9, 2)] * 2
    plan = plan_pipeline(shape, sites, [20, 20], "cpu", (1, [1, 1]))
    assert [(p.start, p.end) for p in plan.stages] == [(0, 6), (6, 8)]
    assert [p.streamed_bytes for p in plan.stages] == [24, 0]  # the second holds its 20 bytes resident
    plain = plan_pipeline(ModelShape((10,) * 8, 0, 0, 0), sites, [20, 20], "cpu", (1, [1, 1]))
    assert [(p.start, p.end) for p in plain.stages] == [(0, 4), (4, 8)]
    # what stays resident is counted decoded: 80 bytes of layers fit 80, not the 44 read
    whole = plan_pipeline(shape, sites[:1], [79], "cpu", (1, [1]))
    assert whole.stages[0].streamed_units and whole.stages[0].resident_bytes + 20 <= 79


# --------------------------------------------------------------------------- sizes on the tiny and real models


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["8bit", "4bit"])
def test_smollm_layer_shards_within_target(smollm_dir, compression):
    store = LayerStore(split(smollm_dir, compression=compression, progress=False))
    assert layer_ratio(store) <= MAX_LAYER_RATIO[compression]


def perplexity(store: LayerStore, ids: torch.Tensor) -> float:
    """Perplexity of ``ids`` under the model of ``store``, run by one LayerRunner with
    every unit resident (its weights decoded by the store as a stage loads them)."""
    from distlayer.planner import StagePlan
    from distlayer.runner import LayerRunner

    plan = StagePlan(0, 0, store.num_layers, True, "cpu", resident_units=list(store.units))
    runner = LayerRunner(store, plan, "cpu", torch.float32, prefetch=False)
    try:
        logits = runner.forward(ids, None, torch.arange(ids.shape[1])[None], logits_to_keep=0)
    finally:
        runner.close()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(loss.item())


@pytest.mark.slow
def test_smollm_perplexity_and_answer(smollm_dir, smollm_store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    ids = tok(TEXT.read_text(), return_tensors="pt")["input_ids"]
    assert 2000 < ids.shape[1] < 4096
    base = perplexity(LayerStore(smollm_store), ids)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    for compression, within in (("8bit", 0.01), ("4bit", 0.10)):
        store = LayerStore(split(smollm_dir, compression=compression, progress=False))
        ppl = perplexity(store, ids)
        assert ppl <= base * (1 + within), (compression, ppl, base)
        with AutoModel.from_pretrained(smollm_dir, compression=compression, stages=0, progress=False) as model:
            out = model.generate(chat, max_new_tokens=12, do_sample=False)
        answer = tok.decode(out[0, chat.shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, (compression, answer)
