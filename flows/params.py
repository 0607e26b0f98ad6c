"""params.yaml, read once into one typed object that every stage receives.

Unknown keys and wrong types are errors that name the dotted key. `--set a.b=value` overrides use the
same dotted keys as `dvc exp run -S` and YAML value syntax (`--set model.hidden=[256,128]`).
"""
from __future__ import annotations

import copy
from datetime import datetime
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, model_validator

from features.params import FeaturesParams
from flows.errors import ConfigError
from models.params import (
    Section,
    EvaluateParams,
    ModelParams,
    SampleParams,
    SplitParams,
    TrainParams,
)
from models.ranking.params import RankParams
from validation.params import EventRules, ValidateParams


class BaseParams(Section):
    seed: int = 42


class PathsParams(Section):
    cache: Path = Path(".cache/towerflow")
    ingested: Path = Path("data/ingested")
    features: Path = Path("data/features")
    feast: Path = Path("data/feast")
    training: Path = Path("data/training")
    samples: Path = Path("data/samples")
    model: Path = Path("artifacts/model")
    published: Path = Path("artifacts/published")    # serving bundles: versions/<v>/, LIVE, history.jsonl
    ranker: Path = Path("artifacts/ranker")          # the served ranker (relevance tower of rank.serve)
    reports: Path = Path("reports")

    def resolved(self, root: Path) -> "PathsParams":
        """The same paths made absolute against the project root."""
        return PathsParams(**{k: (v if v.is_absolute() else root / v) for k, v in self})


class FeatureKinds(Section):
    """Which columns of a users/items table are which kind; None means infer from dtypes."""

    categorical: list[str] | None = None
    numeric: list[str] | None = None
    multi: list[str] | None = None


class DemoChecks(Section):
    """Checks that hold for the demo (MovieLens-100K rates 1-5 stars), not for every source in the
    contract: applied by `validate_for_source` only when `data.source` is "demo"; and the demo's rule
    for an event without a rating (`event_rules`)."""

    rating_range: tuple[float, float] | None = (1.0, 5.0)
    rating_mean: tuple[float, float] | None = (2.5, 4.5)
    # a real-time event without a rating (a click, a view) counts as MovieLens-100K's median rating
    event_rating: float | None = 4.0


class DataParams(Section):
    source: str = "demo"
    ranking_logs: Literal["auto", "simulate", "none"] = "auto"
    max_users: PositiveInt | None = None
    user_features: FeatureKinds = FeatureKinds()
    item_features: FeatureKinds = FeatureKinds()
    demo: DemoChecks = DemoChecks()
    # append the serving API's logged events (serve.events_dir/events-*.jsonl) to the interactions
    events: bool = True
    # an event without a rating, for a source whose interactions have ratings: "required" (refused
    # at the door) or the rating it gets; null: the source's rule (the demo: data.demo.event_rating)
    event_rating: float | Literal["required"] | None = None


class TrainSection(TrainParams):
    """The train section: the model library's TrainParams plus how a run updates the live model
    (docs/INCREMENTAL.md). full: train from scratch. finetune: start from the live bundle's model,
    train finetune_epochs on the interactions newer than its training data (or than `since`) plus a
    finetune_replay share of the older ones; without a live bundle, or when its model does not fit
    the new inputs, a full training that says why in train_metrics.json."""
    # where the refit model starts: scratch (`epochs` on every row) | eval (this run's eval model, then
    # refit_epochs on every row) | auto (eval on large streams; flows/stages/train.py refit_from)
    refit_from: Literal["auto", "scratch", "eval"] = "auto"
    refit_epochs: PositiveInt = 2
    update: Literal["full", "finetune"] = "full"
    finetune_epochs: PositiveInt = 2
    finetune_replay: float = Field(0.2, ge=0, le=1)
    # at most this many replayed older rows per new one (null: no cap): a handful of real-time events
    # must not turn into epochs over a fifth of the history, which moves every weight for nothing new
    finetune_replay_per_new: float | None = Field(4.0, ge=0)
    since: datetime | None = None          # finetune: the window starts here instead of at the live cutoff


