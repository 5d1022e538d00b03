"""
C{twistd privox-node}: a volunteer's node. It loads its engines once, then
keeps C{slots} connections open to its farms per service, each running one
job at a time on the shared engine pool. With C{--exchange}, it enrols its
identity with the exchange (L{privox.node.enrolment}) so that consumers can
seal jobs for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from treq.client import HTTPClient
from zope.interface import implementer

from privox.config import optionsFor, setting
from privox.daemon import CannotStart, ListenService, stopWithStatus
from privox.engines.base import ModelNotFound
from privox.engines.registry import ModelSpec, SpecError, createEngine
from privox.exchangekey import ExchangeKeyUnread, keep, keptKey, logLearnt, readExchangeKey
from privox.identity import IdentityError, exchangePublicKey
from privox.keys import keyId, withoutSecrets
from privox.memory import NODE, TunedMallocService
from privox.metrics import CollectorRegistry, NodeMetrics, metricsSite
from privox.node.enrolment import (
    DEFAULT_STATE_DIR,
    Enrolment,
    IdentityFileError,
    httpEnrol,
    loadIdentity,
)
from privox.node.farmfinder import FarmFinder
from privox.node.pool import EnginePool
from privox.node.worker import JobHandler, ProducerProtocol
from privox.tls import TrustRoot, checkEndpoint, clientEndpoint, loadCA

if TYPE_CHECKING:
    from privox.sealing import Sealer

log = Logger()

#: The longest a starting node waits for its first enrolment before its
#: slots dial their farms (a connection offers its sealing key as it joins).
ENROL_WAIT = 10.0


@dataclass(frozen=True)
class NodeSettings:
    stt_farm: tuple[str, ...] = setting(
        (), "Client endpoint of a farm's STT port, most preferred first."
    )
    tts_farm: tuple[str, ...] = setting(
        (), "Client endpoint of a farm's TTS port, most preferred first."
    )
    key: str = setting(
        "", "This node's producer key (on an exchange with accounts, the key its jobs credit)."
    )
    stt: tuple[str, ...] = setting((), "STT model to serve, ENGINE:MODEL[=PATH].")
    tts: tuple[str, ...] = setting((), "TTS model to serve, ENGINE:MODEL[=PATH].")
    slots: int = setting(1, "Concurrent jobs (farm connections) per service.")
    shutdown_grace: float = setting(
        30.0, "Seconds a running job may take to finish when the node stops."
    )
    failback_after: float = setting(
        300.0, "Seconds on a fallback farm before an idle slot retries the preferred one."
    )
    retry_max: float = setting(30.0, "Longest wait between reconnection attempts, seconds.")
    metrics_listen: str = setting(
        "none", "Endpoint string serving /metrics (Prometheus) over HTTP, or 'none'."
    )
    blur_usage: bool = setting(False, "Round sizes and times in log lines (privacy).")
    ca: str = setting(
        "",
        "PEM file of the CA certificate(s) that tls: farm endpoints without their "
        "own trustRoots= are verified against (default: the system's CAs, which "
        "also verify an https --exchange).",
    )
    exchange: str = setting(
        "none",
        "The exchange's API base URL (https://api.example.org) this node enrols "
        "with, so that consumers can seal jobs for it; 'none': it takes only "
        "unsealed jobs.",
    )
    exchange_key: str = setting(
        "",
        "The exchange's public key (GET EXCHANGE/v1/exchange), pinned: a "
        "certificate or directory not signed by it is refused. Empty: read from the "
        "exchange at the first start and kept in --state-dir (exchange.pub), then "
        "pinned as if given.",
    )
    state_dir: str = setting(
        DEFAULT_STATE_DIR,
        "Directory of the node's identity key (identity.key, made mode 0600 at "
        "first start; keep it: it is who the node is).",
    )


_BaseOptions = optionsFor(
    NodeSettings,
    "Run a Privox producer node: serve speech engines to one or more farms.",
)


class Options(_BaseOptions):  # type: ignore[misc,valid-type]
    specs: list[ModelSpec]

    def postOptions(self) -> None:
        super().postOptions()
        s = self.settings
        self.specs = []
        for service, given in (("stt", s.stt), ("tts", s.tts)):
            for text in given:
                try:
                    spec = ModelSpec.parse(text)
                except SpecError as e:
                    raise usage.UsageError(str(e))
                if spec.service != service:
                    raise usage.UsageError(
                        f"{spec.name} is a {spec.service} engine; give it with --{spec.service}"
                    )
                self.specs.append(spec)
        if not self.specs:
            raise usage.UsageError("no engines: give at least one --stt or --tts model")
        if s.stt and not s.stt_farm and s.exchange == "none":
            raise usage.UsageError(
                "--stt models need at least one --stt-farm, or an --exchange to find them"
            )
        if s.tts and not s.tts_farm and s.exchange == "none":
            raise usage.UsageError(
                "--tts models need at least one --tts-farm, or an --exchange to find them"
            )
        if s.slots < 1:
            raise usage.UsageError("--slots must be at least 1")
        try:
            ca = loadCA(s.ca) if s.ca else None
        except ValueError as e:
            raise usage.UsageError(f"--ca: {e}")
        for farm in s.stt_farm + s.tts_farm:
            try:
                checkEndpoint(farm, ca)
            except ValueError as e:
                raise usage.UsageError(f"bad farm endpoint {farm!r}: {e}")
        if s.exchange != "none":
            if not s.exchange.startswith(("http://", "https://")):
                raise usage.UsageError(
                    "--exchange must be the API's http(s) base URL, or 'none'"
                )
            if not s.key:
                raise usage.UsageError("--exchange needs --key: the node enrols with its key")
        if s.exchange_key:
            try:
                exchangePublicKey(s.exchange_key)
            except IdentityError as e:
                raise usage.UsageError(f"--exchange-key is {e}")
        if not s.state_dir.strip():
            raise usage.UsageError("--state-dir must name a directory")


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Connects to the first of several farms that answers, in order of
    preference. C{reached} says which one the last connection reached, and
    C{lastIndex} where it was in the list then.
    """

    def __init__(
        self, descriptions: tuple[str, ...], reactor: Any, ca: TrustRoot | None = None,
        members: Mapping[str, str | None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._ca = ca
        self.reached: str | None = None
        #: The key id of the farm the attempt under way dials, if it joined
        #: the exchange by itself.
        self.tryingMember: str | None = None
        self.setFarms(descriptions, members)

    def setFarms(
        self, descriptions: tuple[str, ...], members: Mapping[str, str | None] | None = None
    ) -> None:
        """
        Connect to these from the next attempt on; C{members}: the key id of
        each that joined the exchange by itself, as the directory they came
        from says (L{Slot}).

        @raise ValueError: one is not an endpoint (nothing changes then).
        """
        endpoints = [clientEndpoint(self._reactor, d, self._ca) for d in descriptions]
        self.descriptions, self._endpoints = descriptions, endpoints
        self.members = {d: (members or {}).get(d) for d in descriptions}
        self.lastIndex = 0

    def connect(self, factory: Factory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Factory) -> Any:
        failure: Exception | None = None
        # This attempt's list, whatever the directory says meanwhile.
        members = self.members
        for index, (description, endpoint) in enumerate(zip(self.descriptions, self._endpoints)):
            member = members[description]
            # The protocol is built while this attempt connects: it may ask
            # which farm it is for.
            self.tryingMember = member
            try:
                protocol = await endpoint.connect(factory)
            except CancelledError:
                raise
            except Exception as e:
                log.info("farm {farm} unreachable: {why}", farm=description, why=e)
                failure = e
                continue
            self.lastIndex, self.reached = index, description
            return protocol
        assert failure is not None
        raise failure


class Slot:
    """
    One job at a time to one farm at a time: a ClientService that reconnects
    with backoff, prefers the first farm, and comes back to it when it can.
    """

    def __init__(
        self,
        service: str,
        farms: tuple[str, ...],
        handler: JobHandler,
        settings: NodeSettings,
        reactor: Any,
        ca: TrustRoot | None = None,
        sealer: Sealer | None = None,
        members: Mapping[str, str | None] | None = None,
    ) -> None:
        """
        @param members: the key id of each of C{farms} that joined the
            exchange by itself (a stranger's), as the directory that listed
            them says. Such a farm is shown no key: the node's account is
            in its certificate, offered bound to that farm
            (privox.farm.vouching); any other is shown the node's key.
        """
        self.service = service
        self._sealer = sealer
        self._handler = handler
        self._settings = settings
        self._reactor = reactor
        self._endpoint = FailoverEndpoint(farms, reactor, ca, members)
        self.protocol: ProducerProtocol | None = None
        self._failback: Any = None
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=settings.retry_max)
        #: Handshakes refused in a row (DENY, a refused TLS certificate...).
        self._refusals = 0
        self._joined: list[Deferred[None]] = []
        factory = Factory.forProtocol(self._newProtocol)
        factory.noisy = False
        # The handshake is not ClientService's prepareConnection: it has no
        # transition for a connection lost while that runs (a DENY closes
        # it). A refused handshake is a connection that ends at once, and
        # the retry delay grows with the refusals in a row instead.
        self.client = ClientService(
            self._endpoint, factory, retryPolicy=self._retryDelay, clock=reactor
        )

    def _retryDelay(self, attempt: int) -> float:
        return self._backoff(max(attempt, self._refusals))  # type: ignore[no-any-return]

    def setFarms(self, farms: tuple[str, ...], members: Mapping[str, str | None] | None = None) -> None:
        """
        The farms this slot dials from now on (the directory changed): one
        connected to a farm no longer among them hangs up once idle.
        """
        wanted = {farm: (members or {}).get(farm) for farm in farms}
        if farms == self._endpoint.descriptions and wanted == self._endpoint.members:
            return
        current = self._endpoint.reached
        self._endpoint.setFarms(farms, members)
        if current is not None and current not in farms:
            self.refresh()

    def refresh(self) -> None:
        """
        Connect again once idle: the connection offers a certificate this
        node has renewed since (or none, made before its first).
        """
        protocol = self.protocol
        if protocol is not None and not protocol.disconnected.called:
            protocol.closeWhenIdle()

    def joined(self) -> Deferred[None]:
        """
        Fires once this slot is let in by a farm (now, if it is).
        """
        if self.protocol is not None and not self.protocol.disconnected.called:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._joined.append(d)
        return d

    def _newProtocol(self) -> ProducerProtocol:
        protocol = ProducerProtocol(
            self.service,
            self._settings.key,
            self._handler,
            sealer=self._sealer,
            farm=self._endpoint.tryingMember,
        )
        protocol.ready.addCallbacks(self._letIn, self._refused, (protocol,))
        return protocol

    def _letIn(self, okay: Any, protocol: ProducerProtocol) -> None:
        index = self._endpoint.lastIndex
        self.protocol = protocol
        self._refusals = 0
        log.info(
            "serving {service} through {farm} ({name})",
            service=self.service,
            farm=self._endpoint.reached,
            name=okay.farm,
        )
        self._cancelFailback()
        if index > 0:
            # On a fallback farm: after a while, hang up when idle so the
            # reconnection tries the preferred farm first again.
            self._failback = self._reactor.callLater(
                self._settings.failback_after, protocol.closeWhenIdle
            )
        joined, self._joined = self._joined, []
        for d in joined:
            d.callback(None)

    def _refused(self, failure: Any) -> None:
        self._refusals += 1
        farm = self._endpoint.reached
        log.warn("farm {farm} refused this node: {why}", farm=farm, why=failure.value)

    def _cancelFailback(self) -> None:
        if self._failback is not None and self._failback.active():
            self._failback.cancel()
        self._failback = None

    def drain(self) -> Deferred[None]:
        """
        Stop taking jobs; fire when the running one is answered.
        """
        self._cancelFailback()
        if self.protocol is None:
            return succeed(None)
        return self.protocol.closeWhenIdle()


class NodeService(Service):
    def __init__(
        self,
        settings: NodeSettings,
        engines: list[Any],
        reactor: Any,
        stopOnFailure: bool = True,
        registry: Any = None,
        sealer: Sealer | None = None,
        http: Any = None,
    ) -> None:
        """
        @param registry: a L{CollectorRegistry} to count engine time into.
        @param sealer: what its farm connections seal with (an
            L{Enrolment}, started and stopped with the node); L{None}: the
            node takes only unsealed jobs.
        @param http: treq or its like, for the exchange's directory.
        """
        self.settings = settings
        self._reactor = reactor
        self.sealer = sealer
        # A node whose models do not load is useless: twistd should exit.
        self._stopOnFailure = stopOnFailure
        self._threadpool = ThreadPool(
            minthreads=1, maxthreads=settings.slots * 2, name="privox-engines"
        )
        self.pool = EnginePool(
            engines,
            reactor,
            self._threadpool,
            metrics=NodeMetrics(registry) if registry is not None else None,
            blurUsage=settings.blur_usage,
        )
        self.slots: list[Slot] = []
        self.ready: Deferred[None] = Deferred()
        #: The services' handlers, once the models are loaded.
        self._handlers: dict[str, Any] = {}
        self._ca: TrustRoot | None = None
        #: Farms from the exchange's directory, for a service given none.
        self.finder: FarmFinder | None = None
        #: Draws each slot's farms from the directory, by need.
        self._rng = random.Random()
        #: Waits between tries at the exchange's key, while it is unread.
        self._keyBackoff = backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        #: The exchange's key: pinned, kept from a first start, or learnt at
        #: this one (privox.exchangekey) before enrolling and reading the
        #: directory.
        self.exchangeKey = (
            exchangePublicKey(settings.exchange_key) if settings.exchange_key
            else keptKey(settings.state_dir) if settings.exchange != "none" else None
        )
        self._http = http
        #: Reading the exchange's key, while it is read (cancelled on stop).
        self._learning: Deferred[None] | None = None
        unplaced = (settings.stt and not settings.stt_farm) or (settings.tts and not settings.tts_farm)
        if settings.exchange != "none" and unplaced:
            self.finder = FarmFinder(
                settings.exchange, self.exchangeKey, reactor,
                self._directoryFound, **({} if http is None else {"http": http}),
            )

    def startService(self) -> None:
        super().startService()
        self._threadpool.start()
        self._reactor.addSystemEventTrigger("during", "shutdown", self._threadpool.stop)
        if isinstance(self.sealer, Enrolment):
            self.sealer.whenRenewed(self._refreshSlots)
        if self.settings.exchange != "none" and self.exchangeKey is None:
            self._learning = Deferred.fromCoroutine(self._learnExchangeKey())
            self._learning.addErrback(lambda f: f.trap(CancelledError))
        else:
            self._joinExchange()
        if self.finder is None and self.sealer is None:
            log.info(
                "this node names no exchange (--exchange): it cannot seal, and takes only"
                " unsealed jobs"
            )
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._startFailed)

    def _joinExchange(self) -> None:
        """
        Enrol, and read the directory, while the models load.
        """
        if isinstance(self.sealer, Enrolment):
            if self.exchangeKey is not None:  # else its own (privox-local's)
                self.sealer.exchange = self.exchangeKey
            self.sealer.startService()
        if self.finder is not None:
            self.finder.exchange = self.exchangeKey
            self.finder.startService()

    async def _learnExchangeKey(self) -> None:
        """
        No key given or kept: ask the exchange (again, with backoff, until
        it answers or the node stops), keep what it says, then join.
        """
        s, attempt = self.settings, 0
        where = withoutSecrets(s.exchange)
        http = self._http if self._http is not None else exchangeHttp(s, self._reactor)
        while self.running:
            try:
                key = await readExchangeKey(s.exchange, http, self._reactor)
            except ExchangeKeyUnread as e:
                delay = self._keyBackoff(attempt)
                attempt += 1
                log.warn("cannot read the exchange's key from {where} ({why}); trying again"
                         " in {delay:.0f} s", where=where, why=str(e), delay=delay)
                await deferLater(self._reactor, delay)
                continue
            if not self.running:
                return
            try:
                await deferToThreadPool(self._reactor, self._threadpool, keep, s.state_dir, key)
            except OSError as e:
                log.warn("cannot keep the exchange's key in {path} ({why}): it is read again"
                         " at the next start", path=s.state_dir, why=e.strerror or str(e))
            logLearnt(key, where, s.state_dir)
            self.exchangeKey = key
            self._joinExchange()
            return

    async def _start(self) -> None:
        await self.pool.load()
        if isinstance(self.sealer, Enrolment):
            # Its slots offer a sealing key as they join: enrolled first, if
            # the exchange answers soon.
            tried = self.sealer.tried()
            tried.addTimeout(ENROL_WAIT, self._reactor)
            try:
                await tried
            except Exception:
                log.warn(
                    "no answer from {where} in {wait:g} s: serving unsealed jobs meanwhile (a farm"
                    " that joined the exchange lets it in only once it holds a certificate)",
                    where=self.sealer.where,
                    wait=ENROL_WAIT,
                )
            if not self.running:
                # Stopped while it waited: no slot to start.
                self.ready.callback(None)
                return
        s = self.settings
        self._ca = loadCA(s.ca) if s.ca else None
        for service in ("stt", "tts"):
            handler = self.pool.handler(service)
            if handler.models:
                self._handlers[service] = handler
                self._placeSlots(service)
        self.ready.callback(None)

    def _farmsFor(self, service: str, taken: Collection[str] = ()) -> tuple[str, ...]:
        """
        The farms a slot of C{service} dials, most preferred first: those
        named, in their order; else the directory's, those with the fewest
        producers of this node's models first (drawn anew for each slot, so
        that nodes spread over the farms that need them), the farms this
        node's other slots prefer (C{taken}) last.
        """
        configured = self._named(service)
        if configured or self.finder is None or self.finder.directory is None:
            return configured
        drawn = self.finder.directory.byNeed(service, self._handlers[service].models, self._rng)
        return tuple(sorted(drawn, key=lambda farm: farm in taken))

    def _members(self, farms: tuple[str, ...]) -> dict[str, str | None]:
        """
        The key id of each of C{farms} that the directory they were drawn
        from (the one held now) lists as joined by itself: they are shown
        no key. A slot keeps this with its farms, whatever later
        directories say (a farm dropped from one is still a stranger's).
        """
        directory = None if self.finder is None else self.finder.directory
        if directory is None:
            return {}
        return {farm: directory.member(farm) for farm in farms}

    def _named(self, service: str) -> tuple[str, ...]:
        """
        The farms given for C{service} by hand (C{--stt-farm}, C{--tts-farm}).
        """
        return tuple(self.settings.stt_farm if service == "stt" else self.settings.tts_farm)

    def _placeSlots(self, service: str) -> None:
        """
        Start C{service}'s slots on its farms, or point them at the farms
        the directory lists now.
        """
        farms = self._farmsFor(service)
        placed = [slot for slot in self.slots if slot.service == service]
        taken: set[str] = set()
        if placed:
            for slot in placed:
                preferred = self._farmsFor(service, taken)
                slot.setFarms(preferred, self._members(preferred))
                taken.update(preferred[:1])
            return
        handler = self._handlers[service]
        if not farms:
            log.info("{service}: no farm to serve {models} through yet",
                     service=service, models=list(handler.models))
            return
        log.info(
            "{service}: {slots} slot(s) for {models} via {farms}",
            service=service,
            slots=self.settings.slots,
            models=list(handler.models),
            farms=list(farms),
        )
        for _ in range(self.settings.slots):
            preferred = self._farmsFor(service, taken)
            taken.update(preferred[:1])
            slot = Slot(service, preferred, handler, self.settings, self._reactor, self._ca,
                        self.sealer, self._members(preferred))
            self.slots.append(slot)
            slot.client.startService()

    def _directoryFound(self, directory: Any) -> None:
        if not self.running:
            return
        for service in self._handlers:
            if self._farmsFor(service):
                self._placeSlots(service)

    def _refreshSlots(self) -> None:
        for slot in self.slots:
            slot.refresh()

    def _startFailed(self, failure: Any) -> None:
        if not self._stopOnFailure:
            # Whoever runs this node says it.
            self.ready.errback(failure)
            return
        if failure.check(ModelNotFound):
            # A configuration error, said in one line.
            log.critical("the node cannot start: {reason}", reason=str(failure.value))
        else:
            log.failure("the node could not start", failure)
        self.ready.errback(failure)
        stopWithStatus(self._reactor, 1)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
        if self.slots:
            log.info("stopping: finishing running jobs")
            drained = DeferredList([slot.drain() for slot in self.slots], consumeErrors=True)
            drained.addTimeout(self.settings.shutdown_grace, self._reactor)
            try:
                await drained
            except Exception:
                log.warn("jobs still running after {s} s; closing", s=self.settings.shutdown_grace)
        if self.finder is not None and self.finder.running:
            self.finder.stopService()
        for slot in self.slots:
            await slot.client.stopService()
        if isinstance(self.sealer, Enrolment) and self.sealer.running:
            self.sealer.stopService()


