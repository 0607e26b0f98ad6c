"""Ingest: the data contract (docs/DATA.md) read from real parquet/csv files into data/ingested."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.sources.contract import feature_kinds
from flows.errors import DataContractError
from flows.params import DataParams, FeatureKinds, SimulatorParams
from flows.stages.ingest import check_source, ingest
from tests.datagen import make_contract_dataset

SIM = SimulatorParams(candidates=40, ranked=20, shown=5)


def _run(source: Path, out: Path, **data: object) -> dict:
    return ingest(DataParams(source=str(source), **data), SIM, 7, cache_dir=out.parent / "cache", out_dir=out)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def int_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_dataset(tmp_path_factory.mktemp("int_src"), n_users=120, n_items=90)


@pytest.fixture(scope="module")
def str_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_dataset(tmp_path_factory.mktemp("str_src"), n_users=120, n_items=90,
                                 string_ids=True, with_logs=True)


def test_int_ids_simulated_logs(int_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    summary = _run(int_source, out)
    assert summary["logs_origin"] == "simulated" and summary["ranking_logs"] > 0
    schema = json.loads((out / "schema.json").read_text())
    assert schema["user_id_dtype"] == "int64" and schema["item_id_dtype"] == "int64"
    assert schema["has_rating"] is True and schema["ranking_logs"] == "simulated"
    assert schema["user_features"] == {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [],
                                       "multi": [], "ignored": []}
    assert schema["item_features"] == {"categorical": [], "numeric": ["year"], "multi": ["genres"],
                                       "ignored": ["title"]}
    inter = pq.read_table(out / "interactions.parquet")
    assert inter.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert inter.schema.field("user_id").type == pa.int64()
    assert inter.schema.field("weight").type == pa.float64() and set(inter["weight"].to_pylist()) == {1.0}
    src = pd.read_parquet(int_source / "interactions.parquet")
    assert inter.num_rows == len(src) and set(inter["user_id"].to_pylist()) == set(src["user_id"])
    items = pq.read_table(out / "items.parquet")
    assert items.column_names == ["item_id", "year", "genres"]  # title ignored, so not written
    assert items.schema.field("genres").type == pa.list_(pa.string())
    assert items.schema.field("year").type == pa.float64()
    assert sorted((out / "simulation").iterdir()) == [out / "simulation" / n for n in
                                                      ("truth.json", "truth.parquet", "user_types.parquet")]
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    assert str(logs["position"].dtype) == "Int64" and logs["user_id"].dtype == "int64"
    assert not list(tmp_path.glob(".ingested*"))  # the temp and old directories are gone


def test_string_ids_source_logs(str_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    summary = _run(str_source, out)
    assert summary["logs_origin"] == "source"
    schema = json.loads((out / "schema.json").read_text())
    assert schema["user_id_dtype"] == "string" and schema["item_id_dtype"] == "string"
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    src = pd.read_parquet(str_source / "ranking_logs.parquet")
    assert len(logs) == len(src) and logs["user_id"].iloc[0].startswith("u")
    assert list(logs.columns) == ["request_id", "user_id", "item_id", "timestamp", "stage", "position",
                                  "ranker_score", "clicked"]
    assert [p.name for p in (out / "simulation").iterdir()] == ["README.txt"]
    assert set(pq.read_table(out / "users.parquet")["user_id"].to_pylist()) == set(
        pd.read_parquet(str_source / "users.parquet")["user_id"])


def test_ranking_logs_none_and_simulate(str_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    _run(str_source, out, ranking_logs="none")
    logs = pq.read_table(out / "ranking_logs.parquet")
    assert logs.num_rows == 0 and logs.schema.field("position").type == pa.int64()
    assert logs.schema.field("user_id").type == pa.string()
    assert json.loads((out / "schema.json").read_text())["ranking_logs"] == "none"
    summary = _run(str_source, out, ranking_logs="simulate")  # ignores the source's logs
    assert summary["logs_origin"] == "simulated"
    assert pq.read_table(out / "ranking_logs.parquet")["request_id"][0].as_py().startswith("sim-")


def test_simulated_logs_leave_out_interactions_with_unknown_users_or_items(int_source: Path, tmp_path: Path) -> None:
    """An interaction with an item outside the catalog or an unknown user is validate's finding about
    the interactions; the simulated ranking logs must not repeat it as a fault of their own."""
    src = tmp_path / "src"
    shutil.copytree(int_source, src)
    (src / "ranking_logs.parquet").unlink(missing_ok=True)
    inter = pd.read_parquet(src / "interactions.parquet")
    bad = inter.iloc[:2].copy()
    bad["item_id"] = [999_999, int(inter["item_id"].iloc[0])]
    bad["user_id"] = [int(inter["user_id"].iloc[0]), 888_888]
    pd.concat([inter, bad], ignore_index=True).to_parquet(src / "interactions.parquet", index=False)
    out = tmp_path / "ingested"
    summary = _run(src, out)
    assert summary["logs_origin"] == "simulated" and summary["interactions"] == len(inter) + 2
    logs = pq.read_table(out / "ranking_logs.parquet")
    assert logs.num_rows > 0
    assert 999_999 not in set(logs["item_id"].to_pylist()) and 888_888 not in set(logs["user_id"].to_pylist())


def test_max_users_keeps_first_sorted_ids(str_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    summary = _run(str_source, out, max_users=10)
    keep = sorted(pd.read_parquet(str_source / "users.parquet")["user_id"])[:10]
    assert summary["users"] == 10
    for name in ("users", "interactions", "ranking_logs"):
        assert set(pq.read_table(out / f"{name}.parquet")["user_id"].to_pylist()) <= set(keep)
    assert summary["items"] == 90  # the catalog stays whole
    assert summary["interactions"] == int(pd.read_parquet(str_source / "interactions.parquet")
                                          ["user_id"].isin(keep).sum())


def test_csv_source_keeps_ids_exactly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"user_id": ["007", "8", "9"], "city": ["a", "b", "a"]}).to_csv(src / "users.csv", index=False)
    pd.DataFrame({"item_id": [1, 2], "tags": ["x|y", "y"], "price": [1.5, 2.0]}).to_csv(src / "items.csv", index=False)
    pd.DataFrame({"user_id": ["007", "8", "9"], "item_id": [1, 2, 2],
                  "timestamp": [1_700_000_000, 1_700_000_100, 1_700_000_200]}).to_csv(src / "interactions.csv", index=False)
    out = tmp_path / "ingested"
    _run(src, out, ranking_logs="none", item_features=FeatureKinds(multi=["tags"]))
    schema = json.loads((out / "schema.json").read_text())
    assert schema["user_id_dtype"] == "string" and schema["item_id_dtype"] == "int64"
    assert schema["has_rating"] is False
    assert schema["item_features"] == {"categorical": [], "numeric": ["price"], "multi": ["tags"], "ignored": []}
    inter = pq.read_table(out / "interactions.parquet")
    assert inter["user_id"].to_pylist() == ["007", "8", "9"]  # '007' was not turned into 7
    assert inter["timestamp"][0].as_py() == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    assert pq.read_table(out / "items.parquet")["tags"].to_pylist() == [["x", "y"], ["y"]]


def test_empty_csv_cells_are_missing_values_in_text_columns_too(tmp_path: Path) -> None:
    """An empty cell is null in every column kind: no "" category, no [""] list, and an empty id is a
    missing id (validate's keys check names it); text such as "NA" is kept as written."""
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"user_id": ["u1", "u2", "NA"], "city": ["a", "", "a"]}).to_csv(src / "users.csv", index=False)
    pd.DataFrame({"item_id": [1, 2, 3], "tags": ["x|y", "", "y"], "brand": ["b1", "", "NA"],
                  "price": [1.5, None, 2.0]}).to_csv(src / "items.csv", index=False)
    pd.DataFrame({"user_id": ["u1", "", "NA"], "item_id": [1, 2, 2],
                  "timestamp": [1_700_000_000, 1_700_000_100, 1_700_000_200]}).to_csv(src / "interactions.csv",
                                                                                      index=False)
    out = tmp_path / "ingested"
    _run(src, out, ranking_logs="none", item_features=FeatureKinds(multi=["tags"], categorical=["brand"]))
    items = pq.read_table(out / "items.parquet").to_pydict()
    assert items["brand"] == ["b1", None, "NA"] and items["tags"] == [["x", "y"], None, ["y"]]
    assert items["price"][1] is None or items["price"][1] != items["price"][1]
    assert pq.read_table(out / "users.parquet")["city"].to_pylist() == ["a", None, "a"]
    assert pq.read_table(out / "interactions.parquet")["user_id"].to_pylist() == ["u1", None, "NA"]


