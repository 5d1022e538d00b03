"""
Hostile input (issue 9): every hostile case gets a clear error, and the
daemon then serves the next good request -- asserted each time.

  - the farm, on the in-memory harness: Hypothesis-fuzzed byte streams
    (PVX/2 and PVX/1), cut at random points; fuzzed JSON in HELO, JOB_ and
    RSLT; slow-loris peers; a flood of 2,000 silent connections; oversized
    frames and declared sizes;
  - the farm on real sockets: a few hundred silent connections, memory
    bounded, cleared by the handshake timeout;
  - the HTTP API: bodies over the cap (declared and chunked), malformed
    multipart, huge fields, non-UTF-8 text;
  - zip archives: path tricks and bombs, refused without being expanded,
    through the node's L{decodeAudio} and through a whole local exchange
    (farm, API and a node with the real models).
"""

from __future__ import annotations

import json
import zipfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api.access import PolicyAccess
from privox.api.app import PrivoxAPI
from privox.api.site import FORM_LIMIT
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.engines.audio import BadAudio, decodeAudio
from privox.farm.handshake import Phase
from privox.framing import VERBS, FrameDecoder, FramingError, encodeFrame
from privox.keys import OpenPolicy
from privox.messages import controlFrame
from privox.engines.digest import digestOf
from privox.node.echo import DigestHandler
from tests.audiofixtures import tone, wavFile, zipOfZeros, zipped
from tests.farmharness import FarmHarness, Peer
from tests.loopbackfarm import LoopbackFarm
from tests.test_api_app import WAV, FakeExchange, multipart, rawRequest
from tests.support import until

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MODEL = "whisper:tiny.en"
STT_JOB = {"model": MODEL, "language": "en", "format": "wav", "size": 1}


def helo(role: str = "consumer", service: str = "stt", **more: Any) -> dict[str, Any]:
    return {"protocol": 2, "role": role, "service": service, "key": "k", **more}


def newFarm(**settings: Any) -> FarmHarness:
    settings.setdefault("max_frame", 4096)
    settings.setdefault("max_job_bytes", 100_000)
    settings.setdefault("handshake_timeout", 10)
    settings.setdefault("queue_timeout", 5)
    settings.setdefault("max_job_timeout", 60)
    settings.setdefault("cancel_grace", 10)
    return FarmHarness(**settings)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """
    C{data} in the pieces TCP might deliver it in.
    """
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def farmFrames(peer: Peer) -> list[tuple[bytes, Any]]:
    """
    What the farm sent C{peer}: always a valid PVX/2 frame stream.
    """
    out = peer.transport.value()
    peer.transport.clear()
    frames = FrameDecoder(1 << 26).feed(out)
    return [(f.verb, f.payload if f.verb == b"DATA" else json.loads(f.payload or b"{}"))
            for f in frames]


def assertServes(test: Any, h: FarmHarness, text: str = "still serving") -> None:
    """
    A fresh consumer and producer complete a job on C{h}'s farm, and leave
    no job or connection behind.
    """
    producer = h.producer(models=[MODEL], languages=["en"])
    consumer = h.consumer()
    consumer.send(b"JOB_", STT_JOB)
    [(verb, asgn)] = consumer.messages()
    test.assertEqual(verb, "ASGN")
    consumer.data(b"x")
    test.assertEqual([v for v, _ in producer.messages()], ["JOB_", "DATA"])
    producer.send(b"RSLT", {"id": asgn["id"], "text": text})
    test.assertEqual(consumer.messages(), [("RSLT", {"id": asgn["id"], "text": text})])
    test.assertFalse(consumer.closed or producer.closed)
    consumer.lose()
    producer.lose()
    test.assertEqual(h.farm.jobs, set())


