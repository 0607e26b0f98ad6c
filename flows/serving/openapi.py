"""/openapi.json: the routes' schema, made exact for the live version and the service's config.

The request models (flows/serving/schemas.py) hold what never changes: shapes, lengths. What a
request must also meet depends on the live version and on params.yaml: the ids' type (int64 or
text), k up to serve.max_k, batches up to serve.max_batch / max_events / max_items, the filterable
fields of the index and their kinds, the item feature columns, an event's rating and timestamp
rules. The handlers check those (4xx naming the field); this module writes the same rules into the
schema a client (or a schema fuzzer) reads, so that a request the schema calls valid is answered,
and one it calls invalid is refused. What a schema cannot say stays the handlers' alone: an event's
item must be in the live catalog, an item to add must not be there yet (409), ids unique in a body.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from flows.int64 import INT64_MAX, INT64_MIN
from flows.params import ServeParams
from flows.serving.guard import OPEN_PATHS
from flows.serving.index.base import RANGE_KEYS
from flows.serving.items import item_kinds
from flows.serving.schemas import ID_MAX_CHARS, LIST_MAX_VALUES, TEXT_MAX_CHARS
from validation.params import EventRules

INT64 = {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
NUMBER = {"type": "number"}


def route_schema(app: FastAPI, bodies: tuple[type[BaseModel], ...] = ()) -> dict[str, Any]:
    """The schema FastAPI generates from the routes, plus the request body models (parsed by the
    handlers, flows/serving/api.py json_body) and the bearer token scheme on every path but the
    open ones."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    for model in bodies:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.setdefault("schemas", {}).update(body.pop("$defs", {}))
        components["schemas"][model.__name__] = body
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "TOWERFLOW_API_TOKEN for writes; TOWERFLOW_READ_TOKEN (if set) for reads"}}
    for path, operations in schema.get("paths", {}).items():
        if path not in OPEN_PATHS:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {}]    # {}: none needed when no token is set
    return schema


def id_schema(dtype: str) -> dict[str, Any]:
    """A user or item id of the live version: int64, or text (an integer is taken as its text,
    flows/sources/normalize.py coerce_id)."""
    if dtype == "int64":
        return dict(INT64)
    return {"anyOf": [{"type": "string", "minLength": 1, "maxLength": ID_MAX_CHARS}, {"type": "integer"}]}


def _one_or_many(one: dict[str, Any], most: int = LIST_MAX_VALUES) -> list[dict[str, Any]]:
    return [one, {"type": "array", "items": one, "minItems": 1, "maxItems": most}]


def filter_schema(fields: Mapping[str, str]) -> dict[str, Any]:
    """The filter grammar of flows/serving/index/base.py parse_filter over the index's fields: a
    keyword field takes a string or a list of them, an integer field an integer, a list of them or
    a range, a float field one number or a range."""
    bounds = {"type": "object", "properties": {key: NUMBER for key in RANGE_KEYS},
              "additionalProperties": False, "minProperties": 1}
    properties: dict[str, Any] = {}
    for name, kind in fields.items():
        if kind == "keyword":
            properties[name] = {"anyOf": _one_or_many({"type": "string"})}
        elif kind == "integer":
            properties[name] = {"anyOf": [*_one_or_many(INT64), bounds]}
        else:
            properties[name] = {"anyOf": [*_one_or_many(NUMBER, 1), bounds]}
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "description": 'all must hold; e.g. {"genres": "Comedy", "year": {"gte": 1990}}'}


def _feature_schema(kind: str) -> dict[str, Any]:
    """An item feature value as POST /items takes it (flows/serving/items.py _feature)."""
    if kind == "numeric":
        return {"anyOf": [NUMBER, {"type": "null"}]}
    if kind == "multi":
        # a null value in the list is left out
        value = {"anyOf": [{"type": "string", "maxLength": TEXT_MAX_CHARS}, NUMBER, {"type": "null"}]}
        return {"anyOf": [{"type": "array", "items": value, "maxItems": LIST_MAX_VALUES},
                          {"type": "string", "maxLength": TEXT_MAX_CHARS,
                           "description": "values joined by '|', as in a CSV file"}, {"type": "null"}]}
    return {"anyOf": [{"type": "string", "maxLength": TEXT_MAX_CHARS}, NUMBER, {"type": "boolean"},
                      {"type": "null"}]}