def test_uint64_ids_above_int64_are_kept_as_text_and_float_ids_out_of_range_are_named(tmp_path: Path) -> None:
    big = [2**63 + 5, 2**63 + 6, 7]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"user_id": pa.array(big, pa.uint64())}), src / "users.parquet")
    pq.write_table(pa.table({"item_id": pa.array([1, 2], pa.uint64())}), src / "items.parquet")
    pq.write_table(pa.table({"user_id": pa.array(big, pa.uint64()), "item_id": pa.array([1, 2, 1], pa.uint64()),
                             "timestamp": [1_700_000_000] * 3}), src / "interactions.parquet")
    out = tmp_path / "ingested"
    _run(src, out, ranking_logs="none")
    schema = json.loads((out / "schema.json").read_text())
    assert schema["user_id_dtype"] == "string" and schema["item_id_dtype"] == "int64"   # small uint64: int64
    assert pq.read_table(out / "interactions.parquet")["user_id"].to_pylist() == [str(v) for v in big]
    assert pq.read_table(out / "users.parquet")["user_id"].to_pylist() == [str(v) for v in big]

    pq.write_table(pa.table({"user_id": pa.array([1e19, 2.0, None])}), src / "users.parquet")
    with pytest.raises(DataContractError, match=r"users.parquet: column 'user_id' cannot be read as integer ids"):
        _run(src, tmp_path / "again", ranking_logs="none")


