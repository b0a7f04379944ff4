"""The loader's throughput from the page cache into staging buffers, with 1, 2 and 4 threads.

    python benchmarks/bench_loader.py [--model DIR] [--layers 8] [--hidden 2048] [--dtype float16]
                                      [--threads 1 2 4] [--repeat 3] [--json FILE]

A CUDA stage that streams reads each unit from its shard into a pinned staging buffer
(``LayerStore.read_into``, one copy from the page cache), then starts the unit's
host-to-device copy from there (``distlayer/cuda_stream.py``: ``CudaMemory.fetch``). One
loader thread does the reads one after another, so a stage cannot stream faster than one
thread copies out of the page cache, however fast the link. This measures that copy alone,
with no model and no forwards, and how it scales with more threads.

- **Store**: by default a random Llama (``distlayer.bench.synthetic.write_random_llama``,
  ``--hidden`` 2048 as in a 1B Llama, ``--layers`` 8, ``--dtype`` float16, so each layer
  unit is tens of MB) written once under ``$DISTLAYER_HOME/synthetic`` (or ``--work``) and
  split into its layer store; or ``--model``: a layer store dir, a checkpoint dir (split
  first), or ``default`` (the embedded SmolLM2-135M-Instruct). Only the layer units are
  copied (the embeddings and head do not stream). Every shard is read once first, so all
  are in the page cache; a plain sequential read of them (64 MiB reads,
  ``distlayer.bench.measure.read_bandwidth``) is printed beside as the page cache's own rate.
- **Threads** (``--threads``): every thread owns two staging buffers, each the size of the
  largest unit, allocated before any run: pinned (``distlayer.cuda_stream.pinned_empty``)
  when CUDA is available, else ordinary host memory (the output says which). Threads take
  the layer units in forward order from one queue, each filling its buffers in turn, until
  the queue is empty; a run is the wall time from handing out the first unit to the last
  thread done.
- **Methods**: ``readinto``: the unit's whole shard file read into the buffer with
  ``readinto`` on an unbuffered file (sequential ``read`` calls straight into the buffer's
  memory; bytes: the shard files'). ``read_into``: the store's own path,
  ``LayerStore.read_into(unit, None, buffer)`` (each tensor read with ``preadv`` into the
  buffer at its aligned offset, as no cast is needed; bytes: the tensors'), as the loader
  does it. ``torch``'s copies may themselves use its intra-op threads (printed).
- **With CUDA**: each configuration runs again with the host-to-device copy of every
  staged unit (``+h2d``): after its read, the thread starts a non-blocking copy of the
  buffer into a device buffer on one copy stream shared by all threads, and waits for that
  copy only before it refills the same staging buffer, so a copy overlaps the thread's next
  read; the run ends when the copy stream has drained. The pinned copy rate alone
  (``torch`` pinned to device, 64 MiB, CUDA events) is printed, and every row's rate is set
  against it (``of link``).

Configurations take turns (``distlayer.bench.measure.take_turns``) after one warm-up run
each, so drift in the machine's speed hits all alike. GB/s is the bytes of all units over a
run's wall seconds, best run and median; ``ratio`` is a configuration's best GB/s over the
same method's with the fewest threads (1 by default) in this run (median against median in
brackets). After the timed runs, each configuration runs once more untimed with a check:
the sha256 of what landed in the staging buffer, per unit, against the shard file's bytes
(``readinto``) or its tensors' bytes in file order (``read_into``); the digests go into the
JSON rows, and a mismatch fails the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import queue
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from distlayer.bench import measure  # noqa: E402
from distlayer.bench.synthetic import llama_shape, write_random_llama  # noqa: E402
from distlayer.cuda_stream import pinned_empty  # noqa: E402

GB = 1e9
MiB = 2**20
SLOTS = 2           # staging buffers per thread (the stage's loader: cuda_stream.STAGING_SLOTS among LOADER_THREADS)
LINK_BYTES = 64 * MiB
VOCAB = 32000       # the embeddings do not stream: a small vocabulary keeps the checkpoint quick to write
METHODS = ("readinto", "read_into")


# ------------------------------------------------------------------ the store

def make_store(args):
    """The layer store to read: ``--model``'s, or the random Llama's (written and split once)."""
    from distlayer import LayerStore, split
    from distlayer.sources import MANIFEST, home_dir

    if args.model:
        from distlayer.smollm import resolve_model

        path = pathlib.Path(resolve_model(args.model)).expanduser()
        return LayerStore(path if (path / MANIFEST).is_file() else split(path, progress=False))
    root = pathlib.Path(args.work).expanduser() if args.work else home_dir() / "synthetic"
    path = root / f"loader-llama-{args.layers}x{args.hidden}-{args.dtype}"
    if not (path / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=path.name + ".partial-", dir=root))
        write_random_llama(tmp, llama_shape(args.hidden, args.layers), vocab=VOCAB, dtype=args.dtype,
                           token_ids={"bos_token_id": 1, "pad_token_id": 0},
                           device="cuda" if torch.cuda.is_available() else "cpu")
        tmp.rename(path)
    return LayerStore(split(path, progress=False))


def layer_units(store) -> list[str]:
    """The store's layer units, in forward order."""
    from distlayer.arch import unit_order

    return [u for u in unit_order(store.num_layers) if u.startswith("layer.")]


