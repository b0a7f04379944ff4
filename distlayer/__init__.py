"""distlayer: layered LLM inference across many small devices with Ray."""

from .errors import ConfigError, DistlayerError, PlanError, StageError, StoreError, UnsupportedModelError
from .jobs import run_job
from .model import AutoModel, DistModel
from .store import LayerStore, split

__all__ = ["AutoModel", "DistModel", "LayerStore", "split", "run_job", "DistlayerError", "StoreError", "PlanError",
           "ConfigError", "StageError", "UnsupportedModelError"]
__version__ = "0.1.0"