class SimulatorParams(Section):
    request_fraction: float = Field(0.1, gt=0, le=1)
    candidates: PositiveInt = 200
    ranked: PositiveInt = 50
    shown: PositiveInt = 10
    ranker_noise: float = Field(1.0, ge=0)
    impatient_share: float = Field(0.5, ge=0, le=1)
    chunk_requests: PositiveInt = 5000
    latent_rank: PositiveInt = 16
    # Effects for measuring rankers (issue 16); the defaults keep the original world exactly.
    position_bias: float | None = Field(None, ge=0)       # η: patient users examine ∝ (1/position)^η
    impatient_bias_factor: float = Field(3.0, ge=1)       # impatient users: (1/position)^(η · factor)
    logging_strength: float | None = Field(None, ge=0, le=1)  # ranker knows relevance: 0 random .. 1 perfect
    neighbour_effect: float = Field(0.0, ge=0, le=1)      # γ: examination x (1 - γ · mean neighbour relevance)
    grid_columns: PositiveInt | None = None               # lay the shown items out in a grid this wide
    # The logging ranker's error (issue 22): persistent per item or low-rank per user-item, as a trained
    # ranker repeats its mistakes; this share of its variance is redrawn per request (1: the old world).
    logger_error: Literal["item", "user_item"] = "item"
    logger_error_redraw: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _funnel_narrows(self) -> "SimulatorParams":
        if not self.shown <= self.ranked <= self.candidates:
            raise ValueError(f"need shown <= ranked <= candidates (got {self.shown}, {self.ranked}, "
                             f"{self.candidates})")
        return self


class PublishParams(Section):
    collection_prefix: str = "towerflow_items"     # Qdrant server: collection <prefix>_<version>
    alias: str = "towerflow_items"                 # Qdrant server: the alias moved to the live collection
    keep_versions: PositiveInt = 3
    upsert_batch: PositiveInt = 1000
    verify_sample: PositiveInt = 32
    backend: Literal["auto", "qdrant-local", "qdrant-edge"] = "auto"
    local_max_items: PositiveInt = 20000
    hnsw_m: PositiveInt = 16
    hnsw_ef_construct: PositiveInt = 100
    search_ef: PositiveInt = 128
    max_search_ef: PositiveInt = 2048              # the recall check doubles search_ef up to this before refusing
    quantization: Literal["none", "scalar"] = "none"
    verify_users: PositiveInt = 200
    min_recall: float = Field(0.95, ge=0, le=1)


class RunParams(Section):
    """How `towerflow run` and scheduled runs execute the stages (read by the flow, not by a stage)."""

    retries: int = Field(2, ge=0)                # per stage, for transient failures only (exit 75)
    retry_delay_s: float = Field(10.0, ge=0)     # first retry after this, then doubled (exponential)
    stage_timeout_s: PositiveInt = 4 * 3600      # a stage running longer is stopped (with its processes): the run fails
    lock_wait_s: float = Field(4 * 3600, ge=0)   # a scheduled run waits this long for the run before it to end
    # Where the stage tasks run: this process's threads, or a Dask / Ray cluster (its workers must see
    # the project folder). dask needs `pip install prefect-dask`, ray `pip install prefect-ray`.
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    task_runner_address: str | None = None       # scheduler address (dask: tcp://host:8786); None: a local cluster
    # After a successful run, what the project's DVC cache keeps. DVC keeps every output of every run
    # it ever cached: a nightly run adds its outputs each night (~0.5 GB at 1M interactions, most
    # of it the online store and the training tables) though only committed runs can be checked out
    # again. versioned: what the workspace (this run, and the outputs a failed stage gets back), any
    # git commit, branch or tag, or a `dvc exp` experiment uses; the rest goes (flows/reproduce.py).
    # all: DVC's own default, nothing removed. A cache outside the project (cache.dir) is never collected
    keep_cache: Literal["versioned", "all"] = "versioned"


