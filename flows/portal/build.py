"""reports/index.html: one static page per run that links and summarizes everything a reviewer needs.

`build_portal` links whatever exists and lists what is missing (with the stage that makes it), so it
can run at the end of any run, partial ones included. Every link is relative to the page, and the
Data Docs sites are localized first (flows/portal/docs.py), so the reports folder can be zipped and
opened elsewhere with no network. The previous run's metrics come from `PortalInputs.previous_metrics`
or, by default, from reports/history/<UTC time of metrics.json>/metrics.json, a copy kept per run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from flows.portal.docs import SiteResult, localize_site
from flows.portal.render import Curve, curves_svg, delta, esc, fmt, markdown, table

# GX sites: (folder under reports/, title, the stage that builds it)
SITES = [("validation", "Contract tables (ingested data)", "validate"),
         ("training_validation", "Training set", "materialize")]
EVIDENTLY = [("drift", "Drift", "report"), ("quality", "Model quality", "report")]
PUBLISH_FIELDS = ["version", "alias", "collection", "count", "dim", "verified", "verification",
                  "published_at", "model_digest", "previous", "qdrant"]


@dataclass(frozen=True)
class PortalInputs:
    """The run's outputs outside reports/. None: not part of this run (the portal says so)."""

    curves_dir: Path | None = None        # artifacts/model/curves: one epoch,loss CSV per model
    publish_record: Path | None = None    # artifacts/index/manifest.json or a bundle.json
    previous_metrics: Path | None = None  # the previous run's metrics.json; None: reports/history
    assets: Path | None = None            # vendor.ensure_assets(): None leaves Data Docs as GX wrote them
    title: str = "towerflow run"


@dataclass
class _Page:
    out: Path
    root: Path  # the reports folder: what it links must be inside it, so it can be zipped alone
    sections: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)  # (anchor, title)
    missing: list[str] = field(default_factory=list)

    def link(self, target: Path, text: str) -> str:
        """A relative link to a file in the reports folder; a file outside it (artifacts/...) is named,
        not linked, so a zipped copy of the folder has no dangling link (its figures are inline)."""
        if self.root.resolve() not in target.resolve().parents:
            where = PurePosixPath(os.path.relpath(target.resolve(), self.root.resolve().parent)).as_posix()
            return f'<code title="outside the reports folder">{esc(where)}</code>'
        rel = PurePosixPath(os.path.relpath(target, self.out.parent)).as_posix()
        return f'<a href="{esc(rel)}">{esc(text)}</a>'

    def add(self, title: str, body: str, anchor: str) -> None:
        self.sections.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>')
        self.toc.append((anchor, title))


