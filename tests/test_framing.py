"""
PVX/2 framing: whole frames out of any way TCP slices the bytes, and garbage
refused as early as it can be recognised.
"""

import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.framing import (
    HEADER_LEN,
    VERBS,
    Frame,
    FrameDecoder,
    FramingError,
    encodeFrame,
    encodeHeader,
    sendNow,
)

FRAMES = [
    Frame(b"HELO", b'{"protocol":2}'),
    Frame(b"PING", b""),
    Frame(b"DATA", bytes(range(256)) * 3),
    Frame(b"DATA", b""),
    Frame(b"RSLT", '{"text":"h\u00e9llo"}'.encode()),
]
STREAM = b"".join(encodeFrame(f.verb, f.payload) for f in FRAMES)


class EncodeTests(SynchronousTestCase):
    def test_header(self) -> None:
        self.assertEqual(encodeHeader(b"DATA", 1234), b"DATA00001234")
        self.assertEqual(len(encodeHeader(b"JOB_", 0)), HEADER_LEN)

    def test_frame(self) -> None:
        self.assertEqual(encodeFrame(b"PONG"), b"PONG00000000")
        self.assertEqual(encodeFrame(b"DATA", b"abc"), b"DATA00000003abc")

    def test_refusesUnknownVerb(self) -> None:
        self.assertRaises(ValueError, encodeHeader, b"NOPE", 0)

    def test_refusesLengthBeyondEightDigits(self) -> None:
        self.assertRaises(ValueError, encodeHeader, b"DATA", 100_000_000)


class DecodeTests(SynchronousTestCase):
    def test_allAtOnce(self) -> None:
        self.assertEqual(FrameDecoder().feed(STREAM), FRAMES)

    def test_byteByByte(self) -> None:
        decoder = FrameDecoder()
        frames = []
        for i in range(len(STREAM)):
            frames.extend(decoder.feed(STREAM[i : i + 1]))
        self.assertEqual(frames, FRAMES)
        self.assertEqual(decoder.pending(), 0)

    def test_partialFrameWaits(self) -> None:
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"DATA00000005ab"), [])
        self.assertEqual(decoder.pending(), 14)
        self.assertEqual(decoder.feed(b"cdePING00000000"), [Frame(b"DATA", b"abcde"), Frame(b"PING", b"")])

    @settings(max_examples=200)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
    def test_anySlicing(self, cuts: list[int]) -> None:
        decoder = FrameDecoder()
        frames = []
        bounds = [0, *sorted(cuts), len(STREAM)]
        for start, end in zip(bounds, bounds[1:]):
            frames.extend(decoder.feed(STREAM[start:end]))
        self.assertEqual(frames, FRAMES)

    def test_maxFrameExactlyAllowed(self) -> None:
        decoder = FrameDecoder(maxFrame=10)
        self.assertEqual(decoder.feed(encodeFrame(b"DATA", b"x" * 10)), [Frame(b"DATA", b"x" * 10)])

    def test_oversizedRefusedBeforeBody(self) -> None:
        """
        The header alone condemns an oversized frame: nothing of its body is
        needed (or buffered) to refuse it.
        """
        decoder = FrameDecoder(maxFrame=1024)
        e = self.assertRaises(FramingError, decoder.feed, b"DATA00001025")
        self.assertIn("exceeds max_frame 1024", str(e))

    def test_hugeDeclaredLength(self) -> None:
        decoder = FrameDecoder()
        self.assertRaises(FramingError, decoder.feed, b"DATA99999999")

    def test_unknownVerb(self) -> None:
        for bad in (b"GET / HTTP/1.1\r\n", b"data00000000", b"HELLO0000000"):
            self.assertRaises(FramingError, FrameDecoder().feed, bad)

    def test_unknownVerbRefusedEarly(self) -> None:
        """
        Two bytes that start no verb are enough to refuse the stream.
        """
        self.assertRaises(FramingError, FrameDecoder().feed, b"GE")

    def test_nonDigitLength(self) -> None:
        for bad in (b"DATA+0000001", b"DATA 0000001", b"DATA0000000x", b"DATA-0000001", b"DATA0_000001"):
            self.assertRaises(FramingError, FrameDecoder().feed, bad + b"x")

    def test_nonDigitLengthRefusedEarly(self) -> None:
        self.assertRaises(FramingError, FrameDecoder().feed, b"DATA00x")

    def test_nonAsciiDigits(self) -> None:
        # "١" (Arabic-Indic one) is a digit to str.isdigit but not to PVX/2.
        self.assertRaises(FramingError, FrameDecoder().feed, b"DATA0000000" + "١".encode())

    def test_everyVerbDecodes(self) -> None:
        stream = b"".join(encodeFrame(v) for v in sorted(VERBS))
        self.assertEqual([f.verb for f in FrameDecoder().feed(stream)], sorted(VERBS))

    @settings(max_examples=300)
    @given(st.binary(max_size=64))
    def test_garbageNeverCrashes(self, junk: bytes) -> None:
        """
        Arbitrary bytes either decode or raise FramingError; nothing else.
        """
        try:
            frames = FrameDecoder(maxFrame=32).feed(junk)
        except FramingError:
            return
        for frame in frames:
            self.assertIn(frame.verb, VERBS)
            self.assertLessEqual(len(frame.payload), 32)


