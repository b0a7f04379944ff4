"""Replay recovery: a stage killed or stopped in the middle of generation is replaced, and
the output is the one an uninterrupted run gives (real Ray actors, real processes killed)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, StageError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_per_module")]
NEW = 48


class KillAt:
    """A streamer that, after ``at`` tokens, sends ``sig`` to stage ``stage``'s process:
    a deterministic moment in the middle of a generation."""

    def __init__(self, model, stage: int, at: int, sig=signal.SIGKILL):
        self.model, self.stage, self.at, self.sig = model, stage, at, sig
        self.seen, self.pid = -1, None  # the first put is the prompt

    def put(self, value):
        self.seen += 1
        if self.seen == self.at:
            self.pid = self.model.plan[self.stage].pid
            os.kill(self.pid, self.sig)
            self.at_time = time.monotonic()

    def end(self):
        pass


def greedy(model, ids, mask, streamer=None, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                          streamer=streamer, **kw)


def assert_all_freed(model, wait: float = 0):
    """Every stage's KV caches are freed (within ``wait`` seconds: the scheduler frees a
    batch's cache just after its last request returns)."""
    deadline = time.monotonic() + wait
    while (held := [s["kv_bytes"] for s in model.stats()]) != [0] * len(model.plan) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held == [0] * len(model.plan)


@pytest.mark.parametrize("stages", [3])  # two stages lose a stage in test_serve, the soak and the scheduler test
def test_a_killed_stage_is_replaced_and_generation_goes_on_unchanged(stages, tiny_dir):
    """Each stage in turn (first, middle, last) is killed after 24 of 48 tokens: the text is
    the uninterrupted run's, the plan names the new process, no KV cache is left behind."""
    ids, mask = prompts(1)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=stages, progress=False) as model:
        clean = greedy(model, ids, mask)
        assert clean.shape[1] == ids.shape[1] + NEW
        for stage in range(stages):
            kill = KillAt(model, stage, 24)
            assert greedy(model, ids, mask, kill).tolist() == clean.tolist(), f"stage {stage} killed"
            assert kill.pid is not None and model.plan[stage].pid != kill.pid
            assert_all_freed(model)
        restarts = [s["restarts"] for s in model.stats()]
        assert restarts == [1] * stages
        assert all(s["recovery_s"] > 0 for s in model.stats())


def test_micro_batches_sampling_and_logits_survive_a_killed_stage(tiny_dir):
    """Two micro-batches in flight, seeded sampling in the driver, and logits returned
    to the driver, over Ray object refs (the other transport): a stage killed mid-run
    changes none of them."""
    import threading

    ids, mask = prompts(4, seed=3)
    with AutoModel.from_pretrained(tiny_dir("qwen2"), stages=2, micro_batches=2, transport="ray",
                                   progress=False) as model:
        assert model.pipeline.transport.name == "ray"
        sampled = dict(do_sample=True, temperature=0.9, top_k=50, seed=7)
        clean_s = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **sampled)
        clean_l = model.generate(ids, attention_mask=mask, max_new_tokens=8, output_logits=True,
                                 return_dict_in_generate=True)
        for stage, run in ((1, "sampled"), (0, "logits")):
            timer = threading.Timer(0.5, lambda s=stage: os.kill(model.plan[s].pid, signal.SIGKILL))
            timer.start()
            while True:  # until a whole run started after the kill (a kill between runs is met by the next)
                fired = not timer.is_alive()
                if run == "sampled":
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **sampled)
                    assert out.tolist() == clean_s.tolist()
                else:
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, output_logits=True,
                                         return_dict_in_generate=True)
                    assert out.sequences.tolist() == clean_l.sequences.tolist()
                    for a, b in zip(out.logits, clean_l.logits):
                        torch.testing.assert_close(a, b, rtol=0, atol=0)
                if fired:
                    break
            timer.join()
        assert sum(s["restarts"] for s in model.stats()) == 2
        assert_all_freed(model)


