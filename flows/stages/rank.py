"""rank stage: position-bias rankers learned from the ranking logs, measured against the truth.

Clicks in a ranking log depend on where an item was shown as much as on whether it was relevant.
Each model of `rank.models` (models/ranking/) is fitted on the shown impressions of the training
requests; on held-out requests (a fixed hash of request_id) it is measured by NDCG@10 of its
relevance-only ordering against the simulator's true relevance (or against the clicks when the logs
came from a source, which has no truth), by how well it recovers the examination curve, and by click
log-likelihood; LightGBM lambdarank with its position field is one more row. The relevance tower of
`rank.serve` is saved for serving (`towerflow rank score`, `towerflow recommend --rerank`); with
`rank.serve: auto` the one that does best on validation requests by a debiased metric
(models/ranking/select.py), the choice and its figures recorded in ranking.json.

The log is read once in batches of `rank.read_rows` rows: its shown rows, with the truth joined when
there is one, go to a compact file in a temporary folder. One more read encodes its train, test and
validation splits there as flat columns of model inputs (models/ranking/encoded.py), which every
epoch, measure and choice then streams again: the same batches without re-hashing, re-mapping and
re-sorting the file on each pass (bounded memory: a 50M-row log is never whole in memory). The
simulator's truth (shown rows only) is held in memory for the join.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from flows.errors import MissingStageInput
from models.fork_pool import TORCH_FIT, resolve_workers, run_jobs
from models.device import resolve_device
from models.errors import ModelNotFound
from models.inference import load_bundle
from models.parquet_stream import open_stream
from models.ranking import evaluate as ev
from models.ranking.bundle import Servable, save_ranker
from models.ranking.catalog import RankFeatures, Vectors, build_features
from models.ranking.encoded import EncodedLog, encode_splits
from models.ranking.ensemble import SeedEnsemble
from models.ranking.data import (GRID, REQUIRED, LogSpec, RankBatch, RankingInputError, RankingLog, distinct_users,
                                 inspect_log, shown_mask)
from models.ranking.lambdarank import NAME as LIGHTGBM, LambdaRanker, fit_lambdarank_variants

LIGHTGBM_NAIVE = f"{LIGHTGBM}_naive"      # the same without position correction
from models.ranking.mixture import MixtureEM
from models.ranking.params import RankParams
from models.ranking import select
from models.ranking.seen import Seen, id_report, ndcg_and_split, seen_in
from models.ranking.config import TABLES, RankerConfig
from models.ranking.ranker import Naive, Ranker
from models.ranking.train import FitReport, build_model, feature_tables, fit

K = 10                      # NDCG@10: the depth of a page
RELEVANCE, USER_TYPE = "relevance", "user_type"   # truth columns of the prepared log
SKIPPED = "no ranking logs (data.ranking_logs is none, or the log has no shown rows)"


@dataclass(frozen=True)
class Truth:
    """What the evaluation compares with: the simulator's relevance and examination curves, or clicks."""
    source: Literal["simulation", "clicks"]
    type_names: tuple[str, ...] = ()          # user type code → name
    curves: np.ndarray | None = None          # (T, P) true examination at positions 1..P, per type code


@dataclass
class RankData:
    """The prepared log (shown rows, truth joined) and what the models read from it."""
    path: Path
    spec: LogSpec
    features: RankFeatures
    truth: Truth
    rows: int
    positions: list[int]                      # positions the propensity curves are read at
    seen: Seen                                # users and items of the training requests
    validation: select.ValidationSplit | None = None   # how serve: auto's validation was held out
    # the splits encoded once (models/ranking/encoded.py), for the rank params they were read with
    encoded: dict[str, EncodedLog] = field(default_factory=dict)
    encoded_for: tuple | None = None

    def ids(self, cfg: RankParams) -> bool:
        """Whether the relevance tower learns id embeddings (rank.features_only, auto decided here)."""
        if cfg.features_only != "auto":
            return not cfg.features_only
        has_features = self.features.item_numeric.shape[1] + self.features.item_vectors.shape[1] > 0
        return self.seen.ids_worth_learning(has_features)

    def log(self, cfg: RankParams, split: Literal["train", "test", "valid"]) -> RankingLog | EncodedLog:
        """One split's batches: the encoded copy where these rank params are the ones it was encoded
        with (the same batches, faster), else the prepared file read afresh."""
        if split in self.encoded and self.encoded_for == _read_key(cfg):
            return self.encoded[split]
        return _log(self.path, self.features, self.spec, cfg, split, self.validation)


