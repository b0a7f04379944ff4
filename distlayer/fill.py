"""A layer store on every node, filled from the driver's node.

Before a stage loads, the driver makes sure the units it owns are on its node's disk.
Each node is asked once, through one of its stages (:func:`locate`), where it has them:

1. its own store, under its ``DISTLAYER_HOME`` (``sources.home_dir`` in the stage's
   process, which inherits the environment of that node's ``ray start``):
   ``stores/<model>-<manifest digest>/``, reused when every file it needs is there
   with the manifest's sha256;
2. the driver's store path, when the node sees it too (the driver's own node, or a
   ``shards_dir`` on a disk that every node mounts), with every file at its size (the
   stage's first load of each unit checks its sha256);
3. else its own store, with what is missing pushed from the driver through Ray:
   in chunks of :data:`CHUNK_BYTES`, at most :data:`IN_FLIGHT` on their way to one
   node (so neither side nor Ray's object store ever holds a whole unit), appended to
   ``<file>.part`` and renamed once its sha256 matches. A push that was cut off (its
   stage lost) resumes from the ``.part`` file's length; one that failed otherwise (a
   full disk, a bad file on the driver's side) removes its ``.part`` files.

Before any node is asked, the driver checks the shards it will serve (:meth:`LayerStore.check_shards`:
each at its manifest size, and hashed again where it changed since it was last verified),
so a damaged store is named (with the command that repairs it) before anything is copied,
and a store the driver's own node sees whole is used there in place. Each pushed file is
hashed on the driver as it is read, and checked against the manifest before the node keeps it.

Only the units of the node's own stages travel, plus the store's small side files
(config, tokenizer, manifest last). The driver prints one progress line per node while
it pushes; :func:`fill_stages` records in each stage's placement where its store is and which
of its units were pushed. Nothing here imports Ray: the driver's ``Stages`` runs these
functions in the stage processes (``call_with``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .files import file_sha256, fsync_replace
from .sources import MANIFEST, UNIT_FILE_RE, home_dir
from .store import LayerStore
from .transport import Stages

CHUNK_BYTES = 4 << 20
"""Bytes per pushed chunk."""
IN_FLIGHT = 4
"""Chunks on their way to one node at once."""
PART = ".part"
"""Suffix of a file being received."""
PROGRESS_EVERY = 1.0
"""Seconds between two progress lines of one node."""


@dataclass(frozen=True)
class FileSpec:
    """A store file a node needs: its name in the store, size and sha256."""

    name: str
    size: int
    sha256: str


def manifest_digest(store: LayerStore) -> str:
    """What names a store's content: the sha256 of its manifest (which holds every unit's)."""
    return file_sha256(store.path / MANIFEST)


def side_files(store: LayerStore) -> list[FileSpec]:
    """The store's files other than units (config, tokenizer, …), the manifest last."""
    names = sorted(f.name for f in store.path.iterdir()
                   if f.is_file() and not UNIT_FILE_RE.match(f.name) and not f.name.endswith((".tmp", PART)))
    names = [n for n in names if n != MANIFEST] + [MANIFEST]
    return [FileSpec(n, (store.path / n).stat().st_size, file_sha256(store.path / n)) for n in names]


def unit_files(store: LayerStore, units: list[str]) -> list[FileSpec]:
    """The shards of ``units``, as the manifest records them."""
    return [FileSpec(store.units[u]["file"], int(store.units[u]["bytes"]), store.units[u]["sha256"]) for u in units]


