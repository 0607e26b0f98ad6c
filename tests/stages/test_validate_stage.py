"""Stage validate: real GX suites on small contract tables written the way ingest writes them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from flows.errors import MissingStageInput
from flows.stages.validate import validate
from tests.validation.contract_data import ingested_tables
from validation.errors import ValidationFailed
from validation.params import ValidateParams

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_tables(tmp_path_factory.mktemp("ingested"))


@pytest.fixture(scope="module")
def gx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GX context shared by the tests of this module: every run after the first is a re-run."""
    return tmp_path_factory.mktemp("gx")


def _run(ingested: Path, reports: Path, gx_root: Path, cfg: ValidateParams = ValidateParams()) -> dict:
    return validate(cfg, ingested, reports / "validation", reports / "validation.json",
                    context_root=gx_root)


def _edit(table: str, change: Callable[[pd.DataFrame], pd.DataFrame]):
    def apply(d: Path) -> None:
        path = d / f"{table}.parquet"
        change(pd.read_parquet(path)).to_parquet(path, index=False)
    return apply


def _set(table: str, column: str, row: int, value) -> Callable[[Path], None]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        if value is None:  # keep int ids integer (nullable), as ingest would write them
            df[column] = df[column].astype("Int64" if df[column].dtype.kind == "i" else object)
        df.loc[row, column] = value
        return df
    return _edit(table, change)


def _on_stage(stage: str, column: str, value) -> Callable[[Path], None]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df.index[df["stage"] == stage][0], column] = value
        return df
    return _edit("ranking_logs", change)


def test_clean_data_passes_and_writes_docs_and_summary(clean: Path, tmp_path: Path, gx_root: Path):
    summary = _run(clean, tmp_path, gx_root)
    assert summary["success"] and summary["failures"] == []
    assert set(summary["tables"]) == {"users", "items", "interactions", "ranking_logs", "volume"}
    assert summary["errors"] == 0 and summary["docs"].endswith("index.html")
    assert summary["tables"]["interactions"]["evaluated"] >= 10
    assert summary["tables"]["ranking_logs"]["rows"] > 0
    assert (tmp_path / "validation" / "index.html").exists()
    assert json.loads((tmp_path / "validation.json").read_text()) == summary


def test_rerun_in_same_context_keeps_only_this_runs_results(clean: Path, tmp_path: Path, gx_root: Path):
    suite_file = gx_root / "gx" / "expectations" / "interactions_suite.json"
    assert _run(clean, tmp_path, gx_root)["success"]
    stored = suite_file.stat().st_mtime_ns, suite_file.read_text()
    assert _run(clean, tmp_path, gx_root)["success"]
    # the suite is stable from run to run (the clock is a suite parameter), so it is not rewritten
    assert (suite_file.stat().st_mtime_ns, suite_file.read_text()) == stored
    assert '"$PARAMETER": "now"' in stored[1]
    pages = list((tmp_path / "validation" / "validations").rglob("*.html"))
    # one result page per suite run (4 tables, 2 profiles, volume): earlier runs are not listed
    assert len(pages) == 7


def test_string_ids_and_empty_ranking_logs_pass(tmp_path: Path, gx_root: Path):
    data = ingested_tables(tmp_path / "in", string_ids=True)
    _edit("ranking_logs", lambda df: df.iloc[:0])(data)
    summary = _run(data, tmp_path / "reports", gx_root)
    assert summary["success"] and summary["tables"]["ranking_logs"]["rows"] == 0


# The kinds of broken data the brief names, one run each: (how to break the clean data, texts the
# error must contain: table.column, the problem, an example value where there is one).
BROKEN = {
    "null user id": (_set("interactions", "user_id", 3, None), ["interactions.user_id", "null values"]),
    "duplicate item id": (_edit("items", lambda df: pd.concat([df, df.iloc[[5]]], ignore_index=True)),
                          ["items.item_id", "duplicate ids", "1005"]),
    "unknown item": (_set("interactions", "item_id", 0, 99999),
                     ["interactions.item_id", "not in items.item_id", "1 of", "99999"]),
    "unknown stage": (_on_stage("retrieved", "stage", "bogus"), ["ranking_logs.stage", "bogus"]),
    "position 0": (_on_stage("shown", "position", 0), ["ranking_logs.position", "position < 1", "0"]),
    "click on retrieved row": (_on_stage("retrieved", "clicked", True),
                               ["ranking_logs.clicked", "click on a non-shown row", "True"]),
    "future timestamp": (_set("interactions", "timestamp", 4, pd.Timestamp("2999-01-01", tz="UTC")),
                         ["interactions.timestamp", "in the future", "2999-01-01"]),
    "null rating": (_set("interactions", "rating", 0, None), ["interactions.rating", "null values"]),
    # a re-delivered slice: a tenth of the events twice (validate.max_duplicate_share is 2%)
    "duplicated events": (_edit("interactions", lambda df: pd.concat([df, df.iloc[::10]], ignore_index=True)),
                          ["interactions.user_id", "repeat another row's (user_id, item_id, timestamp)"]),
}


