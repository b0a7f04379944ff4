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
import errno
import functools
import hashlib
import inspect
import json
import logging
import math
import mmap
import os
import re
import shlex
import shutil
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import arch, quant, versions
from .config import spell
from .errors import ConfigError, StoreError
from .pages import Mapping
from .sources import (MANIFEST, PARTIAL, SHARDS_DIRNAME, UNIT_FILE_RE, WEIGHT_SUFFIXES, Checkpoint, convert_gguf, default_shards_dir,
                      fingerprint_change, resolve_source)

log = logging.getLogger("distlayer")
FORMAT_VERSION = 1
# safetensors' dtype names, as torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
# Offsets of tensors that LayerStore.read_into packs into a buffer are multiples of this.
READ_ALIGN = 256


# --------------------------------------------------------------------------- splitting


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave no half-written file behind
        raise


def _copy_side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and f.name not in (MANIFEST, PARTIAL):
            shutil.copy2(f, out / f.name)


def _check_disk(out: Path, need: int, where: str = "out") -> None:
    free = shutil.disk_usage(out).free
    if free < need * 1.02:
        raise StoreError(
            f"splitting needs about {need / 2**30:.2f} GiB in {out} but only {free / 2**30:.2f} GiB is free: "
            f"free some space or pass {where} on another disk"
        )


