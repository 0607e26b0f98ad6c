"""Stage gate: between report and publish, decide whether this run may go live.

Rules (params `gate`):
- quality: gate.metric of the two-tower (reports/metrics.json) may fall by at most
  gate.max_quality_drop (absolute) below the live model's on the same holdout (reports/champion.json,
  which the evaluate stage writes), or by more only within twice the standard error of the paired
  difference (a warning: the holdout is too small to tell); a live model of another source, or one
  that cannot be scored on this data, is not compared;
- baselines: a baseline of reports/metrics.json (most popular, EASE) ahead of the two-tower on
  gate.metric beyond noise is a warning; above gate.max_baseline_lead (null by default) it blocks;
- drift: per comparison of reports/drift/summary.json (the newest window vs the rest of the training
  data; this run's training data vs the live model's), the share of drifted columns may be at most
  gate.max_drift_share.<comparison>.
A comparison that could not be made (nothing published yet, a threshold set to null) passes and says
why. A blocked run writes reports/gate.json and stops with one line naming the reasons; the reports
stay. gate.force (with gate.force_reason) lets the run pass and records who forced it and why.
"""
from __future__ import annotations

import getpass
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.errors import ConfigError, GateBlocked, MissingStageInput
from flows.params import GateParams

LABELS = {"window": "newest-window drift", "published": "drift vs the live model's data"}


