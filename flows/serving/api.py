"""`towerflow serve-api`: the warm HTTP service over the live published bundle (FastAPI + uvicorn).

    GET    /recommend?user_id=&k=&exclude_seen=&filter=     one user
    POST   /recommend  {"user_ids": [...], "k", "exclude_seen", "filter"}   a batch
    GET    /similar?item_id=&k=&filter=                      items near an indexed item
    POST   /events     {"events": [{"user_id", "item_id", "timestamp"}, ...]}     (write token)
    POST   /items      {"items": [{"item_id", <item features>...}, ...]}          (write token)
    DELETE /items/{item_id}                                                      (write token)
    GET    /healthz, /version, /metrics, /openapi.json

Requests and answers are pydantic models (flows/serving/schemas.py), so /openapi.json describes
them; flows/serving/guard.py checks the Host header, the bearer tokens, the content type and the
body's size and depth before a handler runs. The model, encoder, Feast handle and index are loaded
once (flows/serving/state.py, which also swaps versions without dropping requests).

Handlers are plain functions, run by FastAPI in its thread pool: the event loop only moves bytes,
so /healthz answers while a write encodes or fsyncs. Reads take the live version's lock for their
few milliseconds; writes take it only around each chunk of index upserts or online-store pushes
(flows/serving/items.py, `_record`), so reads go on between the chunks; a wait for a lock longer
than serve.lock_wait_s is a 503 with Retry-After. `towerflow serve-api` runs this app in a writer
process and N reader processes (flows/serving/workers.py); a reader's app (`writer` given) hands
the writes to the writer (flows/serving/writer.py) and keeps its own copy of the index.

Bad input is the caller's mistake, never a 500: shape errors are 400 naming the field, domain
errors map to 4xx (422 data that does not fit, 404 unknown item, 409 existing item, 413 too
large) with `{"error": "..."}`; messages carry no absolute paths, secrets or exception text.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from flows.errors import EXPECTED_ERRORS, DataContractError
from flows.params import ServeParams, event_rules
from flows.serving import schemas as S
from flows.serving.events import EventLog, record_events, validate_events
from flows.serving.guard import BODY_KEY, Guard, Tokens, json_shape_error
from flows.serving.bodies import body_schema, json_body
from flows.serving.http_errors import RequestError, bug, domain_error, http_error, validation_error
from flows.serving.openapi import LiveOpenAPI
from flows.serving.index.base import parse_filter
from flows.serving.items import add_items, normalize_items, remove_items, sidecar_signature
from flows.serving.metrics import MetricsMiddleware, ServiceMetrics
from flows.serving.ids import parse_filter_json
from flows.serving.recommend import Answer, coerce_id
from flows.serving.rerank import RankerCache, rerank_answers
from flows.serving.state import LiveState, Served
from flows.serving.writer import WriterClient
from validation.params import EventRules

log = logging.getLogger("towerflow.serve")
DEFAULT_K = 20


@dataclass(frozen=True)
class ServiceConfig:
    serve: ServeParams
    history_length: int          # features.history_length: recent_items kept per pushed row
    event_rules: EventRules      # the contract's row rules for events (flows/params.event_rules)
    events_dir: Path             # serve.events_dir, absolute
    published_dir: Path
    ranker: RankerCache | None = None   # rerank=true: the relevance tower published in the served bundle
    root: Path | None = None     # the project: paths under it are shown relative in messages


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), default=str), status_code=status,
                    media_type="application/json", headers=headers)


# --- checks that depend on the live version or the config ----------------------------------------
def _k(value: int | None, max_k: int, name: str = "k") -> int:
    if value is None:
        return DEFAULT_K
    if not 1 <= value <= max_k:
        shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        raise RequestError(f"{name} must be between 1 and {max_k} (serve.max_k), got {shown}")
    return value


def _filter(value: Any, served: Served) -> dict[str, Any] | None:
    """A filter object (or its JSON text), checked against the index's fields before any work."""
    if isinstance(value, str):
        shape = json_shape_error(value.encode())
        if shape is not None:
            raise RequestError(f"filter: {shape.replace('the request body', 'the filter')}")
    value = parse_filter_json(value, "filter")
    if value is not None:
        parse_filter(value, served.rec.index.settings.fields)   # unknown fields, wrong types: BadQuery
    return value


