"""
Large DATA relayed inside the kernel (privox.farm.splice), over real loopback
sockets: what arrives is what was sent, and every way a relay can be cut
short leaves both peers' streams whole and the farm serving.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.consumer import ConsumerProtocol, JobFailed
from privox.farm import splice
from privox.farm.connection import FarmConnection
from privox.farm.sessions import ConsumerSession, ProducerSession
from privox.farm.splice import spliceable
from privox.framing import Frame, encodeHeader
from privox.messages import ErrorCode, controlFrame
from privox.engines.digest import digestOf
from privox.node.echo import DigestHandler
from privox.node.worker import Answer, Collected, ProducerProtocol
from tests.apifarms import LiveFarm, startFarm
from tests.loopbackfarm import StallingUpload
from tests.support import until

MiB = 1024 * 1024


def audio(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def transcript(data: bytes) -> str:
    return f"sha256:{digestOf(data)} bytes:{len(data)}"


class BigResult:
    """
    TTS: answers every job with C{body}.
    """

    models = ("*",)
    languages = ()

    def __init__(self, body: bytes) -> None:
        self.body = body

    def start(self, job: dict[str, Any]) -> Collected:
        return Collected(lambda _: Answer({"content_type": "audio/wav", "model": job["model"]}, self.body))


class HalfUpload(StallingUpload):
    """
    Sends the first half of its upload once assigned, then C{after}, raw.
    """

    after = b""

    def frameReceived(self, frame: Frame) -> None:
        super().frameReceived(frame)
        if frame.verb == b"ASGN" and self.after:
            self.transport.write(self.after)


class Ragged(ConsumerProtocol):
    """
    Cuts its uploads into DATA frames of random sizes, and writes the stream
    in random pieces, some after a pause: headers split across reads, tiny
    frames, frames a relay meets halfway.
    """

    def __init__(self, service: str, rng: random.Random) -> None:
        super().__init__(service)
        self.rng = rng

    def sendData(self, payload: bytes) -> None:
        assert self.okay is not None
        rng, stream, start = self.rng, [], 0
        while start < len(payload):
            size = rng.choice([1, 7, 4096, 100_000, 300_000, self.okay.max_frame])
            chunk = payload[start : start + size]
            stream += (encodeHeader(b"DATA", len(chunk)), chunk)
            start += len(chunk)
        data = b"".join(stream)
        pieces, start = [], 0
        while start < len(data):
            size = rng.choice([1, 5, 12, 13, 65_536, 700_000, len(data)])
            pieces.append(data[start : start + size])
            start += size
        self._writeSlowly(pieces)

    def _writeSlowly(self, pieces: list[bytes]) -> None:
        while pieces:
            self.transport.write(pieces.pop(0))
            if pieces and self.rng.random() < 0.2:
                # Let the farm read what came so far.
                reactor.callLater(0.001, self._writeSlowly, pieces)
                return


class EarlyAnswer(ProducerProtocol):
    """
    Answers each job at its first DATA frame, before the upload has ended;
    the rest of the upload is stale to it.
    """

    def frameReceived(self, frame: Frame) -> None:
        current = self._current
        if frame.verb == b"DATA" and current is not None:
            self._answer(current, {"id": current.id, "text": "early"}, verb=b"RSLT")
            return
        super().frameReceived(frame)


class SpliceTestCase(TestCase):
    timeout = 60

    async def rawPeer(self, farm: LiveFarm, protocol: Any, service: str = "stt") -> Any:
        port = farm.port(service)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
        await protocol.ready
        self.addCleanup(lambda: protocol.disconnected)
        self.addCleanup(protocol.transport.loseConnection)
        return protocol

    def connections(self, farm: LiveFarm, kind: type) -> list[FarmConnection]:
        return [c for c in farm.farm.connections if isinstance(c.session, kind)]

    async def assertQuiet(self, farm: LiveFarm) -> None:
        """
        No relay left behind: every connection reads again, nothing waits
        (once the frame a relay was moving when its job moved on is done).
        """
        def quiet() -> bool:
            return all(
                connection.relayIn is None
                and connection.relayOut is None
                and connection._readHolds is None
                and connection.transport in reactor.getReaders()
                for connection in farm.farm.connections
            )

        await until(quiet, "every relay done, every connection reading", 10)


class RelayTests(SpliceTestCase):
    async def test_uploadsSpliced(self) -> None:
        """
        Large uploads go through the kernel whole, from their first DATA
        byte; small ones, before and after, the ordinary way.
        """
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        consumer = await farm.consumer("stt")
        sizes = [3 * MiB + 5, 1000, 5 * MiB, 200 * 1024, 64 * 1024]
        for seed, size in enumerate(sizes):
            data = audio(size, seed)
            result = await consumer.stt("whisper:tiny.en", data)
            self.assertEqual(result.text, transcript(data))
        spliced = [s for s in sizes if s >= farm.farm.settings.splice_min and s > 64 * 1024]
        self.assertEqual(farm.farm.splicer.relays, len(spliced))
        self.assertEqual(farm.farm.splicer.bytes, sum(spliced))
        await self.assertQuiet(farm)

    async def test_resultSpliced(self) -> None:
        """
        A large TTS result goes through the kernel too (all but what came
        with its RSLT).
        """
        body = audio(6 * MiB + 3, 7)
        farm = await startFarm(self, "splice")
        await farm.producer("tts", BigResult(body))
        consumer = await farm.consumer("tts")
        for _ in range(2):
            result = await consumer.tts("tone:x", "hello")
            self.assertEqual(result.data, body)
        self.assertGreater(farm.farm.splicer.bytes, 2 * (len(body) - MiB))
        await self.assertQuiet(farm)

    async def test_manyPeersMixedSizes(self) -> None:
        """
        Consumers and producers on persistent connections, uploads of every
        size (early, ordinary, spliced, several frames): each result is its
        own upload's.
        """
        farm = await startFarm(self, "splice")
        for _ in range(2):
            await farm.producer("stt", DigestHandler())
        rng = random.Random(11)
        sizes = [100, 64 * 1024, 130 * 1024, MiB, MiB + 1, 2 * MiB + 17, 4 * MiB]

        async def run(n: int) -> int:
            consumer = await farm.consumer("stt")
            done = 0
            for i in range(6):
                data = audio(rng.choice(sizes), 100 * n + i)
                result = await consumer.stt("whisper:tiny.en", data)
                self.assertEqual(result.text, transcript(data))
                done += 1
            return done

        counts = await gatherResults([Deferred.fromCoroutine(run(n)) for n in range(3)])
        self.assertEqual(counts, [6, 6, 6])
        self.assertGreater(farm.farm.splicer.relays, 0)
        await self.assertQuiet(farm)

    async def test_raggedFrames(self) -> None:
        """
        Uploads in frames of any size, written in any pieces at any pace,
        with results in between: each result is its own upload's.
        """
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        rng = random.Random(2026)
        consumer = await self.rawPeer(farm, Ragged("stt", rng))
        for n in range(25):
            data = audio(rng.choice([200_000, MiB + 3, 3 * MiB + 11]), 1000 + n)
            self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        self.assertGreater(farm.farm.splicer.relays, 0)
        await self.assertQuiet(farm)

    async def test_offRelaysThroughMemory(self) -> None:
        """
        splice_min 0: no splicer; large uploads still arrive whole.
        """
        farm = await startFarm(self, "splice", splice_min=0)
        self.assertIsNone(farm.farm.splicer)
        await farm.producer("stt", DigestHandler())
        consumer = await farm.consumer("stt")
        data = audio(3 * MiB, 2)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))

    async def test_noRelayWhenTheSystemRefuses(self) -> None:
        """
        Out of pipes (or descriptors): the ordinary way carries the job.
        """

        def exhausted() -> tuple[int, int]:
            raise OSError(24, "Too many open files")

        self.patch(splice, "_newPipe", exhausted)
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        consumer = await farm.consumer("stt")
        for seed in range(2):
            data = audio(2 * MiB, seed)
            self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        self.assertEqual(farm.farm.splicer.relays, 0)
        await self.assertQuiet(farm)


    async def test_noRelayWithASmallPipe(self) -> None:
        """
        Over the user's pipe quota the kernel hands out pipes of a page or
        two: the ordinary way is cheaper then, and takes the job.
        """
        self.patch(splice, "_F_SETPIPE_SZ", -1)  # the resize is refused
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        consumer = await farm.consumer("stt")
        data = audio(2 * MiB, 3)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        self.assertEqual(farm.farm.splicer.relays, 0)
        await self.assertQuiet(farm)


class CutShortTests(SpliceTestCase):
    """
    A relay ends early: each time the producer's stream stays whole (its
    next job succeeds) and the farm serves the next request.
    """

    async def nextJobSucceeds(self, farm: LiveFarm) -> None:
        consumer = await farm.consumer("stt")
        data = audio(2 * MiB, 99)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))

    async def consumerLeaves(self, leave: str, after: bytes = b"") -> None:
        """
        A consumer sends half its upload (and C{after}), then goes: C{leave}
        is "abort" (a reset) or "close" (FIN).
        """
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        half = await self.rawPeer(farm, type("Half", (HalfUpload,), {"after": after})("stt"))
        job = half.stt("whisper:tiny.en", audio(8 * MiB, 1))
        job.addErrback(lambda _: None)
        await half.assigned
        await until(lambda: farm.farm.splicer.bytes > 0, "the relay moved bytes")
        if leave == "abort":
            half.transport.abortConnection()
        else:
            half.transport.loseConnection()
        await until(lambda: not farm.farm.jobs, "the job ended")
        await self.nextJobSucceeds(farm)
        await self.assertQuiet(farm)

    async def test_consumerVanishesMidUpload(self) -> None:
        await self.consumerLeaves("abort")

    async def test_consumerClosesMidUpload(self) -> None:
        await self.consumerLeaves("close")

    async def test_consumerClosesMidFrame(self) -> None:
        # A header for a MiB, a thousand of its bytes, the end.
        await self.consumerLeaves("close", encodeHeader(b"DATA", MiB) + b"c" * 1000)

    async def test_consumerStallsPastTimeout(self) -> None:
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        half = await self.rawPeer(farm, HalfUpload("stt"))
        job = half.stt("whisper:tiny.en", audio(8 * MiB, 1), timeout_s=1.0)
        await half.assigned
        failure = await self.assertFailure(job, JobFailed)
        self.assertEqual(failure.code, ErrorCode.TIMEOUT)
        # The stalled consumer still owes half its upload; the producer,
        # cancelled, is free all the same.
        await self.nextJobSucceeds(farm)

    async def test_producerVanishesMidUpload(self) -> None:
        farm = await startFarm(self, "splice")

        class Vanishing(DigestHandler):
            def start(inner, job: dict[str, Any]) -> Any:
                run = super().start(job)
                feed = run.feed

                def feedThenVanish(chunk: bytes) -> None:
                    feed(chunk)
                    doomed.transport.abortConnection()

                run.feed = feedThenVanish
                return run

        doomed = await farm.producer("stt", Vanishing())
        consumer = await farm.consumer("stt")
        failure = await self.assertFailure(
            consumer.stt("whisper:tiny.en", audio(8 * MiB, 3)), JobFailed
        )
        self.assertEqual(failure.code, ErrorCode.PRODUCER_LOST)
        await farm.producer("stt", DigestHandler())
        # The same consumer connection, after the rest of its upload was
        # discarded, takes its next job.
        data = audio(3 * MiB, 4)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        await self.assertQuiet(farm)

    async def test_producerAnswersBeforeUploadEnds(self) -> None:
        farm = await startFarm(self, "splice")
        producer = EarlyAnswer("stt", "producer-key", DigestHandler())
        await self.rawPeer(farm, producer)
        consumer = await farm.consumer("stt")
        for seed in range(3):
            result = await consumer.stt("whisper:tiny.en", audio(6 * MiB, seed))
            self.assertEqual(result.text, "early")
        await self.assertQuiet(farm)

    async def consumerBreaksTheProtocol(self, after: bytes, size: int = 2 * MiB) -> None:
        """
        A consumer sends half its upload, then C{after}: it is closed with a
        protocol error, as on the ordinary path, and the farm serves on.
        """
        farm = await startFarm(self, "splice")
        await farm.producer("stt", DigestHandler())
        rude = await self.rawPeer(farm, type("Rude", (HalfUpload,), {"after": after})("stt"))
        failure = await self.assertFailure(rude.stt("whisper:tiny.en", audio(size, 5)), JobFailed)
        self.assertEqual(failure.code, ErrorCode.PROTOCOL)
        await self.nextJobSucceeds(farm)

    async def test_frameBeyondTheUpload(self) -> None:
        # Half of 4 MiB - 2 sent, so a MiB - 1 still owed: a full MiB and
        # another are too much.
        frame = encodeHeader(b"DATA", MiB) + b"x" * MiB
        await self.consumerBreaksTheProtocol(frame * 2, 4 * MiB - 2)

    async def test_garbageHeaderMidUpload(self) -> None:
        await self.consumerBreaksTheProtocol(b"NOPE00000010" + b"z" * 10)

    async def test_jobFrameMidUpload(self) -> None:
        job = controlFrame(b"JOB_", {"model": "x", "size": 1})
        await self.consumerBreaksTheProtocol(job)


class BackpressureTests(SpliceTestCase):
    async def test_stalledProducer(self) -> None:
        """
        A producer that stops reading: the relay waits for it, holding at
        most a pipe's worth; the consumer is not read meanwhile; once the
        producer reads again the job completes.
        """
        farm = await startFarm(self, "splice", max_job_bytes=64 * MiB)
        producer = await farm.producer("stt", DigestHandler())
        producer.transport.pauseProducing()
        consumer = await farm.consumer("stt")
        data = audio(32 * MiB, 8)
        job = consumer.stt("whisper:tiny.en", data)
        [consumerSide] = self.connections(farm, ConsumerSession)
        await until(lambda: consumerSide.relayIn is not None, "a relay started")
        moved: list[int] = []

        def still() -> bool:
            moved.append(farm.farm.splicer.bytes)
            return len(moved) > 20 and moved[-20] == moved[-1]

        await until(still, "the relay stalled")
        self.assertLess(farm.farm.splicer.bytes, 16 * MiB)
        self.assertNotIn(consumerSide.transport, reactor.getReaders())
        # Waiting on the producer's socket only, not spinning on the consumer's.
        self.assertEqual(
            [r for r in reactor.getReaders() if isinstance(r, splice._SourceReady)], []
        )
        producer.transport.resumeProducing()
        self.assertEqual((await job).text, transcript(data))
        await self.assertQuiet(farm)

    async def stalledRelay(self, **settings: Any) -> tuple[LiveFarm, ProducerProtocol, Deferred[Any]]:
        """
        A job whose relay is stuck mid-frame: its producer stopped reading.
        """
        farm = await startFarm(self, "splice", max_job_bytes=64 * MiB, **settings)
        producer = await farm.producer("stt", DigestHandler())
        producer.transport.pauseProducing()
        consumer = await farm.consumer("stt")
        job = consumer.stt("whisper:tiny.en", audio(32 * MiB, 9), timeout_s=1.0)
        [producerSide] = self.connections(farm, ProducerSession)
        await until(
            lambda: producerSide.relayOut is not None and producerSide.relayOut._inPipe,
            "the relay stuck with bytes in its pipe",
        )
        return farm, producer, job

    async def test_cancelWaitsForTheFrameInThePipe(self) -> None:
        """
        The job times out while the producer's frame is half sent: the CNCL
        waits behind the pipe, and the producer, reading again, gets a
        whole frame, then the CNCL, and is free for the next job.
        """
        farm, producer, job = await self.stalledRelay()
        [producerSide] = self.connections(farm, ProducerSession)
        failure = await self.assertFailure(job, JobFailed)
        self.assertEqual(failure.code, ErrorCode.TIMEOUT)
        self.assertTrue(producerSide.relayOut._later, "CNCL queued behind the pipe")
        # Stopping it again changes nothing: the frame still ends whole.
        relay = producerSide.relayOut
        relay.stop()
        self.assertIs(producerSide.relayOut, relay)
        producer.transport.resumeProducing()
        consumer = await farm.consumer("stt")
        data = audio(2 * MiB, 10)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        await self.assertQuiet(farm)

    async def test_producerVanishesWhileStalled(self) -> None:
        farm, producer, job = await self.stalledRelay()
        producer.transport.abortConnection()
        failure = await self.assertFailure(job, JobFailed)
        self.assertEqual(failure.code, ErrorCode.PRODUCER_LOST)
        await farm.producer("stt", DigestHandler())
        consumer = await farm.consumer("stt")
        data = audio(2 * MiB, 11)
        self.assertEqual((await consumer.stt("whisper:tiny.en", data)).text, transcript(data))
        await self.assertQuiet(farm)

    async def test_producerDroppedWhileConsumerStalls(self) -> None:
        """
        A consumer stops reading a large result; its job times out and the
        producer, unable to finish within the grace, is dropped: its socket
        closes at once, though the relay still has bytes for the consumer.
        """
        farm = await startFarm(self, "splice", cancel_grace=0.5, max_job_bytes=64 * MiB)
        producer = await farm.producer("tts", BigResult(audio(32 * MiB, 13)))
        consumer = await farm.consumer("tts")
        consumer.transport.pauseProducing()
        job = consumer.tts("tone:x", "big", timeout_s=1.0)
        await producer.disconnected
        [consumerSide] = self.connections(farm, ConsumerSession)
        self.assertIsNotNone(consumerSide.relayOut)
        consumer.transport.resumeProducing()
        failure = await self.assertFailure(job, JobFailed)
        self.assertEqual(failure.code, ErrorCode.TIMEOUT)
        await self.assertQuiet(farm)

    async def test_producerClosedWhileStalled(self) -> None:
        """
        The farm closes a producer (a protocol error) while a frame is half
        sent to it: its FAIL and the close wait for the frame to end.
        """
        farm, producer, job = await self.stalledRelay()
        [producerSide] = self.connections(farm, ProducerSession)
        producer.transport.write(b"NOPE00000000")
        failure = await self.assertFailure(job, JobFailed)
        self.assertEqual(failure.code, ErrorCode.PRODUCER_LOST)
        self.assertIn(None, producerSide.relayOut._later)
        self.assertIn(producerSide, farm.farm.connections)
        producer.transport.resumeProducing()
        await producer.disconnected
        await until(lambda: producerSide not in farm.farm.connections, "the farm let go")


class SpliceableTests(SynchronousTestCase):
    def connection(self, cls: type = tcp.Connection) -> tcp.Connection:
        # What a connected transport has of the attributes spliceable() reads.
        connection = cls.__new__(cls)
        connection._tempDataLen = 0
        return connection

    def test_tcpTransport(self) -> None:
        self.assertTrue(spliceable(self.connection()))

    def test_memoryTransport(self) -> None:
        self.assertFalse(spliceable(StringTransport()))

    def test_tlsTransport(self) -> None:
        class TLSConnection(tcp.Connection):
            TLS = True

        self.assertFalse(spliceable(self.connection(TLSConnection)))

    def test_writeBufferUnknown(self) -> None:
        """
        A transport whose write buffer can't be read is not spliced.
        """
        connection = self.connection()
        del connection._tempDataLen
        self.assertFalse(spliceable(connection))
