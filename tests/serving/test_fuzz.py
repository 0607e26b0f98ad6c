"""Property-based fuzzing of the real service from its own /openapi.json (schemathesis): for every
operation, requests generated from the schema (valid ones and, for bodies, mutated ones) are
answered without a 5xx, and every answer conforms to the schema documented for its status; a
request the schema calls valid is answered, not refused with a 400 or 422 (the schema holds the
live version's rules: flows/serving/openapi.py), but for POST /events, whose items must be in the
live catalog (a rule a schema cannot state for a catalog of any size).

The service runs with a write token, sent by the fuzzer, so the writes (POST /events, POST /items,
DELETE /items/{id}) are exercised too, on a private copy of the tiny project.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (dev extra) is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, positive_data_acceptance, response_schema_conformance, status_code_conformance)

from tests.serving.test_api import running  # noqa: E402

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = 25      # per operation: ~250 requests, well under a minute on 2 cores


def _fuzz(operation: Any, base_url: str) -> None:
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    if f"{operation.method.upper()} {operation.path}" != "POST /events":
        checks.append(positive_data_acceptance)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks)
    run()


def test_every_operation_survives_schema_fuzzing(project: Path) -> None:
    with running(project, env={"TOWERFLOW_API_TOKEN": TOKEN}) as svc:
        schema = schemathesis.openapi.from_url(f"{svc.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "GET /recommend", "POST /recommend", "GET /similar", "POST /events", "POST /items",
            "DELETE /items/{item_id}", "GET /healthz", "GET /version"}
        failures = []
        for operation in operations:
            try:
                _fuzz(operation, svc.url)
            except Exception as exc:   # collect every operation's first failure, then report them all
                failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
        assert not failures, "\n\n".join(failures)
        counts = svc.get("/metrics").text
        assert 'status="500"' not in counts
        sent = sum(float(line.rsplit(" ", 1)[1]) for line in counts.splitlines()
                   if line.startswith("towerflow_requests_total{"))
        assert sent >= len(operations) * EXAMPLES / 2, sent      # the fuzzer really sent them
