"""Ranking logs → padded request batches, read from parquet in bounded memory.

A log row is one impression: request_id, user_id, item_id, position (1 = top), clicked, and which rows
were shown (a bool `shown` column, or the contract's `stage == "shown"`, or else every row with a
position). Optional: per-impression context columns (device, page), a grid layout (`row`, `col`,
nullable: several page layouts may share one log), the logging ranker's `ranker_score`, and
evaluation-only truth columns (true relevance, user type) carried through untouched.

Only shown rows are trained on (an item never shown was never examined). Lists may have any length,
positions beyond 10, and no click. The file is read `read_rows` rows at a time
(pyarrow `iter_batches`), so a 50M-row log never sits in memory at once: rows of one request must be
adjacent in the file (the contract writes them so; order inside a request does not matter), and the
last request of each read batch is held back until its remaining rows arrive.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from models.errors import ModelInputError
from models.parquet_stream import open_stream

if TYPE_CHECKING:
    from models.ranking.catalog import RankFeatures

REQUIRED: tuple[str, ...] = ("request_id", "user_id", "item_id", "position", "clicked")
GRID: tuple[str, str] = ("grid_row", "grid_col")   # the simulator's grid layout columns
LOGGED_SCORE = "ranker_score"
HASH_BUCKETS = 10_000


class RankingInputError(ModelInputError):
    """The ranking log or feature tables lack what the ranking models need (printed as one line)."""


def require_columns(path: Path, columns: Sequence[str], what: str) -> list[str]:
    """The file's column names; raises if any of `columns` is missing."""
    if not Path(path).exists():
        raise RankingInputError(f"{what} not found: {path}")
    names = pq.ParquetFile(path).schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise RankingInputError(f"{what} {path} lacks column(s) {missing}; it has {names}")
    return names


@dataclass(frozen=True)
class LogSpec:
    """Which columns of one log file are read, and how shown rows are told apart."""
    shown_by: Literal["shown", "stage", "position"]
    context: tuple[str, ...] = ()
    truth: tuple[str, ...] = ()          # evaluation only: never a model input
    grid: bool = False
    logged_score: bool = False

    @property
    def columns(self) -> list[str]:
        extra = [] if self.shown_by == "position" else [self.shown_by]
        return [*REQUIRED, *extra, *self.context, *self.truth, *(GRID if self.grid else ()),
                *([LOGGED_SCORE] if self.logged_score else [])]


def inspect_log(path: Path, context: Sequence[str] = (), truth: Sequence[str] = (),
                logged_score: bool = False) -> LogSpec:
    """Check the log's columns and detect its optional parts (shown flag, grid layout)."""
    wanted = [*REQUIRED, *context, *truth, *([LOGGED_SCORE] if logged_score else [])]
    names = require_columns(path, wanted, "ranking log")
    shown_by: Literal["shown", "stage", "position"] = (
        "shown" if "shown" in names else "stage" if "stage" in names else "position")
    return LogSpec(shown_by=shown_by, context=tuple(context), truth=tuple(truth),
                   grid=all(c in names for c in GRID), logged_score=logged_score)


@dataclass
class RankBatch:
    """R requests padded to the longest list L; index 0 means padding, OOV or missing everywhere."""
    user: torch.Tensor                   # (R,) user index
    item: torch.Tensor                   # (R, L) item index
    position: torch.Tensor               # (R, L) 1-based position, clipped to max_position
    context: torch.Tensor                # (R, L, C) context value index
    clicked: torch.Tensor                # (R, L) float 0/1
    mask: torch.Tensor                   # (R, L) bool: a shown impression (not padding)
    row: torch.Tensor | None = None      # (R, L) grid row + 1, 0 when the layout is a list
    col: torch.Tensor | None = None      # (R, L)
    logged_score: torch.Tensor | None = None  # (R, L)
    truth: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (R, L) float

    @property
    def n_examples(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device) -> RankBatch:
        """The same batch on `device` (training on a GPU); itself on the CPU."""
        if device.type == "cpu":
            return self
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return replace(self, user=move(self.user), item=move(self.item), position=move(self.position),
                       context=move(self.context), clicked=move(self.clicked), mask=move(self.mask),
                       row=move(self.row), col=move(self.col), logged_score=move(self.logged_score),
                       truth={k: v.to(device, non_blocking=True) for k, v in self.truth.items()})

    def with_position(self, position: int) -> RankBatch:
        """The same impressions, every one moved to `position` (counterfactual propensity curves)."""
        return replace(self, position=torch.where(self.mask, position, 0))


