"""Names of the units a model is cut into, and a stage's share of them. Pure: no torch.

A unit is the embeddings (``embed``), one decoder layer (``layer.i``), the final norm
(``norm``) or the head (``head``). Stores, plans and runners all speak these names.
"""

from __future__ import annotations

from dataclasses import dataclass

EMBED, NORM, HEAD = "embed", "norm", "head"


def layer_unit(index: int) -> str:
    """Name of the unit holding decoder layer ``index``."""
    return f"layer.{index}"


def layer_index(unit: str) -> int | None:
    """The decoder layer that unit ``unit`` holds (``"layer.3"``: 3); None for any other
    name (``embed``, ``norm``, ``head``, a chunk such as ``head:0``). The inverse of
    :func:`layer_unit`."""
    kind, dot, index = unit.partition(".")
    if kind != "layer" or not dot or not index.isdecimal() or layer_unit(int(index)) != unit:
        return None
    return int(index)


def unit_order(num_layers: int) -> list[str]:
    """All unit names in forward order: embed, layer.0 … layer.N-1, norm, head."""
    return [EMBED, *(layer_unit(i) for i in range(num_layers)), NORM, HEAD]


@dataclass(frozen=True)
class LayerRange:
    """A stage's share of the model: decoder layers ``[start, end)``, plus the
    embeddings if it is the first stage and the final norm and head if it is the last."""

    start: int
    end: int
    first: bool
    last: bool

    def units(self) -> list[str]:
        """The stage's units in forward order."""
        return ([EMBED] if self.first else []) + [layer_unit(i) for i in range(self.start, self.end)] \
            + ([NORM, HEAD] if self.last else [])


def unit_names(units) -> str:
    """``units`` in words, consecutive layers as one range: ``"embed, layer.6-19, head"``."""
    out: list[str] = []
    run: list[int] = []

    def close():
        if run:
            out.append(layer_unit(run[0]) + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for u in units:
        i = layer_index(u)
        if i is not None and run and i == run[-1] + 1:
            run.append(i)
            continue
        close()
        if i is None:
            out.append(u)
        else:
            run.append(i)
    close()
    return ", ".join(out)


def chunk_unit(unit: str, index: int) -> str:
    """Name of chunk ``index`` of a unit streamed in chunks (the head, in vocabulary chunks)."""
    return f"{unit}:{index}"


def chunk_rows(rows: int, chunks: int, index: int) -> tuple[int, int]:
    """Rows ``[a, b)`` of chunk ``index`` when ``rows`` rows are cut into ``chunks`` chunks:
    every chunk but the last has ``ceil(rows / chunks)`` rows."""
    size = -(-rows // chunks)
    return min(rows, index * size), min(rows, (index + 1) * size)
