"""Errors of the validation library: the data failed a check and must not go on."""
from __future__ import annotations


class ValidationFailed(Exception):
    """Great Expectations found data that must not reach a model."""
