"""Real-time interactions: POST /events and `towerflow events push FILE` validate, log durably and
push through the Feast push sources into the real SQLite online store, so the next /recommend
excludes the item and reads the new history, without a pipeline run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.fresh import modules_imported
from tests.serving.test_api import Service, known_users, run_publish, service  # noqa: F401 (fixture)


def online(service_or_store, root: Path, users: list) -> pd.DataFrame:
    from features.online import online_user_features

    store = service_or_store.state.served.rec.store if hasattr(service_or_store, "state") else service_or_store
    schema = json.loads((root / "data/ingested/schema.json").read_text())
    return online_user_features(store, schema, users)


def logged(root: Path) -> pd.DataFrame:
    from flows.serving.events import EventLog
    return EventLog(root / "data/events").read()


def test_an_event_is_logged_pushed_and_changes_the_next_recommendation(service: Service) -> None:
    user = known_users(service.root, 1)[0]
    first = service.get("/recommend", user_id=user, k=3).json()
    item = first["items"][0]["item_id"]
    before = online(service, service.root, [user]).iloc[0]
    now = pd.Timestamp.now(tz="UTC").isoformat()

    t0 = time.perf_counter()
    r = service.post("/events", {"events": [{"user_id": user, "item_id": item, "timestamp": now}]})
    assert r.status_code == 200, r.text
    after = service.get("/recommend", user_id=user, k=3).json()
    effect_s = time.perf_counter() - t0
    assert r.json()["accepted"] == 1 and item not in [i["item_id"] for i in after["items"]]
    assert effect_s < 5

    row = online(service, service.root, [user]).iloc[0]
    assert row["recent_items"][0] == item and row["recent_items"][1:] == before["recent_items"][:9]
    assert row["seen_items"][0] == item and set(row["seen_items"]) == set(before["seen_items"]) | {item}
    assert row["interactions_total"] == before["interactions_total"] + 1
    assert row["interactions_1d"] == 1          # the previous interaction is months older
    rec = service.state.served.rec
    tower = lambda r: rec.model.encode_users(pd.DataFrame([r]).drop(columns=["seen_items", "known"]))  # noqa: E731
    assert not np.allclose(tower(before), tower(row))       # the user vector moved

    log = logged(service.root)
    assert log[["user_id", "item_id"]].values.tolist() == [[user, item]]
    assert pd.Timestamp(log["timestamp"].iloc[0]) == pd.Timestamp(now)

    # A user never seen before: the event makes them known (no cold start) and their item seen.
    new = service.post("/events", {"user_id": 555555, "item_id": item})      # one object, server time
    assert new.status_code == 200, new.text
    answer = service.get("/recommend", user_id=555555, k=5).json()
    assert answer["cold_start"] is False and item not in [i["item_id"] for i in answer["items"]]


BAD_EVENTS = [
    ({"user_id": 1, "item_id": 99999}, 422, "events[0]: item_id 99999 is not in the live catalog"),
    ({"user_id": 1, "item_id": "{item}", "timestamp": "yesterday"}, 422,
     "events[0].timestamp: timestamp 'yesterday' is neither ISO 8601 text nor unix seconds"),
    ({"user_id": 1, "item_id": "{item}", "timestamp": "03/04/2024 10:00"}, 422, "is neither ISO 8601"),
    ({"user_id": 1, "item_id": "{item}", "timestamp": 100}, 422,
     "events[0].timestamp: timestamp before validate.timestamp_floor (got 100)"),
    ({"user_id": 1, "item_id": "{item}", "timestamp": "2200-01-01T00:00:00Z"}, 422,
     "events[0].timestamp: timestamp in the future"),
    ({"user_id": 1, "item_id": "{item}", "timestamp": 1717236000000}, 422, "is out of range (unix seconds, not milli"),
    ({"user_id": "abc", "item_id": "{item}"}, 422, "events[0].user_id: 'abc' is not an int64 id"),
    ({"user_id": 1, "item_id": True}, 400, "events[0].item_id: True is not an id"),
    ({"user_id": 1, "item_id": "{item}", "colour": "red"}, 422, "unknown field 'colour'"),
    ({"user_id": 1}, 422, "events[0].item_id: missing"),
    # the contract's row rules (validation/rows.py), as the validate stage applies them
    ({"user_id": 1, "item_id": "{item}", "weight": -1}, 422, "events[0].weight: negative weight (got -1.0)"),
    ({"user_id": 1, "item_id": "{item}", "weight": "heavy"}, 400, "events[0].weight: Input should be a valid number"),
    ({"user_id": 1, "item_id": "{item}", "rating": 99}, 422,
     "events[0].rating: rating outside validate.rating_range [1.0, 5.0] (got 99"),
]


def test_bad_events_are_refused_whole_and_name_the_problem(service: Service) -> None:
    item = int(pd.read_parquet(service.root / "data/training/items.parquet")["item_id"].iloc[0])
    for event, status, message in BAD_EVENTS:
        event = {k: (item if v == "{item}" else v) for k, v in event.items()}
        # the good first event must not be logged when the second one is bad
        r = service.post("/events", {"events": [{"user_id": 1, "item_id": item}, event]})
        message = message.replace("events[0]", "events[1]")
        assert r.status_code == status and message in r.json()["error"], (event, r.status_code, r.text)
    r = service.post("/events", content=b'{"events": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = service.post("/events", {"events": [{"user_id": 1, "item_id": item}] * 4})
    assert r.status_code == 413 and "4 events exceed serve.max_events (3)" in r.json()["error"]
    assert service.post("/events", {"events": []}).status_code == 422
    assert len(logged(service.root)) == 0


def test_cli_events_push_file(project: Path) -> None:
    from features.store import open_store

    run_publish(project)
    user = known_users(project, 1)[0]
    item = int(pd.read_parquet(project / "data/training/items.parquet")["item_id"].iloc[-1])
    params = str(project / "params.yaml")
    events = project / "new.csv"
    events.write_text(f"user_id,item_id,timestamp\n{user},{item},2024-06-01T10:00:00Z\n777,{item},1717236000\n")
    # as a user's shell runs it, in a fresh interpreter: pushing rows imports Feast but not torch
    # (3.8 s instead of 6.9-7.8 s on a 2-core machine), and torch stays importable after
    code = f"""
