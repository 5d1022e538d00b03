"""
Sealed jobs (docs/privacy.rst) through a real farm on loopback sockets:
the consumer seals for the node the farm assigns, once the exchange vouches
for it; the farm relays ciphertext; a farm that swaps a node's key, or
tampers with what it relays, is caught, and the API tries another farm.
"""

from __future__ import annotations

import json
import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.trial.unittest import TestCase

from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.consumer import JobFailed, SealRefused, connectConsumer
from privox.engines.digest import ToneEngine, digestOf, toneFor
from privox.identity import Certificate, ConnectionOffer, publicBytes
from privox.node.echo import DigestHandler
from privox.node.pool import EnginePool
from privox.sealing import OFF, PREFERRED, REQUIRED, SealPolicy
from tests.loopbackfarm import LoopbackFarm, StallingUpload
from tests.support import until

STT = "whisper:tiny.en"
TTS = "piper:en_US-joe-medium"


class Exchange:
    """
    An exchange's signing key, and nodes it vouches for.
    """

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key()

    def policy(self, mode: str = REQUIRED) -> SealPolicy:
        return SealPolicy(mode, self.public)

    def node(self) -> NodeSealer:
        identity = Ed25519PrivateKey.generate()
        certificate = Certificate.issue(
            self.key, publicBytes(identity.public_key()), "node-account", reactor.seconds()
        )
        return NodeSealer(identity, certificate)


class NodeSealer:
    def __init__(self, identity: Ed25519PrivateKey, certificate: Certificate) -> None:
        self.identity = identity
        self.certificate = certificate

    def offer(self) -> tuple[X25519PrivateKey, ConnectionOffer]:
        return ConnectionOffer.make(self.identity, self.certificate)


