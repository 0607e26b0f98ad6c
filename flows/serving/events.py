"""Real-time interactions: validated like the data contract, appended durably, pushed online.

    POST /events  or  towerflow events push FILE      {user_id, item_id, timestamp}

1. Validation: ids of the schema's types, items of the live catalog (bundle catalog + added items),
   timestamps ISO 8601 or unix seconds, not before validate.timestamp_floor and not in the future.
   Any bad row refuses the whole request, naming the row and the problem.
2. Durable log: `<serve.events_dir>/events-<UTC day>.jsonl`, one JSON object per line
   (user_id, item_id, timestamp, received_at), written with O_APPEND and fsynced before the
   request is answered. No DVC stage owns this folder: the next run's ingest is meant to read it
   next to the source's interactions (so the model trains on them).
3. Online: each user's new history and seen rows are pushed through the Feast push sources
   (features/online.py), so the next /recommend leaves the item out as seen and the user tower
   reads the new recent_items and counts.
Steps 2 and 3 run under one flock of the events folder: the service and a CLI push never build a
user's row from the same old row (a lost update).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Container, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.errors import ConfigError, DataContractError
from flows.serving.locks import flock_bounded
from flows.serving.recommend import coerce_id

EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS = ("rating", "weight")
LOCK_FILE = ".lock"
LOCK_WAIT_S = 30.0
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


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


def parse_timestamps(values: pd.Series, where: str, floor: datetime, future_s: float,
                     now: pd.Timestamp) -> pd.Series:
    """ISO 8601 text (naive = UTC) or unix seconds -> UTC timestamps, within [floor, now + future_s]."""
    out = []
    for row, value in zip(values.index, values.tolist()):
        try:
            if isinstance(value, bool) or value is None or (isinstance(value, float) and not np.isfinite(value)):
                raise ValueError
            if isinstance(value, str) and NUMBER.match(value.strip()):   # CSV text: unix seconds
                value = float(value)
            if isinstance(value, (int, float, np.integer, np.floating)):
                ts = pd.Timestamp(float(value), unit="s", tz="UTC")
            elif isinstance(value, str):
                # ISO 8601 only, like ingest: '03/04/2024' is March or April depending on the writer.
                ts = pd.to_datetime(value.strip(), format="ISO8601", utc=True)
            else:
                ts = pd.Timestamp(value)
                ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            if ts is pd.NaT:
                raise ValueError
        except (pd.errors.OutOfBoundsDatetime, OverflowError):
            raise DataContractError(f"{where}[{row}]: timestamp {value!r} is out of range (unix seconds, not "
                                    "milliseconds?)") from None
        except (ValueError, TypeError):
            raise DataContractError(f"{where}[{row}]: timestamp {value!r} is neither ISO 8601 text nor unix "
                                    "seconds (e.g. '2024-03-04T10:00:00Z' or 1709546400)") from None
        if ts < pd.Timestamp(floor):
            raise DataContractError(f"{where}[{row}]: timestamp {value!r} is before validate.timestamp_floor "
                                    f"({pd.Timestamp(floor).isoformat()}; milliseconds sent as seconds?)")
        if ts > now + pd.Timedelta(seconds=future_s):
            raise DataContractError(f"{where}[{row}]: timestamp {value!r} is in the future (server time "
                                    f"{now.isoformat()})")
        out.append(ts)
    return pd.Series(out, index=values.index, dtype="datetime64[ns, UTC]")


def validate_events(frame: pd.DataFrame, schema: dict[str, Any], known_items: Container[Any], where: str,
                    floor: datetime, future_s: float) -> pd.DataFrame:
    """user_id, item_id, timestamp (+ rating, weight) typed and checked; the first problem raises
    DataContractError naming `where[row]` and the value. A missing timestamp is the server's time."""
    unknown = [c for c in frame.columns if c not in (*EVENT_COLUMNS, *OPTIONAL_COLUMNS)]
    if unknown:
        raise DataContractError(f"{where}: unknown field '{unknown[0]}'; events have "
                                f"{', '.join(EVENT_COLUMNS)} (+ {', '.join(OPTIONAL_COLUMNS)})")
    for col in ("user_id", "item_id"):
        if col not in frame.columns:
            raise DataContractError(f"{where}: missing required field '{col}'")
    frame = frame.reset_index(drop=True)
    now = pd.Timestamp.now(tz="UTC")
    users = [coerce_id(v, schema["user_id_dtype"], f"{where}[{i}].user_id") for i, v in enumerate(frame["user_id"])]
    items = [coerce_id(v, schema["item_id_dtype"], f"{where}[{i}].item_id") for i, v in enumerate(frame["item_id"])]
    for i, item in enumerate(items):
        if item not in known_items:
            raise DataContractError(f"{where}[{i}]: item_id {item!r} is not in the live catalog "
                                    "(add it first: POST /items or `towerflow index add-items`)")
    stamps = (parse_timestamps(frame["timestamp"].where(frame["timestamp"].notna(), now.timestamp()), where,
                               floor, future_s, now)
              if "timestamp" in frame.columns else pd.Series([now] * len(frame), dtype="datetime64[ns, UTC]"))
    out = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": stamps})
    for col in OPTIONAL_COLUMNS:
        if col in frame.columns:
            values = pd.to_numeric(frame[col], errors="coerce")
            if values.isna().any() or not np.isfinite(values).all():
                bad = int(np.flatnonzero(values.isna() | ~np.isfinite(values.fillna(0)))[0])
                raise DataContractError(f"{where}[{bad}]: {col} {frame[col].iloc[bad]!r} is not a finite number")
            out[col] = values.astype(float)
    return out


class EventLog:
    """Append-only JSON lines, one file per UTC day, fsynced: what the next run trains on."""

    def __init__(self, folder: Path, wait_s: float = LOCK_WAIT_S):
        self.folder = Path(folder)
        self.wait_s = wait_s
        self._held = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across processes (the service and `towerflow events push`), waited
        for at most wait_s (ServiceBusy after). Re-entrant: a caller may hold it across several
        `record_events` calls (the service's chunked pushes)."""
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with flock_bounded(self.folder / LOCK_FILE, self.wait_s, "writing events"):
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
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:   # the file's name must survive a crash too
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    def read(self) -> pd.DataFrame:
        """Every logged event, oldest file first (what an ingest of this folder would read)."""
        files = sorted(self.folder.glob("events-*.jsonl"))
        if not files:
            return pd.DataFrame(columns=[*EVENT_COLUMNS, "received_at"])
        return pd.concat([pd.read_json(f, lines=True, dtype=False, convert_dates=False) for f in files],
                         ignore_index=True)


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
                     history_length: int, floor: datetime, future_s: float) -> tuple[int, int, Path]:
    """`towerflow events push FILE`: (events, users, log file). Validated against the live catalog."""
    from features.store import open_store
    from flows.serving.bundles import BundleStore
    from flows.serving.items import catalog_ids

    bundle = BundleStore(published_dir).live_dir()
    schema = json.loads((bundle / "schema.json").read_text())
    events = validate_events(read_frame(path), schema, catalog_ids(bundle), str(path), floor, future_s)
    log_path = record_events(events, open_store(feast_dir, features_dir), EventLog(events_dir), history_length)
    return len(events), int(events["user_id"].nunique()), log_path
