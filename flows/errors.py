"""Domain errors: expected failures that the CLI prints as one readable line (no traceback)."""
from __future__ import annotations

from features.errors import FeatureError
from models.errors import ModelError
from validation.errors import ValidationFailed

# `towerflow stage` exits with this code (EX_TEMPFAIL) when the failure may pass on a retry: a
# connection refused or reset, a timeout. Anything else is final; the flow retries only these.
TRANSIENT_EXIT = 75
# ...and with this one when the gate stopped the run's model (quality or drift; GateBlocked): the run
# worked and kept a model from going live, which a scheduler or CI job can tell from a broken run (1)
BLOCKED_EXIT = 3
# A `towerflow stage` that a run started (flows/reproduce.py sets this to a file) also writes its
# one-line error there: the run's failure then says why (the gate's reasons, the data check that
# failed), in the terminal's last line and in Prefect's state message, not only "exited with 1".
STAGE_ERROR = "TOWERFLOW_STAGE_ERROR"


class TowerflowError(Exception):
    """Base class: the message names what failed, where, and what to try."""


class ConfigError(TowerflowError):
    """params.yaml or a --set override is invalid."""


class DataContractError(TowerflowError):
    """The data source does not follow the contract (docs/DATA.md)."""


class MissingStageInput(TowerflowError):
    """A stage's input is missing: run the upstream stage first."""


class PublishError(TowerflowError):
    """The index could not be published or verified; the live alias was left unchanged."""


class StageFailed(TowerflowError):
    """A pipeline stage failed (its own message was printed above)."""


class LockBusy(TowerflowError):
    """Another process holds a lock this one needs (flows/locks.py); it may pass on a retry after
    `retry_after_s` (the HTTP service answers 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RunInProgress(LockBusy):
    """Another pipeline run of the same project holds the run lock."""


class StoreBusy(PublishError, LockBusy):
    """Another process is publishing, rolling back, pruning or adding items in the bundle store."""


class TransientError(TowerflowError):
    """A failure that may pass on a retry (a service briefly unreachable); the stage exits 75."""


class GateBlocked(TowerflowError):
    """The run failed the quality/drift gate: it must not be published (unless forced). The CLI exits
    with BLOCKED_EXIT; a flow run the gate stops is a failed state named "Blocked"."""


# What the CLI prints as one line (no traceback): our own errors and the libraries' domain errors.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (TowerflowError, ModelError, FeatureError, ValidationFailed)
