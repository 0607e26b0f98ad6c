"""`towerflow serve-api`: the warm HTTP service over the live published bundle (FastAPI + uvicorn).

    GET  /recommend?user_id=&k=&exclude_seen=&filter=     one user
    POST /recommend  {"user_ids": [...], "k", "exclude_seen", "filter"}   a batch
    GET  /similar?item_id=&k=&filter=                      items near an indexed item
    POST /events     {"events": [{"user_id", "item_id", "timestamp"}, ...]}
    POST /items      {"items": [{"item_id", <item features>...}, ...]}
    GET  /healthz, /version, /metrics

The model, encoder, Feast handle and index are loaded once (flows/serving/state.py, which also
swaps versions without dropping requests). Handlers are `async` and answer inline on the event
loop: a warm request is a few milliseconds of CPU, and one thread at a time is what an embedded
index (one process, no concurrent writers) and 2 cores want; one worker process for the same
reason (an embedded index is locked to one process).

Bad input is the caller's mistake, never a 500: one exception handler maps domain errors to a
JSON `{"error": "..."}` that names the problem (400 bad query, 422 bad data, 404 unknown item,
409 existing item, 413 too large), as the CLI prints them as one line.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from features.errors import FeatureError
from flows.errors import EXPECTED_ERRORS, DataContractError, TowerflowError
from flows.params import ServeParams, event_rules
from flows.serving.store import NothingPublished
from flows.serving.events import EventLog, body_rows, record_events, validate_events
from flows.serving.index import BadQuery
from flows.serving.index.base import parse_filter
from flows.serving.items import ItemExists, add_items, normalize_items, sidecar_signature
from flows.serving.metrics import MetricsMiddleware, ServiceMetrics
from flows.serving.recommend import Answer, coerce_id, parse_filter_json
from flows.serving.rerank import RankerCache, rerank_answers
from flows.serving.state import LiveState, Served
from models.errors import ModelInputError
from validation.params import EventRules
from validation.errors import ValidationFailed

log = logging.getLogger("towerflow.serve")
DEFAULT_K = 20
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class RequestError(TowerflowError):
    """A request the service refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServiceConfig:
    serve: ServeParams
    history_length: int          # features.history_length: recent_items kept per pushed row
    event_rules: EventRules      # the contract's row rules for events (flows/params.event_rules)
    events_dir: Path             # serve.events_dir, absolute
    published_dir: Path
    ranker: RankerCache | None = None   # rerank=true: the relevance tower published in the served bundle


def status_of(exc: Exception) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, ItemExists):
        return 409
    if isinstance(exc, DataContractError):
        return 422
    if isinstance(exc, BadQuery):
        return 404 if "is not in the index" in str(exc) else 400
    if isinstance(exc, NothingPublished):
        return 503
    if isinstance(exc, (ModelInputError, FeatureError, ValidationFailed)):
        return 422          # the libraries' domain errors: the request's data did not fit
    return 503 if isinstance(exc, EXPECTED_ERRORS) else 500


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), default=str), status_code=status,
                    media_type="application/json")


# --- request parsing: every message names the field -----------------------------------------------
def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    params = dict(request.query_params)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RequestError(f"unknown query parameter '{unknown[0]}'; this endpoint takes: {', '.join(sorted(allowed))}")
    return params


def _k(value: Any, max_k: int) -> int:
    if value is None:
        return DEFAULT_K
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"k must be an integer, got {value!r}")
    if not 1 <= value <= max_k:
        raise RequestError(f"k must be between 1 and {max_k} (serve.max_k), got {value}")
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE | FALSE:
        return value.lower() in TRUE
    raise RequestError(f"{name} must be true or false, got {value!r}")


def _filter(value: Any, served: Served) -> dict[str, Any] | None:
    """A filter object (or its JSON text), checked against the index's fields before any work."""
    value = parse_filter_json(value, "filter")
    if value is not None:
        parse_filter(value, served.rec.index.settings.fields)   # unknown fields, wrong types: BadQuery
    return value


async def _body(request: Request, allowed: set[str] | None = None) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(f"the request body is not valid JSON{where}") from None
    if allowed is not None:
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object with {', '.join(sorted(allowed))}")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}'; the body takes: {', '.join(sorted(allowed))}")
    return body