def _read_key(cfg: RankParams) -> tuple:
    """The rank params that decide a split's batches."""
    return cfg.batch_requests, cfg.read_rows, cfg.max_position, cfg.max_grid, cfg.test_fraction


def _log(path: Path, features: RankFeatures, spec: LogSpec, cfg: RankParams,
         split: Literal["train", "test", "valid"], validation: select.ValidationSplit | None) -> RankingLog:
    """One split of the prepared log. Validation requests are carved out only to choose the served
    model (rank.serve: auto, `validation` says how); a named model trains on every non-test request."""
    return RankingLog(path, features, spec, batch_requests=cfg.batch_requests, read_rows=cfg.read_rows,
                      max_position=cfg.max_position, max_grid=cfg.max_grid, split=split,
                      test_fraction=cfg.test_fraction,
                      valid_fraction=validation.fraction if validation is not None else 0.0,
                      valid_by=validation.by if validation is not None else "request")


# --- the prepared log ------------------------------------------------------------------------------

def _read_truth(truth_dir: Path) -> tuple[Truth, pd.DataFrame | None]:
    """The simulator's truth, when ingest simulated the logs: relevance of every shown row and the
    examination curve of each user type (truth.json)."""
    table, doc = truth_dir / "truth.parquet", truth_dir / "truth.json"
    if not (table.is_file() and doc.is_file()):
        return Truth("clicks"), None
    curves = json.loads(doc.read_text())["propensity"]
    names = tuple(sorted(curves))
    rows = pd.read_parquet(table, columns=["request_id", "item_id", "user_type", "p_relevant"])
    rows[USER_TYPE] = rows[USER_TYPE].map({n: i for i, n in enumerate(names)}).astype("float32")
    rows = rows.set_index(["request_id", "item_id"])
    return Truth("simulation", names, np.array([curves[n] for n in names], dtype=np.float64)), rows


def _with_truth(table: pa.Table, truth: pd.DataFrame | None) -> pa.Table:
    if truth is None:   # no truth: evaluate against the clicks themselves
        return table.append_column(RELEVANCE, pc.cast(table["clicked"], pa.float32()))
    keys = pd.MultiIndex.from_arrays([table["request_id"].to_numpy(zero_copy_only=False),
                                      table["item_id"].to_numpy(zero_copy_only=False)])
    at = truth.index.get_indexer(keys)                                       # -1: no truth for the row
    found = at >= 0
    rel = np.where(found, truth["p_relevant"].to_numpy()[at], np.nan).astype(np.float32)
    typ = np.where(found, truth[USER_TYPE].to_numpy()[at], np.nan).astype(np.float32)
    return table.append_column(RELEVANCE, pa.array(rel)).append_column(USER_TYPE, pa.array(typ))


def prepare_log(logs: Path, truth_dir: Path | None, out: Path, context: list[str],
                read_rows: int) -> tuple[Truth, int, int]:
    """Write the shown rows of `logs` with the truth columns to `out`, `read_rows` rows at a time;
    (truth, shown rows, largest position). Row order is kept: a request's rows stay adjacent."""
    spec = inspect_log(logs, context=context)
    truth, truth_rows = _read_truth(truth_dir) if truth_dir is not None else (Truth("clicks"), None)
    keep = [*REQUIRED, *context, *(GRID if spec.grid else ())]
    rows, top, writer = 0, 0, None
    try:
        for rb in open_stream(logs).iter_batches(batch_size=read_rows, columns=spec.columns):
            table = pa.Table.from_batches([rb])
            table = _with_truth(table.filter(shown_mask(table, spec)).select(keep), truth_rows)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            top = max(top, pc.max(table["position"]).as_py() or 0)
    finally:
        if writer is not None:
            writer.close()
    return truth, rows, top


# --- features --------------------------------------------------------------------------------------

