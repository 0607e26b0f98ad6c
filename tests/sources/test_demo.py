"""The demo source: MovieLens-100K from the real recbole 1.2.1 wheel (downloaded once per machine)."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import flows.sources.demo
from flows.sources.demo import MEMBER, demo_source, wheel
from flows.errors import DataContractError
from flows.params import DataParams, SimulatorParams
from flows.stages.ingest import ingest


@pytest.fixture()
def cache(demo_cache: Path) -> Path:
    return demo_cache


def test_demo_ingest_then_cached(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ingested"
    summary = ingest(DataParams(source="demo", ranking_logs="none"), SimulatorParams(), 42, cache, out)
    assert (summary["users"], summary["items"], summary["interactions"]) == (943, 1682, 100_000)
    schema = json.loads((out / "schema.json").read_text())
    assert schema["user_features"] == {"categorical": ["age_bucket", "gender", "occupation", "zip_prefix"],
                                       "numeric": [], "multi": [], "ignored": []}
    assert schema["item_features"] == {"categorical": [], "numeric": ["release_year"], "multi": ["genres"],
                                       "ignored": ["title"]}
    assert schema["has_rating"] and schema["user_id_dtype"] == "int64" and schema["source"] == "demo"

    users = pd.read_parquet(out / "users.parquet").set_index("user_id")
    assert users.loc[1].to_dict() == {"age_bucket": "18-24", "gender": "M", "occupation": "technician",
                                      "zip_prefix": "8"}
    items = pd.read_parquet(out / "items.parquet").set_index("item_id")
    assert list(items.loc[1, "genres"]) == ["Animation", "Children's", "Comedy"]
    assert items.loc[1, "release_year"] == 1995.0 and items["release_year"].isna().sum() == 2  # "unkonwn" twice
    inter = pd.read_parquet(out / "interactions.parquet")
    assert set(inter["rating"]) == {1.0, 2.0, 3.0, 4.0, 5.0} and (inter["weight"] == 1.0).all()
    assert inter["timestamp"].min().year == 1997 and str(inter["timestamp"].dt.tz) == "UTC"

    # Second run: neither pip nor the conversion may run again.
    built = {p.name: p.stat().st_mtime_ns for p in (cache / "ml-100k").iterdir()}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo cache was not used")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(flows.sources.demo, "convert", refuse)
    again = ingest(DataParams(source="demo", ranking_logs="none", max_users=50), SimulatorParams(), 42, cache, out)
    assert again["users"] == 50 and again["items"] == 1682
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "ml-100k").iterdir()} == built


def test_demo_simulated_logs(cache: Path, tmp_path: Path) -> None:
    sim = SimulatorParams(candidates=50, ranked=20, shown=10)
    summary = ingest(DataParams(source="demo", max_users=100), sim, 42, cache, tmp_path / "ingested")
    assert summary["logs_origin"] == "simulated"
    logs = pq.read_table(tmp_path / "ingested" / "ranking_logs.parquet")
    assert logs.num_rows == summary["ranking_logs"] > 0
    assert summary["simulation"]["requests"] == round(0.1 * summary["interactions"])


def test_checksum_mismatch_is_a_clear_error(recbole_wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    tampered = cache / recbole_wheel.name
    member = MEMBER.format("inter")
    with zipfile.ZipFile(recbole_wheel) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == member:
                data = data.replace(b"\t5\t", b"\t4\t", 1)  # one rating changed
            dst.writestr(info, data)
    with pytest.raises(DataContractError, match=r"ml-100k\.inter .* has sha256 .*expected 4edb74e2") as err:
        demo_source(cache)
    assert str(tampered) in str(err.value) and "delete" in str(err.value)
    assert sorted(p.name for p in cache.iterdir()) == [recbole_wheel.name]  # nothing converted or cached


def test_not_a_wheel_is_a_clear_error(tmp_path: Path, recbole_wheel: Path) -> None:
    (tmp_path / recbole_wheel.name).write_bytes(b"truncated download")
    with pytest.raises(DataContractError, match="not a readable recbole wheel"):
        demo_source(tmp_path)
