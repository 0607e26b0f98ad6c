"""Domain errors: expected failures that the CLI prints as one readable line (no traceback)."""
from __future__ import annotations


class TowerflowError(Exception):
    """Base class: the message names what failed, where, and what to try."""


class ConfigError(TowerflowError):
    """params.yaml or a --set override is invalid."""


class DataContractError(TowerflowError):
    """The data source does not follow the contract (docs/DATA.md)."""


class ValidationFailed(TowerflowError):
    """Great Expectations found data that must not reach a model."""


class MissingStageInput(TowerflowError):
    """A stage's input is missing: run the upstream stage first."""


class PublishError(TowerflowError):
    """The index could not be published or verified; the live alias was left unchanged."""


class StageFailed(TowerflowError):
    """A pipeline stage failed (its own message was printed above)."""
