"""Finding a checkpoint and making it readable: local dirs, HF repo ids, ``.gguf`` files.

A source is resolved to local files (an HF repo id goes through huggingface_hub's
cache), a GGUF file is converted once into a plain HF checkpoint directory, and
:class:`Checkpoint` reads a checkpoint's tensors by name, one at a time. Nothing here
writes a layer store; ``store.py`` does that. torch, transformers and
huggingface_hub are imported only where they are used, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from .errors import StoreError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
"""A finished layer store's manifest file name."""
PARTIAL = "manifest.partial.json"
"""The manifest an interrupted split leaves behind (units written so far)."""
SHARDS_DIRNAME = "distlayer-shards"
"""Default leaf directory name of a layer store next to its checkpoint."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
"""File name endings of weight files (never copied into a store as side files)."""
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
UNIT_FILE_RE = re.compile(r"^(?:embed|norm|head|layer\.\d+)\.safetensors$")


def home_dir() -> Path:
    """Returns the distlayer cache directory.

    Returns:
        ``$DISTLAYER_HOME`` if set, else ``~/.cache/distlayer``.
    """
    env = os.environ.get("DISTLAYER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distlayer"


@dataclass
class Source:
    """Where a checkpoint lives once resolved: a local HF dir, or a GGUF file."""

    path: Path
    kind: str                 # "dir" or "gguf"
    repo_id: str | None = None

    @property
    def name(self) -> str:
        """How a user names it again: the repo id, or the absolute path."""
        return self.repo_id or str(self.path.resolve())

    def fingerprint(self) -> dict:
        """What the source is, cheaply: the sha256 of its config (None for a GGUF, whose
        config is inside the file) and the name, size and modification time of each
        weight file. A store records it and is checked against it on every open."""
        config = self.path / "config.json" if self.kind == "dir" else None
        files = [self.path] if self.kind == "gguf" else \
            sorted(f for f in self.path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
        stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
        digest = hashlib.sha256(config.read_bytes()).hexdigest() if config is not None else None
        return {"config_sha256": digest, "files": stats}


def fingerprint_change(recorded: dict | None, current: dict) -> str | None:
    """Why a store split from ``recorded`` does not fit a source with ``current``
    (:meth:`Source.fingerprint`), or None when it fits or nothing was recorded (a store
    written before stores recorded it)."""
    if not recorded:
        return None
    if recorded.get("config_sha256") != current["config_sha256"]:
        return "its config.json differs: it is another model"
    old, new = recorded.get("files", {}), current["files"]
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return f"the checkpoint changed after the split ({shown}: new, gone, or another size or time)"
    return None


def resolve_source(model: str | os.PathLike, token: str | None = None) -> Source:
    """Resolves a local directory, a ``.gguf`` file or an HF repo id to local files.

    Repo ids go through huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` is honoured.

    Args:
        model: local HF model dir, layer store dir, ``.gguf`` file, or HF repo id.
        token: HF token for gated repos.

    Returns:
        The resolved :class:`Source`.

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
    if is_repo_id(text):
        return Source(_download(text, token), "dir", repo_id=text)
    raise StoreError(f"model path {text!r} does not exist: check the path, or pass an HF repo id like 'org/name'")


def is_repo_id(text: str) -> bool:
    """Whether ``text``, not a local path, names an HF repo (``org/name``)."""
    return bool(_REPO_RE.match(text)) and not text.startswith((".", "/", "~"))


def _is_unfinished_store(path: Path) -> bool:
    """A dir whose only weights are unit shards (a store) but that has no manifest."""
    if (path / MANIFEST).is_file():
        return False
    weights = [f.name for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
    return bool(weights) and all(UNIT_FILE_RE.match(w) for w in weights)


def _download(repo_id: str, token: str | None) -> Path:
    """The local snapshot dir of ``repo_id`` (safetensors, else .bin weights) from the HF cache or Hub."""
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
    """Where the shards of ``source`` go when the caller names no directory.

    Args:
        source: the resolved checkpoint.
        compression: ``None``, ``"8bit"`` or ``"4bit"``; compressed stores get their own dir.

    Returns:
        The source itself if it is already a layer store; for a repo id, a dir under the
        HF cache; else a dir beside the checkpoint, or under :func:`home_dir` when that
        is not writable.
    """
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
    digest = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:12]
    return home_dir() / "shards" / f"{source.path.name}-{digest}" / leaf


class Checkpoint:
    """Reads tensors of a local HF checkpoint dir by name, one at a time.

    Safetensors files are preferred; ``.bin`` files are read (memory-mapped) only when a
    directory has no safetensors.

    Attributes:
        path: the checkpoint directory.
        files: every tensor name in the checkpoint, mapped to the file that holds it.

    Raises:
        StoreError: the directory holds no weights, or a weight file is unreadable.
    """

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
            import torch

            try:
                self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise StoreError(f"cannot read {f} ({e}): the file is corrupt or not a PyTorch state dict") from e
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        """Reads one tensor by its checkpoint name.

        Args:
            key: a tensor name from :attr:`files`.

        Returns:
            The tensor, as stored (dtype unchanged), on the CPU.

        Raises:
            StoreError: the file holding it is corrupt.
        """
        f = self.files[key]
        if f.suffix == ".bin":
            return self._load_bin(f)[key]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        try:
            return self._open[f].get_tensor(key)
        except Exception as e:
            raise StoreError(f"cannot read tensor {key} from {f} ({e}): the file is corrupt; download it again") from e

def is_checkpoint(path: Path) -> bool:
    """Tells whether ``path`` holds a config.json and safetensors weights.

    Args:
        path: a directory (it need not exist).

    Returns:
        True when it is a complete, loadable HF checkpoint dir.
    """
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf: Path, out: Path, dtype=None) -> Path:
    """Converts a GGUF file into a float HF checkpoint dir at ``out``, once.

    Uses transformers' GGUF loader. The checkpoint is written to a temporary dir beside
    ``out`` and renamed into place, so an interrupted conversion leaves nothing
    half-written; a finished ``out`` is reused.

    Args:
        gguf: the ``.gguf`` file.
        out: the checkpoint directory to create.
        dtype: dtype of the dequantised weights (transformers' default if ``None``).

    Returns:
        ``out``.

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
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
            raise StoreError(f"{gguf} is not a GGUF checkpoint distlayer can read ({type(e).__name__}: {e}): "
                             "download it again, or pass a Hugging Face model directory") from e
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
