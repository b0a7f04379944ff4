"""``distlayer bench``: distlayer side by side with transformers in memory, accelerate's
disk offload and AirLLM, on one model with the same prompts, warm and cold page cache,
with each streaming row set against its roofline (the bytes a step streams over the read
bandwidth of the same files, measured in the same run).

- :mod:`.synthetic`: a random-weight Llama of a given size (``--synthetic 1B``);
- :mod:`.systems`: each system loaded behind one interface;
- :mod:`.measure`: timing a generate call, the page cache, read bandwidth;
- :mod:`.run`: which configurations load together, runs in turns, the rows;
- :mod:`.report`: ``bench.json``, ``bench.md`` and ``bench.png``.

Importing this package is cheap (no torch); :func:`run_bench` pulls in what it needs.
"""

from __future__ import annotations

from .report import write
from .run import MODES, Options, run_bench
from .systems import SYSTEMS

__all__ = ["MODES", "SYSTEMS", "Options", "run_bench", "write"]
