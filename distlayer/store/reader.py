"""Opening a layer store: :class:`LayerStore` (the manifest, checked shards, one-unit
loads, reads into a buffer, maps) and :func:`open_store` (open a store, splitting the
checkpoint first when there is none yet: ``writer.py``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import re
import shlex
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import arch, quant, versions
from ..errors import StoreError
from ..files import file_sha256
from ..pages import Mapping
from ..sources import MANIFEST, PARTIAL, SHARDS_DIRNAME
from .format import READ_ALIGN, align_up, compression_advice, compression_name, store_config_changed, tensor_bytes
from .writer import split

# safetensors' dtype names, as torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _loaded_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored in ``stored`` is loaded in: ``dtype`` for a floating one
    (when given), else as stored."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def _loaded_bytes(spec: dict, dtype: torch.dtype | None) -> int:
    """Bytes a tensor the manifest lists (``spec``: its dtype and shape) takes loaded in ``dtype``."""
    return tensor_bytes(spec["shape"], _loaded_dtype(getattr(torch, spec["dtype"]), dtype))


class LayerStore:
    """A split checkpoint on local disk: its manifest, config, and one-unit loads.

    Opening checks that the manifest lists every unit of the model its config describes.
    The first load of each unit checks its sha256; every later load checks the file's
    size, time and inode, and checks the sha256 again if any changed, so a corrupt,
    truncated or replaced shard is named with the command that repairs it, never used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        mf = self.path / MANIFEST
        if not mf.is_file():
            hint = " (a split was interrupted: run `distlayer split` again to finish it)" \
                if (self.path / PARTIAL).is_file() else ""
            raise StoreError(
                f"no {MANIFEST} in {self.path}{hint}: this is not a finished layer store; "
                "create it with `distlayer split MODEL --out DIR`"
            )
        text = mf.read_text(errors="replace")
        found = re.search(r'"source":\s*"((?:[^"\\]|\\.)*)"', text)  # even from a manifest that does not parse
        beside = self.path.parent if self.path.name == SHARDS_DIRNAME else None  # a default store: the model is its folder
        self.source = json.loads(f'"{found.group(1)}"') if found else \
            str(beside) if beside is not None and (beside / "config.json").is_file() else "MODEL"
        try:
            self.manifest = json.loads(text)
            self.units = {u["name"]: u for u in self.manifest["units"]}
            self.num_layers = int(self.manifest["num_layers"])
            for u in self.units.values():
                u["file"], u["bytes"], u["sha256"]  # noqa: B018 (each unit must have them)
            self.compression = self.manifest.get("compression")
            if self.compression is not None and self.compression not in quant.COMPRESSIONS:
                raise ValueError(f"unknown compression {self.compression!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{mf} is damaged ({type(e).__name__}: {e}): {self.repair_hint()}") from e
        missing = [u for u in arch.unit_order(self.num_layers) if u not in self.units]
        if missing:
            raise StoreError(f"{mf} lists no unit {', '.join(missing[:3])}: the store is incomplete; {self.repair_hint()}")
        self._verified: dict[str, tuple] = {}  # unit -> (size, mtime_ns, inode) when its sha256 last matched
        self._lock = threading.Lock()

    def repair_hint(self) -> str:
        """What to run to rewrite this store's bad shards."""
        return (f"repair it with `distlayer split {shlex.quote(self.source)} --out {shlex.quote(str(self.path))}` "
                "(it rewrites only the bad shards)")

    def check_compression(self, compression: str | None) -> None:
        """Refuse to be opened as a store of another compression than the one it holds."""
        if compression != self.compression:
            raise StoreError(f"{self.path} holds {compression_name(self.compression)} shards but compression="
                             f"{compression!r} was asked for: "
                             f"{compression_advice(self.compression, compression, self.source, self.path)}")

    def check_config(self) -> None:
        """Refuse a manifest whose layer count is not the config's, and a config.json
        changed since the split (the manifest records its sha256, as the store records
        the checkpoint's)."""
        n = getattr(self.config.get_text_config(), "num_hidden_layers", self.num_layers)
        if n != self.num_layers:
            raise StoreError(f"{self.path / MANIFEST} lists {self.num_layers} layers but the model's config.json has "
                             f"num_hidden_layers={n}: the store does not match its config; {self.repair_hint()}")
        if store_config_changed(self.path, self.manifest):
            raise StoreError(f"{self.path / 'config.json'} changed after the split, so the shards may not fit it: "
                             f"restore it, or {self.repair_hint()}")

    @functools.cached_property
    def config(self):
        """The model's transformers config (read once)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def unit_bytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes the unit's weights take in memory, in ``dtype`` (default: as stored)."""
        u = self.units[name]
        if dtype is None:
            return int(u["weight_bytes"])
        return sum(_loaded_bytes(t, dtype) for t in u["tensors"].values())

    def read_bytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes one read of the unit costs, counted as :meth:`unit_bytes` counts them in
        ``dtype`` for an uncompressed unit; for a compressed one, its shard's size."""
        u = self.units[name]
        return int(u["bytes"]) if self.compression else self.unit_bytes(name, dtype)

    def shard(self, name: str, sha: bool = True, data=None) -> Path:
        """Unit ``name``'s shard file, checked: it exists and has the manifest's size; its
        sha256 matches on first use and whenever its size, time or inode changed since
        (unless ``sha`` is False: a map made now, checked as its pages are read).

        Args:
            data: the file's bytes already in memory (its map), to hash instead of
                reading the file again.

        Raises:
            StoreError: the shard is missing, truncated, replaced or corrupt, with the
                command that repairs it.
        """
        u = self.units.get(name)
        if u is None:
            raise StoreError(f"unit {name!r} is not in {self.path / MANIFEST}: the store does not match this model")
        f = self.path / u["file"]
        again = self.repair_hint()
        try:
            st = f.stat()
        except FileNotFoundError:
            raise StoreError(f"shard {f} of unit {name} is missing: {again}") from None
        if st.st_size != u["bytes"]:
            raise StoreError(
                f"shard {f} of unit {name} is {st.st_size} bytes but the manifest says {u['bytes']}: "
                f"the file is truncated or overwritten; {again}"
            )
        seen = (st.st_size, st.st_mtime_ns, st.st_ino)
        if sha and self._verified.get(name) != seen:  # first load, or the file changed since it was checked
            digest = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(f)
            if digest != u["sha256"]:
                with self._lock:
                    self._verified.pop(name, None)
                raise StoreError(f"shard {f} of unit {name} fails its sha256 check: the file is corrupt or was "
                                 f"changed; {again}")
            with self._lock:
                self._verified[name] = seen
        return f

    def check_shards(self, names=None) -> None:
        """Check the shards of units ``names`` (default: all) before they are served from
        another process (``fill.py``): each exists at the manifest's size, and one whose
        sha256 this store verified before is hashed again if its size, time or inode changed
        since (the stage's first load of each unit checks its sha256).

        Raises:
            StoreError: a shard is missing, truncated or corrupt, with the command that repairs it.
        """
        for name in self.units if names is None else names:
            self.shard(name, sha=name in self._verified)

    def note_verified(self, name: str, st: os.stat_result) -> None:
        """Record that unit ``name``'s shard, as ``st`` describes the file, matched its
        sha256 when it was hashed elsewhere (while ``fill.push`` sent it)."""
        with self._lock:
            self._verified[name] = (st.st_size, st.st_mtime_ns, st.st_ino)

    def load(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read one unit's tensors, cast floating ones to ``dtype``.

        Raises:
            StoreError: the shard is missing, truncated or corrupt.
        """
        f = self.shard(name)
        try:
            tensors = load_file(f, device=str(device))
        except Exception as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): split the model again") from e
        if self.compression:
            return self._expand(name, f, tensors, dtype)
        if dtype is not None:
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        return tensors

    def _expand(self, name: str, f: Path, stored: dict[str, torch.Tensor], dtype: torch.dtype | None,
                out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A compressed unit's tensors decoded from its ``stored`` ones (into ``out``'s
        tensors, when given)."""
        try:
            return quant.expand_unit(stored, self.units[name]["tensors"], dtype, out)
        except (KeyError, ValueError, RuntimeError) as e:
            raise StoreError(f"shard {f} of unit {name} does not hold what the manifest says ({type(e).__name__}: "
                             f"{e}): {self.repair_hint()}") from e

    def read_into(self, name: str, dtype: torch.dtype | None, out: torch.Tensor,
                  align: int = READ_ALIGN) -> dict[str, torch.Tensor]:
        """Read one unit's tensors straight into ``out``, a flat ``uint8`` buffer (pinned
        host memory, for a CUDA stage), with one copy from the page cache and floating
        tensors cast to ``dtype`` in that same copy.

        Tensors are packed in file order, each at an offset that is a multiple of
        ``align``; at most :meth:`packed_bytes` of ``out`` are written.

        Returns:
            The unit's tensors by name, as views of ``out``.

        Raises:
            StoreError: the shard is missing, truncated or corrupt, or ``out`` is too small.
        """
        f = self.shard(name)
        if self.compression:
            return self._read_compressed_into(name, f, dtype, out, align)
        size, header = self._header(name, f)
        try:
            with open(f, "rb", buffering=0) as fh:
                return _copy_tensors(fh, 8 + size, header, dtype, out, align, f"unit {name}")
        except OSError as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): {self.repair_hint()}") from e

    def _header(self, name: str, f: Path) -> tuple[int, dict]:
        """A shard's safetensors header: its length in bytes, and the header itself."""
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                return size, json.loads(fh.read(size))
        except (OSError, ValueError) as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): {self.repair_hint()}") from e

    def maps_in_place(self, dtype: torch.dtype | None) -> bool:
        """Whether :meth:`map` can give this store's units in ``dtype``: they are stored
        uncompressed, their floating tensors in ``dtype``."""
        if self.compression:
            return False
        floating = [t["dtype"] for u in self.units.values() for t in u["tensors"].values()
                    if getattr(torch, t["dtype"]).is_floating_point]
        return dtype is None or all(d == str(dtype).removeprefix("torch.") for d in floating)

    def map(self, name: str, random: bool = False) -> Mapping:
        """Unit ``name``'s shard mapped into memory, its tensors as views of the map, in
        the stored dtype: no copy; the page cache's pages are the tensors (see
        ``pages.py``). ``random``: rows are read here and there (the embeddings).
        Its sha256 is not read here: call :meth:`shard` before each use of its pages.

        Raises:
            StoreError: the shard is missing, truncated or corrupt, or compressed (a
                compressed store's embeddings are kept as they are, and map).
        """
        f = self.shard(name, sha=False)
        size, header = self._header(name, f)
        listed = self.units[name]["tensors"]
        if set(header) - {"__metadata__"} != set(listed) or any(
                SAFETENSORS_DTYPES.get(header[k]["dtype"]) != getattr(torch, t["dtype"]) for k, t in listed.items()):
            raise StoreError(f"unit {name} of {self.path} is stored compressed: it cannot be mapped, load it instead")
        try:
            return Mapping(f, 8 + size, _header_tensors(header, f"unit {name}"), random)
        except (OSError, ValueError, RuntimeError) as e:
            raise StoreError(f"shard {f} of unit {name} cannot be mapped ({e}): {self.repair_hint()}") from e

    def _read_compressed_into(self, name: str, f: Path, dtype: torch.dtype | None, out: torch.Tensor,
                              align: int) -> dict[str, torch.Tensor]:
        """:meth:`read_into` for a compressed unit: its tensors decoded into ``out``."""
        if self.packed_bytes(name, dtype, align) > out.numel():
            raise StoreError(f"unit {name} needs more than the {out.numel()} bytes of its buffer: size the buffer "
                             "with LayerStore.packed_bytes")
        views, offset = {}, 0
        for key, t in self.units[name]["tensors"].items():
            want = _loaded_dtype(getattr(torch, t["dtype"]), dtype)
            nbytes = tensor_bytes(t["shape"], want)
            views[key] = out[offset:offset + nbytes].view(want).view(t["shape"])
            offset += align_up(nbytes, align)
        try:
            stored = load_file(f)
        except Exception as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): {self.repair_hint()}") from e
        return self._expand(name, f, stored, dtype, views)

    def packed_bytes(self, name: str, dtype: torch.dtype | None = None, align: int = READ_ALIGN) -> int:
        """Bytes :meth:`read_into` needs for unit ``name`` in ``dtype``: each tensor's bytes
        rounded up to a multiple of ``align``."""
        return sum(align_up(_loaded_bytes(t, dtype), align) for t in self.units[name]["tensors"].values())