def shown_mask(table: pa.Table, spec: LogSpec) -> pa.Array:
    """Which rows of a log batch were shown: a `shown` column, else the contract's stage, else a position."""
    if spec.shown_by == "shown":
        return pc.fill_null(table["shown"], False)
    if spec.shown_by == "stage":
        return pc.fill_null(pc.equal(table["stage"], "shown"), False)
    return pc.is_valid(table["position"])


ValidBy = Literal["user", "request"]
USER_HASH_KEY = "towerflow-users!"   # 16 bytes: user buckets independent of the request buckets


def _bucket(ids: np.ndarray, key: str | None = None) -> np.ndarray:
    """(N,) the id's hash bucket, the same for every row of a request (or user) in every run."""
    kw = {} if key is None else {"hash_key": key}
    return pd.util.hash_array(ids.astype(object), **kw) % HASH_BUCKETS       # (N,) uint64


def _held_out(request_ids: np.ndarray, test_fraction: float) -> np.ndarray:
    """(N,) bool: the request is in the test split (a fixed hash of request_id)."""
    return _bucket(request_ids) < round(test_fraction * HASH_BUCKETS)


def validation_users(user_ids: np.ndarray, valid_fraction: float) -> np.ndarray:
    """(N,) bool: the user is one of the validation users (a fixed hash of user_id)."""
    return _bucket(user_ids, USER_HASH_KEY) < round(valid_fraction * HASH_BUCKETS)


def split_of(request_ids: np.ndarray, test_fraction: float, valid_fraction: float = 0.0,
             user_ids: np.ndarray | None = None) -> np.ndarray:
    """(N,) 0 train, 1 test, 2 validation. The test split is a fixed hash of request_id, whatever the
    validation. Validation by request (user_ids None): the request buckets right after the test ones.
    Validation by user: every non-test request of the users whose id hashes into the first
    valid_fraction of the user buckets, so training never sees a validation user (a served ranker meets
    new users and, where items belong to one query, new items; a validation of seen users' requests
    favours memorizing). valid_fraction 0 leaves train and test as they always were."""
    b = _bucket(request_ids)
    test = b < round(test_fraction * HASH_BUCKETS)
    if user_ids is None:
        valid = b < round((test_fraction + valid_fraction) * HASH_BUCKETS)
    else:
        valid = validation_users(user_ids, valid_fraction)
    return np.where(test, 1, np.where(valid, 2, 0))


def distinct_users(path: Path, read_rows: int) -> int:
    """Distinct user_id values of a log file, read `read_rows` rows at a time."""
    seen: set = set()
    for rb in open_stream(path).iter_batches(batch_size=read_rows, columns=["user_id"]):
        seen.update(pc.unique(rb.column(0)).to_pylist())
    seen.discard(None)
    return len(seen)


