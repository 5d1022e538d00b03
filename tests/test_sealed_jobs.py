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
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.consumer import JobFailed, SealRefused, connectConsumer
from privox.engines.digest import ToneEngine, digestOf, toneFor
from privox.identity import Certificate, ConnectionOffer, publicBytes
from privox.node.echo import DigestHandler
from privox.node.pool import EnginePool
from privox.sealing import OFF, PREFERRED, REQUIRED, SealPolicy
from tests.loopbackfarm import LoopbackFarm
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