def test_a_stopped_stage_is_caught_by_the_deadline(tiny_dir):
    """SIGSTOP: the stage neither answers nor dies; step_timeout catches it, the stage is
    replaced, and the output is unchanged."""
    ids, mask = prompts(1)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, step_timeout=3, progress=False) as model:
        clean = greedy(model, ids, mask)
        kill = KillAt(model, 1, 10, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            assert greedy(model, ids, mask, kill).tolist() == clean.tolist()
        finally:
            try:
                os.kill(kill.pid, signal.SIGKILL)  # never leave a stopped process behind
            except ProcessLookupError:
                pass
        assert time.monotonic() - t0 < 120
        assert model.plan[1].pid != kill.pid and model.stats()[1]["restarts"] == 1


def test_a_stopped_stage_is_found_by_the_heartbeat_with_default_settings(smollm_dir):
    """SIGSTOP on SmolLM2's second stage, every setting at its default (step_timeout 600 s):
    the heartbeat finds it, its process is killed and replaced, and generate() returns the
    clean run's tokens within 60 s of the stop."""
    import psutil

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with AutoModel.from_pretrained(smollm_dir, stages=2, progress=False) as model:
        assert model.pipeline.cfg.step_timeout == 600
        clean = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        stop = KillAt(model, 1, 8, signal.SIGSTOP)
        try:
            out = model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24, streamer=stop)
            took = time.monotonic() - stop.at_time
            gone = not psutil.pid_exists(stop.pid) or psutil.Process(stop.pid).status() == psutil.STATUS_ZOMBIE
        finally:
            try:
                os.kill(stop.pid, signal.SIGKILL)  # never leave a stopped process behind
            except ProcessLookupError:
                pass
        assert out.tolist() == clean.tolist()
        assert took < 60, f"{took:.1f}s from the stop to the answer"
        assert model.plan[1].pid != stop.pid and model.stats()[1]["restarts"] == 1
        assert gone, "the stopped process was left behind"


def test_a_long_step_is_not_a_hung_stage(tiny_dir):
    """A stage whose work thread is busy for 4x heartbeat_timeout (a long step) still
    answers the heartbeat on its own thread: nothing is replaced, and the output is the
    clean run's."""
    ids, mask = prompts(1)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, transport="ray", heartbeat_timeout=1,
                                   progress=False) as model:
        clean = greedy(model, ids, mask)
        s = model.pipeline.stages
        busy = s.call_with(s.actors[1], lambda actor: time.sleep(4))  # queued before the steps, like a long step
        t0 = time.monotonic()
        assert greedy(model, ids, mask).tolist() == clean.tolist()
        assert time.monotonic() - t0 >= 3.5
        s.get(busy)
        assert [st["restarts"] for st in model.stats()] == [0, 0]


def test_a_standby_spare_takes_a_killed_stages_place(tiny_dir):
    """standby=1: each killed stage's range loads into the spare process that was already
    running (no process starts while the requests wait), a new spare is started in the
    bundle the lost stage left, and the output is the clean run's."""
    ids, mask = prompts(1)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, standby=1, progress=False) as model:
        s = model.pipeline.stages
        clean = greedy(model, ids, mask)
        for stage in (1, 0):
            deadline = time.monotonic() + 120
            while not s.spares:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            spare_pid = s.get(s.call_with(s.spares[0][0], lambda actor: os.getpid()), 60)
            kill = KillAt(model, stage, 24)
            assert greedy(model, ids, mask, kill).tolist() == clean.tolist(), f"stage {stage} killed"
            assert model.plan[stage].pid == spare_pid != kill.pid
        assert [st["restarts"] for st in model.stats()] == [1, 1]
        assert len(s.spares) == 1 and s.get(s.call_with(s.spares[0][0], lambda actor: os.getpid()), 60) not in (
            model.plan[0].pid, model.plan[1].pid)


