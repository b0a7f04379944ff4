"""Where each stage of a pipeline runs: the driver's record, beside the planner's frozen
plan.

The planner decides a :class:`~distlayer.planner.StagePlan` and nothing changes it. The
driver records the rest in a :class:`Placement`: ``pipeline.py`` where the stage's actor
runs (and again when a replacement takes its place), ``fill.fill_stages`` where the stage
reads its units. ``model.plan`` and ``distlayer plan`` show both through one read-only
:class:`PlacedStage` per stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from typing import TYPE_CHECKING

from .planner import Plan, StagePlan

if TYPE_CHECKING:
    from .cost import Prediction
    from .survey import Survey


@dataclass
class Placement:
    """Where a stage runs and reads its units; written by the driver only.

    Attributes:
        node_ip: the address of the stage's node ("-" before it runs).
        node_id: Ray's id of that node ("local" in one process).
        pid: the stage's process, once it runs.
        store_path: where the stage's node reads its units (``fill.fill_stages``).
        store_source: ``"node store"``, ``"driver path"`` or ``"push"``.
        fetched: its units pushed from the driver's node when it started.
        fetched_bytes: bytes of those sent then (less than their size when a push resumed).
    """

    node_ip: str = "-"
    node_id: str = ""
    pid: int | None = None
    store_path: str = ""
    store_source: str = ""
    fetched: list[str] = field(default_factory=list)
    fetched_bytes: int = 0


@dataclass(frozen=True)
class PlacedStage:
    """One ``model.plan`` entry: a stage's frozen plan and its placement, read as one
    object (``p.start``, ``p.resident_bytes`` from the plan; ``p.pid``, ``p.node_ip`` from
    the placement). Nothing is assigned through it: the driver writes ``p.placement``."""

    plan: StagePlan
    placement: Placement = field(default_factory=Placement)

    def __getattr__(self, name: str):
        # called only for names the view itself lacks: the plan's, then the placement's
        if name.startswith("__") or name in ("plan", "placement"):
            raise AttributeError(name)
        for part in (self.plan, self.placement):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.plan)) | set(vars(self.placement)))

    def as_dict(self) -> dict:
        """The plan and placement as plain data (JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in {**asdict(self.plan), **asdict(self.placement)}.items()}


@dataclass(frozen=True)
class PlacedPlan:
    """A pipeline's plan with its stages' placements (what ``distlayer plan`` prints), and
    where the nodes were measured, what was measured (``survey.Survey``) and the cost
    model's prediction for the plan (``cost.Prediction``)."""

    plan: Plan
    stages: tuple[PlacedStage, ...]
    survey: Survey | None = None
    prediction: Prediction | None = None

    @property
    def micro_batches(self) -> int:
        return self.plan.micro_batches
