"""The transport contract: every transport in the registry (``distlayer.transport.TRANSPORTS``),
the socket one also over TCP, each bare and wrapped in ``Recovering``, goes through the
same cases, over three stages in this process and over two Ray actors (``slow``: Ray takes
about 40 s to start here):

- a step submitted and fetched gives what the stages compute when called one by one;
- several steps in flight, fetched in any order;
- picked tokens fed from one step to the next (``Work.pick``, a :class:`Handle` as input);
- ``drop`` frees a request's caches on every stage (a request's id is not used again after
  its drop: the socket transport discards what still arrives for it);
- a stage's error is raised by ``fetch``, with its message, and the transport goes on;
- after ``abort``, what waits raises ``StageLost`` with the reason.

A new transport is covered by adding it to the registry; what it needs to run here (a
``hosts`` argument) goes in :data:`VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel, LayerStore, split
from distlayer.errors import StageLost
from distlayer.generate import positions_from_mask
from distlayer.pipeline import LocalStages
from distlayer.planner import StagePlan
from distlayer.recovery import Recovering, Restarts
from distlayer.stage import StageActor
from distlayer.transport import TRANSPORTS, make
from distlayer.transport.base import Payload, Work
from distlayer.units import LayerRange

pytestmark = pytest.mark.usefixtures("ray_per_module")

ARCH = "llama"  # 4 layers: in process, stages of 1, 2 and 1 layers
RANGES = [(0, 1), (1, 3), (3, 4)]
STEPS = 3  # a prefill and two steps fed by the tokens picked before
VARIANTS = [(name, False) for name in TRANSPORTS] + [("socket", True)]  # (registry name, over TCP)
assert {name for name, _ in VARIANTS} == set(TRANSPORTS), "a registered transport is not in the contract test"
KEYS = itertools.count()


class NoHeal:
    """What ``Recovering`` is given as its pipeline: no stage is ever replaced, so a
    ``StageLost`` goes to the caller, as the pipeline's ``heal`` does when every stage answers."""

    restarts = Restarts(len(RANGES), 0)

    def heal(self, error, old):
        raise error

    def recovered(self):
        pass


# --------------------------------------------------------------------------- stages and the reference


@pytest.fixture(scope="module")
def local(tiny_dir):
    """Three stages in this process, every unit resident."""
    store = LayerStore(split(tiny_dir(ARCH), progress=False))
    actors = []
    for i, (start, end) in enumerate(RANGES):
        last = i == len(RANGES) - 1
        actor = StageActor(str(store.path), i, "cpu", torch.float32)
        actor.setup(StagePlan(i, start, end, last, "cpu", resident_units=LayerRange(start, end, i == 0, last).units()))
        actors.append(actor)
    stages = LocalStages(actors)
    yield stages
    stages.close()


@pytest.fixture(scope="module")
def on_ray(tiny_dir):
    """Two stages in Ray actors on this node (the pipeline's own transport is left unused)."""
    with AutoModel.from_pretrained(tiny_dir(ARCH), stages=2, transport="ray", progress=False) as model:
        yield model.pipeline.stages, [p.node_ip for p in model.plan]


def request_steps(request: str, mask: torch.Tensor, pick: bool = True, steps: int = STEPS) -> list[Work]:
    """A prefill then ``steps - 1`` one-token steps of request ``request``'s micro-batch 0."""
    works = []
    for k in range(steps):
        m = torch.cat([mask, torch.ones(mask.shape[0], k, dtype=mask.dtype)], dim=1)
        pos = positions_from_mask(m)
        works.append(Work(f"{request}#{k}#{next(KEYS)}", f"{request}:0", m, pos if k == 0 else pos[:, -1:], 1, pick))
    return works


@pytest.fixture(scope="module")
def want(local):
    """What the stages compute called one by one, per prompt seed: the prefill's logits
    and the greedy tokens of each step."""
    out = {}
    for seed in range(3):
        ids, mask = prompts(2, seed=seed)
        x, tokens, logits = ids, [], None
        for k, work in enumerate(request_steps(f"want{seed}", mask)):
            if k == 0:
                logits = run_directly(local, dataclasses.replace(work, pick=False, cache_id="scratch:0"), ids)
                for a in local.actors:
                    a.drop("scratch")
            x = run_directly(local, work, x)
            tokens.append(x)
        for a in local.actors:
            a.drop(f"want{seed}")
        out[seed] = ids, mask, logits, tokens
    return out


def run_directly(stages, work: Work, x):
    msg = Payload.now(x)
    for actor in stages.actors:
        msg = actor.run(work, msg)
    return msg.x


def cache_ids(stages) -> list[list[str]]:
    """Each stage's KV caches."""
    return stages.get([stages.call_with(a, lambda actor: sorted(actor.runner.caches)) for a in stages.actors], 60)


@pytest.fixture(params=["in-process", pytest.param("ray-actors", marks=pytest.mark.slow)])  # Ray: ~40 s to start
def where(request):
    if request.param == "in-process":
        return request.getfixturevalue("local"), ["127.0.0.1"] * len(RANGES)
    return request.getfixturevalue("on_ray")


