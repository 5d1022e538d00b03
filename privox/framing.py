"""
PVX/2 framing: a 12-byte header (4-byte verb, 8 ASCII decimal digits of
payload length) followed by the payload.

L{FrameDecoder} is pure: it takes bytes in whatever pieces TCP delivers them
and hands back whole frames (or, for a relay, DATA payloads piece by piece),
checking each header before it buffers or hands out a body.
"""

from __future__ import annotations

import os

from typing import Any, NamedTuple

from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper

HEADER_LEN = 12
DEFAULT_MAX_FRAME = 1024 * 1024

#: Every verb PVX/2 defines. Anything else in a header is a protocol error.
VERBS = frozenset(
    [
        b"HELO",
        b"OKAY",
        b"DENY",
        b"PING",
        b"PONG",
        b"JOB_",
        b"ASGN",
        b"DATA",
        b"RSLT",
        b"FAIL",
        b"CNCL",
        b"PART",
    ]
)

#: The verbs whose payload is bulk bytes (audio), not JSON: farms and peers
#: have their decoders hand it out in pieces as it arrives.
BULK_VERBS = frozenset([b"DATA"])

_MAX_LENGTH_FIELD = 99_999_999

#: Whole frames with at least this much payload are gathered as a list of
#: pieces while they arrive; smaller ones wait in the buffer.
_COLLECT_MIN = 64 * 1024

#: The most buffers one sendmsg takes (POSIX guarantees 16; Linux: 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


class FramingError(Exception):
    """
    The peer sent bytes that are not a PVX/2 frame stream.
    """


class Frame(NamedTuple):
    # A tuple: made per frame on every relayed job, and a frozen
    # dataclass's __init__ costs several times as much.
    verb: bytes
    payload: bytes


def encodeHeader(verb: bytes, length: int) -> bytes:
    """
    The 12 header bytes announcing a payload of C{length} bytes.
    """
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}")
    if not 0 <= length <= _MAX_LENGTH_FIELD:
        raise ValueError(f"payload length {length} does not fit in 8 digits")
    return b"%s%08d" % (verb, length)


def encodeFrame(verb: bytes, payload: bytes = b"") -> bytes:
    return encodeHeader(verb, len(payload)) + payload


def _parseLength(field: bytes) -> int:
    # int() would accept "+1234567", " 1234567" or "1_234567"; PVX/2 says digits.
    if not field.isdigit():
        raise FramingError(f"length field {field!r} is not 8 ASCII digits")
    return int(field)