def build_portal(reports_dir: Path, inputs: PortalInputs, out: Path | None = None) -> Path:
    """Write the portal (default reports_dir/index.html) and return its path.

    Side effects, both idempotent: localizes each GX site under reports_dir when inputs.assets is
    given (better done by the stage that builds the site, so its DVC output is final when written),
    and keeps a copy of metrics.json under reports_dir/history/ for the next run's comparison.
    """
    out = out or reports_dir / "index.html"
    page = _Page(out, reports_dir)
    _gate(page, reports_dir / "gate.json")
    _champion(page, reports_dir / "champion.json")
    _publish(page, inputs.publish_record)
    _metrics(page, reports_dir, inputs.previous_metrics)
    _curves(page, inputs.curves_dir)
    _sites(page, reports_dir, inputs.assets)
    _evidently(page, reports_dir)
    _ablation(page, reports_dir / "ablation.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(_document(inputs.title, page), encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees half a page
    return out


def _read_json(path: Path, page: _Page, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        page.missing.append(f"{what}: {esc(path)} could not be read ({esc(type(exc).__name__)}: {esc(exc)})")
        return None


def _kv(record: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or [k for k, v in record.items() if not isinstance(v, (dict, list))]
    rows = [(esc(k), esc(fmt(record[k])) if not isinstance(record[k], (dict, list))
             else f"<code>{esc(json.dumps(record[k]))}</code>") for k in keys if k in record]
    return table(["field", "value"], rows, "kv")


def _gate(page: _Page, path: Path) -> None:
    if not path.is_file():
        return  # the gate is optional: a run without one has nothing to show here
    gate = _read_json(path, page, "gate decision")
    if not isinstance(gate, dict):
        return
    passed = gate.get("passed", gate.get("publish", gate.get("ok")))
    verdict = {True: ("pass", "passed: the model may be published"),
               False: ("fail", "stopped: the model was not published")}.get(passed, ("info", "recorded"))
    reason = gate.get("reason") or gate.get("message") or ""
    body = f'<p class="verdict {verdict[0]}">Gate {verdict[1]}{": " + esc(reason) if reason else ""}</p>'
    warnings = gate.get("warnings") if isinstance(gate.get("warnings"), list) else []
    body += "".join(f'<p class="warn">Warning: {esc(w)}</p>' for w in warnings)
    page.add("Gate decision", body + _kv(gate) + f"<p>{page.link(path, path.name)}</p>", "gate")


def _champion(page: _Page, path: Path) -> None:
    """The live model beside this run, both scored on this run's holdout (what the gate compares)."""
    if not path.is_file():
        return  # a run before the evaluate stage: nothing to show
    champion = _read_json(path, page, "champion")
    if not isinstance(champion, dict):
        return
    version, change = champion.get("live_version"), (champion.get("lineage") or {}).get("change")
    notes = [f"Not compared: {esc(champion.get('reason'))}."] if not champion.get("compared") else [
        f"Live {esc(version)} scored on this run's holdout: {esc(fmt(champion.get('cold_users')))} of "
        f"{esc(fmt(champion.get('n_users')))} users and {esc(fmt(champion.get('cold_items')))} of "
        f"{esc(fmt(champion.get('n_items')))} items are unknown to it (answered cold)."]
    if change:
        notes.append(f"New lineage: {esc(change)}; the gate compares only with gate.compare_across_sources.")
    mine, live = champion.get("challenger") or {}, champion.get("metrics") or {}
    # the holdout's noise on each change: twice the standard error of the per-user difference
    errors = champion.get("difference_errors") if isinstance(champion.get("difference_errors"), dict) else {}
    rows = [(esc(k), esc(fmt(v)), esc(fmt(live.get(k))), delta(v, live.get(k))
             + (f" <small>± {esc(fmt(2 * errors[k]))}</small>" if isinstance(errors.get(k), float) else ""))
            for k, v in mine.items()]
    body = "".join(f"<p>{n}</p>" for n in notes)
    if live:
        body += table(["figure", "this run", f"live {esc(version)}", "change"], rows, "metrics")
        if errors:
            body += ("<p><small>± twice the standard error of the change over these users (both models "
                     "scored on the same ones): a change within it is this holdout's noise.</small></p>")
    page.add("This run vs the live model, on this run's holdout", body + f"<p>{page.link(path, path.name)}</p>",
             "champion")


def _publish(page: _Page, record: Path | None) -> None:
    if record is None or not record.is_file():
        page.missing.append(f"publish record ({esc(record or 'not given')}): run the publish stage")
        return
    data = _read_json(record, page, "publish record")
    if isinstance(data, dict):
        keys = [k for k in PUBLISH_FIELDS if k in data] or None
        page.add("Published index", _kv(data, keys) + f"<p>{page.link(record, record.name)}</p>", "publish")


ERRORS = "standard_errors"   # metrics.json: each model's figures' standard errors (shown beside them)


def _flatten(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves under dotted keys (booleans and text are not figures to compare)."""
    if isinstance(data, dict):
        out: dict[str, float] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return {prefix: data}
    return {}


def keep_history(reports_dir: Path, metrics: Path) -> Path | None:
    """Copy metrics.json to history/<its UTC mtime>/ (once) and return the run before it, if any."""
    history = reports_dir / "history"
    stamp = datetime.fromtimestamp(metrics.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    mine = history / stamp / "metrics.json"
    if not mine.is_file() or mine.read_bytes() != metrics.read_bytes():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(metrics, mine)
    older = sorted(p for p in history.glob("*/metrics.json") if p.parent.name < stamp)
    return older[-1] if older else None


def _metrics(page: _Page, reports_dir: Path, previous: Path | None) -> None:
    path = reports_dir / "metrics.json"
    if not path.is_file():
        page.missing.append(f"metrics ({esc(path)}): run the evaluate stage")
        return
    now = _read_json(path, page, "metrics")
    previous = previous or keep_history(reports_dir, path)
    if previous is not None and previous.is_file():
        before = _read_json(previous, page, "previous metrics")
        note = f"previous run: {page.link(previous, str(PurePosixPath(*previous.parts[-2:])))}"
    else:
        before = {}
        note = "no previous run recorded yet (the next run will show this one beside it)"
    now, before = (dict(x) if isinstance(x, dict) else {} for x in (now, before))
    # the standard errors go beside their figures, not into a table of their own
    errors = now.pop(ERRORS, None)
    errors = errors if isinstance(errors, dict) else {}
    before.pop(ERRORS, None)
    # Flat blocks of numbers (one per model) side by side: a reader compares models and runs at once.
    models = [k for k, v in now.items() if isinstance(v, dict) and v and
              all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())]
    rest = _flatten({k: v for k, v in now.items() if k not in models})
    body = f"<p>This run: {page.link(path, 'metrics.json')}; {note}.</p>"
    if models:
        names = list(dict.fromkeys(m for k in models for m in now[k]))
        rows = [[esc(name)] + [_cell(now[k].get(name), (before.get(k) or {}).get(name),
                                     (errors.get(k) or {}).get(name)) for k in models]
                for name in names]
        body += table(["figure"] + [esc(k) for k in models], rows, "metrics")
        if errors:
            body += ("<p><small>± one standard error of the mean over the held-out users: two models whose "
                     "figures differ by less than about twice their errors combined are within noise.</small></p>")
    if rest:
        old = _flatten({k: v for k, v in before.items() if k not in models})
        body += "<h3>Other figures</h3>" + table(
            ["figure", "this run", "previous", "change"],
            [(esc(k), esc(fmt(v)), esc(fmt(old.get(k))), delta(v, old.get(k))) for k, v in rest.items()], "metrics")
    page.add("Metrics", body, "metrics")


def _cell(now: object, before: object, error: object = None) -> str:
    """This run's figure (± its standard error, when known), the previous run's under it (with the change)."""
    if now is None:
        return ""
    spread = f" <small>± {esc(fmt(error))}</small>" if isinstance(error, float) else ""
    prev = "" if before is None else f'<br><small class="prev">prev {esc(fmt(before))} {delta(now, before)}</small>'
    return f"{esc(fmt(now))}{spread}{prev}"


def read_curve(path: Path) -> list[tuple[float, float]]:
    """(epoch, loss) points of one CSV; rows with a non-finite loss (a diverged epoch) are skipped."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        y = "loss" if "loss" in cols else (cols[1] if len(cols) > 1 else None)
        if "epoch" not in cols or y is None:
            return []
        pts = [(float(r["epoch"]), float(r[y])) for r in reader if r.get(y) not in (None, "")]
    return [(x, v) for x, v in pts if math.isfinite(v)]


def _curves(page: _Page, curves_dir: Path | None) -> None:
    files = sorted(curves_dir.glob("*.csv")) if curves_dir is not None and curves_dir.is_dir() else []
    curves: list[Curve] = [(f.stem, read_curve(f)) for f in files]
    curves = [c for c in curves if c[1]]
    if not curves:
        page.missing.append(f"training curves ({esc(curves_dir or 'not given')}/*.csv): run the train stage")
        return
    links = ", ".join(page.link(f, f.name) for f in files)
    page.add("Training curves", curves_svg(curves) + f"<p>Data: {links}</p>", "curves")


def _site_summary(site_dir: Path) -> str:
    """The validate stage's verdict beside the link (validation.json, or summary.json in the site)."""
    for path in (site_dir.with_suffix(".json"), site_dir / "summary.json"):
        if path.is_file():
            try:
                s = json.loads(path.read_text())
                counts = [(len(s.get("tables", {})), "table"), (s.get("errors", 0), "error"),
                          (s.get("warnings", 0), "warning")]
                return (f'<span class="{"pass" if s.get("success") else "fail"}">'
                        f'{"passed" if s.get("success") else "FAILED"}</span>: '
                        + ", ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in counts)
                        + _events_note(s.get("events")))
            except (OSError, ValueError, AttributeError):
                return ""
    return ""


def _events_note(events: Any) -> str:
    """What ingest did with the serving API's logged events (validation.json "events")."""
    if not isinstance(events, dict):
        return ""
    quarantined = int(events.get("quarantined", 0) or 0)
    note = f"; real-time events: {int(events.get('added', 0) or 0)} added"
    if quarantined:
        note += (f', <span class="fail">{quarantined} quarantined</span> (broke the contract: '
                 f"<code>events_quarantine.jsonl</code> beside the ingested tables, with the reasons)")
    return note


def _sites(page: _Page, reports_dir: Path, assets: Path | None) -> None:
    items = []
    for name, title, stage in SITES:
        index = reports_dir / name / "index.html"
        if not index.is_file():
            page.missing.append(f"{esc(title)} Data Docs ({esc(index)}): run the {stage} stage")
            continue
        note = ""
        if assets is None:
            note = ' <span class="fail">loads its scripts from CDNs (no vendored assets given)</span>'
        else:
            result: SiteResult = localize_site(reports_dir / name, assets)
            for rel, urls in result.external.items():
                page.missing.append(f"{esc(name)}/{esc(rel)} still loads {esc(', '.join(urls))} from the network")
        summary = _site_summary(reports_dir / name)
        items.append(f"<li>{page.link(index, title)}{' — ' + summary if summary else ''}{note}</li>")
    if items:
        page.add("Data validation (Great Expectations Data Docs)", "<ul>" + "".join(items) + "</ul>", "validation")


def _evidently(page: _Page, reports_dir: Path) -> None:
    items, details = [], []
    for folder, title, stage in EVIDENTLY:
        pages = sorted((reports_dir / folder).glob("*.html"))
        if not pages and folder == "drift":
            page.missing.append(f"drift report ({esc(reports_dir / folder)}/*.html): run the {stage} stage")
        shares = _drift_summaries(reports_dir / folder / "summary.json", page, title)
        items += [f"<li>{title}: {page.link(p, p.name)}{_drift_note(shares.get(p.stem) or shares.get(''))}</li>"
                  for p in pages]
        details += [_drift_columns(name, s) for name, s in shares.items() if isinstance(s.get("columns"), dict)]
    quality = reports_dir / "quality" / "quality.json"
    failed = (_read_json(quality, page, "quality figures") or {}).get("not_computed", {}) if quality.is_file() else {}
    items += [f"<li>Model quality: {esc(name)} not computed: {esc(why)}</li>" for name, why in failed.items()]
    if items:
        page.add("Evidently reports", "<ul>" + "".join(items) + "</ul>" + "".join(details), "evidently")


def _drift_columns(name: str, s: dict) -> str:
    """Per column: this run's score beside its natural range (earlier windows of the same data), the
    effect-size floor and the limit they give: why a column was or was not flagged."""
    rows = []
    for col, c in sorted(s["columns"].items(), key=lambda kv: (not kv[1].get("drifted"), kv[0])):
        nat = c.get("natural")
        rows.append((f'<span class="{"fail" if c.get("drifted") else ""}">{esc(col)}</span>', esc(fmt(c.get("score"))),
                     esc(f"{fmt(nat[0])} – {fmt(nat[1])}") if nat else "—", esc(fmt(c.get("floor"))),
                     esc(fmt(c.get("limit"))), esc(c.get("verdict", ""))))
    return (f"<h3>Drift per column: {esc(name or 'drift')}</h3>"
            + table(["column", "score", "natural range", "floor", "limit", "verdict"], rows, "drift"))


def _drift_summaries(path: Path, page: _Page, title: str) -> dict[str, dict]:
    """Drift figures by report name: summary.json holds one comparison ({"drift_share": ...}, key "")
    or several by name ({"window": {...}, "published": {...}}, matching window.html, published.html)."""
    if not path.is_file():
        return {}
    s = _read_json(path, page, f"{title} summary")
    if not isinstance(s, dict):
        return {}
    if "drift_share" in s:
        return {"": s}
    return {k: v for k, v in s.items() if isinstance(v, dict)}


def _drift_note(s: dict | None) -> str:
    if not s:
        return ""
    if s.get("drift_share") is None:
        return f" — {esc(s.get('skipped') or s.get('reason') or 'not compared')}"
    judged = f"{s['n_drifted']} of {s['n_columns']} columns beyond their natural range, " if "n_drifted" in s else ""
    return (f" — {judged}drift share {fmt(s['drift_share'])} (threshold {fmt(s.get('threshold'))}), "
            f"drifted: {esc(', '.join(s.get('drifted_columns', [])) or 'none')}")


def _ablation(page: _Page, path: Path) -> None:
    if path.is_file():  # optional: `towerflow ablate` writes it on request
        page.add("Ablation", markdown(path.read_text()) + f"<p>{page.link(path, path.name)}</p>", "ablation")


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#1f2937;color:#fff;padding:14px 32px}header h1{margin:0;font-size:22px}
nav a{color:#c7d2fe;margin-right:14px;font-size:14px}main{padding:8px 32px 40px;max-width:1200px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:4px 20px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:6px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #e5e7eb;padding:3px 10px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f4f6}small.prev{color:#6b7280}h3{font-size:15px}.up{color:#1d4ed8}.down{color:#b45309}.same{color:#888}
.pass{color:#15803d;font-weight:600}.fail{color:#b91c1c;font-weight:600}.verdict{font-size:17px}
.warn{color:#b45309;font-weight:600}
svg.curves text{font-size:12px;fill:#333}code{background:#f3f4f6;padding:0 3px;border-radius:3px}
.missing li{color:#92400e}
@media (prefers-color-scheme: dark){body{background:#111827;color:#e5e7eb}section{background:#1f2937;
border-color:#374151}th{background:#374151}small.prev{color:#9ca3af}td,th{border-color:#374151}
code{background:#374151}svg.curves text{fill:#e5e7eb}svg.curves .grid{stroke:#374151}
svg.curves .frame{stroke:#6b7280}a{color:#93c5fd}.missing li{color:#fcd34d}.warn{color:#fcd34d}}
"""


def _document(title: str, page: _Page) -> str:
    if page.missing:
        page.add("Not in this run", '<ul class="missing">' + "".join(f"<li>{m}</li>" for m in page.missing)
                 + "</ul>", "missing")
    nav = " ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in page.toc)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f"<body><header><h1>{esc(title)}</h1><nav>{nav}</nav></header>\n<main>\n"
            + "\n".join(page.sections) + "\n</main></body></html>\n")
