"""The layer store: a checkpoint split into one safetensors file per unit, with a manifest.

A unit is the embeddings, one decoder layer, the final norm or the head (``units.py``
names them). ``writer.py`` splits a checkpoint into a store (``distlayer split``);
``reader.py`` opens one (:class:`LayerStore`, :func:`open_store`); ``format.py`` holds
what both agree on (the manifest's config record, compression names in messages, a
tensor's bytes). Finding the checkpoint is ``sources.py``'s job, compressing weight
matrices ``quant.py``'s.
"""

from ..sources import MANIFEST
from .format import READ_ALIGN
from .reader import LayerStore, open_configured, open_store
from .writer import split

__all__ = ["MANIFEST", "READ_ALIGN", "LayerStore", "open_configured", "open_store", "split"]
