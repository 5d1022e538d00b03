"""
C{twistd privox-farm}: options and the service tree.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from privox.config import optionsFor
from privox.farm.connection import FarmFactory
from privox.farm.farm import Counters, Farm
from privox.farm.ledger import Sink, ledgerFromSettings, ledgerTarget
from privox.farm.observe import farmStatus, instrumentFarm, onlineNodes, producerCounts
from privox.farm.pvx1 import Aliases
from privox.farm.registration import Registration, parsePublic
from privox.farm.settings import FarmSettings
from privox.farm.splice import splicerFor
from privox.farm.vouching import ExchangeOnly, Vouching
from privox.daemon import ListenService
from privox.fdlimit import OpenFileLimitService
from privox.identity import IdentityError, exchangePublicKey
from privox.keys import KeyPolicy, KeyPolicyError, OpenPolicy, keyId, policyFromSpec
from privox.metrics import CollectorRegistry, metricsSite

log = Logger()

_BaseOptions = optionsFor(
    FarmSettings,
    "Run a Privox producer farm: a relay between producer nodes and consumers.",
)


class Options(_BaseOptions):  # type: ignore[misc,valid-type]
    def postOptions(self) -> None:
        super().postOptions()
        s = self.settings
        if s.stt_listen == "none" and s.tts_listen == "none":
            raise usage.UsageError("both --stt-listen and --tts-listen are 'none'")
        for name in (
            "queue_timeout", "ping_interval", "handshake_timeout", "job_timeout", "max_job_timeout"
        ):
            if getattr(s, name) <= 0:
                raise usage.UsageError(f"--{name.replace('_', '-')} must be positive")
        if s.max_frame < 1 or s.max_job_bytes < 1:
            raise usage.UsageError("--max-frame and --max-job-bytes must be positive")
        if s.early_upload < 0:
            raise usage.UsageError("--early-upload must be 0 or more")
        if s.splice_min < 0:
            raise usage.UsageError("--splice-min must be 0 or more")
        if s.pvx1_quiet <= 0:
            raise usage.UsageError("--pvx1-quiet must be positive")
        for name in ("pvx1_stt_models", "pvx1_tts_models"):
            try:
                Aliases(getattr(s, name))
            except ValueError as e:
                raise usage.UsageError(f"--{name.replace('_', '-')}: {e}")
        if s.ledger.lower().startswith(("http://", "https://")) and not s.api_key:
            raise usage.UsageError("an http(s) --ledger needs --api-key (the farm's key)")
        if not s.ledger:
            raise usage.UsageError("--ledger must be 'none', 'exchange', a file path or an http(s) URL")
        if s.exchange != "none":
            if not s.exchange.startswith(("http://", "https://")):
                raise usage.UsageError("--exchange must be the API's http(s) base URL, or 'none'")
            if not s.api_key:
                raise usage.UsageError("--exchange needs --api-key: the farm's key")
            try:
                parsePublic(s.public)
            except ValueError as e:
                raise usage.UsageError(str(e))
        if s.exchange_key:
            if s.exchange == "none":
                raise usage.UsageError("--exchange-key is the key of the --exchange this farm joins")
            try:
                exchangePublicKey(s.exchange_key)
            except IdentityError as e:
                raise usage.UsageError(f"--exchange-key is {e}")


class FarmService(Service):
    """
    Owns the farm's life: periodic stats while running, a graceful drain
    when stopped.
    """

    def __init__(self, farm: Farm, clock: Any) -> None:
        self.farm = farm
        self.clock = clock
        #: Started and stopped with the farm; stopped after the farm has
        #: drained, so the records of the jobs it ended reach the spool.
        self.ledger = farm.ledger
        self._stats: LoopingCall | None = None
        self._lastCounters = Counters()

    def startService(self) -> None:
        super().startService()
        if self.ledger is not None:
            self.ledger.start()
        splicer = self.farm.splicer
        if splicer is not None:
            log.info(
                "relaying DATA of {splice_min} bytes or more inside the kernel (splice)",
                splice_min=splicer.minimum,
            )
        elif self.farm.settings.splice_min and not _allTLS(self.farm.settings):
            log.info("relaying all DATA through memory: splice(2) is not available here")
        interval = self.farm.settings.stats_interval
        if interval > 0:
            self._stats = LoopingCall(self._logStats, interval)
            self._stats.clock = self.clock
            self._stats.start(interval, now=False)

    def _logStats(self, interval: float) -> None:
        self.farm.statsLine(self._lastCounters, interval)
        c = self.farm.counters
        self._lastCounters = Counters(c.jobs, c.succeeded)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stats is not None and self._stats.running:
            self._stats.stop()
        stopped = self.farm.shutdown()
        ledger = self.ledger
        if ledger is not None:
            stopped.addBoth(lambda result: ledger.stop().addCallback(lambda _: result))
        return stopped


def _allTLS(settings: FarmSettings) -> bool:
    """
    Whether every port the farm listens on is TLS (nothing to splice then:
    splice(2) moves plain bytes between plain sockets).
    """
    listening = [e for e in (settings.stt_listen, settings.tts_listen) if e != "none"]
    return all(e.startswith("ssl:") for e in listening)


def buildFarm(settings: FarmSettings, reactor: Any, ledger: Sink | None = None) -> Farm:
    bearer = settings.api_key or None

    def policy(spec: str) -> KeyPolicy:
        if spec == "exchange":
            return OpenPolicy() if settings.exchange == "none" else ExchangeOnly()
        return policyFromSpec(spec, reactor=reactor, bearer=bearer)

    try:
        return Farm(
            settings,
            reactor,
            policy(settings.producer_keys),
            policy(settings.consumer_keys),
            ledger=ledger,
            splicer=None if _allTLS(settings) else splicerFor(settings.splice_min, reactor),
            runInThread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
            vouching=vouchingFor(settings),
        )
    except KeyPolicyError as e:
        raise usage.UsageError(str(e))


def vouchingFor(settings: FarmSettings) -> Vouching | None:
    """
    A farm that joins an exchange lets in the nodes it vouches for: by the
    pinned key, or by the one it reads there before registering.
    """
    if settings.exchange == "none":
        return None
    pinned = exchangePublicKey(settings.exchange_key) if settings.exchange_key else None
    return Vouching(keyId(settings.api_key), pinned)


def buildLedger(settings: FarmSettings, reactor: Any) -> Sink | None:
    """
    The farm's ledger sink (None for 'none'), writing files in the reactor's
    thread pool.
    """
    if ledgerTarget(settings) == "none":
        return None

    def runner(f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    sink = ledgerFromSettings(settings, reactor, runner)
    log.info("farm ledger: {description}", description=sink.description)
    return sink


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    settings = options.settings
    farm = buildFarm(settings, reactor, buildLedger(settings, reactor))
    top = MultiService()
    # A descriptor per peer: before the ports.
    OpenFileLimitService().setServiceParent(top)
    # Added first, stopped last: ports close before the farm drains.
    FarmService(farm, reactor).setServiceParent(top)
    for service, endpoint in (("stt", settings.stt_listen), ("tts", settings.tts_listen)):
        if endpoint == "none":
            continue
        log.info(
            "farm {name} serves {service} on {endpoint}",
            name=settings.name,
            service=service,
            endpoint=endpoint,
        )
        ListenService(endpoint, FarmFactory(farm, service), reactor, f"--{service}-listen").setServiceParent(top)
    if settings.metrics_listen != "none":
        metricsService(farm, settings.metrics_listen, reactor).setServiceParent(top)
    if settings.exchange != "none":
        # Last: once the ports listen; stopped first.
        Registration(
            settings.exchange, settings.api_key, settings.name, parsePublic(settings.public),
            reactor, producers=lambda: producerCounts(farm), vouching=farm.vouching,
            online=lambda: onlineNodes(farm),
        ).setServiceParent(top)
    return top


def metricsService(farm: Farm, endpoint: str, reactor: Any) -> IService:
    """
    C{/metrics} (Prometheus) and C{/status} (JSON) of C{farm} over plain
    HTTP on C{endpoint}, from a registry of the farm's own.
    """
    registry = CollectorRegistry()
    instrumentFarm(farm, registry)
    log.info("farm metrics and status on {endpoint}", endpoint=endpoint)
    return ListenService(
        endpoint, metricsSite(registry, lambda: farmStatus(farm)), reactor, "--metrics-listen"
    )