@pytest.fixture(params=[(*v, wrapped) for v in VARIANTS for wrapped in (False, True)],
                ids=lambda p: f"{'tcp' if p[1] else p[0]}{'-recovering' if p[2] else ''}")
def transport(request, where):
    """A registered transport over the stages (TCP: every end on 127.0.0.1 or its node's IP),
    bare or wrapped in ``Recovering``."""
    name, tcp, wrapped = request.param
    stages, ips = where
    t = make(name, stages, (ips, ips[0]) if tcp else None, timeout=60)
    if wrapped:
        t = Recovering(t, NoHeal())
    yield t
    t.close()


# --------------------------------------------------------------------------- the cases


def test_a_step_matches_the_stages_called_one_by_one(transport, want):
    ids, mask, logits, _ = want[0]
    request = f"one{next(KEYS)}"
    work = request_steps(request, mask, pick=False, steps=1)[0]
    torch.testing.assert_close(transport.fetch(transport.submit(work, ids)), logits, rtol=1e-4, atol=1e-4)
    transport.drop(request)


def test_several_steps_in_flight_fetched_in_any_order(transport, want):
    sent = []
    for seed, (ids, mask, logits, _) in want.items():
        request = f"many{next(KEYS)}"
        sent.append((request, logits, transport.submit(request_steps(request, mask, pick=False, steps=1)[0], ids)))
    for request, logits, handle in reversed(sent):
        torch.testing.assert_close(transport.fetch(handle), logits, rtol=1e-4, atol=1e-4)
        transport.drop(request)


def test_picked_tokens_feed_the_next_step(transport, want):
    """Every step is submitted before any is fetched, each fed the handle of the one before."""
    assert isinstance(transport.feeds, bool)
    ids, mask, _, tokens = want[1]
    request = f"feed{next(KEYS)}"
    x, handles = ids, []
    for work in request_steps(request, mask):
        x = transport.submit(work, x)
        handles.append(x)
    assert [transport.fetch(h).tolist() for h in handles] == [t.tolist() for t in tokens]
    unpicked = transport.submit(request_steps(request + "x", mask, pick=False, steps=1)[0], ids)
    with pytest.raises(ValueError, match="only when its last stage picked"):
        transport.submit(request_steps(request + "x", mask, steps=2)[1], unpicked)
    transport.fetch(unpicked)
    transport.drop(request)
    transport.drop(request + "x")


def test_drop_frees_the_request_on_every_stage(transport, want, where):
    stages = where[0]
    ids, mask, _, _ = want[2]
    request = f"drop{next(KEYS)}"
    first = request_steps(request, mask, pick=False, steps=1)[0]
    transport.fetch(transport.submit(first, ids))
    assert all(f"{request}:0" in c for c in cache_ids(stages))
    transport.drop(request)
    assert not any(f"{request}:0" in c for c in cache_ids(stages))


def test_a_stage_error_is_raised_at_fetch_and_the_transport_goes_on(transport, want):
    ids, mask, logits, _ = want[0]
    bad = ids.clone()
    bad[0, -1] = 10_000  # past the embedding: stage 0 fails, and the stages after pass it on
    request = f"bad{next(KEYS)}"
    handle = transport.submit(request_steps(request, mask, pick=False, steps=1)[0], bad)
    with pytest.raises(IndexError, match="index out of range"):
        transport.fetch(handle)
    transport.drop(request)
    good = f"good{next(KEYS)}"
    out = transport.fetch(transport.submit(request_steps(good, mask, pick=False, steps=1)[0], ids))
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-4)
    transport.drop(good)


def test_after_abort_waits_raise_stage_lost_with_the_reason(transport, want):
    ids, mask, _, _ = want[0]
    request = f"abort{next(KEYS)}"
    done = transport.submit(request_steps(request, mask, steps=1)[0], ids)
    transport.fetch(done)
    handle = transport.submit(request_steps(request, mask, steps=2)[1], done)
    transport.abort("stage 1 on 10.0.0.9 (pid 7) stopped answering (test)")
    with pytest.raises(StageLost, match=r"stage 1 on 10\.0\.0\.9 \(pid 7\) stopped answering \(test\)"):
        transport.fetch(handle)
    with pytest.raises(StageLost, match="stopped answering"):
        transport.control("drop", request)


def test_abort_wakes_a_fetch_that_waits(local, want):
    """A fetch waiting on a stage that does not answer raises at once when the driver
    aborts (in process, the socket transport; over Ray the killed actor fails the wait)."""
    ids, mask, _, _ = want[0]
    t = make("socket", local, timeout=60)
    gate, run = threading.Event(), local.actors[1].run

    def stuck(work, payload):
        gate.wait(30)
        return run(work, payload)

    local.actors[1].run = stuck
    request, raised = f"wake{next(KEYS)}", []

    def fetch():
        try:
            t.fetch(handle)
        except StageLost as e:
            raised.append(e)

    try:
        handle = t.submit(request_steps(request, mask, steps=1)[0], ids)
        waiter = threading.Thread(target=fetch)
        waiter.start()
        t.abort("stage 1 hung (test)")
        waiter.join(10)
        assert not waiter.is_alive() and "stage 1 hung (test)" in str(raised[0])
    finally:
        gate.set()
        del local.actors[1].run
        t.close()
        for a in local.actors:
            a.drop(request)
