"""Events appended by the serving API (flows/serving/events.py) read back as contract interactions.

The service logs each accepted event to `<serve.events_dir>/events-<UTC day>.jsonl` (user_id, item_id,
timestamp, received_at, optional rating/weight). Ingest appends them to the source's interactions so
the next run trains on them: same normalization as the source file (flows/sources/normalize.py), ids
cast to the source's id types, exact duplicates dropped (a client that retried a POST, or an event
already present in the source), and events whose user or item the source does not know left out
(their features are not in users/items.parquet; the summary counts them).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flows.sources.normalize import normalize_interactions

EVENT_FILES = "events-*.jsonl"


def event_files(events_dir: Path | None) -> list[Path]:
    """The log files, oldest day first; none when the folder is absent."""
    if events_dir is None or not events_dir.is_dir():
        return []
    return sorted(events_dir.glob(EVENT_FILES))


def events_fingerprint(events_dir: Path | None) -> str:
    """Names, sizes and modification times of the log files (as SourceFiles.fingerprint does for the
    source): changes when the service appends, without reading the events."""
    h = hashlib.sha256()
    for path in event_files(events_dir):
        st = path.stat()
        h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class EventRows:
    interactions: pa.Table     # the source's interactions + the new event rows
    read: int                  # event lines in the log
    added: int                 # rows appended to the interactions
    duplicates: int            # exact duplicates (within the log or of a source row), dropped
    unknown: int               # events of a user or item the source does not have, dropped

    def summary(self) -> dict[str, int]:
        return {"read": self.read, "added": self.added, "duplicates": self.duplicates, "unknown": self.unknown}


def _read_log(files: list[Path]) -> pd.DataFrame:
    frames = [pd.read_json(f, lines=True, dtype=False, convert_dates=False) for f in files if f.stat().st_size]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _as_source_table(events: pd.DataFrame, source: pa.Table, path: Path) -> pa.Table:
    """The events in the source interactions' exact schema (columns, id types, weight default). An id
    that is not an integer where the source's ids are becomes null: an unknown id, dropped later."""
    cols = [c for c in ("user_id", "item_id", "timestamp", "rating", "weight") if c in events.columns]
    events = events.copy()
    for col in ("user_id", "item_id"):
        if source.schema.field(col).type == pa.int64():
            num = pd.to_numeric(events[col], errors="coerce")
            events[col] = num.where(num % 1 == 0).astype("Int64")
    normalized = normalize_interactions(path, pa.Table.from_pandas(events[cols], preserve_index=False))
    out = {}
    for field in source.schema:
        if field.name in normalized.column_names:
            out[field.name] = pc.cast(normalized[field.name], field.type)
        else:     # e.g. the source has ratings and an event has none: null, as a missing source value
            out[field.name] = pa.nulls(normalized.num_rows, field.type)
    return pa.table(out, schema=source.schema)


def append_events(interactions: pa.Table, users: pa.Table, items: pa.Table, events_dir: Path | None) -> EventRows:
    """interactions + the logged events (see the module docstring); unchanged when there are none."""
    files = event_files(events_dir)
    raw = _read_log(files)
    if raw.empty:
        return EventRows(interactions, 0, 0, 0, 0)
    events = _as_source_table(raw, interactions, events_dir or Path("."))
    known = pc.and_(pc.fill_null(pc.is_in(events["user_id"], value_set=users["user_id"].combine_chunks()), False),
                    pc.fill_null(pc.is_in(events["item_id"], value_set=items["item_id"].combine_chunks()), False))
    kept = events.filter(known)
    frame = kept.to_pandas()
    source_keys = interactions.to_pandas()
    fresh = frame.drop_duplicates()
    # an event equal to a source row (every column) is the same interaction seen twice
    merged = fresh.merge(source_keys.drop_duplicates(), how="left", indicator=True)
    fresh = fresh[(merged["_merge"] == "left_only").to_numpy()]
    added = pa.Table.from_pandas(fresh, schema=interactions.schema, preserve_index=False)
    combined = pa.concat_tables([interactions, added])
    return EventRows(combined, read=events.num_rows, added=added.num_rows,
                     duplicates=kept.num_rows - added.num_rows, unknown=events.num_rows - kept.num_rows)