def test_a_few_repeated_events_pass(clean: Path, tmp_path: Path, gx_root: Path):
    """A double click logged in the same second happens in real logs: one repeated row is no error."""
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    _edit("interactions", lambda df: pd.concat([df, df.iloc[[0]]], ignore_index=True))(data)
    rows = len(pd.read_parquet(data / "interactions.parquet"))
    assert 2 / rows <= ValidateParams().max_duplicate_share
    assert _run(data, tmp_path / "reports", gx_root)["success"]


def _check_failure(data: Path, reports: Path, gx_root: Path, expected: list[str],
                   cfg: ValidateParams = ValidateParams()) -> str:
    with pytest.raises(ValidationFailed) as err:
        _run(data, reports, gx_root, cfg)
    message = str(err.value)
    assert message.startswith("validation failed: ")
    assert "index.html" in message.splitlines()[0]
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    # docs and summary are written on failure too
    assert (reports / "validation" / "index.html").exists()
    summary = json.loads((reports / "validation.json").read_text())
    assert not summary["success"] and summary["failures"]
    return message


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_data_raises_with_table_column_problem(case: str, clean: Path, tmp_path: Path, gx_root: Path):
    breaks, expected = BROKEN[case]
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    breaks(data)
    message = _check_failure(data, tmp_path / "reports", gx_root, expected)
    assert len(message.splitlines()) == 2, message  # headline + exactly the one broken expectation


def test_several_problems_are_listed_one_line_each(clean: Path, tmp_path: Path):
    # a context of its own whose previous validated run is the clean data (the volume check compares
    # with it): run alone, or on another worker than this module's earlier tests, it had none
    gx_root = tmp_path / "gx"
    _run(clean, tmp_path / "first", gx_root)
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    _edit("interactions", lambda df: df.iloc[:0])(data)
    _set("users", "user_id", 3, None)(data)
    _edit("users", lambda df: df.drop(columns=["gender"]))(data)
    _on_stage("ranked", "position", 7)(data)
    _set("ranking_logs", "user_id", 1, 77777)(data)
    _edit("ranking_logs", lambda df: df.assign(timestamp=df["timestamp"].dt.tz_localize(None)))(data)
    message = _check_failure(data, tmp_path / "reports", gx_root, [
        "expectations on 3 tables",
        "interactions: no interactions",
        "users.user_id: null values",
        "users.gender: required column is missing",
        "ranking_logs.position: position set on a non-shown row", "e.g. 7",
        "ranking_logs.user_id: not in users.user_id", "77777",
        "ranking_logs.timestamp: timestamp in the future (or not tz-aware UTC, or unix milliseconds written as seconds)", "could not be checked",
    ])
    # emptied interactions are also a volume warning (reported, after the errors)
    assert len([x for x in message.splitlines() if not x.startswith("  warning:")]) == 1 + 6, message
    assert "  warning: volume" not in message and "  warning: interactions: row count outside" in message


def test_missing_input_names_the_file(clean: Path, tmp_path: Path, gx_root: Path):
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    (data / "ranking_logs.parquet").unlink()
    with pytest.raises(MissingStageInput, match="ranking_logs.parquet"):
        _run(data, tmp_path / "reports", gx_root)


def _small(clean: Path, data: Path) -> Path:
    """The clean tables with 30 interactions and no ranking logs: a few batches of 16 rows each."""
    shutil.copytree(clean, data)
    _edit("interactions", lambda df: df.iloc[:30])(data)
    _edit("ranking_logs", lambda df: df.iloc[:0])(data)
    return data


