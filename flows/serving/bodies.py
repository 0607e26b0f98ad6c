"""Request bodies parsed into their pydantic models in FastAPI's thread pool, a slice at a time.

FastAPI parses a body parameter on the event loop, and pydantic validates a body in one call that
holds the GIL throughout: for 10,000 events that is 50-170 ms during which nothing else in the
process runs, /healthz included. Here the body (read and checked by flows/serving/guard.py) is
parsed by a plain-function dependency, which FastAPI runs in its thread pool, and the rows of a
write body are validated ROW_SLICE at a time, letting other threads run in between. Errors keep
the row's index in the body (`events[4321].item_id: ...`).
"""
from __future__ import annotations

import json
import time
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError

from flows.serving.guard import BODY_KEY
from flows.serving.schemas import rows_of

ROW_SLICE = 250


def _invalid(errors: list[dict[str, Any]], *prefix: Any) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *prefix, *e["loc"])} for e in errors])


def _rows(model: type[BaseModel], data: Any) -> Any:
    """data with the rows of `model.rows_key` validated slice by slice (models without one: as is)."""
    key = getattr(model, "rows_key", None)
    if key is None:
        return data
    data = rows_of(key, data)
    rows = data.get(key) if isinstance(data, dict) else None
    if not isinstance(rows, list) or len(rows) <= ROW_SLICE:
        return data
    row_type = model.model_fields[key].annotation.__args__[0]      # list[Event] -> Event
    adapter = TypeAdapter(list[row_type])
    done: list[Any] = []
    for start in range(0, len(rows), ROW_SLICE):
        try:
            done += adapter.validate_python(rows[start:start + ROW_SLICE])
        except ValidationError as exc:
            errors = [{**e, "loc": (start + e["loc"][0], *e["loc"][1:])} for e in exc.errors()]
            raise _invalid(errors, key) from None
        time.sleep(0)     # let the event loop and the reads take the GIL between slices
    return {**data, key: done}


def json_body(model: type[BaseModel]) -> Any:
    """A dependency parsing the checked request body into `model` (document the route's body with
    `body_schema(model)`)."""
    def parse(request: Request) -> BaseModel:
        raw = request.scope.get(BODY_KEY, b"")
        if not raw.strip():
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                           "ctx": {"error": where}}]) from None
        try:
            return model.model_validate(_rows(model, data))
        except ValidationError as exc:
            raise _invalid(exc.errors()) from None
    parse.__name__ = f"parse_{model.__name__}"
    return parse


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route whose body `json_body(model)` parses."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
