"""
The load of remote farms for the API's C{/status}: each farm line may name
its farm's status URL (C{status=http://farm.example:9176/status}, served by
C{privox-farm --metrics-listen}); L{RemoteStatus} fetches them with treq,
keeps each answer a few seconds, and passes on only the figures it knows
(producers, queues, jobs), never anything else a farm might send.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from privox.api.farmlist import FarmEntry

log = Logger()


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def cleanStatus(raw: Any) -> dict[str, Any] | None:
    """
    The known fields of a farm's C{/status} JSON, checked; L{None} if it
    is not one.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        return None
    services = {}
    for service, figures in raw["services"].items():
        if service not in ("stt", "tts") or not isinstance(figures, dict):
            continue
        models = figures.get("models")
        services[service] = {
            "producers": _count(figures.get("producers")),
            "queue": _count(figures.get("queue")),
            "running": _count(figures.get("running")),
            "models": {
                str(model)[:200]: {
                    k: _count(c.get(k)) for k in ("connected", "idle", "busy", "sealing")
                }
                for model, c in (models.items() if isinstance(models, dict) else [])
                if isinstance(c, dict)
            },
        }
    jobs = raw.get("jobs") if isinstance(raw.get("jobs"), dict) else {}
    return {
        "name": str(raw.get("name", ""))[:200],
        "accepting": bool(raw.get("accepting", True)),
        "jobs": {"total": _count(jobs.get("total")), "succeeded": _count(jobs.get("succeeded"))},
        "services": services,
    }


def unserved(
    wanted: dict[str, set[str]], loads: dict[str, Any], sealed: bool = False
) -> dict[str, list[str]] | None:
    """
    The models of C{wanted} (service -> models) that no producer on any
    farm of C{loads} (farm name -> status, or None where unknown) serves
    (that seals, if C{sealed}): jobs for them fail until one connects.
    L{None} when no farm's load is known, so nothing can be said.
    """
    serving = "sealing" if sealed else "connected"
    known = [load for load in loads.values() if load]
    if not known:
        return None
    missing = {}
    for service, models in sorted(wanted.items()):
        served = {
            model
            for load in known
            for model, counts in load.get("services", {}).get(service, {}).get("models", {}).items()
            if counts.get(serving)
        }
        missing[service] = sorted(models - served)
    return missing


class RemoteStatus:
    """
    A C{farmStatus} provider for L{privox.api.app.PrivoxAPI}: farm name ->
    that farm's status, for the farms whose lines name a status URL. A farm
    that cannot be asked is left out (logged), not an error.
    """

    def __init__(
        self,
        farms: Iterable[FarmEntry],
        reactor: Any,
        cacheSeconds: float = 5.0,
        timeout: float = 3.0,
    ) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.urls = {farm.name: farm.status for farm in farms if farm.status}
        self.reactor = reactor
        self.cacheSeconds = cacheSeconds
        self.timeout = timeout
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._http = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )

    def __call__(self) -> Deferred[dict[str, Any]]:
        names = list(self.urls)
        d = gatherResults([Deferred.fromCoroutine(self._one(name)) for name in names])
        d.addCallback(
            lambda results: {n: r for n, r in zip(names, results) if r is not None}
        )
        return d

    async def _one(self, name: str) -> dict[str, Any] | None:
        now = self.reactor.seconds()
        cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self.cacheSeconds:
            return cached[1]
        url = self.urls[name]
        try:
            response = await self._http.get(url, timeout=self.timeout, reactor=self.reactor)
            body = await response.content()
            if response.code != 200:
                raise ValueError(f"HTTP {response.code}")
            value = cleanStatus(json.loads(body))
            if value is None:
                raise ValueError("not a farm status")
        except Exception as e:
            log.info("status of farm {farm} unavailable: {why}", farm=name, why=e)
            value = None
        self._cache[name] = (self.reactor.seconds(), value)
        return value