def settle(
    test: Any, h: FarmHarness, peer: Peer, sent: list[tuple[bytes, Any]], jobsLeft: bool = False
) -> None:
    """
    After hostile bytes: the peer is either still in a valid phase with its
    connection open, or closed, and then the last thing the farm told it
    was a DENY or a FAIL. Then the peer goes, as the reactor would make it.
    """
    phase = peer.protocol.phase
    if peer.closed:
        test.assertIs(phase, Phase.CLOSED)
        if peer.protocol.pvx1 is None:
            test.assertTrue(sent, "closed without a word")
            verb, body = sent[-1]
            test.assertIn(verb, (b"DENY", b"FAIL"))
            test.assertTrue(body["error"] and body["message"], body)
    else:
        test.assertIn(phase, (Phase.GREETING, Phase.HELLO, Phase.AUTHENTICATING, Phase.ACTIVE))
    peer.lose()
    test.assertNotIn(peer.protocol, h.farm.connections)
    if not jobsLeft:
        test.assertEqual(h.farm.jobs, set())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def fuzzedFields(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """
    C{base} with some fields dropped, some replaced by random JSON values,
    and some random fields added.
    """
    return st.tuples(
        st.sets(st.sampled_from(sorted(base))),
        st.dictionaries(st.sampled_from(sorted(base)), json_values, max_size=len(base)),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ).map(lambda t: {**{k: v for k, v in base.items() if k not in t[0]}, **t[1], **t[2]})


def payloadOf(fields: Any) -> bytes:
    try:
        return json.dumps(fields).encode()
    except ValueError:
        return b"{}"


class FramingFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=8))
    def test_decoderTakesAnything(self, data: bytes, points: list[int]) -> None:
        """
        Any bytes, in any pieces: frames within max_frame, or a
        L{FramingError}; never another exception, and the same verdict
        however the stream was cut.
        """

        def run(pieces: list[bytes]) -> tuple[list[Any], bool]:
            decoder = FrameDecoder(64)
            frames: list[Any] = []
            try:
                for piece in pieces:
                    frames += decoder.feed(piece)
            except FramingError:
                return frames, True
            self.assertLessEqual(decoder.pending(), 12 + 64)
            return frames, False

        whole = run([data])
        pieces = run(cut(data, points))
        for frame in whole[0] + pieces[0]:
            self.assertIn(frame.verb, VERBS)
            self.assertLessEqual(len(frame.payload), 64)
        self.assertEqual(whole[1], pieces[1])
        if not whole[1]:
            self.assertEqual(whole[0], pieces[0])


pvx2Frames = st.lists(
    st.tuples(st.sampled_from(sorted(VERBS)), st.binary(max_size=40) | json_values.map(payloadOf)),
    max_size=6,
)


