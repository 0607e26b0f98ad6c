"""Speed of the warm service on a demo-sized project: what issue 14's "Speed" section asks for.

    python -m flows.experiments.serve_bench --from-run /work/baseline --out reports/serve_bench.json
    (and from `towerflow bench`, on the temporary copy it has just run: `bench_service(root)`)

- in process: warm single-user `Recommender.answer` p50/p99 (wall and CPU), the batch path of
  `towerflow recommend --users-file` (every user, k=100) in users/s, exclusion and filter costs;
- over HTTP (`towerflow serve-api` in its own process, loopback): one client p50/p99; 50
  concurrent clients for 30 s (an httpx async loop): throughput, p50/p99, errors; the same while a
  publish (another process) switches versions: errors, and every answer's version complete;
- event to effect: POST /events, then the next /recommend no longer holds the item;
- /recommend and /healthz while a 5,000-item POST /items and a 10,000-event POST /events run at
  the same time (flows/experiments/write_bench.py).
`--from-run` takes the outputs of a finished run made before bundles existed, copies its Feast
store and publishes its model with the current publish code into a temporary folder.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from flows.experiments.features_bench import percentiles
from flows.experiments.machine import machine

CLIENTS, SECONDS = 50, 30.0
K_SINGLE, K_BATCH = 20, 100


def prepare_from_run(run: Path, work: Path) -> Path:
    """A project in `work` serving `run`'s model: Feast store copied (registry re-applied with the
    push sources), the model published as a bundle. Returns its params.yaml."""
    from features.definitions import build_repo
    from features.store import open_store
    from flows.params import PublishParams
    from flows.stages.publish import publish

    for sub in ("data/feast", "data/features"):
        shutil.copytree(run / sub, work / sub)
    (work / "data/ingested").mkdir(parents=True)
    for name in ("schema.json", "users.parquet"):
        shutil.copy2(run / "data/ingested" / name, work / "data/ingested" / name)
    schema = json.loads((work / "data/ingested/schema.json").read_text())
    open_store(work / "data/feast", work / "data/features").apply(build_repo(schema, work / "data/features").objects())
    for model in ("full", "eval"):
        if (run / "artifacts/model" / model).is_dir():
            shutil.copytree(run / "artifacts/model" / model, work / "artifacts/model" / model)
    (work / "data/training").symlink_to(run / "data/training")   # read only: catalog + examples
    publish(work / "artifacts/model/full", work / "data/training", work / "data/ingested/schema.json",
            PublishParams(), work / "artifacts/published")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"max_batch": 2000}}))
    return params


def _users(root: Path) -> list:
    import pandas as pd
    return pd.read_parquet(root / "data/ingested/users.parquet")["user_id"].tolist()


def in_process(root: Path, repeats: int) -> dict[str, Any]:
    """Warm Recommender calls in this process (no HTTP)."""
    from flows.serving.recommend import Recommender

    users = _users(root)
    t0 = time.perf_counter()
    rec = Recommender.load_live(root / "artifacts/published", root / "data/feast", root / "data/features")
    load_s = time.perf_counter() - t0
    try:
        rec.answer(users[:1], K_SINGLE)
        wall, cpu = [], []
        for i in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            rec.answer([users[i % len(users)]], K_SINGLE)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        batches = []
        for _ in range(3):
            w, c = time.perf_counter(), time.process_time()
            rows = rec.recommend(users, K_BATCH)
            batches.append((time.perf_counter() - w, time.process_time() - c))
        best = min(batches)
        one = users[: min(200, len(users))]
        options: dict[str, dict[str, Any]] = {"exclude_seen": {"exclude_seen": True},
                                              "no_exclusion": {"exclude_seen": False}}
        genre = _some_filter(rec)
        if genre:
            options["filter_" + next(iter(genre))] = {"filter": genre}
        costs = {}
        for name, kw in options.items():
            w = time.perf_counter()
            rec.answer(one, K_SINGLE, **kw)
            costs[name] = round((time.perf_counter() - w) / len(one) * 1000, 3)
    finally:
        rec.close()
    return {"backend": rec.meta["backend"], "items": rec.meta["count"], "users": len(users), "load_s": round(load_s, 2),
            "single_k20_wall": percentiles(wall), "single_k20_cpu": percentiles(cpu),
            "batch_k100": {"users": len(users), "rows": len(rows), "seconds": round(best[0], 3),
                           "users_per_s": round(len(users) / best[0]), "cpu_users_per_s": round(len(users) / best[1])},
            "ms_per_user_k20_200_users": costs}


def _some_filter(rec: Any) -> dict[str, Any] | None:
    """A keyword filter on the first multi-valued/categorical field, with a common value."""
    import pandas as pd
    fields = [f for f, kind in rec.index.settings.fields.items() if kind == "keyword"]
    if not fields:
        return None
    column = pd.read_parquet(rec.bundle_dir / "items.parquet", columns=[fields[0]])[fields[0]].explode().dropna()
    return {fields[0]: str(column.mode().iloc[0])} if len(column) else None


def start_server(params: Path, port: int, workers: int = 1) -> subprocess.Popen:
    """`towerflow serve-api --workers N` in its own processes (output in serve-api.log beside params);
    returns once every reader has loaded (the supervisor prints "serving version" then)."""
    import httpx

    cmd = [sys.executable, "-m", "flows.cli", "serve-api", "--port", str(port), "--params", str(params),
           "--workers", str(workers)]
    log = params.parent / "serve-api.log"
    with open(log, "w") as out:   # a file, not a pipe: nobody reads a pipe while the load runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-api exited: {log.read_text()[-2000:]}")
        try:
            if (httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                    and "serving version" in log.read_text()):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve-api did not answer /healthz within 120 s")


async def _load(url: str, users: list, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` concurrent loops of GET /recommend for `seconds`: latencies, errors, versions seen."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    versions: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def loop(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.get("/recommend", params={"user_id": rng.choice(users), "k": K_SINGLE})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    versions[r.json()["version"]] = versions.get(r.json()["version"], 0) + 1
                except httpx.HTTPError as exc:   # when, too: a stall or a publish nearby explains it
                    errors.append(f"{repr(exc)} at {time.perf_counter() - start:.1f} s")
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies) + len(errors),
            "over_2s": sum(1 for t in latencies if t > 2.0),
            "throughput_rps": round(len(latencies) / elapsed, 1), "latency": percentiles(latencies) if latencies else None,
            "errors": len(errors), "first_errors": errors[:3], "versions": versions}


def http_single(url: str, users: list, repeats: int) -> dict[str, Any]:
    import httpx
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/recommend", params={"user_id": users[0], "k": K_SINGLE})
        samples = []
        for i in range(repeats):
            t0 = time.perf_counter()
            r = client.get("/recommend", params={"user_id": users[i % len(users)], "k": K_SINGLE})
            samples.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return percentiles(samples)


def event_to_effect(url: str, users: list, n: int = 20) -> dict[str, Any]:
    """POST /events with each user's current top item, then GET /recommend until it is gone."""
    import httpx
    samples, checks = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for user in users[:n]:
            top = client.get("/recommend", params={"user_id": user, "k": 5}).json()["items"][0]["item_id"]
            t0 = time.perf_counter()
            assert client.post("/events", json={"user_id": user, "item_id": top}).status_code == 200
            tries = 0
            while True:
                tries += 1
                items = [i["item_id"] for i in client.get("/recommend", params={"user_id": user, "k": 5}).json()["items"]]
                if top not in items:
                    break
            samples.append(time.perf_counter() - t0)
            checks.append(tries)
    return {"events": n, "effect": percentiles(samples), "recommend_calls_until_effect": max(checks)}


