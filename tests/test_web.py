"""
L{privox.web}: HTTP ports that never log a client's address, not even when
twisted.web times an idle client out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from privox.api.site import ApiSite
from privox.metrics import CollectorRegistry, metricsSite
from privox.web import PrivateSite


class NoAddressTests(SynchronousTestCase):
    def events(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        return seen

    def test_idleTimeout(self) -> None:
        """
        A client that opens a connection and says nothing is timed out, and
        the log lines about it (the timeout, the forced abort) name no
        address, whichever of Privox's HTTP sites it came to.
        """
        sites = [
            PrivateSite(Resource()),
            metricsSite(CollectorRegistry()),
            ApiSite(Resource(), maxUpload=100),
        ]
        for site in sites:
            seen = self.events()
            clock = Clock()
            channel = site.buildProtocol(None)
            channel.callLater = clock.callLater
            peer = IPv4Address("TCP", "203.0.113.7", 41234)
            transport = StringTransport(peerAddress=peer)
            channel.makeConnection(transport)
            clock.advance(channel.timeOut + channel.abortTimeout + 1)
            self.assertTrue(transport.disconnecting)
            text = repr(seen)
            self.assertIn("idle HTTP connection", text)
            self.assertNotIn("203.0.113.7", text)
            self.assertNotIn("41234", text)
            self.assertIsNone(site.log(object()))