class FarmStreamFuzzTests(SynchronousTestCase):
    """
    Whatever a peer sends, the farm neither raises nor wedges, and serves
    the next good pair of peers.
    """

    def feed(self, h: FarmHarness, stream: bytes, points: list[int]) -> None:
        peer = h.peer()
        sent: list[Any] = []
        for piece in cut(stream, points):
            peer.raw(piece)
            sent += farmFrames(peer)
        settle(self, h, peer, sent)
        assertServes(self, h)

    @FUZZ
    @given(st.binary(max_size=300).filter(lambda b: b[:1] not in (b"c", b"s")),
           st.lists(st.integers(min_value=0), max_size=8))
    def test_randomBytes(self, stream: bytes, points: list[int]) -> None:
        self.feed(newFarm(), stream, points)

    @FUZZ
    @given(st.sampled_from([None, "consumer", "producer"]), pvx2Frames,
           st.lists(st.integers(min_value=0), max_size=8))
    def test_randomFrames(self, role: str | None, frames: list[tuple[bytes, bytes]],
                          points: list[int]) -> None:
        """
        Well-formed frames with random verbs and payloads, after no HELO or
        after a valid one (so the fuzz reaches both sessions).
        """
        h = newFarm()
        peer = h.peer()
        sent: list[Any] = []
        if role is not None:
            peer.send(b"HELO", helo(role, models=["*"]))
            sent += farmFrames(peer)
            self.assertEqual(sent[0][0], b"OKAY")
        stream = b"".join(encodeFrame(verb, payload) for verb, payload in frames)
        for piece in cut(stream, points):
            peer.raw(piece)
            sent += farmFrames(peer)
            h.clock.advance(1)
        settle(self, h, peer, sent)
        assertServes(self, h)

    @FUZZ
    @given(st.sampled_from([b"c", b"s"]), st.binary(max_size=300),
           st.lists(st.integers(min_value=0), max_size=8), st.sampled_from(["stt", "tts"]))
    def test_pvx1Junk(self, first: bytes, junk: bytes, points: list[int], service: str) -> None:
        """
        A PVX/1 peer (first byte c or s) that then sends junk: no
        exception, and the timers close it in the end.
        """
        h = newFarm(ping_interval=10)
        peer = h.peer(service)
        for piece in cut(first + junk, points):
            peer.raw(piece)
        h.clock.pump([1] * 120)  # time as it passes: timers set on the way run too
        self.assertTrue(peer.closed, peer.protocol.phase)
        self.assertIs(peer.protocol.phase, Phase.CLOSED)
        settle(self, h, peer, [])
        assertServes(self, h)

    @FUZZ
    @given(st.sampled_from([b"c", b"s"]), st.binary(min_size=16, max_size=16),
           st.sampled_from(["model=", "model=whisper&len=", "model=x&text=", ""]),
           st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def test_pvx1HeaderFuzz(self, first: bytes, key: bytes, start: str, rest: bytes) -> None:
        h = newFarm(ping_interval=10)
        peer = h.peer()
        peer.raw(first + key + start.encode() + rest)
        h.clock.pump([1] * 120)  # time as it passes: timers set on the way run too
        self.assertTrue(peer.closed)
        settle(self, h, peer, [])
        assertServes(self, h)


class JsonFuzzTests(SynchronousTestCase):
    """
    Random JSON where HELO, JOB_ and RSLT fields go.
    """

    @FUZZ
    @given(fuzzedFields(helo(models=["*"], languages=["en"])) | json_values)
    def test_hello(self, fields: Any) -> None:
        h = newFarm()
        peer = h.peer()
        peer.raw(encodeFrame(b"HELO", payloadOf(fields)))
        sent = farmFrames(peer)
        self.assertEqual(len(sent), 1, sent)
        verb, body = sent[0]
        self.assertIn(verb, (b"OKAY", b"DENY", b"FAIL"))
        if verb != b"OKAY":
            self.assertTrue(peer.closed)
            self.assertIsInstance(body["message"], str)
        settle(self, h, peer, sent)
        assertServes(self, h)

    @FUZZ
    @given(fuzzedFields(dict(STT_JOB, timeout_s=5.0))
           | fuzzedFields(dict(STT_JOB, timeout_s=5.0, early=True)) | json_values)
    def test_job(self, fields: Any) -> None:
        h = newFarm()
        producer = h.producer(models=[MODEL], languages=["en"])
        consumer = h.consumer()
        consumer.raw(encodeFrame(b"JOB_", payloadOf(fields)))
        sent = farmFrames(consumer)
        self.assertEqual(len(sent), 1, sent)
        verb, body = sent[0]
        if verb == b"ASGN":
            self.assertFalse(consumer.closed)
            [(work, _)] = farmFrames(producer)
            self.assertEqual(work, b"JOB_")
        else:
            self.assertEqual(verb, b"FAIL")
            self.assertIsInstance(body["message"], str)
        # A job the consumer left is cancelled; the producer has its grace.
        settle(self, h, consumer, sent, jobsLeft=True)
        h.clock.advance(60)
        self.assertEqual(h.farm.jobs, set())
        producer.lose()
        assertServes(self, h)

    @FUZZ
    @given(fuzzedFields({"id": "ID", "text": "hi", "size": 0}) | json_values,
           st.binary(max_size=20))
    def test_result(self, fields: Any, data: bytes) -> None:
        h = newFarm()
        producer = h.producer(models=[MODEL], languages=["en"])
        consumer = h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        [(_, asgn)] = consumer.messages()
        consumer.data(b"x")
        producer.messages()
        if isinstance(fields, dict) and fields.get("id") == "ID":
            fields["id"] = asgn["id"]
        producer.raw(encodeFrame(b"RSLT", payloadOf(fields)) + encodeFrame(b"DATA", data))
        producerSaw = farmFrames(producer)
        answers = farmFrames(consumer)
        self.assertTrue(answers, "the consumer was told nothing")
        self.assertIn(answers[0][0], (b"RSLT", b"FAIL"))
        if answers[0][0] == b"FAIL":
            self.assertEqual(answers[0][1]["id"], asgn["id"])
        settle(self, h, producer, producerSaw)
        settle(self, h, consumer, answers)
        assertServes(self, h)


class SlowAndFloodTests(SynchronousTestCase):
    def test_slowLoris(self) -> None:
        """
        Peers that trickle a valid HELO a byte at a time, or a PVX/1 key,
        are closed by the handshake timeout with FAIL timeout.
        """
        h = newFarm(handshake_timeout=10)
        hello = controlFrame(b"HELO", helo())
        pvx2 = h.peer()
        pvx1 = h.peer()
        for n in range(9):
            pvx2.raw(hello[n : n + 1])
            pvx1.raw(b"s0123456789abcdef"[n : n + 1])
            h.clock.advance(1)
        h.clock.advance(1)
        [(verb, body)] = farmFrames(pvx2)
        self.assertEqual((verb, body["error"]), (b"FAIL", "timeout"))
        self.assertTrue(pvx2.closed and pvx1.closed)
        for peer in (pvx2, pvx1):
            peer.lose()
        self.assertEqual(h.farm.connections, set())
        assertServes(self, h)

    def test_flood(self) -> None:
        """
        2,000 connections that never finish HELO (some say nothing, some a
        little): the farm keeps serving meanwhile, the timeout clears them
        all, and the farm's connection set is empty again.
        """
        h = newFarm(handshake_timeout=10)
        flood = []
        for n in range(2000):
            peer = h.peer()
            if n % 3 == 1:
                peer.raw(b"HELO0000")
            elif n % 3 == 2:
                peer.raw(b"s0123")
            flood.append(peer)
        self.assertEqual(len(h.farm.connections), 2000)
        assertServes(self, h, "during the flood")
        h.clock.advance(10)
        self.assertTrue(all(peer.closed for peer in flood))
        for peer in flood:  # the reactor reports each closed socket
            peer.lose()
        self.assertEqual(h.farm.connections, set())
        assertServes(self, h, "after the flood")
        self.assertEqual(h.farm.connections, set())
        self.assertEqual(h.clock.getDelayedCalls(), [])


class OversizeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = newFarm(max_frame=4096, max_job_bytes=100_000)

    def test_frameOverMaxFrame(self) -> None:
        for role in (None, "consumer", "producer"):
            peer = self.h.peer() if role is None else (
                self.h.consumer() if role == "consumer" else self.h.producer())
            peer.raw(b"DATA00004097")
            [(verb, body)] = farmFrames(peer)
            self.assertEqual((verb, body["error"]), (b"FAIL", "protocol"))
            self.assertIn("exceeds max_frame 4096", body["message"])
            self.assertTrue(peer.closed)
            peer.lose()
            assertServes(self, self.h)

    def test_largestLengthField(self) -> None:
        peer = self.h.peer()
        peer.raw(b"HELO99999999" + bytes(100))
        [(verb, body)] = farmFrames(peer)
        self.assertEqual((verb, body["error"]), (b"FAIL", "protocol"))
        self.assertLessEqual(peer.protocol._decoder.pending(), 12 + 100)  # nothing more held
        peer.lose()
        assertServes(self, self.h)

    def test_jobOverMaxJobBytes(self) -> None:
        """
        A job-level FAIL too_large; the consumer's connection stays open and
        runs the next job.
        """
        producer = self.h.producer(models=[MODEL], languages=["en"])
        consumer = self.h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=100_001))
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "too_large"))
        self.assertFalse(consumer.closed)
        self.assertEqual(producer.messages(), [])
        consumer.send(b"JOB_", STT_JOB)
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        consumer.data(b"x")
        producer.messages()
        producer.send(b"RSLT", {"id": asgn["id"], "text": "ok"})
        self.assertEqual(consumer.messages(), [("RSLT", {"id": asgn["id"], "text": "ok"})])

    def test_resultOverMaxJobBytes(self) -> None:
        producer = self.h.producer(models=[MODEL], languages=["en"])
        consumer = self.h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        [(_, asgn)] = consumer.messages()
        consumer.data(b"x")
        producer.messages()
        producer.send(b"RSLT", {"id": asgn["id"], "text": "", "size": 100_001})
        [(verb, body)] = producer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertIn("max_job_bytes", body["message"])
        self.assertTrue(producer.closed)
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"]), ("FAIL", asgn["id"]))
        self.assertFalse(consumer.closed)
        producer.lose()
        consumer.lose()
        assertServes(self, self.h)


