"""What the writer and the reader of a layer store agree on: the manifest's record of the
store's own config, how a compression is named in messages, and a tensor's bytes.

No torch import: a dtype here is anything with an ``itemsize`` (a ``torch.dtype``).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from ..files import file_sha256

FORMAT_VERSION = 1
"""The manifest's ``format``."""
STORE_CONFIG_SHA = "store_config_sha256"
"""The manifest key of the sha256 of the store's own config.json, as the split wrote it."""
READ_ALIGN = 256
"""Offsets of tensors that ``LayerStore.read_into`` packs into a buffer are multiples of this."""


def tensor_bytes(shape, dtype) -> int:
    """Bytes a tensor of ``shape`` takes in ``dtype``."""
    return math.prod(shape) * dtype.itemsize


def align_up(n: int, align: int = READ_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def store_config_changed(path: Path, manifest: dict) -> bool:
    """Whether the config.json of the store at ``path`` is not the one its split wrote (a
    store written before stores recorded it: never)."""
    want = manifest.get(STORE_CONFIG_SHA)
    if not want:
        return False
    f = path / "config.json"
    return not f.is_file() or file_sha256(f) != want


def compression_name(compression: str | None) -> str:
    """``"8bit"``, ``"4bit"`` or ``"uncompressed"``, for messages."""
    return compression or "uncompressed"


def compression_advice(held: str | None, want: str | None, source: str, path: Path,
                       where: str = "shards_dir (--shards-dir)") -> str:
    """What to change when a store of ``held`` compression is opened as ``want``;
    ``where``: the caller's name for the store directory."""
    use = f"compression={held!r} (--compression {held})" if held else "no compression (leave --compression out)"
    again = f"distlayer split {shlex.quote(source)} --out {shlex.quote(str(path))}" \
        + (f" --compression {want}" if want else "") + " --force"
    return (f"ask for {use} to use it; or, for {compression_name(want)} shards, pass another {where}, "
            f"leave it out to use the model's own {compression_name(want)} store, or rewrite "
            f"this one with `{again}`")