class FrameDecoder:
    """
    Incremental decoder for one direction of a PVX/2 connection.

    By default it hands out whole frames. For the verbs in C{streamVerbs} it
    hands out the payload in pieces as they arrive instead: a relay can then
    forward a large DATA frame without first holding all of it. Each piece
    is a L{Frame} of that verb; the pieces of one frame add up to its
    payload (a frame with an empty payload is one empty piece). Headers are
    checked, C{maxFrame} included, before any of their payload is handed out
    or buffered.

    @ivar maxFrame: the largest payload accepted; a header announcing more is
        refused before any of its payload is buffered.
    """

    def __init__(
        self, maxFrame: int = DEFAULT_MAX_FRAME, streamVerbs: frozenset[bytes] = frozenset()
    ) -> None:
        self.maxFrame = maxFrame
        self._streamVerbs = streamVerbs
        self._buffer = bytearray()
        #: The frame whose payload is still arriving outside the buffer, and
        #: how many of its bytes are still due: a streamed frame (its pieces
        #: are handed out as they come) or a large whole frame (its pieces
        #: are kept in C{_parts} and joined once, instead of being appended
        #: to the buffer and then copied out of it).
        self._streamVerb = b""
        self._streamRemaining = 0
        self._parts: list[bytes | bytearray] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add C{data} and return the frames (or, for streamed verbs, payload
        pieces) it completes, in order.

        @raise FramingError: the stream is not valid PVX/2; the decoder must
            not be fed again.
        """
        frames: list[Frame] = []
        source: Any = data
        if self._streamRemaining:
            # The next bytes belong to a streamed payload: no buffering, and
            # no copy when all of them do.
            n = min(self._streamRemaining, len(data))
            self._streamRemaining -= n
            self._payloadPiece(data if n == len(data) else data[:n], frames)
            if n == len(data):
                return frames
            source = memoryview(data)[n:]
        buffer = self._buffer
        if buffer:
            buffer += source
            source = buffer
        with memoryview(source) as view:
            offset = self._parse(view, frames)
            if source is not buffer and offset < len(view):
                buffer += view[offset:]
        if source is buffer and offset:
            del buffer[:offset]
        self._checkPartialHeader()
        return frames

    def _payloadPiece(self, piece: bytes, frames: list[Frame]) -> None:
        parts = self._parts
        if parts is None:
            frames.append(Frame(self._streamVerb, piece))
            return
        _addPart(parts, piece)
        if not self._streamRemaining:
            self._parts = None
            frames.append(Frame(self._streamVerb, b"".join(parts)))

    def _parse(self, view: memoryview, frames: list[Frame]) -> int:
        """
        Append the frames and pieces in C{view} to C{frames}; return how many
        bytes of it were used (the rest is an incomplete header or frame).
        """
        offset = 0
        end = len(view)
        streamVerbs = self._streamVerbs
        # One copy per payload (or piece): slices of the memoryview.
        while end - offset >= HEADER_LEN:
            # One copy of the header, sliced: a memoryview slice costs more.
            header = view[offset : offset + HEADER_LEN].tobytes()
            verb = header[:4]
            if verb not in VERBS:
                raise FramingError(f"unknown verb {verb!r}")
            length = _parseLength(header[4:])
            if length > self.maxFrame:
                raise FramingError(
                    f"{verb.decode()} payload of {length} bytes exceeds "
                    f"max_frame {self.maxFrame}"
                )
            start = offset + HEADER_LEN
            if length and verb in streamVerbs:
                n = min(length, end - start)
                if n:
                    frames.append(Frame(verb, view[start : start + n].tobytes()))
                offset = start + n
                if n < length:
                    self._streamVerb = verb
                    self._streamRemaining = length - n
                    break
                continue
            if end - start < length:
                if length >= _COLLECT_MIN:
                    # A large frame: keep its pieces and join them once.
                    self._streamVerb = verb
                    self._streamRemaining = length - (end - start)
                    self._parts = []
                    _addPart(self._parts, view[start:end])
                    offset = end
                break
            frames.append(Frame(verb, view[start : start + length].tobytes()))
            offset = start + length
        return offset

    def _checkPartialHeader(self) -> None:
        # Refuse garbage as soon as the bytes seen so far cannot start a
        # valid header, so a hostile peer cannot hold a connection open by
        # trickling nonsense.
        if not self._buffer:  # the usual case: the reads ended on a frame edge
            return
        partial = bytes(self._buffer[:HEADER_LEN])
        if len(partial) >= HEADER_LEN:
            return
        verbPart = partial[:4]
        if not any(v.startswith(verbPart) for v in VERBS):
            raise FramingError(f"unknown verb {verbPart!r}")
        digits = partial[4:]
        if digits and not digits.isdigit():
            raise FramingError(f"length field {digits!r} is not 8 ASCII digits")

    def pending(self) -> int:
        """
        How many bytes are buffered waiting for the rest of their frame.
        """
        return len(self._buffer) + sum(len(p) for p in self._parts or ())

    def streamDue(self, verb: bytes) -> int:
        """
        How many payload bytes of a streamed C{verb} frame are still due (0
        between frames, or while another verb's frame is arriving).
        """
        if self._parts is None and self._streamVerb == verb:
            return self._streamRemaining
        return 0

    def streamTaken(self, count: int) -> None:
        """
        C{count} bytes of the streamed payload that is due were taken off the
        wire by someone else (L{privox.farm.splice}): expect that many fewer.
        """
        if self._parts is not None or not 0 < count <= self._streamRemaining:
            raise ValueError(f"{count} bytes taken; {self._streamRemaining} were due")
        self._streamRemaining -= count


def _addPart(parts: list[bytes | bytearray], piece: bytes | memoryview) -> None:
    # Small pieces are run together, so a peer trickling a large frame a
    # byte at a time costs a byte per byte, not an object per byte.
    if len(piece) >= _COLLECT_MIN:
        parts.append(bytes(piece))
    elif parts and isinstance(parts[-1], bytearray):
        parts[-1] += piece
    else:
        parts.append(bytearray(piece))


def tuneTransport(transport: Any, maxFrame: int, bufferSize: int | None = None) -> None:
    """
    Settings every PVX/2 connection wants from a TCP-like transport.

    Small control frames must not wait for Nagle's algorithm (a JOB_ then a
    short DATA would otherwise stall on the peer's delayed ACK, ~40 ms), and
    the write buffer that triggers backpressure must hold a whole frame, or a
    relay pauses its source after every large DATA frame. A relay that
    forwards DATA in pieces (the farm) passes a smaller C{bufferSize}: with
    Twisted's TCP transports it is both the most one read takes and the
    write buffer's high-water mark, so it bounds what a connection holds.
    """
    transport = socketTransport(transport)
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)
    if hasattr(transport, "bufferSize"):
        if bufferSize is None:
            bufferSize = max(transport.bufferSize, 2 * (maxFrame + HEADER_LEN))
        transport.bufferSize = bufferSize


def socketTransport(transport: Any) -> Any:
    """
    The transport that owns the socket under C{transport}: over TLS a
    protocol's transport wraps the TCP one (L{twisted.protocols.tls}), and
    setting C{bufferSize} on the wrapper would only shadow the socket's.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def sendNow(transport: Any, *parts: bytes | memoryview) -> None:
    """
    C{transport.write} of C{parts}, in order, but sent at once (one
    C{sendmsg}, the parts gathered by the kernel, none copied) when nothing
    is waiting to go out before them: a Twisted TCP transport otherwise
    buffers every write and sends it on the reactor's next turn, after
    registering for writability and before unregistering again (two epoll
    calls and a trip through the reactor per frame: a fifth of the farm's
    CPU per small job), and joins what it buffered into one copy first.
    What the socket does not take at once is joined and buffered, one
    write; an error is left for the transport to find as it would have.
    """
    sent = 0
    if (
        isinstance(transport, Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
    ):
        try:
            if len(parts) == 1:
                sent = transport.socket.send(parts[0])
            else:
                sent = transport.socket.sendmsg(parts[:_IOV_MAX])
        except OSError:
            sent = 0  # full, or broken: the transport finds out which
    rest: list[bytes | memoryview] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            rest.append(memoryview(part)[sent:] if sent else part)
            sent = 0
    if len(rest) == 1 and isinstance(rest[0], bytes):
        transport.write(rest[0])
    elif rest:
        transport.write(b"".join(rest))
