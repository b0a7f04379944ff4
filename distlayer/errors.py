"""Errors a user sees. Each message says what is wrong and what to change."""


class DistlayerError(Exception):
    """Base class of every error distlayer raises on bad input."""


class StoreError(DistlayerError):
    """A checkpoint or layer store is missing, unreadable, corrupt or incomplete."""


class UnsupportedModelError(DistlayerError):
    """The model's architecture cannot be split into embed / layers / norm / head."""


class PlanError(DistlayerError):
    """The layers cannot be placed within the given stages and budgets."""


class ConfigError(DistlayerError):
    """A setting (API argument, CLI flag or job-file key) has a bad value."""


class OutputError(DistlayerError):
    """An output cannot be written: its disk is full, or it failed part way."""


class VersionError(DistlayerError):
    """transformers, torch or Ray is outside the range distlayer is tested with."""


class StageError(DistlayerError):
    """A pipeline stage failed or died."""


class StageLost(StageError):
    """A stage died or stopped answering (as opposed to raising an error of its own):
    what a replacement stage can recover from."""
