"""How the HTTP service answers a refusal: `{"error": "..."}` with a 4xx naming the problem.

One place maps errors to answers, as the CLI's error handler does for the terminal: domain errors
to their status, pydantic's validation errors to a 400 naming the field (`user_ids[1]: ...`),
Starlette's own (unknown route, method) to theirs, and anything else to a 500 that names no
internals (the traceback goes to the service log). Every message goes through `public_message`:
no secret from a URL, no absolute path.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from features.errors import FeatureError
from flows.errors import EXPECTED_ERRORS, DataContractError, LockBusy, TowerflowError
from flows.serving.guard import public_message
from flows.serving.index import BadQuery
from flows.serving.items import ItemExists, RepeatedItem, UnknownItem
from flows.serving.rerank import NoRanker
from flows.serving.store import NothingPublished
from models.errors import ModelInputError
from validation.errors import ValidationFailed

log = logging.getLogger("towerflow.serve")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class RequestError(TowerflowError):
    """A request the service refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def status_of(exc: Exception) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, (ItemExists, RepeatedItem)):
        return 409
    if isinstance(exc, UnknownItem):
        return 404
    if isinstance(exc, (DataContractError, NoRanker)):
        return 422          # asked of the live version what it does not hold: retrying will not help
    if isinstance(exc, BadQuery):
        return 404 if "is not in the index" in str(exc) else 400
    if isinstance(exc, (NothingPublished, LockBusy)):
        return 503
    if isinstance(exc, (ModelInputError, FeatureError, ValidationFailed)):
        return 422          # the libraries' domain errors: the request's data did not fit
    return 503 if isinstance(exc, EXPECTED_ERRORS) else 500


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def _root(request: Request) -> Any:
    config = getattr(request.app.state, "config", None)
    return getattr(config, "root", None)


async def domain_error(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": f"{max(1, round(getattr(exc, 'retry_after_s', 1)))}"} if status == 503 else None
    return error_response(public_message(str(exc), _root(request)), status, headers)


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None)
    message = detail if isinstance(detail, str) else "request refused"
    if status == 400 and message == "There was an error parsing the body":   # FastAPI's own, for a ValueError
        message = "the request body could not be parsed as JSON"
    return error_response(public_message(message), status, getattr(exc, "headers", None))


async def bug(request: Request, exc: Exception) -> Response:
    # The caller gets no internals: the traceback goes to the log.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(f"internal error ({type(exc).__name__}); see the service log", 500)


def _is_tag(part: Any) -> bool:
    """pydantic names the union member a value failed in the error's location ('constrained-str',
    'function-plain[_id()]'): not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("constrained-"))


def field_path(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        if _is_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: list[dict[str, Any]]) -> str:
    """The first error as one line naming the field."""
    first = errors[0] if errors else {}
    loc = list(first.get("loc", ()))
    where = loc.pop(0) if loc and loc[0] in ("body", "query", "path") else None
    field, kind = field_path(loc), first.get("type", "")
    noun = "query parameter" if where == "query" else ("path parameter" if where == "path" else "field")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    if kind == "extra_forbidden":
        return f"unknown {noun} '{field}'"
    if not field and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object"
    if kind == "missing":
        return f"missing {noun} '{field}'" if field else "the request body is missing"
    return f"{field or 'the request body'}: {first.get('msg', 'invalid')}"


async def validation_error(request: Request, exc: Exception) -> Response:
    errors = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    return error_response(public_message(validation_message(errors)), 400)