class DriftParams(Section):
    """How the report stage judges drift (flows/reports/drift_calibration.py). Windows are shares of
    the training rows in time order, not calendar days, so every window holds enough rows whatever
    the data's span or pace; each earlier window compared with its own past gives each column its
    natural drift, and only a column beyond it (and beyond the effect-size floor) counts as drifted."""

    window_share: float = Field(0.1, gt=0, lt=0.5)   # the newest window: this share of the training rows
    min_window_rows: PositiveInt = 500                # windows are at least this big; fewer rows: not judged
    windows: PositiveInt = 5                          # earlier windows of the same size, each vs its own past
    past_windows: PositiveInt = 4                     # a window's past: the rows of the windows just before it
    guard_windows: int = Field(1, ge=0)               # earlier windows next to the newest, left out of the range
    margin: float = Field(0.5, ge=0)                  # drifted: above the natural range's top by more than this share
    floor_numeric: float = Field(0.2, ge=0)           # Wasserstein distance in reference standard deviations
    floor_categorical: float = Field(0.1, ge=0)       # Jensen-Shannon distance (0: same shares .. 0.83: disjoint)


class ReportParams(Section):
    """The report stage: Evidently model quality on the holdout recommendations, and data drift."""

    k: PositiveInt = 20                  # K of the recsys metrics (ndcg@K, novelty@K, ...)
    drift_rows: PositiveInt = 50_000     # rows sampled per side of a drift comparison; also the size of the
                                         # drift sample a published bundle keeps
    drift: DriftParams = DriftParams()
    max_users: PositiveInt = 5_000       # users sampled for the quality report (Serendipity loops over users)
    max_items_for_diversity: PositiveInt = 10_000  # above: Diversity/Serendipity on sampled users (items x items matrix)
    max_users_pairwise: PositiveInt = 1_000       # users Diversity/Serendipity are measured on (a sample above)
    workers: PositiveInt | Literal["auto"] = "auto"  # processes: a sampled quality report's two Evidently reports, drift beside quality


class DriftLimits(Section):
    """Largest share of drifted columns (beyond their natural range) that passes, per drift
    comparison; 0: any drifted column blocks; null: not checked."""

    window: float | None = Field(0.0, ge=0, le=1)      # newest window vs the rest of the training data
    published: float | None = Field(0.0, ge=0, le=1)   # this run's training data vs the live model's


class GateParams(Section):
    """The gate between report and publish. force overrides it for one run (`towerflow run --force
    --reason TEXT` sets force, force_reason and forced_by, so dvc.lock records them)."""

    metric: str = "ndcg@20"                            # a two_tower figure of reports/metrics.json
    max_quality_drop: float | None = Field(0.01, ge=0) # absolute drop of metric vs the live model; null: not checked
    max_drift_share: DriftLimits = DriftLimits()
    compare_across_sources: bool = False               # true: compare with a live model of another source too
    # the items both catalogs hold keep their features: per column, agreement beyond chance with the live
    # bundle's catalog (flows/reports/consistency.py); below it, a column was shuffled or mis-joined
    min_feature_agreement: float | None = Field(0.5, ge=-1, le=1)
    # a baseline of metrics.json scoring above the two-tower on `metric` by more than this (and beyond the
    # noise) blocks; null: a warning only. Not blocking by default: on data with little personal signal
    # (or a small catalog, where EASE is strong) a baseline can lead a healthy two-tower run after run
    max_baseline_lead: float | None = Field(None, ge=0)
    force: bool = False
    force_reason: str | None = None
    forced_by: str | None = None                       # who forced (the CLI sets the login name)

    @model_validator(mode="after")
    def _force_says_why(self) -> "GateParams":
        if self.force and not (self.force_reason or "").strip():
            raise ValueError("gate.force needs gate.force_reason: say why this run may publish past the gate")
        return self


