"""The README's Serving section, run as written: every `curl` line becomes the same HTTP request
(method, path, body, headers; `-d` without `-H` sends curl's form content type) against a real
service on loopback, on demo-shaped data planted as the demo (so the defaults a user gets apply,
the demo's rating rule included). Then the next run's ingest, validate and materialize complete and
the posted event is in the training data."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pandas as pd
import yaml

from flows.params import load_params
from flows.stages.registry import run_stage
from tests.datagen import make_contract_dataset
from tests.project import SMALL_OVERRIDES, _merge
from tests.serving.test_api import start_server

ROOT = Path(__file__).resolve().parents[2]


def serving_curls() -> list[list[str]]:
    """The curl commands of the README's Serving code block, one token list each."""
    section = (ROOT / "README.md").read_text().split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    commands: list[list[str]] = []
    for line in section.split("```", 2)[1].splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        tokens, current = list(lexer), []
        for token in [*tokens, ";"]:
            if token == ";":
                if current and current[0] == "curl":
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def as_request(args: list[str]) -> tuple[str, str, str | None, dict[str, str]]:
    """(method, path with query, body, headers) of a curl command, as curl would send them."""
    method, body, url, headers = None, None, None, {}
    rest = iter(args[1:])
    for arg in rest:
        if arg == "-X":
            method = next(rest)
        elif arg in ("-d", "--data", "--data-raw"):
            body = next(rest)
        elif arg == "-H":
            name, value = next(rest).split(":", 1)
            headers[name.strip()] = os.path.expandvars(value.strip())
        elif arg in ("-g", "--globoff", "-s", "-sS", "-f"):
            continue
        elif arg.startswith("-"):
            raise AssertionError(f"the README uses a curl option this test does not know: {arg}")
        else:
            url = arg
    assert url is not None, args
    if body is not None:
        method = method or "POST"
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")   # curl's default for -d
    return method or "GET", "/" + url.split("://")[-1].split("/", 1)[1], body, headers


def demo_like_project(root: Path) -> Path:
    """A project with the default params (smaller training), whose demo cache holds a small dataset
    shaped like MovieLens (ids from 1, user 196, item 50, capitalised genres, release_year, 1-5 star
    ratings)."""
    demo = make_contract_dataset(root / ".cache/towerflow/ml-100k", n_users=200, n_items=60, per_user=(5, 15), seed=3)
    # the demo's item columns (MovieLens: the year is release_year), so the README's POST /items works there
    items = pd.read_parquet(demo / "items.parquet").rename(columns={"year": "release_year"})
    assert set(items.columns) >= {"item_id", "release_year", "genres"}, items.columns
    items["genres"] = [[g.capitalize() for g in gs] for gs in items["genres"]]
    items.assign(item_id=items["item_id"] - 999).to_parquet(demo / "items.parquet", index=False)
    inter = pd.read_parquet(demo / "interactions.parquet")
    inter.assign(item_id=inter["item_id"] - 999).to_parquet(demo / "interactions.parquet", index=False)
    (demo / ".complete").write_text("demo-shaped test data\n")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL_OVERRIDES)
    params = _merge(params, {"train": {"epochs": 1}, "publish": {"verify_users": 20, "upsert_batch": 50}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_the_readme_serving_examples_then_the_next_run(tmp_path: Path) -> None:
    from flows.serving.api import build_service

    root = demo_like_project(tmp_path / "proj")
    params = load_params(root / "params.yaml")
    for stage in ("ingest", "validate", "materialize", "sample", "train"):
        run_stage(stage, params, root)
    (root / "reports/gate.json").write_text('{"passed": true, "checks": [], "reasons": []}\n')
    run_stage("publish", params, root)

    curls = serving_curls()
    assert len(curls) >= 7 and any("/events" in " ".join(c) for c in curls)
    app, state = build_service(params, root)
    server, thread, port = start_server(app, params.serve)
    import httpx
    posted = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for curl in curls:
                method, path, body, headers = as_request(curl)
                r = client.request(method, path, content=body, headers=headers)
                assert r.status_code == 200, (" ".join(curl), r.status_code, r.text)
                if path == "/events":
                    posted += json.loads(body)["events"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.stop()

    # the next run: what the README's events were logged as is what the contract accepts
    summaries = {stage: run_stage(stage, params, root) for stage in ("ingest", "validate", "materialize")}
    assert summaries["ingest"]["events"]["added"] == len(posted) and summaries["ingest"]["events"]["quarantined"] == 0
    assert summaries["validate"]["success"]
    examples = pd.read_parquet(root / "data/training/examples.parquet")
    for event in posted:
        hit = examples[(examples["user_id"] == event["user_id"]) & (examples["item_id"] == event["item_id"])
                       & (examples["timestamp"] == pd.Timestamp(event["timestamp"]))]
        assert len(hit) == 1 and hit["weight"].iloc[0] == 1.0, event