def _joinPieces(frames: list[Frame]) -> list[Frame]:
    """
    Streamed DATA pieces glued back into the frames they came from, given
    that each piece arrives while its frame is incomplete: consecutive DATA
    pieces are merged until they add up to the sizes in L{FRAMES}.
    """
    sizes = [len(f.payload) for f in FRAMES if f.verb == b"DATA"]
    out: list[Frame] = []
    pending = b""
    for frame in frames:
        if frame.verb != b"DATA":
            out.append(frame)
            continue
        pending += frame.payload
        if len(pending) == sizes[0]:
            out.append(Frame(b"DATA", pending))
            sizes.pop(0)
            pending = b""
    return out


class StreamedDecodeTests(SynchronousTestCase):
    """
    With C{streamVerbs}, DATA payloads come out in pieces as they arrive
    (what the farm relays); other frames still come out whole.
    """

    def decoder(self, maxFrame: int = 1024 * 1024) -> FrameDecoder:
        return FrameDecoder(maxFrame, streamVerbs=frozenset([b"DATA"]))

    def test_allAtOnce(self) -> None:
        self.assertEqual(self.decoder().feed(STREAM), FRAMES)

    def test_byteByByte(self) -> None:
        decoder = self.decoder()
        frames = []
        for i in range(len(STREAM)):
            frames.extend(decoder.feed(STREAM[i : i + 1]))
        self.assertTrue(all(len(f.payload) <= 1 for f in frames if f.verb == b"DATA"))
        self.assertEqual(_joinPieces(frames), FRAMES)
        self.assertEqual(decoder.pending(), 0)

    @settings(max_examples=200)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
    def test_anySlicing(self, cuts: list[int]) -> None:
        decoder = self.decoder()
        frames = []
        bounds = [0, *sorted(cuts), len(STREAM)]
        for start, end in zip(bounds, bounds[1:]):
            frames.extend(decoder.feed(STREAM[start:end]))
        self.assertEqual(_joinPieces(frames), FRAMES)

    def test_streamTakenElsewhere(self) -> None:
        """
        Payload bytes a splice relay took off the wire are skipped: the
        decoder expects that many fewer and goes on with the next header.
        """
        decoder = self.decoder()
        self.assertEqual(decoder.feed(encodeFrame(b"DATA", b"abcdefghij")[:15]), [Frame(b"DATA", b"abc")])
        self.assertEqual(decoder.streamDue(b"DATA"), 7)
        self.assertEqual(decoder.streamDue(b"RSLT"), 0)
        decoder.streamTaken(5)
        self.assertEqual(decoder.streamDue(b"DATA"), 2)
        self.assertEqual(
            decoder.feed(b"ij" + encodeFrame(b"PONG")),
            [Frame(b"DATA", b"ij"), Frame(b"PONG", b"")],
        )
        self.assertEqual(decoder.streamDue(b"DATA"), 0)

    def test_takingMoreThanDue(self) -> None:
        decoder = self.decoder()
        decoder.feed(encodeHeader(b"DATA", 10))
        self.assertRaises(ValueError, decoder.streamTaken, 11)
        self.assertRaises(ValueError, decoder.streamTaken, 0)

    def test_wholeFramesAreNotDue(self) -> None:
        """
        A large non-streamed frame being gathered is nobody else's to take.
        """
        decoder = self.decoder()
        decoder.feed(encodeHeader(b"RSLT", 100_000) + b"{")
        self.assertEqual(decoder.streamDue(b"RSLT"), 0)
        self.assertRaises(ValueError, decoder.streamTaken, 1)

    def test_piecesAsTheyArrive(self) -> None:
        """
        Nothing of a DATA payload is held back: each feed hands out what it
        brought, and a later feed continues the same frame.
        """
        decoder = self.decoder()
        self.assertEqual(decoder.feed(b"DATA00000005ab"), [Frame(b"DATA", b"ab")])
        self.assertEqual(decoder.pending(), 0)
        self.assertEqual(decoder.feed(b"c"), [Frame(b"DATA", b"c")])
        self.assertEqual(
            decoder.feed(b"dePING00000000JOB_0000"),
            [Frame(b"DATA", b"de"), Frame(b"PING", b"")],
        )
        self.assertEqual(decoder.pending(), 8)
        self.assertEqual(decoder.feed(b"0002{}"), [Frame(b"JOB_", b"{}")])

    def test_otherVerbsWhole(self) -> None:
        decoder = self.decoder()
        self.assertEqual(decoder.feed(b"RSLT00000004ab"), [])
        self.assertEqual(decoder.feed(b"cd"), [Frame(b"RSLT", b"abcd")])

    def test_maxFrameCheckedBeforeAnyPiece(self) -> None:
        decoder = self.decoder(maxFrame=10)
        self.assertRaises(FramingError, decoder.feed, b"DATA00000011abc")

    def test_garbageAfterStreamedPayload(self) -> None:
        decoder = self.decoder()
        self.assertEqual(decoder.feed(b"DATA00000002a"), [Frame(b"DATA", b"a")])
        self.assertRaises(FramingError, decoder.feed, b"bNOPE")


