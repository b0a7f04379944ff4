"""The ``distlayer`` command line: every verb's help, errors, generate streaming, run, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distlayer import AutoModel
from distlayer.cli import build_parser, main

VERBS = ["split", "plan", "generate", "serve", "run", "demo", "doctor"]


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert f"\n    {verb}" in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_help_runs(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distlayer {verb}")
    assert build_parser()._subparsers._group_actions[0].choices[verb].description.split()[0] in out


@pytest.mark.parametrize("args", [["-m", "distlayer", "--help"], ["-m", "distlayer.cli", "generate", "--help"]])
def test_python_dash_m(args):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: distlayer" in done.stdout


def test_distlayer_error_is_printed_with_exit_2(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: m\ninput: i.jsonl\noutput: o.jsonl\ngeneration: {max_new_token: 4}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'generation.max_new_tokens'?" in err


def test_missing_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_generate_streams_tokens_as_produced(tiny_dir, capsys, monkeypatch):
    from transformers import TextStreamer

    chunks = []
    real = TextStreamer.on_finalized_text
    monkeypatch.setattr(TextStreamer, "on_finalized_text",
                        lambda self, text, stream_end=False: (chunks.append(text), real(self, text, stream_end)))
    model_dir = tiny_dir("llama")
    assert main(["generate", str(model_dir), "w010 w020 w030", "--stages", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    with AutoModel.from_pretrained(model_dir, stages=0, progress=False) as model:
        ids = model.tokenizer("w010 w020 w030", return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True)
        want = model.tokenizer.decode(ref.sequences[0, 3:], skip_special_tokens=True)
    assert out.strip() == want.strip() and want.strip()
    assert len([c for c in chunks if c.strip()]) >= 2           # printed piece by piece, not at the end


def test_generate_chat_without_template_is_an_error(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir("llama")), "hi", "--stages", "0", "--chat"]) == 2
    assert "has no chat template: run without --chat" in capsys.readouterr().err


def test_split_and_plan(tiny_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["split", str(tiny_dir("llama")), "--out", str(store)]) == 0
    assert capsys.readouterr().out.strip() == str(store) and (store / "manifest.json").is_file()
    assert main(["plan", str(store), "--stages", "2", "--memory-per-stage", "1GiB"]) == 0
    table, notes, measured, prediction = capsys.readouterr().out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["stage", "node"] and len(lines) == 3
    assert "stage 1 budget: 1.00 GiB (--memory-per-stage)" in notes and "stages: 2 (--stages)" in notes
    assert measured.splitlines()[0].split()[:3] == ["stage", "node", "measured"] and "predicted" in prediction
    assert main(["plan", str(store), "--stages", "2"]) == 0
    assert "(default: 90% of the" in capsys.readouterr().out      # says where the default came from
    assert main(["plan", str(store), "--stages", "2", "--memory-per-stage", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "memory_per_stage" in err and "'lots'" in err


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def same_plan(printed: dict, run, exact_budget: bool) -> None:
    """The plan ``distlayer plan --json`` printed is the plan a pipeline runs with."""
    import re

    assert len(printed["stages"]) == len(run)
    for p, r in zip(printed["stages"], run):
        keys = ("stage", "start", "end", "resident_units", "streamed_units", "threads", "reserve_bytes")
        assert {k: p[k] for k in keys} == {k: r.as_dict()[k] for k in keys}  # JSON's lists, as printed
        if exact_budget:
            assert p["budget_bytes"] == r.budget_bytes and p["budget_source"] == r.budget_source
        else:  # 90% of the free memory, measured twice a few seconds apart
            assert abs(p["budget_bytes"] - r.budget_bytes) < 0.1 * r.budget_bytes
            words = lambda s: re.sub(r"[\d.]+ [KMG]?i?B|on \S+", "", s)  # noqa: E731
            assert words(p["budget_source"]) == words(r.budget_source)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 3])
def test_the_plan_printed_is_the_plan_run(tiny_dir, capsys, stages):
    model = str(tiny_dir("qwen2"))
    default = plan_json(capsys, model, "--stages", str(stages))
    budget = plan_json(capsys, model, "--stages", str(stages), "--memory-per-stage", "300KiB", "--context", "64")
    assert any(p["streamed_units"] for p in budget["stages"])  # a budget that makes stages stream
    with AutoModel.from_pretrained(model, stages=stages, progress=False) as m:
        same_plan(default, m.plan, exact_budget=False)
    with AutoModel.from_pretrained(model, stages=stages, memory_per_stage="300KiB", context=64, progress=False) as m:
        same_plan(budget, m.plan, exact_budget=True)


def test_flags_job_keys_and_keywords_are_the_settings_fields():
    """One definition of each setting: every CLI flag, job-file key and keyword maps to a field."""
    import dataclasses
    import inspect
    import warnings

    from distlayer.cli import flag
    from distlayer.config import RENAMED, GenerationConfig, JobConfig, PipelineConfig

    pipeline = {f.name for f in dataclasses.fields(PipelineConfig) if not f.metadata.get("internal")}  # settings
    old_names = {old: new for new in pipeline for old in RENAMED.get(new, ())}  # still accepted, hidden flags
    generation = {f.name for f in dataclasses.fields(GenerationConfig)}
    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb, owners in (("generate", pipeline | generation | set(old_names)), ("plan", pipeline | set(old_names))):
        dests = {a.dest for a in verbs[verb]._actions if a.option_strings and a.dest not in ("help", "json", "cluster")}
        assert dests <= owners, dests - owners                    # every flag is a field
        for a in verbs[verb]._actions:
            if a.dest in owners:
                assert flag(a.dest) in a.option_strings            # named after it
    flags = {a.dest for a in verbs["generate"]._actions}
    assert {f.name for f in dataclasses.fields(GenerationConfig) if f.metadata.get("cli") or f.type == "bool"
            or f.type == "bool | None"} <= flags
    job = {f.name: f for f in dataclasses.fields(JobConfig)}
    assert job["pipeline"].default_factory is PipelineConfig and job["generation"].default_factory is GenerationConfig
    # from_pretrained takes the pipeline fields as keywords, and only those
    params = inspect.signature(AutoModel.from_pretrained).parameters
    assert set(params) == {"pretrained_model_name_or_path", "progress", "settings"}
    from distlayer import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'memory_per_stage'"):
        AutoModel.from_pretrained("x", memory_per_stag="1GiB")
    for name in pipeline | set(old_names):  # every field is accepted as a keyword (a bad value, not an unknown name)
        with pytest.raises(ConfigError) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            AutoModel.from_pretrained("x", **{name: object()})
        assert "unknown" not in str(e.value) and old_names.get(name, name) in str(e.value)


def test_run_verb(tiny_dir, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "w010 w011"}\n{"id": 2, "prompt": "w012"}\n')
    job = {"model": str(tiny_dir("llama")), "input": "in.jsonl", "output": "out.jsonl",
           "pipeline": {"stages": 0}, "generation": {"max_new_tokens": 3}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0
    assert "2 completed, 0 errors, 0 already done" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [1, 2]


@pytest.mark.slow
def test_demo_answers_paris():
    # DISTLAYER_HOME comes from conftest (one per session), so the conversion runs once.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "distlayer", "demo"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "Paris" in out.split("Plan:")[0]
    plan, stats = out.split("Plan:")[1].split("Per-stage stats:")
    assert len(plan.strip().splitlines()) == 3 and len(stats.strip().splitlines()) == 3
    assert "peak_weight_bytes" in stats and "compute_s" in stats


@pytest.mark.parametrize("value", ["-5GiB", "-5", "-0.5GiB"])
def test_a_negative_memory_budget_is_a_sentence(tiny_dir, capsys, value):
    """argparse takes ``-5GiB`` for a flag ("expected one argument"); the setting's own
    check answers instead."""
    assert main(["plan", str(tiny_dir("llama")), "--memory-per-stage", value]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: pipeline.memory_per_stage: got {value!r} (str); use a positive size " \
        "such as 2GiB" and "expected one argument" not in err


def test_terminated_starts_on_its_own_line(tiny_dir, capsys, monkeypatch):
    """SIGTERM right after a streamed token: "terminated" is not glued to the text."""
    from distlayer import cli
    from distlayer.model import DistModel

    real = DistModel.generate

    def term_mid_stream(self, *a, streamer, **kw):
        put, calls = streamer.put, []

        def put_then_term(ids):                          # SIGTERM arrives after the 4th token is shown
            put(ids)
            calls.append(ids)
            if len(calls) == 5:
                raise cli.Terminated()

        streamer.put = put_then_term
        return real(self, *a, streamer=streamer, **kw)

    monkeypatch.setattr(DistModel, "generate", term_mid_stream)
    assert main(["generate", str(tiny_dir("llama")), "w010 w020", "--stages", "0", "--max-new-tokens", "8"]) == 143
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.out.endswith("\n") and captured.err.splitlines()[-1] == "terminated", \
        captured