def _event_schema(schema: Mapping[str, Any], rules: EventRules, now: datetime) -> dict[str, Any]:
    floor = rules.validate.timestamp_floor.timestamp()
    properties: dict[str, Any] = {
        "user_id": id_schema(schema["user_id_dtype"]),
        "item_id": {**id_schema(schema["item_id_dtype"]), "description": "an item of the live catalog"},
        # unix seconds up to the time this schema was written: later ones are refused as in the future
        # once the clock skew serve.future_tolerance_s is spent; ISO 8601 text is taken too
        "timestamp": {"anyOf": [{"type": "number", "minimum": floor, "maximum": now.timestamp()},
                                {"type": "null"}],
                      "description": "unix seconds (ISO 8601 text is accepted too); the server's time "
                                     "when absent"},
        "weight": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}],
                   "description": "1.0 when absent"},
    }
    required = ["user_id", "item_id"]
    if schema.get("has_rating"):
        rating: dict[str, Any] = dict(NUMBER)
        if rules.validate.rating_range is not None:
            rating["minimum"], rating["maximum"] = rules.validate.rating_range
        if rules.rating_fill is None:
            required.append("rating")
            properties["rating"] = rating
        else:
            properties["rating"] = {"anyOf": [rating, {"type": "null"}],
                                    "description": f"{rules.rating_fill} when absent (data.event_rating)"}
    else:
        properties["rating"] = {"anyOf": [NUMBER, {"type": "null"}],
                                "description": "ignored: the source has no ratings"}
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _item_schema(schema: dict[str, Any]) -> dict[str, Any]:
    properties = {"item_id": id_schema(schema["item_id_dtype"]),
                  **{column: _feature_schema(kind) for column, kind in item_kinds(schema).items()}}
    return {"type": "object", "properties": properties, "required": ["item_id"], "additionalProperties": False,
            "description": "item_id + the live model's item feature columns (a column left out is missing)"}


def _parameters(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation.get("parameters", [])}


def live_schema(routes: dict[str, Any], schema: Mapping[str, Any], fields: Mapping[str, str], ranker: bool,
                serve: ServeParams, rules: EventRules, now: datetime) -> dict[str, Any]:
    """`routes` (route_schema's) with the live version's and the config's rules written in (see the
    module doc). `schema`: the live version's schema.json; `fields`: its index's filterable fields;
    `ranker`: whether it was published with a ranker (`rerank=true` needs one)."""
    out = copy.deepcopy(routes)
    paths, models = out["paths"], out["components"]["schemas"]
    user_id, item_id = id_schema(schema["user_id_dtype"]), id_schema(schema["item_id_dtype"])
    k = {"type": "integer", "minimum": 1, "maximum": serve.max_k}
    rerank = {"type": "boolean", "default": False} if ranker else \
        {"type": "boolean", "enum": [False], "default": False, "description": "this version has no ranker"}
    filters = filter_schema(fields)
    for path, id_name, id_value in (("/recommend", "user_id", user_id), ("/similar", "item_id", item_id)):
        parameters = _parameters(paths[path]["get"])
        parameters[id_name]["schema"] = id_value
        for name in ("k", "rerank_depth"):
            if name in parameters:
                parameters[name]["schema"] = k
        if "rerank" in parameters:
            parameters["rerank"]["schema"] = rerank
        # a JSON object in the query string: `content` (OpenAPI 3) says how it is encoded
        parameters["filter"].pop("schema")
        parameters["filter"]["content"] = {"application/json": {"schema": filters}}
    _parameters(paths["/items/{item_id}"]["delete"])["item_id"]["schema"] = item_id

    batch = models["RecommendBatch"]["properties"]
    batch["user_ids"] = {"type": "array", "items": user_id, "minItems": 1, "maxItems": serve.max_batch}
    batch["k"] = batch["rerank_depth"] = {"anyOf": [k, {"type": "null"}]}
    batch["rerank"] = rerank
    batch["filter"] = {"anyOf": [filters, {"type": "null"}]}
    models["Event"] = _event_schema(schema, rules, now)
    models["EventsBody"]["properties"]["events"].update(minItems=1, maxItems=serve.max_events)
    models["Item"] = _item_schema(schema)
    models["ItemsBody"]["properties"]["items"].update(minItems=1, maxItems=serve.max_items)
    return out


class LiveOpenAPI:
    """`app.openapi` of the service: route_schema once, live_schema once per live version."""

    def __init__(self, app: FastAPI, bodies: tuple[type[BaseModel], ...]):
        self.app, self.bodies = app, bodies
        self._routes: dict[str, Any] | None = None
        self._cached: tuple[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        state = self.app.state
        served = state.live.served
        with self._lock:
            if self._routes is None:
                self._routes = route_schema(self.app, self.bodies)
            if served is None:            # still loading: the routes' schema alone
                return self._routes
            if self._cached is None or self._cached[0] != served.version:
                config = state.config
                ranker = config.ranker is not None and config.ranker.published(served.version)
                live = live_schema(self._routes, served.rec.schema, served.rec.index.settings.fields, ranker,
                                   config.serve, config.event_rules, datetime.now(timezone.utc))
                self._cached = (served.version, live)
            return self._cached[1]
