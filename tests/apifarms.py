"""
Farms that misbehave in the ways the API's farm exchange must survive, on
real loopback sockets: producers that hang, drop their job, or hold the only
producer busy; ports nobody listens on; and a reactor that counts the
connections it is asked to make.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from privox.api.farmlist import FarmEntry
from privox.consumer import ConsumerProtocol, connectConsumer
from privox.engines.errors import EngineError
from privox.messages import ErrorCode
from privox.node.echo import DigestHandler
from privox.node.worker import Answer, ProducerProtocol
from tests.loopbackfarm import LoopbackFarm
from tests.support import until


class _HangingRun:
    def __init__(self, engine: HangingEngine) -> None:
        self.engine = engine
        self.answer: Deferred[Answer] = Deferred()
        self.finishing = False

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> Deferred[Answer]:
        self.finishing = True
        return self.answer

    def cancel(self) -> None:
        self.engine.cancelled += 1
        # Answer (FAIL cancelled) only if the producer is waiting for one.
        if self.finishing and not self.answer.called:
            self.answer.errback(EngineError("cancelled", ErrorCode.CANCELLED))


class HangingEngine:
    """
    Accepts every job and never answers it (until the farm cancels it).
    """

    models = ("*",)
    languages = ()

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    def start(self, job: dict[str, Any]) -> _HangingRun:
        self.started += 1
        return _HangingRun(self)


class DroppingEngine(HangingEngine):
    """
    Disconnects from the farm as soon as it is given a job (the consumer gets
    C{producer_lost}).
    """

    protocol: ProducerProtocol | None = None

    def start(self, job: dict[str, Any]) -> _HangingRun:
        run = super().start(job)
        assert self.protocol is not None
        reactor.callLater(0, self.protocol.transport.abortConnection)
        return run


class LiveFarm:
    """
    A L{LoopbackFarm} plus the producers and consumers a test gave it, all
    closed on L{stop} (waiting until every socket is really gone).
    """

    def __init__(self, name: str, **settings: Any) -> None:
        settings.setdefault("shutdown_grace", 1.0)
        self.name = name
        self.loopback = LoopbackFarm(**settings)
        self.farm = self.loopback.farm
        self.producers: list[ProducerProtocol] = []
        self.consumers: list[ConsumerProtocol] = []

    async def start(self) -> LiveFarm:
        await self.loopback.listen()
        return self

    async def producer(self, service: str, handler: Any = None) -> ProducerProtocol:
        protocol = await self.loopback.producer(service, handler or DigestHandler())
        self.producers.append(protocol)
        if isinstance(handler, DroppingEngine):
            handler.protocol = protocol
        return protocol

    async def consumer(self, service: str) -> ConsumerProtocol:
        protocol = await connectConsumer(reactor, self.loopback.endpoint(service), service)
        self.consumers.append(protocol)
        return protocol

    def entry(self, weight: float = 1.0, fallback: bool = False) -> FarmEntry:
        return FarmEntry(
            self.name,
            self.loopback.endpoint("stt"),
            self.loopback.endpoint("tts"),
            weight,
            fallback,
        )

    def port(self, service: str) -> int:
        return self.loopback.ports[service].getHost().port

    def consumerConnections(self) -> int:
        """
        Consumer connections the farm has now.
        """
        from privox.farm.sessions import ConsumerSession

        return sum(isinstance(c.session, ConsumerSession) for c in self.farm.connections)

    async def stop(self) -> None:
        for consumer in self.consumers:
            consumer.transport.loseConnection()
        await DeferredList([c.disconnected for c in self.consumers])
        await self.loopback.stop()
        await DeferredList([p.disconnected for p in self.producers])
        await until(lambda: not self.farm.connections, "the farm's connections closed", 2.0)


async def startFarm(testCase: Any, name: str, **settings: Any) -> LiveFarm:
    """
    A running L{LiveFarm}, stopped when C{testCase} cleans up.
    """
    farm = await LiveFarm(name, **settings).start()
    testCase.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
    return farm


async def closedPort() -> int:
    """
    A loopback port nothing listens on (connections to it are refused).
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    number = port.getHost().port
    await port.stopListening()
    return number


def deadEntry(name: str, port: int, fallback: bool = False, weight: float = 1.0) -> FarmEntry:
    endpoint = f"tcp:host=127.0.0.1:port={port}"
    return FarmEntry(name, endpoint, endpoint, weight, fallback)


class CountingReactor:
    """
    The real reactor, counting the TCP connections it is asked to open, by
    port.
    """

    def __init__(self, real: Any = reactor) -> None:
        self._real = real
        self.attempts: dict[int, int] = {}

    def connectTCP(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.attempts[port] = self.attempts.get(port, 0) + 1
        return self._real.connectTCP(host, port, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


async def hangUpServer(testCase: Any) -> int:
    """
    A loopback port that accepts connections and closes them at once, before
    any greeting (a handshake that fails). Stopped on cleanup.
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_HangUp)
    )
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


class RecordingEngine(DigestHandler):
    """
    A L{DigestHandler} that keeps the JOB_ fields it was given.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.jobs: list[dict[str, Any]] = []

    def start(self, job: dict[str, Any]) -> Any:
        self.jobs.append(job)
        return super().start(job)
