"""Where a process's CPU stages compute: one thread for all of them.

torch runs a CPU kernel's work in an OpenMP thread team, and every thread that has run
parallel torch work keeps a team of its own. While the teams of a process hold more
threads than the node has cores, libgomp lets their idle threads spin only briefly
before they sleep, so each small kernel of a decode step waits for its team to wake. A
second team (several stages or models in one process, a measurement, the sampling on
the scheduler's thread) makes every decode step slower, and by how much depends on what
else ran before: the cost model could not predict it.

So every CPU stage's set-up and forwards, and the measurement of its rates, run on this
module's one thread (:func:`run`), and the other threads distlayer starts that touch
tensors (the scheduler, the stages' loaders) keep torch to one thread there
(:func:`single_threaded`), which makes no team. A GPU stage computes on the device and
is called where it is.
"""

from __future__ import annotations

import os
import queue
import threading

import torch

_jobs: queue.Queue = queue.Queue()
_started = threading.Lock()
_thread: threading.Thread | None = None


def current() -> bool:
    """Whether the caller is the compute thread."""
    return threading.current_thread() is _thread


def run(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the compute thread (directly when called there); its
    result, or its error raised here."""
    if current():
        return fn(*args, **kwargs)
    done, box = threading.Event(), {}
    _jobs.put((fn, args, kwargs, box, done))
    _start()
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def single_threaded() -> None:
    """Keep the calling thread's torch work to that thread (no OpenMP team), unless it
    is the compute thread: for the other threads that handle tensors."""
    if not current() and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _start() -> None:
    global _thread
    with _started:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="distlayer-compute", daemon=True)
            _thread.start()


def _forget() -> None:
    """In a forked child: no compute thread yet (the parent's is not copied)."""
    global _jobs, _started, _thread
    _jobs, _started, _thread = queue.Queue(), threading.Lock(), None


os.register_at_fork(after_in_child=_forget)


def _serve() -> None:
    while True:
        fn, args, kwargs, box, done = _jobs.get()
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # raised in the caller
            box["error"] = e
        finally:
            del fn, args, kwargs  # hold nothing of a finished job
            done.set()