def retrieval_vectors(model_dir: Path, ingested: Path) -> tuple[Vectors, Vectors]:
    """The retrieval towers' user and item embeddings: relevance-tower inputs that know every catalog
    item and every user, also those the logs never showed. Users are encoded from their static
    features (no history: a request's history would be the one at its own time)."""
    try:
        bundle = load_bundle(model_dir)
    except ModelNotFound as exc:
        raise MissingStageInput(f"{exc}; run the train stage first") from exc
    users = pd.read_parquet(ingested / "users.parquet")
    items = pd.read_parquet(ingested / "items.parquet")
    return ((users["user_id"].to_numpy(), bundle.encode_users(users)),
            (items["item_id"].to_numpy(), bundle.encode_items(items)))


def item_table(ingested: Path, schema: dict) -> pd.DataFrame:
    """item_id + the items' numeric feature columns (categorical ones reach the ranker through the
    retrieval embeddings)."""
    numeric = list(schema.get("item_features", {}).get("numeric", []))
    return pd.read_parquet(ingested / "items.parquet", columns=["item_id", *numeric])


def rank_data(cfg: RankParams, logs: Path, truth_dir: Path | None, items: pd.DataFrame | None,
              vectors: tuple[Vectors, Vectors] | None, work: Path) -> RankData | None:
    """Prepare the log in `work` and build the features; None when the log has no shown rows."""
    path = work / "shown.parquet"
    truth, rows, top = prepare_log(logs, truth_dir, path, list(cfg.context_columns), cfg.read_rows)
    if rows == 0:
        return None
    users_v, items_v = vectors if vectors is not None else (None, None)
    features = build_features(path, cfg.context_columns, item_table=items, user_vectors=users_v,
                              item_vectors=items_v, read_rows=cfg.read_rows, scaling=cfg.numeric_scaling)
    columns = (RELEVANCE, USER_TYPE) if truth.source == "simulation" else (RELEVANCE,)
    spec = inspect_log(path, context=cfg.context_columns, truth=columns)
    last = min(top, cfg.max_position, *(() if truth.curves is None else (truth.curves.shape[1],)))
    validation = (select.validation_by(cfg.validation_by, distinct_users(path, cfg.read_rows), cfg.validation_fraction)
                  if cfg.serve == "auto" else None)
    # every later pass (each fit's epochs, each measure, the choice) reads these encoded splits
    splits = ("train", "test") if validation is None else ("train", "test", "valid")
    encoded = encode_splits({s: _log(path, features, spec, cfg, s, validation) for s in splits}, work / "encoded")
    seen = seen_in(encoded["train"], len(features.users), len(features.items))
    return RankData(path, spec, features, truth, rows, list(range(1, max(last, 1) + 1)), seen, validation,
                    encoded, _read_key(cfg))


# --- measurement -----------------------------------------------------------------------------------

def true_curve(batches: Iterable[RankBatch], curves: np.ndarray, positions: list[int]) -> np.ndarray:
    """(P,) the examination curve the held-out impressions really had, on the same footing as
    `evaluate.propensity_curve`: clicks expected with every impression at position p, over those at
    position 1 (each impression weighs by its relevance and examines with its user type's curve)."""
    at = curves[:, np.asarray(positions) - 1]                                 # (T, P)
    total = np.zeros(len(positions))
    for b in batches:
        typ, rel = b.truth[USER_TYPE], b.truth[RELEVANCE]                     # (R, L) each
        ok = b.mask & ~typ.isnan() & ~rel.isnan()                             # (R, L)
        total += (rel[ok].numpy()[:, None] * at[typ[ok].long().numpy()]).sum(axis=0)
    return total / max(total[0], 1e-12)


def _mixture_rows(model: MixtureEM, test: Iterable[RankBatch], data: RankData) -> dict[str, Any]:
    """Each component's curve; with the truth, the component that fits each user type best."""
    curves = data.truth.curves
    if curves is None:
        return {"components": ev.mixture_report(model, test, data.positions)}
    true = {t: curves[t, : len(data.positions)] for t in range(len(curves))}
    report = ev.mixture_report(model, test, data.positions, true_curves=true, type_column=USER_TYPE)
    by_type = {}
    for t, name in enumerate(data.truth.type_names):
        best = max(report, key=lambda c: -math.inf if math.isnan(c["pearson_by_type"][t])
                   else c["pearson_by_type"][t])
        by_type[name] = {"component": best["component"],
                         **ev.propensity_recovery(np.array(best["curve"]), true[t])}
    mean = {m: float(np.mean([v[m] for v in by_type.values()])) for m in ("pearson", "mae")}
    return {"components": report, "propensity_by_type": by_type, "propensity": mean}