def _rerank_depth(rerank: bool, depth: int | None, k: int, config: ServiceConfig) -> int | None:
    """With rerank=true: how many retrieved items the ranker re-orders (rerank_depth, default 100,
    at least k); None without."""
    if depth is not None:
        _k(depth, config.serve.max_k, "rerank_depth")      # checked without rerank too: the schema says so
    if not rerank:
        return None
    return max(k, _k(depth if depth is not None else min(100, config.serve.max_k), config.serve.max_k,
                     "rerank_depth"))


def _ranker(config: ServiceConfig, version: str) -> Any:
    if config.ranker is None:
        raise RequestError("rerank=true: this service has no ranker configured", 503)
    return config.ranker.get(version)


def _user_answer(answer: Answer) -> dict[str, Any]:
    user, cold, hits = answer
    return {"user_id": user, "cold_start": cold,
            "items": [{"item_id": item, "rank": rank, "score": round(score, 6)}
                      for rank, (item, score) in enumerate(hits, start=1)]}


# --- handlers: plain functions (FastAPI's thread pool) that find state, config, metrics on the app ---
def _ctx(request: Request) -> tuple[LiveState, ServiceConfig, ServiceMetrics]:
    app_state = request.app.state
    return app_state.live, app_state.config, app_state.metrics


def recommend_one(request: Request, q: Annotated[S.RecommendQuery, Query()]) -> Response:
    live, config, metrics = _ctx(request)
    k = _k(q.k, config.serve.max_k)
    depth = _rerank_depth(q.rerank, q.rerank_depth, k, config)
    with live.use(config.serve.lock_wait_s) as served:
        user = coerce_id(q.user_id, served.rec.schema["user_id_dtype"], "user_id")
        (answer,) = served.rec.answer([user], depth or k, q.exclude_seen, _filter(q.filter, served))
        version = served.version
    if depth:
        (answer,) = rerank_answers([answer], _ranker(config, version), k)
    metrics.served(int(answer[1]), 1)
    return _json({"version": version, **_user_answer(answer)})


def recommend_batch(request: Request, body: Annotated[S.RecommendBatch, Depends(json_body(S.RecommendBatch))]
                    ) -> Response:
    live, config, metrics = _ctx(request)
    if len(body.user_ids) > config.serve.max_batch:
        raise RequestError(f"batch of {len(body.user_ids)} users exceeds serve.max_batch "
                           f"({config.serve.max_batch})", 413)
    k = _k(body.k, config.serve.max_k)
    depth = _rerank_depth(body.rerank, body.rerank_depth, k, config)
    with live.use(config.serve.lock_wait_s) as served:
        dtype = served.rec.schema["user_id_dtype"]
        users = [coerce_id(u, dtype, f"user_ids[{i}]") for i, u in enumerate(body.user_ids)]
        answers = served.rec.answer(users, depth or k, body.exclude_seen, _filter(body.filter, served))
        version = served.version
    if depth:
        answers = rerank_answers(answers, _ranker(config, version), k)
    metrics.served(sum(a[1] for a in answers), len(answers))
    return _json({"version": version, "k": k, "results": [_user_answer(a) for a in answers]})


def similar(request: Request, q: Annotated[S.SimilarQuery, Query()]) -> Response:
    live, config, _ = _ctx(request)
    k = _k(q.k, config.serve.max_k)
    with live.use(config.serve.lock_wait_s) as served:
        item = coerce_id(q.item_id, served.rec.schema["item_id_dtype"], "item_id")
        if item not in served.known_items:
            raise RequestError(f"item_id {item!r} is not in the catalog of version {served.version}", 404)
        hits = served.rec.index.similar(item, k, filter=_filter(q.filter, served))
        version = served.version
    return _json({"version": version, "item_id": item, "items": _user_answer((item, False, hits))["items"]})


def _record(events: pd.DataFrame, live: LiveState, served: Served, config: ServiceConfig) -> Path:
    """Log the events and push them online through the version's own writer handle of the online
    store (its own SQLite connection: reads never wait for the push, only for SQLite's commit)."""
    return record_events(events, live.events_store(served), EventLog(config.events_dir, config.serve.lock_wait_s),
                         config.history_length)


