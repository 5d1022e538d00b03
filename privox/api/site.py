"""
The API's HTTP server: how large a body each route may bring, enforced as
it arrives, and no client address in any log.

A body over its route's limit (L{bodyLimit}) is refused the moment that is
known: from C{Content-Length} once the headers are in (whether or not the
client asked with C{Expect: 100-continue}), or as a chunked body's chunks
add up. The client gets a 413 at once and what it still sends is read and
dropped, not buffered, until it closes (or stops sending for
L{LINGER_IDLE} seconds, or L{LINGER_MAX} have passed): closing while it
still sends would reset the connection and could destroy the 413 before the
client reads it. Only the two upload routes take large bodies; a form
without a file or a JSON request is capped at L{FORM_LIMIT}, so nobody can
make the API buffer, or parse, megabytes of text.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.server import Request

from privox.api.errors import errorBody, tooLarge
from privox.web import PrivateHTTPChannel, PrivateSite

#: Routes whose bodies carry an audio file: up to the API's --max-upload.
UPLOAD_ROUTES = frozenset([b"/stt", b"/v1/audio/transcriptions", b"/v1/audio/translations"])
#: A farm's batch of ledger records (500 records are about 150 KB).
LEDGER_ROUTE = b"/v1/ledger"
LEDGER_LIMIT = 4 * 1024 * 1024
#: Any other body: a form without a file, OpenAI's JSON speech request.
#: Text to speak is at most 5,000 characters, percent-encoded or JSON-escaped.
FORM_LIMIT = 256 * 1024
#: A refused client's connection is cut when it has sent nothing for this
#: long, or has been refused this long, if it has not closed by then.
LINGER_IDLE = 5.0
LINGER_MAX = 30.0

#: The routes a refusal is counted and logged under; anything else is "other".
KNOWN_ROUTES = UPLOAD_ROUTES | {
    LEDGER_ROUTE, b"/tts", b"/v1/audio/speech", b"/v1/keys/validate", b"/v1/enroll"
}

log = Logger()


def routeOf(path: bytes) -> str:
    """
    The route a request path names, for logs and metrics: a known route, or
    C{"other"} (a path can carry anything, a key in its query included).
    """
    route = path.split(b"?", 1)[0]
    return route.decode("ascii") if route in KNOWN_ROUTES else "other"


def limitName(path: bytes) -> str:
    """
    Which limit a request for C{path} is held to, for a 413's reason.
    """
    route = path.split(b"?", 1)[0]
    if route in UPLOAD_ROUTES:
        return "this API's --max-upload; long recordings go to the farms in pieces"
    if route == LEDGER_ROUTE:
        return "a ledger post's"
    return "a form's"


def bodyLimit(path: bytes, maxUpload: int) -> int:
    """
    The largest body a request for C{path} may bring.
    """
    route = path.split(b"?", 1)[0]
    if route in UPLOAD_ROUTES:
        return maxUpload
    if route == LEDGER_ROUTE:
        return LEDGER_LIMIT
    return FORM_LIMIT


class ApiRequest(Request):
    """
    A request whose chunked body is refused as soon as it goes over its
    route's limit.
    """

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.refusing:
            return
        self._received += len(data)
        limit = self.channel.site.bodyLimit(self.channel._path)
        if self._received > limit:
            self.channel.refuseBody(self._received, limit)
            return
        super().handleContentChunk(data)


class ApiChannel(PrivateHTTPChannel):
    """
    An HTTP connection that refuses a body over its route's limit at once
    (see the module docstring).
    """

    _lingerTimer: IDelayedCall | None = None
    _lingerUntil = 0.0

    @property
    def refusing(self) -> bool:
        return self._lingerTimer is not None

    def allHeadersReceived(self) -> None:
        limit = self.site.bodyLimit(self._path)
        if self.length is not None and self.length > limit:
            self.refuseBody(self.length, limit)
            return
        super().allHeadersReceived()

    def refuseBody(self, size: int, limit: int) -> None:
        """
        Answer 413 now, then read and drop whatever else the client sends.
        """
        if self.refusing:
            return
        route = routeOf(self._path)
        log.info(
            "{route} 413 before the body: {received} bytes, the limit is {limit}",
            route=route,
            received=size,
            limit=limit,
        )
        self.site.refused(route)
        contentType, body = errorBody(
            tooLarge(size, limit, limitName(self._path)), openai=self._path.startswith(b"/v1/")
        )
        self.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (contentType, len(body), body)
        )
        self.setTimeout(None)
        self._lingerUntil = self.site.reactor.seconds() + LINGER_MAX
        self._lingerTimer = self.callLater(LINGER_IDLE, self._lingerOver)

    def _lingerOver(self) -> None:
        self._lingerTimer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._lingerTimer is None:
            super().dataReceived(data)
            return
        # Refused: drop it, and give the client a little longer to stop.
        self._lingerTimer.cancel()
        left = self._lingerUntil - self.site.reactor.seconds()
        self._lingerTimer = self.callLater(max(0.0, min(LINGER_IDLE, left)), self._lingerOver)

    # Once refusing, nothing more is parsed, even what came in the same read.

    def lineReceived(self, line: bytes) -> None:
        if self._lingerTimer is None:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self._lingerTimer is None:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._lingerTimer is None:
            super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        if self._lingerTimer is not None and self._lingerTimer.active():
            self._lingerTimer.cancel()
        self._lingerTimer = None
        super().connectionLost(reason)


class ApiSite(PrivateSite):
    """
    The API's site: L{ApiChannel}s making L{ApiRequest}s, no form parsing
    by twisted.web (L{privox.api.forms} does it, off the reactor thread
    when large), no access log.

    @ivar refused: called with the route of each body refused at once.
    """

    protocol = ApiChannel

    def __init__(
        self,
        resource: Any,
        maxUpload: int,
        refused: Callable[[str], None] = lambda route: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            resource, requestFactory=ApiRequest, parsePOSTFormSubmission=False, **kwargs
        )
        self.maxUpload = maxUpload
        self.refused = refused

    def bodyLimit(self, path: bytes) -> int:
        return bodyLimit(path, self.maxUpload)
