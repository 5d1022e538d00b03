"""
End to end: a real C{twistd -n privox-farm} process, with peers that are
separate processes running C{tests/pvx2_reference.py}, a PVX/2 client written
from C{docs/protocol.rst} alone. One test also drives the project's own
consumer against the reference producer, so interop is shown both ways.

Nothing here sleeps: readiness is read from the farm's log, and the only
waits on the clock (the liveness test, and the fallback retry of a consumer)
are L{deferLater}s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import sys
import wave
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from privox.consumer import JobFailed, connectConsumer
from tests.support import sleep
from tests import pvx2_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "tests", "pvx2_reference.py")
CONFIG = os.path.join(REPO, "etc", "privox-farm.toml")
ENV = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
# `python -m twisted` is the `twist` runner, which has no -n/--pidfile/--logfile;
# this runs `twistd` itself with the interpreter of the test run.
TWISTD = "from twisted.scripts.twistd import run; run()"
WAIT_S = 30


def freePorts(count: int) -> list[int]:
    """
    Ports the kernel picks as free on 127.0.0.1 (held together, so distinct).
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def keyId(key: str) -> bytes:
    """
    The hashed key id the farm logs (README: first 12 hex digits of SHA-256).
    """
    return hashlib.sha256(key.encode()).hexdigest()[:12].encode()


def canary(label: str) -> str:
    return f"{label}-{os.urandom(8).hex()}"


class WatchedProcess(ProcessProtocol):
    """
    A child process whose stdout and stderr are collected, with Deferreds for
    a string appearing in that output and for the process's end.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.reason: BaseException | None = None
        self._waiters: list[tuple[bytes, Deferred[None]]] = []
        self._ended: list[Deferred[BaseException]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for waiter in list(self._waiters):
            pattern, d = waiter
            if pattern in self.output:
                self._waiters.remove(waiter)
                d.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason.value
        waiters, self._waiters = self._waiters, []
        for pattern, d in waiters:
            d.errback(AssertionError(self._describe(f"ended before logging {pattern!r}")))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(self.reason)

    def _describe(self, what: str) -> str:
        tail = bytes(self.output[-4000:]).decode("utf-8", "replace")
        return f"{self.name} {what} ({self.reason}); output:\n{tail}"

    def waitFor(self, pattern: bytes, timeout: float = WAIT_S) -> Deferred[None]:
        if pattern in self.output:
            return succeed(None)
        if self.reason is not None:
            return fail(AssertionError(self._describe(f"ended before logging {pattern!r}")))
        d: Deferred[None] = Deferred()
        waiter = (pattern, d)
        self._waiters.append(waiter)

        def timedOut(f: Failure) -> Failure:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if f.check(Exception) and not f.check(AssertionError):
                raise AssertionError(self._describe(f"did not log {pattern!r} in {timeout}s"))
            return f

        d.addTimeout(timeout, reactor)
        d.addErrback(timedOut)
        return d

    def whenEnded(self) -> Deferred[BaseException]:
        if self.reason is not None:
            return succeed(self.reason)
        d: Deferred[BaseException] = Deferred()
        self._ended.append(d)
        return d

    def stop(self) -> Deferred[BaseException]:
        """
        SIGTERM the process if it still runs; fires with how it ended.
        """
        if self.reason is None and self.transport is not None:
            self.transport.signalProcess("TERM")
        return self.whenEnded()


class RawClient(Protocol):
    """
    Bytes in and out, for the one test that needs a consumer to misbehave.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()
        self._waiters: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            if waiter[0] in self.received:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def connectionLost(self, reason: Failure) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"connection lost; received {bytes(self.received)!r}"))
        self._waiters = []
        self.lost.callback(None)

    def waitFor(self, pattern: bytes) -> Deferred[None]:
        if pattern in self.received:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((pattern, d))
        return d.addTimeout(WAIT_S, reactor)

    def send(self, verb: str, payload: bytes = b"") -> None:
        self.transport.write(ref.encode_frame(verb, payload))