def held_out_ndcg(model: Servable, test: Iterable[RankBatch], seen: Seen) -> dict[str, Any]:
    """NDCG@10 of the serving order on the held-out requests, and its seen / unseen split."""
    overall, split = ndcg_and_split(model, test, seen, K, truth=RELEVANCE)
    return {f"ndcg@{K}": overall, "split": split}


def measure(model: Ranker, data: RankData, cfg: RankParams) -> dict[str, Any]:
    """NDCG@10 of the serving order, click log-likelihood and propensity recovery on held-out requests
    (re-read from the prepared file for each measure rather than held in memory)."""
    test = data.log(cfg, "test")
    row: dict[str, Any] = held_out_ndcg(model, test, data.seen) | {"click_loglik": ev.click_loglik(model, test)}
    if isinstance(model, MixtureEM):
        return row | _mixture_rows(model, test, data)
    if isinstance(model, Naive):      # the naive model has no position: its curve is flat
        return row
    curve = ev.propensity_curve(model, test, data.positions)
    row["propensity"] = {"curve": np.round(curve, 4).tolist()}
    if data.truth.curves is not None:
        row["propensity"] |= ev.propensity_recovery(curve, true_curve(test, data.truth.curves,
                                                                      data.positions))
    return row


def _network(kind: str, cfg: RankParams, seed: int, data: RankData) -> Ranker:
    """A fresh network of `kind` (a key of models.ranking.train.MODELS) reading data's feature tables."""
    return build_model(kind, RankerConfig.build(cfg, data.features, data.spec.grid, ids=data.ids(cfg)),
                       data.features, seed)


def fit_model(kind: str, cfg: RankParams, seed: int, data: RankData) -> tuple[Ranker, FitReport]:
    """One model of `kind` fitted with `cfg` on the training requests, from `seed`."""
    model = _network(kind, cfg, seed, data)
    model.relevance.forget(data.seen.users, data.seen.items)
    report = fit(model, data.log(cfg, "train"), cfg.for_model(kind), seed,
                 valid=data.log(cfg, "valid") if cfg.serve == "auto" and cfg.patience else None)
    return model, report


def fit_and_measure(kind: str, cfg: RankParams, seed: int, data: RankData) -> tuple[Ranker, dict[str, Any]]:
    """One model of `kind` fitted with `cfg`, and its row."""
    model, report = fit_model(kind, cfg, seed, data)
    return model, measure(model, data, cfg) | {"fit": report.to_dict()}


def seed_ensemble(kind: str, chosen: Ranker, cfg: RankParams, seed: int, data: RankData,
                  workers: int = 1) -> tuple[SeedEnsemble, dict[str, Any]]:
    """The served network as the mean of rank.serve_ensemble fits of its kind (models/ranking/ensemble.py):
    the chosen fit (seed) and serve_ensemble - 1 more (seed + 1, ..., `workers` of them at once);
    its NDCG on the held-out requests beside the chosen fit's."""
    t0 = time.perf_counter()
    seeds = [seed + i for i in range(cfg.serve_ensemble)]
    jobs = [(f"{kind} seed {s}", partial(_member_job, kind, cfg, s)) for s in seeds[1:]]
    states = run_jobs(jobs, data, workers, cfg.threads, preload=TORCH_FIT)
    members = [_restored(kind, cfg, s, data, state) for s, state in zip(seeds[1:], states)]
    ensemble = SeedEnsemble([chosen] + members)
    return ensemble, {"model": kind, "members": len(seeds), "seeds": seeds,
                      **held_out_ndcg(ensemble, data.log(cfg, "test"), data.seen),
                      "seconds": round(time.perf_counter() - t0, 3)}


# --- the fits as jobs of models/fork_pool.py: each returns its trained weights (the feature tables,
# which every network holds as buffers, stay with the parent) and its row -------------------------------

def _trained_state(model: Ranker) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in TABLES}


