"""The compute thread (distlayer/compute.py): one thread of the process computes every CPU
stage, measures its rates, and hands results and errors back to the caller; other threads
keep torch to one thread of their own."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from distlayer import LayerStore, compute, rates, split
from distlayer.planner import StagePlan
from distlayer.runner import LayerRunner


def test_jobs_run_on_one_thread_and_errors_come_back():
    first, second = compute.run(threading.current_thread), compute.run(threading.current_thread)
    assert first is second and first is not threading.current_thread() and first.is_alive()
    assert compute.run(lambda: compute.run(compute.current))  # a job calling run runs there, not queued

    def fail():
        raise ValueError("bad layer")

    with pytest.raises(ValueError, match="bad layer"):
        compute.run(fail)
    assert compute.run(lambda x, y=0: x + y, 2, y=3) == 5


def test_other_threads_keep_torch_to_one_thread():
    main_threads, seen = torch.get_num_threads(), {}

    def other():
        compute.single_threaded()
        seen["other"] = torch.get_num_threads()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["other"] == 1 and torch.get_num_threads() == main_threads  # per thread: the caller's is kept
    before = compute.run(torch.get_num_threads)
    compute.run(compute.single_threaded)
    assert compute.run(torch.get_num_threads) == before  # the compute thread keeps its team


def test_a_cpu_stage_sets_up_and_computes_on_the_compute_thread(tiny_dir, tmp_path, hf_model):
    path = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), path)
    store = LayerStore(split(path, progress=False))
    plan = StagePlan(0, 0, store.num_layers, True, "cpu", resident_units=tuple(store.units))
    runner = LayerRunner(store, plan, "cpu", torch.float32, prefetch=False)
    ran = []
    runner.model.register_forward_hook(lambda *a: ran.append(threading.current_thread()))
    try:
        ids = torch.tensor([[1, 5, 9, 2]])
        logits = runner.forward(ids, None, torch.arange(4)[None], "c", 0)
    finally:
        runner.close()
    assert ran == [compute.run(threading.current_thread)]
    with torch.no_grad():
        want = hf_model("llama")(ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_rates_are_measured_on_the_compute_thread(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(rates, "READ_BYTES", 4 * 2**20)
    monkeypatch.setattr(rates, "PREFILL", 8)
    monkeypatch.setattr(rates, "REPEAT", 1)
    path = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), path)
    store = LayerStore(split(path, progress=False))
    seen = []
    real = rates.cpu_share
    monkeypatch.setattr(rates, "cpu_share", lambda *a, **k: (seen.append(threading.current_thread()), real(*a, **k))[1])
    rates.measure_node(store, torch.float32, cache_dir=tmp_path / "rates", remeasure=True)
    assert seen == [compute.run(threading.current_thread)] * rates.SHARES


def test_a_forked_child_starts_a_compute_thread_of_its_own():
    import os

    compute.run(lambda: None)  # the parent's thread runs
    pid = os.fork()
    if pid == 0:  # the child: its jobs must run, not wait on the parent's thread
        os._exit(0 if compute.run(lambda: 7) == 7 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
