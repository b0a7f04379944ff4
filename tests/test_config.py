"""Job-file validation: every error names the key and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from distlayer.config import GenerationConfig, JobConfig, PipelineConfig, load_job_config
from distlayer.errors import ConfigError

BASE = "model: some/model\ninput: in.jsonl\noutput: out.jsonl\n"


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_full_job_file_loads_and_resolves_paths(tmp_path):
    (tmp_path / "local-model").mkdir()
    cfg = load_job_config(write(tmp_path, """
model: local-model
input: data/in.jsonl
output: /abs/out.jsonl
batch_size: 4
pipeline: {stages: 2, memory_per_stage: 1GiB, address: auto, dtype: bfloat16, shards_dir: shards}
generation: {max_new_tokens: 16, do_sample: true, temperature: 0.7, top_k: 50, top_p: 0.9, seed: 1,
             stop: "###", chat_template: true}
"""))
    assert cfg.model == str(tmp_path / "local-model")          # an existing local dir, relative to the file
    assert cfg.input == str(tmp_path / "data" / "in.jsonl")
    assert cfg.output == "/abs/out.jsonl"
    assert cfg.pipeline == PipelineConfig(2, "1GiB", None, "auto", "bfloat16", str(tmp_path / "shards"))
    assert cfg.generation.stop == ["###"]                       # one text becomes a list
    assert cfg.generation.chat_template is True and cfg.batch_size == 4


def test_defaults_and_repo_id_kept(tmp_path):
    cfg = load_job_config(write(tmp_path, BASE))
    assert cfg.model == "some/model"                            # not a local path: left as a repo id
    assert cfg.batch_size == 8 and cfg.pipeline == PipelineConfig() and cfg.generation == GenerationConfig()


@pytest.mark.parametrize("missing", ["model", "input", "output"])
def test_missing_key_is_named(tmp_path, missing):
    text = "".join(line + "\n" for line in BASE.splitlines() if not line.startswith(missing))
    with pytest.raises(ConfigError, match=f"missing required key '{missing}'"):
        load_job_config(write(tmp_path, text))


@pytest.mark.parametrize("extra, key, shown", [
    ("batch_size: eight", "batch_size", "'eight'"),
    ("batch_size: 0", "batch_size", "0"),
    ("batch_size: true", "batch_size", "True"),
    ("pipeline: {stages: -1}", "pipeline.stages", "-1"),
    ("pipeline: {stages: 1.5}", "pipeline.stages", "1.5"),
    ("pipeline: {memory_per_stage: lots}", "pipeline.memory_per_stage", "'lots'"),
    ("pipeline: {memory_per_stage: [1GiB, 2GiB], stages: 3}", "pipeline.memory_per_stage", "2 entries"),
    ("pipeline: {compression: 3bit}", "pipeline.compression", "'3bit'"),
    ("pipeline: {dtype: float8}", "pipeline.dtype", "'float8'"),
    ("pipeline: 4", "pipeline", "4"),
    ("generation: {max_new_tokens: ten}", "generation.max_new_tokens", "'ten'"),
    ("generation: {do_sample: 'yes'}", "generation.do_sample", "'yes'"),
    ("generation: {temperature: 0, do_sample: true}", "generation.temperature", "0"),
    ("generation: {temperature: -1}", "generation.temperature", "-1"),
    ("generation: {stop: ''}", "generation.stop", "['']"),
    ("generation: {repetition_penalty: 0}", "generation.repetition_penalty", "0"),
    ("generation: {min_new_tokens: 100}", "generation.min_new_tokens", "100"),
    ("pipeline: {memory_per_stage: true}", "pipeline.memory_per_stage", "True"),
    ("pipeline: {memory_per_stage: .inf}", "pipeline.memory_per_stage", "inf"),
    ("pipeline: {placement: wide}", "pipeline.placement", "'wide'"),
    ("pipeline: {transport: tcp}", "pipeline.transport", "'tcp'"),
    ("pipeline: {transport: ray, block_schedule: 'on'}", "pipeline.block_schedule", "use transport auto or socket"),
    ("pipeline: {transport: ray, block_schedule: on}", "pipeline.block_schedule", "use transport auto or socket"),
    ("pipeline: {block_schedule: sometimes}", "pipeline.block_schedule", "'sometimes'"),
    ("generation: {top_p: 1.5}", "generation.top_p", "1.5"),
    ("generation: {top_k: -2}", "generation.top_k", "-2"),
    ("generation: {stop: ['']}", "generation.stop", "['']"),
    ("generation: {chat_template: 1}", "generation.chat_template", "1"),
])
def test_bad_value_names_key_and_value(tmp_path, extra, key, shown):
    with pytest.raises(ConfigError) as e:
        load_job_config(write(tmp_path, BASE + extra + "\n"))
    assert key in str(e.value) and shown in str(e.value)
    assert str(tmp_path / "job.yaml") in str(e.value)           # and the file it is in


@pytest.mark.parametrize("extra, suggestion", [
    ("batchsize: 4", "did you mean 'batch_size'?"),
    ("pipelines: {stages: 2}", "did you mean 'pipeline'?"),
    ("generation: {max_new_token: 5}", "did you mean 'generation.max_new_tokens'?"),
    ("pipeline: {memory_per_stag: 1GiB}", "did you mean 'pipeline.memory_per_stage'?"),
    ("generation: {stop_strings: [x]}", "did you mean 'generation.stop'?"),
])
def test_unknown_key_suggests_closest(tmp_path, extra, suggestion):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_job_config(write(tmp_path, BASE + extra + "\n"))
    assert suggestion in str(e.value)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys: model, input, output"):
        load_job_config(write(tmp_path, BASE + "zzzzzz: 1\n"))


@pytest.mark.parametrize("text, match", [
    ("model: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "write a mapping"),
    ("", "missing required key 'model'"),
])
def test_malformed_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_job_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")


def test_output_must_differ_from_input(tmp_path):
    with pytest.raises(ConfigError, match="output: .* is the input file too"):
        JobConfig(model="m", input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "a.jsonl"))


@pytest.mark.parametrize("transport", ["auto", "socket", "ray"])
def test_the_block_schedule_goes_with_every_transport_but_on_needs_one_that_delivers_waves(transport):
    from distlayer.config import PipelineConfig

    for setting in ("auto", "off"):
        assert PipelineConfig(transport=transport, block_schedule=setting).block_schedule == setting
    if transport == "ray":  # object refs hand each micro-batch on by itself
        with pytest.raises(ConfigError, match="block_schedule is on but pipeline.transport is ray"):
            PipelineConfig(transport=transport, block_schedule="on")
    else:
        assert PipelineConfig(transport=transport, block_schedule="on").block_schedule == "on"


@pytest.mark.parametrize("written, read", [("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")])
def test_block_schedule_on_or_off_bare_in_yaml(tmp_path, written, read):
    # YAML 1.1 reads a bare on or off as a boolean
    assert load_job_config(write(tmp_path, BASE + f"pipeline: {{block_schedule: {written}}}\n")).pipeline.block_schedule == read


def test_dataclasses_check_when_built_directly():
    with pytest.raises(ConfigError, match="generation.max_new_tokens: got 0"):
        GenerationConfig(max_new_tokens=0)
    cfg = JobConfig(model="m", input="i.jsonl", output="o.jsonl", pipeline={"stages": 0}, generation={"seed": 3})
    assert cfg.pipeline.stages == 0 and cfg.generation.seed == 3


def test_example_job_file_is_valid():
    from distlayer.jobs import read_records

    examples = Path(__file__).resolve().parent.parent / "examples"
    cfg = load_job_config(examples / "job.yaml")
    assert cfg.model == "default" and cfg.output == str(examples / "results.jsonl")
    records = read_records(cfg.input)
    assert records and not [r.error for r in records if r.error]


def test_batch_size_is_now_max_rows_and_still_works_with_a_warning():
    from distlayer.cli import build_parser, settings_from
    from distlayer.config import build

    with pytest.warns(FutureWarning, match="batch_size is now called max_rows: write that instead"):
        assert build(PipelineConfig, {"batch_size": 4}, "", "argument").max_rows == 4
    with pytest.warns(FutureWarning, match="--batch-size is now called --max-rows"):
        args = build_parser().parse_args(["plan", "some/model", "--batch-size", "3"])
        assert settings_from(args, PipelineConfig).max_rows == 3
    assert settings_from(build_parser().parse_args(["plan", "m", "--max-rows", "2"]), PipelineConfig).max_rows == 2
    with pytest.raises(ConfigError, match="are the same setting .* give only pipeline.max_rows"):
        build(PipelineConfig, {"batch_size": 4, "max_rows": 2}, "pipeline.")


def test_a_jobs_pipeline_takes_its_rows_from_the_jobs_batch_size(tmp_path):
    with pytest.raises(ConfigError, match="pipeline.max_rows: the job's batch_size sets the rows"):
        load_job_config(write(tmp_path, BASE + "pipeline: {max_rows: 3}\n"))
    with pytest.warns(FutureWarning, match="pipeline.batch_size has no effect here: the job's batch_size sets"):
        cfg = load_job_config(write(tmp_path, BASE + "batch_size: 5\npipeline: {batch_size: 3, stages: 2}\n"))
    assert cfg.batch_size == 5 and cfg.pipeline.stages == 2 and cfg.pipeline.max_rows == 1