class EndToEndTests(TestCase):
    timeout = 120

    # --- processes ---------------------------------------------------------

    async def startFarm(self, *extra: str) -> tuple[WatchedProcess, int, int]:
        sttPort, ttsPort = freePorts(2)
        farm = WatchedProcess("farm")
        args = [
            sys.executable, "-c", TWISTD,
            "-n", "--reactor=privox", "--pidfile=", "--logfile=-",
            "privox-farm", "--config", CONFIG,
            "--stt-listen", f"tcp:{sttPort}:interface=127.0.0.1",
            "--tts-listen", f"tcp:{ttsPort}:interface=127.0.0.1",
            *extra,
        ]
        reactor.spawnProcess(farm, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.stopFarm(farm)))
        await farm.waitFor(b"FarmFactory starting on %d\n" % sttPort)
        await farm.waitFor(b"FarmFactory starting on %d\n" % ttsPort)
        return farm, sttPort, ttsPort

    async def stopFarm(self, farm: WatchedProcess) -> bytes:
        """
        SIGTERM the farm, wait for it, and check that it stopped gracefully.
        Returns its whole log.
        """
        reason = await farm.stop()
        # twistd stops its reactor on SIGTERM, then re-raises the signal so that
        # its exit status says what stopped it: a clean stop ends either way.
        cleanEnd = isinstance(reason, ProcessDone) or (
            isinstance(reason, ProcessTerminated) and reason.signal == signal.SIGTERM
        )
        self.assertTrue(cleanEnd, farm._describe("did not stop cleanly"))
        self.assertIn(b"Main loop terminated.", farm.output)
        self.assertIn(b"Server Shut Down.", farm.output)
        self.assertNotIn(b"Traceback", farm.output, farm._describe("logged a traceback"))
        return bytes(farm.output)

    async def startProducer(
        self, farm: WatchedProcess, port: int, service: str, key: str, *extra: str
    ) -> WatchedProcess:
        """
        Run the reference producer and wait until the farm logs that it joined.
        """
        producer = WatchedProcess(f"reference {service} producer")
        args = [
            sys.executable, REFERENCE, "producer", "127.0.0.1", str(port),
            "--service", service, "--key", key, "--timeout", str(WAIT_S), *extra,
        ]
        reactor.spawnProcess(producer, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(producer.stop)
        try:
            await farm.waitFor(b"producer %s joined %s" % (keyId(key), service.encode()))
        except AssertionError as e:
            raise AssertionError(f"{e}\n{producer._describe('state')}") from None
        return producer

    async def reference(self, *args: str) -> tuple[int, str, str]:
        """
        Run the reference script to completion: (exit code, stdout, stderr).
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [REFERENCE, *args], env=ENV, path=REPO, reactor=reactor
        )
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    async def consumer(self, *args: str, retries: int = 4) -> tuple[int, str, str]:
        """
        The reference consumer. The producer has joined before this runs; as a
        second line of defence a refusal with no_producer is retried.
        """
        delay = 0.05
        for attempt in range(retries + 1):
            code, out, err = await self.reference(*args, "--timeout", str(WAIT_S))
            if code == 1 and "no_producer" in err and attempt < retries:
                await sleep(delay)
                delay *= 2
                continue
            return code, out, err
        raise AssertionError("unreachable")

    async def producerDone(self, producer: WatchedProcess, jobs: int) -> str:
        reason = await producer.whenEnded()
        self.assertIsInstance(reason, ProcessDone, producer._describe("failed"))
        log = producer.output.decode()
        self.assertIn(f"done jobs={jobs}", log)
        # 6.1: the producer never sees the consumer's key
        for line in log.splitlines():
            if line.startswith("job "):
                fields = line.split(" fields=")[1].split()[0].split(",")
                self.assertNotIn("key", fields, line)
        return log

    def assertPrivate(self, farmLog: bytes, *secrets: str | bytes) -> None:
        for secret in secrets:
            raw = secret.encode() if isinstance(secret, str) else secret
            self.assertNotIn(raw, farmLog, f"the farm's log holds {secret!r}")

    # --- tests -------------------------------------------------------------

    async def test_sttReferenceConsumerAndProducer(self) -> None:
        """
        Two STT jobs, one of them larger than max_frame (several DATA frames),
        come back as the SHA-256 the reference producer computes; the farm's
        log holds hashed key ids but no key, audio or transcript.
        """
        farm, sttPort, _ = await self.startFarm()
        consumerKey, producerKey = canary("consumer-secret"), canary("producer-secret")
        producer = await self.startProducer(farm, sttPort, "stt", producerKey, "--jobs", "2")

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        small = canary("AUDIO-CANARY").encode() + bytes(range(256))
        large = canary("AUDIO-CANARY-LARGE").encode() + os.urandom(1_500_000)
        transcripts = []
        for name, audio in (("small.raw", small), ("large.raw", large)):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(audio)
            code, out, err = await self.consumer(
                "consumer-stt", "127.0.0.1", str(sttPort), path,
                "--model", "whisper-small", "--language", "en",
                "--format", "pcm_s16le", "--key", consumerKey,
            )
            self.assertEqual(code, 0, err)
            fields = json.loads(out)
            expected = "sha256:" + hashlib.sha256(audio).hexdigest()
            self.assertEqual(fields["text"], expected)
            self.assertIsInstance(fields["id"], str)
            transcripts.append(expected)

        await self.producerDone(producer, 2)
        farmLog = await self.stopFarm(farm)
        self.assertIn(b"consumer %s joined stt" % keyId(consumerKey), farmLog)
        self.assertPrivate(
            farmLog, consumerKey, producerKey, small[:40], large[:40], *transcripts,
            *(t.split(":")[1] for t in transcripts),
        )

    async def test_ttsReferenceConsumerAndProducer(self) -> None:
        """
        A TTS job whose WAV (larger than max_frame) is exactly the one the
        reference producer derives for the text, and a valid WAV.
        """
        farm, _, ttsPort = await self.startFarm()
        consumerKey, producerKey = canary("consumer-secret"), canary("producer-secret")
        samples = 600_000  # 1.2 MB: more than one DATA frame at the default max_frame
        producer = await self.startProducer(
            farm, ttsPort, "tts", producerKey, "--jobs", "1", "--wav-samples", str(samples)
        )
        text = canary("Privacy canary sentence") + ": good morning, Grüße!"
        output = os.path.abspath(self.mktemp()) + ".wav"
        code, out, err = await self.consumer(
            "consumer-tts", "127.0.0.1", str(ttsPort), text,
            "--model", "piper-en", "--voice", "amy", "--language", "en",
            "--key", consumerKey, "-o", output, "--verify",
        )
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertEqual(report["content_type"], "audio/wav")
        self.assertTrue(report["verified"])
        with open(output, "rb") as f:
            wav = f.read()
        self.assertEqual(report["size"], len(wav))
        self.assertEqual(wav, ref.reference_wav(text, samples))
        with wave.open(io.BytesIO(wav), "rb") as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth()), (1, 2))
            self.assertEqual(w.getnframes(), samples)

        await self.producerDone(producer, 1)
        farmLog = await self.stopFarm(farm)
        self.assertIn(b"consumer %s joined tts" % keyId(consumerKey), farmLog)
        self.assertPrivate(farmLog, consumerKey, producerKey, text, "Privacy canary", wav[44:84])

    async def test_wrongServiceDenied(self) -> None:
        """
        A HELO for TTS on the STT port (consumer or producer) gets DENY
        bad_request, and the farm keeps serving.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        consumerKey = canary("consumer-secret")
        code, out, err = await self.reference(
            "consumer-tts", "127.0.0.1", str(sttPort), "hello",
            "--model", "piper-en", "--key", consumerKey,
        )
        self.assertEqual(code, 3, err)
        self.assertIn("DENY bad_request", err)
        self.assertEqual(out, "")

        code, out, err = await self.reference(
            "producer", "127.0.0.1", str(ttsPort), "--service", "stt", "--jobs", "1",
        )
        self.assertEqual(code, 3, err)
        self.assertIn("DENY bad_request", err)

        # A job with no producer at all: refused, the connection stays usable.
        code, out, err = await self.reference(
            "consumer-tts", "127.0.0.1", str(ttsPort), "hello", "--model", "piper-en",
        )
        self.assertEqual(code, 1, err)
        self.assertIn("FAIL no_producer (job id null)", err)

        farmLog = await self.stopFarm(farm)
        self.assertPrivate(farmLog, consumerKey)

    async def test_referenceProducerAnswersPings(self) -> None:
        """
        With a short ping_interval the idle reference producer is pinged many
        times; it answers PONG, so it is still there for a job afterwards.
        """
        farm, sttPort, _ = await self.startFarm("--ping-interval", "0.2")
        producer = await self.startProducer(farm, sttPort, "stt", canary("p"), "--jobs", "1")
        # ten ping intervals; a PONG is due within 0.1 s of each PING
        await sleep(2.0)
        self.assertIsNone(producer.reason, producer._describe("ended"))

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "audio.raw")
        audio = os.urandom(1000)
        with open(path, "wb") as f:
            f.write(audio)
        code, out, err = await self.consumer(
            "consumer-stt", "127.0.0.1", str(sttPort), path, "--model", "m", retries=0
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["text"], ref.stt_transcript(audio))
        await self.producerDone(producer, 1)

    async def test_farmShutdownTellsIdleProducer(self) -> None:
        """
        Stopping the farm (SIGTERM) sends an idle producer FAIL shutting_down
        with a null id (section 11, step 4); the farm exits cleanly.
        """
        farm, sttPort, _ = await self.startFarm()
        producer = await self.startProducer(farm, sttPort, "stt", canary("p"))
        await self.stopFarm(farm)
        reason = await producer.whenEnded()
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.exitCode, 4)
        self.assertIn(b"FarmFailure: FAIL shutting_down (connection)", producer.output)

    async def test_consumerGoneCancelsJob(self) -> None:
        """
        A consumer that disconnects in the middle of its upload: the farm sends
        the reference producer CNCL, it answers FAIL cancelled (section 6.3)
        and is idle again for the next job.
        """
        farm, sttPort, _ = await self.startFarm()
        producer = await self.startProducer(farm, sttPort, "stt", canary("p"), "--jobs", "2")

        # A deliberately minimal raw client (frames built with the reference's
        # encoder): HELO, JOB_ for 100 bytes, 10 bytes of DATA, hang up.
        client = RawClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", sttPort), client
        )
        await client.waitFor(b"who")
        client.send("HELO", ref.encode_json(
            {"protocol": 2, "role": "consumer", "service": "stt", "key": ""}))
        await client.waitFor(b"OKAY")
        client.send("JOB_", ref.encode_json({"model": "m", "size": 100}))
        await client.waitFor(b"ASGN")
        client.send("DATA", b"x" * 10)
        client.transport.loseConnection()
        await client.lost
        await producer.waitFor(b"cancelled\n")

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "audio.raw")
        audio = os.urandom(1000)
        with open(path, "wb") as f:
            f.write(audio)
        code, out, err = await self.consumer(
            "consumer-stt", "127.0.0.1", str(sttPort), path, "--model", "m")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["text"], ref.stt_transcript(audio))
        log = await self.producerDone(producer, 2)
        self.assertEqual([line.split()[-1] for line in log.splitlines() if line.startswith("job ")],
                         ["cancelled", "size=1000"])

    async def test_projectConsumerWithReferenceProducer(self) -> None:
        """
        The project's own consumer (L{connectConsumer}) runs STT and TTS jobs,
        several on one connection, through the farm process against the
        reference producers.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        consumerKey = canary("consumer-secret")
        samples = 20_000
        sttProducer = await self.startProducer(farm, sttPort, "stt", canary("p"), "--jobs", "2")
        ttsProducer = await self.startProducer(
            farm, ttsPort, "tts", canary("p"), "--jobs", "2", "--wav-samples", str(samples)
        )

        stt = await self.connect(f"tcp:host=127.0.0.1:port={sttPort}", "stt", consumerKey)
        for audio in (os.urandom(5000), os.urandom(2_500_000)):
            result = await stt.stt("whisper-small", audio, language="en", format="pcm_s16le")
            self.assertEqual(result.text, ref.stt_transcript(audio))
            self.assertEqual(result.data, b"")
        # the reference producer has served its two jobs and left: nobody serves stt now
        await sttProducer.whenEnded()
        with self.assertRaises(JobFailed) as caught:
            await stt.stt("whisper-small", b"\0" * 10)
        self.assertEqual((caught.exception.code, caught.exception.jobId), ("no_producer", None))

        tts = await self.connect(f"tcp:host=127.0.0.1:port={ttsPort}", "tts", consumerKey)
        for text in ("Good morning.", "Zweiter Satz, bitte."):
            result = await tts.tts("piper-en", text, voice="amy", language="en")
            self.assertEqual(result.fields["content_type"], "audio/wav")
            self.assertEqual(result.fields["size"], len(result.data))
            self.assertEqual(result.data, ref.reference_wav(text, samples))
            self.assertTrue(ref.verify_wav(text, result.data))

        await self.producerDone(sttProducer, 2)
        await self.producerDone(ttsProducer, 2)
        await self.disconnect(stt)
        await self.disconnect(tts)
        farmLog = await self.stopFarm(farm)
        self.assertPrivate(farmLog, consumerKey, "Good morning", "Zweiter Satz")

    # --- the project's consumer --------------------------------------------

    async def connect(self, endpoint: str, service: str, key: str) -> Any:
        protocol = await connectConsumer(reactor, endpoint, service, key)
        self.addCleanup(self.disconnect, protocol)
        return protocol

    def disconnect(self, protocol: Any) -> Deferred[None]:
        if not protocol.disconnected.called:
            protocol.transport.loseConnection()
        d: Deferred[None] = Deferred()
        protocol.disconnected.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    # --- the two daemons, as an operator runs them ------------------------

    async def startNode(self, sttPort: int, ttsPort: int) -> WatchedProcess:
        node = WatchedProcess("node")
        args = [
            sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-",
            "privox-node", "--config", os.path.join(REPO, "etc", "privox-node.toml"),
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}",
            "--tts-farm", f"tcp:host=127.0.0.1:port={ttsPort}",
            "--key", "node-key",
        ]
        reactor.spawnProcess(node, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(node.stop)
        await node.waitFor(b"serving stt through", timeout=120)
        await node.waitFor(b"serving tts through", timeout=120)
        return node

    async def test_farmAndNodeDaemons(self) -> None:
        """
        twistd privox-farm and twistd privox-node with the bundled models;
        Piper speaks a sentence through them and Whisper hears it back.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        node = await self.startNode(sttPort, ttsPort)
        wav = os.path.abspath(self.mktemp()) + ".wav"
        sentence = "The weather today is sunny with a light breeze."
        code, out, err = await self.consumer(
            "consumer-tts", "127.0.0.1", str(ttsPort), sentence,
            "--model", "piper:en_US-joe-medium", "-o", wav,
        )
        self.assertEqual(code, 0, err)
        code, out, err = await self.consumer(
            "consumer-stt", "127.0.0.1", str(sttPort), wav, "--model", "whisper:tiny.en",
        )
        self.assertEqual(code, 0, err)
        from tests.wer import wer

        self.assertLessEqual(wer(sentence, json.loads(out)["text"]), 0.25, out)
        self.assertEqual(node.output.count(b"loaded whisper:tiny.en in"), 1)
        await node.stop()
        self.assertIn(b"stopping: finishing running jobs", node.output)
        self.assertNotIn(b"Traceback", node.output)
        farmLog = await self.stopFarm(farm)
        self.assertPrivate(farmLog, "node-key", sentence)