class DeepJsonTests(SynchronousTestCase):
    """
    JSON nested deeper than Python's recursion limit (json.loads raised
    RecursionError out of dataReceived before messages.decodeObject caught
    it).
    """

    deep = b"[" * 4000

    def test_hello(self) -> None:
        h = newFarm()
        peer = h.peer()
        peer.raw(encodeFrame(b"HELO", self.deep))
        [(verb, body)] = farmFrames(peer)
        self.assertEqual((verb, body["error"]), (b"FAIL", "protocol"))
        self.assertIn("nested too deeply", body["message"])
        settle(self, h, peer, [(verb, body)])
        assertServes(self, h)

    def test_jobAndResult(self) -> None:
        h = newFarm()
        producer = h.producer(models=[MODEL], languages=["en"])
        consumer = h.consumer()
        consumer.raw(encodeFrame(b"JOB_", self.deep))
        [(verb, body)] = farmFrames(consumer)
        self.assertEqual((verb, body["error"]), (b"FAIL", "protocol"))
        settle(self, h, consumer, [(verb, body)])
        consumer = h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        [(_, asgn)] = consumer.messages()
        consumer.data(b"x")
        producer.messages()
        producer.raw(encodeFrame(b"RSLT", b'{"id": ' + self.deep))
        toProducer = farmFrames(producer)
        self.assertEqual([(v, b["error"]) for v, b in toProducer], [(b"FAIL", "protocol")])
        [(verb, body)] = farmFrames(consumer)
        self.assertEqual((verb, body["id"]), (b"FAIL", asgn["id"]))
        settle(self, h, producer, toProducer)
        consumer.lose()
        assertServes(self, h)


