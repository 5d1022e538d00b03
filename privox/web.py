"""
twisted.web without client addresses: every HTTP port Privox opens (the
API, and the farm's and the node's metrics) serves through L{PrivateSite},
whose channels never log a peer's address and which keeps no access log
(the combined log format records addresses).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from privox.logs import withoutPeerAddress


class PrivateHTTPChannel(HTTPChannel):
    """
    An HTTP connection whose idle timeout, and whatever its reads raise, is
    logged without the peer's address (twisted.web's own line names it).
    """

    _log = Logger()

    def connectionMade(self) -> None:
        withoutPeerAddress(self.transport)
        super().connectionMade()

    def timeoutConnection(self) -> None:
        self._log.info("closing an idle HTTP connection")
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self._log.info("aborting an HTTP connection that did not close")
        self._abortingCall = None
        self.transport.abortConnection()


class PrivateSite(Site):
    """
    A site of L{PrivateHTTPChannel}s with no access log.
    """

    protocol = PrivateHTTPChannel
    # No "Starting factory <... at 0x...>" lines: the port's line says it.
    noisy = False

    def log(self, request: Any) -> None:
        pass
