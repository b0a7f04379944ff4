"""The recovery journal, without Ray: what it keeps, what it forgets, and a replay through
in-process stages that rebuilds KV caches bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import prompts
from distlayer import AutoModel
from distlayer.errors import StageLost
from distlayer.recovery import Journal, Recovering, Restarts, pack_mask, unpack_mask
from distlayer.transport.base import Handle, Work


def test_masks_are_packed_only_when_left_padded():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    packed = pack_mask(left)
    assert isinstance(packed, tuple) and torch.equal(unpack_mask(packed), left)
    holes = torch.tensor([[1, 0, 1, 1]])
    assert pack_mask(holes) is holes and pack_mask(None) is None


def test_the_journal_forgets_dropped_requests_and_follows_merges():
    j = Journal()

    def step(key, cache):
        return j.step(Work(key, cache, None, torch.zeros(1, 1, dtype=torch.long)), torch.zeros(1, 1))

    step("a#0", "a:0"), step("b#0", "b:0"), step("c#0", "c:0")
    j.control("merge_caches", ("a:0", "b:0"))
    j.control("select_rows", ("a:0", [1], 0))
    assert [e.group for e in j.entries] == ["a:0", "a:0", "c:0", "a:0", "a:0"]
    assert j.forget("a") == ["a#0", "b#0"]                      # b was merged into a: it goes with it
    assert [e.group for e in j.entries] == ["c:0"] and list(j.steps) == ["c#0"]
    j.control("drop", ("c",))
    assert j.entries == [] and j.steps == {}


class Healer:
    """A pipeline whose 'lost' stages are only emptied: enough to show a replay rebuilds them."""

    def __init__(self, model):
        self.model, self.restarts = model, Restarts(len(model.plan), 3)

    def heal(self, error, old):
        for actor in self.model.pipeline.stages.actors:
            actor.reset()
        return old, [0]

    def recovered(self):
        self.recoveries = getattr(self, "recoveries", 0) + 1


def test_a_replay_rebuilds_every_cache_bit_for_bit(tiny_dir):
    """Half-way through a generation every stage's caches are emptied and the journal is
    replayed: the logits that follow are exactly those of an uninterrupted run."""

    ids, mask = prompts(2)
    with AutoModel.from_pretrained(tiny_dir("gemma2"), stages=0, progress=False) as model:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, output_logits=True,
                              return_dict_in_generate=True)
        pipe = model.pipeline
        healer = Healer(model)
        wrapped = pipe.transport = Recovering(pipe.transport, healer)
        inner_fetch, calls = wrapped.inner.fetch, []

        def fetch(handle):  # the 6th fetch finds its stages emptied: recover, then fetch again
            calls.append(handle)
            if len(calls) == 6:
                raise StageLost("a stage was lost (test)")
            return inner_fetch(handle)

        wrapped.inner.fetch = fetch
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, output_logits=True,
                             return_dict_in_generate=True)
        assert got.sequences.tolist() == want.sequences.tolist()
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(calls) == 10 + 1 + 5          # every step, the failed fetch, and the 5 steps replayed
        assert healer.recoveries == 1            # told once the replay was done
        assert wrapped.journal.entries == [] and wrapped.live == {}  # dropped with the request


class DiesOnSubmit:
    """An inner transport whose stage 0 dies under the next submit (its socket closed)."""

    name, timeout = "fake", None

    def __init__(self, die: bool):
        self.die, self.out = die, {}

    def submit(self, work, x):
        if self.die:
            raise StageLost("stage 0 died (BrokenPipeError)")
        self.out[work.key] = torch.tensor([7])
        return Handle(work.key, picked=work.pick)

    def fetch(self, handle):
        return self.out[handle.key]

    def control(self, *args):
        pass

    def close(self):
        pass


class Replacing:
    """A pipeline whose heal hands back a transport over stages that answer."""

    restarts = Restarts(1, 3)

    def heal(self, error, old):
        return DiesOnSubmit(die=False), [0]

    def recovered(self):
        pass


def test_a_stage_lost_while_a_step_is_sent_replays_it_as_in_flight():
    """The send itself fails (the stage died under it): the replay sends the step again and
    the caller's fetch gets its result (it was once taken for a step already fetched)."""
    t = Recovering(DiesOnSubmit(die=True), Replacing())
    work = Work("k#1", "c:0", torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None], 1, True)
    handle = t.submit(work, torch.tensor([[5, 6, 7]]))
    assert t.fetch(handle).tolist() == [7]
    assert t.live == {}


def test_a_stage_not_set_up_yet_says_so_when_asked_for_stats():
    """What /health meets while a replacement starts: a StageError (a 503), not an AttributeError (a 500)."""
    from distlayer.errors import StageError
    from distlayer.stage import StageActor

    with pytest.raises(StageError, match="stage 0 .* is not set up yet"):
        StageActor("/nowhere", 0).stats()
