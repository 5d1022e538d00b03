"""
The farm over real loopback sockets: many consumers and many producers at
once, each consumer checking it got the answer to its own request; and
backpressure holding when a producer stops reading.
"""

from __future__ import annotations

import hashlib
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from privox.consumer import JobFailed, connectConsumer
from privox.farm.sessions import ConsumerSession, ProducerSession
from privox.engines.digest import digestOf, toneFor
from privox.node.echo import DigestHandler
from privox.node.worker import Answer, Collected
from tests.loopbackfarm import LoopbackFarm
from tests.support import until


class ManyPeersTests(TestCase):
    timeout = 60

    async def test_manyConsumersManyProducers(self) -> None:
        farm = LoopbackFarm()
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        for _ in range(8):
            await farm.producer("stt", DigestHandler(("whisper:tiny.en",), ("en",)))
            await farm.producer("tts", DigestHandler(("piper:en_US-joe-medium",), ("en",)))
        rng = random.Random(1776)

        async def sttConsumer(n: int) -> int:
            consumer = await connectConsumer(reactor, farm.endpoint("stt"), "stt", f"c{n}")
            checked = 0
            for _ in range(6):
                audio = rng.randbytes(rng.randrange(1, 300_000))
                result = await consumer.stt("whisper:tiny.en", audio, language="en")
                self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
                checked += 1
            consumer.transport.loseConnection()
            return checked

        async def ttsConsumer(n: int) -> int:
            consumer = await connectConsumer(reactor, farm.endpoint("tts"), "tts", f"t{n}")
            checked = 0
            for i in range(6):
                text = f"consumer {n} sentence {i}"
                result = await consumer.tts("piper:en_US-joe-medium", text, language="en")
                self.assertEqual(result.data, toneFor(text))
                self.assertEqual(result.fields["text_sha256"], digestOf(text.encode()))
                checked += 1
            consumer.transport.loseConnection()
            return checked

        runs = [Deferred.fromCoroutine(sttConsumer(n)) for n in range(12)]
        runs += [Deferred.fromCoroutine(ttsConsumer(n)) for n in range(12)]
        results = await DeferredList(runs, fireOnOneErrback=True, consumeErrors=True)
        self.assertEqual(sum(count for _, count in results), 24 * 6)
        self.assertEqual(farm.farm.counters.succeeded, 24 * 6)

    async def test_unsupportedThenGood(self) -> None:
        farm = LoopbackFarm()
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        await farm.producer("stt", DigestHandler(("whisper:tiny.en",), ("en",)))
        consumer = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        with self.assertRaises(JobFailed) as caught:
            await consumer.stt("vosk:ko", b"audio", language="ko")
        self.assertEqual(caught.exception.code, "no_producer")
        # The same connection still works.
        result = await consumer.stt("whisper:tiny.en", b"audio")
        self.assertEqual(result.text, f"sha256:{digestOf(b'audio')} bytes:5")
        consumer.transport.loseConnection()


class StalledEngine:
    """
    A producer whose engine answers only when told to.
    """

    models = ("*",)
    languages = ()

    def __init__(self) -> None:
        self.release: Deferred[None] = Deferred()

    def start(self, job):
        return Collected(
            lambda data: self.release.addCallback(
                lambda _: Answer({"text": hashlib.sha256(data).hexdigest()})
            )
        )


class BackpressureTests(TestCase):
    timeout = 60

    async def test_stalledProducerPausesConsumer(self) -> None:
        farm = LoopbackFarm(max_job_bytes=64 * 1024 * 1024, splice_min=0)
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        engine = StalledEngine()
        producer = await farm.producer("stt", engine)
        # The producer stops reading its socket, like a node stuck in swap.
        producer.transport.pauseProducing()
        consumer = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        audio = random.Random(3).randbytes(32 * 1024 * 1024)
        result = Deferred.fromCoroutine(self._submit(consumer, audio))

        [farmSide] = [c for c in farm.farm.connections if isinstance(c.session, ConsumerSession)]
        # The farm stops reading the consumer instead of buffering 32 MiB.
        await until(
            lambda: farmSide.transport not in reactor.getReaders(), "the farm paused the consumer", 5
        )
        [producerSide] = [c for c in farm.farm.connections if isinstance(c.session, ProducerSession)]
        buffered = len(producerSide.transport.dataBuffer) + producerSide.transport._tempDataLen
        self.assertLess(buffered, 4 * 1024 * 1024)

        producer.transport.resumeProducing()
        engine.release.callback(None)
        self.assertEqual((await result).text, hashlib.sha256(audio).hexdigest())

    async def _submit(self, consumer, audio):
        return await consumer.stt("whisper:tiny.en", audio)
