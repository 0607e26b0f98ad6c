"""Prometheus metrics of the HTTP service (prometheus-client), exposed at GET /metrics.

Each app gets its own CollectorRegistry (not the library's global one) with in-process values, so
tests and benchmarks that start several apps in one process neither register twice nor share counts
(importing feast turns prometheus-client's file-backed multiprocess mode on: see ServiceMetrics).
Cold-start share = rate of
`towerflow_users_served_total{cold_start="true"}` over all users served; it is also kept as a
gauge since the service started, for a quick look without PromQL.
"""
from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.gc_collector import GCCollector

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# Warm requests take ~1-10 ms; a batch or a reload spike, up to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """The service's counters, histogram and gauges in one registry."""

    def __init__(self) -> None:
        # One registry per process: with serve-api --workers N, each reader counts its own requests
        # (README: a scrape sees the reader that answers it). Importing feast sets PROMETHEUS_MULTIPROC_DIR, and
        # prometheus-client then keeps every counter in a per-process file keyed by name and labels:
        # two apps of one process (tests, benchmarks) would read each other's counts when a labelled
        # child is created. In-process values keep each app's registry its own.
        prometheus_values.ValueClass = prometheus_values.MutexValue
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("towerflow_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("towerflow_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.users = Counter("towerflow_users_served", "users answered by /recommend", ["cold_start"], registry=r)
        self.cold_share = Gauge("towerflow_cold_start_share", "share of users answered with the cold-start path "
                                "since the service started", registry=r)
        self.events = Counter("towerflow_events", "interactions accepted by POST /events", registry=r)
        self.items_added = Counter("towerflow_items_added", "items added by POST /items", registry=r)
        self.reloads = Counter("towerflow_reloads", "live version changes picked up", ["result"], registry=r)
        self.live = Gauge("towerflow_live_info", "the version being served (value 1)", ["version", "backend"],
                          registry=r)
        # the collector's passes per generation (python_gc_*), and what the process froze out of its
        # sight after its imports (flows/serving/workers.py SERVICE_LIBRARIES): a full pass stalls
        # every request of the process
        GCCollector(registry=r)
        Gauge("towerflow_gc_frozen_objects", "objects the garbage collector no longer scans (gc.freeze)",
              registry=r).set_function(gc.get_freeze_count)
        self._served = [0, 0]   # [cold, all]: the gauge without reading the counters back
        self._live: tuple[str, str] | None = None

    def served(self, cold: int, total: int) -> None:
        if cold:
            self.users.labels("true").inc(cold)
        if total - cold:
            self.users.labels("false").inc(total - cold)
        self._served[0] += cold
        self._served[1] += total
        if self._served[1]:
            self.cold_share.set(self._served[0] / self._served[1])

    def set_live(self, version: str, backend: str) -> None:
        if self._live is not None:
            with warnings.catch_warnings():   # importing feast turns prometheus-client's multiprocess mode on
                warnings.simplefilter("ignore", UserWarning)
                self.live.remove(*self._live)
        self._live = (version, backend)
        self.live.labels(version, backend).set(1)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): counts and times every request by
    its route template; paths that match no route are one label, `other`, so a scan of random
    URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        status = [500]
        t0 = time.perf_counter()

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
