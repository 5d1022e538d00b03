"""
A farm on in-memory transports and a fake clock, and peers that speak to it
frame by frame. Shared by the farm's protocol tests.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from privox.farm.connection import FarmConnection, FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.keys import OpenPolicy
from privox.framing import Frame, FrameDecoder, encodeFrame
from privox.messages import controlFrame


class Peer:
    """
    One connection to the farm, driven by hand.
    """

    def __init__(self, farm: Farm, service: str) -> None:
        self._clock = farm.clock
        self.transport = StringTransport()
        self.protocol: FarmConnection = FarmFactory(farm, service).buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        assert self.transport.value() == b"who"
        self.transport.clear()
        self._decoder = FrameDecoder(1 << 26)

    def raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        # The reactor's turn ends: what the farm wrote goes out (Farm.cork).
        self._clock.advance(0)

    def send(self, verb: bytes, fields: dict[str, Any] | None = None) -> None:
        self.raw(controlFrame(verb, fields) if fields is not None else encodeFrame(verb))

    def data(self, payload: bytes) -> None:
        self.raw(encodeFrame(b"DATA", payload))

    def frames(self) -> list[Frame]:
        """
        The frames the farm sent since the last call.
        """
        out = self.transport.value()
        self.transport.clear()
        return self._decoder.feed(out)

    def messages(self) -> list[tuple[str, Any]]:
        """
        The frames as (verb, decoded JSON, or raw bytes for DATA).
        """
        return [
            (f.verb.decode(), f.payload if f.verb == b"DATA" else json.loads(f.payload or b"{}"))
            for f in self.frames()
        ]

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected


class FarmHarness:
    def __init__(self, producerKeys: Any = None, consumerKeys: Any = None, **settings: Any) -> None:
        settings.setdefault("stats_interval", 0.0)
        self.clock = Clock()
        self.farm = Farm(
            FarmSettings(**settings),
            self.clock,
            producerKeys or OpenPolicy(),
            consumerKeys or OpenPolicy(),
        )

    def peer(self, service: str = "stt") -> Peer:
        return Peer(self.farm, service)

    def producer(
        self, service: str = "stt", models: list[str] = ["*"], languages: list[str] = [], key: str = "pk",
        seal: dict[str, str] | None = None, earlySeal: bool = False,
    ) -> Peer:
        peer = self.peer(service)
        hello = {"protocol": 2, "role": "producer", "service": service,
                 "key": key, "models": models, "languages": languages}
        if seal is not None:
            hello["seal"] = seal  # its shape is all a farm checks
        if earlySeal:
            hello["early_seal"] = True
        peer.send(b"HELO", hello)
        [(verb, _)] = peer.messages()
        assert verb == "OKAY", verb
        return peer

    def consumer(self, service: str = "stt", key: str = "ck") -> Peer:
        peer = self.peer(service)
        peer.send(b"HELO", {"protocol": 2, "role": "consumer", "service": service, "key": key})
        [(verb, _)] = peer.messages()
        assert verb == "OKAY", verb
        return peer


class ManualPolicy:
    """
    A key policy whose answers the test gives by hand.
    """

    description = "manual"

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred[bool]]] = []

    def check(self, key: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append((key, d))
        return d
