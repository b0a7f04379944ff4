"""``distlayer bench`` end to end on a tiny synthetic Llama (7M parameters: 4 layers of
hidden size 128 and SmolLM2's 49152-token vocabulary), its flags refused with a message
that says what to write, and the parts of ``distlayer.bench`` the scripts in
``benchmarks/`` share: the timing loop and the random-Llama writer."""

from __future__ import annotations

import json
import time

import pytest

from distlayer.bench.measure import (best_and_median, per_second, read_all, speedup, store_files, take_turns,
                                     timed_run, wall_time)
from distlayer.bench.synthetic import (count_params, llama_shape, parse_size, shape_for, tensor_shapes,
                                       write_random_llama)
from distlayer.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("ray_per_module")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON = ["--synthetic", "7M", "--batches", "1", "--new", "4", "--repeat", "1"]


def bench(tmp_path, *flags) -> tuple[dict, str]:
    """Run the verb through ``distlayer.cli.main``; its JSON and markdown."""
    out = tmp_path / "out"
    assert main(["bench", *COMMON, "--out", str(out), *flags]) == 0
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def rows_by(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["label"], r["mode"]): r for r in result["rows"]}


def test_bench_in_process_against_transformers_and_accelerate(tmp_path):
    result, md = bench(tmp_path, "--systems", "transformers", "accelerate", "distlayer", "--stages", "0",
                       "--budgets", "resident", "0.5", "0.001")
    rows = rows_by(result)
    expected = [("transformers in memory", "warm"), ("transformers in memory", "cold"),
                ("distlayer, in-process, resident", "warm"), ("distlayer, in-process, 50%", "warm"),
                ("distlayer, in-process, 50%", "cold"), ("accelerate disk offload, 50%", "warm"),
                ("accelerate disk offload, 50%", "cold"), ("accelerate disk offload, 0.1%", "warm"),
                ("accelerate disk offload, 0.1%", "cold")]
    assert sorted(rows) == sorted(expected)
    for key in expected:
        r = rows[key]
        assert r["decode_tok_s"] > 0 and r["tok_s"] > 0 and r["ttft_ms"] > 0, r
        assert r["vs_transformers"] > 0
        assert f"| {r['label']} | 1 | {r['mode']} |" in md
    streaming = rows[("distlayer, in-process, 50%", "cold")]
    plan = streaming["plan"][0]
    assert streaming["bytes_per_step"] == plan["streamed_bytes"] > 0 and plan["streamed_units"]
    assert streaming["floor_ms"] > 0 and streaming["roofline_fraction"] > 0
    measured = result["bandwidth"]["store"]["cold"]
    assert len(measured) == 2   # before the runs and after them
    assert streaming["read_bytes_per_s"] == round(max(m["bytes_per_s"] for m in measured))
    assert streaming["floor_ms"] == pytest.approx(1e3 * streaming["bytes_per_step"] / streaming["read_bytes_per_s"],
                                                  rel=1e-3)
    assert streaming["roofline_fraction"] == pytest.approx(streaming["floor_ms"] / streaming["step_ms"], rel=1e-2)
    assert streaming["drop_excluded"] is True and streaming["drop_ms_per_step"] > 0
    assert streaming["stages_stats"][0]["peak_weight_bytes"] <= streaming["budget_bytes"]
    assert rows[("accelerate disk offload, 50%", "cold")]["bytes_per_step"] > 0
    assert "bytes_per_step" in rows[("distlayer, in-process, resident", "warm")]
    assert "roofline_fraction" not in rows[("distlayer, in-process, resident", "warm")]
    # cold: one configuration per set of files in a group; resident ones run warm only
    assert [g["mode"] for g in result["groups"]] == ["warm", "cold", "cold"]
    assert sorted(result["groups"][1]["configurations"]) == ["accelerate disk offload, 50%",
                                                             "distlayer, in-process, 50%"]
    assert result["groups"][2]["configurations"] == ["accelerate disk offload, 0.1%"]
    (skipped,) = result["skipped"]
    assert skipped["label"] == "distlayer, in-process, 0.1%" and "budget" in skipped["reason"]
    assert "distlayer, in-process, 0.1%" in md.split("Skipped:")[1]
    assert result["model"]["layers"] == 4 and result["model"]["vocab_size"] == 49152
    assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"]
    for mode in ("warm", "cold"):
        assert result["bandwidth"]["store"][mode][0]["bytes_per_s"] > 0


@pytest.mark.slow
def test_bench_one_ray_stage_streaming_cold(tmp_path):
    result, md = bench(tmp_path, "--systems", "transformers", "distlayer", "--stages", "1", "--budgets", "0.5",
                       "--modes", "cold")
    r = rows_by(result)[("distlayer, 1 Ray stage, 50%", "cold")]
    assert r["decode_tok_s"] > 0 and r["vs_transformers"] > 0 and r["roofline_fraction"] > 0
    (stage,) = r["stages_stats"]
    assert stage["peak_rss_bytes"] > stage["peak_weight_bytes"] > 0
    assert r["stage_ms_per_token"]["compute_s"] > 0 and r["drop_excluded"] is False
    assert not any("this process" in n for n in r["notes"])   # a Ray stage's RSS is its own
    assert "| distlayer, 1 Ray stage, 50% | 1 | cold |" in md