class ServeParams(Section):
    """The HTTP service (`towerflow serve-api`), real-time events and new items."""

    max_k: PositiveInt = 1000                 # largest k a request may ask for
    max_batch: PositiveInt = 1000             # users per POST /recommend
    max_events: PositiveInt = 10000           # events per POST /events (a file has no limit)
    max_items: PositiveInt = 10000            # items per POST /items
    reload_interval_s: float = Field(1.0, gt=0)   # how often the service looks at LIVE
    events_dir: Path = Path("data/events")    # durable log of real-time events (no DVC stage owns it)
    future_tolerance_s: float = Field(300.0, ge=0)  # clock skew allowed for event timestamps
    # Idle keep-alive connections are closed after this long. Above a load balancer's idle timeout
    # (60 s on common ones), so the balancer, not the service, closes: a service that closes first can
    # race a request already on its way, which the caller sees as a reset connection.
    keep_alive_s: float = Field(75.0, gt=0)
    # Names the service answers to (the Host header; port ignored): a web page the operator opens
    # cannot reach a loopback service through a DNS name it controls (DNS rebinding). "*": any.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"], min_length=1)
    max_body_bytes: PositiveInt = 8 * 1024 * 1024   # larger request bodies: 413, before they are read whole
    lock_wait_s: float = Field(5.0, gt=0)     # a write waiting longer for another one: 503 + Retry-After
    # torch threads in each serve-api process (writer and every reader): a request's torch work is a
    # small MLP and one matrix product, and several processes with a thread pool each fight for cores.
    threads: PositiveInt = 1


def resolve_source(data: DataParams, root: Path) -> DataParams:
    """A relative `data.source` directory is relative to the project root, like every other path."""
    if data.source == "demo" or Path(data.source).is_absolute():
        return data
    return data.model_copy(update={"source": str(root / data.source)})


def validate_for_source(data: DataParams, validate: ValidateParams) -> ValidateParams:
    """The validate section for this source: the demo's own checks fill what validate leaves open
    (null); a value set in validate always wins. Other sources get validate as it is."""
    if data.source != "demo":
        return validate
    demo = {k: v for k, v in data.demo if k in ValidateParams.model_fields and getattr(validate, k) is None
            and v is not None}
    return validate.model_copy(update=demo) if demo else validate


def event_rules(data: DataParams, validate: ValidateParams, serve: "ServeParams") -> EventRules:
    """The contract's per-row rules for real-time events, as the door and ingest apply them."""
    fill = data.event_rating
    if fill is None:
        fill = data.demo.event_rating if data.source == "demo" else "required"
    return EventRules(validate_for_source(data, validate), None if fill == "required" else float(fill),
                      serve.future_tolerance_s)


# `validate` (the section's name in params.yaml and dvc.yaml) shadows pydantic's deprecated
# BaseModel.validate classmethod, which towerflow never calls: silence only that warning.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Params(Section):
        base: BaseParams = BaseParams()
        paths: PathsParams = PathsParams()
        data: DataParams = DataParams()
        simulator: SimulatorParams = SimulatorParams()
        validate: ValidateParams = ValidateParams()
        split: SplitParams = SplitParams()
        features: FeaturesParams = FeaturesParams()
        sample: SampleParams = SampleParams()
        model: ModelParams = ModelParams()
        train: TrainSection = TrainSection()
        rank: RankParams = RankParams()
        evaluate: EvaluateParams = EvaluateParams()
        publish: PublishParams = PublishParams()
        report: ReportParams = ReportParams()
        gate: GateParams = GateParams()
        run: RunParams = RunParams()


        serve: ServeParams = ServeParams()


def _describe(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3). Values use YAML syntax, as in `dvc exp run -S`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.sub=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML ({exc.problem})") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the raw params dict with dotted overrides applied (unknown keys are caught later)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {'.'.join(keys)}: '{k}' is not a section")
                node[k] = child
            node = child
        node[keys[-1]] = value
    return out


# libyaml's parser when PyYAML was built with it (its wheels are): the same values as yaml.safe_load,
# 5 ms instead of 58 ms for the default params.yaml, paid by every stage process and CLI command
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=SAFE_LOADER) or {}  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def validate_params(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from err


def load_params(path: Path = Path("params.yaml"), overrides: list[str] | None = None) -> Params:
    """Read params.yaml once, apply --set overrides, validate into Params."""
    raw = apply_overrides(read_raw(path), overrides or [])
    return validate_params(raw, origin=str(path) + (" with --set overrides" if overrides else ""))