def publish_under_load(root: Path, params: Path, url: str, users: list, clients: int, seconds: float) -> dict[str, Any]:
    """The load above while another process publishes artifacts/model/eval (a new version)."""
    from flows.serving.store import BundleStore

    store = BundleStore(root / "artifacts/published")
    before = store.live()
    cmd = [sys.executable, "-m", "flows.experiments.serve_bench", "--publish", str(root / "artifacts/model/eval"),
           "--root", str(root)]

    async def run() -> dict[str, Any]:
        load = asyncio.create_task(_load(url, users, clients, seconds))
        await asyncio.sleep(min(2.0, seconds / 4))
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        publish_s = time.perf_counter() - t0
        result = await load
        result.update(publish_exit=proc.returncode, publish_s=round(publish_s, 1), publish_output=out.decode()[-300:])
        return result

    result = asyncio.run(run())
    complete = set(store.complete())
    result.update(before=before, after=store.live(),
                  only_complete_versions=set(result["versions"]) <= complete,
                  switched=set(result["versions"]) >= {before, store.live()} and before != store.live())
    return result


def bench_service(root: Path, params: Path, clients: int = CLIENTS, seconds: float = SECONDS,
                  repeats: int = 300, port: int = 8765) -> dict[str, Any]:
    """Every figure of the module doc for the project at root (a live bundle, Feast store)."""
    users = _users(root)
    result: dict[str, Any] = {"in_process": in_process(root, repeats)}
    server = start_server(params, port)
    url = f"http://127.0.0.1:{port}"
    try:
        result["http_single_k20"] = http_single(url, users, repeats)
        result["http_load"] = asyncio.run(_load(url, users, clients, seconds))
        result["event_to_effect"] = event_to_effect(url, users[len(users) // 2:])
        if (root / "artifacts/model/eval").is_dir():
            result["http_load_during_publish"] = publish_under_load(root, params, url, users, clients, seconds)
        result["reads_during_writes"] = _writes(root, url, users)   # last: it adds 5,000 items
    finally:
        server.terminate()
        server.wait(timeout=30)
    return result


def _writes(root: Path, url: str, users: list) -> dict[str, Any]:
    from flows.experiments.write_bench import writes_under_load
    from flows.serving.bundles import BundleStore
    return writes_under_load(url, BundleStore(root / "artifacts/published").live_dir(), users)


def writes_only(root: Path, params: Path, port: int = 8765, workers: int = 1) -> dict[str, Any]:
    """Only the reads-during-writes figure (flows/experiments/write_bench.py)."""
    server = start_server(params, port, workers)
    try:
        return {"workers": workers, "load_avg": os.getloadavg(),
                "reads_during_writes": _writes(root, f"http://127.0.0.1:{port}", _users(root))}
    finally:
        server.terminate()
        server.wait(timeout=30)


def load_only(root: Path, params: Path, workers: int, clients: int = CLIENTS, seconds: float = SECONDS,
              port: int = 8765) -> dict[str, Any]:
    """Only the throughput figure: `clients` concurrent GET /recommend loops against serve-api
    --workers N (the client is one asyncio process on the same machine)."""
    server = start_server(params, port, workers)
    try:
        url = f"http://127.0.0.1:{port}"
        users = _users(root)
        asyncio.run(_load(url, users, 4, 2.0))     # warm every process
        before, cpu = os.getloadavg(), _cpu_seconds(server.pid)
        result = asyncio.run(_load(url, users, clients, seconds))
        cpu = _cpu_seconds(server.pid) - cpu
        return {"workers": workers, "load_avg_before": before, "load_avg_after": os.getloadavg(),
                "http_load": result, "service_cpu_s": round(cpu, 1),
                "service_cpu_ms_per_request": round(1000 * cpu / max(1, result["requests"]), 2)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children, from /proc (Linux)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(_cpu_seconds(int(child)) for child in children)


def _publish(model: Path, root: Path) -> None:
    from flows.params import PublishParams
    from flows.stages.publish import publish
    print(publish(model, root / "data/training", root / "data/ingested/schema.json", PublishParams(),
                  root / "artifacts/published"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path, help="a finished run's project folder (e.g. /work/baseline)")
    ap.add_argument("--out", type=Path, default=Path("reports/serve_bench.json"))
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--writes-only", action="store_true", help="only /recommend and /healthz during large writes")
    ap.add_argument("--load-only", action="store_true", help="only the --clients throughput figure")
    ap.add_argument("--workers", type=int, default=1, help="serve-api --workers for --writes-only / --load-only")
    ap.add_argument("--publish", type=Path, help="internal: publish this model dir into --root")
    ap.add_argument("--root", type=Path)
    args = ap.parse_args(argv)
    if args.publish:
        _publish(args.publish, args.root)
        return
    if args.from_run is None:
        ap.error("--from-run is required")
    with tempfile.TemporaryDirectory(prefix="towerflow-serve-bench-") as tmp:
        work = Path(tmp)
        params = prepare_from_run(args.from_run.resolve(), work)
        figures = (writes_only(work, params, workers=args.workers) if args.writes_only else
                   load_only(work, params, args.workers, args.clients, args.seconds) if args.load_only else
                   bench_service(work, params, args.clients, args.seconds, args.repeats))
        result = {"machine": machine(speed=False), **figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
