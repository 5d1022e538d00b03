"""
Observability: Prometheus metrics, the farm's status figures, and blurred
usage figures for log lines.

Every daemon keeps its series in its own L{CollectorRegistry} (never
prometheus_client's global one), handed to the parts that count. Series are
named C{privox_*}. Labels never carry keys, addresses, job ids or content,
and their values come from bounded sets: routes, statuses, services,
outcomes, and model names that producers advertised (anything else is
C{"other"}).

Figures that already exist (the dispatchers' producers and queues) are read
at scrape time by L{FarmCollector} rather than counted twice.
"""

from __future__ import annotations

import html
import json
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.web.resource import Resource

from privox.messages import ANY, SERVICES, ErrorCode
from privox.web import PrivateSite

if TYPE_CHECKING:
    from privox.farm.farm import Farm
    from privox.farm.job import Job

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CollectorRegistry",
    "OTHER",
    "blurBytes",
    "blurMs",
    "FarmMetrics",
    "farmStatus",
    "instrumentFarm",
    "ApiMetrics",
    "NodeMetrics",
    "MetricsResource",
    "render",
]

#: The label value of anything outside a bounded set.
OTHER = "other"
#: At most this many distinct model labels per service (then L{OTHER}).
MAX_MODELS = 100

#: Latency buckets in seconds: a job or request from milliseconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_OUTCOMES = frozenset(ErrorCode.ALL) | {"ok", "cancelled"}


def render(registry: CollectorRegistry) -> bytes:
    """
    The registry in Prometheus' text format.
    """
    return generate_latest(registry)


# -- blurred usage --------------------------------------------------------------


def blurBytes(n: int) -> int:
    """
    C{n} to two significant figures (C{123456} -> C{120000}); below 100 it
    is left as it is.
    """
    n = int(n)
    if n < 100:
        return n
    factor = 10 ** (len(str(n)) - 2)
    return int(math.floor(n / factor + 0.5)) * factor


def blurMs(ms: float) -> int:
    """
    Milliseconds rounded to the nearest 100 ms.
    """
    return int(math.floor(ms / 100 + 0.5)) * 100


def usage(blur: bool, *, ms: float | None = None, **sizes: int) -> dict[str, int]:
    """
    Log fields: C{ms} (milliseconds) and byte counts, blurred when C{blur}
    is set, exact otherwise.
    """
    fields: dict[str, int] = {}
    if ms is not None:
        fields["ms"] = blurMs(ms) if blur else round(ms)
    for name, value in sizes.items():
        fields[name] = blurBytes(value) if blur else int(value)
    return fields


# -- the farm --------------------------------------------------------------------