# errno values (and what safetensors' errors say) of a disk that has no room left.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def _writing(out: Path, name: str, need: int | None, done: int, where: str):
    """Within it, a failed write of ``name`` into ``out`` (a full disk, a read-only one)
    becomes one StoreError that says which file system, what it lacks, and that the
    same split resumes; ``need``: bytes still to write, if known; ``done``: units written."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else \
            int(m[1]) if (m := re.search(r"os error (\d+)", str(e))) else None
        why = e.strerror if isinstance(e, OSError) and e.strerror else \
            os.strerror(code) if code else str(e)
        mount = out.resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        resume = f"then run the same split again: it resumes after the {done} units already written" if done else \
            "then run the same split again"
        if code in _FULL:
            from .planner import fmt_bytes

            free = shutil.disk_usage(mount).free
            more = f" and about {fmt_bytes(need)} more is needed" if need else ""
            raise StoreError(f"cannot write {name} to {out} ({why}): the disk at {mount} has {fmt_bytes(free)} "
                             f"free{more}; free some space there or pass {where} on another disk, {resume}") from e
        raise StoreError(f"cannot write {name} to {out} ({why}): make {out} writable or pass another {where}, "
                         f"{resume}") from e


def split(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    compression: str | None = None,
    token: str | None = None,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
    *,
    prefix: str = "",
    out_key: str = "out",
) -> Path:
    """Split a checkpoint into a layer store; reuse a finished one, resume a partial one.

    A store records what it was split from (``Source.fingerprint``: the config and each
    weight file's name, size and time). A finished store is reused only while that still
    matches the checkpoint: a default store is split again when it does not (a checkpoint
    updated in place), and a store the caller named (``out``) is refused, so one model
    never runs on another's shards. Peak memory is about one unit's tensors.

    Args:
        model: local HF dir, ``.gguf`` file, or HF repo id.
        out: store directory; default under the model dir or the HF cache.
        compression: None, or ``"8bit"`` / ``"4bit"`` for block-wise compressed weight
            matrices (``quant.py``); each compression has its own default store.
        token: HF token for gated repos.
        progress: show a progress bar.
        force: split again even if a finished store exists (and whatever it was split from).
        verify: check every shard of a finished store (size and sha256) and rewrite the
            bad ones from the checkpoint (``distlayer split`` does).
        prefix, out_key: how messages name ``out`` (``config.spell``): ``"--"`` for the
            CLI's flags, ``""`` for Python's keywords; ``out_key`` is the caller's name for
            it (``"shards_dir"`` from :func:`open_store`).

    Returns:
        The store directory.

    Raises:
        ConfigError: ``compression`` is not None, ``"8bit"`` or ``"4bit"``.
        StoreError: the checkpoint is missing, damaged or incomplete, its model is not
            supported, ``out`` holds another model's store or another compression, or
            the disk is too full or fills up (then the same call resumes).
    """
    if compression is not None and compression not in quant.COMPRESSIONS:
        raise ConfigError(f"compression={compression!r}: use one of {', '.join(quant.COMPRESSIONS)}, "
                          "or leave it unset for uncompressed shards")
    versions.guard(names=versions.LOCAL)  # the split runs transformers' own weight conversion
    source = resolve_source(model, token)
    named = out is not None
    out = Path(out).expanduser() if named else default_shards_dir(source, compression)
    meta = {"source": source.name, "fingerprint": source.fingerprint(), "compression": compression}
    where = spell(prefix, out_key)
    if _reusable(out, meta, named, force, verify, where):
        return out
    created = not out.exists()
    try:
        with _writing(out, out.name, None, 0, where):
            out.mkdir(parents=True, exist_ok=True)
        src_dir = convert_gguf(source.path, out / "gguf-converted") if source.kind == "gguf" else source.path
        _split_dir(src_dir, out, progress, meta, where)
    except BaseException:
        if created and not any(out.glob("*.safetensors")):
            shutil.rmtree(out, ignore_errors=True)  # a failed split leaves no empty store behind
        raise
    finally:
        if source.kind == "gguf":
            shutil.rmtree(out / "gguf-converted", ignore_errors=True)
    return out


def _recorded(out: Path) -> dict | None:
    """What ``out`` holds: its manifest (or an interrupted split's partial one), ``{}``
    for a manifest that cannot be read, or None for no store at all."""
    for name in (MANIFEST, PARTIAL):
        if (out / name).is_file():
            try:
                data = json.loads((out / name).read_text())
                return data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                return {}
    return None


def _reusable(out: Path, meta: dict, named: bool, force: bool, verify: bool, where: str = "out") -> bool:
    """True when ``out`` holds a finished store of this source that needs no work. Clears
    a store to split again (a default store whose source changed, a damaged manifest,
    ``force``); refuses a named store of another source; with ``verify``, reopens the
    units whose shards are bad so the split rewrites exactly them. ``where``: the caller's
    name for ``out`` (``--out``, ``shards_dir``...), for messages."""
    recorded = _recorded(out)
    if recorded is None:
        return False
    why = fingerprint_change(recorded.get("fingerprint"), meta["fingerprint"]) if recorded else \
        "its manifest cannot be read"
    if recorded and not why and recorded.get("compression") != meta["compression"]:
        if named and not force:
            raise StoreError(f"{out} holds {compression_name(recorded.get('compression'))} shards of "
                             f"{meta['source']}, not {compression_name(meta['compression'])} ones: "
                             f"{compression_advice(recorded.get('compression'), meta['compression'], meta['source'], out, where)}")
        why = f"it holds {compression_name(recorded.get('compression'))} shards"
    if why and recorded and named and not force:
        fix = f"distlayer split {shlex.quote(meta['source'])} --out {shlex.quote(str(out))} --force"
        raise StoreError(f"{out} holds the layer store of {recorded.get('source', 'another checkpoint')}, which does not "
                         f"fit {meta['source']}: {why}. Pass another {where} (this model's own store), "
                         f"or split it there again with `{fix}`")
    if why or force:
        if why:
            log.warning("splitting %s again: %s", out, why)
        _clear(out)
        return False
    if not (out / MANIFEST).is_file():
        return False  # an interrupted split of this source: resume it
    if verify:
        units = recorded.get("units") if isinstance(recorded.get("units"), list) else []
        good = [u for u in units if _unit_file_ok(out, u, check_sha=True)]
        try:
            expected = set(arch.unit_order(int(recorded["num_layers"])))
        except (KeyError, TypeError, ValueError):
            expected = None
        config_changed = _store_config_changed(out, recorded)
        if len(good) < len(units) or expected is None or {u["name"] for u in good} != expected or config_changed:
            bad = sorted((expected or set()) - {u["name"] for u in good}) or \
                (["config.json"] if config_changed else ["the manifest"])
            log.warning("rewriting what is damaged or missing in %s: %s", out, ", ".join(bad))
            with _writing(out, PARTIAL, None, len(good), where):
                _write_json(out / PARTIAL, {**meta, "units": good})
            (out / MANIFEST).unlink()
            return False
    return True


def _clear(out: Path) -> None:
    """Remove a store's manifests and shards (nothing else in ``out``)."""
    for name in (MANIFEST, PARTIAL):
        (out / name).unlink(missing_ok=True)
    for f in out.glob("*.safetensors"):
        if UNIT_FILE_RE.match(f.name):
            f.unlink()


def _split_dir(src: Path, out: Path, progress: bool, meta: dict, where: str = "out") -> None:
    """Write every unit of the checkpoint dir ``src`` that ``out`` lacks, then the manifest.
    A write that fails (a full disk) is a StoreError; what was written stays, to resume."""
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
    sizes = {u: sum(t.numel() * t.element_size() for t in arch.unit_params(p, u).values())
             for u in arch.unit_order(n)}  # compressed shards take less: an upper bound

    def remaining() -> int:
        return sum(size for u, size in sizes.items() if u not in done)

    _check_disk(out, remaining(), where)

    def writing(name: str):
        return _writing(out, name, remaining(), len(done), where)

    with writing("the model's side files (config, tokenizer)"):
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
            tensors = {k: t.detach() for k, t in tensors.items()}
            with writing(f"{unit}.safetensors"):
                entry = _write_unit(out, unit, tensors) if meta["compression"] is None else \
                    _write_compressed_unit(out, unit, tensors, meta["compression"])
            done[unit] = entry
            with writing(PARTIAL):
                _write_json(out / PARTIAL, {**meta, "units": list(done.values())})
            if unit != arch.EMBED or arch.HEAD in done:
                _free_unit(p, unit)
                if unit == arch.HEAD:
                    _free_unit(p, arch.EMBED)
    manifest = {"format": FORMAT_VERSION, "model_type": config.model_type, "num_layers": n, **meta,
                STORE_CONFIG_SHA: _sha256(out / "config.json") if (out / "config.json").is_file() else None,
                "units": [done[u] for u in arch.unit_order(n)]}
    with writing(MANIFEST):
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
    # Before transformers 5.16 the loader also took a tensor-parallel plan (none here).
    extra = {"tp_plan": None} if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters else {}

    def load(keys: list[str]) -> None:
        sd = {k: ckpt.get(k) for k in keys}
        if sd:
            convert_and_load_state_dict_in_model(skeleton, sd, lc, **extra)

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
    """Write one unit's shard; returns its manifest entry."""
    return _write_shard(out, unit, tensors, tensors, {})


def _write_compressed_unit(out: Path, unit: str, tensors: dict[str, torch.Tensor], compression: str) -> dict:
    """Write one unit's shard with its weight matrices compressed; returns its manifest entry."""
    try:
        stored, layouts = quant.compress_unit(compression, unit, tensors)
    except ValueError as e:
        raise StoreError(f"{e}: split it without --compression") from None
    entry = _write_shard(out, unit, tensors, stored, layouts)
    entry["stored_bytes"] = sum(t.numel() * t.element_size() for t in stored.values())
    return entry


def _write_shard(out: Path, unit: str, tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor],
                 layouts: dict[str, dict]) -> dict:
    """Write ``stored`` as the shard of ``unit``; its manifest entry lists ``tensors`` (what
    the unit decodes to), with the layout of each compressed one."""
    fname = f"{unit}.safetensors"
    tmp = out / (fname + ".tmp")
    try:
        save_file({k: t.contiguous() for k, t in stored.items()}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / fname)
    except (OSError, SafetensorError):  # a full disk: _writing says so; no half-written file stays
        tmp.unlink(missing_ok=True)
        raise
    entry = {
        "name": unit,
        "file": fname,
        "bytes": (out / fname).stat().st_size,
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "sha256": _sha256(out / fname),
        "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for k, t in tensors.items()},
    }
    for k, lay in layouts.items():
        entry["tensors"][k]["compressed"] = lay
    return entry


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


# The manifest key of the sha256 of the store's own config.json, as the split wrote it.
STORE_CONFIG_SHA = "store_config_sha256"


def _store_config_changed(path: Path, manifest: dict) -> bool:
    """Whether the store's config.json is not the one its split wrote (a store written
    before stores recorded it: never)."""
    want = manifest.get(STORE_CONFIG_SHA)
    if not want:
        return False
    f = path / "config.json"
    return not f.is_file() or _sha256(f) != want


def _unit_file_ok(out: Path, unit, check_sha: bool = False) -> bool:
    """Whether a manifest entry is whole and its shard has the recorded size (and sha256)."""
    try:
        f, size, name = out / unit["file"], int(unit["bytes"]), unit["name"]
    except (KeyError, TypeError, ValueError):
        return False
    if not (isinstance(name, str) and f.is_file() and f.stat().st_size == size):
        return False
    return not check_sha or _sha256(f) == unit.get("sha256")


# --------------------------------------------------------------------------- loading


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
        if _store_config_changed(self.path, self.manifest):
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
        total = 0
        for t in u["tensors"].values():
            numel = 1
            for s in t["shape"]:
                numel *= s
            stored = getattr(torch, t["dtype"])
            size = dtype.itemsize if stored.is_floating_point else stored.itemsize
            total += numel * size
        return total

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
            digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256(f)
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
            with open(f, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): {self.repair_hint()}") from e
        try:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            return _copy_tensors(mapped, 8 + size, header, dtype, out, align, f"unit {name}")
        finally:
            with contextlib.suppress(BufferError):  # a view of the map still alive after an error
                mapped.close()

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
            stored = getattr(torch, t["dtype"])
            want = dtype if dtype is not None and stored.is_floating_point else stored
            nbytes = math.prod(t["shape"]) * want.itemsize
            views[key] = out[offset:offset + nbytes].view(want).view(t["shape"])
            offset += -(-nbytes // align) * align
        try:
            stored = load_file(f)
        except Exception as e:
            raise StoreError(f"shard {f} of unit {name} cannot be read ({e}): {self.repair_hint()}") from e
        return self._expand(name, f, stored, dtype, views)

    def packed_bytes(self, name: str, dtype: torch.dtype | None = None, align: int = READ_ALIGN) -> int:
        """Bytes :meth:`read_into` needs for unit ``name`` in ``dtype``: each tensor's bytes
        rounded up to a multiple of ``align``."""
        total = 0
        for t in self.units[name]["tensors"].values():
            stored = getattr(torch, t["dtype"])
            size = dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize
            total += -(-math.prod(t["shape"]) * size // align) * align
        return total


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


def _copy_tensors(mapped: mmap.mmap, data_start: int, header: dict, dtype, out: torch.Tensor, align: int,
                  what: str) -> dict[str, torch.Tensor]:
    """Copy the tensors a safetensors ``header`` describes from the mapped file into ``out``."""
    tensors, offset = {}, 0
    for key, (stored, shape, begin, end) in _header_tensors(header, what).items():
        want = dtype if dtype is not None and stored.is_floating_point else stored
        numel = (end - begin) // stored.itemsize
        nbytes = numel * want.itemsize
        if offset + nbytes > out.numel():
            raise StoreError(f"{what} needs more than the {out.numel()} bytes of its buffer: size the buffer "
                             "with LayerStore.packed_bytes")
        view = out[offset:offset + nbytes].view(want).view(shape)
        if numel:
            view.copy_(torch.frombuffer(mapped, dtype=stored, count=numel, offset=data_start + begin).view(shape))
        tensors[key] = view
        offset += -(-nbytes // align) * align
    return tensors


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
