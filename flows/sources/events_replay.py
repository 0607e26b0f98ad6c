"""Replay of the real-time events log into the online store after a materialization.

A full materialization rebuilds the online store from the ingested tables, which hold the events
ingest read (up to its cursor, flows/sources/events_log.py); the service keeps logging and pushing
events after that. `replay_events` pushes the ones the tables do not hold, once.
"""
from __future__ import annotations

from collections.abc import Container
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from flows.sources.events_log import check_events, log_lock, read_log
from validation.params import EventRules


def replay_events(store: Any, events_dir: Path, cursor: dict[str, int], schema: dict[str, Any], rules: EventRules,
                  interactions: pd.DataFrame, known: tuple[Container[Any], Container[Any]], history_length: int,
                  windows: tuple[int, ...]) -> dict[str, int]:
    """After a (full or incremental) materialization: push the logged events the materialized tables do
    not hold (logged after ingest's `cursor`, or consumed but left out as of a user or item the source
    lacks), so real-time state survives the run. Each user's row is rebuilt from its offline row plus
    these events (features/online.replay_rows), under the log's lock: a push the service made in the
    meantime is included once, never twice. Rows that break the contract are skipped (the next
    ingest quarantines them). Returns {"replayed": events, "users": users, "skipped": rows}."""
    from features.online import push_event_rows, replay_rows

    users, items = known
    with log_lock(events_dir):
        read = read_log(events_dir)
        if not read.rows:
            return {"replayed": 0, "users": 0, "skipped": len(read.bad)}
        raw = pd.DataFrame(read.rows)
        typed, problems = check_events(raw, schema, rules, datetime.now(timezone.utc))
        consumed = pd.Series([b < cursor.get(f, 0) for f, b in zip(raw["_file"], raw["_byte"])], index=raw.index)
        held = consumed & typed["user_id"].isin(users) & typed["item_id"].isin(items)
        todo = typed[problems.isna() & ~held]
        if len(todo):
            history, seen = replay_rows(store, todo, interactions, history_length, windows)
            push_event_rows(store, history, seen)
    return {"replayed": len(todo), "users": int(todo["user_id"].nunique()),
            "skipped": int(problems.notna().sum()) + len(read.bad)}
