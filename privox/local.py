"""
C{twistd privox-local}: a whole exchange in one process, for trying Privox
on one machine: a farm on loopback ports, one node with the bundled models,
and the HTTP API on C{--port}. Every quality, language default and voice of
the original API maps onto the bundled models, so its curl examples work as
written. The farm, the node and the API count into one Prometheus registry:
the API's C{/metrics} shows all three, and its C{/status} the farm's load.

Blind farms (L{privox.identity}) hold here too: the exchange's key
(C{privox-exchange.key}) and the node's identity
(C{privox-node-state/identity.key}) are kept beside the SQLite account
store (in the working directory by default), and the exchange certifies
its node directly, with no HTTP between them.

A person can lend their own machine to it as on an open exchange: the API
publishes its one farm in its signed directory (C{GET /v1/farms}), and
the farm lets in the nodes the exchange certified (as a farm that joined
one does) and writes its ledger into the account store (L{StoreLedger}),
so a node run with a user's key earns that key credit, shown on
C{/account}. The banner says how.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.pages import errorPage

from privox.accounts.store import DEFAULT_DSN, AccountStore
from privox.api import wyoming
from privox.api.enrolment import DEFAULT_EXCHANGE_KEY, ExchangeKey, ExchangeKeyError
from privox.api.ledger import readRecord
from privox.api.farmdirectory import FarmDirectory, farmProber, readNodes
from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.api.models import DEFAULT_VOICES, OPENAI_VOICES, QUALITIES
from privox.api.service import ApiSettings, TrackedFactory, buildApi
from privox.api.wyoming import Announcement, WyomingFactory
from privox.config import optionsFor, setting
from privox.daemon import ListenService, stopWithStatus
from privox.engines.base import ModelNotFound
from privox.engines.registry import ModelSpec, SpecError, createEngine
from privox.farm.connection import FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.farm.splice import splicerFor
from privox.farm.vouching import Vouching
from privox.keys import OpenPolicy, accountId, keyId
from privox.farm.observe import farmStatus, instrumentFarm, onlineNodes
from privox.metrics import CollectorRegistry
from privox.node.enrolment import (
    DEFAULT_STATE_DIR,
    Enrolment,
    IdentityFileError,
    loadIdentity,
)
from privox.node.service import NodeService, NodeSettings
from privox.periodic import Periodic
from privox.sealing import MODES, REQUIRED, SealPolicy
from privox.web import PrivateSite

log = Logger()


class CannotServe(Exception):
    "A port named on the command line cannot be had (said in one line)."


#: Where privox-local serves Wyoming unless told otherwise (the port
#: wyoming-faster-whisper uses: Home Assistant's examples name it).
DEFAULT_WYOMING = "tcp:10300:interface=127.0.0.1"


@dataclass(frozen=True)
class LocalSettings:
    port: int = setting(8080, "HTTP port of the API (0: any free port).")
    interface: str = setting("127.0.0.1", "Address the API listens on.")
    accounts: str = setting(
        DEFAULT_DSN,
        "Account store (keys, quotas; privox keys create/import manage it): sqlite:PATH,"
        " postgresql://..., or 'none' (no quotas).",
    )
    anonymous: str = setting(
        "on", "'on': requests without a key share --anonymous-seconds; 'off': they get 401."
    )
    anonymous_seconds: float = setting(
        3600.0, "Audio seconds per rolling hour shared by all requests without a key."
    )
    keys: str = setting(
        "open",
        "With --accounts none: user keys 'open' (any non-empty key), an allow-list file, or a URL.",
    )
    stt: str = setting("whisper:tiny.en", "The STT model every quality maps to.")
    tts: str = setting("piper:en_US-joe-medium", "The TTS model every voice maps to.")
    slots: int = setting(1, "Concurrent jobs per service.")
    max_upload: int = setting(200 * 1024 * 1024, "Largest upload in bytes.")
    deadline: float = setting(
        60.0, "Seconds a request may take, plus --deadline-per-second per second of audio."
    )
    deadline_per_second: float = setting(
        1.0, "Seconds added to --deadline per second of audio (STT) or of speech (TTS)."
    )
    fanout: int = setting(8, "Pieces of a long recording transcribed at once.")
    fanout_above: float = setting(
        60.0, "Recordings longer than this many seconds are cut into pieces of about 30 s."
    )
    blur_usage: bool = setting(False, "Round sizes and times in log lines (privacy).")
    e2e: str = setting(
        REQUIRED,
        "Seal jobs end to end between the API and the node: 'required', 'preferred' or 'off'.",
    )
    wyoming_listen: str = setting(
        DEFAULT_WYOMING,
        "Twisted server endpoint string of the Wyoming server (Home Assistant's Assist: STT"
        " and TTS on one port); 'none': no Wyoming server.",
    )
    wyoming_key: str = setting(
        "", "The key whose account Wyoming clients spend (they send none); empty: anonymous use."
    )
    wyoming_zeroconf: str = setting(
        "",
        "Announce the Wyoming port over mDNS (_wyoming._tcp, which Home Assistant discovers)"
        " under this name; needs python-zeroconf.",
    )


_BaseOptions = optionsFor(
    LocalSettings,
    "Run a whole Privox exchange (farm, API, one node) in one process.",
)


class Options(_BaseOptions):  # type: ignore[misc,valid-type]
    def postOptions(self) -> None:
        super().postOptions()
        s = self.settings
        for spec, service in ((s.stt, "stt"), (s.tts, "tts")):
            try:
                parsed = ModelSpec.parse(spec)
            except SpecError as e:
                raise usage.UsageError(str(e))
            if parsed.service != service:
                raise usage.UsageError(f"--{service} needs a {service} engine, not {spec}")
        if s.anonymous not in ("on", "off"):
            raise usage.UsageError("--anonymous must be on or off")
        if s.accounts != "none" and s.keys != "open":
            raise usage.UsageError("--keys applies only with --accounts none")
        if s.slots < 1:
            raise usage.UsageError("--slots must be at least 1")
        if s.fanout < 1 or s.fanout_above <= 0:
            raise usage.UsageError("--fanout must be at least 1, --fanout-above positive")
        if s.e2e not in MODES:
            raise usage.UsageError(f"--e2e must be one of {', '.join(MODES)}")
        wyomingError = wyoming.optionError(s.wyoming_listen, s.wyoming_zeroconf)
        if wyomingError:
            raise usage.UsageError(wyomingError)


#: Seconds between two notes of the nodes online at the local farm.
ONLINE_EVERY = 5.0
#: The account the local farm's ledger records are the farm's of.
LOCAL_FARM = accountId("privox-local farm")


def keyDirectory(settings: LocalSettings) -> str:
    """
    Where the exchange's and the node's keys are kept: beside a SQLite
    account store, else in the working directory.
    """
    if settings.accounts.startswith("sqlite:"):
        return os.path.dirname(settings.accounts[len("sqlite:"):])
    return ""


def apiSettings(s: LocalSettings) -> ApiSettings:
    """
    The API's tables with everything pointing at the bundled models.
    """
    stt = ModelSpec.parse(s.stt).name
    tts = ModelSpec.parse(s.tts).name
    voices = [line.split()[0] for line in DEFAULT_VOICES] + sorted(OPENAI_VOICES)
    return ApiSettings(
        blur_usage=s.blur_usage,
        accounts=s.accounts,
        anonymous=s.anonymous,
        anonymous_seconds=s.anonymous_seconds,
        keys=s.keys,
        max_upload=s.max_upload,
        deadline=s.deadline,
        deadline_per_second=s.deadline_per_second,
        fanout=s.fanout,
        fanout_above=s.fanout_above,
        e2e=s.e2e,
        stt_model=tuple(f"{quality} {stt} {stt}" for quality in QUALITIES),
        voice=tuple(f"{name} {tts}" for name in voices),
    )


class LocalExchange(MultiService):
    """
    Listens on the API's port first (so a taken port ends it at once,
    before any model loads), answering 503 until ready; then starts the
    parts in order: farm ports, then the node and the API that need them.
    """

    def __init__(self, settings: LocalSettings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        farmSettings = FarmSettings(name="local", stats_interval=0.0, blur_usage=settings.blur_usage)
        self.farm = Farm(
            farmSettings,
            reactor,
            OpenPolicy(),
            OpenPolicy(),
            splicer=splicerFor(farmSettings.splice_min, reactor),
            runInThread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        )
        # One registry for the farm, the node and the API: the API's
        # /metrics shows them all.
        self.registry = CollectorRegistry()
        instrumentFarm(self.farm, self.registry)
        self._ports: list[Any] = []
        self.node: NodeService | None = None
        self.enrolment: Enrolment | None = None
        self.exchange: FarmExchange | None = None
        self.store: AccountStore | None = None
        self.wyoming: WyomingFactory | None = None
        #: The Wyoming server's listening port, once it listens.
        self.wyomingPort: Any = None
        self._announcement: Announcement | None = None
        self._http = TrackedFactory(
            PrivateSite(errorPage(503, "Starting", "Privox is starting; try again in a moment."))
        )
        self.web = ListenService(
            f"tcp:{settings.port}:interface={settings.interface}",
            self._http,
            reactor,
            "--port (make run PORT=8090)",
        )
        self.web.setServiceParent(self)
        self.ready: Deferred[None] = Deferred()
        self.url = f"http://{settings.interface}:{settings.port}"

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed)

    async def _start(self) -> None:
        s = self.settings
        web = await self.web.listening
        self.url = f"http://{s.interface}:{web.getHost().port}"
        endpoints = {}
        for service in ("stt", "tts"):
            port = await TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(
                FarmFactory(self.farm, service)
            )
            self._ports.append(port)
            endpoints[service] = f"tcp:host=127.0.0.1:port={port.getHost().port}"
        keys = keyDirectory(s)
        exchangeKey, _ = ExchangeKey.load(os.path.join(keys, DEFAULT_EXCHANGE_KEY))
        # Nodes the exchange certified name no key here (privox.farm.vouching).
        self.farm.vouching = Vouching(LOCAL_FARM[:12], exchangeKey.public)
        identity, _ = loadIdentity(os.path.join(keys, DEFAULT_STATE_DIR))
        nodeKey = ""

        async def certify(public: bytes) -> str:
            # The exchange is here: no HTTP, no key to check.
            return exchangeKey.issue(public, accountId(nodeKey), self._reactor.seconds()).text

        self.enrolment = Enrolment(
            identity, exchangeKey.public, certify, self._reactor, account=keyId(nodeKey)
        )
        self.node = NodeService(
            NodeSettings(
                stt_farm=(endpoints["stt"],), tts_farm=(endpoints["tts"],),
                stt=(s.stt,), tts=(s.tts,), slots=s.slots, retry_max=2.0,
                blur_usage=s.blur_usage,
            ),
            [createEngine(ModelSpec.parse(s.stt)), createEngine(ModelSpec.parse(s.tts))],
            self._reactor,
            stopOnFailure=False,  # said and handled here
            registry=self.registry,
            sealer=self.enrolment,
        )
        self.node.startService()
        await self.node.ready
        # Serve only once every slot has joined the farm, so the first
        # request cannot find the model missing.
        for slot in self.node.slots:
            await slot.joined()
        api = apiSettings(s)
        seal = SealPolicy(s.e2e, exchangeKey.public)
        # The farm vouches like one that joined (member): the directory
        # says so, nodes that find it there show it no key, and the API
        # shows it passes.
        entry = FarmEntry("local", endpoints["stt"], endpoints["tts"], member=LOCAL_FARM[:12])
        log.info("end-to-end sealing of jobs: {mode}", mode=seal.mode)
        self.exchange = FarmExchange(
            [entry],
            self._reactor,
            deadline=api.deadline,
            attempts=1,
            poolSize=max(s.slots * 2, s.fanout),
            seal=seal,
            exchange=exchangeKey.private,
        )
        api, site = buildApi(
            api,
            self.exchange,
            self._reactor,
            registry=self.registry,
            farmStatus=lambda: {"local": farmStatus(self.farm)},
            exchangeKey=exchangeKey,
        )
        self.store = getattr(api.access, "store", None)
        if self.store is not None:
            version = await self.store.migrate()
            log.info("account store {store} at schema version {version}",
                     store=self.store.description, version=version)
            self.farm.ledger = StoreLedger(api.access)
            # Its nodes online now, for /account, as a farm that joined an
            # exchange says them when it registers.
            Periodic(self._reactor, ONLINE_EVERY, self._noteOnline).setServiceParent(self)
        # Its one farm, for nodes that find farms in the directory.
        api.farmDirectory = FarmDirectory(
            self.exchange, farmProber(self._reactor, self.exchange.keyFor, private=True),
            self._reactor, exchangeKey.private, [entry], joining=False,
        )
        # From now on new connections reach the API itself.
        self._http.serve(site)
        for line in banner(self.url, s, exchangeKey.publicText):
            log.info("{line}", line=line)
        if wyoming.serving(s.wyoming_listen):
            await self._serveWyoming(api)
        self.ready.callback(None)

    async def _noteOnline(self) -> None:
        assert self.store is not None
        online = readNodes(onlineNodes(self.farm))
        await self.store.noteOnline("local", online, self._reactor.seconds())

    async def _serveWyoming(self, api: Any) -> None:
        """
        The Wyoming server, for Home Assistant. The default port taken (by
        another Wyoming server, say) is a warning; a port named that cannot
        be had ends the exchange.
        """
        s = self.settings
        self.wyoming = WyomingFactory(
            api.live, api.access, api.models, self._reactor, key=s.wyoming_key or None
        )
        try:
            self.wyomingPort = await serverFromString(self._reactor, s.wyoming_listen).listen(
                self.wyoming
            )
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            if s.wyoming_listen != DEFAULT_WYOMING:
                raise CannotServe(
                    f"cannot listen on {s.wyoming_listen} for Wyoming: {reason}; choose"
                    " another with --wyoming-listen, or 'none'"
                ) from None
            log.warn(
                "no Wyoming server: cannot listen on {endpoint}: {reason} (another Wyoming"
                " server?); choose another port with --wyoming-listen, or 'none'",
                endpoint=s.wyoming_listen, reason=reason,
            )
            return
        host = self.wyomingPort.getHost()
        log.info(
            "Home Assistant (Wyoming) can use this exchange at {host} port {port}",
            host=host.host, port=host.port,
        )
        if not s.wyoming_key and (s.accounts == "none" or s.anonymous != "on"):
            log.warn(
                "Wyoming clients send no key and this exchange refuses requests without one:"
                " give --wyoming-key KEY (whose account they spend)"
            )
        if s.wyoming_zeroconf:
            self._announcement = Announcement(
                s.wyoming_zeroconf,
                succeed(self.wyomingPort),
                partial(deferToThreadPool, self._reactor, self._reactor.getThreadPool()),
            )
            self._announcement.startService()

    def _failed(self, failure: Any) -> None:
        if failure.check(ModelNotFound, ExchangeKeyError, IdentityFileError, CannotServe):
            log.critical("the local exchange cannot start: {reason}", reason=str(failure.value))
        else:
            log.failure("the local exchange could not start", failure)
        self.ready.errback(failure)
        stopWithStatus(self._reactor, 1)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # The API's port closes first (the children), then the farm's.
        await super().stopService()
        if self._announcement is not None:
            await self._announcement.stopService()
        if self.wyomingPort is not None:
            await self.wyomingPort.stopListening()
        if self.wyoming is not None:
            await self.wyoming.closeAll()
        for port in self._ports:
            await port.stopListening()
        await self._http.closeAll()
        if self.exchange is not None:
            await self.exchange.stop()
        if self.node is not None:
            await self.node.stopService()
        await self.farm.shutdown()
        if self.farm.ledger is not None:
            await self.farm.ledger.stop()
        if self.store is not None:
            self.store.close()


class StoreLedger:
    """
    The farm's ledger, straight into the account store, as a farm's C{POST
    /v1/ledger} puts it there: the jobs a node served under a user's key
    earn that key credit.

    Not durable: answers do not wait for the store (a record or two lost
    to a crash of a local exchange costs less than every answer waiting).
    """

    description = "the account store"
    durable = False

    def __init__(self, access: Any) -> None:
        self._access = access
        self._writing: set[Deferred[None]] = set()

    def record(self, transaction: dict[str, Any]) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._write(transaction))
        self._writing.add(d)
        d.addBoth(lambda _: self._writing.discard(d))
        # The answer does not wait for it.
        return succeed(None)

    async def _write(self, transaction: dict[str, Any]) -> None:
        try:
            await self._access.record(LOCAL_FARM, [readRecord(transaction)])
        except Exception:
            log.failure("cannot put a job in the account store's ledger")

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return DeferredList(list(self._writing)).addCallback(lambda _: None)


def banner(url: str, settings: LocalSettings, exchangeKey: str | None = None) -> list[str]:
    """
    The lines that tell a new user where the exchange is and how to call it.
    """
    if settings.accounts == "none":
        intro = "Try it (any non-empty key works here):"
        form, header = " -F key=demo", " -H 'Authorization: Bearer demo'"
    elif settings.anonymous == "on":
        intro, form, header = "Try it (no key needed here):", "", ""
    else:
        intro = f"Try it with a key from: privox keys create --accounts {settings.accounts}"
        form, header = " -F key=KEY", " -H 'Authorization: Bearer KEY'"
    lines = [
        f"Privox is serving on {url}",
        intro,
        f"  curl -s {url}/tts{form.replace('-F', '-d')} -d voice=voice1 -d 'text=Hello from Privox.' -o hello.wav",
        f"  curl -s {url}/stt{form} -F quality=fast -F file=@hello.wav",
        f"  curl -s {url}/v1/audio/transcriptions{header} -F model=whisper-1 -F file=@hello.wav",
    ]
    if settings.accounts != "none":
        lines += [
            "Keys and quotas:",
            f"  privox keys create --accounts {settings.accounts}",
            f"  curl -s {url}/v1/account -H 'Authorization: Bearer KEY'",
            f"Your account in a browser: {url}/signup",
        ]
        if exchangeKey is not None:
            lines += [
                "Lend this exchange a node of your own, and earn its credit (on /account):",
                f"  .venv/bin/twistd -n privox-node --exchange {url} --exchange-key {exchangeKey}"
                f" --key YOUR-KEY --stt {settings.stt} --state-dir my-node",
            ]
    return lines


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    return LocalExchange(options.settings, reactor)
