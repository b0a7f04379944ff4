"""The layer store: a checkpoint split into one safetensors file per unit.

A unit is the embeddings, one decoder layer, the final norm or the head. The store's
``manifest.json`` lists, for every unit, its file, tensor names, dtypes, shapes, byte
size and sha256. Splitting converts checkpoint tensors into the model's own parameter
layout with transformers' loading code, so a unit file loads straight into the model.
Finding the checkpoint (local dir, HF repo id, ``.gguf``) and reading its tensors is
``sources.py``'s job.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import arch
from .errors import ConfigError, StoreError
from .sources import MANIFEST, PARTIAL, WEIGHT_SUFFIXES, Checkpoint, convert_gguf, default_shards_dir, resolve_source

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- splitting


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy_side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and f.name not in (MANIFEST, PARTIAL):
            shutil.copy2(f, out / f.name)


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need * 1.02:
        raise StoreError(
            f"splitting needs about {need / 2**30:.2f} GiB in {out} but only {free / 2**30:.2f} GiB is free: "
            "free some space or pass another --out / shards_dir"
        )


def split(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    compression: str | None = None,
    token: str | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Split a checkpoint into a layer store; reuse a finished one, resume a partial one.

    Peak memory is about one unit's tensors: checkpoint files are read tensor by
    tensor, and each unit is written and dropped before the next is read.

    Args:
        model: local HF dir, ``.gguf`` file, or HF repo id.
        out: store directory; default under the model dir or the HF cache.
        compression: must be None for now (block-wise 8/4-bit is a later feature).
        token: HF token for gated repos.
        progress: show a progress bar.
        force: re-split even if a finished store exists.

    Returns:
        The store directory.

    Raises:
        ConfigError: ``compression`` is set.
        StoreError: the checkpoint is missing, damaged or incomplete, its model is not
            supported, or the disk is too full.
    """
    if compression is not None:
        raise ConfigError(
            f"compression={compression!r}: compressed shards are not available in this version; "
            "leave compression unset"
        )
    source = resolve_source(model, token)
    out = Path(out).expanduser() if out is not None else default_shards_dir(source, compression)
    if (out / MANIFEST).is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    src_dir = convert_gguf(source.path, out / "gguf-converted") if source.kind == "gguf" else source.path
    _split_dir(src_dir, out, progress)
    if source.kind == "gguf":
        shutil.rmtree(out / "gguf-converted", ignore_errors=True)
    return out


def _split_dir(src: Path, out: Path, progress: bool) -> None:
    """Write every unit of the checkpoint dir ``src`` that ``out`` lacks, then the manifest."""
    from transformers import AutoConfig
    from tqdm.auto import tqdm

    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:
        raise StoreError(f"cannot read {src / 'config.json'} ({e}): the model directory is damaged") from e
    skeleton = arch.build_skeleton(config, dtype=arch.checkpoint_dtype(config))
    p = arch.parts(skeleton)  # unsupported models fail here, before any weights are read
    ckpt = Checkpoint(src)
    n = len(p.layers)
    raw = _raw_keys_by_unit(ckpt, n, src)
    partial = json.loads((out / PARTIAL).read_text()) if (out / PARTIAL).is_file() else {}
    done = {u["name"]: u for u in partial.get("units", []) if _unit_file_ok(out, u)}
    if arch.HEAD not in done:
        done.pop(arch.EMBED, None)  # a tied head needs the embeddings loaded again
    # Sized from the model's own tensors: a tied head is written as its own copy.
    todo_bytes = sum(t.numel() * t.element_size() for u in arch.unit_order(n) if u not in done
                     for t in arch.unit_params(p, u).values())
    _check_disk(out, todo_bytes)
    _copy_side_files(src, out)
    load = _unit_loader(skeleton, ckpt)
    # The head goes right after the embeddings: a tied head shares their tensor.
    order = [arch.EMBED, arch.HEAD, *(arch.layer_unit(i) for i in range(n)), arch.NORM]
    with _quiet_transformers():
        for unit in tqdm(order, desc=f"split {src.name}", unit="unit", disable=not progress):
            if unit in done:
                continue
            load(raw[unit])
            tensors = arch.unit_params(p, unit)
            if unit == arch.HEAD:
                tensors = arch.tie_head(p, tensors)
            missing = [k for k, t in tensors.items() if t.device.type == "meta"]
            if missing:
                raise StoreError(f"{src}: no weights found for {missing[:3]} (unit {unit}): the checkpoint is incomplete")
            done[unit] = _write_unit(out, unit, {k: t.detach() for k, t in tensors.items()})
            _write_json(out / PARTIAL, {"units": list(done.values())})
            if unit != arch.EMBED or arch.HEAD in done:
                _free_unit(p, unit)
                if unit == arch.HEAD:
                    _free_unit(p, arch.EMBED)
    manifest = {"format": FORMAT_VERSION, "model_type": config.model_type, "num_layers": n, "compression": None,
                "source": str(src), "units": [done[u] for u in arch.unit_order(n)]}
    _write_json(out / MANIFEST, manifest)
    (out / PARTIAL).unlink(missing_ok=True)