def test_standby_the_cluster_cannot_hold_is_refused_before_any_weight_loads(tiny_dir):
    with pytest.raises(StageError, match=r"cannot place 2 stages and 3 standby .* less standby"):
        AutoModel.from_pretrained(tiny_dir("llama"), stages=2, standby=3, cpus_per_stage=1, progress=False)


def test_past_max_restarts_the_error_names_stage_node_and_cause(tiny_dir):
    ids, mask = prompts(1)
    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, max_restarts=0, progress=False) as model:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
        node, pid = model.plan[1].node_ip, model.plan[1].pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(StageError) as e:
            greedy(model, ids, mask)
        msg = str(e.value)
        assert f"stage 1 on {node} (pid {pid}) died" in msg and "max_restarts=0" in msg, msg
        assert "raise max_restarts" in msg and "exit type" in msg, msg


def test_scheduler_requests_joining_and_leaving_survive_a_killed_stage(tiny_dir):
    """Requests that join and leave one running batch (cache merges and row selections in
    the journal) each get what they get alone, though stage 0 is killed among them."""
    from test_scheduler import LENGTHS, alone
    from test_scheduler import prompts as lists

    from distlayer.scheduler import Scheduler

    with AutoModel.from_pretrained(tiny_dir("llama"), stages=2, max_rows=4, context=128,
                                   progress=False) as model:
        ps = lists()
        want = [alone(model, p, 3 * n) for p, (_, n) in zip(ps, LENGTHS)]
        pid = model.plan[0].pid
        sched = Scheduler(model, max_rows=4, context=128)
        try:
            reqs = []
            for i, (p, (_, n)) in enumerate(zip(ps, LENGTHS)):
                reqs.append(sched.submit(p, model.generation_settings(max_new_tokens=3 * n, eos_token_id=[])))
                if i == 2:  # three run; the rest arrive after the kill, while the stage is replaced
                    time.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)
            for r, w in zip(reqs, want):
                assert r.result(timeout=300).tokens == w
            assert model.plan[0].pid != pid and model.stats()[0]["restarts"] == 1
            assert_all_freed(model, wait=30)
        finally:
            sched.close()


def stage_processes() -> list:
    """This test process's Ray stage actors (children of the private Ray it started)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "StageActor" in " ".join(p.cmdline()[:1])]


def test_soak_a_batch_job_through_two_stage_losses(tmp_path, tiny_dir):
    """200 prompts through 3 stages as a batch job; a stage process is killed at two random
    moments: every id is written once, and every text is the clean run's."""
    import random
    import threading

    from test_jobs import read_out, sample_prompts, write_jsonl

    from distlayer.jobs import run_job

    rows = sample_prompts(200, seed=11)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)

    def job(name):
        return {"model": str(tiny_dir("llama")), "input": str(inp), "output": str(tmp_path / f"{name}.jsonl"),
                "batch_size": 16, "pipeline": {"stages": 3}, "generation": {"max_new_tokens": 8}}

    run_job(job("clean"), progress=False)
    rng = random.Random(2026)
    moments = sorted(rng.sample(range(16, 176), 2))  # kill once this many results are written
    out, killed = tmp_path / "faulty.jsonl", []

    def chaos():
        deadline = time.monotonic() + 600
        for at in moments:
            while (not out.exists() or len(out.read_text().splitlines()) < at) and time.monotonic() < deadline:
                time.sleep(0.05)
            victims = stage_processes()
            if victims:
                victim = rng.choice(victims)
                killed.append(victim.pid)
                victim.kill()

    threading.Thread(target=chaos, daemon=True).start()
    summary = run_job(job("faulty"), progress=False)
    assert len(killed) == 2, f"faults injected: {killed}"
    clean, faulty = read_out(tmp_path / "clean.jsonl"), read_out(out)
    assert sorted(r["id"] for r in faulty) == sorted(r["id"] for r in rows)          # each id exactly once
    assert {r["id"]: r["text"] for r in faulty} == {r["id"]: r["text"] for r in clean}
    assert summary.completed == 200 and summary.errors == 0