class RecordingHandler(DigestHandler):
    """
    DigestHandler, remembering the JOB_ fields each run started with.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.jobs: list[dict] = []

    def start(self, job):
        self.jobs.append(dict(job))
        return super().start(job)


class PacedTone(ToneEngine):
    """
    The tone engine, as if it paced its speech as Piper does (up to 2x).
    """

    def __init__(self) -> None:
        super().__init__("paced")
        self.speeds: list[float] = []

    def synthesize(self, job):
        self.speeds.append(job.speed)
        return super().synthesize(job)

    def pacedSpeed(self, speed: float) -> float:
        return min(speed, 2.0)


class OnLoopback:
    """
    A farm on loopback ports and consumers of it, gone with the test.
    """

    timeout = 30

    async def farm(self) -> LoopbackFarm:
        farm = LoopbackFarm(queue_timeout=2)
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        return farm

    async def consumer(self, farm: LoopbackFarm, service: str):
        consumer = await connectConsumer(reactor, farm.endpoint(service), service, "ck")
        self.addCleanup(consumer.transport.loseConnection)
        return consumer


class SealedJobTests(OnLoopback, TestCase):

    async def test_sealedStt(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        handler = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", handler, exchange.node())
        consumer = await self.consumer(farm, "stt")
        audio = random.Random(1).randbytes(300_000)
        result = await consumer.stt(STT, audio, language="en", seal=exchange.policy())
        self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        # The node's run saw the audio's own size, not the sealed upload's.
        self.assertEqual(handler.jobs[0]["size"], len(audio))
        self.assertIn("seal", handler.jobs[0])

    async def test_promptSealed(self) -> None:
        """
        An STT job's prompt is content: it travels sealed, not in JOB_.
        """
        exchange = Exchange()
        farm = await self.farm()
        handler = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", handler, exchange.node())
        seen: list[dict] = []
        submit = farm.farm.submit
        farm.farm.submit = lambda consumer, request: (seen.append(request.payload("x")), submit(consumer, request))[1]
        consumer = await self.consumer(farm, "stt")
        await consumer.stt(STT, b"audio", language="en", seal=exchange.policy(),
                           prompt="Kubernetes, Twisted", temperature=0.2)
        self.assertNotIn("prompt", seen[0])
        self.assertEqual(seen[0]["temperature"], 0.2)
        self.assertEqual((handler.jobs[0]["prompt"], handler.jobs[0]["temperature"]),
                         ("Kubernetes, Twisted", 0.2))

    async def test_sealedTts(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        handler = RecordingHandler((TTS,), ("en",))
        await farm.producer("tts", handler, exchange.node())
        consumer = await self.consumer(farm, "tts")
        text = "Sealed & delivered: Grüße."
        result = await consumer.tts(TTS, text, language="en", seal=exchange.policy())
        self.assertEqual(result.data, toneFor(text))
        self.assertEqual(handler.jobs[0]["text"], text)

    async def test_sealedSpeed(self) -> None:
        """
        A speech's speed goes to the node in the clear, and the speed it
        spoke at comes back inside the seal; a speed the farm adds beside a
        sealed answer is not taken.
        """
        exchange = Exchange()
        farm = await self.farm()
        engine = PacedTone()
        pool = EnginePool([engine], reactor, reactor.getThreadPool())
        await farm.producer("tts", pool.handler("tts"), exchange.node())
        consumer = await self.consumer(farm, "tts")
        result = await consumer.tts(engine.name, "Hi there.", speed=2.0, seal=exchange.policy())
        self.assertEqual((result.fields["speed"], engine.speeds), (2.0, [2.0]))
        self.assertEqual(result.data, toneFor("Hi there."))

        [session] = [
            c.session for c in farm.farm.connections
            if c.session is not None and c._role == "consumer"
        ]
        honest = session.sendResult

        def addSpeed(fields: dict, raw: bytes) -> None:
            honest(dict(fields, speed=4.0), b"")

        session.sendResult = addSpeed
        result = await consumer.tts(engine.name, "Hi there.", speed=4.0, seal=exchange.policy())
        self.assertEqual(result.fields["speed"], 2.0)  # what the node sealed
        plain = ToneEngine("x")
        await farm.producer("tts", EnginePool([plain], reactor, reactor.getThreadPool()).handler("tts"),
                            exchange.node())
        result = await consumer.tts(plain.name, "Hi there.", speed=4.0, seal=exchange.policy())
        self.assertNotIn("speed", result.fields)

    async def test_requiredNeedsANodeThatSeals(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,), ("en",)))
        consumer = await self.consumer(farm, "stt")
        with self.assertRaises(JobFailed) as caught:
            await consumer.stt(STT, b"abc", language="en", seal=exchange.policy())
        self.assertEqual(caught.exception.code, "no_producer")
        # In the clear (e2e off) the same node serves it.
        result = await consumer.stt(STT, b"abc", language="en", seal=exchange.policy(OFF))
        self.assertEqual(result.text, f"sha256:{digestOf(b'abc')} bytes:3")

    async def test_nodeOfAnotherExchange(self) -> None:
        """
        A node certified by another exchange (a farm's own, say) gets
        nothing: the consumer refuses it and closes.
        """
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,), ("en",)), Exchange().node())
        consumer = await self.consumer(farm, "stt")
        with self.assertRaises(SealRefused):
            await consumer.stt(STT, b"secret audio", language="en", seal=Exchange().policy())

    async def keySwappingFarm(self, exchange: Exchange) -> LoopbackFarm:
        """
        A farm whose operator puts its own connection key in its node's
        offer (with the node's genuine certificate), to read the content.
        """
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,), ("en",)), exchange.node())
        await until(lambda: farm.farm.dispatchers["stt"].producerCount() == 1, "the node", 5)
        [session] = [c.session for c in farm.farm.connections if c.session is not None]
        offer = json.loads(session.sealOffer)
        _, own = ConnectionOffer.make(Ed25519PrivateKey.generate(), exchange.node().certificate)
        offer["key"] = own.fields()["key"]
        session.sealOffer = json.dumps(offer).encode()
        return farm

    async def test_keySwappingFarmIsCaught(self) -> None:
        exchange = Exchange()
        farm = await self.keySwappingFarm(exchange)
        consumer = await self.consumer(farm, "stt")
        with self.assertRaises(SealRefused):
            await consumer.stt(STT, b"secret audio", language="en", seal=exchange.policy())

    async def test_apiTriesAnotherFarm(self) -> None:
        """
        Through the API's exchange: the key-swapping farm is marked down,
        the job goes to an honest one.
        """
        exchange = Exchange()
        bad = await self.keySwappingFarm(exchange)
        good = await self.farm()
        await good.producer("stt", DigestHandler((STT,), ("en",)), exchange.node())
        farms = [
            FarmEntry("bad", bad.endpoint("stt"), None, weight=1000.0),
            FarmEntry("good", good.endpoint("stt"), None, weight=0.001),
        ]
        api = FarmExchange(farms, reactor, rng=random.Random(7), seal=exchange.policy())
        self.addCleanup(api.stop)
        result = await api.transcribe(STT, "en", b"secret audio", "auto")
        self.assertEqual(result.text, f"sha256:{digestOf(b'secret audio')} bytes:12")
        [badState] = [f for f in api.farms if f.entry.name == "bad"]
        self.assertFalse(badState.health.isUp())

    async def test_preferredFallsBackToTheClear(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        await farm.producer("stt", DigestHandler((STT,), ("en",)))
        api = FarmExchange(
            [FarmEntry("old", farm.endpoint("stt"), None)], reactor, seal=exchange.policy(PREFERRED)
        )
        self.addCleanup(api.stop)
        result = await api.transcribe(STT, "en", b"abc", "auto")
        self.assertEqual(result.text, f"sha256:{digestOf(b'abc')} bytes:3")

    async def test_tamperedUploadIsCaught(self) -> None:
        """
        A farm that flips a bit of the sealed upload it relays: the node
        finds the seal broken and fails the job; nothing wrong is answered.
        """
        exchange = Exchange()
        farm = await self.farm()
        handler = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", handler, exchange.node())
        await until(lambda: farm.farm.dispatchers["stt"].producerCount() == 1, "the node", 5)
        [session] = [c.session for c in farm.farm.connections if c.session is not None]
        relay = session.sendData

        def flip(payload: bytes) -> None:
            relay(payload[:-1] + bytes([payload[-1] ^ 1]))

        session.sendData = flip
        consumer = await self.consumer(farm, "stt")
        with self.assertRaises(JobFailed) as caught:
            await consumer.stt(STT, b"secret audio", language="en", seal=exchange.policy())
        self.assertEqual(caught.exception.code, "seal_broken")
        self.assertEqual(handler.jobs, [])  # no engine ever saw it


class EarlySealTests(OnLoopback, TestCase):
    """
    A connection's next small sealed job goes with its upload sealed for the
    node that answered the last one (docs/protocol.rst §5.7): no round trip
    to learn the node, when that node is free; when it is not, the upload is
    sealed again for the node the farm assigns.
    """

    def recordSubmits(self, farm: LoopbackFarm) -> list:
        seen: list = []
        submit = farm.farm.submit
        farm.farm.submit = lambda consumer, request: (seen.append(request), submit(consumer, request))[1]
        return seen

    async def test_nextJobGoesEarly(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        handler = RecordingHandler((STT,), ("en",))
        node = await farm.producer("stt", handler, exchange.node())
        consumer = await self.consumer(farm, "stt")
        audios = [random.Random(i).randbytes(20_000) for i in range(3)]
        for audio in audios:
            result = await consumer.stt(STT, audio, language="en", seal=exchange.policy())
            self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        key = node._offeredKey
        self.assertEqual([(r.early, r.sealedFor) for r in seen],
                         [(False, None), (True, key), (True, key)])
        self.assertEqual([job["seal"].get("for") for job in handler.jobs], [None, key, key])
        # Too large to go early: sealed after ASGN, as before.
        large = random.Random(4).randbytes(100_000)
        result = await consumer.stt(STT, large, language="en", seal=exchange.policy())
        self.assertEqual(result.text, f"sha256:{digestOf(large)} bytes:{len(large)}")
        self.assertEqual((seen[-1].early, seen[-1].sealedFor), (False, None))

    async def test_ttsTextGoesEarly(self) -> None:
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        handler = RecordingHandler((TTS,), ("en",))
        await farm.producer("tts", handler, exchange.node())
        consumer = await self.consumer(farm, "tts")
        for text in ("First, sealed after ASGN.", "Then sealed with the JOB_: Grüße."):
            result = await consumer.tts(TTS, text, language="en", seal=exchange.policy())
            self.assertEqual(result.data, toneFor(text))
        self.assertEqual([r.early for r in seen], [False, True])
        self.assertEqual([job["text"] for job in handler.jobs],
                         ["First, sealed after ASGN.", "Then sealed with the JOB_: Grüße."])

    async def test_droppedThenTheSameNode(self) -> None:
        """
        The node the upload was sealed for is busy, so the job waits, and
        that node takes it once free: the farm dropped the early upload, so
        the consumer seals it again (ASGN does not say it went early), and
        the job is answered instead of waiting forever.
        """
        exchange = Exchange()
        farm = await self.farm()
        handler = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", handler, exchange.node())
        consumer = await self.consumer(farm, "stt")
        await consumer.stt(STT, b"one", language="en", seal=exchange.policy())
        stalled = StallingUpload("stt")
        await connectProtocol(clientFromString(reactor, farm.endpoint("stt")), stalled)
        await stalled.ready
        stalled.stt(STT, b"x" * 100_000).addErrback(lambda f: None)  # not early
        await stalled.assigned
        job = consumer.stt(STT, b"two", language="en", seal=exchange.policy())
        await until(lambda: farm.farm.dispatchers["stt"].queueDepth() == 1, "the job queued", 5)
        stalled.transport.loseConnection()  # the node is free again
        result = await job
        self.assertEqual(result.text, f"sha256:{digestOf(b'two')} bytes:3")
        self.assertEqual([j["size"] for j in handler.jobs], [3, 100_000, 3])
        self.assertNotIn("for", handler.jobs[-1]["seal"])

    async def test_burst(self) -> None:
        """
        Eight consumers, two nodes, each consumer's jobs back to back: they
        aim their uploads at nodes that are busy, and every job is answered,
        its upload sealed again for the node that takes it; a consumer that
        missed waits for ASGN for a while (MAX_EARLY_PAUSE).
        """
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        handlers = [RecordingHandler((STT,), ("en",)) for _ in range(2)]
        for handler in handlers:
            await farm.producer("stt", handler, exchange.node())
        consumers = [await self.consumer(farm, "stt") for _ in range(8)]

        async def jobs(consumer, seed: int) -> None:
            for n in range(10):
                audio = random.Random(seed * 100 + n).randbytes(4000)
                result = await consumer.stt(STT, audio, language="en", seal=exchange.policy())
                self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:4000")

        await gatherResults([Deferred.fromCoroutine(jobs(c, i)) for i, c in enumerate(consumers)])
        ran = handlers[0].jobs + handlers[1].jobs
        self.assertEqual((len(seen), len(ran)), (80, 80))
        # Few if any took their upload early (while jobs wait, a node that
        # is freed takes the oldest of them), so after each miss the
        # consumers aimed less: not 9 jobs each, as they could have.
        aimed = sum(1 for r in seen if r.early)
        went = sum(1 for job in ran if "for" in job["seal"])
        self.assertLessEqual(went, aimed)
        self.assertLess(aimed, 8 * 9 // 2)
        self.assertGreaterEqual(aimed, 8)

    async def test_copiedOffer(self) -> None:
        """
        A producer that shows another node's offer once that node has gone
        (say, an API that saw it in ASGN) can open nothing: the farm aims
        no early upload at it, and a consumer whose sealed job failed
        there aims no more at that offer.
        """
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        offers = []

        class Recording:
            def offer(self, farm=None):
                offers.append(node.offer())
                return offers[-1]

        class Copying:
            def offer(self, farm=None):
                return X25519PrivateKey.generate(), offers[0][1]

        node = exchange.node()
        real = await farm.producer("stt", DigestHandler((STT,), ("en",)), Recording())
        consumer = await self.consumer(farm, "stt")
        await consumer.stt(STT, b"one", language="en", seal=exchange.policy())
        real.transport.loseConnection()
        await until(lambda: farm.farm.dispatchers["stt"].producerCount() == 0, "the node gone", 5)
        copy = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", copy, Copying())
        self.assertEqual(farm.farm._sealKeys, {})
        for n in ("two", "three"):
            with self.assertRaises(JobFailed) as caught:
                await consumer.stt(STT, n.encode(), language="en", seal=exchange.policy())
            self.assertEqual(caught.exception.code, "seal_broken")
        self.assertEqual([r.early for r in seen], [False, True, False])
        self.assertEqual(copy.jobs, [])  # it opened nothing

    async def test_kindOfJob(self) -> None:
        """
        A node is remembered for jobs of its model, language and task: the
        next job of another kind waits for ASGN.
        """
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        await farm.producer("stt", DigestHandler((STT,), ("en", "de")), exchange.node())
        consumer = await self.consumer(farm, "stt")
        for language in ("en", "de", "de", "en"):
            await consumer.stt(STT, b"audio", language=language, seal=exchange.policy())
        self.assertEqual([r.early for r in seen], [False, False, True, True])

    async def test_busyNodeSealedAgain(self) -> None:
        """
        The node the upload was sealed for is busy: the farm gives the job
        to another, which gets the upload sealed again for it; the one
        sealed for the busy node reaches no node.
        """
        exchange = Exchange()
        farm = await self.farm()
        seen = self.recordSubmits(farm)
        first = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", first, exchange.node())
        consumer = await self.consumer(farm, "stt")
        await consumer.stt(STT, b"one", language="en", seal=exchange.policy())
        second = RecordingHandler((STT,), ("en",))
        await farm.producer("stt", second, exchange.node())
        # The first node, idle longest, takes a job that stalls mid-upload.
        stalled = StallingUpload("stt")
        await connectProtocol(clientFromString(reactor, farm.endpoint("stt")), stalled)
        await stalled.ready
        self.addCleanup(stalled.transport.loseConnection)
        stalled.stt(STT, b"x" * 100_000).addErrback(lambda f: None)  # not early
        await stalled.assigned
        result = await consumer.stt(STT, b"two", language="en", seal=exchange.policy())
        self.assertEqual(result.text, f"sha256:{digestOf(b'two')} bytes:3")
        self.assertTrue(seen[-1].early)
        self.assertEqual([job["size"] for job in second.jobs], [3])
        self.assertNotIn("for", second.jobs[0]["seal"])
        # The first node: the first job and the stalled one, nothing else.
        self.assertEqual([job["size"] for job in first.jobs], [3, 100_000])
        # The next job goes early again: for the node that answered this one.
        result = await consumer.stt(STT, b"three", language="en", seal=exchange.policy())
        self.assertEqual(result.text, f"sha256:{digestOf(b'three')} bytes:5")
        self.assertEqual(second.jobs[-1]["seal"].get("for"), seen[-1].sealedFor)
