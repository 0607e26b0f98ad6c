"""Reads while large writes run: what issue 21's "writes never freeze reads" asks to measure.

A running service (`towerflow serve-api`, loopback) gets, at the same time, a POST /items of
5,000 new items (features copied from catalog rows, new ids) and a POST /events of 10,000
events; meanwhile one client sends GET /recommend back to back and another GET /healthz every
50 ms. Reported: the latency of the reads that started and finished while a write was running,
and how long each write took. The client shares the machine with the service (one asyncio
process, bodies encoded before the clock starts); run it on an otherwise idle machine.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from flows.experiments.features_bench import percentiles

N_ITEMS, N_EVENTS = 5000, 10000
HEALTH_EVERY_S = 0.05


def new_items(bundle: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n items with ids after the catalog's, each with the features of a random catalog row."""
    import pandas as pd

    from flows.serving.items import item_kinds

    schema = json.loads((bundle / "schema.json").read_text())
    catalog = pd.read_parquet(bundle / "items.parquet")
    rows = catalog.sample(n, replace=True, random_state=seed)[[c for c in item_kinds(schema) if c in catalog]]
    ids = pd.to_numeric(catalog["item_id"], errors="coerce")
    start = int(ids.max()) + 1_000_000 if schema["item_id_dtype"] == "int64" else 0
    items = []
    for i, row in enumerate(rows.to_dict("records")):
        plain = {k: (list(map(str, v)) if hasattr(v, "__len__") and not isinstance(v, str) else
                     (None if v != v else v)) for k, v in row.items()}
        items.append({"item_id": start + i if schema["item_id_dtype"] == "int64" else f"bench-{i}", **plain})
    return items


def new_events(bundle: Path, users: list, n: int, seed: int = 0) -> list[dict[str, Any]]:
    import pandas as pd

    rng = random.Random(seed)
    catalog = pd.read_parquet(bundle / "items.parquet", columns=["item_id"])["item_id"].tolist()
    now = pd.Timestamp.now(tz="UTC")
    return [{"user_id": rng.choice(users), "item_id": rng.choice(catalog),
             "timestamp": (now - pd.Timedelta(seconds=n - i)).isoformat()} for i in range(n)]


async def _reads(client: Any, users: list, stop: asyncio.Event, log: list) -> None:
    rng = random.Random(1)
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await client.get("/recommend", params={"user_id": rng.choice(users), "k": 20})
        log.append((t0, time.perf_counter(), r.status_code))


async def _health(client: Any, stop: asyncio.Event, log: list) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        r = await client.get("/healthz")
        log.append((t0, time.perf_counter(), r.status_code))
        await asyncio.sleep(HEALTH_EVERY_S)


async def _run(url: str, users: list, items: bytes, events: bytes) -> dict[str, Any]:
    import httpx

    headers = {"content-type": "application/json"}
    reads: list = []
    health: list = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await client.get("/recommend", params={"user_id": users[0], "k": 20})
        stop = asyncio.Event()
        loops = [asyncio.create_task(_reads(client, users, stop, reads)),
                 asyncio.create_task(_health(client, stop, health))]
        await asyncio.sleep(1.0)
        metrics_before = (await client.get("/metrics")).text
        t0 = time.perf_counter()

        async def post(path: str, body: bytes) -> tuple[int, float, str]:
            r = await client.post(path, content=body, headers=headers)
            return r.status_code, time.perf_counter() - t0, r.text[:200]

        (items_status, items_s, items_text), (events_status, events_s, events_text) = await asyncio.gather(
            post("/items", items), post("/events", events))
        t1 = time.perf_counter()
        stop.set()
        await asyncio.gather(*loops)
        metrics_after = (await client.get("/metrics")).text
    served = {path: server_p99(metrics_before, metrics_after, path) for path in ("/recommend", "/healthz")}
    during = [(b - a) for a, b, _ in reads if a >= t0 and b <= t1]
    before = [(b - a) for a, b, _ in reads if b < t0]
    probes = [(b - a) for a, b, _ in health if a >= t0 and b <= t1]
    return {"items": {"n": N_ITEMS, "status": items_status, "seconds": round(items_s, 2), "error": items_text
                      if items_status != 200 else None},
            "events": {"n": N_EVENTS, "status": events_status, "seconds": round(events_s, 2), "error": events_text
                       if events_status != 200 else None},
            "recommend_before": percentiles(before) if before else None,
            "recommend_during": percentiles(during) if during else None,
            "recommend_errors": sum(1 for *_, s in reads if s != 200),
            "healthz_during": percentiles(probes) if probes else None,
            "healthz_max_ms": round(1000 * max(probes), 1) if probes else None,
            "server_side_p99_at_most_ms": served}


def _buckets(text: str, path: str) -> dict[float, float]:
    prefix = f'towerflow_request_seconds_bucket{{endpoint="{path}",le="'
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            le, value = line[len(prefix):].split('"}')
            out[float(le)] = float(value)
    return out


def server_p99(before: str, after: str, path: str) -> float | None:
    """The service's own latency histogram (request in to answer out, no client queueing) over the
    window: the upper bound of the bucket that holds the 99th percentile, in ms."""
    old, new = _buckets(before, path), _buckets(after, path)
    counts = {le: new[le] - old.get(le, 0.0) for le in new}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return None
    le = next(le for le in sorted(counts) if counts[le] >= 0.99 * total)
    return round(1000 * le, 1) if le != float("inf") else None


def writes_under_load(url: str, bundle: Path, users: list) -> dict[str, Any]:
    """The figures of the module doc for the service at url, serving `bundle` (its live version)."""
    items = json.dumps({"items": new_items(bundle, N_ITEMS)}).encode()
    events = json.dumps({"events": new_events(bundle, users, N_EVENTS)}).encode()
    return asyncio.run(_run(url, users, items, events))
