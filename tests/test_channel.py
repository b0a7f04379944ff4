"""The same-node channel between stages, in one process: real Unix sockets and threads."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from distlayer.channel import Link, Mailbox
from distlayer.errors import StageError

KEY = b"k" * 32


@pytest.fixture
def pair():
    box = Mailbox(KEY, stage=1, upstream=0)
    link = Link(box.address, KEY, downstream=1)
    yield box, link
    link.close()
    box.close()


def test_messages_arrive_by_key_in_any_order(pair):
    import os

    box, link = pair
    a, b = torch.arange(6.0).view(2, 3), torch.tensor([7, 8])
    link.send("a", "req:0", a)
    link.send("b", "req:0", b)
    got_b, sent_at = box.take("b")
    assert not os.path.exists(box.address)  # connected: nothing is left on disk
    assert torch.equal(got_b, b) and sent_at > 0
    assert torch.equal(box.take("a")[0], a)


def test_an_error_sent_down_is_raised_by_the_receiver(pair):
    box, link = pair
    link.send_error("x", "req:0", IndexError("index out of range in self"))
    with pytest.raises(IndexError, match="out of range"):
        box.take("x")


def test_discard_frees_a_finished_request_now_and_later(pair):
    box, link = pair
    link.send("1", "old:0", torch.zeros(3))
    link.send("2", "keep:0", torch.ones(1))
    box.take("2")  # both have arrived
    box.discard("old")
    assert box._msgs == {}
    link.send("3", "old:1", torch.zeros(3))  # arrives after its request was dropped
    link.send("4", "keep:0", torch.ones(1))
    box.take("4")
    assert box._msgs == {}


def test_a_closed_sender_is_reported_instead_of_waiting(pair):
    box, link = pair
    link.close()
    with pytest.raises(StageError, match="stage 0 .*stage 1 gets no input.*load it again"):
        box.take("never")


def _receiver(addresses):
    box = Mailbox(KEY, stage=1, upstream=0)
    addresses.put(box.address)
    box.take("never")  # until killed


def test_a_dead_receiver_is_reported_by_the_sender():
    ctx = multiprocessing.get_context("fork")
    addresses = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(addresses,), daemon=True)
    proc.start()
    try:
        link = Link(addresses.get(timeout=30), KEY, downstream=1)
        link.send("0", "req:0", torch.zeros(2))
    finally:
        proc.kill()
        proc.join()
    with pytest.raises(StageError, match="stage 1 died.*load it again"):
        link.send("1", "req:0", torch.zeros(2))


def test_a_sender_without_the_key_is_refused():
    box = Mailbox(KEY, stage=2, upstream=1)
    try:
        with pytest.raises(multiprocessing.AuthenticationError):
            Link(box.address, b"wrong" * 7, downstream=2)
        with pytest.raises(StageError, match="channel from stage 1 failed"):
            box.take("x")
    finally:
        box.close()