def _rerank_depth(args: dict, k: int, config: ServiceConfig) -> int | None:
    """With rerank=true: how many retrieved items the ranker re-orders (rerank_depth, default 100,
    at least k); None without."""
    if args.get("rerank") is None or not _flag(args.get("rerank"), "rerank"):
        return None
    depth = args.get("rerank_depth", min(100, config.serve.max_k))
    return max(k, _k(depth, config.serve.max_k))


def _ranker(config: ServiceConfig, version: str) -> Any:
    if config.ranker is None:
        raise RequestError("rerank=true: this service has no ranker configured", 503)
    return config.ranker.get(version)


def _user_answer(answer: Answer) -> dict[str, Any]:
    user, cold, hits = answer
    return {"user_id": user, "cold_start": cold,
            "items": [{"item_id": item, "rank": rank, "score": round(score, 6)}
                      for rank, (item, score) in enumerate(hits, start=1)]}


# --- handlers: module functions that find the state, config and metrics on the app ----------------
def _ctx(request: Request) -> tuple[LiveState, ServiceConfig, ServiceMetrics]:
    app_state = request.app.state
    return app_state.live, app_state.config, app_state.metrics


async def recommend_one(request: Request) -> Response:
    live, config, metrics = _ctx(request)
    q = _query(request, {"user_id", "k", "exclude_seen", "filter", "rerank", "rerank_depth"})
    if "user_id" not in q:
        raise RequestError("missing query parameter 'user_id'")
    with live.use() as served:
        user = coerce_id(q["user_id"], served.rec.schema["user_id_dtype"], "user_id")
        k, exclude = _k(q.get("k"), config.serve.max_k), _flag(q.get("exclude_seen"), "exclude_seen")
        depth = _rerank_depth(q, k, config)
        (answer,) = served.rec.answer([user], depth or k, exclude, _filter(q.get("filter"), served))
        version = served.version
    if depth:
        (answer,) = rerank_answers([answer], _ranker(config, version), k)
    metrics.served(int(answer[1]), 1)
    return _json({"version": version, **_user_answer(answer)})


async def recommend_batch(request: Request) -> Response:
    live, config, metrics = _ctx(request)
    body = await _body(request, {"user_ids", "k", "exclude_seen", "filter", "rerank", "rerank_depth"})
    ids = body.get("user_ids")
    if not isinstance(ids, list) or not ids:
        raise RequestError("user_ids must be a non-empty list of user ids")
    if len(ids) > config.serve.max_batch:
        raise RequestError(f"batch of {len(ids)} users exceeds serve.max_batch ({config.serve.max_batch})", 413)
    with live.use() as served:
        dtype = served.rec.schema["user_id_dtype"]
        users = [coerce_id(u, dtype, f"user_ids[{i}]") for i, u in enumerate(ids)]
        k, exclude = _k(body.get("k"), config.serve.max_k), _flag(body.get("exclude_seen"), "exclude_seen")
        depth = _rerank_depth(body, k, config)
        answers = served.rec.answer(users, depth or k, exclude, _filter(body.get("filter"), served))
        version = served.version
    if depth:
        answers = rerank_answers(answers, _ranker(config, version), k)
    metrics.served(sum(a[1] for a in answers), len(answers))
    return _json({"version": version, "k": k, "results": [_user_answer(a) for a in answers]})


async def similar(request: Request) -> Response:
    live, config, _ = _ctx(request)
    q = _query(request, {"item_id", "k", "filter"})
    if "item_id" not in q:
        raise RequestError("missing query parameter 'item_id'")
    with live.use() as served:
        item = coerce_id(q["item_id"], served.rec.schema["item_id_dtype"], "item_id")
        if item not in served.known_items:
            raise RequestError(f"item_id {item!r} is not in the catalog of version {served.version}", 404)
        k = _k(q.get("k"), config.serve.max_k)
        hits = served.rec.index.similar(item, k, filter=_filter(q.get("filter"), served))
        version = served.version
    return _json({"version": version, "item_id": item, "items": _user_answer((item, False, hits))["items"]})


async def events(request: Request) -> Response:
    live, config, metrics = _ctx(request)
    rows = body_rows(await _body(request), "events")
    if len(rows) > config.serve.max_events:
        raise RequestError(f"{len(rows)} events exceed serve.max_events ({config.serve.max_events}); "
                           "send them in parts or use `towerflow events push FILE`", 413)
    with live.use() as served:
        valid = validate_events(pd.DataFrame(rows, dtype=object), served.rec.schema, served.known_items, "events",
                                config.event_rules)
        path = record_events(valid, served.rec.store, EventLog(config.events_dir), config.history_length)
    metrics.events.inc(len(valid))
    return _json({"accepted": len(valid), "users": int(valid["user_id"].nunique()), "log": str(path)})