def test_feature_kind_inference() -> None:
    n = 30
    table = pa.table({
        "user_id": list(range(n)),
        "city": ["a", "b", "c"] * 10, "vip": [True, False] * 15,
        "tier": pa.array(["x", "y"] * 15).dictionary_encode(),
        "age": list(range(n)), "score": [0.5] * n,
        "tags": [["p", "q"]] * n, "bio": [f"text {i}" for i in range(n)],
        "joined": pa.array([0] * n, pa.timestamp("s")),
    })
    assert feature_kinds(table, "user_id", FeatureKinds()) == {
        "categorical": ["city", "vip", "tier"], "numeric": ["age", "score"], "multi": ["tags"],
        "ignored": ["bio", "joined"]}
    # A declared kind is exact; null kinds are inferred from the columns not declared elsewhere.
    declared = FeatureKinds(categorical=["age", "bio"], numeric=None, multi=[])
    assert feature_kinds(table, "user_id", declared) == {
        "categorical": ["age", "bio"], "numeric": ["score"], "multi": [],
        "ignored": ["city", "vip", "tier", "tags", "joined"]}


def _bad_nonexistent(src: Path) -> tuple[Path, dict]:
    return src / "nope", {}


def _bad_missing_file(src: Path) -> tuple[Path, dict]:
    (src / "items.parquet").unlink()
    return src, {}


def _bad_missing_column(src: Path) -> tuple[Path, dict]:
    pd.read_parquet(src / "interactions.parquet").drop(columns="timestamp").to_parquet(src / "interactions.parquet")
    return src, {}


def _bad_unreadable(src: Path) -> tuple[Path, dict]:
    (src / "users.parquet").write_bytes(b"this is not parquet at all")
    return src, {}


def _bad_declared_column(src: Path) -> tuple[Path, dict]:
    return src, {"user_features": FeatureKinds(categorical=["shoe_size"])}


def _bad_declared_type(src: Path) -> tuple[Path, dict]:
    return src, {"user_features": FeatureKinds(numeric=["gender"])}  # 'F'/'M' are not numbers


def _bad_logs_column(src: Path) -> tuple[Path, dict]:
    pd.read_parquet(src / "ranking_logs.parquet").drop(columns="clicked").to_parquet(src / "ranking_logs.parquet")
    return src, {}