def test_batches_give_the_whole_table_verdict(clean: Path, tmp_path: Path):
    data = _small(clean, tmp_path / "in")
    # a duplicate id in another batch than its first copy; 3 null genders, all in the first batch
    # (3/16 fails `mostly` in that batch, 3/40 passes over the table)
    _edit("items", lambda df: pd.concat([df, df.iloc[[2]]], ignore_index=True))(data)
    _edit("users", lambda df: df.assign(gender=df["gender"].where(df.index >= 3)))(data)
    cfg = ValidateParams(chunk_rows=16, sample_rows=20)
    message = _check_failure(data, tmp_path / "r", tmp_path / "gx", ["items.item_id", "duplicate ids", "1002"], cfg)
    summary = json.loads((tmp_path / "r" / "validation.json").read_text())
    # 40 users and 31 items in batches of 16, plus one sample each for the profile suite
    assert summary["tables"]["users"]["batches"] == 3 + 1 and summary["tables"]["items"]["batches"] == 2 + 1
    assert summary["warned"] == [] and "gender" not in message
    # Data Docs: one page per suite run over the whole table (not per batch), with summed counts
    pages = list((tmp_path / "r" / "validation" / "validations").rglob("*.html"))
    assert len(pages) == 7
    from validation.runner import open_context
    store = open_context(tmp_path / "gx").validation_results_store
    users = [store.get(k) for k in store.list_keys() if k.expectation_suite_identifier.name == "users_suite"]
    assert len(users) == 1 and users[0].meta["batches"] == 3
    nulls = [r for r in users[0].results if r.expectation_config.type == "expect_column_values_to_not_be_null"
             and r.expectation_config.kwargs["column"] == "gender"]
    assert nulls[0].result["element_count"] == 40 and nulls[0].result["unexpected_count"] == 3
    assert nulls[0].success
    _edit("users", lambda df: df.assign(gender=df["gender"].where(df.index >= 5)))(data)  # 5/40 > 10%
    # a multi-valued column reaches GX as list lengths (validation.batches.row_frame): nulls still count
    _edit("items", lambda df: df.assign(genres=df["genres"].where(df.index >= 4)))(data)  # 4/31 > 10%
    _check_failure(data, tmp_path / "r", tmp_path / "gx", ["warning: users.gender: more than 10% nulls",
                                                            "5 of 40 rows", "warning: items.genres: more than 10% nulls",
                                                            "4 of 31 rows"], cfg)


