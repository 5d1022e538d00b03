"""
Observing a farm: what it counts as jobs end (L{FarmMetrics}), what a scrape
reads from its dispatchers (L{FarmCollector}), and its load for C{/status}
(L{farmStatus}), never an identity.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from privox.directory import MAX_FIELD, MAX_NODES
from privox.farm.farm import Farm
from privox.farm.job import Job
from privox.farm.sessions import ProducerSession
from privox.messages import ANY, SERVICES, ErrorCode
from privox.metrics import LATENCY_BUCKETS, MAX_MODELS, OTHER

_OUTCOMES = frozenset(ErrorCode.ALL) | {"ok", "cancelled"}


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
        early = CounterMetricFamily(
            "privox_farm_sealed_early_jobs",
            "Sealed jobs whose upload came with their JOB_ (docs/protocol.rst §5.7), by what the"
            " farm did with it: forwarded to the node it was sealed for, or dropped (that node busy"
            " or gone; the upload came again after ASGN).",
            labels=["upload"],
        )
        early.add_metric(["forwarded"], self.farm.counters.sealedEarly)
        early.add_metric(["dropped"], self.farm.counters.sealedEarlyDropped)
        yield early
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
    metrics = FarmMetrics(farm, registry)
    farm.observer = metrics
    return metrics


def farmStatus(farm: Farm) -> dict[str, Any]:
    """
    The farm's load without identities: per service, the queue, the jobs
    running, the producers, and per model the connected, idle and busy
    producers, and how many of them seal.
    """
    running: dict[str, int] = {s: 0 for s in farm.dispatchers}
    for job in farm.jobs:
        running[job.request.service] = running.get(job.request.service, 0) + 1
    services = {}
    for service, dispatcher in sorted(farm.dispatchers.items()):
        sealing = dispatcher.sealingByModel()
        services[service] = {
            "producers": dispatcher.producerCount(),
            "queue": dispatcher.queueDepth(),
            "running": running.get(service, 0),
            "models": {
                model: {
                    "connected": connected,
                    "idle": idle,
                    "busy": connected - idle,
                    "sealing": sealing.get(model, 0),
                }
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


def onlineNodes(farm: Farm) -> list[dict[str, Any]]:
    """
    The nodes the farm's exchange vouched for that are connected now: each
    identity's fingerprint, the key id its certificate names, and its
    connections; at most L{MAX_NODES} of them. What the exchange's account
    pages call "online now" (for that key only).
    """
    online: dict[tuple[str, str], int] = {}
    for connection in farm.connections:
        session, node = connection.session, connection.node
        if node is not None and isinstance(session, ProducerSession):
            which = (node, session.keyId)
            if which in online or len(online) < MAX_NODES:
                online[which] = online.get(which, 0) + 1
    return [{"node": node, "account": keyId, "connections": n}
            for (node, keyId), n in sorted(online.items())]


def producerCounts(farm: Farm) -> dict[str, dict[str, int]]:
    """
    The farm's connected producers per service and model, as it tells the
    exchange it joined (L{privox.farm.registration}).
    """
    return {
        service: {model: connected for model, (connected, _) in
                  boundedModels(dispatcher.producersByModel()).items()
                  # A name the directory would refuse is left out, not the farm.
                  if len(model) <= MAX_FIELD}
        for service, dispatcher in sorted(farm.dispatchers.items())
    }
