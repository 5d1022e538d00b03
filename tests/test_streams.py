"""
Streaming jobs (docs/protocol.rst §5.8): the farm's rules, frame by frame
on in-memory transports; and real streams through a farm on loopback
sockets, in the clear and sealed, with the digest node answering every
piece of the upload at once.
"""

from __future__ import annotations

import json
import random

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api.exchange import Heard
from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.api.farmstreams import wholeWav
from privox.consumer import ConsumerProtocol, JobFailed, JobResult, SealRefused
from privox.framing import FrameDecoder, encodeFrame
from privox.identity import decodeKey, encodeKey
from privox.messages import controlFrame
from privox.node.worker import ProducerProtocol
from privox.sealing import (
    RESULT, UPLOAD, Ephemeral, Opener, StreamSealer, nodeKeys, packed, seal, unpack,
)
from privox.engines.digest import digestOf, toneFor
from privox.messages import JobRequest
from privox.node.echo import DigestHandler
from privox.node.streams import LiveRun, SentenceCutter, SpeechRun
from privox.node.worker import Answer
from privox.wav import pcmToWav, wavPCM
from tests.farmharness import FarmHarness
from tests.loopbackfarm import LoopbackFarm
from tests.support import sleep, until
from tests.test_sealed_jobs import Exchange, OnLoopback

STT = "whisper:tiny.en"
TTS = "piper:en_US-joe-medium"


def streamJob(**fields) -> dict:
    return {"model": STT, "size": 0, "stream": True, "format": "pcm_s16le", **fields}


class FarmStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = FarmHarness(max_job_bytes=10_000, stream_idle_s=3, max_stream_s=60)

    def streamingProducer(self, service: str = "stt"):
        peer = self.h.peer(service)
        peer.send(b"HELO", {"protocol": 2, "role": "producer", "service": service, "key": "pk",
                            "models": ["*"], "languages": [], "stream": True})
        [(verb, okay)] = peer.messages()
        assert verb == "OKAY"
        return peer

    def assigned(self):
        producer = self.streamingProducer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", streamJob())
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        [(verb, job)] = producer.messages()
        self.assertEqual((verb, job["stream"], job["size"]), ("JOB_", True, 0))
        return consumer, producer, asgn["id"]

    def test_okayAnnouncesLimits(self) -> None:
        peer = self.h.peer()
        peer.send(b"HELO", {"protocol": 2, "role": "consumer", "service": "stt", "key": "ck"})
        [(verb, okay)] = peer.messages()
        self.assertEqual(okay["stream"], {"max_s": 60, "idle_s": 3})

    def test_onlyStreamingProducers(self) -> None:
        """
        A producer that did not say C{stream} in HELO never gets a stream.
        """
        self.h.producer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", streamJob())
        [(verb, fail)] = consumer.messages()
        self.assertEqual((verb, fail["error"], fail["id"]), ("FAIL", "no_producer", None))

    def test_sizeMustBeZero(self) -> None:
        self.streamingProducer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", streamJob(size=10))
        [(verb, fail)] = consumer.messages()
        self.assertEqual(fail["error"], "bad_request")

    def test_relayed(self) -> None:
        """
        The upload goes on piece by piece until an empty DATA; PARTs and
        their bytes come back as they are sent; the RSLT ends the job, and
        the connection takes another. Fed byte by byte, the same.
        """
        for byByte in (False, True):
            self.setUp()
            consumer, producer, jobId = self.assigned()
            send = consumer.raw
            if byByte:
                send = lambda data: [consumer.raw(data[i:i + 1]) for i in range(len(data))]
            send(b"DATA00000003abc")
            self.assertEqual(b"".join(d for v, d in producer.messages() if v == "DATA"), b"abc")
            producer.send(b"PART", {"id": jobId, "text": "a", "final": False, "size": 2})
            producer.data(b"xy")
            self.assertEqual(consumer.messages(), [
                ("PART", {"id": jobId, "text": "a", "final": False, "size": 2}), ("DATA", b"xy"),
            ])
            send(b"DATA00000002de" + b"DATA00000000")
            relayed = producer.messages()
            self.assertEqual(b"".join(d for v, d in relayed), b"de")
            self.assertEqual(relayed[-1], ("DATA", b""))
            producer.send(b"RSLT", {"id": jobId, "text": "abcde", "duration_s": 0.1})
            [(verb, result)] = consumer.messages()
            self.assertEqual((verb, result["text"]), ("RSLT", "abcde"))
            self.assertFalse(consumer.closed)

    def test_idleGap(self) -> None:
        """
        A stream whose upload stops coming times out; its producer is
        cancelled; the rest of the upload, up to its end, is discarded.
        """
        consumer, producer, jobId = self.assigned()
        consumer.data(b"abc")
        self.h.clock.advance(2.5)
        consumer.data(b"def")
        self.h.clock.advance(2.5)
        self.assertEqual(consumer.messages(), [])
        self.h.clock.advance(0.6)
        [(verb, fail)] = consumer.messages()
        self.assertEqual((verb, fail["error"], fail["id"]), ("FAIL", "timeout", jobId))
        self.assertEqual(producer.messages()[-1], ("CNCL", {"id": jobId}))
        consumer.data(b"late")
        consumer.raw(b"DATA00000000")
        self.assertEqual(producer.messages(), [])
        producer.send(b"FAIL", {"id": jobId, "error": "cancelled", "message": "cancelled"})
        consumer.send(b"JOB_", streamJob())
        self.assertEqual(consumer.messages()[0][0], "ASGN")

    def test_jobBeforeEnd(self) -> None:
        """
        The stream's end is owed even when the job is over.
        """
        consumer, producer, jobId = self.assigned()
        producer.send(b"FAIL", {"id": jobId, "error": "engine_error", "message": "x"})
        consumer.messages()
        consumer.send(b"JOB_", streamJob())
        [(verb, fail)] = consumer.messages()
        self.assertEqual((verb, fail["error"]), ("FAIL", "protocol"))

    def test_longerThanMaxJobBytes(self) -> None:
        consumer, producer, jobId = self.assigned()
        consumer.data(b"x" * 6000)
        consumer.data(b"x" * 6000)
        self.assertTrue(consumer.closed)

    def test_partOutsideStream(self) -> None:
        producer = self.h.producer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": STT, "size": 3, "format": "wav"})
        [(_, asgn)] = consumer.messages()
        producer.send(b"PART", {"id": asgn["id"], "text": "x"})
        self.assertTrue(producer.closed)

    def test_partForAnotherJob(self) -> None:
        consumer, producer, jobId = self.assigned()
        producer.send(b"PART", {"id": "0" * 16, "text": "x"})
        self.assertTrue(producer.closed)
        [(verb, fail)] = consumer.messages()
        self.assertEqual(fail["error"], "producer_lost")


class SentenceTests(SynchronousTestCase):
    def test_pieces(self) -> None:
        cutter = SentenceCutter()
        self.assertEqual(cutter.feed("Hello there. How a"), ["Hello there."])
        self.assertEqual(cutter.feed("re you? I am"), ["How are you?"])
        self.assertEqual(cutter.feed(" fine"), [])
        self.assertEqual(cutter.rest(), "I am fine")

    def test_longWithoutEnd(self) -> None:
        cutter = SentenceCutter()
        out = cutter.feed("word, " * 100)
        self.assertTrue(out and all(len(s) <= 300 for s in out))


