"""Stage 1, ingest: a source in the data contract (docs/DATA.md) -> normalized tables in out_dir.

Writes out_dir/{users,items,interactions,ranking_logs}.parquet, out_dir/simulation/ and
out_dir/schema.json (formats in docs/ARCHITECTURE.md, "ingest ->"). All structural checks run before
anything is written, and out_dir is built in a temporary sibling directory and swapped in at the end,
so a failed run leaves a previous out_dir as it was.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flows.sources.contract import SourceFiles, Tables, check_directory, read_source
from flows.sources.normalize import logs_schema
from flows.sources.demo import demo_source
from flows.sources.events_log import QUARANTINE, EventRows, append_events, events_fingerprint, write_events_state
from flows.sources.simulator import simulate
from flows.errors import DataContractError
from flows.params import DataParams, ServeParams, SimulatorParams, event_rules
from validation.params import EventRules, ValidateParams

DEMO = "demo"
log = logging.getLogger("towerflow.ingest")


def check_source(data: DataParams) -> None:
    """Preflight, writes nothing: raise DataContractError naming the file and the problem.

    Checks: the source path exists, the required files are there and readable (parquet or csv),
    required columns exist, and declared feature columns exist. 'demo' passes (it is built on use).
    """
    if data.source != DEMO:
        check_directory(Path(data.source), data)


SOURCE_STATE = "source.json"


def record_source(cache_dir: Path, files: SourceFiles, events_dir: Path | None = None,
                  events_seen: dict[str, int] | None = None) -> None:
    """Remember which source files (and serving events: the log sizes ingest read) the ingested tables
    came from (outside DVC's outputs, so a touched but identical source re-ingests without changing
    anything downstream)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": files.fingerprint(), "events": events_fingerprint(events_dir, events_seen)}
    (cache_dir / SOURCE_STATE).write_text(json.dumps(state) + "\n")


def _read_state(cache_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cache_dir / SOURCE_STATE).read_text())
    except (OSError, ValueError):
        return {}


def source_changed(data: DataParams, cache_dir: Path, events_dir: Path | None = None) -> bool:
    """True when a source directory's files, or the serving events log, differ from the ones last ingested.

    DVC sees the `data` params, not the files of a source directory ("demo" is not a path, so it
    cannot be a declared dependency) nor the events the service appends to `events_dir` (no stage
    owns that folder), so `towerflow run` asks this before reproducing ingest and forces it when the
    files were replaced or edited or new events were logged. A source that cannot be read is
    "changed": ingest then runs and reports what is wrong with it."""
    state = _read_state(cache_dir)
    # a state written before events were recorded counts as "no events"
    events_changed = data.events and state.get("events", events_fingerprint(None)) != events_fingerprint(events_dir)
    if data.source == DEMO:
        return events_changed
    try:
        current = check_directory(Path(data.source), data).fingerprint()
    except (OSError, ValueError, DataContractError):
        return True
    return state.get("fingerprint") != current or events_changed