def events(request: Request, body: Annotated[S.EventsBody, Depends(json_body(S.EventsBody))]) -> Response:
    live, config, metrics = _ctx(request)
    rows = [e.model_dump(exclude_unset=True) for e in body.events]
    if not rows:
        raise DataContractError("no events in the request")
    if len(rows) > config.serve.max_events:
        raise RequestError(f"{len(rows)} events exceed serve.max_events ({config.serve.max_events}); "
                           "send them in parts or use `towerflow events push FILE`", 413)
    with live.borrow() as served:
        valid = validate_events(pd.DataFrame(rows, dtype=object), served.rec.schema, served.known_items, "events",
                                config.event_rules)
        path = _record(valid, live, served, config)
    metrics.events.inc(len(valid))
    return _json({"accepted": len(valid), "users": int(valid["user_id"].nunique()), "log": path.name})


def items(request: Request, body: Annotated[S.ItemsBody, Depends(json_body(S.ItemsBody))]) -> Response:
    live, config, metrics = _ctx(request)
    rows = [i.model_dump(exclude_unset=True) for i in body.items]
    if len(rows) > config.serve.max_items:
        raise RequestError(f"{len(rows)} items exceed serve.max_items ({config.serve.max_items})", 413)
    with live.borrow() as served:
        new = normalize_items(pd.DataFrame(rows, dtype=object), served.rec.schema, "items")
        add_items(served.rec, config.published_dir, new, served.known_items, lock=served.lock,
                  wait_s=config.serve.lock_wait_s)
        served.sidecar = sidecar_signature(served.rec.bundle_dir)   # ours: the watcher need not sync it
        version = served.version
    metrics.items_added.inc(len(new))
    return _json({"added": len(new), "version": version, "item_ids": new["item_id"].tolist()})


def remove_item(request: Request, item_id: Annotated[str, PathParam(min_length=1, max_length=S.ID_MAX_CHARS)]
                ) -> Response:
    live, config, _ = _ctx(request)
    with live.borrow() as served:
        item = coerce_id(item_id, served.rec.schema["item_id_dtype"], "item_id")
        remove_items(served.rec, config.published_dir, [item], served.known_items, lock=served.lock,
                     wait_s=config.serve.lock_wait_s)
        served.sidecar = sidecar_signature(served.rec.bundle_dir)
        version = served.version
    return _json({"removed": item, "version": version})


# --- a reader process's writes: handed to the writer process (flows/serving/writer.py) -------------
def _forward(request: Request) -> Response:
    """Relay the checked request to the writer and its answer back. An accepted item addition or
    removal is applied to this process's index before the answer: a 200 means "recommendable here"."""
    live, _, metrics = _ctx(request)
    scope = request.scope
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
    relayed = request.app.state.writer.forward(scope["method"], path, scope.get(BODY_KEY, b""), headers)
    if relayed.status == 200:
        answer = json.loads(relayed.body)
        if scope["path"] == "/events":
            metrics.events.inc(answer.get("accepted", 0))
        else:
            metrics.items_added.inc(answer.get("added", 0))
            with live.borrow() as served:
                live.sync(served)
    return Response(relayed.body, relayed.status, headers=relayed.headers)


def forward_events(request: Request) -> Response:
    return _forward(request)


def forward_items(request: Request) -> Response:
    return _forward(request)


def forward_remove(request: Request, item_id: Annotated[str, PathParam(min_length=1, max_length=S.ID_MAX_CHARS)]
                   ) -> Response:
    return _forward(request)


FORWARDS = {events: forward_events, items: forward_items, remove_item: forward_remove}


async def healthz(request: Request) -> Response:
    live = request.app.state.live
    served = live.served
    body = {"status": "ok" if served else "loading", "version": served.version if served else None,
            "last_reload_error": live.last_error}
    return _json(body, 200 if served else 503)


def version(request: Request) -> Response:
    live, config, _ = _ctx(request)
    with live.use(config.serve.lock_wait_s) as served:
        meta = served.rec.meta
        return _json({"version": served.version, "backend": meta.get("backend"), "collection": meta.get("collection"),
                      "published_at": meta.get("created_at"), "model_digest": meta.get("model_digest"),
                      "previous": meta.get("previous"), "items": len(served.known_items),
                      "loaded_at": served.loaded_at, "reloads": live.reloads, "pid": os.getpid()})


async def prometheus(request: Request) -> Response:
    content, media = request.app.state.metrics.exposition()
    return Response(content, media_type=media)


