"""params.yaml, read once into one typed object that every stage receives.

Unknown keys and wrong types are errors that name the dotted key. `--set a.b=value` overrides use the
same dotted keys as `dvc exp run -S` and YAML value syntax (`--set model.hidden=[256,128]`).
"""
from __future__ import annotations

import copy
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
from validation.params import ValidateParams


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
    index: Path = Path("artifacts/index")
    qdrant: Path = Path("artifacts/qdrant")
    ranker: Path = Path("artifacts/ranker")
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
    contract: applied by `validate_for_source` only when `data.source` is "demo"."""

    rating_range: tuple[float, float] | None = (1.0, 5.0)
    rating_mean: tuple[float, float] | None = (2.5, 4.5)


class DataParams(Section):
    source: str = "demo"
    ranking_logs: Literal["auto", "simulate", "none"] = "auto"
    max_users: PositiveInt | None = None
    user_features: FeatureKinds = FeatureKinds()
    item_features: FeatureKinds = FeatureKinds()
    demo: DemoChecks = DemoChecks()


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

    @model_validator(mode="after")
    def _funnel_narrows(self) -> "SimulatorParams":
        if not self.shown <= self.ranked <= self.candidates:
            raise ValueError(f"need shown <= ranked <= candidates (got {self.shown}, {self.ranked}, "
                             f"{self.candidates})")
        return self


class PublishParams(Section):
    collection_prefix: str = "towerflow_items"
    alias: str = "towerflow_items"
    keep_versions: PositiveInt = 3
    upsert_batch: PositiveInt = 1000
    verify_sample: PositiveInt = 32


class RunParams(Section):
    """How `towerflow run` and scheduled runs execute the stages (read by the flow, not by a stage)."""

    retries: int = Field(2, ge=0)                # per stage, for transient failures only (exit 75)
    retry_delay_s: float = Field(10.0, ge=0)     # first retry after this, then doubled (exponential)
    stage_timeout_s: PositiveInt = 4 * 3600      # a stage running longer fails the run


class ReportParams(Section):
    drift_share_threshold: float = Field(0.5, gt=0, le=1)


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
    demo = {k: v for k, v in data.demo if getattr(validate, k) is None and v is not None}
    return validate.model_copy(update=demo) if demo else validate


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
        train: TrainParams = TrainParams()
        rank: RankParams = RankParams()
        evaluate: EvaluateParams = EvaluateParams()
        publish: PublishParams = PublishParams()
        report: ReportParams = ReportParams()
        run: RunParams = RunParams()


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


def read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
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
