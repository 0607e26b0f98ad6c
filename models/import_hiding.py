"""Import a library while some of its optional dependencies look absent.

Feast imports torch, and Great Expectations imports pyspark and SQLAlchemy, at their own import, for
features (tensor outputs, Spark and SQL datasources) that a process may never use: seconds of a
short process on a 2-core machine. Such a library catches the ImportError and says it is missing only
when that feature is asked for.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable


def import_hiding(module: str, hidden: Iterable[str]) -> None:
    """Import `module` with each of `hidden` not yet imported made unimportable (`import x` raises
    ImportError) for the duration; they stay importable afterwards. Does nothing when `module` is
    already imported. A library that needs one of them at import after all is forgotten (its
    half-imported modules) and imported as it is: slower, never wrong."""
    if module in sys.modules:
        return
    hide = [name for name in hidden if name not in sys.modules]
    for name in hide:
        sys.modules[name] = None      # type: ignore[assignment]
    try:
        importlib.import_module(module)
    except ImportError:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    finally:
        for name in hide:
            del sys.modules[name]
    importlib.import_module(module)
