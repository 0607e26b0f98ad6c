"""The HTTP service's request and response models: validation, /openapi.json and client code come
from these one declarations (FastAPI's convention).

Shapes and bounds are checked here (400, naming the field); what depends on the live version (an
id's dtype, k up to serve.max_k, items of the catalog, the contract's rules for events) is checked
by the handlers and the serving modules (4xx, naming the field too). Lengths are bounded so that no
value can make the service work long: ids 256 characters, feature text 1,024, a filter 4,096.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, StrictBool, StrictFloat,
                      StrictInt, WithJsonSchema, model_validator)
from pydantic_core import PydanticCustomError

ID_MAX_CHARS = 256
TEXT_MAX_CHARS = 1024
LIST_MAX_VALUES = 1000
FILTER_MAX_CHARS = 4096
ROWS_CEILING = 1_000_000     # rows per write body; serve.max_events / max_items are the real caps


def _integral(value: Any) -> Any:
    """5.0 is the integer 5 (JSON Schema's `integer` takes it); 5.5, true and "5" stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _id(value: Any) -> int | str:
    value = _integral(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("id", "{value} is not an id (an integer, or text of at most {n} characters)",
                                  {"value": repr(value)[:80], "n": ID_MAX_CHARS})
    if value == "":
        raise PydanticCustomError("id_empty", "an empty id", {})
    if isinstance(value, str) and len(value) > ID_MAX_CHARS:
        raise PydanticCustomError("id_length", "an id of {length} characters; ids have at most {n}",
                                  {"length": len(value), "n": ID_MAX_CHARS})
    return value


# int64 or text: which one the live schema wants is checked by the handler (coerce_id, 422).
Id = Annotated[int | str, PlainValidator(_id), WithJsonSchema(
    {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": ID_MAX_CHARS}]})]
IdText = Annotated[str, Field(min_length=1, max_length=ID_MAX_CHARS)]
K = Annotated[StrictInt, BeforeValidator(_integral), Field(ge=1)]
Filter = Annotated[str, Field(max_length=FILTER_MAX_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ------------------------------------------------------------------------------------
class RecommendQuery(Strict):
    """GET /recommend: one user."""

    user_id: IdText
    k: Annotated[int, Field(ge=1)] | None = None      # up to serve.max_k: the handler says so
    exclude_seen: bool = True
    filter: Filter | None = Field(None, description='JSON object, e.g. {"genres": "Comedy", "year": {"gte": 1990}}')
    rerank: bool = False
    rerank_depth: Annotated[int, Field(ge=1)] | None = None


class SimilarQuery(Strict):
    """GET /similar: items near an indexed item."""

    item_id: IdText
    k: Annotated[int, Field(ge=1)] | None = None
    filter: Filter | None = None


class RecommendBatch(Strict):
    """POST /recommend: many users (at most serve.max_batch)."""

    user_ids: list[Id] = Field(min_length=1, max_length=ROWS_CEILING)
    k: K | None = None
    exclude_seen: StrictBool = True
    filter: dict[str, Any] | Filter | None = None
    rerank: StrictBool = False
    rerank_depth: K | None = None


def rows_of(key: str, data: Any) -> Any:
    """`{key: [...]}` as documented; a bare list or one object are taken too (earlier clients)."""
    if isinstance(data, list):
        return {key: data}
    if isinstance(data, dict) and key not in data:
        return {key: [data]}
    return data


class Event(BaseModel):
    """One interaction. Deliberately loose: the contract's rules for events (flows/serving/events.py)
    decide what is accepted and answer 422 naming the row and the field."""

    model_config = ConfigDict(extra="allow")
    user_id: Id | None = None
    item_id: Id | None = None
    timestamp: Annotated[str, Field(max_length=64)] | int | float | None = Field(
        None, description="ISO 8601 or unix seconds; the server's time when absent")
    weight: StrictFloat | None = None    # a number (an int too), never true or "4.5"
    rating: StrictFloat | None = None


class EventsBody(Strict):
    """POST /events (at most serve.max_events)."""

    rows_key: ClassVar[str] = "events"

    events: list[Event] = Field(max_length=ROWS_CEILING)

    @model_validator(mode="before")
    @classmethod
    def wrap_rows(cls, data: Any) -> Any:
        return rows_of("events", data)


# Strict numbers: a lax float would take a 5,000-character string of digits as 0.0, past the text bound.
FeatureValue = (Annotated[str, Field(max_length=TEXT_MAX_CHARS)] | StrictFloat | StrictInt | StrictBool | None |
                Annotated[list[Annotated[str, Field(max_length=TEXT_MAX_CHARS)] | StrictFloat | StrictInt | None],
                          Field(max_length=LIST_MAX_VALUES)])


class Item(BaseModel):
    """A new catalog item: item_id plus the live model's item feature columns (schema.json)."""

    model_config = ConfigDict(extra="allow")
    item_id: Id | None = None
    __pydantic_extra__: dict[str, FeatureValue] = Field(init=False)  # type: ignore[assignment]


class ItemsBody(Strict):
    """POST /items (at most serve.max_items)."""

    rows_key: ClassVar[str] = "items"

    items: list[Item] = Field(max_length=ROWS_CEILING)

    @model_validator(mode="before")
    @classmethod
    def wrap_rows(cls, data: Any) -> Any:
        return rows_of("items", data)


# --- responses -----------------------------------------------------------------------------------
class Hit(BaseModel):
    item_id: int | str
    rank: int
    score: float


class UserAnswer(BaseModel):
    user_id: int | str
    cold_start: bool
    items: list[Hit]


class RecommendAnswer(UserAnswer):
    version: str


class BatchAnswer(BaseModel):
    version: str
    k: int
    results: list[UserAnswer]


class SimilarAnswer(BaseModel):
    version: str
    item_id: int | str
    items: list[Hit]


class EventsAnswer(BaseModel):
    accepted: int
    users: int
    log: str = Field(description="the log file's name in serve.events_dir")


class ItemsAnswer(BaseModel):
    added: int
    version: str
    item_ids: list[int | str]


class RemovedAnswer(BaseModel):
    removed: int | str
    version: str


class Health(BaseModel):
    status: Literal["ok", "loading"]
    version: str | None
    last_reload_error: str | None


class VersionInfo(BaseModel):
    version: str
    backend: str | None
    collection: str | None
    published_at: str | None
    model_digest: str | None
    previous: str | None
    items: int
    loaded_at: str
    reloads: int
    pid: int            # the process that answered (serve-api --workers N: one of N)


class ErrorBody(BaseModel):
    error: str


ERROR_STATUSES = {400: "bad request", 401: "missing or wrong bearer token", 404: "unknown item",
                  409: "the item exists", 413: "too large", 415: "not application/json",
                  422: "data or rerank=true that the live version cannot serve", 503: "loading or busy: retry"}
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody, "description": d} for s, d in ERROR_STATUSES.items()}