class RelayedStreamTests(OnLoopback, TestCase):
    async def sttStream(self, seal=None, node=None) -> None:
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,)), node)
        consumer = await self.consumer(farm, "stt")
        self.assertIsNotNone(consumer.okay.stream)
        parts: list = []
        stream = consumer.stream(
            JobRequest("stt", STT, "en", 0, "pcm_s16le", stream=True),
            lambda fields, data: parts.append(fields), seal,
        )
        pieces = [random.Random(i).randbytes(100 + i * 500) for i in range(6)]
        for i, piece in enumerate(pieces):
            stream.write(piece)
            # Each piece is answered while the stream is still open.
            await until(lambda: len(parts) == i + 1, "a PART per piece")
        stream.end()
        result = await stream.done
        self.assertEqual([p["text"] for p in parts], [digestOf(p) for p in pieces])
        whole = b"".join(pieces)
        self.assertEqual(result.text, f"sha256:{digestOf(whole)} bytes:{len(whole)}")
        # The connection takes the next job.
        again = await consumer.stt(STT, b"more audio")
        self.assertTrue(again.text.startswith("sha256:"))

    async def test_stt(self) -> None:
        await self.sttStream()

    async def test_sttSealed(self) -> None:
        exchange = Exchange()
        await self.sttStream(exchange.policy(), exchange.node())

    async def test_writtenBeforeAssigned(self) -> None:
        """
        What is written, and the end, before ASGN waits for it.
        """
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,)))
        consumer = await self.consumer(farm, "stt")
        stream = consumer.stream(
            JobRequest("stt", STT, "en", 0, "pcm_s16le", stream=True), lambda f, d: None
        )
        stream.write(b"early")
        stream.end()
        self.assertFalse(stream.assigned)
        result = await stream.done
        self.assertEqual(result.text, f"sha256:{digestOf(b'early')} bytes:5")

    async def test_noStreamingNode(self) -> None:
        farm = await self.farm()

        class Plain(DigestHandler):
            streams = False

        await farm.producer("stt", Plain((STT,)))
        consumer = await self.consumer(farm, "stt")
        stream = consumer.stream(
            JobRequest("stt", STT, "en", 0, "pcm_s16le", stream=True), lambda f, d: None
        )
        failure = await self.assertFailure(stream.done, JobFailed)
        self.assertEqual(failure.code, "no_producer")

    async def ttsStream(self, seal=None, node=None) -> None:
        farm = await self.farm()
        await farm.producer("tts", DigestHandler((TTS,)), node)
        consumer = await self.consumer(farm, "tts")
        audio: list = []
        stream = consumer.stream(
            JobRequest("tts", TTS, "en", 0, text="Hello. ", stream=True),
            lambda fields, data: audio.append((fields, data)), seal,
        )
        for piece in ("How are ", "you? ", "Fine."):
            stream.write(piece.encode())
        stream.end()
        result = await stream.done
        self.assertEqual(
            [fields["text_sha256"] for fields, data in audio],
            [digestOf(p.encode()) for p in ("How are ", "you? ", "Fine.")],
        )
        self.assertEqual(
            [data for fields, data in audio],
            [wavPCM(toneFor(p))[0] for p in ("How are ", "you? ", "Fine.")],
        )
        self.assertEqual(result.fields["text_sha256"], digestOf(b"Hello. How are you? Fine."))
        wavPCM(result.data)

    async def test_tts(self) -> None:
        await self.ttsStream()

    async def test_ttsSealed(self) -> None:
        exchange = Exchange()
        await self.ttsStream(exchange.policy(), exchange.node())


