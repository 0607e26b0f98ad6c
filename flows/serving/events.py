"""Real-time interactions: validated like the data contract, appended durably, pushed online.

    POST /events  or  towerflow events push FILE      {user_id, item_id, timestamp}

1. Validation: the data contract's per-row rules for interactions (validation/rows.py, the ones the
   validate stage's suite is built from): ids of the schema's types, timestamps ISO 8601 or unix
   seconds, not before validate.timestamp_floor and not in the future, weight >= 0 (1.0 when absent),
   rating within validate.rating_range (when absent: data.event_rating, the source's rule); items of
   the live catalog (bundle catalog + added items). Any bad row refuses the whole request, naming
   the row and the problem. What is logged is what the next run's validate accepts.
2. Durable log: `<serve.events_dir>/events-<UTC day>.jsonl`, one JSON object per line
   (user_id, item_id, timestamp, weight, [rating], received_at), appended whole (flows/durable.py: short
   writes looped, a failure cut back, a torn tail never extended) and fsynced before the request is
   answered. No DVC stage owns this folder: the next run's ingest is meant to read it
   next to the source's interactions (so the model trains on them).
3. Online: each user's new history and seen rows are pushed through the Feast push sources
   (features/online.py), so the next /recommend leaves the item out as seen and the user tower
   reads the new recent_items and counts.
Steps 2 and 3 run under one flock of the events folder: the service and a CLI push never build a
user's row from the same old row (a lost update).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from flows.durable import append_records
from flows.errors import ConfigError, DataContractError
from flows.sources.events_log import EVENT_COLUMNS, OPTIONAL_COLUMNS, check_events, log_lock, read_log
from flows.sources.normalize import coerce_id
from validation.params import EventRules

LOCK_WAIT_S = 30.0    # a writer waits this long for another before it gives up (503 + Retry-After)


def read_frame(path: Path) -> pd.DataFrame:
    """A CSV, JSON lines or parquet file as it is (ids of CSV files stay text: coerce_id reads them)."""
    path = Path(path)
    if not path.is_file():
        raise DataContractError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            # Text ids: '007' must stay '007' for a string-id schema.
            return pd.read_csv(path, dtype={"user_id": str, "item_id": str}, keep_default_na=False,
                               na_values=[""])
        if suffix in (".jsonl", ".ndjson", ".json"):
            return pd.read_json(path, lines=suffix != ".json", dtype=False, convert_dates=False)
    except (ValueError, OSError) as exc:
        raise DataContractError(f"{path}: could not be read ({str(exc).splitlines()[0]})") from None
    raise DataContractError(f"{path}: unknown file type '{suffix}'; use .csv, .jsonl or .parquet")


def body_rows(body: Any, key: str) -> list[dict[str, Any]]:
    """{key: [{...}, ...]}, a bare list, or one object: the rows of a JSON request body."""
    rows = body.get(key) if isinstance(body, dict) and key in body else body
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataContractError(f"the body must be {{\"{key}\": [{{...}}, ...]}}, a list of objects or one object")
    if not rows:
        raise DataContractError(f"no {key} in the request")
    return rows


def file_rows(path: Path) -> Callable[[int], str]:
    """Names of a file's rows for messages: `file:line` where rows are lines (CSV under its header,
    JSON lines), else `file[i]` (a parquet file's or a JSON array's i-th row, from 0). pandas skips
    blank lines, so the i-th row is the i-th non-blank line (after a CSV's header): the file's line
    numbers are read once, when the first name is asked for (the checks name every row they pass)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        return lambda i: f"{path}[{i}]"
    header = 1 if suffix == ".csv" else 0

    @cache
    def lines() -> list[int]:
        with open(path, "rb") as f:
            return [n for n, line in enumerate(f, 1) if line.strip()][header:]

    return lambda i: f"{path}:{lines()[i]}" if i < len(lines()) else f"{path}[{i}]"


def row_field(row: str, column: str) -> str:
    """`events[0].user_id` in a request body, `events.csv:3 user_id` in a file."""
    return f"{row}.{column}" if row.endswith("]") else f"{row} {column}"


def validate_events(frame: pd.DataFrame, schema: dict[str, Any], known_items: Container[Any], where: str,
                    rules: EventRules, rows: Callable[[int], str] | None = None) -> pd.DataFrame:
    """user_id, item_id, timestamp, weight (+ rating when the source has ratings) typed, the documented
    defaults filled and checked with the contract's row rules (flows/sources/events_log.check_events):
    the first problem raises DataContractError naming the row (`rows(i)`, default `where[i]`; a file's
    rows by their lines, file_rows). A missing timestamp is the server's
    time; one up to rules.future_tolerance_s ahead of it (clock skew) is logged as the server's time,
    so the next run's validate, whose clock is later, accepts every logged row."""
    unknown = [c for c in frame.columns if c not in (*EVENT_COLUMNS, *OPTIONAL_COLUMNS)]
    if unknown:
        raise DataContractError(f"{where}: unknown field '{unknown[0]}'; events have "
                                f"{', '.join(EVENT_COLUMNS)} (+ {', '.join(OPTIONAL_COLUMNS)})")
    frame = frame.reset_index(drop=True)
    row = rows or (lambda i: f"{where}[{i}]")
    for col in ("user_id", "item_id"):      # the ids first: their messages name the field
        if col not in frame.columns:
            raise DataContractError(f"{where}: missing required field '{col}'")
        for i, value in enumerate(frame[col]):
            coerce_id(value, schema[f"{col}_dtype"], row_field(row(i), col))
    now = pd.Timestamp.now(tz="UTC")
    stamps = frame["timestamp"] if "timestamp" in frame.columns else pd.Series([None] * len(frame), dtype=object)
    frame = frame.assign(timestamp=stamps.where(stamps.notna(), now.isoformat()))
    ahead = now + pd.Timedelta(seconds=rules.future_tolerance_s)
    events, problems = check_events(frame, schema, rules, ahead.to_pydatetime())
    for i, problem in problems.items():
        if problem is not None:
            column, what = problem.split(": ", 1)
            given = frame[column].iloc[i] if column in frame.columns else None
            missing = given is None or (isinstance(given, float) and given != given)
            got = " (missing)" if missing else "" if repr(given) in what else f" (got {given!r})"
            hint = ("; the source's interactions have ratings: send one, or set data.event_rating to the "
                    "rating an event without one gets" if column == "rating" and missing else "")
            raise DataContractError(f"{row_field(row(i), column)}: {what}{got}{hint}")
    for i, item in enumerate(events["item_id"]):
        if item not in known_items:
            raise DataContractError(f"{row(i)}: item_id {item!r} is not in the live catalog "
                                    "(add it first: POST /items or `towerflow index add-items`)")
    events["timestamp"] = events["timestamp"].where(events["timestamp"] <= now, now)
    return events


class EventLog:
    """Append-only JSON lines, one file per UTC day, fsynced: what the next run trains on."""

    def __init__(self, folder: Path, wait_s: float = LOCK_WAIT_S):
        self.folder = Path(folder)
        self.wait_s = wait_s
        self._held = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across processes (the service and `towerflow events push`), waited
        for at most wait_s (LockBusy after). Re-entrant: a caller may hold it across several
        `record_events` calls (the service's chunked pushes)."""
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with log_lock(self.folder, self.wait_s):
            self._held = 1
            try:
                yield
            finally:
                self._held = 0

    def append(self, events: pd.DataFrame) -> Path:
        """Write the events durably (call under `locked`); returns the file."""
        received = datetime.now(timezone.utc)
        path = self.folder / f"events-{received:%Y%m%d}.jsonl"
        stamp = received.isoformat(timespec="microseconds").replace("+00:00", "Z")
        lines = []
        for row in events.to_dict("records"):
            row["timestamp"] = row["timestamp"].isoformat().replace("+00:00", "Z")
            lines.append(json.dumps({**row, "received_at": stamp}))
        append_records(path, lines)   # all lines or none, fsynced, never glued to a torn tail
        return path

    def read(self) -> pd.DataFrame:
        """Every logged event, oldest file first (what an ingest of this folder would read); a line
        that is not a JSON object (a torn one) is skipped, as ingest quarantines it."""
        rows = read_log(self.folder).rows
        if not rows:
            return pd.DataFrame(columns=[*EVENT_COLUMNS, "received_at"])
        return pd.DataFrame(rows).drop(columns=["_file", "_byte"])


def record_events(events: pd.DataFrame, store: Any, log: EventLog, history_length: int) -> Path:
    """Log validated events durably, then push each user's new rows to the online store."""
    from features.online import event_rows, push_event_rows

    with log.locked():
        path = log.append(events)
        try:
            history, seen = event_rows(store, events, history_length)
            push_event_rows(store, history, seen)
        except Exception as exc:
            if type(exc).__name__ == "PushSourceNotFoundException":
                raise ConfigError(f"the Feast registry has no push source for user events ({exc}); it was "
                                  "materialized before real-time events existed: run the materialize stage "
                                  f"again (the events are kept in {path})") from None
            raise
    return path


def push_events_file(path: Path, published_dir: Path, feast_dir: Path, features_dir: Path, events_dir: Path,
                     history_length: int, rules: EventRules) -> tuple[int, int, Path]:
    """`towerflow events push FILE`: (events, users, log file). Validated against the live catalog."""
    from features.store import import_feast_without_torch, open_store
    from flows.serving.store import BundleStore, catalog_ids

    import_feast_without_torch()    # pushing rows online needs no torch (Feast would import it)
    bundle = BundleStore(published_dir).live_dir()
    schema = json.loads((bundle / "schema.json").read_text())
    events = validate_events(read_frame(path), schema, catalog_ids(bundle), str(path), rules, file_rows(path))
    log_path = record_events(events, open_store(feast_dir, features_dir, offline=None), EventLog(events_dir), history_length)
    return len(events), int(events["user_id"].nunique()), log_path

