"""Open the project's Feast FeatureStore from a programmatic RepoConfig (no feature_store.yaml).

The config lives in code so that the paths come from params.yaml (`paths.feast`, `paths.features`)
and a moved checkout still works: provider local, registry `<feast_dir>/registry.db`, SQLite online
store `<feast_dir>/online.db`, file (Dask) offline store whose sources sit in `features_dir`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from features.definitions import PROJECT

if TYPE_CHECKING:
    from feast import FeatureStore


def open_store(feast_dir: Path, features_dir: Path) -> "FeatureStore":
    """The FeatureStore over feast_dir (registry + online store); created on first use."""
    from feast import FeatureStore, RepoConfig

    feast_dir = Path(feast_dir).resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry=str(feast_dir / "registry.db"),
        online_store={"type": "sqlite", "path": str(feast_dir / "online.db")},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        # FileSource paths are relative to repo_path (features/definitions.py), so the registry
        # holds no absolute paths.
        repo_path=Path(features_dir).resolve(),
    )
    return FeatureStore(config=config)