def _header_tensors(header: dict, what: str) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    """The tensors a safetensors ``header`` describes: ``{name: (dtype, shape, begin, end)}``,
    byte offsets from the start of the data, in file order."""
    tensors = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise StoreError(f"{what}: tensor {key} has dtype {spec['dtype']}, which distlayer cannot stream")
        tensors[key] = (dtype, tuple(spec["shape"]), *spec["data_offsets"])
    return tensors


def _copy_tensors(fh, data_start: int, header: dict, dtype, out: torch.Tensor, align: int,
                  what: str) -> dict[str, torch.Tensor]:
    """Copy the tensors a safetensors ``header`` describes from the open file ``fh`` into
    ``out``. A tensor loaded in its stored dtype is read straight into ``out`` (``preadv``:
    the kernel copies from the page cache, without the GIL or torch's threads, so several
    loader threads read side by side); one cast on the way is read through a map of the
    file and cast by torch in its copy."""
    tensors, offset, mapped = {}, 0, None
    try:
        for key, (stored, shape, begin, end) in _header_tensors(header, what).items():
            want = _loaded_dtype(stored, dtype)
            numel = (end - begin) // stored.itemsize
            nbytes = tensor_bytes(shape, want)
            if offset + nbytes > out.numel():
                raise StoreError(f"{what} needs more than the {out.numel()} bytes of its buffer: size the buffer "
                                 "with LayerStore.packed_bytes")
            flat = out[offset:offset + nbytes]
            if numel and want == stored:
                _pread_exact(fh, memoryview(flat.numpy()), data_start + begin, what)
            elif numel:
                if mapped is None:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                flat.view(want).view(shape).copy_(
                    torch.frombuffer(mapped, dtype=stored, count=numel, offset=data_start + begin).view(shape))
            tensors[key] = flat.view(want).view(shape)
            offset += align_up(nbytes, align)
    finally:
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a view of the map still alive after an error
                mapped.close()
    return tensors