class _Silent(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def rssBytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RealSocketFloodTests(TestCase):
    timeout = 60

    async def test_silentConnections(self) -> None:
        """
        300 real sockets that never say HELO: the farm holds them in little
        memory, serves a real job meanwhile, and closes them all when the
        handshake timeout runs out.
        """
        farm = LoopbackFarm(handshake_timeout=1.5)
        await farm.listen()
        self.addCleanup(farm.stop)
        await farm.producer("stt", DigestHandler((MODEL,), ("en",)))
        port = farm.ports["stt"].getHost().port
        before = rssBytes()
        silent = []
        for n in range(300):
            protocol = _Silent()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
            silent.append(protocol)
        await until(lambda: len(farm.farm.connections) >= 301, "300 silent peers connected")
        self.assertLess(rssBytes() - before, 64 * 1024 * 1024)
        await self.realJob(farm)
        await DeferredList([p.closed for p in silent])
        await until(lambda: len(farm.farm.connections) <= 1, "the silent peers gone")
        await self.realJob(farm)

    async def realJob(self, farm: LoopbackFarm) -> None:
        from privox.consumer import connectConsumer

        consumer = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        try:
            result = await consumer.stt(MODEL, b"audio", language="en")
            self.assertEqual(result.text, f"sha256:{digestOf(b'audio')} bytes:5")
        finally:
            consumer.transport.loseConnection()


MODELS = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES)


