"""Files on disk: a file's sha256, and a file written whole or not at all. Pure: no torch.

A store's shards and manifests (``store/writer.py``) and the files a node receives
(``fill.py``) are written under a temporary name, flushed to disk, then renamed, so a
reader never sees half a file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

TMP = ".tmp"
"""Suffix of a file being written by :func:`atomic_write`."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush the written file ``tmp`` to disk, then give it the name ``path`` in one step
    (a file already there is replaced)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` whole or not at all.

    Within it, write the file at the path it yields (``path`` with :data:`TMP` added);
    on leaving, that file is flushed to disk and renamed to ``path``. If the write fails
    (a full disk, an interrupt), the temporary file is removed and the error goes on.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP)
    try:
        yield tmp
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file stays behind
        raise
