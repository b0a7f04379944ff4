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
   ``<file>.part`` and renamed once its sha256 matches. A push that was cut off resumes
   from the ``.part`` file's length.

Only the units of the node's own stages travel, plus the store's small side files
(config, tokenizer, manifest last). The driver prints one progress line per node while
it pushes; :func:`fill_stages` records on each stage's plan where its store is and which
of its units were pushed. Nothing here imports Ray: the driver's ``Stages`` runs these
functions in the stage processes (``call_with``).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
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


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
                         "a bigger disk) and load the model again; the push resumes where it stopped") from e
    finally:
        os.close(fd)


def finish(actor, root: str, spec: FileSpec) -> None:
    """Run in a stage's process: check a received file's sha256 and give it its name."""
    part = Path(root) / (spec.name + PART)
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    if file_sha256(part) != spec.sha256:
        part.unlink()
        raise StoreError(f"{spec.name} arrived at {root} with another sha256 than the driver's manifest: it was "
                         "deleted; load the model again to fetch it anew")
    os.replace(part, Path(root) / spec.name)


def use_store(actor, path: str) -> None:
    """Run in a stage's process: the stage loads its units from ``path``."""
    actor.store_path = path


# --------------------------------------------------------------------------- on the driver


def report_progress(node: str, done: int, total: int, files: int, of: int, last: bool) -> None:
    """Print one node's progress line (stderr)."""
    print(f"distlayer: node {node}: {files}/{of} files, {done / 2**20:.1f}/{total / 2**20:.1f} MiB from the "
          f"driver's node{' (done)' if last else ''}", file=sys.stderr, flush=True)


def push(stages: Stages, actor, node: str, store: LayerStore, root: str, files: list[FileSpec],
         missing: dict[str, int]) -> dict[str, int]:
    """Send ``files`` (from their offsets in ``missing``) to the node of ``actor``;
    returns the bytes sent of each file."""
    todo = [f for f in files if f.name in missing]
    total = sum(f.size - missing[f.name] for f in todo)
    sent, shown, flight, per_file = 0, 0.0, deque(), {}
    for k, spec in enumerate(todo):
        with open(store.path / spec.name, "rb") as src:
            src.seek(missing[spec.name])
            offset = missing[spec.name]
            while offset < spec.size:
                data = src.read(min(CHUNK_BYTES, spec.size - offset))
                if not data:
                    raise StoreError(f"{store.path / spec.name} is shorter than its manifest says: "
                                     f"{store.repair_hint()}")
                flight.append(stages.call_with(actor, receive, root, spec.name, offset, data))
                offset += len(data)
                sent += len(data)
                while len(flight) > IN_FLIGHT:
                    stages.get(flight.popleft())
                if time.monotonic() - shown >= PROGRESS_EVERY:
                    shown = time.monotonic()
                    report_progress(node, sent, total, k, len(todo), False)
        flight.append(stages.call_with(actor, finish, root, spec))
        per_file[spec.name] = spec.size - missing[spec.name]
    stages.get(list(flight))
    report_progress(node, sent, total, len(todo), len(todo), True)
    return per_file


def fill_stages(stages: Stages, plans: list, store: LayerStore, which: list[int] | None = None) -> None:
    """Make each stage's units available on its node, then point the stage at them.

    ``plans[i]`` is the plan of ``stages.actors[i]``; ``which`` names the stages to fill
    (default all; a stage started again after a failure alone, say). One stage per node
    (the first there) is asked and receives the units of all that node's stages.

    Sets on each plan ``store_path``, ``store_source`` (``"node store"``, ``"driver
    path"`` or ``"push"``), ``fetched`` (its units that were pushed) and ``fetched_bytes``
    (their bytes sent now: less than their size when a push resumed).
    """
    digest, side = manifest_digest(store), side_files(store)
    nodes: dict[str, list[int]] = {}
    for i in range(len(plans)) if which is None else which:
        nodes.setdefault(plans[i].node_id, []).append(i)
    wanted = {}
    for node, idx in nodes.items():
        units = [u for i in idx for u in plans[i].layer_range.units()]
        wanted[node] = unit_files(store, list(dict.fromkeys(units))) + side
    found = stages.get([stages.call_with(stages.actors[idx[0]], locate, str(store.path), store.source, digest,
                                         wanted[node]) for node, idx in nodes.items()])
    for (node, idx), where in zip(nodes.items(), found):
        sent = {}
        if where["missing"]:
            sent = push(stages, stages.actors[idx[0]], plans[idx[0]].node_ip, store, where["path"], wanted[node],
                        where["missing"])
        for i in idx:
            p = plans[i]
            p.store_path, p.store_source = where["path"], where["source"]
            p.fetched = [u for u in p.layer_range.units() if store.units[u]["file"] in sent]
            p.fetched_bytes = sum(sent[store.units[u]["file"]] for u in p.fetched)
    stages.get([stages.call_with(stages.actors[i], use_store, plans[i].store_path) for idx in nodes.values()
                for i in idx])
