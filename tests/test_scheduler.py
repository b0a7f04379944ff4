"""The scheduler: requests join and leave a running batch, and each gets what it would
get alone; freed KV caches; cancelling; refusing what cannot fit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from distlayer import AutoModel, ConfigError
from distlayer.scheduler import Scheduler

LENGTHS = [(5, 6), (9, 20), (3, 3), (12, 15), (7, 9), (4, 11), (10, 2)]  # (prompt, new tokens)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n, _ in LENGTHS]


def alone(model, ids, n, **kw) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[], **kw)[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def model(request, tiny_dir):
    with AutoModel.from_pretrained(tiny_dir(request.param), stages=0, progress=False) as m:
        yield m


def test_rows_that_join_and_leave_get_what_they_get_alone(model):
    sched = Scheduler(model, max_rows=4, context=128)
    try:
        ps = prompts()
        want = [alone(model, p, n) for p, (_, n) in zip(ps, LENGTHS)]
        reqs = []
        for i, (p, (_, n)) in enumerate(zip(ps, LENGTHS)):
            reqs.append(sched.submit(p, model.generation_settings(max_new_tokens=n, eos_token_id=[])))
            if i == 2:
                time.sleep(0.05)  # some arrive while others run
        for r, w in zip(reqs, want):
            assert r.result(timeout=120).tokens == w
            assert r.finish_reason == "length"
        assert sched.in_flight() == 0
        assert model.stats()[0]["kv_bytes"] == 0                      # every row's cache freed
    finally:
        sched.close()


def test_sampled_requests_follow_their_own_seed_whatever_runs_beside(model):
    sched = Scheduler(model, max_rows=4, context=128)
    try:
        ps = prompts(1)
        s = model.generation_settings(max_new_tokens=8, eos_token_id=[], do_sample=True, seed=5)
        first = sched.submit(ps[0], s).result(timeout=60).tokens            # alone
        crowd = [sched.submit(p, s) for p in ps[1:4]]
        again = sched.submit(ps[0], s)                                       # beside three others
        assert again.result(timeout=60).tokens == first
        assert len({tuple(r.result(timeout=60).tokens) for r in crowd}) > 1
        other = sched.submit(ps[0], model.generation_settings(max_new_tokens=8, eos_token_id=[], do_sample=True,
                                                              seed=6))
        assert other.result(timeout=60).tokens != first
    finally:
        sched.close()


def test_stop_text_eos_and_history_settings(model):
    sched = Scheduler(model, max_rows=4, context=128)
    try:
        p = prompts(2)[1]
        full = alone(model, p, 12)
        token = model.tokenizer.decode([full[4]])
        r = sched.submit(p, model.generation_settings(max_new_tokens=12, eos_token_id=[], stop=[token]))
        r.result(timeout=60)
        assert r.finish_reason == "stop" and token not in r.text and r.tokens == full[:full.index(full[4]) + 1]
        eos = sched.submit(p, model.generation_settings(max_new_tokens=12, eos_token_id=[full[3]]))
        assert eos.result(timeout=60).tokens == full[:full.index(full[3]) + 1] and eos.finish_reason == "stop"
        kw = dict(repetition_penalty=1.5, no_repeat_ngram_size=2)
        hist = sched.submit(p, model.generation_settings(max_new_tokens=12, eos_token_id=[], **kw))
        assert hist.result(timeout=60).tokens == alone(model, p, 12, **kw)
    finally:
        sched.close()


def test_cancel_frees_the_rows_and_refusals(model):
    sched = Scheduler(model, max_rows=2, context=64)
    try:
        ps = prompts(3)
        long = sched.submit(ps[0], model.generation_settings(max_new_tokens=50, eos_token_id=[]))
        short = sched.submit(ps[1], model.generation_settings(max_new_tokens=3, eos_token_id=[]))
        waiting = sched.submit(ps[2], model.generation_settings(max_new_tokens=3, eos_token_id=[]))  # no room yet
        for _ in long.stream(timeout=60):
            break
        long.cancel()
        assert long.result(timeout=60).finish_reason == "cancelled" and len(long.tokens) < 50
        assert short.result(timeout=60).finish_reason == "length"
        assert waiting.result(timeout=60).finish_reason == "length"      # ran once a row was free
        assert model.stats()[0]["kv_bytes"] == 0
        with pytest.raises(ConfigError, match="over the context of 64"):
            sched.submit(ps[0], model.generation_settings(max_new_tokens=60, eos_token_id=[]))
        with pytest.raises(ConfigError, match="no tokens"):
            sched.submit([], model.generation_settings(max_new_tokens=3))
    finally:
        sched.close()


def test_generate_calls_from_several_threads_share_the_pipeline(model):
    """generate() is a client of the model's scheduler: calls from four threads run at once,
    each gets what it gets alone, and every cache is freed after."""
    ps = prompts(3)[:4]
    want = [alone(model, p, n) for p, (_, n) in zip(ps, LENGTHS)]
    got: list = [None] * 4
    start = threading.Barrier(4)

    def call(i):
        start.wait()
        got[i] = alone(model, ps[i], LENGTHS[i][1])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    assert model.scheduler.in_flight() == 0 and model.stats()[0]["kv_bytes"] == 0


def test_rows_leaving_trim_padding_on_sliding_window_layers(tiny_dir):
    """The row with the longest prompt leaves first, so the others' common padding is trimmed
    from every cache; on Gemma2 (window 8) the sliding layers hold fewer positions than the
    sequence, and the rows that stay still get what they get alone."""
    with AutoModel.from_pretrained(tiny_dir("gemma2"), stages=0, progress=False) as model:
        g = torch.Generator().manual_seed(4)
        ps = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (14, 5, 6)]
        lengths = [2, 16, 12]
        want = [alone(model, p, n) for p, n in zip(ps, lengths)]
        sched = Scheduler(model, max_rows=3, context=64)
        try:
            settings = [model.generation_settings(max_new_tokens=n, eos_token_id=[]) for n in lengths]
            reqs = sched.submit_many(list(zip(ps, settings)))
            assert [r.result(timeout=60).tokens for r in reqs] == want
        finally:
            sched.close()