class LargeFrameTests(SynchronousTestCase):
    """
    Large whole frames arrive in many pieces and still come out whole.
    """

    def test_pieces(self) -> None:
        payload = bytes(range(256)) * 1024  # 256 KiB
        stream = encodeFrame(b"RSLT", b"{}") + encodeFrame(b"DATA", payload) + encodeFrame(b"PING")
        for size in (1000, 65536, 100_000, len(stream)):
            decoder = FrameDecoder()
            frames = []
            for i in range(0, len(stream), size):
                frames.extend(decoder.feed(stream[i : i + size]))
                if i == size:
                    self.assertGreater(decoder.pending(), 0)
            self.assertEqual(
                frames,
                [Frame(b"RSLT", b"{}"), Frame(b"DATA", payload), Frame(b"PING", b"")],
            )
            self.assertEqual(decoder.pending(), 0)

    def test_trickledFrameRunsTogether(self) -> None:
        """
        A large frame fed a byte at a time is held as one run of bytes, not
        an object per byte.
        """
        payload = bytes(range(256)) * 400  # 100 KiB
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(encodeHeader(b"RSLT", len(payload))), [])
        for i in range(1000):
            self.assertEqual(decoder.feed(payload[i : i + 1]), [])
        self.assertEqual(decoder.pending(), 1000)
        self.assertEqual(len(decoder._parts or ()), 1)
        self.assertEqual(decoder.feed(payload[1000:]), [Frame(b"RSLT", payload)])
        self.assertEqual(decoder.pending(), 0)

    @settings(max_examples=300)
    @given(st.lists(st.binary(max_size=40), max_size=6))
    def test_streamedGarbageNeverCrashes(self, pieces: list[bytes]) -> None:
        """
        Arbitrary bytes, in any pieces, either decode or raise FramingError;
        a piece never exceeds maxFrame, nor do a frame's pieces together.
        """
        decoder = FrameDecoder(maxFrame=32, streamVerbs=frozenset([b"DATA"]))
        try:
            for piece in pieces:
                for frame in decoder.feed(piece):
                    self.assertIn(frame.verb, VERBS)
                    self.assertLessEqual(len(frame.payload), 32)
        except FramingError:
            return


class Collector(Protocol):
    """
    Keeps what it reads; C{whenHas(n)} fires once it holds C{n} bytes.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self._waiting: tuple[int, Deferred[bytes]] | None = None

    def connectionMade(self) -> None:
        self.factory.connected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._waiting is not None and len(self.received) >= self._waiting[0]:
            waiting, self._waiting = self._waiting[1], None
            waiting.callback(bytes(self.received))

    def whenHas(self, size: int) -> Deferred[bytes]:
        waiting: Deferred[bytes] = Deferred()
        self._waiting = (size, waiting)
        self.dataReceived(b"")  # it may hold them already
        return waiting


class SendNowTests(TestCase):
    """
    L{sendNow} over real loopback TCP: what the socket takes goes at once,
    gathered from the parts; the rest is buffered, in order.
    """

    async def connected(self) -> tuple[Protocol, Collector]:
        factory = Factory.forProtocol(Collector)
        factory.connected = Deferred()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        server = await factory.connected
        self.addCleanup(client.transport.loseConnection)
        self.addCleanup(server.transport.loseConnection)
        return client, server

    async def test_partsInOrderPastAFullSocket(self) -> None:
        client, server = await self.connected()
        # A small send buffer and a reader that waits: the socket cannot take
        # a MiB at once, so most of it is buffered by the transport.
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server.transport.pauseProducing()
        big = os.urandom(1 << 20)
        parts = [b"head", memoryview(big)[3:], b"", big[:1000], b"tail"]
        sendNow(client.transport, *parts)
        sendNow(client.transport, b"after")  # behind what was buffered
        expected = b"".join(bytes(p) for p in parts) + b"after"
        self.assertLess(len(server.received), len(expected))
        server.transport.resumeProducing()
        self.assertEqual(await server.whenHas(len(expected)), expected)

    async def test_moreBuffersThanOneSendmsgTakes(self) -> None:
        client, server = await self.connected()
        parts = [b"%05d" % i for i in range(3000)]
        sendNow(client.transport, *parts)
        expected = b"".join(parts)
        self.assertEqual(await server.whenHas(len(expected)), expected)
