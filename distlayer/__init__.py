"""distlayer: layered LLM inference across many small devices with Ray.

``import distlayer`` is cheap: the public names that need torch, transformers or Ray
are imported on first access (PEP 562), so ``from distlayer import AutoModel`` works as
before while ``import distlayer.config`` or ``distlayer.errors`` pulls in neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (ConfigError, DistlayerError, OutputError, PlanError, StageError, StoreError,
                     UnsupportedModelError, VersionError)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .jobs import run_job
    from .model import AutoModel, DistModel
    from .store import LayerStore, split

__all__ = ["AutoModel", "DistModel", "LayerStore", "split", "run_job", "DistlayerError", "StoreError", "PlanError",
           "ConfigError", "OutputError", "StageError", "UnsupportedModelError", "VersionError"]
__version__ = "0.1.0"

_LAZY = {
    "AutoModel": "model",
    "DistModel": "model",
    "LayerStore": "store",
    "split": "store",
    "run_job": "jobs",
}


def __getattr__(name: str):
    """Imports a heavy public name from its module on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distlayer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted(set(globals()) | set(__all__))
