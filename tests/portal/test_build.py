"""The portal page from plain run outputs: what it shows, what it says is missing, history, the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.portal.build import PortalInputs, build_portal, keep_history
from flows.portal.render import curves_svg, markdown

from tests.portal.run_outputs import METRICS, write_plain_outputs

ROOT = Path(__file__).resolve().parents[2]


def _hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"#]+)"', html)


def test_portal_links_what_exists_and_names_what_is_missing(tmp_path):
    reports, artifacts = tmp_path / "reports", tmp_path / "artifacts"
    inputs = write_plain_outputs(reports, artifacts)
    (reports / "quality").mkdir()
    (reports / "quality" / "quality.html").write_text("<html>quality</html>")
    out = build_portal(reports, inputs)
    html = out.read_text()

    assert out == reports / "index.html"
    for href in _hrefs(html):  # every link is relative and inside the reports folder
        assert not href.startswith(("/", "http")) and (reports / href).resolve().is_file(), href
    assert html.count('class="curve"') == 2  # eval.csv and full.csv
    assert "0.2310" in html and "prev 0.2246" in html and "+0.0064" in html  # metrics beside the previous run
    assert "Gate passed" in html and "1fec43afffe6" in html and "1,682" in html
    assert "<td>no_logq</td>" in html and "<strong>logQ</strong>" in html  # ablation.md as a table
    assert 'href="quality/quality.html"' in html
    # artifacts live outside reports/: named, not linked, so a zipped reports folder has no dead link
    assert "<code title=\"outside the reports folder\">artifacts/index/manifest.json</code>" in html
    # no GX site and no drift report in this run: the page says so and which stage makes them
    assert "Contract tables (ingested data) Data Docs" in html and "run the validate stage" in html
    assert "run the materialize stage" in html and "drift report" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_rebuilding_is_byte_identical_and_keeps_one_history_entry(tmp_path):
    reports = tmp_path / "reports"
    inputs = write_plain_outputs(reports, tmp_path / "artifacts")
    first = build_portal(reports, inputs).read_bytes()
    assert build_portal(reports, inputs).read_bytes() == first
    assert len(list((reports / "history").glob("*/metrics.json"))) == 2  # the kept previous run + this one


def test_history_gives_the_run_before_this_one(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    metrics = reports / "metrics.json"
    for i, t in enumerate((1_700_000_000, 1_700_000_100, 1_700_000_200)):
        metrics.write_text(json.dumps({"m": {"recall@20": 0.1 * i}}))
        os.utime(metrics, (t, t))
        previous = keep_history(reports, metrics)
    assert previous is not None and json.loads(previous.read_text()) == {"m": {"recall@20": 0.1}}
    assert previous.parent.name == "20231114T221500Z"  # 1_700_000_100 in UTC


def test_an_empty_run_gives_a_page_of_what_is_missing(tmp_path):
    out = build_portal(tmp_path / "reports", PortalInputs())
    html = out.read_text()
    for stage in ("evaluate", "train", "publish", "validate", "materialize", "report"):
        assert f"run the {stage} stage" in html


def test_curves_and_markdown_render_plainly():
    svg = curves_svg([("eval", [(1, 6.9), (2, 6.2), (3, 6.0)]), ("full", [(1, 6.7), (2, 6.05)])])
    assert svg.count("<polyline") == 2 and 'data-label="full"' in svg and "<title>eval epoch 2: 6.2000</title>" in svg
    assert curves_svg([]) == ""
    md = markdown("## A <b>\n\n| a | b |\n|---|---|\n| `x` | 1 |\n\n- one\n  more\n- two")
    assert md == ("<h4>A &lt;b&gt;</h4>\n<table class=\"md\"><thead><tr><th>a</th><th>b</th></tr></thead>"
                  "<tbody><tr><td><code>x</code></td><td>1</td></tr></tbody></table>\n"
                  "<ul><li>one more</li><li>two</li></ul>")


def test_report_open_prints_the_portal_path(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    reports = tmp_path / yaml.safe_load((tmp_path / "params.yaml").read_text())["paths"]["reports"]
    runner = CliRunner()
    missing = runner.invoke(app, ["report", "open", "--params", str(tmp_path / "params.yaml")])
    assert missing.exit_code == 1 and "index.html not found: run `towerflow run`" in missing.output
    build_portal(reports, PortalInputs())
    result = runner.invoke(app, ["report", "open", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0 and result.output.strip() == str(reports / "index.html")


def test_metrics_json_figures_appear_once_each(tmp_path):
    reports = tmp_path / "reports"
    inputs = write_plain_outputs(reports, tmp_path / "artifacts")
    html = build_portal(reports, inputs).read_text()
    for model in ("two_tower", "ease"):
        assert html.count(f"<th>{model}</th>") == 1
    assert sum(f"<td>{k}</td>" in html for k in METRICS["two_tower"]) == 2
    # each figure with its standard error beside it, not as rows of their own
    assert "0.2478 <small>± 0.0093</small>" in html and "0.2051 <small>± 0.0088</small>" in html
    assert "standard_errors" not in html.split("Other figures")[-1].split("</table>")[0]


def test_the_gate_warnings_are_shown_with_its_verdict(tmp_path):
    reports = tmp_path / "reports"
    inputs = write_plain_outputs(reports, tmp_path / "artifacts")
    warning = "most_popular ndcg@20 0.3000 is above the two-tower's 0.2500 on this run's holdout by 0.0500"
    (reports / "gate.json").write_text(json.dumps({"passed": True, "warnings": [warning]}))
    html = build_portal(reports, inputs).read_text()
    gate = html.split('id="gate"')[1].split("</section>")[0]
    assert f'<p class="warn">Warning: {warning}</p>' in gate.replace("&#x27;", "'")


def test_the_validation_verdict_counts_the_quarantined_events(tmp_path):
    from flows.portal.build import _site_summary

    site = tmp_path / "reports" / "validation"
    site.mkdir(parents=True)
    summary = {"success": True, "errors": 0, "warnings": 0, "tables": {"interactions": {}},
               "events": {"read": 5, "added": 3, "duplicates": 0, "unknown": 0, "quarantined": 2}}
    (tmp_path / "reports" / "validation.json").write_text(json.dumps(summary))
    note = _site_summary(site)
    assert "passed" in note and "real-time events: 3 added" in note and "2 quarantined</span>" in note
    assert "events_quarantine.jsonl" in note
    summary["events"]["quarantined"] = 0
    (tmp_path / "reports" / "validation.json").write_text(json.dumps(summary))
    assert "quarantined" not in _site_summary(site)


def test_the_live_model_on_this_holdout_is_shown_beside_this_run(tmp_path):
    """reports/champion.json (evaluate): the figures the gate compares, with the cold counts; a live
    model of another source says so, and one not compared says why."""
    reports = tmp_path / "reports"
    inputs = write_plain_outputs(reports, tmp_path / "artifacts")
    champion = {"compared": True, "live_version": "v7", "challenger": {"ndcg@20": 0.2478},
                "metrics": {"ndcg@20": 0.2511}, "n_users": 943, "n_items": 1682, "cold_users": 2,
                "cold_items": 5, "lineage": {"change": None}, "difference_errors": {"ndcg@20": 0.0041}}
    (reports / "champion.json").write_text(json.dumps(champion))
    html = build_portal(reports, inputs).read_text()
    section = html[html.index('id="champion"'):]
    section = section[:section.index("</section>")]
    assert "Live v7 scored on this run's holdout: 2 of 943 users and 5 of 1,682 items" in section
    assert "<td>ndcg@20</td><td>0.2478</td><td>0.2511</td>" in section and "-0.0033" in section
    assert "-0.0033 (-1.3%)</span> <small>± 0.0082</small>" in section     # the noise beside the change
    change = "new source: this run reads /data/b, live v7 was trained on /data/a"
    (reports / "champion.json").write_text(json.dumps({**champion, "lineage": {"change": change}}))
    assert f"New lineage: {change}" in build_portal(reports, inputs).read_text()
    (reports / "champion.json").write_text(json.dumps({"compared": False, "live_version": None,
                                                        "reason": "no previous published model"}))
    html = build_portal(reports, inputs).read_text()
    assert "Not compared: no previous published model." in html and "<th>live None</th>" not in html
