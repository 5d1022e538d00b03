"""
The client half of a PVX/2 connection, shared by consumers and producers:
read the farm's greeting, say HELO, wait for OKAY or DENY, answer PING.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from privox.framing import (
    BULK_VERBS,
    DEFAULT_MAX_FRAME,
    Frame,
    FrameDecoder,
    FramingError,
    encodeHeader,
    sendNow,
    tuneTransport,
)
from privox.messages import (
    GREETING,
    Hello,
    Okay,
    ProtocolViolation,
    controlFrame,
    decodeObject,
)
from privox.tls import tlsReason


class Denied(Exception):
    """
    The farm refused the handshake (C{DENY}, or C{FAIL} before C{OKAY}).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """
    The farm closed the connection.
    """


class PeerProtocol(Protocol):
    """
    Subclasses implement L{frameReceived} (frames after OKAY) and may
    override L{peerLost}.

    @ivar ready: fires with the farm's L{Okay}, or fails with L{Denied} or
        L{ConnectionClosed}.
    @ivar disconnected: fires when the connection is gone.
    """

    def __init__(self, hello: Hello) -> None:
        self.hello = hello
        self.okay: Okay | None = None
        #: Fires when the connection is gone, whoever closed it.
        self.disconnected: Deferred[None] = Deferred()
        self.ready: Deferred[Okay] = Deferred()
        self._greeting = b""
        # Until OKAY says otherwise, accept up to the default frame size.
        # DATA comes out in pieces as it arrives (uploads to a producer,
        # results to a consumer): no frame is gathered whole and copied
        # again, and an engine that streams gets the audio sooner.
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME, streamVerbs=BULK_VERBS)

    def connectionMade(self) -> None:
        tuneTransport(self.transport, DEFAULT_MAX_FRAME)

    def dataReceived(self, data: bytes) -> None:
        if len(self._greeting) < len(GREETING):
            need = len(GREETING) - len(self._greeting)
            self._greeting += data[:need]
            data = data[need:]
            if not GREETING.startswith(self._greeting):
                self._abort("the farm did not greet with 'who'")
                return
            if self._greeting == GREETING:
                self.sendControl(b"HELO", self.hello.payload())
            if not data:
                return
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except (FramingError, ProtocolViolation) as e:
            self._abort(str(e))

    def _dispatch(self, frame: Frame) -> None:
        if frame.verb == b"PING" and self.okay is not None:
            self.transport.write(encodeHeader(b"PONG", 0))
        elif self.okay is None:
            self._handshakeFrame(frame)
        else:
            self.frameReceived(frame)

    def _handshakeFrame(self, frame: Frame) -> None:
        fields = decodeObject(frame)
        if frame.verb == b"OKAY":
            self.okay = Okay.parse(fields)
            self._decoder.maxFrame = max(self.okay.max_frame, DEFAULT_MAX_FRAME)
            self.ready.callback(self.okay)
        elif frame.verb in (b"DENY", b"FAIL"):
            self._handshakeFailure = Denied(
                str(fields.get("error")), str(fields.get("message"))
            )
            self.transport.loseConnection()
        else:
            raise ProtocolViolation(f"expected OKAY, got {frame.verb.decode()}")

    def _abort(self, why: str) -> None:
        self._handshakeFailure = ConnectionClosed(why)
        self.transport.abortConnection()

    _handshakeFailure: Exception | None = None

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.transport.write(controlFrame(verb, fields))

    def sendData(self, *payload: bytes) -> None:
        """
        Send the bytes of C{payload} (one piece, or several: the records of
        a sealed upload) as DATA frames no larger than the farm's max_frame.
        """
        assert self.okay is not None
        step = self.okay.max_frame
        size = sum(len(p) for p in payload)
        if len(payload) == 1 and size <= step:
            sendNow(self.transport, encodeHeader(b"DATA", size), payload[0])
            return
        frames = _frames([memoryview(p) for p in payload if p], step)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            # TLS encrypts each write as it is made: a frame at a time, no
            # buffer of the whole upload sits beside its ciphertext. With
            # that buffer a 10 MB upload cost twice the CPU (bench/README).
            for frame in frames:
                self.transport.write(encodeHeader(b"DATA", sum(len(c) for c in frame)) + b"".join(frame))
            return
        # Plain TCP: frames and headers gathered by the kernel where the
        # socket takes them, what it does not joined once (sendNow).
        parts: list[bytes | memoryview] = []
        for frame in frames:
            parts.append(encodeHeader(b"DATA", sum(len(c) for c in frame)))
            parts += frame
        sendNow(self.transport, *parts)

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.ready.called:
            tls = tlsReason(reason)
            self.ready.errback(
                self._handshakeFailure
                or ConnectionClosed(tls or "the farm closed the connection during the handshake")
            )
        self.peerLost(self._handshakeFailure or ConnectionClosed("connection closed"))
        self.disconnected.callback(None)

    def peerLost(self, why: Exception) -> None:
        pass


def _frames(views: list[memoryview], step: int) -> list[list[memoryview]]:
    """
    The pieces of C{views}, in order, cut into frames of at most C{step}
    bytes (no byte copied).
    """
    frames: list[list[memoryview]] = []
    current: list[memoryview] = []
    room = step
    for view in views:
        while view:
            piece = view[:room]
            current.append(piece)
            room -= len(piece)
            view = view[len(piece) :]
            if not room:
                frames.append(current)
                current, room = [], step
    if current:
        frames.append(current)
    return frames