def _route(method: str, path: str, handler: Any, model: Any = None, body: Any = None) -> tuple[str, str, Any, Any, Any]:
    return method, path, handler, model, body


ROUTES = [_route("GET", "/recommend", recommend_one, S.RecommendAnswer),
          _route("POST", "/recommend", recommend_batch, S.BatchAnswer, S.RecommendBatch),
          _route("GET", "/similar", similar, S.SimilarAnswer),
          _route("POST", "/events", events, S.EventsAnswer, S.EventsBody),
          _route("POST", "/items", items, S.ItemsAnswer, S.ItemsBody),
          _route("DELETE", "/items/{item_id}", remove_item, S.RemovedAnswer),
          _route("GET", "/healthz", healthz, S.Health),
          _route("GET", "/version", version, S.VersionInfo),
          _route("GET", "/metrics", prometheus)]


def create_app(state: LiveState, config: ServiceConfig, metrics: ServiceMetrics, tokens: Tokens = Tokens(),
               writer: WriterClient | None = None) -> FastAPI:
    """The FastAPI app over a started LiveState; its schema at /openapi.json (no docs UI). With
    `writer`, the writes are handed to that writer process (a reader process of serve-api)."""
    app = FastAPI(title="towerflow", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.live, app.state.config, app.state.metrics, app.state.writer = state, config, metrics, writer
    for method, path, handler, model, body in ROUTES:
        if writer is not None:
            handler = FORWARDS.get(handler, handler)
        # Handlers return their JSON themselves (no second validation pass on the hot path); the
        # models document the answers, and the schema fuzz test checks that they conform.
        app.add_api_route(path, handler, methods=[method], response_model=model, responses=S.ERRORS,
                          response_class=JSONResponse if model is not None else PlainTextResponse,
                          openapi_extra=body_schema(body) if body is not None else None)
    for domain in EXPECTED_ERRORS:   # ours and the libraries' domain errors: a JSON error, not a 500
        app.add_exception_handler(domain, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, bug)
    bodies = tuple(body for *_, body in ROUTES if body is not None)
    app.openapi = LiveOpenAPI(app, bodies)    # type: ignore[method-assign]
    relayed = frozenset((method, path) for method, path, handler, *_ in ROUTES
                        if writer is not None and handler in FORWARDS and method == "POST")
    methods: dict[str, set[str]] = {"/openapi.json": {"GET"}}
    for method, path, *_ in ROUTES:
        methods.setdefault(path, set()).add(method)
    app.add_middleware(Guard, tokens=tokens, allowed_hosts=config.serve.allowed_hosts,
                       max_body_bytes=config.serve.max_body_bytes, relayed=relayed,
                       methods={path: frozenset(m) for path, m in methods.items()})
    # outermost: refusals by the guard are counted and timed too
    endpoints = frozenset(route[1] for route in ROUTES) | {"/openapi.json"}
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=endpoints)
    return app


def build_service(params: Any, root: Path, env: dict[str, str] | None = None,
                  writer: WriterClient | None = None) -> tuple[FastAPI, LiveState]:
    """The app and its started state for a project (params.yaml's folder is `root`); tokens from
    `env` (the process environment by default). Without `writer` it answers everything itself
    (the writer process, and tests in one process); with one it is a reader process."""
    tokens = Tokens.from_env(os.environ if env is None else env)
    paths = params.paths.resolved(root)
    metrics = ServiceMetrics()

    def changed(served: Served) -> None:
        metrics.set_live(served.version, str(served.rec.meta.get("backend")))
        metrics.reloads.labels("ok").inc()

    state = LiveState(paths.published, paths.feast, paths.features, params.serve.reload_interval_s,
                      on_change=changed, reader=writer is not None)
    state.start()
    events_dir = params.serve.events_dir if params.serve.events_dir.is_absolute() else root / params.serve.events_dir
    config = ServiceConfig(params.serve, params.features.history_length,
                           event_rules(params.data, params.validate, params.serve),
                           events_dir, paths.published, RankerCache(paths.published), root=Path(root).resolve())
    return create_app(state, config, metrics, tokens, writer), state


def server_config(app: FastAPI, serve_params: ServeParams, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """uvicorn's settings for one process of the service (flows/serving/workers.py runs several)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_keep_alive=serve_params.keep_alive_s)