def post(path: str, body: bytes, contentType: str, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: p\r\nContent-Type: " + contentType.encode()
        + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


class HttpTests(SynchronousTestCase):
    """
    Hostile HTTP requests to one L{ApiSite}, each followed by a good one.
    """

    cap = 4096

    def setUp(self) -> None:
        self.exchange = FakeExchange()
        self.api = PrivoxAPI(
            self.exchange, MODELS, PolicyAccess(OpenPolicy()), maxUpload=self.cap, clock=Clock(),
            runInThread=maybeDeferred,
        )
        self.api.log = type(self.api.log)(observer=lambda e: None)
        self.site = self.api.site()

    def status(self, written: bytes) -> int:
        self.assertTrue(written.startswith(b"HTTP/1.1 "), written[:200])
        return int(written[9:12])

    def assertRefused(self, request: bytes, status: int, reason: bytes) -> None:
        written = rawRequest(self.site, request)
        self.assertEqual(self.status(written), status, written[:300])
        self.assertIn(reason, written)
        self.assertServes()

    def assertServes(self) -> None:
        calls = len(self.exchange.calls)
        body, contentType = multipart({"key": "k"}, {"file": ("a.wav", WAV)})
        written = rawRequest(self.site, post("/stt", body, contentType))
        self.assertEqual(self.status(written), 200, written[:300])
        self.assertTrue(written.endswith(b"\r\n\r\nhello world\n"), written[-100:])
        body, contentType = multipart({"key": "k", "text": "Hello."})
        written = rawRequest(self.site, post("/tts", body, contentType))
        self.assertEqual(self.status(written), 200, written[:300])
        self.assertEqual(len(self.exchange.calls), calls + 2)

    def test_declaredOverCap(self) -> None:
        body = b"x" * (self.cap + 1)
        self.assertRefused(post("/stt", body, "multipart/form-data; boundary=b"), 413,
                           b"the limit is 4096 bytes")
        # A huge declared length, and then not that much: refused at once
        # (no waiting for the body or the idle timeout), what follows is
        # discarded as it comes, and others are served.
        written = rawRequest(
            self.site,
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999\r\n\r\n"
            + bytes(100_000))
        self.assertEqual(self.status(written), 413, written[:300])
        self.assertEqual(written.count(b"HTTP/1.1"), 1)
        self.assertServes()
        # Asked first (Expect: 100-continue, as curl does): refused at once,
        # with no invitation to send it.
        written = rawRequest(
            self.site,
            b"POST /stt HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999\r\n\r\n")
        self.assertTrue(written.startswith(b"HTTP/1.1 413 "), written)
        self.assertNotIn(b"100 Continue", written)
        self.assertIn(b"Connection: close", written)
        self.assertTrue(
            written.endswith(b"the limit is 4096 bytes (this API's --max-upload;"
                             b" long recordings go to the farms in pieces)\n"), written
        )
        # Within the cap, the invitation comes as before.
        body = b"--b--\r\n"
        written = rawRequest(
            self.site,
            b"POST /stt HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n" % len(body))
        self.assertEqual(written, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertServes()

    def test_chunkedOverCap(self) -> None:
        chunks = b"".join(b"%x\r\n%s\r\n" % (1000, b"y" * 1000) for _ in range(5)) + b"0\r\n\r\n"
        self.assertRefused(
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks,
            413, b"the request is 5000 bytes; the limit is 4096 bytes")

    def test_hugeFieldOverCap(self) -> None:
        body, contentType = multipart({"key": "k", "text": "a" * (10 * 1024 * 1024)})
        self.assertRefused(post("/tts", body, contentType), 413, b"the limit is %d bytes" % FORM_LIMIT)

    def test_malformedMultipart(self) -> None:
        good, contentType = multipart({"key": "k"}, {"file": ("a.wav", WAV)})
        cases = [
            (good[:-30], contentType),  # truncated
            (b"garbage", "multipart/form-data; boundary=b"),
            (good, "multipart/form-data"),  # no boundary
            (good, "multipart/form-data; boundary=other"),
            (good.replace(b'name="file"; ', b""), contentType),  # file part without filename
            (good.replace(b"Content-Disposition", b"Content-Dispositio"), contentType),
            (b"--privox-test-boundary\r\n\r\n\r\n--privox-test-boundary--\r\n", contentType),
        ]
        for body, kind in cases:
            written = rawRequest(self.site, post("/stt", body, kind))
            self.assertIn(self.status(written), (400, 422), written[:300])
            self.assertServes()

    @FUZZ
    @given(st.binary(max_size=400), st.sampled_from(["/stt", "/tts", "/v1/audio/transcriptions"]))
    def test_fuzzedMultipart(self, junk: bytes, path: str) -> None:
        """
        Random bytes inside a plausible multipart body: a 4xx with a reason,
        never a 500 or a dropped connection.
        """
        good, contentType = multipart({"key": "k"}, {"file": ("a.wav", WAV)})
        at = len(junk) % len(good)
        for body in (junk, good[:at] + junk + good[at:]):
            written = rawRequest(self.site, post(path, body, contentType, b"Authorization: Bearer k\r\n"))
            status = self.status(written)
            self.assertTrue(400 <= status < 500 or status == 200, written[:300])
        self.assertServes()

    def test_nonUtf8(self) -> None:
        for fields in ({"key": "k", "text": b"caf\xe9"}, {"key": b"\xff\xfe", "text": "hi"},
                       {"key": "k", "text": "hi", "voice": b"\xc3("}):
            body, contentType = multipart(fields)
            written = rawRequest(self.site, post("/tts", body, contentType))
            self.assertEqual(self.status(written), 400, written[:300])
            self.assertIn(b"is not UTF-8 text", written)
            self.assertServes()
        written = rawRequest(self.site, post(
            "/v1/audio/speech", b'{"model": "tts-1", "input": "\xff", "voice": "alloy"}',
            "application/json", b"Authorization: Bearer k\r\n"))
        self.assertEqual(self.status(written), 400, written[:300])
        self.assertServes()

    def test_deepJson(self) -> None:
        self.assertRefused(
            post("/v1/audio/speech", b"[" * 4000, "application/json", b"Authorization: Bearer k\r\n"),
            400, b"the body must be a JSON object")

    def test_garbageRequestLine(self) -> None:
        for junk in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                     b"POST /stt HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
            written = rawRequest(self.site, junk)
            self.assertTrue(written == b"" or written.startswith(b"HTTP/1.1 4"), written[:200])
            self.assertServes()


UNSAFE_NAMES = ["../sample.wav", "/etc/sample.wav", "a/../../sample.wav", "..\\sample.wav",
                "C:\\sample.wav", "c:sample.wav"]


class ZipTests(SynchronousTestCase):
    """
    Through the node's L{decodeAudio}: path tricks and bombs are refused
    without inflating the member; the next good zip decodes.
    """

    def setUp(self) -> None:
        self.wav = wavFile(tone(0.5, 16000), 16000)
        self.opened: list[Any] = []
        original = zipfile.ZipFile.open

        def spy(archive: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
            if (args[0] if args else kwargs.get("mode", "r")) == "r":
                self.opened.append(name)
            return original(archive, name, *args, **kwargs)

        self.patch(zipfile.ZipFile, "open", spy)

    def assertRefused(self, archive: bytes, reason: str) -> None:
        with self.assertRaises(BadAudio) as caught:
            decodeAudio(archive, "auto")
        self.assertIn(reason, str(caught.exception))
        self.assertEqual(self.opened, [], "a refused member was inflated")
        decoded = decodeAudio(zipped({"sample.wav": self.wav}), "zip")
        self.assertAlmostEqual(len(decoded.samples) / 16000, 0.5, places=2)
        self.opened.clear()

    def test_pathTricks(self) -> None:
        for name in UNSAFE_NAMES:
            self.assertRefused(zipped({name: self.wav}), "unsafe name")
            self.assertRefused(zipped({"sample.wav": self.wav, name: b"x"}), "unsafe name")

    def test_bombs(self) -> None:
        self.assertRefused(zipOfZeros("sample.wav", 210), "the limit is 209715200")
        self.assertRefused(zipOfZeros("sample.wav", 20), "a zip bomb?")


def formBody(fields: dict[str, str | bytes], audio: bytes | None = None) -> tuple[bytes, str]:
    return multipart(fields, {"file": ("clip.zip", audio)} if audio is not None else None)


class LocalExchangeHostileTests(TestCase):
    """
    The whole exchange in one process (farm, API, a node with the bundled
    whisper and piper models), over real sockets.
    """

    timeout = 120

    async def test_hostileThenGood(self) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        from privox.local import LocalExchange, LocalSettings

        local = LocalExchange(LocalSettings(port=0, accounts="none"), reactor)
        local.startService()
        self.addCleanup(local.stopService)
        await local.ready
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

        async def send(path: str, fields: dict[str, str | bytes],
                       audio: bytes | None = None) -> tuple[int, bytes]:
            body, contentType = formBody(fields, audio)
            response = await http.post(local.url + path, data=body,
                                       headers={"Content-Type": contentType})
            return response.code, await response.content()

        async def good() -> None:
            code, spoken = await send("/tts", {"key": "demo", "voice": "voice1",
                                                "text": "Good morning."})
            self.assertEqual(code, 200, spoken[:200])
            self.assertTrue(spoken.startswith(b"RIFF"))
            code, text = await send("/stt", {"key": "demo"}, zipped({"sample.wav": spoken}))
            self.assertEqual(code, 200, text)
            self.assertIn(b"morning", text.lower())

        await good()
        cases = [
            ("/stt", {"key": "demo"}, zipOfZeros("sample.wav", 210), 400, b"the limit is 209715200"),
            ("/stt", {"key": "demo"}, zipOfZeros("sample.wav", 20), 400, b"zip bomb?"),
            ("/stt", {"key": "demo"}, zipped({"../sample.wav": WAV}), 400, b"unsafe name"),
            ("/stt", {"key": "demo"}, b"PK\x03\x04" + bytes(100), 400, b"corrupt zip"),
            ("/tts", {"key": "demo", "text": b"caf\xe9"}, None, 400, b"not UTF-8 text"),
            ("/tts", {"key": "demo", "text": "a" * 10 * 1024 * 1024}, None, 413, b"the limit is 262144 bytes"),
            ("/tts", {"key": "demo", "text": "word " * 2000}, None, 413, b"at most 5000 are spoken"),
        ]
        for path, fields, audio, status, reason in cases:
            code, body = await send(path, fields, audio)
            self.assertEqual((code, path), (status, path), body[:300])
            self.assertIn(reason, body)
            await good()