def _restored(kind: str, cfg: RankParams, seed: int, data: RankData, state: dict[str, torch.Tensor]) -> Ranker:
    """The network a job fitted, rebuilt here on data's own feature tables."""
    model = _network(kind, cfg, seed, data)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.rsplit(".", 1)[-1] not in TABLES for k in missing):
        raise RuntimeError(f"{kind}: the fitted weights do not fit a fresh network (missing {missing}, "
                           f"unexpected {unexpected})")
    return model.eval()


def _network_job(kind: str, cfg: RankParams, seed: int, data: RankData) -> tuple[dict[str, torch.Tensor], dict]:
    model, row = fit_and_measure(kind, cfg, seed, data)
    return _trained_state(model), row


def _member_job(kind: str, cfg: RankParams, seed: int, data: RankData) -> dict[str, torch.Tensor]:
    return _trained_state(fit_model(kind, cfg, seed, data)[0])


def _lightgbm_job(positions: tuple[bool, ...], cfg: RankParams, seed: int,
                  data: RankData) -> list[tuple[Any, int, dict[str, Any]]] | RankingInputError:
    """Per variant of `positions` the booster (LightGBM pickles it as its model text), its training rows
    and its row, the variants fitted on one binned Dataset (lambdarank_variants); a catalog LightGBM
    cannot read comes back as the error (the other fits go on)."""
    try:
        fitted = lambdarank_variants(cfg, seed, data, positions)
    except RankingInputError as exc:
        return exc
    return [(model.booster, model.train_rows, row) for model, row in fitted]


def lambdarank_fit(cfg: RankParams, seed: int, data: RankData, *, position: bool = True,
                   label: str | None = None) -> tuple[LambdaRanker, dict[str, Any]]:
    """LightGBM lambdarank (models/ranking/lambdarank.py) on the training requests' clicks (label: a
    truth column instead), with its position correction or without, and its row: NDCG@10 of held-out
    requests and its seen / unseen split, as the networks'. It holds at most lightgbm_max_rows
    training rows; the test side is streamed."""
    return lambdarank_variants(cfg, seed, data, (position,), label=label)[0]


def lambdarank_variants(cfg: RankParams, seed: int, data: RankData, positions: tuple[bool, ...],
                        label: str | None = None) -> list[tuple[LambdaRanker, dict[str, Any]]]:
    """lambdarank_fit for each of `positions`, on one training matrix binned once. A row's seconds:
    its share of the matrix's build, its own boosting and its measuring."""
    t0 = time.perf_counter()
    models = fit_lambdarank_variants(data.log(cfg, "train"), feature_tables(data.features), positions,
                                     label=label, rounds=cfg.lightgbm_rounds, max_rows=cfg.lightgbm_max_rows,
                                     seed=seed, threads=cfg.threads)
    share = (time.perf_counter() - t0) / len(models)
    fitted = []
    for model in models:
        t1 = time.perf_counter()
        row = held_out_ndcg(model, data.log(cfg, "test"), data.seen)
        fitted.append((model, {**row, "position_correction": model.position, "train_rows": model.train_rows,
                               "seconds": round(share + time.perf_counter() - t1, 3)}))
    return fitted


def lightgbm_row(cfg: RankParams, seed: int, data: RankData) -> dict[str, Any]:
    """The row of LightGBM lambdarank with its position correction (the rank table's baseline)."""
    return lambdarank_fit(cfg, seed, data)[1]