def _raw_keys_by_unit(ckpt: Checkpoint, n: int, src: Path) -> dict[str, list[str]]:
    """The checkpoint's tensor names, grouped by the unit each belongs to."""
    raw: dict[str, list[str]] = {u: [] for u in arch.unit_order(n)}
    for key in ckpt.files:
        raw.setdefault(arch.unit_of_raw_key(key), []).append(key)
    extra = set(raw) - set(arch.unit_order(n))
    if extra:
        raise StoreError(f"{src} has tensors for layers {sorted(extra)} beyond num_hidden_layers={n}: "
                         "config and weights disagree")
    return raw


def _unit_loader(skeleton, ckpt: Checkpoint):
    """``load(keys)``: read those checkpoint tensors into ``skeleton`` with transformers'
    own conversion (renamed keys, fused experts), so they land in the model's layout."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    lc = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(skeleton))

    def load(keys: list[str]) -> None:
        sd = {k: ckpt.get(k) for k in keys}
        if sd:
            convert_and_load_state_dict_in_model(skeleton, sd, lc)

    return load


@contextlib.contextmanager
def _quiet_transformers():
    """transformers without its progress bars and warnings, restored after."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _free_unit(p: arch.Parts, unit: str) -> None:
    if unit == arch.EMBED:
        for name, mod in p.base.named_children():
            if name not in ("layers", "norm"):
                mod.to("meta")
    elif unit == arch.HEAD:
        p.model.lm_head.to("meta")
    elif unit == arch.NORM:
        p.base.norm.to("meta")
    else:
        p.layers[int(unit.split(".")[1])].to("meta")


def _write_unit(out: Path, unit: str, tensors: dict[str, torch.Tensor]) -> dict:
    fname = f"{unit}.safetensors"
    tmp = out / (fname + ".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / fname)
    return {
        "name": unit,
        "file": fname,
        "bytes": (out / fname).stat().st_size,
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "sha256": _sha256(out / fname),
        "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for k, t in tensors.items()},
    }


def _unit_file_ok(out: Path, unit: dict) -> bool:
    f = out / unit["file"]
    return f.is_file() and f.stat().st_size == unit["bytes"]


# --------------------------------------------------------------------------- loading


class LayerStore:
    """A split checkpoint on local disk: its manifest, config, and one-unit loads.

    Every load checks the file's size against the manifest; the first load of each
    unit also checks its sha256, so a corrupt or truncated shard is named, not used.
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
        try:
            self.manifest = json.loads(mf.read_text())
            self.units = {u["name"]: u for u in self.manifest["units"]}
            self.num_layers = int(self.manifest["num_layers"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{mf} is damaged ({e}): delete {self.path} and split the model again") from e
        self._verified: set[str] = set()
        self._lock = threading.Lock()

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
        total = 0
        for t in u["tensors"].values():
            numel = 1
            for s in t["shape"]:
                numel *= s
            stored = getattr(torch, t["dtype"])
            size = dtype.itemsize if stored.is_floating_point else stored.itemsize
            total += numel * size
        return total

    def _check(self, name: str) -> Path:
        u = self.units.get(name)
        if u is None:
            raise StoreError(f"unit {name!r} is not in {self.path / MANIFEST}: the store does not match this model")
        f = self.path / u["file"]
        again = f"delete it and run `distlayer split MODEL --out {self.path}` to rewrite it"
        if not f.is_file():
            raise StoreError(f"shard {f} of unit {name} is missing: {again}")
        size = f.stat().st_size
        if size != u["bytes"]:
            raise StoreError(
                f"shard {f} of unit {name} is {size} bytes but the manifest says {u['bytes']}: "
                f"the file is truncated or overwritten; {again}"
            )
        if name not in self._verified:
            if _sha256(f) != u["sha256"]:
                raise StoreError(f"shard {f} of unit {name} fails its sha256 check: the file is corrupt; {again}")
            with self._lock:
                self._verified.add(name)
        return f

    def load(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read one unit's tensors, cast floating ones to ``dtype``.

        Raises:
            StoreError: the shard is missing, truncated or corrupt.
        """
        f = self._check(name)
        try:
            tensors = load_file(f, device=str(device))
        except Exception as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): split the model again") from e
        if dtype is not None:
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        return tensors


def open_store(
    model: str | os.PathLike,
    shards_dir: str | os.PathLike | None = None,
    compression: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> LayerStore:
    """Opens the layer store for ``model``, splitting the checkpoint first if needed.

    Args:
        model: a layer store dir, local HF dir, ``.gguf`` file, or HF repo id.
        shards_dir: store directory; default under the model dir or the HF cache.
        compression: must be None for now.
        token: HF token for gated repos.
        progress: show a progress bar while splitting.

    Returns:
        The opened :class:`LayerStore`.

    Raises:
        StoreError: the checkpoint or store is missing, damaged or incomplete.
    """
    path = Path(model).expanduser()
    if shards_dir is None and path.is_dir() and (path / MANIFEST).is_file():
        return LayerStore(path)
    return LayerStore(split(model, shards_dir, compression, token, progress))
