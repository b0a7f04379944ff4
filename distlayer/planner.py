"""Pure planning functions: which units a stage keeps resident, which layers each
stage owns, and how many micro-batches and threads the stages run with. No torch,
no Ray, no I/O."""

from __future__ import annotations

from .errors import ConfigError, PlanError

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


def budgets_from(memory_per_stage, stages: int) -> list[int | None]:
    """One byte budget per stage from ``"4GiB"``, bytes, a list per stage, or None (no
    budget: None for every stage).

    Raises:
        ConfigError: a size that does not parse or is not positive, or a list whose
            length is not ``stages``.
    """
    if isinstance(memory_per_stage, (list, tuple)):
        values = list(memory_per_stage)
        if len(values) != stages:
            raise ConfigError(f"memory_per_stage has {len(values)} entries but there are {stages} stages: "
                              "give one per stage")
    else:
        values = [memory_per_stage] * stages
    try:
        budgets = [parse_bytes(v) for v in values]
    except ValueError as e:
        raise ConfigError(f"memory_per_stage: {e}") from None
    for b in budgets:
        if b is not None and b <= 0:
            raise ConfigError(f"memory_per_stage={b}: must be a positive size such as 2GiB")
    return budgets


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
    sizes = [unit_bytes[n] for n in names]
    suffix_max = sizes[:]
    for k in range(len(sizes) - 2, -1, -1):
        suffix_max[k] = max(sizes[k], suffix_max[k + 1])
    best, held = 0, 0
    for k in range(len(names)):  # the first k units resident, the rest streamed
        if held + copies * suffix_max[k] <= budget:
            best = k
        held += sizes[k]
    return names[:best]


def _stage_units(layer_bytes: list[int], a: int, b: int, first: bool, last: bool,
                 embed: int, norm: int, head: int) -> dict[str, int]:
    units = {"embed": embed} if first else {}
    units.update({f"layer.{i}": layer_bytes[i] for i in range(a, b)})
    if last:
        units.update({"norm": norm, "head": head})
    return units


def plan_stages(layer_bytes: list[int], budgets: list[int | None], embed: int = 0, norm: int = 0, head: int = 0,
                kv_bytes_per_layer: int = 0, reserve_bytes: int = 0) -> list[tuple[int, int]]:
    """Assign each stage a contiguous ``(start, end)`` range of decoder layers.

    The first stage also holds the embeddings, the last the final norm and head. Each
    stage's budget covers its weights, the KV cache of its layers
    (``kv_bytes_per_layer`` each) and ``reserve_bytes`` of activations.

    When every stage can keep its range resident, ranges are balanced by compute (the
    bytes each token reads: all of every layer and the head, one row of the embeddings)
    within each budget, and uneven budgets give uneven ranges. Otherwise
    ranges are chosen so the most bytes any stage streams per step is as small as
    possible: streaming time is balanced across stages.

    Args:
        layer_bytes: weight bytes of each decoder layer.
        budgets: bytes per stage; None means unlimited.
        embed, norm, head: weight bytes of those units.
        kv_bytes_per_layer: KV cache bytes one layer needs for the job's batch and context.
        reserve_bytes: activation bytes each stage keeps free.

    Raises:
        PlanError: more stages than layers, or a budget that cannot hold a layer.
    """
    n, s = len(layer_bytes), len(budgets)
    if not 1 <= s <= n:
        raise PlanError(f"stages={s}: the model has {n} layers, so use 1 to {n} stages")

    def units(i, a, b):
        return _stage_units(layer_bytes, a, b, i == 0, i == s - 1, embed, norm, head)

    def weight_budget(i, a, b):
        return None if budgets[i] is None else budgets[i] - kv_bytes_per_layer * (b - a) - reserve_bytes

    def streamed(i, a, b) -> float:
        u, wb = units(i, a, b), weight_budget(i, a, b)
        if wb is None:
            return 0
        if wb < max(u.values()):
            return float("inf")
        return sum(u.values()) - sum(u[k] for k in choose_resident(u, wb))

    def work(i, a, b) -> int:
        """Compute of a resident stage, in weight bytes read per token: an embedding
        lookup reads one row, every other unit all of its bytes."""
        return sum(units(i, a, b).values()) - (embed if i == 0 else 0)

    def greedy(ok) -> list[tuple[int, int]] | None:
        cuts, a = [], 0
        for i in range(s):
            if i == s - 1:
                b = n
            else:
                b = a + 1
                while b < n - (s - 1 - i) and ok(i, a, b + 1):
                    b += 1
            if not ok(i, a, b):
                return None
            cuts.append((a, b))
            a = b
        return cuts

    total = sum(layer_bytes) + embed + norm + head
    if greedy(lambda i, a, b: streamed(i, a, b) <= total) is None:
        raise _too_small(layer_bytes, budgets, embed, norm, head, kv_bytes_per_layer, reserve_bytes)
    lo, hi = 0, total  # least T with a plan streaming at most T bytes per stage per step
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(lambda i, a, b: streamed(i, a, b) <= mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0:
        return greedy(lambda i, a, b: streamed(i, a, b) <= lo)
    lo, hi = 0, total  # all resident: least M with every stage holding at most M bytes
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(lambda i, a, b: streamed(i, a, b) == 0 and work(i, a, b) <= mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    return greedy(lambda i, a, b: streamed(i, a, b) == 0 and work(i, a, b) <= lo)


def _too_small(layer_bytes, budgets, embed, norm, head, kv, reserve) -> PlanError:
    named = {"embed": embed, "norm": norm, "head": head, **{f"layer {i}": b for i, b in enumerate(layer_bytes)}}
    big_name = max(named, key=named.__getitem__)
    i = min(range(len(budgets)), key=lambda k: budgets[k] if budgets[k] is not None else float("inf"))
    room = budgets[i] - kv - reserve
    extra = f" after {fmt_bytes(kv + reserve)} of KV cache and activations" if kv or reserve else ""
    return PlanError(
        f"{big_name} needs {fmt_bytes(named[big_name])} but stage {i} has {fmt_bytes(max(room, 0))}{extra} "
        f"(budget {fmt_bytes(budgets[i])}): raise memory_per_stage (--memory-per-stage) or add a stage"
    )


def plan_concurrency(stage_nodes: list[str], node_cores: dict[str, int], device: str,
                     micro_batches: int | None = None, threads: int | None = None) -> tuple[int, list[int | None]]:
    """How many micro-batches a batch runs as, and how many torch threads each stage uses.

    Stages on separate devices work at once, so a batch is cut into one micro-batch per
    device: per GPU stage, or per CPU node. CPU stages that share a node share its cores;
    with one micro-batch they take turns, so each may use all of them. Cutting a batch
    for them instead would only read every weight once more per step (measured on a
    2-core node: two 8-row forwards cost 1.4x one 16-row forward), on cores that are
    already busy.

    Args:
        stage_nodes: the node id of each stage.
        node_cores: CPU cores of each node.
        device: ``"cpu"`` or ``"cuda"``.
        micro_batches: the caller's choice, kept if given.
        threads: the caller's threads per stage, kept if given.

    Returns:
        ``(micro_batches, threads per stage)``; threads are None on GPUs (torch's default).
    """
    if device != "cpu":
        return micro_batches or len(stage_nodes), [threads] * len(stage_nodes)
    m = micro_batches or len(set(stage_nodes))
    out = []
    for node in stage_nodes:
        sharing = min(m, stage_nodes.count(node))  # stages of this node that can be busy at once
        out.append(threads or max(1, node_cores[node] // sharing))
    return m, out
