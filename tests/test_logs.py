"""
L{privox.logs.ClassicText}: the text twistd's own log would have, faster;
and L{privox.logs.withoutPeerAddress}: no peer's address in the log.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, Logger, formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from privox.farm.connection import FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.keys import OpenPolicy
from privox.logs import ClassicText, withoutPeerAddress
from privox.api.wyoming import WyomingFactory
from privox.web import PrivateSite
from tests.support import recorded, until
from tests.test_wyoming import TABLE, FakeAccess, FakeJobs


class _Thing:
    size = 7

    def __repr__(self) -> str:
        return "<thing>"

    def name(self) -> str:
        return "called"


class _Unprintable:
    def __str__(self) -> str:
        raise ValueError("no")

    __repr__ = __str__


def _events() -> list[dict[str, Any]]:
    """
    What a daemon logs, and what else an observer may be handed.
    """
    events: list[dict[str, Any]] = []
    log = Logger(namespace="privox.test", observer=events.append)
    log.info(
        "job {job_id} {service} {model} {outcome} in {ms} ms ({bytes_in} bytes in)",
        job_id="ab12cd34ef56", service="stt", model="whisper:tiny.en", outcome="ok",
        ms=12.345678, bytes_in=1024,
    )
    log.warn("spec {n:08.3f} conversions {t!r} {t!s} {t!a} attribute {t.size}", n=3.25, t=_Thing())
    log.error("indexing {d[k]} {l[1]} escapes {{literal}} unicode {u}", d={"k": "v"}, l=[1, 2], u="naïve ✓")
    log.info("a call {t.name()} goes Twisted's way", t=_Thing())
    log.info("a missing {field}")
    log.info("a positional {} field")
    log.info("unprintable {x}", x=_Unprintable())
    log.info("two\nlines {a}", a="and\nthree")
    log.info("")
    log.debug("nested spec {n:{width}}", n=5, width=4)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it failed {why}", Failure(), why="badly")
    events.append({"log_format": "no time, namespace or level"})
    events.append({"log_format": b"bytes format {x}", "x": 1, "log_time": 1.5e9})
    events.append({"log_format": None, "log_time": 1.5e9})
    events.append({"log_time": 1.5e9})
    events.append({"log_format": "legacy {log_text}", "log_text": "hi", "log_system": "HTTPChannel,3,127.0.0.1",
                   "log_time": 1.5e9, "log_level": LogLevel.info})
    events.append({"log_format": "odd system", "log_system": 42, "log_time": 1.5e9})
    events.append({"log_format": "odd system", "log_system": _Unprintable(), "log_time": 1.5e9})
    events.append({"log_format": "integer time", "log_time": 1500000000})
    events.append({"log_format": 42, "log_time": 1.5e9})
    return events


class ClassicTextTests(SynchronousTestCase):
    def test_sameAsTwisted(self) -> None:
        """
        Every event reads exactly as L{formatEventAsClassicLogText} has it,
        the unusual ones included (they go to it).
        """
        classic = ClassicText()
        for event in _events():
            self.assertEqual(classic(event), formatEventAsClassicLogText(event), event.get("log_format"))

    def test_timeStampPerSecond(self) -> None:
        """
        The stamp is reused within its second and made afresh for the next.
        """
        classic = ClassicText()
        base = 1_700_000_000.0
        for when in (base + 0.1, base + 0.9, base + 1.0, base + 0.5, base + 3601.25):
            event = {"log_format": "tick", "log_time": when, "log_system": "-"}
            self.assertEqual(classic(event), formatEventAsClassicLogText(event))



class _Broken(Protocol):
    """
    A server whose reads raise: Twisted logs that as an unhandled error.
    """

    def connectionMade(self) -> None:
        withoutPeerAddress(self.transport)

    def dataReceived(self, data: bytes) -> None:
        raise ZeroDivisionError("a bug")


def breakReads(protocol: Any) -> None:
    "Make a connection's reads raise, as a bug would."
    protocol.dataReceived = _Broken.dataReceived.__get__(protocol)


async def unhandledError(test: TestCase, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The error a read raised, once it is logged (by the reactor's older log
    API, as "failure"; by twisted.web's, as "log_failure").
    """
    await until(
        lambda: any("failure" in e or "log_failure" in e for e in seen), "the error logged"
    )
    test.flushLoggedErrors(ZeroDivisionError)
    [event] = [e for e in seen if "failure" in e or "log_failure" in e]
    return event


def assertNoAddress(test: TestCase, seen: list[dict[str, Any]]) -> None:
    """
    No event names the peer's address, in its text or its system.
    """
    for event in seen:
        text = formatEventAsClassicLogText(event) or ""
        test.assertNotIn("127.0.0.1", text + repr(event.get("log_system")))


class WithoutPeerAddressTests(TestCase):
    """
    What a connection's reads raise is logged with no peer address, over
    real TCP: a plain protocol, Privox's HTTP sites, a farm (over TLS:
    tests.test_tls) and the API's Wyoming server.
    """

    def setUp(self) -> None:
        self.seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.seen.append)

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def connect(self, port: int) -> Protocol:
        endpoint = clientFromString(reactor, f"tcp:127.0.0.1:{port}")
        client = await connectProtocol(endpoint, Protocol())
        self.addCleanup(client.transport.abortConnection)
        return client

    async def test_protocol(self) -> None:
        client = await self.connect(self.listen(Factory.forProtocol(_Broken)))
        client.transport.write(b"x")
        event = await unhandledError(self, self.seen)
        self.assertRegex(event["log_system"], r"^_Broken,\d+$")
        assertNoAddress(self, self.seen)

    async def brokenServer(self, factory: Factory, protocol: str) -> None:
        """
        A connection to C{factory} whose reads raise names C{protocol} and
        no address.
        """
        made: list[Any] = []
        client = await self.connect(self.listen(recorded(factory, made)))
        await until(lambda: bool(made), "the server's connection")
        breakReads(made[0])
        client.transport.write(b"x")
        event = await unhandledError(self, self.seen)
        self.assertRegex(event["log_system"], rf"^{protocol},\d+$")
        assertNoAddress(self, self.seen)

    async def test_httpSite(self) -> None:
        await self.brokenServer(PrivateSite(Resource()), "PrivateHTTPChannel")

    async def test_farm(self) -> None:
        farm = Farm(FarmSettings(stats_interval=0.0), reactor, OpenPolicy(), OpenPolicy())
        await self.brokenServer(FarmFactory(farm, "stt"), "FarmConnection")

    async def test_wyoming(self) -> None:
        factory = WyomingFactory(FakeJobs(), FakeAccess(), TABLE, reactor)  # type: ignore[arg-type]
        await self.brokenServer(factory, "WyomingProtocol")
