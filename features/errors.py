"""Errors of the features library (the Feast repository and its stores)."""
from __future__ import annotations


class FeatureError(Exception):
    """Base class: the message names what failed, where, and what to try."""


class FeatureStoreConfigError(FeatureError):
    """The feature store cannot be opened as configured (online store kind, REDIS_URL, Redis down)."""
