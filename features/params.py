"""Typed config section for the Feast feature repository."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import NonNegativeInt, PositiveInt, field_validator

from models.params import Section

DUCKDB_MEMORY_LIMIT = "3GB"     # features.duckdb_memory_limit's default (see FeaturesParams)
ONLINE_WRITE_ROWS = 100_000     # features.online_write_rows's default (see FeaturesParams)

OfflineKind = Literal["file", "duckdb", "spark"]


class FeaturesParams(Section):
    history_length: PositiveInt = 50
    # Behaviour counts over these windows (days): interactions_<w>d per user (user tower inputs)
    # and item_popularity_<w>d per item, both point-in-time correct Feast features.
    count_windows_days: tuple[PositiveInt, ...] = (1, 7, 30)
    # Where serving reads features: sqlite (<paths.feast>/online.db) or redis ($REDIS_URL,
    # default localhost:6379; the endpoint comes from the environment, never from here).
    online_store: Literal["sqlite", "redis"] = "sqlite"
    # The Feast offline store that runs the point-in-time training join and reads the sources for
    # materialization: file (pandas/Dask), duckdb (ibis + DuckDB, one process, spills to disk),
    # spark (contrib, pyspark; local[*] unless $SPARK_MASTER names a cluster; needs Java), or auto:
    # file up to offline_auto_rows interactions and offline_auto_pairs join rows, duckdb above (README
    # "Outgrowing one machine").
    offline_store: Literal["file", "duckdb", "spark", "auto"] = "auto"
    # 0: auto is DuckDB at every size. Since its joins run in bounded calls under a memory limit,
    # DuckDB is the faster store at every size measured, with the same examples: the tiny test
    # project's materialize 7.7-10.0 s of CPU against 9.3-11.8, the demo (100k) 10.2 s and 823 MB
    # against 22.4 s and 949 MB, 150k generated interactions 15.1 s and 1,078 MB against 48.9 s and
    # 1,019 MB; at 1M it materialized in < 6 min where the file store had not in 12 (issue 23). A
    # count keeps the file store up to that many interactions (200,000 before).
    offline_auto_rows: NonNegativeInt = 0
    # ... and while its join stays small: the file store joins each entity row with every feature row
    # of its user (the sum over users of their rows squared: features/training_set.py `join_pairs`),
    # at most 2M pairs a call, and each call costs ~1.3 s of Dask tokenizing its inputs whatever its
    # size. The gate bench's halfstar shape (56k interactions, one user with 20,871 of them): 457M
    # pairs, 230 calls, 296 s of a 306 s materialize; the demo: 4.8M pairs.
    offline_auto_pairs: PositiveInt = 50_000_000
    # duckdb only: DuckDB's memory limit; beyond it joins spill to <paths.feast>/duckdb-tmp. Its own
    # default (80% of the machine's RAM) got a 1M-interaction join OOM-killed at 19 GB on 24 GB.
    # At 10M interactions each 1M-example join slice lifted the process by about this limit (4GB:
    # the stage peaked at 8,061 MiB in the join; 3GB: one slice's lift 4,121 -> 3,129 MB in 20.1 s
    # against 19.9; 2GB: 2,163 MB in 21.7 s, spilling).
    duckdb_memory_limit: str = DUCKDB_MEMORY_LIMIT
    # Training examples joined and written this many at a time (features/training_set.py
    # write_training_examples): bounds materialize's memory whatever the number of interactions.
    join_rows: PositiveInt = 1_000_000
    # Materialize writes the online rows (each entity's latest, picked by the offline store) this
    # many at a time: Feast converts a batch to protobufs whole (features/store.py).
    online_write_rows: PositiveInt = ONLINE_WRITE_ROWS
    # spark only: memory of the local driver JVM (local mode runs every task inside it).
    spark_driver_memory: str = "4g"

    @field_validator("count_windows_days")
    @classmethod
    def _distinct(cls, windows: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(windows)) != len(windows):
            raise ValueError(f"windows must be distinct, got {list(windows)}")
        return tuple(sorted(windows))

    def offline_for(self, interactions: int, join_pairs: Callable[[], int] = lambda: 0) -> OfflineKind:
        """The offline store a run over `interactions` rows whose training join holds `join_pairs()`
        entity x feature rows uses (auto resolved by both sizes; the pairs, a pass over the
        interactions, are counted only where the row count leaves the file store possible)."""
        if self.offline_store != "auto":
            return self.offline_store
        if interactions > self.offline_auto_rows:
            return "duckdb"
        return "file" if join_pairs() <= self.offline_auto_pairs else "duckdb"