import sys
from flows.cli import main
sys.argv = ["towerflow", "events", "push", {str(events)!r}, "--params", {params!r}]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
"""
    loaded, stdout = modules_imported(code, ("torch", "feast"), torch_importable_after=True)
    assert "pushed 2 events of 2 users to the online store; logged to" in stdout
    assert loaded == ["feast"]
    store = open_store(project / "data/feast", project / "data/features")
    rows = online(store, project, [user, 777])
    assert [r[0] for r in rows["recent_items"]] == [item, item] and rows["known"].tolist() == [True, True]
    assert len(logged(project)) == 2

    events.write_text(f"user_id,item_id,timestamp\n{user},{item},2024-06-01\n{user},424242,2024-06-01\n")
    result = CliRunner().invoke(app, ["events", "push", str(events), "--params", params])
    assert result.exit_code == 1
    # the file's line: the header is line 1
    assert result.output.strip() == f"towerflow: error: {events}:3: item_id 424242 is not in the live catalog " \
                                    "(add it first: POST /items or `towerflow index add-items`)"
    assert len(logged(project)) == 2


def test_event_rows_follow_the_offline_row_rules(project: Path) -> None:
    """Counts: +1 inside each window, reset to 1 when the previous interaction left it; dated 1 s
    after the event and always after the current row (a late event still wins)."""
    from features.online import event_rows
    from features.store import open_store

    inter = pd.read_parquet(project / "data/ingested/interactions.parquet")
    user = known_users(project, 1)[0]
    last = inter.loc[inter["user_id"] == user, "timestamp"].max()
    item = int(inter["item_id"].iloc[0])
    store = open_store(project / "data/feast", project / "data/features")
    old = online(store, project, [user]).iloc[0]

    soon = pd.DataFrame({"user_id": [user], "item_id": [item], "timestamp": [last + pd.Timedelta(hours=2)]})
    history, seen = event_rows(store, soon, history_length=10)
    row = history.iloc[0]
    assert [row[f"interactions_{w}d"] for w in (1, 7, 30)] == [old[f"interactions_{w}d"] + 1 for w in (1, 7, 30)]
    assert row["event_timestamp"] == last + pd.Timedelta(hours=2, seconds=1)
    assert len(row["recent_items"]) == 10 and row["recent_items"][0] == item

    two = pd.DataFrame({"user_id": [user, user], "item_id": [item, item + 1],
                        "timestamp": [last + pd.Timedelta(days=10), last + pd.Timedelta(days=10, hours=1)]})
    row = event_rows(store, two, history_length=10)[0].iloc[0]
    assert (row["interactions_1d"], row["interactions_7d"]) == (2, 2)       # the old ones left both windows
    assert row["interactions_30d"] == old["interactions_30d"] + 2
    assert row["interactions_total"] == old["interactions_total"] + 2 and row["recent_items"][:2] == [item + 1, item]
    assert seen.iloc[0]["seen_items"][0] == item     # from the first call: distinct, newest first

    late = pd.DataFrame({"user_id": [user], "item_id": [item], "timestamp": [last - pd.Timedelta(days=3)]})
    row = event_rows(store, late, history_length=10)[0].iloc[0]
    assert row["event_timestamp"] > last                 # after the row it extends, or Feast keeps the old


def test_a_finished_materialization_gives_the_service_a_fresh_online_store(project: Path) -> None:
    """A full materialization replaces online.db; the open SQLite handle would keep reading the
    deleted file, so the state reopens the store once materialized.json says the run finished."""
    import os
    import sqlite3

    from flows.serving.state import LiveState

    run_publish(project)
    state = LiveState(project / "artifacts/published", project / "data/feast", project / "data/features")
    state.start(watch=False)
    try:
        user = known_users(project, 1)[0]
        assert state.check() is None
        old_store = state.served.rec.store
        # As a rebuild does: a new file under the same name (here a copy of the old one).
        feast = project / "data/feast"
        with sqlite3.connect(feast / "online.db") as src, sqlite3.connect(feast / "rebuilt.db") as dst:
            src.backup(dst)
        os.replace(feast / "rebuilt.db", feast / "online.db")
        assert state.check() is None                    # not finished yet: keep the old handle
        marker = feast / "materialized.json"
        marker.write_text(marker.read_text())
        os.utime(marker, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert state.check() == "online store reopened" and state.served.rec.store is not old_store
        assert state.served.rec.answer([user], 3)[0][1] is False      # still a known user
    finally:
        state.stop()


def test_events_logged_after_ingest_survive_rematerialization_exactly_once(project: Path) -> None:
    """A full rematerialization rebuilds the online store from the ingested tables: the events the
    service logged after ingest (past its cursor) are replayed once, also when materialize runs again."""
    from features.params import FeaturesParams
    from features.store import open_store
    from flows.params import DataParams, ServeParams, event_rules
    from flows.serving.events import EventLog, record_events
    from flows.sources.events_log import CURSOR
    from flows.stages.materialize import materialize
    from models.params import SplitParams
    from validation.params import ValidateParams

    (project / "data/ingested" / CURSOR).write_text('{"files": {}}\n')   # ingest read an empty log
    user = known_users(project, 1)[0]
    item = int(pd.read_parquet(project / "data/training/items.parquet")["item_id"].iloc[-1])
    feast, features = project / "data/feast", project / "data/features"
    before = online(open_store(feast, features), project, [user]).iloc[0]
    events = pd.DataFrame({"user_id": [user, 424242], "item_id": [item, item],
                           "timestamp": [pd.Timestamp.now(tz="UTC").floor("s")] * 2})
    record_events(events, open_store(feast, features), EventLog(project / "data/events"), 10)
    pushed = online(open_store(feast, features), project, [user, 424242])
    rules = event_rules(DataParams(), ValidateParams(), ServeParams())

    def rematerialize(replay: bool, full: bool = True) -> dict:
        if full:
            (feast / "materialized.json").unlink()             # as a changed definition does: a full rebuild
        return materialize(SplitParams(), FeaturesParams(history_length=10), project / "data/ingested", features,
                           feast, project / "data/training", events_dir=project / "data/events" if replay else None,
                           rules=rules)

    for full in (True, True, False):        # again, and with the rows still online: never added up
        summary = rematerialize(replay=True, full=full)
        assert summary["online_materialization"] == ("full" if full else "unchanged")
        assert summary["events_replayed"] == {"replayed": 2, "users": 2, "skipped": 0}
        rows = online(open_store(feast, features), project, [user, 424242])
        for col in ("recent_items", "seen_items", "interactions_total", "interactions_30d", "known"):
            assert rows[col].tolist() == pushed[col].tolist(), col
    assert rows["interactions_total"].iloc[0] == before["interactions_total"] + 1
    rematerialize(replay=False)                                  # what a run did before: the events vanish
    rows = online(open_store(feast, features), project, [user, 424242])
    assert rows["known"].tolist() == [True, False] and rows["recent_items"].iloc[0] == before["recent_items"]


def test_the_door_fills_the_documented_defaults_and_the_source_rating_rule() -> None:
    """What is logged is what validate accepts: weight 1.0, the rating the source's rule gives (or a
    refusal when it gives none), a timestamp within the clock-skew tolerance logged as the server's."""
    from flows.errors import DataContractError
    from flows.params import DataParams, ServeParams, event_rules
    from flows.serving.events import validate_events
    from validation.params import ValidateParams

    schema = {"user_id_dtype": "int64", "item_id_dtype": "int64", "has_rating": True}
    soon = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=60)).isoformat()
    frame = pd.DataFrame([{"user_id": 1, "item_id": 7, "timestamp": "2026-11-28T01:00:00Z"},
                          {"user_id": 2, "item_id": 7, "timestamp": soon, "weight": 0.5, "rating": 2}], dtype=object)
    demo = event_rules(DataParams(), ValidateParams(), ServeParams())
    got = validate_events(frame, schema, {7}, "events", demo)
    assert got["weight"].tolist() == [1.0, 0.5] and got["rating"].tolist() == [4.0, 2.0]
    assert got["timestamp"].iloc[1] <= pd.Timestamp.now(tz="UTC")            # clamped to the server's clock

    own = event_rules(DataParams(source="/data/shop"), ValidateParams(), ServeParams())
    try:
        validate_events(frame, schema, {7}, "events", own)
        raise AssertionError("an event without a rating was accepted for a source that requires one")
    except DataContractError as exc:
        assert str(exc).startswith("events[0].rating: null values (missing); the source's interactions have ratings")
    filled = event_rules(DataParams(source="/data/shop", event_rating=3.0), ValidateParams(), ServeParams())
    assert validate_events(frame, schema, {7}, "events", filled)["rating"].tolist() == [3.0, 2.0]
    no_ratings = validate_events(frame, {**schema, "has_rating": False}, {7}, "events", own)
    assert "rating" not in no_ratings.columns                                # the source has none to fill


