"""``distlayer.data``: a real Ray Data pipeline (a private local Ray cluster) over real
distlayer pipelines of SmolLM2, checked row by row against the model alone."""

from __future__ import annotations

import sys

import pytest
from ray import cloudpickle

from distlayer import AutoModel, ConfigError
from distlayer.data import ProcessorConfig, build_processor
from distlayer.prompts import tokenize

pytestmark = [pytest.mark.usefixtures("ray_per_module")]
NEW = 8
BAD = {7: "empty prompt", 23: "context of"}  # row id -> words of its error
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def rows(n: int = 40) -> list[dict]:
    """``n`` rows: a question, an id and a column of their own; two cannot run."""
    out = [{"id": i, "q": f"What is {i} times {i + 3}?", "tag": f"tag-{i}"} for i in range(n)]
    for r in out[7:8]:
        r["q"] = "   "
    return out


def preprocess(row: dict) -> dict:
    too_long = row["id"] == 23  # more new tokens than the model's context
    return {"messages": [{"role": "user", "content": row["q"]}],
            "sampling_params": {"max_new_tokens": 10 ** 6 if too_long else NEW, "temperature": 0}}


@pytest.fixture(scope="module")
def alone(smollm_dir):
    """Each good row's completion when the model runs it alone, greedy, in this process."""
    with AutoModel.from_pretrained(smollm_dir, stages=0, progress=False) as model:
        settings = model.generation_settings(max_new_tokens=NEW, do_sample=False)
        return {r["id"]: model.scheduler.submit(tokenize(None, preprocess(r)["messages"], model.tokenizer, True),
                                                settings).result().text
                for r in rows() if r["id"] not in BAD}


def run(smollm_dir, **kw) -> list[dict]:
    import ray

    config = ProcessorConfig(model_source=str(smollm_dir), batch_size=8, should_continue_on_error=True, **kw)
    processor = build_processor(config, preprocess=preprocess,
                                postprocess=lambda row: {**row, "answer": row["generated_text"]})
    return sorted(processor(ray.data.from_items(rows())).take_all(), key=lambda r: r["id"])


def check(out: list[dict], alone: dict) -> None:
    assert [r["id"] for r in out] == list(range(40))
    for r in out:
        assert r["tag"] == f"tag-{r['id']}" and r["q"] == rows()[r["id"]]["q"]  # every input column kept
        if r["id"] in BAD:
            assert BAD[r["id"]] in r["error"] and r["generated_text"] is None, r
            continue
        assert r["error"] is None, r
        assert r["generated_text"] == r["answer"] == alone[r["id"]], r["id"]
        assert r["num_input_tokens"] > 0 and 1 <= r["num_generated_tokens"] <= NEW
        assert r["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_forty_rows_through_a_two_stage_pipeline(smollm_dir, alone):
    check(run(smollm_dir, pipeline={"stages": 2}), alone)


@pytest.mark.slow
def test_two_replicas_of_one_stage_give_the_same_rows(smollm_dir, alone):
    check(run(smollm_dir, pipeline={"stages": 1}, concurrency=2), alone)


@pytest.mark.slow
def test_without_continue_on_error_a_bad_row_fails_the_dataset_with_its_sentence(smollm_dir):
    import ray

    config = ProcessorConfig(model_source=str(smollm_dir), pipeline={"stages": 1}, batch_size=8)
    processor = build_processor(config, preprocess=preprocess)
    with pytest.raises(Exception, match="empty prompt: every message content is empty") as e:
        processor(ray.data.from_items(rows(10))).take_all()
    assert "should_continue_on_error" in str(e.value)


def test_pipelines_the_cluster_cannot_hold_are_refused_before_anything_starts(smollm_dir):
    import ray

    config = ProcessorConfig(model_source=str(smollm_dir), pipeline={"stages": 2}, concurrency=40)
    with pytest.raises(ConfigError, match=r"40 pipelines of 2 stages do not fit .*80 stages need 0.1 CPUs each.*0.61 GiB of weights.* lower concurrency"):
        build_processor(config)(ray.data.from_items(rows(2)))


@pytest.mark.parametrize("kw, words", [
    (dict(model_source=""), "model_source"),
    (dict(batch_size=0), "batch_size: got 0"),
    (dict(concurrency="2"), "concurrency"),
    (dict(pipeline={"stagez": 2}), "stagez"),
    (dict(generation={"temperature": -1}), "temperature"),
    (dict(pipeline={"max_rows": 4}), "pipeline.max_rows: batch_size sets the rows"),
])
def test_bad_settings_get_a_sentence(kw, words):
    with pytest.raises(ConfigError, match=words):
        ProcessorConfig(**{"model_source": "m", **kw})


def test_a_replica_runs_its_batch_rows_together(tiny_dir):
    """A replica's pipeline admits ``batch_size`` rows at once (it once ran them one at a
    time, because the pipeline it was built with had the default batch of 1)."""
    import pandas as pd

    from distlayer.data import Replica

    config = ProcessorConfig(model_source=str(tiny_dir("llama")), pipeline={"stages": 1}, batch_size=6,
                             generation={"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False})
    replica = Replica(**build_processor(config).replica_args())
    try:
        assert replica.model.scheduler.max_rows == 6
        out = replica(pd.DataFrame({"prompt": [f"w{i:03d} w011" for i in range(6)]}))
        assert list(out["num_generated_tokens"]) == [3] * 6 and out["error"].isna().all()
    finally:
        replica.model.close()


@pytest.mark.slow
def test_two_thousand_rows_hold_memory_flat(tiny_dir):
    """2,000 short rows through one one-stage replica, read as they come: the driver's and
    the replica's resident memory after the first quarter and at the end (printed), and
    every row answered once."""
    import psutil
    import ray

    config = ProcessorConfig(model_source=str(tiny_dir("llama")), pipeline={"stages": 1}, batch_size=16,
                             generation={"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False})
    processor = build_processor(config, preprocess=lambda row: {"prompt": f"w{row['id'] % 300:03d} w011"})
    driver = psutil.Process()

    def replica_rss() -> int:
        total = 0
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "Replica" in " ".join((p.info["cmdline"] or [])[:1]):
                    total += p.memory_info().rss
            except psutil.Error:  # gone, or a zombie, since it was listed
                pass
        return total

    seen, samples = set(), []
    for i, row in enumerate(processor(ray.data.range(2000)).iter_rows()):
        assert row["error"] is None and row["num_generated_tokens"] == 4, row
        seen.add(row["id"])
        if i in (499, 1999):
            samples.append((driver.memory_info().rss, replica_rss()))
    assert seen == set(range(2000))
    (d0, r0), (d1, r1) = samples
    print(f"\n2000 rows: driver RSS {d0 / 2**20:.0f} -> {d1 / 2**20:.0f} MiB, "
          f"replica RSS {r0 / 2**20:.0f} -> {r1 / 2**20:.0f} MiB (after 500 rows -> after 2000)")
    assert r0 > 0, "no replica process found"
    assert d1 - d0 < 200 * 2**20 and r1 - r0 < 200 * 2**20  # flat: what grows with rows would be 4x here
