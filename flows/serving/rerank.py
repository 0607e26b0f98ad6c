"""Serving with the ranker: re-rank retrieved items, and score given (user_id, item_id) pairs.

Both use the relevance tower of the rank stage's served model alone, never a position: that is the
point of training it beside a bias tower. `rerank` takes the DataFrame `recommend` returns (the top N
of retrieval) and keeps the ranker's top k, so the CLI and an HTTP service compose the two the same
way. torch is imported only when a ranker is loaded.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flows.errors import ConfigError, DataContractError, MissingStageInput
from flows.serving.ids import parse_id
from flows.serving.store import RANKER_DIR, BundleStore

if TYPE_CHECKING:
    from models.ranking.bundle import RankerBundle

PAIR_COLUMNS = ("user_id", "item_id")
RERANK_COLUMNS = ["user_id", "item_id", "rank", "score", "retrieval_rank"]


class NoRanker(MissingStageInput):
    """The version was published without a ranker (no rank stage ran before its publish, or it
    trained none): a request for re-ranked answers cannot be served by it, however often it is
    retried (the service: 422). A ranker whose files are broken stays a 503."""


def ranker_folder(bundle_dir: Path) -> Path:
    """Where a bundle holds its ranker; absent when the version was published without one."""
    return Path(bundle_dir) / RANKER_DIR


def load_bundle_ranker(bundle_dir: Path) -> RankerBundle:
    """The ranker published in a bundle (its ranker/ folder): the one `rerank` serves with that
    version, so a rollback brings back its own ranker."""
    from models.errors import ModelNotFound, NoRankerTrained
    from models.ranking.bundle import load_ranker

    folder = ranker_folder(bundle_dir)
    if not folder.is_dir():
        raise NoRanker(f"version {Path(bundle_dir).name} was published without a ranker: run the rank "
                       "stage first, then publish again (`towerflow run`)")
    try:
        return load_ranker(folder)
    except NoRankerTrained as exc:
        raise NoRanker(f"version {Path(bundle_dir).name} has no ranker: {exc}") from exc
    except ModelNotFound as exc:
        raise MissingStageInput(f"version {Path(bundle_dir).name} has no usable ranker: {exc}") from exc


def load_reranker(ranker_dir: Path) -> RankerBundle:
    """The rank stage's output (paths.ranker), for offline scoring (`towerflow rank score`)."""
    from models.errors import ModelNotFound
    from models.ranking.bundle import load_ranker

    try:
        return load_ranker(ranker_dir)
    except ModelNotFound as exc:
        raise MissingStageInput(f"{exc}; run the rank stage first (towerflow stage rank)") from exc


def rerank(recs: pd.DataFrame, ranker: RankerBundle, k: int) -> pd.DataFrame:
    """recs: user_id, item_id, rank (retrieval order, 1 = best) [, score], users in any order. Returns
    each user's k items the ranker scores highest: user_id, item_id, rank (1..k), score (the ranker's
    relevance score) and retrieval_rank; users keep their order of first appearance, ties keep the
    retrieval order."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if recs.empty:
        return pd.DataFrame(columns=RERANK_COLUMNS)
    out = pd.DataFrame({
        "user_id": recs["user_id"].to_numpy(), "item_id": recs["item_id"].to_numpy(),
        "score": ranker.score(recs["user_id"].to_numpy(), recs["item_id"].to_numpy()),
        "retrieval_rank": recs["rank"].to_numpy(),
        "user_order": pd.factorize(recs["user_id"])[0],
    })
    out = out.sort_values(["user_order", "score", "retrieval_rank"], ascending=[True, False, True],
                          kind="stable")
    if "cold_start" in recs.columns:     # the retrieval side's flag travels with the user
        out["cold_start"] = recs["cold_start"].to_numpy()
    out = out.groupby("user_order", sort=False).head(k)
    out["rank"] = out.groupby("user_order", sort=False).cumcount() + 1
    return out[[*RERANK_COLUMNS, *(["cold_start"] if "cold_start" in out.columns else [])]].reset_index(drop=True)


def read_pairs(path: Path, schema: dict) -> pd.DataFrame:
    """A CSV of user_id,item_id pairs (the header is required; other columns are not allowed), ids
    parsed as schema.json's dtypes. A bad row is an error naming file:line."""
    if not path.is_file():
        raise DataContractError(f"{path}: pairs file not found")
    users: list[int | str] = []
    items: list[int | str] = []
    # utf-8-sig: files saved by spreadsheet tools start with a BOM
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if tuple(header) != PAIR_COLUMNS:
            raise DataContractError(f"{path}:1: the header must be 'user_id,item_id' (got {','.join(header)!r})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise DataContractError(f"{where}: expected 2 fields (user_id,item_id), got {len(row)}")
            users.append(parse_id(row[0].strip(), schema["user_id_dtype"], where, "user_id"))
            items.append(parse_id(row[1].strip(), schema["item_id_dtype"], where, "item_id"))
    if not users:
        raise DataContractError(f"{path}: no pairs after the header")
    dtype = {"int64": np.int64, "string": object}
    return pd.DataFrame({"user_id": np.array(users, dtype=dtype[schema["user_id_dtype"]]),
                         "item_id": np.array(items, dtype=dtype[schema["item_id_dtype"]])})


def score_pairs(pairs: pd.DataFrame, ranker: RankerBundle) -> pd.DataFrame:
    """user_id, item_id, score (the relevance tower's, higher is better), in the input order."""
    return pairs.assign(score=ranker.score(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy()))


def unknown_pairs(pairs: pd.DataFrame, ranker: RankerBundle) -> tuple[int, int]:
    """(pairs whose user, pairs whose item the ranker was not trained on): they score from its OOV
    row, as a cold-start user or item does, so a mistyped id would otherwise pass unseen."""
    return (int((ranker.users.lookup(pairs["user_id"].to_numpy()) == 0).sum()),
            int((ranker.items.lookup(pairs["item_id"].to_numpy()) == 0).sum()))


def rerank_answers(answers: list, ranker: RankerBundle, k: int) -> list:
    """The service's form of `rerank`: answers are (user_id, cold_start, [(item_id, score), ...]) in
    retrieval order; returns the same shape with each user's k items the ranker scores highest."""
    rows = [(user, item, rank) for user, _, hits in answers for rank, (item, _) in enumerate(hits, start=1)]
    if not rows:
        return [(user, cold, []) for user, cold, _ in answers]
    ranked = rerank(pd.DataFrame(rows, columns=["user_id", "item_id", "rank"]), ranker, k)
    by_user: dict = {}
    for user, item, score in zip(ranked["user_id"], ranked["item_id"], ranked["score"]):
        by_user.setdefault(user, []).append((item, float(score)))
    return [(user, cold, by_user.get(user, [])) for user, cold, _ in answers]


class RankerCache:
    """The ranker of the served version for a long-running service: loaded from that version's
    bundle on first use, and again when another version is live. Bundles are immutable, so a
    loaded ranker never changes under a request (the rank stage writes its own output folder)."""

    def __init__(self, published_dir: Path):
        self.store = BundleStore(published_dir)
        self._version: str | None = None
        self._ranker: RankerBundle | None = None

    def published(self, version: str) -> bool:
        """Whether `version` was published with a ranker (what `get` needs), without loading it."""
        return ranker_folder(self.store.version_dir(version)).is_dir()

    def get(self, version: str) -> RankerBundle:
        if self._ranker is None or version != self._version:
            self._ranker, self._version = load_bundle_ranker(self.store.version_dir(version)), version
        return self._ranker