def clean(value: Any) -> Any:
    """NaN → None everywhere (JSON has no NaN; DVC and browsers reject it)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


# --- the stage -------------------------------------------------------------------------------------

def _inputs(ingested: Path) -> tuple[dict, Path]:
    schema_path, logs = ingested / "schema.json", ingested / "ranking_logs.parquet"
    for path in (schema_path, logs):
        if not path.is_file():
            raise MissingStageInput(f"{path}: not found; run the ingest stage first")
    return json.loads(schema_path.read_text()), logs


def _write(out_dir: Path, report_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    report = clean(report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if report["status"] == "skipped":
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        (out_dir / "ranker.json").write_text(json.dumps({"skipped": report["reason"]}, indent=2) + "\n")
    return report


@dataclass
class Trained:
    """Every fitted candidate, its row, and which one serves (rank.serve, or the validation's choice);
    a served network with rank.serve_ensemble > 1 serves as `ensemble` (serving["ensemble"]: its figures)."""
    models: dict[str, Servable]
    rows: dict[str, Any]
    serving: dict[str, Any]
    ensemble: SeedEnsemble | None = None
    workers: int = 1                          # processes that fitted at once (rank.workers)
    phases: dict[str, float] = field(default_factory=dict)   # seconds: fits, choice, ensemble

    @property
    def served(self) -> str:
        return self.serving["served"]

    @property
    def served_model(self) -> Servable:
        return self.models[self.served] if self.ensemble is None else self.ensemble


def _validation_record(data: RankData, cfg: RankParams) -> dict[str, Any]:
    """How the validation requests were held out, and how many requests and users they hold."""
    if data.validation is None:
        raise ValueError("rank.serve is auto but the data was prepared for a named model: "
                         "call rank_data with the same rank params")
    users: set[int] = set()
    requests = 0
    for b in data.log(cfg, "valid"):
        users.update(b.user.tolist())
        requests += len(b.user)
    return data.validation.to_dict() | {"requests": requests, "users": len(users)}


def fit_workers(cfg: RankParams, jobs: int) -> int:
    """Processes fitting at once (rank.workers): one where the fits train on a GPU (a forked process
    cannot use its parent's CUDA, and one GPU is the bottleneck anyway)."""
    if resolve_device(cfg.device, "rank.device").type != "cpu":
        return 1
    return resolve_workers(cfg.workers, cfg.threads, jobs)


def parent_threads(cfg: RankParams) -> int:
    """The rank stage's own torch threads: rank.threads, or one wherever two jobs would fit in forked
    processes (the candidates and LightGBM, then the served network's extra seeds), which must not
    start after this process ran torch's OpenMP threads."""
    return 1 if fit_workers(cfg, 2) > 1 else cfg.threads


def train_rankers(cfg: RankParams, seed: int, data: RankData) -> Trained:
    """Every model of cfg.models and LightGBM lambdarank with its position correction (cfg.lightgbm)
    and without (cfg.lightgbm_naive): each fitted on the training requests and measured on the held-out ones; with
    rank.serve: auto all of them are candidates, scored on the validation requests (models/ranking/
    select.py). LightGBM reads features only: a catalog without any gets a row saying so."""
    rows: dict[str, Any] = {}
    models: dict[str, Servable] = {}
    boosted = [(name, position) for name, position in ((LIGHTGBM, True), (LIGHTGBM_NAIVE, False))
               if getattr(cfg, name)]
    # LightGBM first: at scale its fits are the longest, and a free worker takes the next job. Its two
    # variants are one job on one binned training matrix (the 700k bench shape: 47 + 41 s as two jobs)
    jobs = [(LIGHTGBM, partial(_lightgbm_job, tuple(position for _, position in boosted), cfg, seed))] if boosted else []
    jobs += [(name, partial(_network_job, name, cfg, seed)) for name in cfg.models]
    workers = fit_workers(cfg, len(jobs))
    t0 = time.perf_counter()
    done = dict(zip([name for name, _ in jobs], run_jobs(jobs, data, workers, cfg.threads, preload=TORCH_FIT)))
    if boosted:
        variants = done.pop(LIGHTGBM)
        done |= {name: variants if isinstance(variants, RankingInputError) else variants[k]
                 for k, (name, _) in enumerate(boosted)}
    phases = {"fits": time.perf_counter() - t0}
    for name in cfg.models:
        state, rows[name] = done[name]
        models[name] = _restored(name, cfg, seed, data, state)
    for name, position in boosted:
        if isinstance(done[name], RankingInputError):
            if cfg.serve == name:
                raise done[name]
            rows[name] = {"skipped": str(done[name])}
            continue
        booster, train_rows, rows[name] = done[name]
        models[name] = LambdaRanker(booster, feature_tables(data.features), position, train_rows)
    t0 = time.perf_counter()
    if cfg.serve == "auto":
        choice = select.choose(models, data.log(cfg, "valid"), data.positions,
                               RELEVANCE if data.truth.source == "simulation" else None, K)
        serving = choice.to_dict() | {"validation_split": _validation_record(data, cfg)}
        if choice.warning:
            print(f"rank: warning: {choice.warning}", file=sys.stderr, flush=True)
    else:
        serving = {"mode": "named", "served": cfg.serve}
    phases["choice"] = time.perf_counter() - t0
    served = models[serving["served"]]
    if cfg.serve_ensemble > 1 and isinstance(served, Ranker):     # LightGBM serves as it is
        ensemble, serving["ensemble"] = seed_ensemble(serving["served"], served, cfg, seed, data, workers)
        phases["ensemble"] = serving["ensemble"]["seconds"]
        return Trained(models, rows, serving, ensemble, workers, phases)
    return Trained(models, rows, serving, workers=workers, phases=phases)


def save_served(trained: Trained, cfg: RankParams, seed: int, data: RankData, out_dir: Path) -> None:
    """The served ranker to out_dir (models/ranking/bundle.py), with how it was chosen."""
    served = trained.served
    shutil.rmtree(out_dir, ignore_errors=True)
    save_ranker(out_dir, served, trained.served_model, data.features, seed,
                extra={"context_columns": list(cfg.context_columns),
                       f"ndcg@{K}": trained.serving.get("ensemble", trained.rows[served])[f"ndcg@{K}"],
                       "numeric_scaling": data.features.numeric_scaling, "ndcg_vs": data.truth.source,
                       "chosen_by": clean(trained.serving)})


def rank(cfg: RankParams, seed: int, ingested: Path, model_dir: Path | None, out_dir: Path,
         report_path: Path) -> dict[str, Any]:
    """Reads ingested/{ranking_logs,items,users}.parquet, schema.json, ingested/simulation/ (the truth,
    when the logs were simulated) and the retrieval model in model_dir (None: no retrieval
    embeddings). Writes out_dir (models.ranking.bundle: the served ranker) and report_path
    (reports/ranking.json: per model NDCG@10, propensity recovery, click log-likelihood, fit speed).
    Logs without shown rows write a "skipped" report and an out_dir that says so."""
    started = time.perf_counter()
    # with fits in forked processes this process stays on one torch thread: a process forked after
    # torch's OpenMP threads ran hangs at its first parallel region on more than one (libgomp is not
    # fork-safe; rank.threads 2 with rank.workers 2 never ended); the fits take rank.threads each
    torch.set_num_threads(parent_threads(cfg))
    schema, logs = _inputs(ingested)
    if pq.ParquetFile(logs).metadata.num_rows == 0:
        return _write(out_dir, report_path, {"status": "skipped", "reason": SKIPPED})
    vectors = retrieval_vectors(model_dir, ingested) if model_dir is not None else None
    truth_dir = ingested / "simulation" if schema.get("ranking_logs") == "simulated" else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rank-", dir=out_dir.parent) as tmp:
        data = rank_data(cfg, logs, truth_dir, item_table(ingested, schema), vectors, Path(tmp))
        if data is None:
            return _write(out_dir, report_path, {"status": "skipped", "reason": SKIPPED})
        phases = {"prepare": time.perf_counter() - started}
        t0 = time.perf_counter()
        test = data.log(cfg, "test")
        requests = sum(len(b.user) for b in test)
        logged = ev.logged_ndcg(test, K, truth=RELEVANCE) if requests else math.nan
        phases["logged_order"] = time.perf_counter() - t0
        trained = train_rankers(cfg, seed, data)
        t0 = time.perf_counter()
        save_served(trained, cfg, seed, data, out_dir)
        phases |= trained.phases | {"save": time.perf_counter() - t0}
        rows, serving = trained.rows, trained.serving
    fits = [r["fit"] for r in rows.values() if "fit" in r]
    examples, fit_s = sum(f["examples"] for f in fits), sum(f["seconds"] for f in fits)
    return _write(out_dir, report_path, {
        "status": "ok", "ndcg_vs": data.truth.source, "served": serving["served"], "serve": serving,
        "models": rows,
        "logged_order": {f"ndcg@{K}": logged},
        "log": {"shown_rows": data.rows, "positions": len(data.positions), "grid": data.spec.grid,
                "context_columns": list(cfg.context_columns), "test_requests": requests},
        "relevance_features": id_report(data.seen, data.ids(cfg), cfg, data.features),
        "examples": examples, "fit_seconds": round(fit_s, 3), "fit_workers": trained.workers,
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "examples_per_s": round(examples / max(fit_s, 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 2),
    })
