"""The socket transport's mailboxes and links, in one process: real Unix sockets and threads."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from distlayer.transport.sockets import Link, Mailbox
from distlayer.transport.base import Failed
from distlayer.errors import StageError

KEY = b"k" * 32


@pytest.fixture
def pair():
    box = Mailbox(KEY, "stage 1")
    link = Link(box.address, KEY, "stage 0", "stage 1")
    yield box, link
    link.close()
    box.close()


def test_work_comes_in_order_and_results_by_key(pair):
    box, link = pair
    a, b = torch.arange(6.0).view(2, 3), torch.tensor([7, 8])
    link.send("q", "1", "req:0", a)
    link.send("k", "2", "req:0", b)
    link.send("q", "3", "req:0", "drop")
    got_b, sent_at = box.take("2")
    assert torch.equal(got_b, b) and sent_at > 0
    key, group, _, payload = box.next()
    assert (key, group) == ("1", "req:0") and torch.equal(payload, a)
    assert box.next()[3] == "drop"
    assert not os.path.exists(box.address)  # every sender connected: nothing is left on disk


def test_a_wave_is_taken_in_whole_waiting_only_while_nothing_else_is_queued(pair):
    import threading
    import time

    box, link = pair
    wave = lambda m: m[0] == "w"  # noqa: E731
    assert box.next_while(wave, 0) == []  # nothing more wanted: no wait on an empty queue
    link.send("q", "1", "a", ("w", 1))
    assert box.next()[3] == ("w", 1)
    late = threading.Timer(0.3, lambda: link.send("q", "3", "c", ("w", 3)))
    late.start()
    link.send("q", "2", "b", ("w", 2))
    t0 = time.monotonic()
    assert [m[3] for m in box.next_while(wave, 2)] == [("w", 2), ("w", 3)]  # waited for the last
    assert time.monotonic() - t0 >= 0.2
    link.send("q", "4", "d", ("w", 4))
    link.send("q", "5", "e", "control")
    link.send("q", "6", "f", ("w", 6))
    assert [m[3] for m in box.next_while(wave, 5)] == [("w", 4)]  # something else came first: no wait
    assert box.next()[3] == "control" and box.next()[3] == ("w", 6)


def test_a_failure_sent_as_a_result_is_raised_by_the_receiver(pair):
    box, link = pair
    link.send("k", "x", "req:0", Failed(IndexError("index out of range in self")))
    with pytest.raises(IndexError, match="out of range"):
        box.take("x")


def test_discard_frees_a_finished_request_now_and_later(pair):
    box, link = pair
    link.send("k", "1", "old:0", torch.zeros(3))
    link.send("k", "2", "keep:0", torch.ones(1))
    box.take("2")  # both have arrived
    box.discard("old")
    assert box._keyed == {}
    link.send("k", "3", "old:1", torch.zeros(3))  # arrives after its request was dropped
    link.send("k", "4", "keep:0", torch.ones(1))
    box.take("4")
    assert box._keyed == {}


def test_a_closed_sender_is_named_instead_of_waiting(pair):
    box, link = pair
    link.close()
    with pytest.raises(StageError, match="stage 0 died.*stage 1 gets no input.*load it again"):
        box.take("never")
    with pytest.raises(StageError, match="stage 0 died"):
        box.next()


def test_why_an_earlier_sender_is_gone_travels_on(pair):
    box, link = pair
    link.send("gone", "", "", "stage 3 died (EOFError)")
    with pytest.raises(StageError, match="stage 3 died"):
        box.next()


def _receiver(addresses):
    box = Mailbox(KEY, "stage 1")
    addresses.put(box.address)
    box.next()  # until killed


def test_a_dead_receiver_is_named_by_the_sender():
    ctx = multiprocessing.get_context("fork")
    addresses = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(addresses,), daemon=True)
    proc.start()
    try:
        link = Link(addresses.get(timeout=30), KEY, "the driver", "stage 1")
        link.send("q", "0", "req:0", torch.zeros(2))
    finally:
        proc.kill()
        proc.join()
    with pytest.raises(StageError, match="stage 1 died.*load it again"):
        link.send("q", "1", "req:0", torch.zeros(2))


def test_a_sender_without_the_key_is_refused():
    box = Mailbox(KEY, "stage 2")
    try:
        with pytest.raises(multiprocessing.AuthenticationError):
            Link(box.address, b"wrong" * 7, "stage 1", "stage 2")
        with pytest.raises(StageError, match="failed to connect"):
            box.next()
    finally:
        box.close()