def _hold_last_request(table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """Split off the rows of the table's last request: its other rows may be in the next read batch."""
    if table.num_rows == 0:
        return table, None
    req = table["request_id"].to_numpy(zero_copy_only=False)
    same = req == req[-1]                                                     # (N,)
    start = len(req) - int(np.argmin(same[::-1])) if not same.all() else 0
    return table.slice(0, start), table.slice(start)


def _checked(table: pa.Table, path: Path) -> pa.Table:
    if table["position"].null_count:
        raise RankingInputError(f"{path}: {table['position'].null_count} shown row(s) have no position")
    if table["clicked"].null_count:
        raise RankingInputError(f"{path}: {table['clicked'].null_count} shown row(s) have a null `clicked`")
    low = pc.min(table["position"]).as_py()
    if low is not None and low < 1:
        raise RankingInputError(f"{path}: positions start at 1 (the top); found {low}")
    return table


def _numpy(table: pa.Table, name: str, fill: float | int | bool) -> np.ndarray:
    return pc.fill_null(table[name], fill).to_numpy(zero_copy_only=False)


class RankingLog:
    """Re-iterable batches of one log file: every pass re-reads it `read_rows` rows at a time.

    split: "train" or "test" keeps only requests on that side of a fixed hash of request_id, so the
    held-out requests are the same for every model, every epoch and every run; "valid" (with
    valid_fraction > 0) the validation requests, carved from training by request or by user
    (`valid_by`, see split_of).
    """

    def __init__(self, path: Path, features: RankFeatures, spec: LogSpec, *, batch_requests: int = 128,
                 read_rows: int = 100_000, max_position: int = 50, max_grid: int = 16,
                 split: Literal["all", "train", "test", "valid"] = "all", test_fraction: float = 0.0,
                 valid_fraction: float = 0.0, valid_by: ValidBy = "request"):
        if split != "all" and not 0 < test_fraction < 1:
            raise ValueError(f"split={split!r} needs 0 < test_fraction < 1 (got {test_fraction})")
        if split == "valid" and not 0 < valid_fraction < 1 - test_fraction:
            raise ValueError(f"split='valid' needs 0 < valid_fraction < 1 - test_fraction (got {valid_fraction})")
        self.valid_fraction, self.valid_by = valid_fraction, valid_by
        self.path, self.features, self.spec = Path(path), features, spec
        self.batch_requests, self.read_rows = batch_requests, read_rows
        self.max_position, self.max_grid = max_position, max_grid
        self.split, self.test_fraction = split, test_fraction

    def __iter__(self) -> Iterator[RankBatch]:
        for table in self._tables(self.spec.columns):
            cols, starts = self.sorted_rows(table)
            for r0, r1 in batch_bounds(len(starts) - 1, self.batch_requests):
                yield request_batch(cols, starts, r0, r1, self.spec)

    def __len__(self) -> int:
        """Batches one pass yields, counted by a read of the key columns alone (the lr schedule's length)."""
        keys = [c for c in self.spec.columns if c in ("request_id", "user_id", "position", "clicked", self.spec.shown_by)]
        return sum(-(-len(pc.unique(t["request_id"])) // self.batch_requests) for t in self._tables(keys))

    def _tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """The file's shown rows of this split, `read_rows` at a time, each request's rows in one table."""
        for table in self.chunks(columns):
            yield self.rows_of(table)

    def chunks(self, columns: list[str]) -> Iterator[pa.Table]:
        """The file's rows (every split), `read_rows` at a time, each request's rows in one table: the
        chunks every split's batches are cut from (models/ranking/encoded.py encodes them all in one read)."""
        carry: pa.Table | None = None
        for rb in open_stream(self.path).iter_batches(batch_size=self.read_rows, columns=columns):
            table = pa.Table.from_batches([rb])
            if carry is not None:
                table = pa.concat_tables([carry, table])
            table, carry = _hold_last_request(table)
            yield table
        if carry is not None:
            yield carry

    def rows_of(self, table: pa.Table) -> pa.Table:
        """A chunk's shown rows of this split."""
        shown = self.shown_rows(table)
        return self.split_rows(shown, self.sides(shown))

    def shown_rows(self, table: pa.Table) -> pa.Table:
        """A chunk's shown rows (every split)."""
        return table.filter(shown_mask(table, self.spec))

    @property
    def split_key(self) -> tuple[float, float, ValidBy] | None:
        """What decides the sides of a row (None: split "all" needs none): logs of one key can share `sides`."""
        return None if self.split == "all" else (self.test_fraction, self.valid_fraction, self.valid_by)

    def sides(self, shown: pa.Table) -> np.ndarray | None:
        """(N,) split_of each of a chunk's shown rows; None for split "all"."""
        if self.split == "all":
            return None
        users = shown["user_id"].to_numpy(zero_copy_only=False) if self.valid_by == "user" else None
        return split_of(shown["request_id"].to_numpy(zero_copy_only=False), self.test_fraction,
                        self.valid_fraction, users)

    def split_rows(self, shown: pa.Table, sides: np.ndarray | None) -> pa.Table:
        """The rows of this split among a chunk's shown rows, given their `sides`."""
        if self.split != "all":
            assert sides is not None, f"split {self.split!r} needs the rows' sides"
            shown = shown.filter(pa.array(sides == ("train", "test", "valid").index(self.split)))
        return _checked(shown, self.path)

    def _columns(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Per-row model inputs as numpy, ids already mapped to vocabulary indices."""
        f = self.features
        cols = {
            "user": f.users.lookup(table["user_id"]),  # null → OOV; arrow ids hashed in arrow
            "item": f.items.lookup(table["item_id"]),
            "position": np.clip(_numpy(table, "position", 0).astype(np.int64), 1, self.max_position),
            "clicked": table["clicked"].to_numpy(zero_copy_only=False).astype(np.float32),
            "context": np.zeros((table.num_rows, 0), np.int64),   # (N, C)
        }
        if self.spec.context:  # a null context value is OOV (index 0), like an unseen one
            cols["context"] = np.stack([f.contexts[c].lookup(table[c])
                                        for c in self.spec.context], axis=-1)
        if self.spec.grid:
            for key, c in zip(("row", "col"), GRID):  # nullable: a list layout has no row/col (index 0)
                cols[key] = np.clip(_numpy(table, c, -1).astype(np.int64), -1, self.max_grid - 1) + 1
        if self.spec.logged_score:
            cols[LOGGED_SCORE] = _numpy(table, LOGGED_SCORE, 0.0).astype(np.float32)
        for c in self.spec.truth:
            if not (pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type)
                    or pa.types.is_boolean(table[c].type)):
                raise RankingInputError(f"truth column {c!r} must be numeric (got {table[c].type}); "
                                        "encode labels such as user types as integers")
            # a null truth value reads as NaN (float arrays convert nulls to NaN)
            cols[f"truth:{c}"] = pc.cast(table[c], pa.float32()).to_numpy(zero_copy_only=False)
        return cols

    def sorted_rows(self, table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A chunk's model inputs by request (in the order of their first row), each request's rows top
        position first, and (R + 1,) the first row of each request (then the row count)."""
        if table.num_rows == 0:
            return {}, np.zeros(1, dtype=np.int64)
        codes = pd.factorize(table["request_id"].to_numpy(zero_copy_only=False))[0]  # (N,)
        cols = self._columns(table)
        order = np.lexsort((cols["position"], codes))          # by request, then top position first
        codes = codes[order]
        new = np.r_[True, codes[1:] != codes[:-1]]             # (N,) first row of a request
        return {k: v[order] for k, v in cols.items()}, np.r_[np.flatnonzero(new), len(codes)]


def batch_bounds(requests: int, batch_requests: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) request ranges of a chunk's batches: batch_requests each, the chunk's last one shorter."""
    for r0 in range(0, requests, batch_requests):
        yield r0, min(r0 + batch_requests, requests)


def request_batch(cols: dict[str, np.ndarray], starts: np.ndarray, r0: int, r1: int, spec: LogSpec) -> RankBatch:
    """The batch of requests [r0, r1) of sorted rows `cols` whose request i starts at row starts[i]."""
    lo = starts[r0]
    lengths = np.diff(starts[r0:r1 + 1])                        # (R,)
    group = np.repeat(np.arange(r1 - r0), lengths)              # (N,) request within the batch
    firsts = starts[r0:r1] - lo                                 # (R,) its first row
    slot = np.arange(starts[r1] - lo) - firsts[group]           # (N,) place in its list
    shape = (r1 - r0, int(lengths.max()))                       # (R, L)
    rows = slice(lo, starts[r1])

    def pad(v: np.ndarray, fill: float = 0) -> torch.Tensor:
        v = v[rows]
        out = np.full(shape + v.shape[1:], fill, dtype=v.dtype)
        out[group, slot] = v
        return torch.from_numpy(out)

    grid = spec.grid
    return RankBatch(
        user=torch.from_numpy(cols["user"][rows][firsts]),     # (R,) a request has one user
        item=pad(cols["item"]),                                 # (R, L)
        position=pad(cols["position"]),                         # (R, L)
        context=pad(cols["context"]),                           # (R, L, C)
        clicked=pad(cols["clicked"]),                           # (R, L)
        mask=torch.from_numpy(np.arange(shape[1]) < lengths[:, None]),   # (R, L)
        row=pad(cols["row"]) if grid else None,                 # (R, L)
        col=pad(cols["col"]) if grid else None,                 # (R, L)
        logged_score=pad(cols[LOGGED_SCORE]) if spec.logged_score else None,
        truth={c: pad(cols[f"truth:{c}"], np.nan) for c in spec.truth},
    )
