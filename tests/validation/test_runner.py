"""The GX runner: what a failed row check reports, and what it no longer computes."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from validation.batches import row_frame
from validation.runner import RESULT_FORMAT, Check, _checkpoint, open_context, run_checks
from validation.suites import Expect


def test_a_check_reports_counts_and_examples_without_listing_every_failing_row(tmp_path: Path) -> None:
    """Each expectation reports its failed and checked rows and its first values, not the index of
    every failed row (two more passes per expectation and batch). A project whose stored checkpoint
    still lists them (an older towerflow) is brought to the same format on its next run."""
    def expectations() -> list:   # fresh ones each time: GX refuses an expectation of another suite
        return [Expect()("ExpectColumnValuesToBeBetween", "x", "values", "x below 0", min_value=0)]

    frame = pd.DataFrame({"x": [1.0, 2.0, None, 4.0, -5.0, -6.0]})
    root = tmp_path / "gx"
    older = _checkpoint(open_context(root), "t_suite", expectations())
    older.result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
    older.save()
    check = Check("t", "t_suite", expectations(), lambda: [frame])
    stats, failures, _ = run_checks([check], {}, {}, root, "site", tmp_path / "docs")
    assert stats["t"]["failed"] == 1
    [failure] = failures
    assert (failure.failed_rows, failure.rows, failure.examples) == (2, 6, [-5.0, -6.0])
    ctx = open_context(root)
    assert ctx.checkpoints.get("t_suite_checkpoint").result_format == RESULT_FORMAT
    [key] = ctx.validation_results_store.list_keys()
    [result] = ctx.validation_results_store.get(key).results
    assert result.result["unexpected_count"] == 2 and result.result["partial_unexpected_list"] == [-5.0, -6.0]
    assert "partial_unexpected_index_list" not in result.result and "unexpected_index_query" not in result.result


def test_string_columns_in_arrow_pass_the_string_type_check_and_report_their_values(tmp_path: Path) -> None:
    """The row checks' frames keep strings in arrow (validation/batches.py); GX's type name
    "StringDtype" means the default storage, which the runner sets to theirs: the type check passes,
    and a failing value check still counts its rows (nulls apart) and lists the values."""
    frame = row_frame(pa.table({"request_id": pa.array(["r1", None, "bad id", "r4", "also bad"])}))
    e = Expect()
    check = Check("t", "t_suite", [e.id_type("request_id", "string"),
                                   e("ExpectColumnValuesToMatchRegex", "request_id", "values", "has a space",
                                     regex=r"^\S+$")], lambda: [frame])
    stats, failures, _ = run_checks([check], {}, {}, tmp_path / "gx", "site", tmp_path / "docs")
    [failure] = failures
    assert failure.problem == "has a space"
    assert (failure.failed_rows, failure.examples) == (2, ["bad id", "also bad"])
    assert stats["t"]["failed"] == 1
