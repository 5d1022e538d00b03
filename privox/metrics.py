"""
Prometheus series, and the plain HTTP port that serves them.

Every daemon keeps its series in its own L{CollectorRegistry} (never
prometheus_client's global one), handed to the parts that count: the API's
requests (L{ApiMetrics}), the node's engine time (L{NodeMetrics}), the
farm's jobs and load (L{privox.farm.observe}). Series are named
C{privox_*}. Labels never carry keys, addresses, job ids or content, and
their values come from bounded sets: routes, statuses, services, outcomes,
and model names that producers advertised (anything else is C{"other"}).

The farm's and the node's C{--metrics-listen} port (L{metricsSite}) renders
on the reactor thread: a farm's collectors read its live dispatchers, which
prometheus_client's own Twisted resource (a WSGI app in the thread pool)
would read from another thread.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource

from privox.web import PrivateSite

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CollectorRegistry",
    "OTHER",
    "ApiMetrics",
    "NodeMetrics",
    "MetricsResource",
    "metricsSite",
    "render",
]

#: The label value of anything outside a bounded set.
OTHER = "other"
#: At most this many distinct model labels per service (then L{OTHER}).
MAX_MODELS = 100

#: Latency buckets in seconds: a job or request from milliseconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

def render(registry: CollectorRegistry) -> bytes:
    """
    The registry in Prometheus' text format.
    """
    return generate_latest(registry)


# -- the API and nodes -------------------------------------------------------------


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "privox_api_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "privox_api_request_seconds",
            "Time to answer a request, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(max(0.0, seconds))


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.engine = Histogram(
            "privox_node_engine_seconds",
            "Time the engines worked on one job, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def engineTime(self, model: str, seconds: float) -> None:
        self.engine.labels(model).observe(max(0.0, seconds))


# -- a plain twisted.web endpoint (the farm's and the node's --metrics-listen) -----


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, contentType: bytes, body: Callable[[Any], bytes]) -> None:
        super().__init__()
        self._contentType = contentType
        self._body = body

    def render_GET(self, request: Any) -> bytes:
        body = self._body(request)
        request.setHeader(b"Content-Type", self._contentType)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body


def MetricsResource(
    registry: CollectorRegistry, status: Callable[[], dict[str, Any]] | None = None
) -> Resource:
    """
    C{/metrics} (and C{/status} as JSON when C{status} is given), rendered
    in the reactor thread: the collectors read live farm state.
    """
    root = Resource()
    root.putChild(
        b"metrics", _Leaf(CONTENT_TYPE_LATEST.encode("ascii"), lambda _: render(registry))
    )
    if status is not None:
        root.putChild(
            b"status",
            _Leaf(b"application/json", lambda _: json.dumps(status()).encode("utf-8")),
        )
    return root


def metricsSite(
    registry: CollectorRegistry, status: Callable[[], dict[str, Any]] | None = None
) -> PrivateSite:
    """
    A site for L{MetricsResource} that logs no client address.
    """
    return PrivateSite(MetricsResource(registry, status))