def _read(path: Path, upstream: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return json.loads(path.read_text())


def quality_check(cfg: GateParams, metrics: dict[str, Any], champion: dict[str, Any],
                  metrics_path: Path) -> dict[str, Any]:
    """gate.metric of this run's evaluation model vs the live model's, both on this run's holdout
    (champion: reports/champion.json). Not compared, and so passed with the reason: nothing live, a
    live model that cannot be scored on this data, or one trained on another source (unless
    gate.compare_across_sources)."""
    current = metrics.get("two_tower", {})
    if cfg.metric not in current:
        raise ConfigError(f"gate.metric '{cfg.metric}' is not a two_tower figure of {metrics_path} "
                          f"(it has: {', '.join(current)})")
    version = champion.get("live_version")
    check: dict[str, Any] = {"name": "quality", "metric": cfg.metric, "current": current[cfg.metric],
                             "max_drop": cfg.max_quality_drop, "live_version": version,
                             "holdout": "this run's"}
    change = (champion.get("lineage") or {}).get("change")
    if change and not cfg.compare_across_sources:
        return {**check, "passed": True, "lineage_change": change,
                "skipped": f"{change}: judged by its own checks (gate.compare_across_sources is false)"}
    if not champion.get("compared"):
        return {**check, "passed": True, "skipped": f"not compared: {champion.get('reason')}"}
    live = champion.get("metrics", {}).get(cfg.metric)
    if live is None:
        return {**check, "passed": True, "skipped": f"not compared: champion.json has no live {cfg.metric}"}
    drop = round(live - current[cfg.metric], 6)
    # twice the standard error of the paired difference (the same users scored by both models): a drop
    # within it is what this holdout's sample of users gives two equal models (0 when not recorded)
    noise = round(2 * (champion.get("difference_errors") or {}).get(cfg.metric, 0.0), 6)
    check.update(live=live, drop=drop, noise=noise, **{k: champion[k] for k in ("n_users", "n_items", "cold_users",
                                                                                "cold_items") if k in champion})
    if cfg.max_quality_drop is None:
        return {**check, "passed": True, "skipped": "gate.max_quality_drop is null"}
    fell = f"{cfg.metric} {current[cfg.metric]:.4f} vs live {version} {live:.4f} on this run's holdout: fell {drop:.3f}"
    check["passed"] = drop <= max(cfg.max_quality_drop, noise)
    if not check["passed"]:
        check["reason"] = f"{fell} > {cfg.max_quality_drop:.3f}" + (f" (noise ±{noise:.3f})" if noise else "")
    elif drop > cfg.max_quality_drop:
        # a small holdout cannot tell this drop from chance: blocking would stop healthy runs at random
        check["warning"] = (f"{fell} > {cfg.max_quality_drop:.3f}, but within this holdout's noise ±{noise:.3f} "
                            f"over {champion.get('n_users', '?')} users: not blocked; a larger holdout "
                            "(evaluate.max_users, split.test_fraction) can tell")
    return check


BASELINES = ("most_popular", "ease")     # metrics.json's baselines, as the evaluate stage writes them


def baseline_check(cfg: GateParams, metrics: dict[str, Any]) -> dict[str, Any]:
    """gate.metric of each baseline of metrics.json (most popular, EASE) against the two-tower's on the
    same holdout. A baseline ahead by more than twice the standard error of the difference (the two
    models' errors over users, metrics.json "standard_errors", taken as independent: a conservative
    bound) is a lead beyond noise: a warning, which blocks only when the lead is above
    gate.max_baseline_lead. A lead says the data may hold little the two-tower can learn that
    popularity or item co-occurrence does not: worth a look before this model serves."""
    errors = metrics.get("standard_errors", {})
    current = metrics["two_tower"][cfg.metric]
    error = errors.get("two_tower", {}).get(cfg.metric, 0.0)
    check: dict[str, Any] = {"name": "baselines", "metric": cfg.metric, "current": current,
                             "max_baseline_lead": cfg.max_baseline_lead, "passed": True, "baselines": {}}
    leads = []
    for name in BASELINES:
        value = metrics.get(name, {}).get(cfg.metric)
        if value is None:        # EASE skipped on a large catalog
            continue
        noise = 2 * math.hypot(error, errors.get(name, {}).get(cfg.metric, 0.0))
        lead = round(value - current, 6)
        check["baselines"][name] = {"value": value, "lead": lead, "noise": round(noise, 6)}
        if lead > noise:
            leads.append((lead, name, value, noise))
    if not leads:
        return check
    lead, name, value, noise = max(leads)
    text = (f"{name} {cfg.metric} {value:.4f} is above the two-tower's {current:.4f} on this run's holdout by "
            f"{lead:.4f} (noise ±{noise:.4f})")
    if cfg.max_baseline_lead is not None and lead > cfg.max_baseline_lead:
        check["passed"] = False
        check["reason"] = f"{text} > gate.max_baseline_lead {cfg.max_baseline_lead:.3f}"
    else:
        check["warning"] = (f"{text}: the data may hold little a two-tower learns beyond "
                            f"{'popularity' if name == 'most_popular' else 'item co-occurrence'}; "
                            "compare them in the portal's metrics before this model serves")
    return check


def drift_check(name: str, summary: dict[str, Any], limit: float | None) -> dict[str, Any]:
    """One drift comparison of reports/drift/summary.json against its threshold: the share of columns
    whose score is beyond their natural range (the report stage's calibrated verdict,
    flows/reports/drift_calibration.py); 0 by default: any such column blocks. A window too short to
    judge was skipped by the report stage and passes here, with its row count."""
    check: dict[str, Any] = {"name": f"drift.{name}", "max_drift_share": limit}
    if "skipped" in summary:
        return {**check, "passed": True, "skipped": summary["skipped"],
                **({"rows": summary["rows"]} if "rows" in summary else {})}
    check.update({k: summary[k] for k in ("drift_share", "n_drifted", "n_columns", "drifted_columns")})
    if limit is None:
        return {**check, "passed": True, "skipped": f"gate.max_drift_share.{name} is null"}
    check["passed"] = summary["drift_share"] <= limit
    if not check["passed"]:
        columns = summary.get("columns", {})
        named = [f"{c} {columns[c]['score']:.2f} > {columns[c]['limit']:.2f}" if c in columns else c
                 for c in summary["drifted_columns"][:5]]
        share = f", share {summary['drift_share']:.2f} > {limit:.2f}" if limit > 0 else ""
        check["reason"] = (f"{LABELS[name]} in {summary['n_drifted']} of {summary['n_columns']} columns beyond "
                           f"their natural range ({', '.join(named)}{', ...' if summary['n_drifted'] > 5 else ''})"
                           + share)
    return check


def catalog_check(summary: dict[str, Any] | None, min_agreement: float | None) -> dict[str, Any]:
    """The items both catalogs hold keep their features (reports/drift/summary.json "catalog"): every
    item feature column agrees with the live bundle's catalog beyond chance at least min_agreement."""
    check: dict[str, Any] = {"name": "catalog", "min_agreement": min_agreement}
    if summary is None:
        return {**check, "passed": True, "skipped": "drift/summary.json has no catalog comparison"}
    if "skipped" in summary:
        return {**check, "passed": True, "skipped": summary["skipped"]}
    columns = summary.get("columns", {})
    check.update(common_items=summary.get("common_items"), columns=columns)
    if min_agreement is None:
        return {**check, "passed": True, "skipped": "gate.min_feature_agreement is null"}
    bad = sorted((v["agreement"], c) for c, v in columns.items() if v["agreement"] < min_agreement)
    check["passed"] = not bad
    if bad:
        named = ", ".join(f"{c} {a:.2f} ({columns[c]['changed_share']:.0%} changed)" for a, c in bad)
        check["reason"] = (f"item features disagree with the live catalog on {summary.get('common_items'):,} "
                           f"common items: {named} < {min_agreement:.2f}")
    return check


def missing_inputs(quality: dict[str, Any], drift: dict[str, Any]) -> list[str]:
    """What the report stage could not give the gate: figures Evidently could not compute on this data
    (quality.json "not_computed") and drift comparisons absent from summary.json. Recorded in
    gate.json; none of them is one the checks need (the quality check reads metrics.json)."""
    missing = [f"quality.json: {name} not computed ({why})" for name, why in quality.get("not_computed", {}).items()]
    return missing + [f"drift/summary.json: no '{name}' comparison" for name in LABELS if name not in drift]


def _who(cfg: GateParams) -> str:
    if cfg.forced_by:
        return cfg.forced_by
    try:
        return getpass.getuser()
    except (OSError, KeyError):      # no login name (a container without a passwd entry)
        return "unknown"


def gate(cfg: GateParams, metrics_path: Path, quality_path: Path, drift_path: Path, out_path: Path,
         portal: Path, champion_path: Path) -> dict[str, Any]:
    """Reads reports/metrics.json and reports/champion.json (evaluate), reports/quality/quality.json and
    reports/drift/summary.json (report); writes out_path (reports/gate.json): {passed, checks, reasons,
    forced, forced_by, force_reason, at, live_version, warnings, message}. Raises GateBlocked (one line: the
    reasons, where to look, how to override) when a check failed and the run is not forced."""
    metrics, champion = _read(metrics_path, "evaluate"), _read(champion_path, "evaluate")
    quality = _read(quality_path, "report")    # its pages are what a reviewer of the decision reads
    drift = _read(drift_path, "report")
    checks = [quality_check(cfg, metrics, champion, metrics_path)]
    checks += [drift_check(name, drift[name], getattr(cfg.max_drift_share, name)) for name in LABELS if name in drift]
    checks.append(catalog_check(drift.get("catalog"), cfg.min_feature_agreement))
    checks.append(baseline_check(cfg, metrics))
    reasons = [c["reason"] for c in checks if not c["passed"]]
    warnings = [c["warning"] for c in checks if "warning" in c]
    for warning in warnings:     # stderr, as the rank stage's: a scheduled run's log shows it
        print(f"gate: warning: {warning}", file=sys.stderr, flush=True)
    decision: dict[str, Any] = {
        "passed": not reasons or cfg.force, "forced": cfg.force,
        "forced_by": _who(cfg) if cfg.force else None, "force_reason": cfg.force_reason if cfg.force else None,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "live_version": champion.get("live_version"), "checks": checks, "reasons": reasons, "warnings": warnings,
    }
    decision["missing_inputs"] = missing_inputs(quality, drift)
    if reasons:
        decision["message"] = ("gate: " + "; ".join(reasons) + f"; see {portal}"
                               + (f"; forced by {decision['forced_by']}: {cfg.force_reason}" if cfg.force else
                                  "; to publish anyway: towerflow run --force --reason TEXT"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(decision, indent=2) + "\n")
    if not decision["passed"]:
        raise GateBlocked(decision["message"])
    return {"passed": True, "forced": cfg.force, "reasons": len(reasons), "warnings": len(warnings),
            "quality": _quality_line(checks[0])}


def _quality_line(check: dict[str, Any]) -> str:
    """The quality check in one line for the stage's summary: what was compared, or why not."""
    if "skipped" in check:
        return check["skipped"]
    return check.get("reason") or (f"{check['metric']} {check['current']:.4f} vs live {check['live_version']} "
                                   f"{check['live']:.4f} on this run's holdout (drop {check['drop']:.3f})")