@pytest.mark.parametrize("make_bad, names, problem, preflight", [
    (_bad_nonexistent, "nope", "does not exist", True),
    (_bad_missing_file, "items.parquet", "required file missing", True),
    (_bad_missing_column, "interactions.parquet", "missing required column 'timestamp'", True),
    (_bad_unreadable, "users.parquet", "not a readable parquet file", True),
    (_bad_declared_column, "users.parquet", "declared categorical feature column 'shoe_size' does not exist", True),
    (_bad_declared_type, "users.parquet", "column 'gender' cannot be read as numeric", False),
    (_bad_logs_column, "ranking_logs.parquet", "missing required column 'clicked'", True),
])
def test_bad_input_names_file_and_leaves_out_dir(make_bad, names: str, problem: str, preflight: bool,
                                                 tmp_path: Path) -> None:
    src = make_contract_dataset(tmp_path / "src", n_users=30, n_items=20, with_logs=True)
    out = tmp_path / "ingested"
    _run(src, out)  # a good previous run
    before = _snapshot(out)
    recorded = (tmp_path / "cache" / "source.json").read_text()   # which source files it read
    source, data = make_bad(src)
    if preflight:
        with pytest.raises(DataContractError) as pre:
            check_source(DataParams(source=str(source), **data))
        assert names in str(pre.value) and problem in str(pre.value)
    with pytest.raises(DataContractError) as err:
        _run(source, out, **data)
    message = str(err.value)
    assert names in message and problem in message and "\n" not in message
    assert _snapshot(out) == before
    assert (tmp_path / "cache" / "source.json").read_text() == recorded       # a failure records nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ingested", "src"]  # no temp dirs left


def test_check_source_passes_good_and_demo(int_source: Path) -> None:
    check_source(DataParams(source=str(int_source)))
    check_source(DataParams(source="demo"))


def test_semantic_problems_pass_through_for_validate(tmp_path: Path) -> None:
    src = make_contract_dataset(tmp_path / "src", n_users=30, n_items=20)
    inter = pd.read_parquet(src / "interactions.parquet")
    bad = pd.DataFrame({"user_id": [None, 9999, inter["user_id"][0]], "item_id": [inter["item_id"][0], 1, 77777],
                        "timestamp": [inter["timestamp"][0], pd.NaT, inter["timestamp"][0]],
                        "rating": [None, 3.0, 9.0]})
    pd.concat([inter, inter.head(3), bad]).astype({"user_id": "Int64", "item_id": "Int64"}) \
        .to_parquet(src / "interactions.parquet")
    users = pd.read_parquet(src / "users.parquet")
    pd.concat([users, users.head(1)]).to_parquet(src / "users.parquet")  # a duplicate user id
    out = tmp_path / "ingested"
    summary = _run(src, out)
    assert summary["interactions"] == len(inter) + 6 and summary["users"] == len(users) + 1
    written = pq.read_table(out / "interactions.parquet")
    assert written.schema.field("user_id").type == pa.int64() and written["user_id"].null_count == 1
    assert written["timestamp"].null_count == 1


def _tables_without_logs(source: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("users", "items", "interactions"):
        (dst / f"{name}.parquet").write_bytes((source / f"{name}.parquet").read_bytes())
    return dst


def test_context_columns_of_the_logs_are_kept_with_their_types(str_source: Path, tmp_path: Path) -> None:
    src = _tables_without_logs(str_source, tmp_path / "src")
    logs = pd.read_parquet(str_source / "ranking_logs.parquet")
    logs["device"] = pd.Categorical(["phone", "tv"] * (len(logs) // 2) + ["phone"] * (len(logs) % 2))
    logs["page"] = 1
    logs["dwell"] = 0.5
    logs.to_parquet(src / "ranking_logs.parquet")
    out = tmp_path / "ingested"
    _run(src, out)
    table = pq.read_table(out / "ranking_logs.parquet")
    assert table.schema.field("device").type == pa.string()
    assert table.schema.field("page").type == pa.int64() and table.schema.field("dwell").type == pa.float64()
    assert table.column_names[:8] == ["request_id", "user_id", "item_id", "timestamp", "stage", "position",
                                      "ranker_score", "clicked"]
    assert json.loads((out / "schema.json").read_text())["log_context"] == ["device", "page", "dwell"]


def test_a_nested_context_column_is_a_contract_error(str_source: Path, tmp_path: Path) -> None:
    src = _tables_without_logs(str_source, tmp_path / "src")
    logs = pq.read_table(str_source / "ranking_logs.parquet")
    logs = logs.append_column("slots", pa.array([[1, 2]] * logs.num_rows))
    pq.write_table(logs, src / "ranking_logs.parquet")
    with pytest.raises(DataContractError, match="context column 'slots' holds list"):
        _run(src, tmp_path / "ingested")
