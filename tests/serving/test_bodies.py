"""Request bodies are parsed in slices off the event loop (flows/serving/bodies.py): the answer is
the same as one whole validation, errors name the row's index in the whole body."""
from __future__ import annotations

import json

import pytest
from fastapi import Request
from fastapi.exceptions import RequestValidationError

from flows.serving.bodies import ROW_SLICE, json_body
from flows.serving.guard import BODY_KEY
from flows.serving.http_errors import validation_message
from flows.serving.schemas import EventsBody, ItemsBody


def parse(model, body) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json_body(model)(Request({"type": "http", BODY_KEY: raw}))


def refusal(model, body) -> str:
    with pytest.raises(RequestValidationError) as caught:
        parse(model, body)
    return validation_message(list(caught.value.errors()))


def test_large_bodies_are_validated_in_slices_with_the_whole_body_s_indices() -> None:
    n = ROW_SLICE * 2 + 17
    events = [{"user_id": i, "item_id": i % 7, "timestamp": 1700000000 + i} for i in range(n)]
    parsed = parse(EventsBody, {"events": events})
    assert [e.model_dump(exclude_unset=True) for e in parsed.events] == events
    assert len(parse(EventsBody, events).events) == n            # a bare list, as earlier clients send
    late = ROW_SLICE * 2 + 3
    events[late]["item_id"] = True
    assert refusal(EventsBody, {"events": events}).startswith(f"events[{late}].item_id: True is not an id")
    items = [{"item_id": i, "genres": ["a"]} for i in range(n)]
    items[n - 1]["genres"] = "x" * 2000
    assert refusal(ItemsBody, {"items": items}) == f"items[{n - 1}].genres: String should have at most 1024 characters"


def test_small_and_malformed_bodies() -> None:
    assert parse(EventsBody, {"user_id": 1, "item_id": 2}).events[0].item_id == 2      # one object
    assert refusal(EventsBody, b"") == "the request body is missing"
    assert refusal(EventsBody, b'{"events": [') .startswith("the request body is not valid JSON (Expecting value")
    assert refusal(EventsBody, {"events": [], "more": 1}) == "unknown field 'more'"
