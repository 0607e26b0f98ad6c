"""The model library's errors. They say what failed and where (a path, a column); a hint that names a
pipeline stage ("run the train stage first") is added by the stage that catches them."""
from __future__ import annotations


class ModelError(Exception):
    """Base of every expected failure of the model library."""


class ModelInputError(ModelError):
    """The input data lacks what the model needs (a column, a list-typed column, a file)."""


class ModelNotFound(ModelError):
    """Trained model files are missing; the message names the path."""


class NoRankerTrained(ModelNotFound):
    """The rank stage ran but trained no ranker (its ranker.json says why)."""
