"""models/import_hiding.py: a library imported while an optional dependency looks absent."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models.import_hiding import import_hiding


@pytest.fixture()
def libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "hid_dep.py").write_text("")
    (tmp_path / "hid_optional.py").write_text(
        "try:\n    import hid_dep\n    HAS_DEP = True\nexcept ImportError:\n    HAS_DEP = False\n")
    (tmp_path / "hid_required.py").write_text("import hid_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("hid_dep", "hid_optional", "hid_required"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("hid_dep", "hid_optional", "hid_required"):
        sys.modules.pop(name, None)


def test_an_optional_dependency_is_not_imported_and_stays_importable(libraries: Path) -> None:
    import_hiding("hid_optional", ["hid_dep"])
    assert sys.modules["hid_optional"].HAS_DEP is False and "hid_dep" not in sys.modules
    import hid_dep  # noqa: F401
    assert "hid_dep" in sys.modules


def test_a_library_that_needs_it_is_imported_as_it_is(libraries: Path) -> None:
    import_hiding("hid_required", ["hid_dep"])
    assert "hid_required" in sys.modules and "hid_dep" in sys.modules


def test_an_imported_dependency_or_library_is_left_as_it_is(libraries: Path) -> None:
    import hid_dep  # noqa: F401
    import_hiding("hid_optional", ["hid_dep"])
    assert sys.modules["hid_optional"].HAS_DEP is True
    before = sys.modules["hid_optional"]
    import_hiding("hid_optional", ["hid_dep"])
    assert sys.modules["hid_optional"] is before
