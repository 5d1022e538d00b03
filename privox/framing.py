"""
PVX/2 framing: a 12-byte header (4-byte verb, 8 ASCII decimal digits of
payload length) followed by the payload.

L{FrameDecoder} is pure: it takes bytes in whatever pieces TCP delivers them
and hands back whole frames, checking each header before it buffers a body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    ]
)

_MAX_LENGTH_FIELD = 99_999_999


class FramingError(Exception):
    """
    The peer sent bytes that are not a PVX/2 frame stream.
    """


@dataclass(frozen=True, slots=True)
class Frame:
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

    @ivar maxFrame: the largest payload accepted; a header announcing more is
        refused before any of its payload is buffered.
    """

    def __init__(self, maxFrame: int = DEFAULT_MAX_FRAME) -> None:
        self.maxFrame = maxFrame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add C{data} and return the frames it completes, in order.

        @raise FramingError: the stream is not valid PVX/2; the decoder must
            not be fed again.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        end = len(buffer)
        # One copy per payload: slices of a memoryview, released before the
        # consumed bytes are cut off the buffer.
        with memoryview(buffer) as view:
            while end - offset >= HEADER_LEN:
                verb = view[offset : offset + 4].tobytes()
                if verb not in VERBS:
                    raise FramingError(f"unknown verb {verb!r}")
                length = _parseLength(view[offset + 4 : offset + HEADER_LEN].tobytes())
                if length > self.maxFrame:
                    raise FramingError(
                        f"{verb.decode()} payload of {length} bytes exceeds "
                        f"max_frame {self.maxFrame}"
                    )
                start = offset + HEADER_LEN
                if end - start < length:
                    break
                frames.append(Frame(verb, view[start : start + length].tobytes()))
                offset = start + length
        if offset:
            del buffer[:offset]
        self._checkPartialHeader()
        return frames

    def _checkPartialHeader(self) -> None:
        # Refuse garbage as soon as the bytes seen so far cannot start a
        # valid header, so a hostile peer cannot hold a connection open by
        # trickling nonsense.
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
        return len(self._buffer)


def tuneTransport(transport: Any, maxFrame: int) -> None:
    """
    Settings every PVX/2 connection wants from a TCP-like transport.

    Small control frames must not wait for Nagle's algorithm (a JOB_ then a
    short DATA would otherwise stall on the peer's delayed ACK, ~40 ms), and
    the write buffer that triggers backpressure must hold a whole frame, or a
    relay pauses its source after every large DATA frame.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = max(transport.bufferSize, 2 * (maxFrame + HEADER_LEN))