class ExchangeStreamTests(TestCase):
    """
    The API's side: L{FarmExchange}'s live jobs over a real farm.
    """

    timeout = 30

    async def exchange(self, **settings):
        farm = LoopbackFarm(queue_timeout=2, **settings)
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        await farm.producer("stt", DigestHandler((STT,)))
        await farm.producer("tts", DigestHandler((TTS,)))
        exchange = FarmExchange(
            [FarmEntry("a", farm.endpoint("stt"), farm.endpoint("tts"))], reactor, key="ck",
        )
        self.addCleanup(exchange.stop)
        return exchange

    async def test_transcribeLive(self) -> None:
        exchange = await self.exchange()
        heard: list[Heard] = []
        live = exchange.transcribeLive(STT, "en", 30, heard.append)
        pieces = [b"one" * 100, b"two" * 200]
        live.write(pieces[0])
        await until(lambda: len(heard) == 1, "the first piece heard")
        live.write(pieces[1])
        live.end()
        result = await live.done
        self.assertEqual([h.text for h in heard], [digestOf(p) for p in pieces])
        self.assertTrue(all(h.final for h in heard))
        whole = b"".join(pieces)
        self.assertEqual(result.text, f"sha256:{digestOf(whole)} bytes:{len(whole)}")

    async def test_farmWithoutStreams(self) -> None:
        """
        An older farm gets the whole recording, as a WAV, once it ended;
        its transcript is heard as one final piece.
        """
        exchange = await self.exchange(max_stream_s=0)
        heard: list[Heard] = []
        live = exchange.transcribeLive(STT, "en", 30, heard.append)
        live.write(b"\x01\x00" * 800)
        live.end()
        result = await live.done
        wav = wholeWav(b"\x01\x00" * 800)
        self.assertEqual(result.text, f"sha256:{digestOf(wav)} bytes:{len(wav)}")
        self.assertEqual([(h.text, h.final) for h in heard], [(result.text, True)])

    async def test_noStreamingProducer(self) -> None:
        """
        Where only producers that take no streams are connected (original
        nodes, older ones), the whole recording goes as one job.
        """
        farm = LoopbackFarm(queue_timeout=2)
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))

        class Plain(DigestHandler):
            streams = False

        await farm.producer("stt", Plain((STT,)))
        exchange = FarmExchange(
            [FarmEntry("a", farm.endpoint("stt"), farm.endpoint("tts"))], reactor, key="ck",
        )
        self.addCleanup(exchange.stop)
        heard: list[Heard] = []
        live = exchange.transcribeLive(STT, "en", 30, heard.append)
        live.write(b"\x02\x00" * 400)
        await sleep(0.1)
        live.end()
        result = await live.done
        wav = wholeWav(b"\x02\x00" * 400)
        self.assertEqual(result.text, f"sha256:{digestOf(wav)} bytes:{len(wav)}")
        self.assertEqual(len(heard), 1)

    async def test_synthesizeLive(self) -> None:
        exchange = await self.exchange()
        spoken: list = []
        live = exchange.synthesizeLive(TTS, "en", None, 30, lambda pcm, rate: spoken.append((pcm, rate)))
        live.write("Hello there. ")
        live.write("Bye.")
        live.end()
        seconds = await live.done
        self.assertEqual([pcm for pcm, rate in spoken],
                         [wavPCM(toneFor(p))[0] for p in ("Hello there. ", "Bye.")])
        self.assertGreater(seconds, 0)


class Sink:
    """
    A L{StreamSink} that keeps what it is given; writable when told.
    """

    def __init__(self, send, fail) -> None:
        self.send = send
        self.fail = fail
        self.blocked: list | None = None

    def writable(self) -> Deferred:
        if self.blocked is None:
            return succeed(None)
        d: Deferred = Deferred()
        self.blocked.append(d)
        return d


