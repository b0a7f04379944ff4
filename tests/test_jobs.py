"""Batch jobs on a tiny random model: results, bad records, resume, repair, SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import word_token
from distlayer import AutoModel, jobs
from distlayer.errors import ConfigError
from distlayer.jobs import run_job

MAX_NEW = 8


def text_of(ids) -> str:
    return " ".join(word_token(i) for i in ids)


def sample_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts of 2..13 word tokens (ids avoid pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 2 + (i * 5) % 12
        out.append({"id": f"p{i}", "prompt": text_of(torch.randint(3, 320, (length,), generator=g).tolist())})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(rows) -> dict:
    return {r["id"]: r for r in rows}


@pytest.fixture
def make_job(tmp_path, tiny_dir):
    """``make_job(rows, **overrides)`` -> job dict over the tiny llama, in-process stages."""

    def make(rows, name="job", **over):
        inp = write_jsonl(tmp_path / f"{name}.in.jsonl", rows)
        job = {"model": str(tiny_dir("llama")), "input": str(inp), "output": str(tmp_path / f"{name}.out.jsonl"),
               "batch_size": 3, "pipeline": {"stages": 0}, "generation": {"max_new_tokens": MAX_NEW}}
        for k, v in over.items():
            job[k] = {**job[k], **v} if isinstance(v, dict) else v
        return job

    return make


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the job loads a model."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(jobs, "_load_model", boom)


def test_job_matches_generate_per_prompt(make_job, tiny_dir):
    rows = sample_prompts(10)
    job = make_job(rows)
    s = run_job(job, progress=False)
    assert (s.total, s.completed, s.errors, s.skipped) == (10, 10, 0, 0)
    out = read_out(Path(job["output"]))
    assert [r["id"] for r in out] != [r["id"] for r in rows]    # grouped by length, not input order
    got = by_id(out)
    assert set(got) == {r["id"] for r in rows}
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=0, progress=False) as model:
        for row in rows:
            ids = model.tokenizer(row["prompt"], return_tensors="pt").input_ids
            ref = model.generate(ids, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
            n = ref.completion_tokens[0]
            rec = got[row["id"]]
            assert rec["text"] == model.tokenizer.decode(ref.sequences[0, ids.shape[1]:ids.shape[1] + n],
                                                         skip_special_tokens=True)
            assert rec["prompt_tokens"] == ids.shape[1] and rec["completion_tokens"] == n
            assert rec["finish_reason"] == ref.finish_reasons[0] and rec["seconds"] >= 0
    assert s.completion_tokens == sum(r["completion_tokens"] for r in out)


def test_duplicate_ids_rejected_before_any_work(make_job, no_model):
    rows = sample_prompts(4) + [{"id": "p1", "prompt": "w010"}, {"id": "p2", "prompt": "w011"}]
    job = make_job(rows)
    with pytest.raises(ConfigError, match=r'duplicate ids .*id "p1" on lines 2, 5; id "p2" on lines 3, 6'):
        run_job(job, progress=False)
    assert not Path(job["output"]).exists()


def test_bad_records_get_error_records_and_job_goes_on(make_job, tmp_path):
    good = sample_prompts(3)
    rows = [good[0], {"prompt": "w010 w011"}, {"id": "empty", "prompt": "  "}, good[1],
            {"id": "long", "prompt": text_of([5] * 300)}, {"id": "long+new", "prompt": text_of([5] * 250)}, "{not json", {"id": "both", "prompt": "w1", "messages": []},
            {"id": "nomsg", "messages": []}, {"id": 7, "messages": [{"role": "user", "content": "w010"}]}, good[2]]
    job = make_job(rows)
    inp = Path(job["input"])
    inp.write_bytes(inp.read_bytes() + b'{"id": "latin", "prompt": "caf\xe9"}\n')   # not UTF-8
    s = run_job(job, progress=False)
    out = read_out(Path(job["output"]))
    assert s.completed == 3 and s.errors == 9 and len(out) == 12
    got = by_id(r for r in out if r["id"] is not None)
    assert all("text" in got[g["id"]] for g in good)
    assert "empty prompt" in got["empty"]["error"]
    assert "prompt is 300 tokens" in got["long"]["error"] and "context of 256 tokens" in got["long"]["error"]
    # the prompt fits, but not with the new tokens after it (250 + 8 > 256)
    assert "prompt is 250 tokens and generation.max_new_tokens is 8, 258 in all" in got["long+new"]["error"]
    assert "lower generation.max_new_tokens" in got["long+new"]["error"]
    assert "exactly one of" in got["both"]["error"]
    assert "non-empty list" in got["nomsg"]["error"]
    assert "no chat template" in got[7]["error"]                 # the tiny tokenizer has none
    assert "not valid UTF-8" in got["latin"]["error"]
    anonymous = sorted((r["line"], r["error"]) for r in out if r["id"] is None)
    assert anonymous[0][0] == 2 and "missing id" in anonymous[0][1]
    assert anonymous[1][0] == 7 and "not valid JSON" in anonymous[1][1]
    # A rerun has nothing left to do: error records count as done, and no model is loaded.
    s2 = run_job(job, progress=False)
    assert (s2.completed, s2.errors, s2.skipped) == (0, 0, 12) and len(read_out(Path(job["output"]))) == 12


def test_messages_use_the_chat_template(make_job, tiny_dir, tmp_path):
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_dir("llama"), model_dir, ignore=shutil.ignore_patterns("distlayer-shards"))
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}w011 {{ m['content'] }} w012 {% endfor %}w013"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"id": "m", "messages": [{"role": "user", "content": "w050 w060"}]}]
    out_msgs = run_job(make_job(msgs, name="msgs", model=str(model_dir)), progress=False)
    out_tmpl = run_job(make_job([{"id": "m", "prompt": "w050 w060"}], name="tmpl", model=str(model_dir),
                                generation={"chat_template": True}), progress=False)
    a, b = read_out(Path(out_msgs.output))[0], read_out(Path(out_tmpl.output))[0]
    assert a["prompt_tokens"] == 5 and a["text"] == b["text"]


def test_resume_skips_done_ids(make_job, monkeypatch):
    monkeypatch.setattr(jobs, "SEGMENT_BATCHES", 1)  # segments of one batch of 3, one after another
    rows = sample_prompts(9)
    job = make_job(rows)
    run_job(job, progress=False)
    out_path = Path(job["output"])
    full = read_out(out_path)
    # Keep the first 4 results (one whole batch of 3, plus one row of the next batch).
    out_path.write_text("".join(json.dumps(r) + "\n" for r in full[:4]))
    ran = []
    real = jobs.run_segment
    monkeypatch.setattr(jobs, "run_segment", lambda sc, seg, g: ran.append([r.id for r in seg]) or real(sc, seg, g))
    s = run_job(job, progress=False)
    assert (s.skipped, s.completed) == (4, 5)
    assert len(ran) == 2 and len(ran[0]) == 3  # the first segment is skipped; the partial one runs again whole
    after = read_out(out_path)
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in rows)
    assert {k: v["text"] for k, v in by_id(after).items()} == {k: v["text"] for k, v in by_id(full).items()}


def test_half_written_last_line_is_repaired(make_job, capsys):
    rows = sample_prompts(6)
    job = make_job(rows)
    run_job(job, progress=False)
    out_path = Path(job["output"])
    full = read_out(out_path)
    data = out_path.read_bytes()
    out_path.write_bytes(data[:len(data) - 15])                 # killed in the middle of the last line
    s = run_job(job, progress="log")
    assert s.repaired and (s.skipped, s.completed) == (5, 1)
    assert "removed a half-written last line" in capsys.readouterr().err
    after = read_out(out_path)                                   # every line parses
    assert len(after) == 6 and by_id(after) == {k: {**v, "seconds": by_id(after)[k]["seconds"]}
                                                for k, v in by_id(full).items()}


def test_damaged_middle_line_is_named(make_job, no_model):
    job = make_job(sample_prompts(2))
    write_jsonl(Path(job["output"]), ['{"id": "p0", "text": "x"}', "garbage", '{"id": "p1", "text": "y"}'])
    with pytest.raises(ConfigError, match="line 2 is not a JSON record"):
        run_job(job, progress=False)


def test_unwritable_output_fails_before_model_load(make_job, tmp_path, no_model):
    (tmp_path / "afile").write_text("x")
    job = make_job(sample_prompts(2), output=str(tmp_path / "afile" / "out.jsonl"))
    with pytest.raises(ConfigError, match="output .*afile/out.jsonl cannot be written"):
        run_job(job, progress=False)
    job = make_job(sample_prompts(2), output=str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        run_job(job, progress=False)


def test_missing_input_is_named(make_job, tmp_path, no_model):
    job = make_job(sample_prompts(1), input=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="input .*nope.jsonl does not exist"):
        run_job(job, progress=False)


def test_stop_strings_cut_the_text(make_job):
    job = make_job([{"id": "a", "prompt": "w100 w200 w300"}], name="free", generation={"max_new_tokens": 12})
    free = read_out(Path(run_job(job, progress=False).output))[0]
    words = free["text"].split()
    stop = words[2]
    first = words.index(stop)
    job = make_job([{"id": "a", "prompt": "w100 w200 w300"}], name="stop",
                   generation={"max_new_tokens": 12, "stop": [stop]})
    cut = read_out(Path(run_job(job, progress=False).output))[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == " ".join(words[:first]) + (" " if first else "")
    assert cut["completion_tokens"] == first + 1


def test_log_lines_when_not_a_terminal(make_job, capsys):
    run_job(make_job(sample_prompts(4)), progress=None)        # pytest's stderr is not a terminal
    err = capsys.readouterr().err
    assert "[distlayer]" in err and "4/4 prompts" in err and "tokens/s" in err and "ETA" in err


def test_job_file_path(make_job, tmp_path):
    job = make_job(sample_prompts(3))
    job["input"], job["output"] = Path(job["input"]).name, "sub/out.jsonl"   # relative to the job file
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    s = run_job(tmp_path / "job.yaml", progress=False)
    assert s.completed == 3 and len(read_out(tmp_path / "sub" / "out.jsonl")) == 3


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_then_rerun_gives_every_id_once_identical_to_clean_run(make_job, tmp_path):
    # One torch thread everywhere: the same kernels in both runs, and no OpenMP spin-waiting
    # when the machine is busy (two threads on a loaded 2-core box run several times slower).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = sample_prompts(90, seed=1)
    clean = make_job(rows, name="clean", batch_size=2, generation={"max_new_tokens": 24})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(clean, progress=False)
    finally:
        torch.set_num_threads(threads)
    reference = {r["id"]: r["text"] for r in read_out(Path(clean["output"]))}

    job = make_job(rows, name="killed", batch_size=2, generation={"max_new_tokens": 24})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = Path(job["output"])
    cmd = [sys.executable, "-m", "distlayer", "run", str(tmp_path / "job.yaml")]
    log = tmp_path / "killed.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while _lines(out) < 6:
            assert proc.poll() is None, f"the job ended before it was killed: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no results after 120 s"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    written = _lines(out)
    assert 6 <= written < len(rows), "kill the job part-way: make it slower (more prompts, more tokens)"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stderr
    after = read_out(out)
    ids = [r["id"] for r in after]
    assert sorted(ids) == sorted(reference) and len(ids) == len(set(ids))
    assert {r["id"]: r["text"] for r in after} == reference


@pytest.mark.slow
def test_job_through_ray_stages_matches_in_process(make_job):
    rows = sample_prompts(8, seed=2)
    local = make_job(rows, name="local")
    ray2 = make_job(rows, name="ray2", pipeline={"stages": 2})
    run_job(local, progress=False)
    run_job(ray2, progress=False)
    texts = lambda job: {r["id"]: r["text"] for r in read_out(Path(job["output"]))}  # noqa: E731
    assert texts(ray2) == texts(local)


def test_progress_bar_shows_prompts_and_tokens_per_second(make_job, capsys):
    run_job(make_job(sample_prompts(4)), progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "prompt/s" in err and "tok/s" in err


def test_job_budget_covers_the_jobs_kv_cache(make_job, tiny_dir):
    """A budget that holds the weights (streaming) but not the KV cache and activations of
    the job's batch and longest sequence fails at planning, before any output is written."""
    from distlayer import LayerStore, split
    from distlayer.errors import PlanError
    from distlayer.planner import ModelShape

    rows = sample_prompts(6)
    job = make_job(rows)
    store = LayerStore(split(tiny_dir("llama"), progress=False))
    longest = max(len(r["prompt"].split()) for r in rows) + 1  # one token per word, plus bos
    context = longest + MAX_NEW
    shape = ModelShape.from_store(store, torch.float32)
    need = shape.kv_bytes_per_layer(3, context) * store.num_layers + shape.activation_bytes(3, context)
    budget = max(store.unit_bytes(u) for u in store.units) + need // 2
    # without the job's batch and context the same budget plans (and streams)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=0, memory_per_stage=budget, progress=False) as m:
        assert m.plan[0].streamed_bytes > 0
    job["pipeline"]["memory_per_stage"] = budget
    with pytest.raises(PlanError, match="KV cache and activations"):
        run_job(job, progress=False)
    assert not Path(job["output"]).exists() or read_out(Path(job["output"])) == []
    job["pipeline"]["memory_per_stage"] = budget + need  # room for both: the job runs
    assert run_job(job, progress=False).completed == len(rows)
