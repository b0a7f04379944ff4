"""Splitting a checkpoint into a layer store (what ``distlayer split`` runs).

Each unit (the embeddings, one decoder layer, the final norm, the head) is written as one
safetensors file, and ``manifest.json`` lists, for every unit, its file, tensor names,
dtypes, shapes, byte size and sha256. Splitting converts checkpoint tensors into the
model's own parameter layout with transformers' loading code, so a unit file loads
straight into the model. A split that stops (a full disk, an interrupt) leaves
``manifest.partial.json`` and resumes after the units it lists. Finding the checkpoint
(local dir, HF repo id, ``.gguf``) and reading its tensors is ``sources.py``'s job;
opening a finished store is ``reader.py``'s.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .. import arch, quant, versions
from ..config import spell
from ..errors import ConfigError, StoreError
from ..files import atomic_write, file_sha256
from ..sources import (MANIFEST, PARTIAL, UNIT_FILE_RE, WEIGHT_SUFFIXES, Checkpoint, convert_gguf, default_shards_dir,
                       fingerprint_change, resolve_source)
from ..units import layer_index
from .format import FORMAT_VERSION, STORE_CONFIG_SHA, compression_advice, compression_name, store_config_changed, \
    tensor_bytes

log = logging.getLogger("distlayer")


def _write_json(path: Path, data) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _bytes_of(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes ``tensors`` take together."""
    return sum(tensor_bytes(t.shape, t.dtype) for t in tensors.values())


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
            from ..planner import fmt_bytes

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
        config_changed = store_config_changed(out, recorded)
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
    # Sized from the model's own tensors: a tied head is written as its own copy; compressed
    # shards take less (an upper bound).
    sizes = {u: _bytes_of(arch.unit_params(p, u)) for u in arch.unit_order(n)}

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
                STORE_CONFIG_SHA: file_sha256(out / "config.json") if (out / "config.json").is_file() else None,
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
        p.layers[layer_index(unit)].to("meta")


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
    entry["stored_bytes"] = _bytes_of(stored)
    return entry


def _write_shard(out: Path, unit: str, tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor],
                 layouts: dict[str, dict]) -> dict:
    """Write ``stored`` as the shard of ``unit``; its manifest entry lists ``tensors`` (what
    the unit decodes to), with the layout of each compressed one."""
    fname = f"{unit}.safetensors"
    with atomic_write(out / fname) as tmp:  # a full disk: _writing says so; no half-written file stays
        save_file({k: t.contiguous() for k, t in stored.items()}, tmp)
    entry = {
        "name": unit,
        "file": fname,
        "bytes": (out / fname).stat().st_size,
        "weight_bytes": _bytes_of(tensors),
        "sha256": file_sha256(out / fname),
        "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for k, t in tensors.items()},
    }
    for k, lay in layouts.items():
        entry["tensors"][k]["compressed"] = lay
    return entry


def _unit_file_ok(out: Path, unit, check_sha: bool = False) -> bool:
    """Whether a manifest entry is whole and its shard has the recorded size (and sha256)."""
    try:
        f, size, name = out / unit["file"], int(unit["bytes"]), unit["name"]
    except (KeyError, TypeError, ValueError):
        return False
    if not (isinstance(name, str) and f.is_file() and f.stat().st_size == size):
        return False
    return not check_sha or file_sha256(f) == unit.get("sha256")
