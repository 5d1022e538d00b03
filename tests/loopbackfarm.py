"""
A farm on ephemeral loopback ports in the test process, for tests that need
real sockets.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from privox.farm.connection import FarmFactory
from privox.farm.farm import Farm, FarmSettings
from privox.keys import OpenPolicy
from privox.node.worker import ProducerProtocol


class LoopbackFarm:
    """
    A farm listening on two ephemeral loopback ports.
    """

    def __init__(self, **settings) -> None:
        settings.setdefault("stats_interval", 0.0)
        self.farm = Farm(FarmSettings(**settings), reactor, OpenPolicy(), OpenPolicy())
        self.ports = {}

    async def listen(self, ports: dict[str, int] | None = None) -> None:
        for service in ("stt", "tts"):
            port = (ports or {}).get(service, 0)
            endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
            self.ports[service] = await endpoint.listen(FarmFactory(self.farm, service))

    def endpoint(self, service: str) -> str:
        return f"tcp:host=127.0.0.1:port={self.ports[service].getHost().port}"

    async def producer(self, service: str, handler) -> ProducerProtocol:
        protocol = ProducerProtocol(service, "producer-key", handler)
        port = self.ports[service].getHost().port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
        await protocol.ready
        return protocol

    async def stop(self) -> None:
        for port in self.ports.values():
            await port.stopListening()
        await self.farm.shutdown()