def test_data_docs_compile_gx_templates_once_per_process(clean: Path, tmp_path: Path, gx_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """GX's page views make a new Jinja Environment per view: each build compiled ~56 templates again
    (~1 s of a validation); ours share one bytecode cache (validation/docs_views.py)."""
    import jinja2

    _run(clean, tmp_path / "a", gx_root)
    compiled: list[str | None] = []
    real = jinja2.Environment._compile

    def counting(self, source, filename):  # noqa: ANN001, ANN202
        compiled.append(filename)
        return real(self, source, filename)

    monkeypatch.setattr(jinja2.Environment, "_compile", counting)
    _run(clean, tmp_path / "b", gx_root)
    assert compiled == []
    pages = sorted(p.relative_to(tmp_path / "b").parts[2:4] for p in (tmp_path / "b").rglob("*.html")
                   if "validations" in p.parts)
    assert pages == sorted(p.relative_to(tmp_path / "a").parts[2:4] for p in (tmp_path / "a").rglob("*.html")
                           if "validations" in p.parts) and pages
    assert "interactions_suite" in (tmp_path / "b" / "validation" / "index.html").read_text()


def test_volume_warns_and_severity_error_stops(clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    gx = tmp_path / "gx"
    assert _run(clean, tmp_path / "r", gx)["success"]
    state = json.loads((gx / "volume.json").read_text())["rows"]
    assert state["interactions"] > 0
    small = _small(clean, tmp_path / "in")
    summary = _run(small, tmp_path / "r", gx)  # a 7x drop: a warning, the run goes on
    assert summary["success"] and summary["warnings"] == 2  # interactions and ranking_logs
    assert any("interactions: row count outside 3.0x of the previous validated run "
               f"({state['interactions']} rows)" in r.getMessage() for r in caplog.records)
    assert json.loads((gx / "volume.json").read_text())["rows"]["interactions"] == 30
    strict = ValidateParams(severity={"volume": "error"})
    message = _check_failure(clean, tmp_path / "r", gx, ["interactions: row count outside 3.0x",
                                                         "(30 rows)", "observed"], strict)
    assert json.loads((gx / "volume.json").read_text())["rows"]["interactions"] == 30  # not updated
    assert "1 expectation on 1 table" in message.splitlines()[0]  # logs had 0 rows: unbounded


def test_distribution_range_and_floor_checks(clean: Path, tmp_path: Path):
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    _set("interactions", "timestamp", 2, pd.Timestamp("1970-01-02", tz="UTC"))(data)
    _set("interactions", "rating", 1, 50.0)(data)
    cfg = ValidateParams(rating_range=(1, 5), rating_mean=(4.5, 5.0), categorical_cardinality=(1, 3))
    message = _check_failure(data, tmp_path / "r", tmp_path / "gx", [
        "interactions.timestamp: timestamp before validate.timestamp_floor", "1970-01-02",
        "interactions.rating: rating outside validate.rating_range [1.0, 5.0]", "e.g. 50.0",
        "warning: interactions.rating: mean rating outside validate.rating_mean [4.5, 5.0]",
        "warning: users.occupation: distinct values outside [1, 3]", "warning: items.title"], cfg)
    assert "users.gender" not in message  # 2 values: inside the bounds


def test_cardinality_is_exact_over_batches_not_a_sample(clean: Path, tmp_path: Path):
    """40 distinct titles in batches of 16 and a 10-row sample: the lower bound sees all 40 (a sample
    would count at most 10), and the upper bound is caught even when the excess is in a late batch
    (the distinct values themselves: tests/validation/test_batches.py)."""
    # the items table is the one under test: without the ranking logs' rows the other tables' 16-row
    # batches are few (the logs alone made this test take 36 s)
    data = tmp_path / "in"
    shutil.copytree(clean, data)
    _edit("ranking_logs", lambda df: df.iloc[:0])(data)
    titles = pd.read_parquet(data / "items.parquet")["title"]
    lo = titles.nunique() - 2
    summary = _run(data, tmp_path / "ok", tmp_path / "gx",
                   ValidateParams(chunk_rows=16, sample_rows=10, categorical_cardinality=(lo, 1000)))
    # other columns have few values and rightly warn; the title column has all of its values
    assert [w for w in summary["warned"] if w["column"] == "title"] == [], summary["warned"]
    assert any(w["column"] == "gender" for w in summary["warned"])
    _check_failure(data, tmp_path / "r", tmp_path / "gx", [f"items.title: distinct values outside [1, {lo}]"],
                   ValidateParams(chunk_rows=16, sample_rows=10, categorical_cardinality=(1, lo),
                                  severity={"distribution": "error"}))


def test_batches_checked_in_two_processes_give_what_one_gives(clean: Path, tmp_path: Path):
    """validate.workers: 2 shares a table's batches between two forked processes; the verdict, the
    counts, the examples (first batches first) and the merged Data Docs pages are those of one process."""
    data = _small(clean, tmp_path / "in")
    _edit("items", lambda df: pd.concat([df, df.iloc[[2, 20]]], ignore_index=True))(data)   # two duplicates
    _edit("users", lambda df: df.assign(gender=df["gender"].where(df.index % 7 != 3)))(data)   # nulls in 3 batches
    summaries, pages = {}, {}
    for workers in (1, 2):
        cfg = ValidateParams(chunk_rows=8, sample_rows=20, workers=workers)
        with pytest.raises(ValidationFailed):
            _run(data, tmp_path / f"r{workers}", tmp_path / f"gx{workers}", cfg)
        summaries[workers] = json.loads((tmp_path / f"r{workers}" / "validation.json").read_text())
        pages[workers] = len(list((tmp_path / f"r{workers}" / "validation" / "validations").rglob("*.html")))
    one, two = summaries[1], summaries[2]
    assert one["tables"]["users"]["batches"] == 5 + 1 and one["tables"] == two["tables"]
    assert one["failures"] == two["failures"] and one["warned"] == two["warned"]
    duplicates = [f for f in two["failures"] if f["expectation"] == "expect_column_values_to_be_null"
                  and f["table"] == "items"]
    assert duplicates and duplicates[0]["failed_rows"] == 4
    assert pages[1] == pages[2] == 7
