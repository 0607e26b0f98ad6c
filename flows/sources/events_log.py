"""The real-time events log (`<serve.events_dir>/events-<UTC day>.jsonl`) read back as contract interactions.

The serving API appends each accepted event (user_id, item_id, timestamp, received_at, weight, rating
when the source has ratings) after checking it with the contract's per-row rules (validation/rows.py,
applied by `check_events` here, both at the door and at ingest). Ingest appends the logged events to
the source's interactions so the next run trains on them:
- a line that is not a JSON object (a torn or corrupted line) and an event that breaks a rule (an older
  log, a rule tightened since) go to `<ingested>/events_quarantine.jsonl` with the reason, are counted,
  and the run goes on; a trailing line without its newline (a write in progress, or cut by a crash) is
  quarantined and left unconsumed (read again next time);
- ids are cast to the source's id types, exact duplicates dropped (a client that retried a POST, or an
  event already in the source), events of a user or item the source does not know left out (their
  features are not in users/items.parquet; counted);
- the cursor (`<ingested>/events_cursor.json`: bytes consumed per log file) says which events the
  ingested tables hold: materialize replays the newer ones into the online store (flows/serving/events.py).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import DataContractError
from flows.locks import file_lock
from flows.sources.normalize import coerce_id, timestamp_value
from validation.params import EventRules
from validation.rows import fill_defaults, id_problem, parameters, row_problems

EVENT_FILES = "events-*.jsonl"
LOCK_FILE = ".lock"
QUARANTINE = "events_quarantine.jsonl"
CURSOR = "events_cursor.json"
EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS = ("rating", "weight")
TORN = "torn trailing line (no newline: a write in progress or cut short); left for the next read"


def event_files(events_dir: Path | None) -> list[Path]:
    """The log files, oldest day first; none when the folder is absent."""
    if events_dir is None or not events_dir.is_dir():
        return []
    return sorted(events_dir.glob(EVENT_FILES))


def events_fingerprint(events_dir: Path | None, sizes: dict[str, int] | None = None) -> str:
    """Names and sizes of the log files (as SourceFiles.fingerprint does for the source): changes when
    the service appends, without reading the events. `sizes`: the sizes a reader saw (LogRead.seen),
    so an append made while ingest ran still counts as new next time."""
    if sizes is None:
        sizes = {path.name: path.stat().st_size for path in event_files(events_dir)}
    h = hashlib.sha256()
    for name, size in sorted(sizes.items()):
        h.update(f"{name}|{size}\n".encode())
    return h.hexdigest()


@contextmanager
def log_lock(events_dir: Path, wait_s: float | None = None) -> Iterator[None]:
    """One writer of the log and the online rows it feeds at a time, across processes (the service,
    `towerflow events push`, materialize's replay): none builds a user's row from a stale one.
    wait_s: None waits (a push holds it for milliseconds); a number gives up with LockBusy after it."""
    events_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(events_dir / LOCK_FILE, wait_s=wait_s,
                   busy=lambda: f"another process has been writing events for {wait_s:g} s; try again later"):
        yield


@dataclass
class LogRead:
    """The log's lines: JSON objects (with their file and byte offset) and lines that are not."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)       # quarantine records
    cursor: dict[str, int] = field(default_factory=dict)         # file name -> bytes consumed
    seen: dict[str, int] = field(default_factory=dict)           # file name -> bytes read (a torn tail too)


def read_log(events_dir: Path | None) -> LogRead:
    """Every line of the log, oldest file first; the cursor stops before a torn trailing line."""
    out = LogRead()
    for path in event_files(events_dir):
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        out.cursor[path.name], out.seen[path.name] = complete, len(data)
        offset = 0
        for raw in data[:complete].split(b"\n")[:-1]:
            _line(out, path.name, offset, raw)
            offset += len(raw) + 1
        if complete < len(data):
            out.bad.append({"file": path.name, "byte": complete, "reason": TORN,
                            "text": data[complete:complete + 200].decode("utf-8", "replace")})
    return out


def _line(out: LogRead, name: str, byte: int, raw: bytes) -> None:
    if not raw.strip():
        return
    try:
        row = json.loads(raw)
    except ValueError:
        row = None
    if isinstance(row, dict):
        out.rows.append({**row, "_file": name, "_byte": byte})
    else:
        out.bad.append({"file": name, "byte": byte, "reason": "not a JSON object (a torn or corrupted line)",
                        "text": raw[:200].decode("utf-8", "replace")})


def _typed(frame: pd.DataFrame, schema: dict[str, Any]) -> tuple[pd.DataFrame, pd.Series]:
    """ids of the schema's types, UTC timestamps, numbers; per row the first value that is none."""
    problems = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    out = pd.DataFrame(index=frame.index)
    for col in ("user_id", "item_id"):
        dtype, values = schema[f"{col}_dtype"], []
        for i, value in zip(frame.index, frame[col] if col in frame else [None] * len(frame)):
            try:
                values.append(coerce_id(value, dtype, col))
            except DataContractError as exc:
                values.append(None)
                if problems[i] is None:
                    problems[i] = f"{col}: {id_problem(dtype)} ({str(exc).split(': ', 1)[-1]})"
        out[col] = pd.Series(values, index=frame.index, dtype=object)
    stamps = []
    for i, value in zip(frame.index, frame["timestamp"] if "timestamp" in frame else [None] * len(frame)):
        try:
            stamps.append(timestamp_value(value))
        except ValueError as exc:
            stamps.append(pd.NaT)
            if problems[i] is None:
                problems[i] = f"timestamp: {exc}"
    out["timestamp"] = pd.Series(stamps, index=frame.index, dtype="datetime64[ns, UTC]")
    for col in OPTIONAL_COLUMNS:
        if col in frame:
            raw = frame[col]
            values = pd.to_numeric(raw, errors="coerce")
            bad = values.isna() & raw.notna()
            for i in frame.index[bad & problems.isna()]:
                problems[i] = f"{col}: {raw[i]!r} is not a number"
            out[col] = values.astype(float)
    return out, problems


def check_events(frame: pd.DataFrame, schema: dict[str, Any], rules: EventRules,
                 now: datetime) -> tuple[pd.DataFrame, pd.Series]:
    """Events (user_id, item_id, timestamp, weight, rating as given) typed, with the documented
    defaults filled (validation/rows.fill_defaults), and per row the first contract rule it breaks
    ("<column>: <problem>") or None. `now` is the newest timestamp accepted."""
    typed, problems = _typed(frame, schema)
    typed = fill_defaults(typed, schema, rules)
    rule = row_problems(typed, schema, rules.validate, parameters(now, rules.validate))
    return typed, problems.where(problems.notna(), rule)


@dataclass(frozen=True)
class EventRows:
    interactions: pa.Table     # the source's interactions + the new event rows
    read: int                  # event lines in the log (complete or not)
    added: int                 # rows appended to the interactions
    duplicates: int            # exact duplicates (within the log or of a source row), dropped
    unknown: int               # events of a user or item the source does not have, dropped
    quarantined: int = 0       # lines and events that break the contract: in QUARANTINE, with the reason
    cursor: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    quarantine: tuple[dict[str, Any], ...] = ()

    def summary(self) -> dict[str, int]:
        return {"read": self.read, "added": self.added, "duplicates": self.duplicates, "unknown": self.unknown,
                "quarantined": self.quarantined}


def _source_schema(source: pa.Table) -> dict[str, Any]:
    kind = lambda t: "int64" if t == pa.int64() else "string"  # noqa: E731
    return {"user_id_dtype": kind(source.schema.field("user_id").type),
            "item_id_dtype": kind(source.schema.field("item_id").type),
            "has_rating": "rating" in source.column_names}


def append_events(interactions: pa.Table, users: pa.Table, items: pa.Table, events_dir: Path | None,
                  rules: EventRules) -> EventRows:
    """interactions + the logged events that meet the contract (see the module docstring)."""
    log = read_log(events_dir)
    if not log.rows and not log.bad:
        return EventRows(interactions, 0, 0, 0, 0, cursor=log.cursor, seen=log.seen)
    schema = _source_schema(interactions)
    raw = pd.DataFrame(log.rows)
    typed, problems = (check_events(raw, schema, rules, datetime.now(timezone.utc)) if len(raw)
                       else (raw, pd.Series([], dtype=object)))
    quarantine = sorted([*log.bad, *({"file": raw.at[i, "_file"], "byte": int(raw.at[i, "_byte"]),
                                      "reason": problems[i],
                                      "event": {k: v for k, v in log.rows[i].items() if not k.startswith("_")}}
                                     for i in problems.index[problems.notna()])],
                        key=lambda r: (r["file"], r["byte"]))     # in log order
    good = typed[problems.isna()].reset_index(drop=True) if len(raw) else typed
    if len(good):   # the log keeps microseconds, as the contract's timestamp[us, UTC]
        good["timestamp"] = good["timestamp"].dt.floor("us")
    events = pa.Table.from_pandas(good[[f.name for f in interactions.schema]], schema=interactions.schema,
                                  preserve_index=False) if len(good) else interactions.schema.empty_table()
    known = pc.and_(
        pc.fill_null(pc.is_in(events["user_id"], value_set=users["user_id"].combine_chunks()), False),
        pc.fill_null(pc.is_in(events["item_id"], value_set=items["item_id"].combine_chunks()), False))
    kept = events.filter(known)
    fresh = kept.to_pandas().drop_duplicates()
    # an event equal to a source row (every column) is the same interaction seen twice
    merged = fresh.merge(interactions.to_pandas().drop_duplicates(), how="left", indicator=True)
    fresh = fresh[(merged["_merge"] == "left_only").to_numpy()]
    added = pa.Table.from_pandas(fresh, schema=interactions.schema, preserve_index=False)
    return EventRows(pa.concat_tables([interactions, added]), read=len(log.rows) + len(log.bad),
                     added=added.num_rows, duplicates=kept.num_rows - added.num_rows,
                     unknown=events.num_rows - kept.num_rows, quarantined=len(quarantine),
                     cursor=log.cursor, seen=log.seen, quarantine=tuple(quarantine))


def write_events_state(events: EventRows, out_dir: Path) -> None:
    """out_dir/events_cursor.json (always: what the tables hold) and out_dir/events_quarantine.jsonl."""
    (out_dir / CURSOR).write_text(json.dumps({"files": events.cursor}, indent=2, sort_keys=True) + "\n")
    if events.quarantine:
        lines = (json.dumps(r, default=str) for r in events.quarantine)
        (out_dir / QUARANTINE).write_text("\n".join(lines) + "\n")


def read_cursor(ingested: Path) -> dict[str, int] | None:
    """The bytes of each log file the ingested tables hold; None when ingest recorded none."""
    try:
        return {str(k): int(v) for k, v in json.loads((ingested / CURSOR).read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