def _pread_exact(fh, view: memoryview, at: int, what: str) -> None:
    """Fill ``view`` with the file's bytes from offset ``at``."""
    got = 0
    while got < len(view):
        n = os.preadv(fh.fileno(), [view[got:]], at + got)
        if not n:
            raise StoreError(f"{what}: its shard ended {len(view) - got} bytes early (truncated while read): "
                             "split the model again")
        got += n


def open_configured(model: str | os.PathLike, cfg, progress: bool = True) -> LayerStore:
    """:func:`open_store` with a :class:`~distlayer.config.PipelineConfig`'s store settings
    (``shards_dir``, ``compression``, ``hf_token``) and its words for them in messages."""
    return open_store(model, cfg.shards_dir, cfg.compression, cfg.hf_token, progress, prefix=cfg.messages_prefix)


def open_store(
    model: str | os.PathLike,
    shards_dir: str | os.PathLike | None = None,
    compression: str | None = None,
    token: str | None = None,
    progress: bool = True,
    prefix: str = "",
) -> LayerStore:
    """Opens the layer store for ``model``, splitting the checkpoint first if needed.

    Args:
        model: a layer store dir, local HF dir, ``.gguf`` file, or HF repo id.
        shards_dir: store directory; default under the model dir or the HF cache.
        compression: None, ``"8bit"`` or ``"4bit"``: the store must hold that compression.
        token: HF token for gated repos.
        progress: show a progress bar while splitting.
        prefix: how messages name the settings, as ``config.build``'s (``"--"``: the CLI's
            flags; a :class:`~distlayer.config.PipelineConfig` carries it as ``messages_prefix``).

    Returns:
        The opened :class:`LayerStore`.

    Raises:
        StoreError: the checkpoint or store is missing, damaged or incomplete, or holds
            another compression.
    """
    versions.guard(names=versions.LOCAL)  # before transformers reads the model's config
    path = Path(model).expanduser()
    if shards_dir is None and path.is_dir() and (path / MANIFEST).is_file():
        store = LayerStore(path)
    else:
        store = LayerStore(split(model, shards_dir, compression, token, progress, prefix=prefix, out_key="shards_dir"))
    store.check_compression(compression)
    store.check_config()
    return store
