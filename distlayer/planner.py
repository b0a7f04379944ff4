"""Pure planning functions: which units a stage keeps resident, and (later) which
layers each stage owns. No torch, no Ray, no I/O."""

from __future__ import annotations

from .errors import PlanError

GiB = 2**30


def fmt_bytes(n: float) -> str:
    """Human-readable byte count: ``1.50 GiB``, ``12.0 MiB``, ``512 B``."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(value: int | float | str | None) -> int | None:
    """Parse ``"4GiB"``, ``"512MB"``, ``"1.5G"`` or a number of bytes.

    Raises:
        ValueError: the text is not a byte size.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    text = str(value).strip().replace(" ", "")
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6,
             "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
    num = text.rstrip("KMGTBibkmgt")
    suffix = text[len(num):].upper()
    try:
        if suffix not in units:
            raise ValueError
        return int(float(num) * units[suffix])
    except ValueError:
        raise ValueError(f"{value!r} is not a byte size; write it like 4GiB, 512MiB or 2000000000") from None


def choose_resident(unit_bytes: dict[str, int], budget: int | None, stage: int = 0) -> list[str]:
    """Pick the units a stage keeps resident within ``budget`` bytes of weights.

    Everything stays resident when it fits. Otherwise the rest is streamed, and the
    budget must also hold the streaming window: two of the largest streamed unit
    (one running, one prefetched) when they fit, else one. Units are kept resident
    in forward order, so the first layers of a step never wait on disk.

    Args:
        unit_bytes: bytes of each unit, in forward order.
        budget: bytes of weights the stage may hold; None means unlimited.
        stage: stage index, for error messages.

    Returns:
        The names of the resident units, in forward order.

    Raises:
        PlanError: a single unit is larger than the budget.
    """
    names = list(unit_bytes)
    if budget is None or sum(unit_bytes.values()) <= budget:
        return names
    biggest = max(names, key=unit_bytes.__getitem__)
    if unit_bytes[biggest] > budget:
        raise PlanError(
            f"unit {biggest} needs {fmt_bytes(unit_bytes[biggest])} but stage {stage} has a budget of "
            f"{fmt_bytes(budget)}: raise memory_per_stage (--memory-per-stage) or add a stage"
        )
    copies = 2 if 2 * unit_bytes[biggest] <= budget else 1
    best, held = 0, 0
    for k in range(len(names)):  # the first k units resident, the rest streamed
        if held + copies * max(unit_bytes[n] for n in names[k:]) <= budget:
            best = k
        held += unit_bytes[names[k]]
    return names[:best]


def split_layers(layer_bytes: list[int], stages: int) -> list[tuple[int, int]]:
    """Cut layers into ``stages`` contiguous ``(start, end)`` ranges of about equal bytes.

    Raises:
        PlanError: more stages than layers.
    """
    n = len(layer_bytes)
    if not 1 <= stages <= n:
        raise PlanError(f"stages={stages}: the model has {n} layers, so use 1 to {n} stages")
    total = sum(layer_bytes)
    cuts, acc = [0], 0
    for i, b in enumerate(layer_bytes):
        acc += b
        left = stages - len(cuts)  # cuts still to place
        if left and (acc >= total * len(cuts) / stages or n - (i + 1) == left) and i + 1 < n:
            cuts.append(i + 1)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))
