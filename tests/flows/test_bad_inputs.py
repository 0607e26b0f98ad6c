"""A corpus of broken inputs, each run through the real CLI: `towerflow stage ingest`, then `validate`.

One temporary project (its own params.yaml, paths inside it) holds a good ingested copy. Each case
points `data.source` at a broken copy of the source and checks: a non-zero exit, a message naming
the file or table, the column and the problem, no traceback, and, when ingest rejects the input,
that the previously ingested data is unchanged. CliRunner keeps every case in this one process
(importing GX and pyarrow once), which keeps the corpus fast.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.datagen import make_contract_dataset

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _params(project: Path, source: Path, ranking_logs: str = "auto") -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    params["data"]["ranking_logs"] = ranking_logs
    params["validate"]["rating_range"] = [1.0, 5.0]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _cli(project: Path, stage: str) -> tuple[int, str]:
    result = runner.invoke(app, ["stage", stage, "--params", str(project / "params.yaml")])
    return result.exit_code, result.output


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("project")
    good = make_contract_dataset(tmp_path_factory.mktemp("good"), n_users=40, n_items=30,
                                 per_user=(3, 8), with_logs=True)
    _params(root, good)
    for stage in ("ingest", "validate"):
        code, out = _cli(root, stage)
        assert code == 0, out
    baseline = tmp_path_factory.mktemp("baseline") / "ingested"
    shutil.copytree(root / "data" / "ingested", baseline)
    return {"root": root, "good": good, "baseline": baseline, "snapshot": _snapshot(baseline)}


# ------------------------------------------------------------------------------------ breakers

def _parquet(name: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        change(pd.read_parquet(src / f"{name}.parquet")).to_parquet(src / f"{name}.parquet", index=False)
    return apply


def _cell(name: str, column: str, value: object, row: int = 0) -> Callable[[Path], None]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        if value is None and df[column].dtype.kind == "i":
            df[column] = df[column].astype("Int64")
        df.loc[row, column] = value
        return df
    return _parquet(name, change)


def _on_stage(stage: str, column: str, value: object) -> Callable[[Path], None]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df.index[df["stage"] == stage][0], column] = value
        return df
    return _parquet("ranking_logs", change)


def _as_csv(name: str, change: Callable[[pd.DataFrame], pd.DataFrame] = lambda df: df,
            encoding: str = "utf-8") -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        df = change(pd.read_parquet(src / f"{name}.parquet"))
        (src / f"{name}.parquet").unlink()
        df.to_csv(src / f"{name}.csv", index=False, encoding=encoding)
    return apply


def _text_timestamps(text: str) -> Callable[[Path], None]:
    return _as_csv("interactions", lambda df: df.assign(timestamp=text))


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        (src / name).write_bytes(data)
    return apply


def _empty_csv(src: Path) -> None:
    (src / "users.parquet").unlink()
    (src / "users.csv").write_bytes(b"")


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    extra = pd.DataFrame(np.zeros((len(df), 5000)), columns=[f"f{i}" for i in range(5000)])
    return pd.concat([df, extra], axis=1)


# (how to break the good source, the stage that must reject it, texts the message must contain)
CASES: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    "missing column": (_parquet("interactions", lambda df: df.drop(columns="timestamp")), "ingest",
                       ["interactions.parquet", "missing required column 'timestamp'"]),
    "renamed column": (_parquet("users", lambda df: df.rename(columns={"user_id": "userId"})), "ingest",
                       ["users.parquet", "missing required column 'user_id'", "userId"]),
    "wrong dtype": (_parquet("ranking_logs", lambda df: df.assign(clicked=df["clicked"].map({True: "yes", False: "no"}))),
                    "ingest", ["ranking_logs.parquet", "column 'clicked' cannot be read as bool"]),
    "null id": (_cell("interactions", "user_id", None, 3), "validate",
                ["interactions.user_id: null values", "1 of"]),
    "duplicate id": (_parquet("users", lambda df: pd.concat([df, df.iloc[[4]]], ignore_index=True)), "validate",
                     ["users.user_id: duplicate ids", "e.g. 5"]),
    "negative position": (_on_stage("shown", "position", -1), "validate",
                          ["ranking_logs.position: position < 1 on a shown row", "e.g. -1"]),
    "zero position": (_on_stage("shown", "position", 0), "validate",
                      ["ranking_logs.position: position < 1 on a shown row", "e.g. 0"]),
    "unknown stage": (_on_stage("ranked", "stage", "clicked_through"), "validate",
                      ["ranking_logs.stage: stage not in", "clicked_through"]),
    "click never shown": (_on_stage("retrieved", "clicked", True), "validate",
                          ["ranking_logs.clicked: click on a non-shown row", "e.g. True"]),
    "unknown item": (_cell("interactions", "item_id", 99999), "validate",
                     ["interactions.item_id: not in items.item_id", "99999"]),
    "future timestamp": (_cell("interactions", "timestamp", pd.Timestamp("2999-01-01", tz="UTC")), "validate",
                         ["interactions.timestamp: timestamp in the future", "2999-01-01"]),
    "timestamp before floor": (_cell("interactions", "timestamp", pd.Timestamp("1970-01-02", tz="UTC")),
                               "validate", ["interactions.timestamp: timestamp before validate.timestamp_floor",
                                            "1970-01-02"]),
    "timestamp text day/month": (_text_timestamps("03/04/2024 10:00"), "ingest",
                                 ["interactions.csv", "column 'timestamp'", "'03/04/2024 10:00'", "ISO 8601"]),
    "timestamp text RFC 2822": (_text_timestamps("Mon, 04 Mar 2024 10:00:00 GMT"), "ingest",
                                ["interactions.csv", "column 'timestamp'", "'Mon, 04 Mar 2024 10:00:00 GMT'"]),
    "timestamp text mixed": (_as_csv("interactions", lambda df: df.assign(
        timestamp=["2024-03-04T10:00:00Z" if i else "yesterday" for i in range(len(df))])), "ingest",
        ["interactions.csv", "column 'timestamp'", "'yesterday'"]),
    "empty parquet file": (_write("interactions.parquet", b""), "ingest",
                           ["interactions.parquet", "not a readable parquet file"]),
    "empty csv file": (_empty_csv, "ingest", ["users.csv", "not a readable CSV file", "Empty CSV"]),
    "header only": (_parquet("interactions", lambda df: df.iloc[:0]), "validate",
                    ["interactions: no interactions"]),
    "not parquet": (_write("items.parquet", b"item_id,genres\n1,a\n"), "ingest",
                    ["items.parquet", "not a readable parquet file"]),
    "non-UTF-8 csv": (_as_csv("users", lambda df: df.assign(occupation="Zoë"), encoding="latin-1"), "ingest",
                      ["users.csv", "not UTF-8 text", "occupation"]),
    "huge rating": (_cell("interactions", "rating", 1e300), "validate",
                    ["interactions.rating: rating outside validate.rating_range [1.0, 5.0]", "1e+300"]),
    "huge unix seconds": (_parquet("interactions", lambda df: df.assign(
        timestamp=df["timestamp"].astype("int64") // 10**9 * 0 + 10**15)), "ingest",
        ["interactions.parquet", "column 'timestamp'", "out of range", "1000000000000000"]),
    "5000 columns": (_parquet("users", _wide), "ingest", ["users.parquet", "5004 columns", "more than"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_stops_with_a_clear_message(case: str, project: dict, tmp_path: Path) -> None:
    breaks, stage, expected = CASES[case]
    root, ingested = project["root"], project["root"] / "data" / "ingested"
    shutil.rmtree(ingested)
    shutil.copytree(project["baseline"], ingested)  # a good previous ingest
    src = tmp_path / "source"
    shutil.copytree(project["good"], src)
    breaks(src)
    _params(root, src)

    code, out = _cli(root, "ingest")
    if stage == "ingest":
        assert code != 0, out
        assert _snapshot(ingested) == project["snapshot"], "ingest changed the previous good data"
    else:
        assert code == 0, out
        code, out = _cli(root, "validate")
        assert code != 0, out
        assert "validation failed" in out and "validation/index.html" in out
    assert "towerflow: error: " in out and "unexpected error" not in out
    assert "Traceback" not in out
    for text in expected:
        assert text in out, f"{case}: {text!r} not in:\n{out}"


def test_timestamp_text_with_offset_or_naive_iso_is_accepted(project: dict, tmp_path: Path) -> None:
    """ISO 8601 text is parsed: with an offset it is converted to UTC, without one it is UTC."""
    root = project["root"]
    src = tmp_path / "source"
    shutil.copytree(project["good"], src)
    inter = pd.read_parquet(src / "interactions.parquet")
    stamps = ["2024-03-04T10:00:00+02:00", "2024-03-04 10:00:00"] * (len(inter) // 2 + 1)
    _as_csv("interactions", lambda df: df.assign(timestamp=stamps[: len(df)]))(src)
    _params(root, src, ranking_logs="none")  # the source's logs predate these timestamps
    for stage in ("ingest", "validate"):
        code, out = _cli(root, stage)
        assert code == 0, out
    got = pd.read_parquet(root / "data" / "ingested" / "interactions.parquet")["timestamp"]
    assert got.iloc[0] == pd.Timestamp("2024-03-04 08:00", tz="UTC")
    assert got.iloc[1] == pd.Timestamp("2024-03-04 10:00", tz="UTC")
