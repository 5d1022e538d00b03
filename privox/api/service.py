"""
C{twistd privox-api}: options and the service tree.

L{buildApi} is the part C{privox-local} reuses: settings and any
L{Exchange} in, the Klein app and its site out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.policies import WrappingFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from privox.accounts.quota import DEFAULT_HOURLY_SECONDS
from privox.accounts.store import DEFAULT_DSN, AccountStore, StoreError
from privox.api import wyoming
from privox.api.access import Access, AccountAccess, PolicyAccess, modelCosts
from privox.api.accountpages import ONLINE_SAID
from privox.api.app import DEFAULT_MAX_UPLOAD, PrivoxAPI
from privox.api.enrolment import DEFAULT_EXCHANGE_KEY, ExchangeKey, ExchangeKeyError
from privox.api.exchange import Exchange
from privox.api.farmdirectory import MISSED_REFRESHES, FarmDirectory, farmProber
from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.api.farmstatus import RemoteStatus
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.api.proxies import TrustedProxies
from privox.config import optionsFor, setting
from privox.daemon import CannotStart, ListenService
from privox.fdlimit import OpenFileLimitService
from privox.memory import TunedMallocService
from privox.keys import KeyPolicyError, policyFromSpec
from privox.sealing import MODES, REQUIRED, SealPolicy
from privox.tls import loadCA

#: The values of --farm-registration.
REGISTRATION = ("public", "any", "off")

log = Logger()


@dataclass(frozen=True)
class ApiSettings:
    listen: str = setting("tcp:8080", "Twisted server endpoint string the API listens on.")
    farm: tuple[str, ...] = setting(
        (),
        "A farm: 'NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback] [status=URL]' "
        "(an endpoint may be 'none'). None at all: only farms that join by themselves.",
    )
    farm_key: str = setting("", "This API's own consumer key, presented to the farms.")
    farm_registration: str = setting(
        "public",
        "Farms that may join by themselves with a farm key (POST /v1/farms; probed "
        "first, listed in the signed GET /v1/farms): 'public' (at public addresses), "
        "'any' (private and loopback ones too: a private network), or 'off'.",
    )
    farm_refresh: float = setting(
        60.0,
        "Seconds between a joined farm's registrations (it is told) and the API's "
        "probes of it; a farm silent for three is dropped.",
    )
    accounts: str = setting(
        DEFAULT_DSN,
        "Account store for keys, quotas and the ledger: sqlite:PATH, postgresql://..., "
        "or 'none' (no quotas; --keys decides who may call).",
    )
    anonymous: str = setting(
        "off", "'on': requests without a key share --anonymous-seconds; 'off': they get 401."
    )
    hourly_seconds: float = setting(
        DEFAULT_HOURLY_SECONDS,
        "Audio seconds a key may use per rolling hour, unless the key says otherwise.",
    )
    anonymous_seconds: float = setting(
        600.0, "Audio seconds per rolling hour shared by all requests without a key."
    )
    model_cost: tuple[str, ...] = setting(
        (),
        "QSS a producer earns per audio second of a model: 'MODEL COST' (default: the "
        "multiplier of the model's STT quality, fast 1 to xcribe2 32; else 1).",
    )
    keys: str = setting(
        "open",
        "With --accounts none: user keys 'open' (any non-empty key), an allow-list file, "
        "or an http(s) validation URL.",
    )
    max_upload: int = setting(DEFAULT_MAX_UPLOAD, "Largest request body in bytes (413 beyond).")
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "A reverse proxy (an IP address or CIDR network) whose X-Forwarded-For and "
        "X-Forwarded-Proto say who the client is and whether it came over TLS (sign-up "
        "limits, Secure cookies); repeat it, or separate several with commas. None: no proxy is "
        "believed.",
    )
    deadline: float = setting(
        60.0,
        "Seconds a request may take, every farm attempt included, plus"
        " --deadline-per-second for each second of its audio.",
    )
    deadline_per_second: float = setting(
        1.0,
        "Seconds added to --deadline per second of audio: the upload's (STT), or"
        " the most the text may take to say (TTS).",
    )
    attempts: int = setting(3, "Most distinct (non-fallback) farms tried per request.")
    pool_size: int = setting(4, "Most open connections per farm and service.")
    fanout: int = setting(
        8, "Pieces of a long recording transcribed at once, by as many producers."
    )
    fanout_above: float = setting(
        60.0,
        "Recordings longer than this many seconds are cut at silences into pieces of about"
        " 30 s, transcribed at once.",
    )
    stt_model: tuple[str, ...] = setting(
        DEFAULT_STT, "STT quality: 'QUALITY MODEL [ENGLISH-MODEL]'."
    )
    stt_language: tuple[str, ...] = setting(
        (), "A language pinned to a model whatever the quality: 'LANGUAGE MODEL'."
    )
    stt_fallback: tuple[str, ...] = setting(
        (),
        "'MODEL OTHER-MODEL': while no connected producer serves MODEL (as the farms'"
        " status says), its jobs go to OTHER-MODEL, and the answer says so"
        " (X-Privox-Fallback). Without one, they wait for MODEL.",
    )
    voice: tuple[str, ...] = setting(
        DEFAULT_VOICES, "TTS voice: 'VOICE MODEL [SPEAKER]'; the first is the default."
    )
    ca: str = setting(
        "",
        "PEM file of the CA certificate(s) that tls: farm endpoints without their "
        "own trustRoots= are verified against (default: the system's CAs).",
    )
    blur_usage: bool = setting(
        False, "Round sizes and times in the request log lines (privacy)."
    )
    exchange_key: str = setting(
        DEFAULT_EXCHANGE_KEY,
        "File of the exchange's Ed25519 signing key, made (mode 0600) at first start; "
        "every API of one exchange shares it (back it up). GET /v1/exchange publishes "
        "its public half.",
    )
    e2e: str = setting(
        REQUIRED,
        "Seal jobs end to end between this API and the nodes, so farms relay only "
        "ciphertext: 'required' (only nodes that can seal take them), 'preferred' "
        "or 'off'.",
    )
    wyoming_listen: str = setting(
        "",
        "Twisted server endpoint string a Wyoming server (Home Assistant's Assist: STT and "
        "TTS on one port) listens on; empty or 'none': no Wyoming server.",
    )
    wyoming_key: str = setting(
        "",
        "The key whose account Wyoming clients spend (they send none); empty: anonymous "
        "use, which needs --anonymous on.",
    )
    wyoming_zeroconf: str = setting(
        "",
        "Announce the Wyoming port over mDNS (_wyoming._tcp, which Home Assistant "
        "discovers) under this name; needs python-zeroconf. Empty: not announced.",
    )


def modelTable(settings: ApiSettings) -> ModelTable:
    """
    @raise usage.UsageError: a malformed model or voice line.
    """
    try:
        return ModelTable.parse(
            settings.stt_model, settings.voice, settings.stt_language, settings.stt_fallback
        )
    except ValueError as e:
        raise usage.UsageError(str(e))


def trustedProxies(settings: ApiSettings) -> TrustedProxies:
    """
    @raise usage.UsageError: a --trusted-proxies item that is not an IP
        address or network.
    """
    try:
        return TrustedProxies(settings.trusted_proxies)
    except ValueError as e:
        raise usage.UsageError(f"--trusted-proxies: {e}")


def accessFor(settings: ApiSettings, models: ModelTable, reactor: Any) -> Access:
    """
    Who may call, and how much: an account store, or a plain key policy.

    @raise usage.UsageError: a bad DSN, key policy or model cost line.
    """
    if settings.accounts == "none":
        try:
            return PolicyAccess(policyFromSpec(settings.keys, reactor=reactor))
        except KeyPolicyError as e:
            raise usage.UsageError(str(e))
    try:
        costOf = modelCosts(models.stt, settings.model_cost)
        store = AccountStore.open(settings.accounts, reactor)
    except (ValueError, StoreError) as e:
        raise usage.UsageError(str(e))
    return AccountAccess(
        store,
        reactor,
        hourlySeconds=settings.hourly_seconds,
        anonymousSeconds=settings.anonymous_seconds if settings.anonymous == "on" else None,
        costOf=costOf,
    )


#: Seconds after start before the API says which models no producer serves
#: (nodes dial in by then, reconnecting with backoff after a farm restart).
UNSERVED_CHECK_AFTER = 15.0


class UnservedModels(Service):
    """
    Once, a while after start: a warning naming the models the API's tables
    send jobs to that no connected producer serves (every request for them
    fails with 503 until one does). C{/status} says it at any time.
    """

    def __init__(self, api: PrivoxAPI, reactor: Any, after: float = UNSERVED_CHECK_AFTER) -> None:
        self.api = api
        self.reactor = reactor
        self.after = after
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._call = self.reactor.callLater(
            self.after, lambda: Deferred.fromCoroutine(self.check())
        )

    async def check(self) -> None:
        status = await self.api.statusReport()
        missing = status.get("unserved")
        if missing is None:
            log.info(
                "no farm line names a status URL (status=...): the API cannot tell"
                " which of its models producers serve"
            )
            return
        for service, models in missing.items():
            if models:
                log.warn(
                    "no producer serves {service} model(s) {models}: requests for them get"
                    " 503 until a node serving them joins (check the stt-model and voice"
                    " lines against your nodes; /status shows it)",
                    service=service,
                    models=", ".join(models),
                )

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()


class AccountsService(Service):
    """
    Brings the account store's schema up to date as the API starts, and
    closes its connections as it stops, once the HTTP connections are
    closed (a request ending then still settles its seconds). A store that
    cannot be reached or migrated stops the process: serving without it
    would answer every request with 503.
    """

    def __init__(self, access: Access, reactor: Any, http: TrackedFactory | None = None) -> None:
        self.access = access
        self.reactor = reactor
        self.http = http

    def startService(self) -> None:
        super().startService()
        store = getattr(self.access, "store", None)
        if store is not None:
            Deferred.fromCoroutine(self._migrate(store))

    async def _migrate(self, store: AccountStore) -> None:
        try:
            version = await store.migrate()
        except Exception:
            log.failure("cannot open the account store {store}", store=store.description)
            if self.reactor.running:
                self.reactor.stop()
            return
        log.info("account store {store} at schema version {version}",
                 store=store.description, version=version)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.closeAll()
        store = getattr(self.access, "store", None)
        if store is not None:
            store.close()


def buildApi(
    settings: ApiSettings,
    exchange: Exchange,
    reactor: Any,
    registry: Any = None,
    farmStatus: Any = None,
    exchangeKey: ExchangeKey | None = None,
) -> tuple[PrivoxAPI, Site]:
    """
    The app for C{settings} over C{exchange}, and the site that serves it
    (with the upload cap applied as bodies arrive). C{registry}: the
    L{CollectorRegistry} its C{/metrics} serves (a new one if L{None});
    C{farmStatus}: what C{/status} adds per farm (L{PrivoxAPI});
    C{exchangeKey}: the exchange's signing key, for C{/v1/exchange} and
    C{/v1/enroll} (L{loadExchangeKey}).

    @raise usage.UsageError: bad model tables or key policy.
    """
    models = modelTable(settings)
    proxies = trustedProxies(settings)
    access = accessFor(settings, models, reactor)
    api = PrivoxAPI(
        exchange,
        models,
        access,
        maxUpload=settings.max_upload,
        clock=reactor,
        registry=registry,
        farmStatus=farmStatus,
        blurUsage=settings.blur_usage,
        deadline=settings.deadline,
        deadlinePerSecond=settings.deadline_per_second,
        fanout=settings.fanout,
        fanoutAbove=settings.fanout_above,
        exchangeKey=exchangeKey,
        sealRequired=settings.e2e == REQUIRED,
        proxies=proxies,
    )
    log.info(
        "API: {access}; uploads up to {max} bytes",
        access=access.description,
        max=settings.max_upload,
    )
    if len(proxies):
        log.info(
            "believing X-Forwarded-For and X-Forwarded-Proto from {n} trusted proxy"
            " network(s)",
            n=len(proxies),
        )
    return api, api.site()


def loadExchangeKey(path: str) -> ExchangeKey:
    """
    The exchange's signing key at C{path} (made there at first start), said
    in a log line by its fingerprint.

    @raise ExchangeKeyError: it cannot be read or made.
    """
    key, made = ExchangeKey.load(path)
    log.info(
        "{how} exchange key {fingerprint} in {path} (GET /v1/exchange publishes it;"
        " every API of this exchange needs this file)",
        how="made a new" if made else "the",
        fingerprint=key.fingerprint,
        path=path,
    )
    return key


_BaseOptions = optionsFor(
    ApiSettings, "Run the Privox HTTP API (the original routes and OpenAI's audio routes)."
)


class Options(_BaseOptions):  # type: ignore[misc,valid-type]
    farms: list[FarmEntry]
    #: The --ca trust root (L{loadCA}), or None for the system's CAs.
    ca: Any = None

    def postOptions(self) -> None:
        super().postOptions()
        s = self.settings
        if s.farm_registration not in REGISTRATION:
            raise usage.UsageError(f"--farm-registration must be one of {', '.join(REGISTRATION)}")
        if s.farm_refresh <= 0:
            raise usage.UsageError("--farm-refresh must be positive")
        if not s.farm and s.farm_registration == "off":
            raise usage.UsageError("no farms: give at least one --farm, or let farms join")
        self.farms = []
        for line in s.farm:
            try:
                self.farms.append(FarmEntry.parse(line))
            except ValueError as e:
                raise usage.UsageError(str(e))
        names = [f.name for f in self.farms]
        if len(set(names)) != len(names):
            raise usage.UsageError("farm names must be unique")
        modelTable(s)
        trustedProxies(s)
        if not s.listen.strip():
            raise usage.UsageError("--listen must not be empty")
        if s.max_upload < 1:
            raise usage.UsageError("--max-upload must be positive")
        if s.deadline <= 0:
            raise usage.UsageError("--deadline must be positive")
        if s.deadline_per_second < 0:
            raise usage.UsageError("--deadline-per-second must not be negative")
        if s.anonymous not in ("on", "off"):
            raise usage.UsageError("--anonymous must be on or off")
        if s.accounts != "none" and s.keys != "open":
            raise usage.UsageError("--keys applies only with --accounts none")
        if s.hourly_seconds < 0 or s.anonymous_seconds < 0:
            raise usage.UsageError("--hourly-seconds and --anonymous-seconds must not be negative")
        if s.attempts < 1 or s.pool_size < 1:
            raise usage.UsageError("--attempts and --pool-size must be at least 1")
        if s.fanout < 1 or s.fanout_above <= 0:
            raise usage.UsageError("--fanout must be at least 1, --fanout-above positive")
        if s.e2e not in MODES:
            raise usage.UsageError(f"--e2e must be one of {', '.join(MODES)}")
        if not s.exchange_key.strip():
            raise usage.UsageError("--exchange-key must name a file")
        try:
            self.ca = loadCA(s.ca) if s.ca else None
        except ValueError as e:
            raise usage.UsageError(f"--ca: {e}")
        wyomingError = wyoming.optionError(s.wyoming_listen, s.wyoming_zeroconf)
        if wyomingError:
            raise usage.UsageError(wyomingError)
        if (
            wyoming.serving(s.wyoming_listen)
            and not s.wyoming_key
            and (s.accounts == "none" or s.anonymous != "on")
        ):
            raise usage.UsageError(
                "--wyoming-listen: Wyoming clients send no key; give --wyoming-key KEY"
                " (whose account they spend), or allow anonymous use (--anonymous on)"
            )


class TrackedFactory(WrappingFactory):
    """
    Knows its open HTTP connections, so that stopping can close them and
    wait: a stopped listening port leaves accepted connections open.
    """

    noisy = False

    def __init__(self, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        self._emptied: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def serve(self, factory: Any) -> None:
        """
        Hand new connections to C{factory} from now on; the port stays.
        """
        old, self.wrappedFactory = self.wrappedFactory, factory
        if self.numPorts:
            factory.doStart()
            old.doStop()

    def closeAll(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._emptied.append(d)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return d


class ExchangeService(Service):
    """
    When the API stops (after its port): close the open HTTP connections,
    then the exchange's farm connections.
    """

    def __init__(self, exchange: Any, http: TrackedFactory | None = None) -> None:
        self.exchange = exchange
        self.http = http

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.closeAll()
        await self.exchange.stop()


def wyomingService(settings: ApiSettings, api: PrivoxAPI, reactor: Any) -> IService:
    """
    The Wyoming server on C{--wyoming-listen}, over the API's live jobs,
    for the account of C{--wyoming-key}.
    """
    factory = wyoming.WyomingFactory(
        api.live, api.access, api.models, reactor, key=settings.wyoming_key or None
    )
    return wyoming.WyomingService(
        settings.wyoming_listen,
        factory,
        reactor,
        "--wyoming-listen",
        zeroconfName=settings.wyoming_zeroconf or None,
        runInThread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
    )


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    s = options.settings
    try:
        exchangeKey = loadExchangeKey(s.exchange_key)
    except ExchangeKeyError as e:
        return CannotStart(f"{e} (--exchange-key)")
    seal = SealPolicy(s.e2e, exchangeKey.public)
    log.info("end-to-end sealing of jobs: {mode}", mode=seal.mode)
    try:
        exchange = FarmExchange(
            options.farms,
            reactor,
            key=s.farm_key,
            deadline=s.deadline,
            attempts=s.attempts,
            poolSize=s.pool_size,
            ca=options.ca,
            seal=seal,
            exchange=exchangeKey.private,
            publicOnly=s.farm_registration == "public",
        )
    except ValueError as e:
        raise usage.UsageError(str(e))
    # Farms whose lines name their status URL show their load on /status.
    remote = RemoteStatus(options.farms, reactor) if any(f.status for f in options.farms) else None
    api, site = buildApi(s, exchange, reactor, farmStatus=remote, exchangeKey=exchangeKey)
    http = TrackedFactory(site)
    top = MultiService()
    if s.farm_registration != "off":
        api.farmDirectory = FarmDirectory(
            exchange,
            farmProber(reactor, exchange.keyFor, options.ca, private=s.farm_registration == "any"),
            reactor,
            exchangeKey.private,
            options.farms,
            refresh=s.farm_refresh,
            # Shared with the exchange's other API servers.
            store=getattr(api.access, "store", None),
        )
        api.farmDirectory.prober.setServiceParent(top)
        api.accountPages.onlineSaid = max(ONLINE_SAID, MISSED_REFRESHES * s.farm_refresh)
    # A descriptor per HTTP client and farm connection: before the port.
    OpenFileLimitService().setServiceParent(top)
    TunedMallocService().setServiceParent(top)
    # Before the port, so the schema is being brought up to date first.
    AccountsService(api.access, reactor, http).setServiceParent(top)
    # Added first, stopped last: the port closes before the connections.
    ExchangeService(exchange, http).setServiceParent(top)
    log.info("API listening on {endpoint}, using {farms} farm(s)",
             endpoint=s.listen, farms=len(options.farms))
    ListenService(s.listen, http, reactor, "--listen").setServiceParent(top)
    if wyoming.serving(s.wyoming_listen):
        # After ExchangeService: stopped before it, so that its clients'
        # jobs are cancelled while the farms are still there.
        log.info("Wyoming (Home Assistant) listening on {endpoint}", endpoint=s.wyoming_listen)
        wyomingService(s, api, reactor).setServiceParent(top)
    UnservedModels(api, reactor).setServiceParent(top)
    return top