def exchangeHttp(settings: NodeSettings, reactor: Any) -> HTTPClient:
    """
    An HTTP client for the exchange: a private exchange's CA, as for its
    farms. A request a minute at most: no connection kept open.
    """
    trust = loadCA(settings.ca) if settings.ca else None
    return HTTPClient(Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
        pool=HTTPConnectionPool(reactor, persistent=False),
    ))


def enrolmentFor(settings: NodeSettings, reactor: Any) -> Enrolment | None:
    """
    The node's enrolment with the exchange its settings name, its identity
    loaded (or made); L{None} where they name none.

    @raise IdentityFileError: the identity key cannot be read or made.
    """
    if settings.exchange == "none":
        return None
    identity, made = loadIdentity(settings.state_dir)
    enrolment = Enrolment(
        identity,
        None,  # the node's (NodeService.exchangeKey), once it is known
        httpEnrol(settings.exchange, settings.key, identity, reactor, exchangeHttp(settings, reactor)),
        reactor,
        where=withoutSecrets(settings.exchange),
        account=keyId(settings.key),
    )
    if made:
        log.info(
            "made a new identity {node} for this node in {path}",
            node=enrolment.fingerprint,
            path=settings.state_dir,
        )
    return enrolment


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    settings = options.settings
    try:
        enrolment = enrolmentFor(settings, reactor)
        if settings.exchange != "none" and not settings.exchange_key:
            keptKey(settings.state_dir)
    except IdentityFileError as e:
        return CannotStart(f"{e} (--state-dir)")
    except (IdentityError, OSError) as e:
        return CannotStart(
            f"cannot read the exchange key kept in {settings.state_dir}: {e}"
            " (remove exchange.pub, or give --exchange-key)"
        )
    engines = [createEngine(s) for s in options.specs]
    http = exchangeHttp(settings, reactor) if settings.exchange != "none" else None
    top = MultiService()
    # Before the engines' first arrays and the first upload.
    TunedMallocService(NODE).setServiceParent(top)
    registry = CollectorRegistry() if settings.metrics_listen != "none" else None
    NodeService(
        settings, engines, reactor, registry=registry, sealer=enrolment, http=http
    ).setServiceParent(top)
    if registry is None:
        return top
    log.info("node metrics on {endpoint}", endpoint=settings.metrics_listen)
    ListenService(
        settings.metrics_listen, metricsSite(registry), reactor, "--metrics-listen"
    ).setServiceParent(top)
    return top