def data_start(f: pathlib.Path) -> int:
    """Where a safetensors file's tensor bytes begin (after its 8-byte length and header)."""
    with open(f, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def expected_digest(f: pathlib.Path, method: str) -> str:
    """sha256 of what ``method`` stages of shard ``f``: the whole file, or its tensors' bytes,
    which a safetensors file holds one after another in offset order."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        fh.seek(0 if method == "readinto" else data_start(f))
        while chunk := fh.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ staging one unit

def stage_readinto(store, unit: str, buf: torch.Tensor) -> list[tuple[int, int]]:
    """Read ``unit``'s whole shard file into ``buf``; the ``(offset, bytes)`` spans staged."""
    f = store.path / store.units[unit]["file"]
    n = int(store.units[unit]["bytes"])
    view = memoryview(buf.numpy())[:n]
    got = 0
    with open(f, "rb", buffering=0) as fh:
        while got < n:
            k = fh.readinto(view[got:])
            if not k:
                raise OSError(f"{f}: {got} of {n} bytes read, then end of file")
            got += k
    return [(0, n)]


def stage_read_into(store, unit: str, buf: torch.Tensor) -> list[tuple[int, int]]:
    """The store's path: ``LayerStore.read_into`` in the stored dtype; the ``(offset, bytes)``
    spans staged, one a tensor, in file order."""
    tensors = store.read_into(unit, None, buf)
    base = buf.data_ptr()
    return sorted((t.data_ptr() - base, t.numel() * t.element_size()) for t in tensors.values())


STAGE = {"readinto": stage_readinto, "read_into": stage_read_into}


class Slots:
    """Every thread's staging buffers (and, with ``h2d``, a device buffer behind each), sized
    for the largest unit, allocated once for all configurations."""

    def __init__(self, threads: int, nbytes: int, pinned: bool, cuda: bool):
        def alloc() -> torch.Tensor:
            return pinned_empty(nbytes, torch.uint8) if pinned else torch.empty(nbytes, dtype=torch.uint8)

        self.host = [[alloc() for _ in range(SLOTS)] for _ in range(threads)]
        for row in self.host:
            for b in row:
                b.fill_(0)   # fault every page in before timing
        self.device = [[torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(SLOTS)]
                       for _ in range(threads)] if cuda else None
        self.stream = torch.cuda.Stream() if cuda else None


def run_once(store, units: list[str], method: str, threads: int, slots: Slots, h2d: bool,
             check: dict | None = None) -> tuple[float, int]:
    """Stage every unit once with ``threads`` threads; wall seconds and bytes staged. With
    ``check`` (a dict), the sha256 of each unit's staged bytes goes into it (for an untimed run)."""
    todo: queue.Queue = queue.Queue()
    for u in units:
        todo.put(u)
    stage = STAGE[method]
    counted = [0] * threads
    errors: list[BaseException] = []

    def work(i: int) -> None:
        turn, copied = 0, [None] * SLOTS
        try:
            while True:
                try:
                    unit = todo.get_nowait()
                except queue.Empty:
                    break
                if copied[turn] is not None:
                    copied[turn].synchronize()   # the copy out of this buffer has finished
                buf = slots.host[i][turn]
                spans = stage(store, unit, buf)
                counted[i] += sum(n for _, n in spans)
                if check is not None:
                    whole, h = memoryview(buf.numpy()), hashlib.sha256()
                    for a, n in spans:
                        h.update(whole[a:a + n])
                    check[unit] = h.hexdigest()
                if h2d:
                    used = max(a + n for a, n in spans)   # read_into's aligned gaps go along, as in fetch
                    with torch.cuda.stream(slots.stream):
                        slots.device[i][turn][:used].copy_(buf[:used], non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(slots.stream)
                    copied[turn] = event
                turn = (turn + 1) % SLOTS
        except BaseException as e:  # noqa: BLE001 (handed to the main thread)
            errors.append(e)

    pool = [threading.Thread(target=work, args=(i,), name=f"loader-{i}") for i in range(threads)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if h2d:
        slots.stream.synchronize()
    seconds = time.perf_counter() - t
    if errors:
        raise errors[0]
    return seconds, sum(counted)


def link_rate(nbytes: int = LINK_BYTES, reps: int = 20) -> float:
    """GB/s of ``torch`` pinned-to-device copies of ``nbytes`` (``measure.host_to_device_rate``)."""
    return measure.host_to_device_rate(nbytes, reps) / GB


# ------------------------------------------------------------------ output

def markdown(setup: dict, rows: list[dict]) -> str:
    lines = [f"{setup['units']} layer units of {setup['store']}, {setup['shard_bytes'] / GB:.3f} GB of shards "
             f"(largest {setup['largest_bytes'] / MiB:.1f} MiB); staging in {setup['staging']} memory; "
             f"torch intra-op threads {setup['torch_threads']}; {setup['repeat']} runs each.",
             f"Plain sequential read of the shards from the page cache (64 MiB reads, one thread): "
             f"{setup['plain_read_GBps']} GB/s."]
    link = setup.get("link_GBps")
    if link:
        lines.append(f"Pinned host-to-device copy alone ({LINK_BYTES // MiB} MiB): {link} GB/s.")
    lines += ["", "| method | threads | GB/s (best) | GB/s (median) | ratio vs " f"{setup['base_threads']} thread"
              + ("s" if setup["base_threads"] > 1 else "") + " (median) |" + (" of link |" if link else ""),
              "|---|---|---|---|---|" + ("---|" if link else "")]
    for r in rows:
        lines.append(f"| {r['method']} | {r['threads']} | {r['GBps']} | {r['GBps_median']} | "
                     f"{r['ratio']}x ({r['ratio_median']}x) |" + (f" {r['of_link']:.0%} |" if link else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a layer store, a checkpoint dir or 'default' (SmolLM2-135M); "
                                                  "default: a random Llama written under --work")
    ap.add_argument("--work", default=None, help="where the random Llama goes (default: $DISTLAYER_HOME/synthetic)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    threads = sorted(set(args.threads))
    if threads[0] < 1:
        ap.error("--threads must be 1 or more")

    store = make_store(args)
    if store.compression:
        ap.error(f"{store.path} holds {store.compression} shards: "
                 "the loader's copy is measured on an uncompressed store")
    units = layer_units(store)
    files = [store.path / store.units[u]["file"] for u in units]
    cuda = torch.cuda.is_available()
    plain = measure.read_bandwidth(files, cold=False)   # reads every shard twice: the page cache holds them
    largest = max(max(f.stat().st_size for f in files), max(store.packed_bytes(u) for u in units))
    slots = Slots(threads[-1], largest, pinned=cuda, cuda=cuda)
    setup = {"store": str(store.path), "units": len(units), "shard_bytes": sum(f.stat().st_size for f in files),
             "largest_bytes": largest, "staging": "pinned" if cuda else "pageable (no CUDA)",
             "torch_threads": torch.get_num_threads(), "repeat": args.repeat, "base_threads": threads[0],
             "plain_read_GBps": round(plain["bytes_per_s"] / GB, 2)}
    if cuda:
        setup.update(device=torch.cuda.get_device_name(), link_GBps=round(link_rate(), 2))
    print(json.dumps(setup), flush=True)

    configs = [(m, t, h) for h in ((False, True) if cuda else (False,)) for m in METHODS for t in threads]
    staged: dict = {}

    def timed(cfg):
        method, t, h2d = cfg
        seconds, n = run_once(store, units, method, t, slots, h2d)
        staged.setdefault(cfg, n)
        if n != staged[cfg]:
            raise AssertionError(f"{cfg}: {n} bytes staged, {staged[cfg]} in an earlier run")
        return seconds

    seconds = measure.take_turns({cfg: lambda cfg=cfg: timed(cfg) for cfg in configs}, args.repeat)

    expected = {m: {u: expected_digest(f, m) for u, f in zip(units, files)} for m in METHODS}
    rows = []
    for method, t, h2d in configs:
        digests: dict = {}
        run_once(store, units, method, t, slots, h2d, check=digests)
        bad = [u for u in units if digests.get(u) != expected[method][u]]
        if bad:
            raise AssertionError(f"{method}, {t} threads: staged bytes differ from the files for {bad}")
        (best, median) = measure.per_second(staged[(method, t, h2d)], seconds[(method, t, h2d)])
        ratio = measure.speedup(seconds[(method, t, h2d)], seconds[(method, threads[0], h2d)])
        row = {"method": method + ("+h2d" if h2d else ""), "threads": t, "h2d": h2d, "staging": setup["staging"],
               "units": len(units), "bytes": staged[(method, t, h2d)], "runs": len(seconds[(method, t, h2d)]),
               "GBps": round(best / GB, 3), "GBps_median": round(median / GB, 3),
               "ratio": round(ratio[0], 3), "ratio_median": round(ratio[1], 3), "ratio_vs_threads": threads[0],
               "seconds": [round(s, 4) for s in seconds[(method, t, h2d)]], "verified": True, "digests": digests}
        if cuda:
            row.update(link_GBps=setup["link_GBps"], of_link=round(best / GB / setup["link_GBps"], 3))
        rows.append(row)
    table = markdown(setup, rows)
    print(table, flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
