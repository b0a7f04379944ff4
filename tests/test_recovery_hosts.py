"""A lost node: on two hosts from network namespaces (``test_hosts``), the worker host's
Ray node is killed in the middle of a generation; its stage's range is started again on
the head's host and the output is the uninterrupted run's."""

from __future__ import annotations

import textwrap

import pytest

from test_hosts import drive, hosts  # noqa: F401  (the two-host fixture)

pytestmark = pytest.mark.slow
NEW = 24

LOSE_A_NODE = textwrap.dedent("""
    import json, os, signal, subprocess, sys
    from distlayer import AutoModel
    from conftest import prompts
    path, address = sys.argv[1], sys.argv[2]
    victim = %r

    class LoseTheNode:
        '''After `at` tokens, kill every process of the worker host: its raylet, its stage.'''
        def __init__(self, at):
            self.at, self.seen, self.killed = at, -1, []
        def put(self, value):
            self.seen += 1
            if self.seen == self.at:
                for pid in subprocess.run(["ip", "netns", "pids", victim], capture_output=True,
                                          text=True).stdout.split():
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
        def end(self):
            pass

    # half a CPU per stage: the head's host has room for the second stage once it is alone;
    # a whole CPU: it has not
    with AutoModel.from_pretrained(path, stages=2, address=address, placement="spread", cpus_per_stage=%s,
                                   restart_timeout=%d, progress=False) as model:
        ids, mask = prompts(1)
        kw = dict(attention_mask=mask, max_new_tokens=%d, min_new_tokens=%d, do_sample=False)
        clean = model.generate(ids, **kw)
        before = [p.node_ip for p in model.plan]
        lose = LoseTheNode(%d)
        try:
            out, error = model.generate(ids, streamer=lose, **kw).tolist(), None
        except Exception as e:
            out, error = None, f"{type(e).__name__}: {e}"
        print("RESULT " + json.dumps({"clean": clean.tolist(), "out": out, "error": error, "before": before,
                                      "after": [p.node_ip for p in model.plan], "killed": lose.killed,
                                      "restarts": [s["restarts"] for s in model.stats()] if out else None,
                                      "kv": [s["kv_bytes"] for s in model.stats()] if out else None}))
""")


def test_a_lost_node_is_replanned_onto_the_remaining_host(hosts):  # noqa: F811
    got = drive(hosts, LOSE_A_NODE % (hosts.names[1], 0.5, 120, NEW, NEW, NEW // 2), timeout=400)
    assert got["killed"], "the worker host had no processes to kill"
    assert sorted(got["before"]) == sorted(hosts.ips)            # one stage per host at first
    assert got["error"] is None and got["out"] == got["clean"]
    assert got["after"] == [hosts.ips[0], hosts.ips[0]]          # both on the head's host after
    assert sorted(got["restarts"]) == [0, 1] and got["kv"] == [0, 0]


def test_a_lost_node_whose_range_fits_nowhere_is_a_clear_error(hosts):  # noqa: F811
    import subprocess

    if not subprocess.run(["ip", "netns", "pids", hosts.names[1]], capture_output=True, text=True).stdout.split():
        hosts.start_node(1)  # the worker host joins again (the test before killed its node)
    got = drive(hosts, LOSE_A_NODE % (hosts.names[1], 1, 10, NEW, NEW, NEW // 2), timeout=400)
    assert got["killed"] and sorted(got["before"]) == sorted(hosts.ips)
    lost = got["before"].index(hosts.ips[1])  # the stage that was on the worker host (spread picks which)
    assert got["out"] is None and got["error"].startswith(f"StageError: stage {lost} (layers"), got["error"]
    assert "no node left has room" in got["error"] and "Add a node" in got["error"], got["error"]
