"""Fail fast on non-finite numbers: ±inf in a numeric feature or in an interaction's weight/rating
stops the validate stage with an error naming the table and the column; NaN stays a null."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.stages.validate import validate
from tests.validation.contract_data import ingested_tables
from validation.errors import ValidationFailed
from validation.params import SeverityParams, ValidateParams


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_tables(tmp_path_factory.mktemp("ingested"))


def _with(clean: Path, out: Path, table: str, column: str, values: dict[int, float]) -> Path:
    data = out / "ingested"
    shutil.copytree(clean, data)
    df = pd.read_parquet(data / f"{table}.parquet")
    df[column] = df[column].astype("float64")
    for row, value in values.items():
        df.loc[row, column] = value
    df.to_parquet(data / f"{table}.parquet", index=False)
    return data


def _run(data: Path, out: Path, cfg: ValidateParams = ValidateParams()) -> dict:
    return validate(cfg, data, out / "validation", out / "validation.json", context_root=out / "gx")


def test_inf_in_an_item_feature_stops_validate_naming_the_column(clean: Path, tmp_path: Path):
    data = _with(clean, tmp_path, "items", "year", {2: np.inf, 7: -np.inf})
    # even with every configurable check only warning, a non-finite number is an error
    lenient = ValidateParams(severity=SeverityParams(columns="warn", keys="warn", values="warn",
                                                     references="warn"))
    with pytest.raises(ValidationFailed) as err:
        _run(data, tmp_path, lenient)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("validation failed: 1 expectation on 1 table")
    assert "items.year: non-finite value (inf or -inf)" in lines[1] and "2 of 30" in lines[1], lines
    summary = json.loads((tmp_path / "validation.json").read_text())
    assert [(f["table"], f["column"], f["check"]) for f in summary["failures"]] == [("items", "year", "finite")]


@pytest.mark.parametrize("column", ["weight", "rating"])
def test_inf_in_an_interaction_weight_or_rating_is_an_error(clean: Path, tmp_path: Path, column: str):
    data = _with(clean, tmp_path, "interactions", column, {0: np.inf})
    # rating: also above validate.rating_range when one is set; without one, only the finite check
    with pytest.raises(ValidationFailed, match=rf"interactions\.{column}: non-finite value \(inf or -inf\)"):
        _run(data, tmp_path, ValidateParams(rating_range=None))


def test_nan_in_a_numeric_feature_is_a_null_not_a_non_finite_error(clean: Path, tmp_path: Path):
    data = _with(clean, tmp_path, "items", "year", {3: np.nan})
    summary = _run(data, tmp_path)
    assert summary["success"] and not any(f["check"] == "finite" for f in summary["warned"])
