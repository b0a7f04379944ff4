"""The layer store: a checkpoint split into one safetensors file per unit.

A unit is the embeddings, one decoder layer, the final norm or the head. The store's
``manifest.json`` lists, for every unit, its file, tensor names, dtypes, shapes, byte
size and sha256. Splitting converts checkpoint tensors into the model's own parameter
layout with transformers' loading code, so a unit file loads straight into the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import arch
from .errors import ConfigError, StoreError

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
FORMAT_VERSION = 1
SHARDS_DIRNAME = "distlayer-shards"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNIT_FILE_RE = re.compile(r"^(?:embed|norm|head|layer\.\d+)\.safetensors$")



# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where a checkpoint lives once resolved: a local HF dir, or a GGUF file."""

    path: Path
    kind: str                 # "dir" or "gguf"
    repo_id: str | None = None


def resolve_source(model: str | os.PathLike, token: str | None = None) -> Source:
    """Resolve a local directory, a ``.gguf`` file or an HF repo id to local files.

    Repo ids go through huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` is honoured.

    Raises:
        StoreError: the path does not exist, holds no checkpoint, or the repo is not
            reachable and not cached.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return Source(path, "gguf")
        raise StoreError(f"{path} is a file but not a .gguf checkpoint: pass the model's directory instead")
    if path.is_dir():
        if _is_unfinished_store(path):
            why = "its split was interrupted" if (path / PARTIAL).is_file() else "its manifest.json is missing"
            raise StoreError(
                f"{path} holds layer shards but no {MANIFEST} ({why}): finish it with "
                f"`distlayer split MODEL --out {path}` from the original checkpoint, or delete it and pass the model"
            )
        if (path / "config.json").is_file():
            return Source(path, "dir")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(ggufs[0], "gguf")
        if (path / MANIFEST).is_file():
            return Source(path, "dir")
        raise StoreError(
            f"{path} holds no config.json{' and several .gguf files' if ggufs else ''}: "
            "pass a Hugging Face model directory, a .gguf file, or a repo id"
        )
    if _REPO_RE.match(text) and not text.startswith((".", "/", "~")):
        return Source(_download(text, token), "dir", repo_id=text)
    raise StoreError(f"model path {text!r} does not exist: check the path, or pass an HF repo id like 'org/name'")


def _is_unfinished_store(path: Path) -> bool:
    """A dir whose only weights are unit shards (a store) but that has no manifest."""
    if (path / MANIFEST).is_file():
        return False
    weights = [f.name for f in path.iterdir() if f.name.endswith(_WEIGHT_SUFFIXES)]
    return bool(weights) and all(_UNIT_FILE_RE.match(w) for w in weights)


def _download(repo_id: str, token: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        snap = Path(snapshot_download(repo_id, token=token, allow_patterns=patterns))
        if not list(snap.glob("*.safetensors")):
            snap = Path(snapshot_download(repo_id, token=token, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # huggingface_hub raises many types; all mean "not available"
        how = ("HF_HUB_OFFLINE=1 is set and it is not in the local HF cache" if offline
               else f"it could not be fetched ({type(e).__name__}) and it is not in the local HF cache")
        raise StoreError(
            f"model {repo_id!r}: {how}. Download it where the Hub is reachable "
            f"(`hf download {repo_id}`) and copy the HF cache here, or pass a local model directory; "
            "for a gated repo pass hf_token=."
        ) from e
    return snap


def default_shards_dir(source: Source, compression: str | None = None) -> Path:
    """Where the shards of ``source`` go when the caller names no directory."""
    leaf = SHARDS_DIRNAME + (f"-{compression}" if compression else "")
    if source.kind == "dir" and (source.path / MANIFEST).is_file():
        return source.path  # already a layer store
    if source.repo_id:
        from huggingface_hub import constants

        rev = source.path.name
        return Path(constants.HF_HUB_CACHE) / "distlayer" / source.repo_id.replace("/", "--") / rev / leaf
    base = source.path.parent if source.kind == "gguf" else source.path
    name = source.path.stem + "-" + leaf if source.kind == "gguf" else leaf
    if os.access(base, os.W_OK):
        return base / name
    from .smollm import home_dir

    digest = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:12]
    return home_dir() / "shards" / f"{source.path.name}-{digest}" / leaf


# --------------------------------------------------------------------------- reading checkpoints


class _Checkpoint:
    """Reads tensors of a local HF checkpoint dir by name, one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        st = sorted(path.glob("*.safetensors"))
        bins = sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")
        if st:
            for f in st:
                with safe_open(f, "pt") as h:
                    self.files.update({k: f for k in h.keys()})
        elif bins:
            for f in bins:
                sd = self._load_bin(f)
                self.files.update({k: f for k in sd})
        if not self.files:
            raise StoreError(
                f"{path} has a config.json but no weights (*.safetensors or *.bin): "
                "the download is incomplete; fetch the model's weight files again"
            )

    def _load_bin(self, f: Path) -> dict:
        if f not in self._open:
            try:
                self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise StoreError(f"cannot read {f} ({e}): the file is corrupt or not a PyTorch state dict") from e
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        f = self.files[key]
        if f.suffix == ".bin":
            return self._load_bin(f)[key]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        try:
            return self._open[f].get_tensor(key)
        except Exception as e:
            raise StoreError(f"cannot read tensor {key} from {f} ({e}): the file is corrupt; download it again") from e

    def nbytes(self) -> int:
        return sum({f: f.stat().st_size for f in self.files.values()}.values())


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a config.json and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf: Path, out: Path, dtype=None) -> Path:
    """Convert a GGUF file into a float HF checkpoint dir at ``out`` (once) with
    transformers' GGUF loader. It is written to a temporary dir beside ``out`` and renamed
    into place, so an interrupted conversion leaves nothing half-written.

    Raises:
        StoreError: the gguf package is missing, or ``out`` holds something else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_checkpoint(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except ImportError as e:
            raise StoreError(f"reading {gguf} needs the gguf package: pip install 'distlayer[gguf]'") from e
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # save plain float weights
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if is_checkpoint(out):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # os.replace cannot overwrite a directory, even an empty one
        elif out.exists():
            raise StoreError(f"{out} exists but is not a complete checkpoint: remove it")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
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
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:
        raise StoreError(f"cannot read {src / 'config.json'} ({e}): the model directory is damaged") from e
    skeleton = arch.build_skeleton(config, dtype=_checkpoint_dtype(config))
    p = arch.parts(skeleton)  # unsupported models fail here, before any weights are read
    ckpt = _Checkpoint(src)
    n = len(p.layers)
    raw: dict[str, list[str]] = {u: [] for u in arch.unit_order(n)}
    for key in ckpt.files:
        raw.setdefault(arch.unit_of_raw_key(key), []).append(key)
    extra = set(raw) - set(arch.unit_order(n))
    if extra:
        raise StoreError(f"{src} has tensors for layers {sorted(extra)} beyond num_hidden_layers={n}: config and weights disagree")

    partial = json.loads((out / PARTIAL).read_text()) if (out / PARTIAL).is_file() else {}
    done = {u["name"]: u for u in partial.get("units", []) if _unit_file_ok(out, u)}
    if arch.HEAD not in done:
        done.pop(arch.EMBED, None)  # a tied head needs the embeddings loaded again
    # Sized from the model's own tensors: a tied head is written as its own copy.
    todo_bytes = sum(t.numel() * t.element_size() for u in arch.unit_order(n) if u not in done
                     for t in arch.unit_params(p, u).values())
    _check_disk(out, todo_bytes)
    _copy_side_files(src, out)
    mapping = get_model_conversion_mapping(skeleton)
    lc = LoadStateDictConfig(weight_mapping=mapping)
    # The head goes right after the embeddings: a tied head shares their tensor.
    order = [arch.EMBED, arch.HEAD, *(arch.layer_unit(i) for i in range(n)), arch.NORM]
    from tqdm.auto import tqdm

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        for unit in tqdm(order, desc=f"split {src.name}", unit="unit", disable=not progress):
            if unit in done:
                continue
            sd = {k: ckpt.get(k) for k in raw[unit]}
            if sd:
                convert_and_load_state_dict_in_model(skeleton, sd, lc)
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
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    manifest = {
        "format": FORMAT_VERSION,
        "model_type": config.model_type,
        "num_layers": n,
        "compression": None,
        "source": str(src),
        "units": [done[u] for u in arch.unit_order(n)],
    }
    _write_json(out / MANIFEST, manifest)
    (out / PARTIAL).unlink(missing_ok=True)


def _checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint declares (float32 if none): shards keep it, not float32."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


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
    """Open the layer store for ``model``, splitting the checkpoint first if needed."""
    path = Path(model).expanduser()
    if shards_dir is None and path.is_dir() and (path / MANIFEST).is_file():
        return LayerStore(path)
    return LayerStore(split(model, shards_dir, compression, token, progress))