def ingest(data: DataParams, sim: SimulatorParams, seed: int, cache_dir: Path, out_dir: Path,
           events_dir: Path | None = None, rules: EventRules | None = None) -> dict[str, Any]:
    """Read, check and normalize the source; write the contract tables, ranking logs and schema.json.
    With data.events, the serving API's events in events_dir/events-*.jsonl that meet the contract's
    row rules (`rules`; default: the defaults' for this source) are appended to the interactions, the
    others go to out_dir/events_quarantine.jsonl, and out_dir/events_cursor.json records what was read
    (flows/sources/events_log.py); schema.json and the summary then count them. The source's own rows
    are not filtered: validate checks them."""
    started = time.perf_counter()
    if data.source == DEMO:
        source = demo_source(cache_dir)
    else:
        source = Path(data.source)
    files = check_directory(source, data)
    tables, kinds = read_source(files, data)  # everything is in memory: failures happen before writing
    rules = rules or event_rules(data, ValidateParams(), ServeParams())
    events = append_events(tables.interactions, tables.users, tables.items, events_dir if data.events else None,
                           rules)
    tables = replace(tables, interactions=events.interactions)
    logs_origin = _logs_origin(data, tables)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); out_dir is a normal data directory
    try:
        sim_summary = _write(tables, kinds, logs_origin, data, sim, seed, tmp, events)
        if data.events:
            write_events_state(events, tmp)
        _swap(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record_source(cache_dir, files, events_dir if data.events else None, events.seen if data.events else None)
    if events.quarantined:   # never fatal: the run goes on with the events that meet the contract
        log.warning("ingest: %d event line(s) broke the contract and were quarantined (%s): %s",
                    events.quarantined, out_dir / QUARANTINE, events.quarantine[0]["reason"])
    return {
        "source": data.source if data.source == DEMO else str(source.resolve()),
        "users": tables.users.num_rows, "items": tables.items.num_rows,
        "interactions": tables.interactions.num_rows,
        "ranking_logs": sim_summary.get("log_rows", 0), "logs_origin": logs_origin,
        **({"events": events.summary()} if events.read else {}),
        **({"events_quarantine": str(out_dir / QUARANTINE)} if events.quarantined else {}),
        **({"simulation": sim_summary} if logs_origin == "simulated" else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _logs_origin(data: DataParams, tables: Tables) -> str:
    if data.ranking_logs == "none":
        return "none"
    if data.ranking_logs == "auto" and tables.ranking_logs is not None:
        return "source"
    return "simulated"


def _write(tables: Tables, kinds: dict[str, dict[str, list[str]]], logs_origin: str, data: DataParams,
           sim: SimulatorParams, seed: int, out: Path, events: EventRows) -> dict[str, Any]:
    pq.write_table(tables.users, out / "users.parquet")
    pq.write_table(tables.items, out / "items.parquet")
    pq.write_table(tables.interactions, out / "interactions.parquet")
    user_type = tables.interactions.schema.field("user_id").type
    item_type = tables.interactions.schema.field("item_id").type
    schema = logs_schema(user_type, item_type)
    sim_dir = out / "simulation"
    sim_dir.mkdir()
    summary: dict[str, Any] = {}
    if logs_origin == "simulated":
        summary = simulate(tables.interactions, tables.items["item_id"], sim, seed,
                           out / "ranking_logs.parquet", sim_dir, users=tables.users["user_id"])
    else:
        logs = schema.empty_table()
        if tables.ranking_logs is not None and logs_origin == "source":
            context = [f for f in tables.ranking_logs.schema if f.name not in schema.names]
            logs = tables.ranking_logs.select([*schema.names, *(f.name for f in context)]).cast(
                pa.schema([*schema, *context], metadata=schema.metadata))
        pq.write_table(logs, out / "ranking_logs.parquet")
        summary = {"log_rows": logs.num_rows}
        note = ("The ranking logs came from the source; there is no simulated ground truth.\n"
                if logs_origin == "source" else "data.ranking_logs is 'none': ranking_logs.parquet is empty.\n")
        (sim_dir / "README.txt").write_text(note)
    meta = {
        "user_id_dtype": _dtype_name(user_type), "item_id_dtype": _dtype_name(item_type),
        "user_features": kinds["user_features"], "item_features": kinds["item_features"],
        "has_rating": "rating" in tables.interactions.column_names,
        "ranking_logs": logs_origin, "source": data.source,
        # optional per-impression context columns of the logs (device, page, grid_row ...)
        "log_context": [n for n in pq.read_schema(out / "ranking_logs.parquet").names if n not in schema.names],
    }
    if events.read:    # only then: a run without serving events writes the schema.json it always did
        meta["events"] = events.summary()
    (out / "schema.json").write_text(json.dumps(meta, indent=2) + "\n")
    return summary


def _dtype_name(typ: pa.DataType) -> str:
    return "int64" if typ == pa.int64() else "string"


def _swap(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir with tmp; the old directory is moved aside first and removed only after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
