"""
The producer node: options, and the daemon's service against real farms on
loopback sockets (serving, failover and failback, a farm restart, PING while
an engine is busy, graceful stop).
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.consumer import connectConsumer
from privox.engines.base import ModelNotFound, STTJob, Transcript
from privox.engines.registry import ModelSpec, createEngine
from privox.framing import FrameDecoder, encodeFrame
from privox.messages import controlFrame
from privox.engines.digest import digestOf, toneFor
from privox.node.pool import EngineHandler
from privox.node.service import NodeService, NodeSettings, Options, Slot
from tests.loopbackfarm import LoopbackFarm
from tests.support import until


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_commandLine(self) -> None:
        options = self.parse(
            "--stt-farm", "tcp:host=a:port=1776", "--stt-farm", "tcp:host=b:port=1776",
            "--tts-farm", "tcp:host=a:port=1777", "--key", "K",
            "--stt", "whisper:tiny.en", "--stt", "vosk:ko=/models/ko",
            "--tts", "piper:en_US-joe-medium", "--slots", "3",
        )
        s = options.settings
        self.assertEqual(s.stt_farm, ("tcp:host=a:port=1776", "tcp:host=b:port=1776"))
        self.assertEqual((s.key, s.slots), ("K", 3))
        self.assertEqual(
            options.specs,
            [ModelSpec("whisper", "tiny.en"), ModelSpec("vosk", "ko", "/models/ko"),
             ModelSpec("piper", "en_US-joe-medium")],
        )

    def test_configFile(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(
            b'stt-farm = ["tcp:host=a:port=1776"]\nstt = ["whisper:tiny.en"]\nslots = 2\n'
        )
        options = self.parse("--config", path.path)
        self.assertEqual((options.settings.slots, options.specs), (2, [ModelSpec("whisper", "tiny.en")]))

    def test_exampleConfig(self) -> None:
        path = FilePath(__file__).parent().parent().child("etc").child("privox-node.toml")
        options = self.parse("--config", path.path)
        self.assertTrue(options.specs)

    def test_errors(self) -> None:
        cases = [
            ([], "no engines"),
            (["--stt", "whisper:tiny.en"], "--stt-farm"),
            (["--tts", "piper:x"], "--tts-farm"),
            (["--stt-farm", "tcp:a:1", "--stt", "piper:x"], "is a tts engine"),
            (["--stt-farm", "tcp:a:1", "--stt", "nope:x"], "unknown engine"),
            (["--stt-farm", "tcp:a:1", "--stt", "whisper"], "ENGINE:MODEL"),
            (["--stt-farm", "tcp:a:1", "--stt", "digest:x", "--slots", "0"], "--slots"),
        ]
        for argv, fragment in cases:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(fragment, str(e))



def producers(farm: LoopbackFarm, service: str) -> int:
    return sum(n for n, _ in farm.farm.dispatchers[service].producersByModel().values())


def nodeSettings(**overrides: Any) -> NodeSettings:
    values = dict(stt=("digest:test",), tts=("tone:test",), slots=2, retry_max=0.5, shutdown_grace=5.0)
    values.update(overrides)
    return NodeSettings(**values)


def startNode(test: TestCase, settings: NodeSettings, engines: list[Any] | None = None) -> NodeService:
    if engines is None:
        engines = [createEngine(ModelSpec.parse(s)) for s in settings.stt + settings.tts]
    node = NodeService(settings, engines, reactor, stopOnFailure=False)
    node.startService()
    test.addCleanup(lambda: node.stopService() if node.running else None)
    test.addCleanup(node._threadpool.stop)
    return node


class RefusalBackoffTests(SynchronousTestCase):
    """
    A farm that refuses a slot's handshake (DENY, a bad certificate) ends
    the connection at once: the slot's next try waits longer for each
    refusal in a row (ClientService alone would count a connection made,
    and retry at its first delay forever), and one let in starts over.
    """

    def handshake(self, reactor: MemoryReactorClock, answer: bytes) -> Any:
        """
        Accept the slot's pending connection as a farm that answers
        C{answer} to its HELO; returns the slot's protocol.
        """
        factory = reactor.tcpClients.pop()[2]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"who" + answer)
        return protocol

    def nextDelay(self, reactor: MemoryReactorClock) -> float:
        [call] = reactor.getDelayedCalls()
        delay = call.getTime() - reactor.seconds()
        reactor.advance(delay)
        return delay

    def test_backoff(self) -> None:
        reactor = MemoryReactorClock()
        settings = nodeSettings(stt_farm=("tcp:host=127.0.0.1:port=9",), retry_max=8.0)
        slot = Slot("stt", settings.stt_farm, EngineHandler(None, {}), settings, reactor)  # type: ignore[arg-type]
        slot.client.startService()
        deny = controlFrame(b"DENY", {"error": "unauthorized", "message": "unknown key"})
        delays = []
        for _ in range(5):
            protocol = self.handshake(reactor, deny)
            protocol.connectionLost(Failure(ConnectionDone()))
            delays.append(self.nextDelay(reactor))
        # backoffPolicy's 0.5 s * 1.5 ** refusals (and up to 1 s of jitter).
        self.assertGreaterEqual(delays[-1], 0.5 * 1.5**5)
        okay = controlFrame(b"OKAY", {"protocol": 2, "farm": "f", "ping_interval": 10.0,
                                     "max_frame": 1048576, "max_job_bytes": 1000, "early_upload": 0})
        joined = slot.joined()
        protocol = self.handshake(reactor, okay)
        self.assertIsNone(self.successResultOf(joined))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertLessEqual(self.nextDelay(reactor), 0.5 * 1.5 + 1.0)
        slot.client.stopService()


class NodeServiceTests(TestCase):
    timeout = 60

    async def test_servesThroughFarm(self) -> None:
        farm = LoopbackFarm()
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        node = startNode(self, nodeSettings(stt_farm=(farm.endpoint("stt"),), tts_farm=(farm.endpoint("tts"),)))
        await node.ready
        await until(lambda: producers(farm, "stt") == 2 and producers(farm, "tts") == 2, "slots")
        self.assertEqual(
            farm.farm.dispatchers["stt"].producersByModel(), {"digest:test": (2, 2)}
        )
        stt = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        audio = b"\x01\x02" * 40_000
        result = await stt.stt("digest:test", audio)
        self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        tts = await connectConsumer(reactor, farm.endpoint("tts"), "tts")
        spoken = await tts.tts("tone:test", "hello there")
        self.assertEqual(spoken.data, toneFor("hello there"))
        self.assertEqual(spoken.fields["content_type"], "audio/wav")
        # Seconds of audio synthesized, for the farm's ledger (STT carries
        # the seconds transcribed).
        self.assertEqual(spoken.fields["duration_s"], 0.1)
        self.assertEqual(result.fields["duration_s"], len(audio) / 32000)
        failed = await tts.tts("tone:test", " ").addErrback(lambda f: f.value)
        self.assertEqual(failed.code, "bad_request")
        for c in (stt, tts):
            c.transport.loseConnection()
        await node.stopService()
        await until(lambda: producers(farm, "stt") == 0 and producers(farm, "tts") == 0, "node gone")

    async def test_survivesFarmRestart(self) -> None:
        farm = LoopbackFarm()
        await farm.listen()
        ports = {s: p.getHost().port for s, p in farm.ports.items()}
        node = startNode(self, nodeSettings(stt_farm=(farm.endpoint("stt"),), tts=(), slots=1))
        await until(lambda: producers(farm, "stt") == 1, "first connection")
        await farm.stop()
        again = LoopbackFarm()
        await again.listen(ports)
        self.addCleanup(lambda: Deferred.fromCoroutine(again.stop()))
        await until(lambda: producers(again, "stt") == 1, "reconnection after the farm restarted")
        consumer = await connectConsumer(reactor, again.endpoint("stt"), "stt")
        result = await consumer.stt("digest:test", b"after restart")
        self.assertEqual(result.text, f"sha256:{digestOf(b'after restart')} bytes:13")
        consumer.transport.loseConnection()
        await node.stopService()

    async def test_failoverAndFailback(self) -> None:
        preferred = LoopbackFarm()
        await preferred.listen()
        preferredPorts = {s: p.getHost().port for s, p in preferred.ports.items()}
        preferredEndpoint = preferred.endpoint("stt")
        await preferred.stop()  # the preferred farm is down at first
        fallback = LoopbackFarm()
        await fallback.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(fallback.stop()))
        node = startNode(self, nodeSettings(
            stt_farm=(preferredEndpoint, fallback.endpoint("stt")), tts=(), slots=1, failback_after=0.5,
        ))
        await until(lambda: producers(fallback, "stt") == 1, "the fallback farm")
        # The preferred farm comes back; the idle slot returns to it.
        preferred = LoopbackFarm()
        await preferred.listen(preferredPorts)
        self.addCleanup(lambda: Deferred.fromCoroutine(preferred.stop()))
        await until(lambda: producers(preferred, "stt") == 1, "failback to the preferred farm")
        self.assertEqual(producers(fallback, "stt"), 0)
        await node.stopService()

    async def test_missingModelFailsStart(self) -> None:
        node = startNode(self, nodeSettings(stt=("whisper:ghost=/nonexistent/model",), tts=(), stt_farm=("tcp:host=127.0.0.1:port=9",)))
        error = await node.ready.addErrback(lambda f: f.value)
        self.assertIsInstance(error, ModelNotFound)
        self.assertIn("nonexistent", str(error))
        # Said by whoever runs the node (twistd's: StartFailureTests).
        self.assertEqual(self.flushLoggedErrors(ModelNotFound), [])


class BlockingEngine:
    """
    An STT engine whose transcription waits, in its worker thread, until the
    test releases it.
    """

    name = "blocking:test"
    languages: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.loads = 0

    def load(self) -> None:
        self.loads += 1

    def transcription(self, job: STTJob) -> Any:
        engine = self

        class Waiting:
            def feed(self, chunk: bytes) -> None:
                engine.started.set()
                engine.release.wait(30)

            def finish(self) -> Transcript:
                return Transcript("done", None, 0.0)

        return Waiting()


class ScriptedFarm(Protocol):
    """
    The farm side of one connection, played by the test.
    """

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.frames: list[Any] = []
        self.connected_: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"who")

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.verb == b"HELO":
                self.transport.write(controlFrame(b"OKAY", {
                    "protocol": 2, "farm": "scripted", "ping_interval": 10.0,
                    "max_frame": 1048576, "max_job_bytes": 1 << 26}))
                self.connected_.callback(None)
            else:
                self.frames.append(frame)


class BusyEngineTests(TestCase):
    timeout = 60

    async def test_pingAnsweredWhileEngineBusy(self) -> None:
        scripted = ScriptedFarm()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: scripted)
        )
        self.addCleanup(port.stopListening)
        engine = BlockingEngine()
        self.addCleanup(engine.release.set)
        node = startNode(
            self,
            nodeSettings(stt=("blocking:test",), tts=(), slots=1,
                         stt_farm=(f"tcp:host=127.0.0.1:port={port.getHost().port}",)),
            engines=[engine],
        )
        await scripted.connected_
        scripted.transport.write(
            controlFrame(b"JOB_", {"id": "j1", "model": "blocking:test", "language": None,
                                   "format": "auto", "size": 4})
            + encodeFrame(b"DATA", b"abcd")
        )
        await until(engine.started.is_set, "the engine to start")
        scripted.transport.write(encodeFrame(b"PING"))
        await until(lambda: any(f.verb == b"PONG" for f in scripted.frames), "PONG while busy")
        self.assertFalse(any(f.verb == b"RSLT" for f in scripted.frames))
        # Stopping now waits for the running job, then closes.
        stopping = node.stopService()
        engine.release.set()
        await stopping
        await until(lambda: any(f.verb == b"RSLT" for f in scripted.frames), "the answer")
        [result] = [f for f in scripted.frames if f.verb == b"RSLT"]
        self.assertIn(b'"text":"done"', result.payload)
        self.assertEqual(engine.loads, 1)


class SpeechDurationTests(SynchronousTestCase):
    """
    A TTS answer's RSLT says how many seconds of audio it holds
    (C{duration_s}), which the farm's ledger credits.
    """

    def test_speechFields(self) -> None:
        from privox.node.pool import speechFields
        from privox.wav import pcmToWav

        wav = pcmToWav(b"\x00\x00" * 22050 * 2, 22050)
        self.assertEqual(
            speechFields(wav, "piper:x"),
            {"content_type": "audio/wav", "model": "piper:x", "duration_s": 2.0},
        )
        # Spoken faster or slower than the voice's own pace: it says so.
        self.assertEqual(
            speechFields(wav, "piper:x", 1.5),
            {"content_type": "audio/wav", "model": "piper:x", "speed": 1.5, "duration_s": 2.0},
        )
        # Unreadable: no duration rather than a wrong one.
        self.assertEqual(
            speechFields(b"not a wav", "piper:x"),
            {"content_type": "audio/wav", "model": "piper:x"},
        )

    def test_wavSecondsCountsHeldFrames(self) -> None:
        from privox.wav import pcmToWav, wavSeconds

        wav = pcmToWav(b"\x00\x00" * 16000, 16000)
        self.assertEqual(wavSeconds(wav), 1.0)
        self.assertEqual(wavSeconds(wav[: len(wav) - 16000]), 0.5)
        self.assertIsNone(wavSeconds(b""))


class ProducerWireTests(SynchronousTestCase):
    """
    A producer slot on an in-memory transport: the upload reaches the engine
    in pieces, however TCP cuts it, and the digest covers all of it.
    """

    def test_uploadInAnyPieces(self) -> None:
        from twisted.internet.testing import StringTransport

        from privox.node.echo import DigestHandler
        from privox.node.worker import ProducerProtocol

        audio = bytes(range(256)) * 40
        wire = (controlFrame(b"JOB_", {"id": "j1", "model": "bench:digest", "size": len(audio)})
                + encodeFrame(b"DATA", audio[:7000]) + encodeFrame(b"DATA", b"")
                + encodeFrame(b"DATA", audio[7000:]))
        for step in (len(wire), 4096, 1):
            producer = ProducerProtocol("stt", "pk", DigestHandler())
            transport = StringTransport()
            producer.makeConnection(transport)
            producer.dataReceived(b"who")
            producer.dataReceived(controlFrame(b"OKAY", {
                "protocol": 2, "farm": "f", "ping_interval": 10.0, "max_frame": 8192,
                "max_job_bytes": 1 << 20}))
            transport.clear()
            for start in range(0, len(wire), step):
                producer.dataReceived(wire[start:start + step])
            [frame] = FrameDecoder().feed(transport.value())
            self.assertEqual(frame.verb, b"RSLT", step)
            self.assertIn(f"sha256:{digestOf(audio)} bytes:{len(audio)}".encode(), frame.payload)

    def test_digestWithAnotherHash(self) -> None:
        """
        The digest engine can fingerprint with any hashlib-like hash (the
        relay benchmark uses a fast one); the answer names it.
        """
        import hashlib

        from privox.node.echo import DigestHandler

        run = DigestHandler(newHash=hashlib.md5).start({"id": "j1", "model": "m", "size": 6})
        run.feed(b"abc")
        run.feed(b"def")
        answer = self.successResultOf(run.finish())
        self.assertEqual(
            answer.fields["text"], f"md5:{hashlib.md5(b'abcdef').hexdigest()} bytes:6"
        )