def test_a_files_rows_are_named_by_their_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pushed or added file's bad row is named where an editor finds it: CSV and JSON lines by line
    (a CSV's header is line 1; blank lines, which pandas skips, still count), a parquet file or a JSON
    array by its row index."""
    from flows.serving.events import file_rows, read_frame, row_field

    csv = tmp_path / "e.csv"
    csv.write_text("user_id,item_id\n1,2\n\n3,4\n")
    assert read_frame(csv)["user_id"].tolist() == ["1", "3"] and file_rows(csv)(1) == f"{csv}:4"
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"user_id": 1}\n\n\n{"user_id": 3}\n')
    assert len(read_frame(jsonl)) == 2 and file_rows(jsonl)(0) == f"{jsonl}:1" and file_rows(jsonl)(1) == f"{jsonl}:4"
    assert file_rows(tmp_path / "e.parquet")(4) == f"{tmp_path / 'e.parquet'}[4]"
    # the checks name every row they pass: the file is read for its lines once, not once a row
    import flows.serving.events as events
    reads = []
    monkeypatch.setattr(events, "open", lambda *a, **k: reads.append(a) or open(*a, **k), raising=False)
    name = file_rows(csv)
    assert [name(i) for i in range(2)] * 50 == [f"{csv}:2", f"{csv}:4"] * 50 and len(reads) == 1
    assert row_field("e.csv:2", "user_id") == "e.csv:2 user_id"
    assert row_field("events[0]", "user_id") == "events[0].user_id"