def node_store_dir(source: str, digest: str) -> Path:
    """Where this node keeps its copy of a store: under its own ``DISTLAYER_HOME``."""
    name = re.sub(r"[^\w.-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"
    return home_dir() / "stores" / f"{name[:48]}-{digest[:16]}"


# --------------------------------------------------------------------------- in a stage's process


def has_file(root: Path, spec: FileSpec, check_sha: bool) -> bool:
    """Whether ``root`` holds ``spec`` at its size (and sha256)."""
    f = root / spec.name
    try:
        if f.stat().st_size != spec.size:
            return False
    except OSError:
        return False
    return not check_sha or file_sha256(f) == spec.sha256


def locate(actor, driver_path: str, source: str, digest: str, files: list[FileSpec]) -> dict:
    """Run in a stage's process: where its node has ``files``.

    Returns:
        ``{"path", "source", "missing": {file name: bytes already received}}``:
        ``source`` is ``"node store"``, ``"driver path"`` or ``"push"`` (then ``missing``
        lists what the driver must send to ``path``, this node's own store).
    """
    own = node_store_dir(source, digest)
    have = {f.name for f in files if has_file(own, f, check_sha=True)}
    if len(have) == len(files):
        return {"path": str(own), "source": "node store", "missing": {}}
    if all(has_file(Path(driver_path), f, check_sha=not UNIT_FILE_RE.match(f.name)) for f in files):
        return {"path": driver_path, "source": "driver path", "missing": {}}
    missing = {}
    for f in files:
        if f.name not in have:
            part = own / (f.name + PART)
            missing[f.name] = part.stat().st_size if part.is_file() and part.stat().st_size <= f.size else 0
            if missing[f.name] == 0:
                part.unlink(missing_ok=True)
    return {"path": str(own), "source": "push", "missing": missing}


def receive(actor, root: str, name: str, offset: int, data: bytes) -> None:
    """Run in a stage's process: write one pushed chunk of ``name`` at ``offset`` of its ``.part`` file."""
    part = Path(root) / (name + PART)
    part.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size != offset:
            raise StoreError(f"{part} is {size} bytes but a chunk for offset {offset} arrived: delete it and "
                             "load the model again")
        os.pwrite(fd, data, offset)
    except OSError as e:
        raise StoreError(f"cannot write {part} ({e}): free disk space on this node (or set its DISTLAYER_HOME to "
                         "a bigger disk) and load the model again; the push resumes after the files already "
                         "received") from e
    finally:
        os.close(fd)


def finish(actor, root: str, spec: FileSpec) -> None:
    """Run in a stage's process: check a received file's sha256 and give it its name."""
    part = Path(root) / (spec.name + PART)
    if file_sha256(part) != spec.sha256:
        part.unlink()
        raise StoreError(f"{spec.name} arrived at {root} with another sha256 than the driver's manifest: it was "
                         "deleted; load the model again to fetch it anew")
    fsync_replace(part, Path(root) / spec.name)


def discard(actor, root: str, names: list[str]) -> None:
    """Run in a stage's process: remove the ``.part`` files of ``names`` after a failed
    push, and ``root`` (then its ``stores`` folder) when nothing else is left in it."""
    root_dir = Path(root)
    for name in names:
        (root_dir / (name + PART)).unlink(missing_ok=True)
    for d in (root_dir, root_dir.parent):
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty one


def remove(actor, root: str, names: list[str]) -> None:
    """Run in a stage's process: remove the files ``names`` from ``root``."""
    for name in names:
        (Path(root) / name).unlink(missing_ok=True)


def use_store(actor, path: str) -> None:
    """Run in a stage's process: the stage loads its units from ``path``."""
    actor.store_path = path


# --------------------------------------------------------------------------- on the driver


def report_progress(node: str, done: int, total: int, files: int, of: int, last: bool) -> None:
    """Print one node's progress line (stderr)."""
    print(f"distlayer: node {node}: {files}/{of} files, {done / 2**20:.1f}/{total / 2**20:.1f} MiB from the "
          f"driver's node{' (done)' if last else ''}", file=sys.stderr, flush=True)


DISCARD_TIMEOUT = 30.0
"""Seconds a failed push waits for its node to remove the ``.part`` files."""


def unit_of_file(store: LayerStore, name: str) -> str | None:
    """The unit whose shard is the file ``name`` of ``store`` (None for a side file)."""
    return next((unit for unit, u in store.units.items() if u["file"] == name), None)


def bad_source(store: LayerStore, spec: FileSpec, why: str) -> StoreError:
    """The error for a file of the driver's store that cannot be sent as the manifest says
    (``why``: ``"short"``, ``"sha256"`` or the text of the ``OSError`` that opening it raised)."""
    path = store.path / spec.name
    unit = unit_of_file(store, spec.name)
    if unit is None:
        return StoreError(f"{path} changed while it was sent to a node ({why}): load the model again")
    store.check_shards([unit])  # raises the store's own sentence for a missing or truncated shard
    if why == "sha256":
        return StoreError(f"shard {path} of unit {unit} fails its sha256 check: the file is corrupt or was "
                          f"changed; {store.repair_hint()}")
    return StoreError(f"shard {path} of unit {unit} cannot be read ({why}): {store.repair_hint()}")


def push(stages: Stages, actor, node: str, store: LayerStore, root: str, files: list[FileSpec],
         missing: dict[str, int]) -> dict[str, int]:
    """Send ``files`` (from their offsets in ``missing``) to the node of ``actor``;
    returns the bytes sent of each file.

    Each file is hashed as it is read (from its start, a resumed one too) and refused,
    with the command that repairs the store, unless its sha256 is the manifest's. A push
    that fails removes its ``.part`` files from the node (unless the node cannot be asked:
    a stage lost mid-push leaves them for the next push to resume from).
    """
    todo = [f for f in files if f.name in missing]
    total = sum(f.size - missing[f.name] for f in todo)
    sent, shown, flight, per_file = 0, 0.0, deque(), {}
    try:
        for k, spec in enumerate(todo):
            try:
                src = open(store.path / spec.name, "rb")
            except OSError as e:
                raise bad_source(store, spec, e.strerror or str(e)) from None
            with src:
                st, digest = os.fstat(src.fileno()), hashlib.sha256()
                offset = missing[spec.name]
                while src.tell() < offset:  # what the node already holds: hashed, not sent
                    data = src.read(min(CHUNK_BYTES, offset - src.tell()))
                    if not data:
                        raise bad_source(store, spec, "short")
                    digest.update(data)
                while offset < spec.size:
                    data = src.read(min(CHUNK_BYTES, spec.size - offset))
                    if not data:
                        raise bad_source(store, spec, "short")
                    digest.update(data)
                    flight.append(stages.call_with(actor, receive, root, spec.name, offset, data))
                    offset += len(data)
                    sent += len(data)
                    while len(flight) > IN_FLIGHT:
                        stages.get(flight.popleft())
                    if time.monotonic() - shown >= PROGRESS_EVERY:
                        shown = time.monotonic()
                        report_progress(node, sent, total, k, len(todo), False)
            if digest.hexdigest() != spec.sha256:
                raise bad_source(store, spec, "sha256")
            unit = unit_of_file(store, spec.name)
            if unit is not None:
                store.note_verified(unit, st)
            flight.append(stages.call_with(actor, finish, root, spec))
            per_file[spec.name] = spec.size - missing[spec.name]
        stages.get(list(flight))
    except Exception:
        with contextlib.suppress(Exception):  # a node that cannot be asked keeps its .part files
            stages.get(stages.call_with(actor, discard, root, [f.name for f in todo]), DISCARD_TIMEOUT)
        raise
    report_progress(node, sent, total, len(todo), len(todo), True)
    return per_file


def fill_stages(stages: Stages, plans: list, store: LayerStore, which: list[int] | None = None,
                sent_before: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """Make each stage's units available on its node, then point the stage at them.

    ``plans[i]`` is the plan of ``stages.actors[i]`` with its placement (a
    ``placement.PlacedStage``); ``which`` names the stages to fill
    (default all; a stage started again after a failure alone, say). One stage per node
    (the first there) is asked and receives the units of all that node's stages.

    Sets on each stage's placement ``store_path``, ``store_source`` (``"node store"``,
    ``"driver path"`` or ``"push"``), ``fetched`` (its units that were pushed) and
    ``fetched_bytes`` (their bytes sent now: less than their size when a push resumed).
    ``sent_before`` (by node id, bytes sent of each file) counts as pushed now what an
    earlier fill of the same start sent (``survey.py``'s, of the layers it measures);
    those of its shards that none of the node's stages owns are removed again.

    Returns:
        by node id, the bytes sent of each file pushed (with ``sent_before``'s).
    """
    nodes: dict[str, list[int]] = {}
    for i in range(len(plans)) if which is None else which:
        nodes.setdefault(plans[i].node_id, []).append(i)
    units = {node: list(dict.fromkeys(u for i in idx for u in plans[i].layer_range.units()))
             for node, idx in nodes.items()}
    # a damaged store is named here, before any node is asked or filled (and a whole one
    # is then found in place on the driver's own node)
    store.check_shards(list(dict.fromkeys(u for us in units.values() for u in us)))
    digest, side = manifest_digest(store), side_files(store)
    wanted = {node: unit_files(store, units[node]) + side for node in nodes}
    found = stages.get([stages.call_with(stages.actors[idx[0]], locate, str(store.path), store.source, digest,
                                         wanted[node]) for node, idx in nodes.items()])
    pushed = {}
    for (node, idx), where in zip(nodes.items(), found):
        sent = dict((sent_before or {}).get(node, {}))
        if where["missing"]:
            store.check_shards(units[node])  # still whole (sizes) as the push starts
            sent.update(push(stages, stages.actors[idx[0]], plans[idx[0]].node_ip, store, where["path"],
                             wanted[node], where["missing"]))
        before = (sent_before or {}).get(node, {})
        if where["source"] == "node store" and set(before) & {w.name for w in wanted[node]}:
            where["source"] = "push"  # found whole now, after the earlier fill of this start pushed some of it
        extra = [f for f in before if f not in {w.name for w in wanted[node]}]
        if extra and where["source"] != "driver path":
            stages.get(stages.call_with(stages.actors[idx[0]], remove, where["path"], extra))
        pushed[node] = {f: n for f, n in sent.items() if f not in extra}
        for i in idx:
            units_of, p = plans[i].layer_range.units(), plans[i].placement
            p.store_path, p.store_source = where["path"], where["source"]
            p.fetched = [u for u in units_of if store.units[u]["file"] in sent]
            p.fetched_bytes = sum(sent[store.units[u]["file"]] for u in p.fetched)
    stages.get([stages.call_with(stages.actors[i], use_store, plans[i].store_path) for idx in nodes.values()
                for i in idx])
    return pushed