@pytest.mark.parametrize("flags, says", [
    (["--budgets", "0.0"], "write a share of the model's weights per stage above 0 and at most 1"),
    (["--budgets", "half"], "such as 0.25, or 'resident'"),
    (["--systems", "x"], "choose from 'transformers', 'accelerate', 'airllm', 'distlayer'"),
    (["--new", "1"], "write 2 or more"),
    (["--model", "default", "--synthetic", "7M"], "not allowed with argument"),
])
def test_bad_flag_exits_2_saying_what_to_write(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *flags])   # parsing only: a flag taken by mistake runs nothing
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_bad_synthetic_size_is_an_error_saying_what_to_write(capsys):
    short = ["--systems", "transformers", "--modes", "warm", "--batches", "1", "--new", "2", "--repeat", "1"]
    assert main(["bench", "--synthetic", "lots", *short]) == 2
    assert "write a parameter count such as 1B, 50M or 7M" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "100K", *short]) == 2
    assert "write 7M or more" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["7M", "50M", "135M", "1B", "8B"])
def test_synthetic_shape_is_about_the_size_asked(size):
    n = parse_size(size)
    shape = shape_for(n)
    assert abs(count_params(shape) - n) / n < 0.1, shape
    assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0


def test_runs_take_turns_after_one_warm_up_each():
    calls, rounds = [], []
    fns = {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)}
    got = take_turns(fns, 2, after_round=rounds.append)
    assert calls == ["a", "b", "a", "b", "a", "b"] and rounds == [0, 1]
    assert got == {"a": [3, 5], "b": [4, 6]}   # the warm-up's results are not kept
    calls.clear()
    assert take_turns(fns, 1, warmup=False) == {"a": [1], "b": [2]}


def test_best_run_and_median_speeds_and_speedups():
    assert best_and_median([3.0, 1.0, 2.0]) == (1.0, 2.0)
    assert per_second(12, [3.0, 1.0, 2.0]) == (12.0, 6.0)
    # the same work in a third of the base's best time and half its median
    assert speedup([1.0, 3.0, 2.0], [3.0, 4.0, 5.0]) == (3.0, 2.0)
    assert wall_time(lambda: time.sleep(0.01)) >= 0.01


def test_a_cold_run_drops_the_store_files_before_the_run_and_at_every_token(tmp_path):
    for name in ("layer.1.safetensors", "embed.safetensors", "manifest.json"):
        (tmp_path / name).write_bytes(b"\0" * 2**20)
    files = store_files(tmp_path)
    assert files == [tmp_path / "embed.safetensors", tmp_path / "layer.1.safetensors"]

    def generate(streamer):   # the prompt, then 3 tokens, each read from the files
        for _ in range(4):
            read_all(files, bytearray(2**16))
            streamer.put(None)

    warm, cold = timed_run(generate, 3), timed_run(generate, 3, files)
    assert warm.tokens == cold.tokens == 3 and warm.drop_s == 0 < cold.drop_s
    assert cold.total_s >= cold.ttft_s > 0 and cold.step_s > 0
    excluded = timed_run(generate, 3, files, exclude_drops=True)
    assert excluded.drop_s > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_random_llama_of_any_dtype_loads_in_transformers_and_runs_in_distlayer(tmp_path, dtype):
    """What benchmarks/bench_gpu.py writes: an untied head, no end-of-sequence token."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from distlayer import AutoModel

    shape = llama_shape(128, 2)
    assert shape["num_attention_heads"] == 2 and shape["num_hidden_layers"] == 2
    path = write_random_llama(tmp_path / "llama", shape, vocab=256, dtype=dtype, tied=False,
                              token_ids={"bos_token_id": 1, "pad_token_id": 0})
    with safe_open(path / "model.safetensors", "pt") as f:
        assert list(f.keys()) == sorted(tensor_shapes(shape, 256, tied=False))
        head = f.get_tensor("lm_head.weight")
        assert head.dtype == getattr(torch, dtype) and list(head.shape) == [256, 128]
        assert 0.015 < head.float().std() < 0.025
        assert f.get_tensor("model.norm.weight").eq(1).all()
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == dtype and config["eos_token_id"] is None and not config["tie_word_embeddings"]
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(hf.lm_head.weight, head) and not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 9, 42]])
    with AutoModel.from_pretrained(str(path), stages=0, progress=False) as dl:
        out = dl.generate(ids, max_new_tokens=5)
    assert out.shape == (1, 4 + 5)   # no end of sequence: every token asked for