class FarmMetrics:
    """
    What the farm counts as jobs end, and its scrape-time collector.
    """

    def __init__(self, farm: Farm, registry: CollectorRegistry) -> None:
        self.farm = farm
        self._models: dict[str, set[str]] = {s: set() for s in SERVICES}
        self.jobs = Counter(
            "privox_farm_jobs",
            "Jobs that ended, by service, model and outcome.",
            ["service", "model", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "privox_farm_job_seconds",
            "Time from a job's JOB_ to its end, by service.",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        registry.register(FarmCollector(farm))

    def modelLabel(self, service: str, model: str) -> str:
        """
        C{model} if a producer advertised it (by name, not C{*}), else
        L{OTHER}; at most L{MAX_MODELS} per service.
        """
        known = self._models.setdefault(service, set())
        if model in known:
            return model
        dispatcher = self.farm.dispatchers.get(service)
        if (
            model != ANY
            and dispatcher is not None
            and dispatcher.advertises(model)
            and len(known) < MAX_MODELS
        ):
            known.add(model)
            return model
        return OTHER

    def jobFinished(self, job: Job, seconds: float) -> None:
        service = job.request.service
        outcome = job.outcome if job.outcome in _OUTCOMES else OTHER
        self.jobs.labels(service, self.modelLabel(service, job.request.model), outcome).inc()
        self.latency.labels(service).observe(max(0.0, seconds))


class FarmCollector(Collector):
    """
    Queue depth and producers per model, read from the dispatchers when
    scraped, and what the farm spliced.
    """

    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    def collect(self) -> Iterable[Metric]:
        queue = GaugeMetricFamily(
            "privox_farm_queue_depth", "Jobs waiting for a producer, by service.", labels=["service"]
        )
        families = {
            state: GaugeMetricFamily(
                f"privox_farm_producers_{state}",
                f"Producers ({state}) advertising a model, by service and model.",
                labels=["service", "model"],
            )
            for state in ("connected", "idle", "busy")
        }
        for service, dispatcher in sorted(self.farm.dispatchers.items()):
            queue.add_metric([service], dispatcher.queueDepth())
            for model, (connected, idle) in boundedModels(dispatcher.producersByModel()).items():
                families["connected"].add_metric([service, model], connected)
                families["idle"].add_metric([service, model], idle)
                families["busy"].add_metric([service, model], connected - idle)
        yield queue
        yield from families.values()
        splicer = self.farm.splicer
        if splicer is not None:
            yield CounterMetricFamily(
                "privox_farm_splice_relays",
                "Uploads and results relayed inside the kernel (splice).",
                value=splicer.relays,
            )
            yield CounterMetricFamily(
                "privox_farm_spliced_bytes",
                "DATA payload bytes relayed inside the kernel (splice).",
                value=splicer.bytes,
            )

    def describe(self) -> Iterable[Metric]:
        # Registering must not call collect (the farm may not be ready).
        return []


def boundedModels(byModel: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """
    C{Dispatcher.producersByModel()} with at most L{MAX_MODELS} names (those
    with the most producers); the rest summed as L{OTHER}. Producers choose
    what they advertise: a flood of names must not flood the series.
    """
    if len(byModel) <= MAX_MODELS:
        return byModel
    ranked = sorted(byModel.items(), key=lambda item: (-item[1][0], item[0]))
    kept = dict(ranked[:MAX_MODELS])
    rest = ranked[MAX_MODELS:]
    previous = kept.get(OTHER, (0, 0))
    kept[OTHER] = (
        previous[0] + sum(c for _, (c, _) in rest),
        previous[1] + sum(i for _, (_, i) in rest),
    )
    return kept


def instrumentFarm(farm: Farm, registry: CollectorRegistry) -> FarmMetrics:
    """
    Count C{farm}'s jobs into C{registry} and expose its load there.
    """
    farm.metrics = FarmMetrics(farm, registry)
    return farm.metrics


def farmStatus(farm: Farm) -> dict[str, Any]:
    """
    The farm's load without identities: per service, the queue, the jobs
    running, the producers, and per model the connected, idle and busy
    producers.
    """
    running: dict[str, int] = {s: 0 for s in farm.dispatchers}
    for job in farm.jobs:
        running[job.request.service] = running.get(job.request.service, 0) + 1
    services = {}
    for service, dispatcher in sorted(farm.dispatchers.items()):
        services[service] = {
            "producers": dispatcher.producerCount(),
            "queue": dispatcher.queueDepth(),
            "running": running.get(service, 0),
            "models": {
                model: {"connected": connected, "idle": idle, "busy": connected - idle}
                for model, (connected, idle) in boundedModels(
                    dispatcher.producersByModel()
                ).items()
            },
        }
    return {
        "name": farm.settings.name,
        "accepting": farm.accepting,
        "jobs": {"total": farm.counters.jobs, "succeeded": farm.counters.succeeded},
        "services": services,
    }


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


# -- the status page ---------------------------------------------------------------


def statusHtml(status: dict[str, Any]) -> str:
    """
    A small page of the API's C{/status}: one table row per farm, service
    and model.
    """
    e = html.escape
    rows = []
    for farm in status.get("farms", []):
        load = farm.get("load")
        up = "up" if farm.get("up") else "down"
        name = e(str(farm.get("name"))) + (" (fallback)" if farm.get("fallback") else "")
        if not load:
            rows.append(
                f"<tr><td>{name}</td><td>{up}</td><td>{e(', '.join(farm.get('services', [])))}</td>"
                "<td colspan=5>no load figures</td></tr>"
            )
            continue
        for service, figures in sorted(load.get("services", {}).items()):
            models = figures.get("models") or {"-": {"connected": 0, "idle": 0, "busy": 0}}
            for model, counts in sorted(models.items()):
                rows.append(
                    f"<tr><td>{name}</td><td>{up}</td><td>{e(service)}</td><td>{e(model)}</td>"
                    f"<td>{counts['connected']}</td><td>{counts['idle']}</td>"
                    f"<td>{counts['busy']}</td><td>{figures.get('queue', 0)}</td></tr>"
                )
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>Privox status</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
        "</head><body><h1>Privox status</h1><table>"
        "<tr><th>farm</th><th>state</th><th>service</th><th>model</th><th>producers</th>"
        "<th>idle</th><th>busy</th><th>queue</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
