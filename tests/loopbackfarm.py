"""
A farm on ephemeral loopback ports in the test process, for tests that need
real sockets.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from privox.consumer import ConsumerProtocol
from privox.farm.connection import FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.farm.splice import splicerFor
from privox.framing import Frame
from privox.keys import OpenPolicy
from privox.messages import decodeObject
from privox.node.worker import ProducerProtocol


class LoopbackFarm:
    """
    A farm listening on two ephemeral loopback ports, relaying large DATA
    through the kernel as twistd's farm does (unless C{splice_min=0}).
    """

    def __init__(self, **settings) -> None:
        settings.setdefault("stats_interval", 0.0)
        farmSettings = FarmSettings(**settings)
        self.farm = Farm(
            farmSettings, reactor, OpenPolicy(), OpenPolicy(),
            splicer=splicerFor(farmSettings.splice_min, reactor),
        )
        self.ports = {}

    async def listen(self, ports: dict[str, int] | None = None) -> None:
        for service in ("stt", "tts"):
            port = (ports or {}).get(service, 0)
            endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
            self.ports[service] = await endpoint.listen(FarmFactory(self.farm, service))

    def endpoint(self, service: str) -> str:
        return f"tcp:host=127.0.0.1:port={self.ports[service].getHost().port}"

    async def producer(self, service: str, handler, sealer=None) -> ProducerProtocol:
        protocol = ProducerProtocol(service, "producer-key", handler, sealer)
        port = self.ports[service].getHost().port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
        await protocol.ready
        return protocol

    async def stop(self) -> None:
        for port in self.ports.values():
            await port.stopListening()
        await self.farm.shutdown()


class StallingUpload(ConsumerProtocol):
    """
    A consumer that sends only the first half of its upload once assigned,
    so its job stays mid-upload on the producer for as long as the test likes.
    """

    def __init__(self, service: str) -> None:
        super().__init__(service)
        self.assigned: Deferred[None] = Deferred()

    def frameReceived(self, frame: Frame) -> None:
        pending = self._pending
        if frame.verb == b"ASGN" and pending is not None:
            pending.id = decodeObject(frame).get("id")
            self.sendData(pending.body[: len(pending.body) // 2])
            self.assigned.callback(None)
            return
        super().frameReceived(frame)