class LiveRunTests(SynchronousTestCase):
    """
    L{LiveRun}'s order of work, with the thread pool's calls held by hand.
    """

    def setUp(self) -> None:
        self.calls: list = []
        self.failures: list = []

    def fail(self, error) -> None:
        self.failures.append(error)

    def inThread(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def test_finishWhileBusy(self) -> None:
        """
        The stream can end while the engine still starts, or decodes: the
        answer comes once it is done; pieces that came meanwhile are fed
        together.
        """
        transcription = type("T", (), {"feed": lambda self, c: [], "finish": lambda self: "done"})()
        engine = type("E", (), {"liveTranscription": lambda self, job: transcription})()
        from privox.engines.base import Partial, STTJob
        run = LiveRun(self.inThread, engine, STTJob(STT, None, "pcm_s16le", 0),
                      lambda t: Answer({"text": t}), lambda r: r)
        sent: list = []
        run.parts(Sink(sent.append, self.fail))
        run.feed(b"ab")
        run.feed(b"cd")
        answer = run.finish()
        [(f, args, started)] = self.calls
        started.callback(transcription)
        [_, (f, args, fed)] = self.calls
        self.assertEqual(args, (b"abcd",))
        self.assertNoResult(answer)
        fed.callback([Partial("ab", False, 0, 1)])
        [_, _, (f, args, finished)] = self.calls
        self.assertEqual(f, transcription.finish)
        finished.callback("all")
        self.assertEqual(self.successResultOf(answer).fields, {"text": "all"})
        self.assertEqual(sent, [Answer({"text": "ab", "final": False, "start": 0, "end": 1})])


class SpeechRunTests(SynchronousTestCase):
    """
    L{SpeechRun}: sentences spoken in order as the text completes them; one
    that may be complete is spoken at once, its audio held until the text
    after it says it was a sentence, or dropped.
    """

    def setUp(self) -> None:
        self.calls: list = []
        self.sent: list = []
        engine = type("E", (), {"name": "piper:x", "synthesize": None})()
        from privox.engines.base import TTSJob
        self.run = SpeechRun(self.inThread, engine, TTSJob(TTS, None, None, ""), lambda r: r)
        self.failed: list = []
        self.sink = Sink(lambda answer: self.sent.append(answer.body), self.failed.append)
        self.run.parts(self.sink)

    def inThread(self, f, job):
        d = Deferred()
        self.calls.append((job.text, d))
        return d

    def speak(self, index: int) -> None:
        text, d = self.calls[index]
        d.callback(pcmToWav(text.encode().ljust(20, b"_")[:20], 16000))

    def test_guessHeld(self) -> None:
        self.run.feed(b"Hello there.")
        # Spoken on the chance it is a sentence...
        self.assertEqual([t for t, _ in self.calls], ["Hello there."])
        self.speak(0)
        self.assertEqual(self.sent, [])  # ...but held: "Hello there.5"?
        self.run.feed(b" How are you?")
        self.assertEqual(self.sent, [b"Hello there.________"[:20]])
        self.assertEqual([t for t, _ in self.calls], ["Hello there.", "How are you?"])
        answer = self.run.finish()
        self.speak(1)
        self.assertEqual(len(self.sent), 2)
        self.assertEqual(self.successResultOf(answer).fields["content_type"], "audio/pcm")

    def test_heldBack(self) -> None:
        """
        While the farm reads nothing of what was sent, no sentence is made.
        """
        self.sink.blocked = []
        self.run.feed(b"One. Two. ")
        self.assertEqual(self.calls, [])
        [d] = self.sink.blocked
        self.sink.blocked = None
        d.callback(None)
        self.assertEqual([t for t, _ in self.calls], ["One."])

    def test_guessDropped(self) -> None:
        self.run.feed(b"It costs 3.")
        self.run.feed(b"5 euros. Bye")
        # The real sentence waits for the guess to be made (and dropped).
        self.assertEqual([t for t, _ in self.calls], ["It costs 3."])
        self.speak(0)
        self.assertEqual(self.sent, [])
        self.run.finish()
        self.speak(1)
        self.speak(2)
        self.assertEqual([t for t, _ in self.calls], ["It costs 3.", "It costs 3.5 euros.", "Bye"])
        self.assertEqual(len(self.sent), 2)


OKAY = {"protocol": 2, "farm": "f", "ping_interval": 10.0, "max_frame": 1 << 20,
        "max_job_bytes": 10_000_000, "stream": {"max_s": 600, "idle_s": 15}}


class SealedPieceTests(SynchronousTestCase):
    """
    A farm that joins, cuts or moves a sealed stream's pieces (their
    records still open, in order) is caught: each piece says, sealed, what
    it is and how many bytes follow its fields.
    """

    def setUp(self) -> None:
        exchange = Exchange()
        connectionKey, offer = exchange.node().offer()
        clock = Clock()
        clock.advance(reactor.seconds())
        self.consumer = ConsumerProtocol("stt", clock=clock)
        self.transport = StringTransport()
        self.consumer.makeConnection(self.transport)
        self.consumer.dataReceived(b"who" + controlFrame(b"OKAY", OKAY))
        self.transport.clear()
        self.parts: list = []
        self.stream = self.consumer.stream(
            JobRequest("stt", STT, "en", 0, "pcm_s16le", stream=True),
            lambda fields, data: self.parts.append(fields), exchange.policy(),
        )
        [job] = FrameDecoder().feed(self.transport.value())
        ephemeral = json.loads(job.payload)["seal"]["ephemeral"]
        self.consumer.dataReceived(controlFrame(b"ASGN", {"id": "j1", "seal": offer.fields()}))
        keys = nodeKeys(connectionKey, "j1", decodeKey(ephemeral))
        self.sealer = StreamSealer(keys.result, RESULT)

    def piece(self, kind: str, **fields) -> list[bytes]:
        return self.sealer.seal(packed(dict(fields, piece=kind, bytes=0)))

    def send(self, verb: bytes, records: list[bytes]) -> None:
        size = sum(map(len, records))
        self.consumer.dataReceived(controlFrame(verb, {"id": "j1", "sealed": True, "size": size}))
        self.consumer.dataReceived(encodeFrame(b"DATA", b"".join(records)))

    def test_pieces(self) -> None:
        self.send(b"PART", self.piece("part", text="one", final=True))
        self.send(b"PART", self.piece("part", text="two", final=True))
        self.stream.end()
        self.send(b"RSLT", self.piece("answer", text="one two") + self.sealer.close())
        self.assertEqual([p["text"] for p in self.parts], ["one", "two"])
        self.assertEqual(self.successResultOf(self.stream.done).fields["text"], "one two")

    def test_joined(self) -> None:
        both = self.piece("part", text="one", final=True) + self.piece("part", text="two", final=True)
        self.send(b"PART", both)
        self.failureResultOf(self.stream.done, SealRefused)
        self.assertEqual(self.parts, [])
        self.assertTrue(self.transport.disconnecting)

    def test_movedIntoTheAnswer(self) -> None:
        records = self.piece("part", text="only the last bit", final=True)
        records += self.piece("answer", text="the whole transcript") + self.sealer.close()
        self.stream.end()
        self.send(b"RSLT", records)
        self.failureResultOf(self.stream.done, SealRefused)


class ReviewedTests(TestCase):
    """
    What a review of streams found, each shown fixed.
    """

    async def test_producerLostAfterAssign(self) -> None:
        """
        A producer's no_producer once the stream flowed does not start the
        stream over as a whole job (on what is left of it).
        """
        from privox.api.errors import Unavailable
        from privox.api.farmstreams import FarmStream
        from privox.messages import Okay, StreamLimits

        class Flowing:
            assigned = True
            done: Deferred = Deferred()

            def write(self, data: bytes) -> None:
                pass

            def end(self) -> None:
                pass

        flowing = Flowing()

        class Connection:
            okay = Okay("f", 10, 1 << 20, 10 ** 7, 0, StreamLimits(600, 15))

            def stream(self, request, onPart, seal):
                return flowing

        async def place(service, send, deadline):
            return await send(Connection(), deadline, None)

        wholes: list = []

        async def whole(data, seconds):
            wholes.append(data)

        stream = FarmStream(place, "stt", JobRequest("stt", STT, None, 0, "pcm_s16le", stream=True),
                            60, whole, reactor)
        stream.write(b"A" * 10)
        flowing.done.errback(JobFailed("no_producer", "a hostile producer says so", "j1"))
        stream.end()
        await self.assertFailure(stream.done, Unavailable)
        self.assertEqual(wholes, [])

    def test_emptyFinal(self) -> None:
        """
        An empty final (a partial that came to nothing) is no segment: the
        utterances the producer had not given as pieces are still heard.
        """
        from privox.api.farms import _Transcription

        class Placed:
            onPart = None
            done: Deferred = Deferred()

        placed = Placed()
        heard: list[Heard] = []
        _Transcription(placed, STT, "en", heard.append)
        placed.onPart({"text": "uh", "final": False, "start": 0, "end": 1}, b"")
        placed.onPart({"text": "", "final": True, "start": 0, "end": 1}, b"")
        placed.onPart({"text": "hello", "final": True, "start": 2, "end": 3}, b"")
        placed.done.callback(JobResult("j", {"text": "hello bye", "segments": [
            {"start": 2, "end": 3, "text": "hello"}, {"start": 4, "end": 5, "text": "bye"}]}))
        self.assertEqual([h.text for h in heard if h.final], ["", "hello", "bye"])

    def test_partsCounted(self) -> None:
        """
        PARTs' own bytes count against max_job_bytes: a producer cannot
        flood its consumer with PARTs of no size.
        """
        farm = FarmStreamTests("test_relayed")
        farm.setUp()  # max_job_bytes 10_000
        consumer, producer, jobId = farm.assigned()
        for _ in range(3):
            producer.send(b"PART", {"id": jobId, "text": "x" * 5000, "final": False})
        self.assertTrue(producer.closed)

    def test_sealedEarly(self) -> None:
        """
        A JOB_ whose upload was sealed for this node before the job had an
        id opens with the keys of no id; one sealed for another node's key
        is refused unopened, and so is the same job again.
        """
        exchange = Exchange()
        node = ProducerProtocol("stt", "pk", DigestHandler((STT,)), exchange.node())
        transport = StringTransport()
        node.makeConnection(transport)
        node.dataReceived(b"who" + controlFrame(b"OKAY", OKAY))
        [helo] = FrameDecoder().feed(transport.value())
        hello = json.loads(helo.payload)
        self.assertIs(hello["early_seal"], True)
        mine = hello["seal"]["key"]
        ephemeral = Ephemeral()
        keys = ephemeral.keys(None, X25519PublicKey.from_public_bytes(decodeKey(mine)))
        upload = b"".join(seal(keys.upload, UPLOAD, packed({}), b"audio"))
        job = {"model": STT, "language": None, "size": len(upload), "format": "auto",
               "seal": {"ephemeral": encodeKey(ephemeral.public), "for": mine}}
        for target, jobId in (("someone-else", "a" * 16), (mine, "b" * 16), (mine, "c" * 16)):
            transport.clear()
            node.dataReceived(controlFrame(b"JOB_", dict(job, id=jobId, seal=dict(job["seal"], **{"for": target})))
                              + encodeFrame(b"DATA", upload))
            frames = FrameDecoder().feed(transport.value())
            if jobId == "b" * 16:
                rslt, data = frames
                self.assertEqual(json.loads(rslt.payload)["sealed"], True)
                opener = Opener(keys.result, RESULT, len(data.payload))
                fields, _ = unpack(b"".join(opener.feed(data.payload)))
                self.assertEqual(fields["text"], f"sha256:{digestOf(b'audio')} bytes:5")
                continue
            [fail] = frames
            self.assertEqual((fail.verb, json.loads(fail.payload)["error"]), (b"FAIL", "seal_broken"))

    def test_sealedJobReplayed(self) -> None:
        """
        A node refuses a sealed job its connection has seen (a farm
        replaying it would have it answered under the same keys).
        """
        exchange = Exchange()
        node = ProducerProtocol("stt", "pk", DigestHandler((STT,)), exchange.node())
        transport = StringTransport()
        node.makeConnection(transport)
        node.dataReceived(b"who" + controlFrame(b"OKAY", OKAY))
        ephemeral = Ephemeral()
        job = {"model": STT, "language": None, "size": 100, "format": "auto",
               "seal": {"ephemeral": encodeKey(ephemeral.public)}}
        transport.clear()
        node.dataReceived(controlFrame(b"JOB_", dict(job, id="a" * 16)))
        self.assertEqual(transport.value(), b"")  # taken: the upload is awaited
        node.dataReceived(controlFrame(b"CNCL", {"id": "a" * 16}))
        transport.clear()
        node.dataReceived(controlFrame(b"JOB_", dict(job, id="b" * 16)))
        [fail] = FrameDecoder().feed(transport.value())
        self.assertEqual((fail.verb, json.loads(fail.payload)["error"]), (b"FAIL", "seal_broken"))