async def items(request: Request) -> Response:
    live, config, metrics = _ctx(request)
    rows = body_rows(await _body(request), "items")
    if len(rows) > config.serve.max_items:
        raise RequestError(f"{len(rows)} items exceed serve.max_items ({config.serve.max_items})", 413)
    with live.use() as served:
        new = normalize_items(pd.DataFrame(rows, dtype=object), served.rec.schema, "items")
        add_items(served.rec, config.published_dir, new, served.known_items)
        served.sidecar = sidecar_signature(served.rec.bundle_dir)   # ours: the watcher need not sync it
        version = served.version
    metrics.items_added.inc(len(new))
    return _json({"added": len(new), "version": version, "item_ids": new["item_id"].tolist()})


async def healthz(request: Request) -> Response:
    live = request.app.state.live
    served = live.served
    body = {"status": "ok" if served else "loading", "version": served.version if served else None,
            "last_reload_error": live.last_error}
    return _json(body, 200 if served else 503)


async def version(request: Request) -> Response:
    live = request.app.state.live
    with live.use() as served:
        meta = served.rec.meta
        return _json({"version": served.version, "backend": meta.get("backend"), "collection": meta.get("collection"),
                      "published_at": meta.get("created_at"), "model_digest": meta.get("model_digest"),
                      "previous": meta.get("previous"), "items": len(served.known_items),
                      "loaded_at": served.loaded_at, "reloads": live.reloads})


async def prometheus(request: Request) -> Response:
    content, media = request.app.state.metrics.exposition()
    return Response(content, media_type=media)


async def _domain_error(request: Request, exc: Exception) -> Response:
    return _json({"error": str(exc)}, status_of(exc))


async def _bug(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback (it re-raises after this answer): the caller gets no internals.
    return _json({"error": f"internal error ({type(exc).__name__}); see the service log"}, 500)


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {}
    return _json({"error": f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', 'invalid')}"}, 400)


ROUTES = [("GET", "/recommend", recommend_one), ("POST", "/recommend", recommend_batch), ("GET", "/similar", similar),
          ("POST", "/events", events), ("POST", "/items", items), ("GET", "/healthz", healthz),
          ("GET", "/version", version), ("GET", "/metrics", prometheus)]


def create_app(state: LiveState, config: ServiceConfig, metrics: ServiceMetrics) -> FastAPI:
    """The FastAPI app over a started LiveState."""
    app = FastAPI(title="towerflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live, app.state.config, app.state.metrics = state, config, metrics
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    for domain in EXPECTED_ERRORS:   # ours and the libraries' domain errors: a JSON error, not a 500
        app.add_exception_handler(domain, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _bug)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=frozenset(p for _, p, _ in ROUTES))
    return app


def build_service(params: Any, root: Path) -> tuple[FastAPI, LiveState]:
    """The app and its started state for a project (params.yaml's folder is `root`)."""
    paths = params.paths.resolved(root)
    metrics = ServiceMetrics()

    def changed(served: Served) -> None:
        metrics.set_live(served.version, str(served.rec.meta.get("backend")))
        metrics.reloads.labels("ok").inc()

    state = LiveState(paths.published, paths.feast, paths.features, params.serve.reload_interval_s,
                      on_change=changed)
    state.start()
    events_dir = params.serve.events_dir if params.serve.events_dir.is_absolute() else root / params.serve.events_dir
    config = ServiceConfig(params.serve, params.features.history_length,
                           event_rules(params.data, params.validate, params.serve),
                           events_dir, paths.published, RankerCache(paths.published))
    return create_app(state, config, metrics), state


def server_config(app: FastAPI, serve_params: ServeParams, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """uvicorn's settings for the service (one worker: an embedded index belongs to one process)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_keep_alive=serve_params.keep_alive_s)


def serve(params: Any, root: Path, host: str, port: int, announce: Any = print) -> None:
    """Run the service until interrupted."""
    import uvicorn

    app, state = build_service(params, root)
    announce(f"serving version {state.served.version if state.served else '?'} at http://{host}:{port} "
             "(GET /recommend, /similar, /version, /healthz, /metrics; POST /recommend, /events, /items)")
    try:
        uvicorn.Server(server_config(app, params.serve, host, port)).run()
    finally:
        state.stop()
