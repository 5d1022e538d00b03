"""
The original PriVox peers against a real C{twistd privox-farm}: original
nodes and clients are separate processes running L{tests.originals} (written
from the original's wire behaviour, blocking sockets and all); beside them,
where a case needs one, a real C{twistd privox-node} with the bundled models
(faster-whisper tiny.en, Piper en_US-joe-medium), C{twistd privox-api}, or
the project's own PVX/2 consumer.

One test per case of the contract for original peers (cases 1 to 9; the
original clients around the API are covered elsewhere). Each checks the
outcome and that the original process is still alive (an original node dies
on a malformed header, an RST or a decode error) or, where the case allows
it, that it reconnected.

Nothing here sleeps on the wall clock: waits are L{until} on a process's
output, and the few fixed delays a case is made of (a node frozen for 8 s, a
ping coming due) are reactor delays (L{sleep}).
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import sys
import wave
from typing import Any

import av
import numpy as np
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from privox.consumer import ConsumerProtocol, JobFailed, connectConsumer
from tests import originals
from tests.support import sleep, until
from tests.test_roundtrip import speak
from tests.test_e2e import ENV, REPO, TWISTD, WatchedProcess, freePorts, keyId
from tests.wer import wer

ORIGINALS = os.path.join(REPO, "tests", "originals.py")
FARM_CONFIG = os.path.join(REPO, "etc", "privox-farm.toml")
NODE_CONFIG = os.path.join(REPO, "etc", "privox-node.toml")
API_CONFIG = os.path.join(REPO, "etc", "privox-api.toml")

SENTENCE = "Please call me back when you get this message."
MAX_WER = 0.25
#: How long a PVX/1 job may run in these farms: a lost job fails this fast.
JOB_TIMEOUT = "20"
#: The socket timeout given to the original clients (they have none), so
#: that a client the farm forgets ends instead of hanging the test.
CLIENT_TIMEOUT = "30"

PONGED = b"Responded to ping"
CONNECTING = b"Trying to connect to producer farm"
VCTK = "tts_models/en/vctk/vits"


# --------------------------------------------------------------------------
# Audio


@functools.cache
def _speech22k() -> bytes:
    return speak(SENTENCE)


def _resampled(wav: bytes, rate: int, layout: str) -> bytes:
    """
    C{wav} as 16-bit PCM at C{rate} Hz, C{layout} mono or stereo (PyAV).
    """
    resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
    frames = []
    with av.open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2 if layout == "stereo" else 1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


@functools.cache
def speech16k() -> bytes:
    "SENTENCE spoken by Piper, as a 16 kHz mono 16-bit WAV (what the originals sent)."
    return _resampled(_speech22k(), 16000, "mono")


@functools.cache
def speech44kStereo() -> bytes:
    "SENTENCE spoken by Piper, as a 44.1 kHz stereo 16-bit WAV."
    return _resampled(_speech22k(), 44100, "stereo")


def silence16k(seconds: float = 2.0) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * int(16000 * seconds)))
    return out.getvalue()


def wavSeconds(data: bytes) -> float:
    """
    A WAV's duration; fails the test's assertion (ValueError) if it is not
    one valid WAV.
    """
    if data[:4] != b"RIFF":
        raise ValueError(f"not a RIFF WAV: {data[:12]!r}")
    with wave.open(io.BytesIO(data)) as w:
        frames, rate, width, channels = w.getnframes(), w.getframerate(), w.getsampwidth(), w.getnchannels()
    if frames * width * channels > len(data) - 44:
        raise ValueError(f"WAV declares {frames} frames but holds {len(data)} bytes")
    return frames / rate


def spokenAtLeast(text: str) -> float:
    """
    The least duration the stand-in synthesizer's WAV for all of C{text} may
    have: its characters at SECONDS_PER_CHAR, less one character per C{&}
    and C{=} (the farm may rewrite them) and 10 for whitespace lost where the
    farm splits the text.
    """
    chars = len(text) - text.count("&") - text.count("=") - 10
    return chars * originals.SECONDS_PER_CHAR


def longText(size: int = 3000) -> str:
    """
    A text of exactly C{size} UTF-8 bytes, with two-, three- and four-byte
    characters throughout.
    """
    sentence = "Grüße aus Köln: naïve café, crème brûlée — 日本語のテキスト ✓ 🎉. "
    text = ""
    while len((text + sentence).encode()) <= size:
        text += sentence
    while len(text.encode()) < size:
        text += "."
    assert len(text.encode()) == size
    return text


AMPERSAND_TEXT = "Salt & pepper, fish & chips; one plus one = two & three = three."


def multipart(fields: dict[str, str], wav: bytes) -> tuple[bytes, str]:
    boundary = "privoxoriginalsboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="speech.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode() + wav + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------


class Outcome:
    """
    How an original client process ended.
    """

    def __init__(self, code: int, out: str, err: str, seconds: float) -> None:
        self.code, self.out, self.err, self.seconds = code, out, err, seconds

    def __repr__(self) -> str:
        return f"exit {self.code} after {self.seconds:.1f} s; stdout {self.out!r}; stderr {self.err[-2000:]!r}"

    @property
    def text(self) -> str:
        return json.loads(self.out)["text"]


class OriginalPeersTests(TestCase):
    timeout = 240

    # --- processes ---------------------------------------------------------

    async def startFarm(self, *extra: str, ports: tuple[int, int] | None = None) -> tuple[WatchedProcess, int, int]:
        sttPort, ttsPort = ports or freePorts(2)
        farm = WatchedProcess("farm")
        args = [
            sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-",
            "privox-farm", "--config", FARM_CONFIG,
            "--stt-listen", f"tcp:{sttPort}:interface=127.0.0.1",
            "--tts-listen", f"tcp:{ttsPort}:interface=127.0.0.1",
            "--job-timeout", JOB_TIMEOUT, "--shutdown-grace", "2", *extra,
        ]
        reactor.spawnProcess(farm, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(self.stop, farm)
        await farm.waitFor(b"FarmFactory starting on %d\n" % sttPort)
        await farm.waitFor(b"FarmFactory starting on %d\n" % ttsPort)
        return farm, sttPort, ttsPort

    async def stop(self, process: WatchedProcess) -> None:
        """
        End C{process} (thawed first, should a test have frozen it): SIGTERM,
        then SIGKILL if it is still there after 15 s.
        """
        if process.reason is None and process.transport is not None:
            process.transport.signalProcess(signal.SIGCONT)
            process.transport.signalProcess("TERM")
            ended = process.whenEnded()
            try:
                await until(lambda: process.reason is not None, f"{process.name} ends", 15)
            except AssertionError:
                if process.reason is None:
                    process.transport.signalProcess("KILL")
            await ended

    async def joined(self, farm: WatchedProcess, key: str, service: str, count: int = 1,
                     timeout: float = 15, pvx1: bool = True, peer: WatchedProcess | None = None) -> None:
        line = b"%sproducer %s joined %s" % (b"PVX/1 " if pvx1 else b"", keyId(key), service.encode())
        try:
            await until(lambda: farm.output.count(line) >= count, f"{line.decode()} (x{count})", timeout)
        except AssertionError as e:
            tail = "" if peer is None else "\n" + peer._describe("state")
            raise AssertionError(f"{e}\n{farm._describe('log')}{tail}") from None

    async def originalNode(self, farm: WatchedProcess, service: str, port: int, key: str,
                           *extra: str) -> WatchedProcess:
        """
        An original node (tests/originals.py), once the farm says it joined.
        """
        node = WatchedProcess(f"original {service} node")
        args = [sys.executable, ORIGINALS, f"{service}-node", "--port", str(port),
                "--key", key, "--retry-sleep", "1", *extra]
        reactor.spawnProcess(node, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(self.stop, node)
        await self.joined(farm, key, service, peer=node)
        return node

    async def original(self, role: str, port: int, key: str, *args: str) -> Outcome:
        """
        Run an original client to its end.
        """
        started = reactor.seconds()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [ORIGINALS, role, "--port", str(port), "--key", key, "--timeout", CLIENT_TIMEOUT, *args],
            env=ENV, path=REPO, reactor=reactor,
        )
        return Outcome(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                       reactor.seconds() - started)

    async def sttClient(self, port: int, audio: bytes, key: str = "original-client1", *args: str) -> Outcome:
        path = os.path.abspath(self.mktemp()) + ".wav"
        with open(path, "wb") as f:
            f.write(audio)
        return await self.original("stt-client", port, key, "--file", path, *args)

    async def privoxNode(self, farm: WatchedProcess, sttPort: int, ttsPort: int,
                         key: str = "privox-node-key") -> WatchedProcess:
        """
        twistd privox-node with the bundled models (whisper:tiny.en for en;
        piper:en_US-joe-medium), joined to both services.
        """
        node = WatchedProcess("privox node")
        args = [
            sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-",
            "privox-node", "--config", NODE_CONFIG,
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}",
            "--tts-farm", f"tcp:host=127.0.0.1:port={ttsPort}",
            "--key", key,
        ]
        reactor.spawnProcess(node, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(self.stop, node)
        await self.joined(farm, key, "stt", pvx1=False, timeout=120, peer=node)
        await self.joined(farm, key, "tts", pvx1=False, timeout=120, peer=node)
        return node

    async def privoxApi(self, sttPort: int, ttsPort: int) -> str:
        """
        twistd privox-api on the farm, without accounts (any key); its URL.
        """
        [port] = freePorts(1)
        api = WatchedProcess("privox api")
        args = [
            sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-",
            "privox-api", "--config", API_CONFIG,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--farm", f"local tcp:host=127.0.0.1:port={sttPort} tcp:host=127.0.0.1:port={ttsPort}",
            "--accounts", "none", "--keys", "open",
            # Original nodes cannot seal: sealed where a node can, else not.
            "--e2e", "preferred",
        ]
        reactor.spawnProcess(api, sys.executable, args, env=ENV, path=REPO)
        self.addCleanup(self.stop, api)
        await api.waitFor(b"API listening on", timeout=60)
        self.api = api
        return f"http://127.0.0.1:{port}"

    async def postStt(self, url: str, wav: bytes, **fields: str) -> tuple[int, str]:

        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        body, contentType = multipart(fields, wav)
        response = await http.post(f"{url}/stt", data=body, headers={"Content-Type": contentType})
        return response.code, await response.text("utf-8")

    async def consumer(self, port: int, service: str, key: str = "pvx2-consumer") -> ConsumerProtocol:
        protocol = await connectConsumer(reactor, f"tcp:host=127.0.0.1:port={port}", service, key)

        def close() -> Deferred[None]:
            if not protocol.disconnected.called:
                protocol.transport.loseConnection()
            d: Deferred[None] = Deferred()
            protocol.disconnected.addBoth(lambda r: (d.callback(None), r)[1])
            return d

        self.addCleanup(close)
        return protocol

    # --- checks ------------------------------------------------------------

    def alive(self, node: WatchedProcess) -> bool:
        """
        Whether C{node} runs (read from /proc, so a death the reactor has not
        reaped yet counts as one).
        """
        if node.reason is not None or node.transport is None or node.transport.pid is None:
            return False
        try:
            with open(f"/proc/{node.transport.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    async def survives(self, node: WatchedProcess, grace: float = 1.0) -> bool:
        """
        Whether C{node} is still alive C{grace} seconds from now (a node that
        dies on what it just read closes its socket, so its farm and consumer
        may hear of it before the process is gone).
        """
        try:
            await until(lambda: not self.alive(node), "the node dies", grace)
        except AssertionError:
            return True
        return False

    async def assertAlive(self, node: WatchedProcess) -> None:
        self.assertTrue(await self.survives(node), node._describe(
            "died (an original node dies on a header it cannot parse, bytes it cannot"
            " decode, or an RST)"))

    async def waitFor(self, condition: Any, what: str, timeout: float,
                      *processes: WatchedProcess) -> None:
        """
        L{until}, failing with the output of C{processes}.
        """
        try:
            await until(condition, what, timeout)
        except AssertionError as e:
            states = "\n".join(p._describe("alive" if self.alive(p) else "dead") for p in processes)
            raise AssertionError(f"{e}\n{states}") from None

    def connects(self, node: WatchedProcess) -> int:
        return node.output.count(CONNECTING)

    def assertKept(self, farm: WatchedProcess, node: WatchedProcess) -> None:
        """
        The node's first connection is the one it still has.
        """
        self.assertEqual(self.connects(node), 1, node._describe(
            "reconnected: the farm dropped it") + "\n" + farm._describe("log"))

    def assertHeard(self, text: str | None, what: str) -> None:
        self.assertIsNotNone(text, what)
        assert text is not None
        self.assertLessEqual(wer(SENTENCE, text), MAX_WER, f"{what}: heard {text!r}")

    async def sttJob(self, consumer: ConsumerProtocol, audio: bytes, what: str,
                     node: WatchedProcess) -> Any:
        started = reactor.seconds()
        try:
            return await consumer.stt("whisper:tiny.en", audio, language="en")
        except JobFailed as e:
            self.fail(f"{what}: failed after {reactor.seconds() - started:.1f} s: {e}\n"
                      + node._describe("alive" if self.alive(node) else "dead"))

    def report(self, what: str, seconds: float) -> None:
        print(f"\n    [{self.id().rsplit('.', 1)[-1]}] {what}: {seconds:.2f} s", end="")

    # --- 1. lang=English onto a PVX/2 node advertising en -----------------------

    async def test_1a_englishFromOriginalClient(self) -> None:
        """
        An original STT client's C{lang=English} (its default) reaches a
        Privox node that advertises C{en}, and the transcript comes back.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        await self.privoxNode(farm, sttPort, ttsPort)
        outcome = await self.sttClient(sttPort, speech16k(), "original-client1", "--lang", "English")
        self.assertEqual(outcome.code, 0, f"{outcome}\n{farm._describe('log')}")
        self.assertHeard(outcome.text, "transcript")
        self.report("original client, lang=English, job", outcome.seconds)

    async def test_1b_englishThroughApi(self) -> None:
        """
        POST /stt with C{language=English} (the original API's form) answers
        200 with the transcript.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        await self.privoxNode(farm, sttPort, ttsPort)
        url = await self.privoxApi(sttPort, ttsPort)
        started = reactor.seconds()
        code, body = await self.postStt(url, speech16k(), key="original-user", quality="fast",
                                        language="English")
        self.assertEqual(code, 200, f"{body}\n{self.api._describe('log')}")
        self.assertHeard(body, "POST /stt")
        self.report("POST /stt language=English", reactor.seconds() - started)

    # --- 2. the original's VCTK model and speakers onto a Piper node ----------

    async def test_2_vctkSpeakersOntoPiper(self) -> None:
        """
        With only a Privox Piper node on TTS, the original client's
        C{model=tts_models/en/vctk/vits} with C{idx=p236} and with C{idx=p270}
        (its voice1 and voice2) each get a valid WAV.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        await self.privoxNode(farm, sttPort, ttsPort)
        for speaker in ("p236", "p270"):
            out = os.path.abspath(self.mktemp()) + ".wav"
            outcome = await self.original(
                "tts-client", ttsPort, "original-client1", "--model", VCTK, "--idx", speaker,
                "--text", "Hello from the original client.", "--out", out,
            )
            self.assertEqual(outcome.code, 0, f"idx={speaker}: {outcome}\n{farm._describe('log')}")
            with open(out, "rb") as f:
                wav = f.read()
            self.assertGreater(wavSeconds(wav), 0.5, f"idx={speaker}")
            self.report(f"tts idx={speaker}", outcome.seconds)

    # --- 3. frozen nodes, and a farm that goes away ---------------------------

    async def test_3a_frozenNodeIsKept(self) -> None:
        """
        An original node frozen (SIGSTOP) for 8 s across a ping, then resumed,
        is kept on its connection, alive, and serves the next job.
        """
        farm, sttPort, _ = await self.startFarm(
            "--ping-interval", "2", "--pvx1-pong-timeout", "20")
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        await self.waitFor(lambda: node.output.count(PONGED) >= 1, "the node answers a ping", 10,
                           node, farm)
        pongs = node.output.count(PONGED)
        node.transport.signalProcess(signal.SIGSTOP)
        await sleep(8)  # four ping intervals
        node.transport.signalProcess(signal.SIGCONT)
        await self.waitFor(lambda: node.output.count(PONGED) > pongs,
                           "the node answers the ping it slept through", 5, node, farm)
        await self.assertAlive(node)
        outcome = await self.sttClient(sttPort, speech16k())
        self.assertEqual(outcome.code, 0, f"{outcome}\n{node._describe('state')}\n{farm._describe('log')}")
        self.assertHeard(outcome.text, "job after the freeze")
        await self.assertAlive(node)
        self.assertKept(farm, node)
        self.report("job after an 8 s freeze", outcome.seconds)

    async def test_3b_farmRestartCleanClose(self) -> None:
        """
        A farm that stops (SIGTERM) closes its original nodes' connections
        cleanly (FIN: an RST would kill them); they survive, reconnect to a farm
        started again on the same port, and serve a job.
        """
        ports = tuple(freePorts(2))
        farm, sttPort, _ = await self.startFarm(ports=ports)  # type: ignore[arg-type]
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        stopped = reactor.seconds()
        await self.stop(farm)
        await self.waitFor(lambda: b"SPN exited, reason = socket error" in node.output,
                           "the node sees the farm close", 10, node, farm)
        await self.assertAlive(node)
        self.assertNotIn(b"Traceback", node.output)
        farm, sttPort, _ = await self.startFarm(ports=ports)  # type: ignore[arg-type]
        await self.joined(farm, "original-node-01", "stt", peer=node)
        self.report("farm stopped to node back", reactor.seconds() - stopped)
        outcome = await self.sttClient(sttPort, speech16k())
        self.assertEqual(outcome.code, 0, f"{outcome}\n{farm._describe('log')}")
        self.assertHeard(outcome.text, "job after the restart")
        await self.assertAlive(node)
        self.assertGreaterEqual(self.connects(node), 2)

    # --- 4. a job while a pong is owed --------------------------------------

    async def test_4_jobWhileNodeOwesPong(self) -> None:
        """
        The node is stopped just before a ping is due; a job arrives after the
        ping went out; the node resumes and answers the ping: the job is served
        promptly, not lost (an original node that reads C{pingmodel=...} in one
        read answers only the ping).
        """
        farm, sttPort, _ = await self.startFarm(
            "--ping-interval", "2", "--pvx1-pong-timeout", "20")
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        consumer = await self.consumer(sttPort, "stt")
        pongs = node.output.count(PONGED)
        await self.waitFor(lambda: node.output.count(PONGED) > pongs, "the node answers a ping", 10,
                           node, farm)
        # Pings go out every 2 s; the pong for the next one is due 1 s after it.
        node.transport.signalProcess(signal.SIGSTOP)
        frozen = len(node.output)
        await sleep(2.25)  # the next ping has gone out, unanswered
        job = consumer.stt("whisper:tiny.en", speech16k(), language="en")
        await sleep(0.25)
        node.transport.signalProcess(signal.SIGCONT)
        resumed = reactor.seconds()
        try:
            result = await job
        except JobFailed as e:
            self.fail(f"job failed {reactor.seconds() - resumed:.1f} s after the node resumed: {e}\n"
                      f"{node._describe('state')}")
        took = reactor.seconds() - resumed
        # The case happened: the node's first words after the freeze were its
        # pong, then it took the job.
        await self.waitFor(lambda: b"Took " in node.output[frozen:], "the node logs its job", 5, node)
        after = bytes(node.output[frozen:])
        self.assertTrue(PONGED in after and after.index(PONGED) < after.find(b"Took "),
                        node._describe("did not answer a ping before its job"))
        self.assertHeard(result.text, "job that arrived while a pong was owed")
        self.assertLess(took, 8.0, "served, but not promptly")
        await self.assertAlive(node)
        self.assertKept(farm, node)
        self.report("resume to transcript", took)

    # --- 5. an empty transcript ----------------------------------------------

    async def test_5_silenceAnsweredPromptly(self) -> None:
        """
        Silence: the original node sends nothing for its empty transcript; the
        consumer still gets C{""} within a few seconds, and the node serves the
        next job.
        """
        farm, sttPort, _ = await self.startFarm()
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        consumer = await self.consumer(sttPort, "stt")
        started = reactor.seconds()
        try:
            result = await consumer.stt("whisper:tiny.en", silence16k(), language="en")
        except JobFailed as e:
            self.fail(f"silence: failed after {reactor.seconds() - started:.1f} s: {e}")
        took = reactor.seconds() - started
        self.assertEqual(result.text, "")
        self.assertLess(took, 5.0, "an empty transcript, but not promptly")
        self.report("silence to empty transcript", took)
        result = await self.sttJob(consumer, speech16k(), "job after the silence", node)
        self.assertHeard(result.text, "job after the silence")
        await self.assertAlive(node)
        self.assertKept(farm, node)

    # --- 6. audio the original cannot read --------------------------------------

    async def test_6a_stereo44kFromPvx2Consumer(self) -> None:
        """
        A 44.1 kHz stereo WAV from a PVX/2 consumer, run on an original node
        (which reads raw 16 kHz mono int16): the farm converts it, and the
        transcript is right.
        """
        farm, sttPort, _ = await self.startFarm()
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        consumer = await self.consumer(sttPort, "stt")
        started = reactor.seconds()
        result = await self.sttJob(consumer, speech44kStereo(), "44.1 kHz stereo job", node)
        self.assertHeard(result.text, "44.1 kHz stereo, PVX/2 consumer")
        await self.assertAlive(node)
        self.report("44.1 kHz stereo job", reactor.seconds() - started)

    async def test_6b_stereo44kThroughApi(self) -> None:
        """
        The same WAV posted to privox-api's /stt, run on an original node.
        """
        farm, sttPort, ttsPort = await self.startFarm()
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        url = await self.privoxApi(sttPort, ttsPort)
        started = reactor.seconds()
        code, body = await self.postStt(url, speech44kStereo(), key="original-user", quality="fast",
                                        language="English")
        self.assertEqual(code, 200, f"{body}\n{self.api._describe('log')}\n{farm._describe('log')}")
        self.assertHeard(body, "44.1 kHz stereo, POST /stt")
        await self.assertAlive(node)
        self.report("44.1 kHz stereo POST /stt", reactor.seconds() - started)

    # --- 7. texts the original TTS node cannot read in one header -------------

    async def test_7_ttsAmpersandsAndLongText(self) -> None:
        """
        Texts with C{&} and C{=}, and one of 3000 UTF-8 bytes: the original TTS
        node (one recv(1024) per header, split on C{&} and C{=}) survives, and
        each is spoken whole in one WAV, or fails clearly.
        """
        farm, _, ttsPort = await self.startFarm()
        node = await self.originalNode(farm, "tts", ttsPort, "original-node-01")
        consumer = await self.consumer(ttsPort, "tts")
        problems = []
        for name, text in (("&/= text", AMPERSAND_TEXT), ("3000-byte text", longText())):
            started = reactor.seconds()
            spoken = node.output.count(b"bytes wav data sent")
            try:
                result = await consumer.tts(f"coqui:{VCTK}", text, voice="p236", language="en")
            except JobFailed as e:
                self.report(f"{name}: clear failure {e.code}", reactor.seconds() - started)
            else:
                seconds = wavSeconds(result.data)
                self.report(f"{name}: {seconds:.2f} s of audio", reactor.seconds() - started)
                await self.waitFor(lambda: node.output.count(b"bytes wav data sent") > spoken,
                                   f"{name}: the original node logs the WAV it sent", 5, node)
                if seconds < spokenAtLeast(text):
                    problems.append(
                        f"{name}: {seconds:.2f} s of audio is about {seconds / originals.SECONDS_PER_CHAR:.0f}"
                        f" of its {len(text)} characters (at least {spokenAtLeast(text):.2f} s expected)"
                    )
            if not await self.survives(node):
                problems.append(f"{name}: " + node._describe("died"))
                break
        if self.alive(node):
            # The original client too: its header (under 255 bytes) holds the '&'s.
            out = os.path.abspath(self.mktemp()) + ".wav"
            outcome = await self.original("tts-client", ttsPort, "original-client1",
                                          "--text", AMPERSAND_TEXT, "--out", out)
            if outcome.code == 0:
                with open(out, "rb") as f:
                    seconds = wavSeconds(f.read())
                if seconds < spokenAtLeast(AMPERSAND_TEXT):
                    problems.append(f"original client, &/= text: only {seconds:.2f} s of audio")
            elif outcome.code not in (3, 4):
                problems.append(f"original client, &/= text: {outcome}")
            # And the node still serves.
            try:
                result = await consumer.tts(f"coqui:{VCTK}", "Still here.", voice="p236", language="en")
            except JobFailed as e:
                problems.append(f"a short text afterwards: {e}")
            else:
                self.assertGreater(wavSeconds(result.data), 0.0)
        self.assertFalse(problems, "\n".join(problems) + "\n" + node._describe("state")
                         + "\n" + farm._describe("log"))
        await self.assertAlive(node)

    # --- 8. keys of other lengths ---------------------------------------------

    async def test_8_keysOfOtherLengths(self) -> None:
        """
        Original nodes and clients whose keys are 8 and 24 characters long, on
        a farm with allow-lists of exactly those keys.
        """
        nodeKeys = {"stt": "nodekey8", "tts": "tts-node-key-24-chars-ab"}
        clientKeys = ["client08", "client-key-24-characters"]
        assert [len(k) for k in (*nodeKeys.values(), *clientKeys)] == [8, 24, 8, 24]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        producers, consumers = os.path.join(directory, "producers"), os.path.join(directory, "consumers")
        with open(producers, "w") as f:
            f.write("\n".join(nodeKeys.values()) + "\n")
        with open(consumers, "w") as f:
            f.write("\n".join(clientKeys) + "\n")
        farm, sttPort, ttsPort = await self.startFarm(
            "--producer-keys", producers, "--consumer-keys", consumers)
        nodes = {}
        problems = []
        for service, port in (("stt", sttPort), ("tts", ttsPort)):
            key = nodeKeys[service]
            node = nodes[service] = WatchedProcess(f"original {service} node")
            reactor.spawnProcess(node, sys.executable, [
                sys.executable, ORIGINALS, f"{service}-node", "--port", str(port), "--key", key,
                "--retry-sleep", "1",
            ], env=ENV, path=REPO)
            self.addCleanup(self.stop, node)
        for service, node in nodes.items():
            try:
                await self.joined(farm, nodeKeys[service], service, timeout=10)
            except AssertionError:
                problems.append(f"{service} node with a {len(nodeKeys[service])}-character key never joined")
        for key in clientKeys:
            outcome = await self.sttClient(sttPort, speech16k(), key)
            if outcome.code != 0 or wer(SENTENCE, outcome.text) > MAX_WER:
                problems.append(f"stt client, {len(key)}-character key: {outcome}")
            out = os.path.abspath(self.mktemp()) + ".wav"
            outcome = await self.original("tts-client", ttsPort, key, "--text", "Hello there.", "--out", out)
            if outcome.code != 0:
                problems.append(f"tts client, {len(key)}-character key: {outcome}")
        for node in nodes.values():
            if not await self.survives(node):
                problems.append(node._describe("died"))
        self.assertFalse(problems, "\n".join(problems) + "\n" + farm._describe("log"))

    # --- 9. an upload that stops short ----------------------------------------

    async def test_9_abortedUploadDoesNotBlockNode(self) -> None:
        """
        An original client announces len=1000000, sends 1 KB and closes; the
        next original client is served (not C{nak}) within a few seconds, and
        the node is alive.
        """
        farm, sttPort, _ = await self.startFarm()
        node = await self.originalNode(farm, "stt", sttPort, "original-node-01")
        aborted = await self.sttClient(sttPort, speech16k(), "original-client1",
                                       "--len", "1000000", "--send-bytes", "1024", "--then-close")
        self.assertEqual(aborted.code, 0, f"the aborting client was not even acked: {aborted}")
        started = reactor.seconds()
        outcome = await self.sttClient(sttPort, speech16k(), "original-client2")
        took = reactor.seconds() - started
        self.assertEqual(outcome.code, 0, f"{outcome}\n{node._describe('state')}\n{farm._describe('log')}")
        self.assertHeard(outcome.text, "job after the aborted upload")
        self.assertLess(took, 8.0, "served, but not within a few seconds")
        await self.assertAlive(node)
        self.report(f"next client served (node connections: {self.connects(node)})", took)
