"""/openapi.json describes what the live version and the config accept, so that a request the
schema calls valid is answered and one it calls invalid is refused (what a schema fuzzer such as
`st run` checks); a method a path does not serve is answered 405 with `Allow`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flows.int64 import INT64_MAX, INT64_MIN
from flows.serving.items import item_kinds
from flows.serving.openapi import id_schema
from tests.serving.test_api import Service, known_users, running, service  # noqa: F401 (the fixture)

TOKEN = "openapi-token-0123456789abcdef"


def test_a_method_a_path_does_not_serve_is_405_naming_the_ones_it_does(project: Path) -> None:
    with running(project, env={"TOWERFLOW_API_TOKEN": TOKEN}) as svc:
        for method, path, allow in (("OPTIONS", "/recommend", "GET, HEAD, POST"),
                                    ("DELETE", "/recommend", "GET, HEAD, POST"), ("PUT", "/healthz", "GET, HEAD"),
                                    ("PUT", "/items/5", "DELETE"), ("GET", "/items/5", "DELETE"),
                                    ("POST", "/openapi.json", "GET, HEAD")):
            # no token and no body: the method is answered before either is looked at
            r = svc.client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.status_code, r.text)
            assert r.json()["error"] == f"{method} is not served at {path} (Allow: {allow})"
        assert svc.client.get("/nowhere").status_code == 404
        assert svc.client.get("/healthz").status_code == 200
        # HEAD wherever GET: the GET's status and headers, no body (a load balancer's probe)
        head, get = svc.client.head("/healthz"), svc.client.get("/healthz")
        assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "application/json"
        assert head.headers["content-length"] == get.headers["content-length"]
        assert svc.client.head("/recommend", params={"user_id": "abc"}).status_code == 422


def test_the_schema_holds_the_live_versions_ids_filter_fields_features_and_limits(service: Service) -> None:
    rec = service.state.served.rec
    doc = service.get("/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"]["/recommend"]["get"]["parameters"]}
    assert params["user_id"]["schema"] == {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}
    assert params["k"]["schema"]["maximum"] == params["rerank_depth"]["schema"]["maximum"] == 50   # serve.max_k
    filters = params["filter"]["content"]["application/json"]["schema"]
    assert set(filters["properties"]) == set(rec.index.settings.fields) and filters["additionalProperties"] is False
    similar = {p["name"]: p for p in doc["paths"]["/similar"]["get"]["parameters"]}
    assert similar["item_id"]["schema"] == id_schema("int64") and "content" in similar["filter"]
    models = doc["components"]["schemas"]
    assert models["RecommendBatch"]["properties"]["user_ids"]["maxItems"] == 5         # serve.max_batch
    assert models["EventsBody"]["properties"]["events"]["maxItems"] == 3               # serve.max_events
    event = models["Event"]
    assert event["required"] == ["user_id", "item_id"] and event["additionalProperties"] is False
    assert event["properties"]["rating"]["anyOf"][0] == {"type": "number", "minimum": 1.0, "maximum": 5.0}
    item = models["Item"]
    assert set(item["properties"]) == {"item_id", *item_kinds(rec.schema)} and item["additionalProperties"] is False
    assert id_schema("string")["anyOf"][0] == {"type": "string", "minLength": 1, "maxLength": 256}

    # what the schema allows is answered: a JSON integer written 3.0, a filter of its grammar
    user = known_users(service.root, 1)[0]
    field, kind = next(iter(rec.index.settings.fields.items()))
    value = {"gte": 0} if kind == "float" else (1 if kind == "integer" else "x")
    r = service.post("/recommend", {"user_ids": [float(user)], "k": 3.0, "filter": {field: value}})
    assert r.status_code == 200 and r.json()["results"][0]["user_id"] == user, r.text
    # and what it refuses is refused: a depth beyond serve.max_k even without rerank, a rating of true
    r = service.post("/recommend", {"user_ids": [user, ""]})        # minLength 1 for a text id too
    assert r.status_code == 400 and "user_ids[1]: an empty id" in r.json()["error"], r.text
    r = service.post("/recommend", {"user_ids": [user], "rerank_depth": 51})
    assert r.status_code == 400 and "rerank_depth must be between 1 and 50" in r.json()["error"]
    r = service.post("/events", {"events": [{"user_id": user, "item_id": 1, "rating": True}]})
    assert r.status_code == 400 and "rating" in r.json()["error"]


def test_an_item_far_outside_the_catalogs_ranges_gets_a_finite_vector(service: Service) -> None:
    """A numeric feature of 1e300 (standardized, then clipped: models/encoding.py) gave the item tower
    inf, a NaN vector and a 5xx before."""
    rec = service.state.served.rec
    numeric = rec.schema["item_features"]["numeric"][0]
    r = service.post("/items", {"items": [{"item_id": 8001, numeric: 1e300}, {"item_id": 8002, numeric: -1e300}]})
    assert r.status_code == 200, r.text
    hits = service.get("/similar", item_id=8001, k=3).json()["items"]
    assert len(hits) == 3 and all(np.isfinite(h["score"]) for h in hits)
