"""
Long recordings cut into pieces and transcribed by many producers at once
(L{privox.api.fanout}, issue 21): where the cuts fall, how the pieces are
stitched, retried and reported; the API's routes with a long upload; and,
with real processes, a node SIGKILLed mid-way through a long recording.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from typing import Any

import numpy
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api.errors import BadInput, NoProducer, TimedOut, Unavailable
from privox.api.farms import FarmExchange
from privox.api.exchange import TimedText, TimedWord, Transcribed
from privox.api.fanout import (
    FanOut,
    Piece,
    cutPieces,
    moved,
    stitch,
)
from privox.engines.base import Cancelled, STTJob
from privox.engines.digest import SleepEngine, sleepTranscript
from privox.engines.registry import ModelSpec, createEngine
from privox.wav import pcmToWav, wavPCM
from tests.apifarms import startFarm
from tests.support import until
from tests.test_api_app import APITestCase, FakeExchange, KEY, multipart
from tests.test_faults import ProcessTestCase, figures, producerSessions

RATE = 16000
SLEEP_MODEL = "sleep:0.05"


def burst(seconds: float, seed: int = 0) -> bytes:
    """
    Loud noise (speech, to the energy classifier).
    """
    rng = random.Random(seed)
    return b"".join(
        rng.randint(-8000, 8000).to_bytes(2, "little", signed=True)
        for _ in range(int(seconds * RATE))
    )


def quiet(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


def tonal(seconds: float, frequency: float = 300.0, amplitude: float = 6000.0) -> bytes:
    return b"".join(
        int(amplitude * math.sin(2 * math.pi * frequency * n / RATE)).to_bytes(
            2, "little", signed=True
        )
        for n in range(int(seconds * RATE))
    )


def recording(*parts: tuple[str, float]) -> bytes:
    """
    ("s", seconds) of speech, ("q", seconds) of quiet, in order.
    """
    return b"".join(
        burst(seconds, i) if kind == "s" else quiet(seconds)
        for i, (kind, seconds) in enumerate(parts)
    )


def SPEECH(frame: bytes) -> bool:
    """
    Loud frames are speech: a classifier whose answers these tests can
    plan (webrtcvad's own are tested once, in CuttingTests).
    """
    samples = numpy.frombuffer(frame, dtype="<i2").astype(numpy.float32)
    return bool(samples.size) and float(numpy.sqrt(numpy.mean(samples**2))) > 300.0


def inThread(f: Any, *args: Any) -> Any:
    return maybeDeferred(f, *args)


class CuttingTests(SynchronousTestCase):
    def test_short(self) -> None:
        """
        A recording no longer than 30 s is one piece; none is none.
        """
        pcm = recording(("s", 12), ("q", 1), ("s", 12))
        [piece] = cutPieces(pcm, SPEECH)
        self.assertEqual((piece.index, piece.start, piece.pcm), (0, 0.0, pcm))
        self.assertEqual(cutPieces(b"", SPEECH), [])

    def test_longestPause(self) -> None:
        """
        Each cut falls in the middle of the longest pause between 20 and
        30 s into its piece, not in a shorter one nearer 30 s; the pieces
        together are the recording.
        """
        pcm = recording(
            ("s", 21), ("q", 0.3), ("s", 2), ("q", 1.2), ("s", 4), ("q", 0.4),  # 28.9 s
            ("s", 24), ("q", 0.6), ("s", 20),
        )
        pieces = cutPieces(pcm, SPEECH)
        self.assertEqual(b"".join(p.pcm for p in pieces), pcm)
        self.assertEqual([p.index for p in pieces], list(range(len(pieces))))
        # The 1.2 s pause runs 23.3..24.5: its middle is 23.9.
        self.assertLess(abs(pieces[1].start - 23.9), 0.06)
        # Then 28.9 + 24 = 52.9..53.5, at most 30 s into the second piece.
        self.assertLess(abs(pieces[2].start - 53.2), 0.06)
        self.assertTrue(all(p.seconds <= 30.0 for p in pieces), [p.seconds for p in pieces])
        for p in pieces[1:]:
            self.assertEqual(p.start, pieces[p.index - 1].end)

    def test_noPause(self) -> None:
        """
        Speech with no pause at all is cut at its quietest frame from 20 to
        30 s; no piece is longer than 30 s, and the last is not a sliver.
        """
        pcm = burst(26) + tonal(0.09, amplitude=100) + burst(40)
        pieces = cutPieces(pcm, lambda frame: True)
        self.assertLess(abs(pieces[1].start - 26.01), 0.04)
        self.assertTrue(all(p.seconds <= 30.0 for p in pieces))
        self.assertGreaterEqual(pieces[-1].seconds, 5.0)
        self.assertEqual(b"".join(p.pcm for p in pieces), pcm)

    def test_webrtcvad(self) -> None:
        """
        By default webrtcvad finds the pauses (cuts land in silence).
        """
        pcm = (burst(22) + quiet(1.5)) * 4
        pieces = cutPieces(pcm)
        self.assertGreater(len(pieces), 2)
        for p in pieces[1:]:
            at = int(p.start * RATE) * 2
            self.assertEqual(pcm[at - 640 : at + 640], bytes(1280), p.start)


def answer(text: str, seconds: float = 30.0, words: bool = True) -> Transcribed:
    half = seconds / 2
    return Transcribed(
        text, "m", "en", seconds,
        (
            TimedText(0.0, half, text + " one", None, None,
                      (TimedWord(0.1, 0.5, text),) if words else ()),
            TimedText(half, seconds + 0.5, text + " two"),
        ),
    )


class StitchTests(SynchronousTestCase):
    def test_moved(self) -> None:
        """
        Segments and words move by the piece's start, and stay within it.
        """
        piece = Piece(2, 50.0, bytes(20 * RATE * 2))
        result = moved(answer("b", 20.0), piece)
        self.assertEqual(
            [(s.start, s.end) for s in result.segments], [(50.0, 60.0), (60.0, 70.0)]
        )
        self.assertEqual(result.segments[0].words, (TimedWord(50.1, 50.5, "b"),))
        # No segments: one of the whole piece.
        bare = moved(Transcribed("plain", "m", None, None), piece)
        self.assertEqual(bare.segments, (TimedText(50.0, 70.0, "plain"),))
        self.assertEqual(moved(Transcribed("", "m", None, None), piece).segments, ())

    def test_stitch(self) -> None:
        pieces = [Piece(0, 0.0, bytes(RATE * 2 * 20)), Piece(1, 20.0, bytes(RATE * 2 * 10))]
        results = [moved(answer("a", 20.0), pieces[0]), moved(answer(" b ", 10.0), pieces[1])]
        whole = stitch(pieces, results, "m", None)
        self.assertEqual(whole.text, "a b")
        self.assertEqual(whole.duration_s, 30.0)
        self.assertEqual(whole.language, "en")
        self.assertEqual(
            [(s.start, s.end) for s in whole.segments],
            [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0), (25.0, 30.0)],
        )
        self.assertEqual([w.start for s in whole.segments for w in s.words], [0.1, 20.1])


class Pending:
    """
    An exchange whose every job waits until the test answers it.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[bytes, float, Deferred[Transcribed]]] = []
        self.cancelled = 0

    def transcribe(self, model: str, language: str | None, audio: bytes, format: str,
                   deadline: float, *rest: Any) -> Deferred[Transcribed]:
        assert format == "wav"
        d: Deferred[Transcribed] = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.jobs.append((audio, deadline, d))
        return d


class FanOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.exchange = Pending()
        self.progress: list[tuple[int, int]] = []
        self.ordered: list[tuple[int, str]] = []
        # Five pieces of 25 s (pauses of a second every 25 s).
        self.pcm = recording(*[("s", 24.5), ("q", 1.0)] * 4, ("s", 20))
        self.fanout = FanOut(self.exchange, self.clock, inThread, atOnce=2, isSpeech=SPEECH)

    def start(self, deadline: float = 600.0) -> Deferred[Transcribed]:
        return Deferred.fromCoroutine(self.fanout.transcribe(
            self.pcm, "m", None, deadline, lambda seconds: 10 + seconds,
            progress=lambda done, total: self.progress.append((done, total)),
            inOrder=lambda piece, result: self.ordered.append((piece.index, result.text)),
        ))

    def test_atOnceInOrder(self) -> None:
        """
        At most C{atOnce} pieces are in flight; they may finish in any
        order, but are stitched, and handed on, in the recording's; each
        piece's deadline follows its length.
        """
        d = self.start()
        self.assertEqual(len(self.exchange.jobs), 2)
        self.assertEqual(self.progress, [(0, 5)])
        pieces = cutPieces(self.pcm, SPEECH)
        self.assertEqual(len(pieces), 5)
        self.assertEqual(self.exchange.jobs[0][0], pieces[0].wav())
        self.assertAlmostEqual(self.exchange.jobs[0][1], 10 + pieces[0].seconds, places=2)
        self.exchange.jobs[1][2].callback(answer("second", pieces[1].seconds))
        self.assertEqual(self.ordered, [])  # the first is not done yet
        self.assertEqual(len(self.exchange.jobs), 3)
        self.exchange.jobs[0][2].callback(answer("first", pieces[0].seconds))
        self.assertEqual(self.ordered, [(0, "first"), (1, "second")])
        for n, name in ((2, "third"), (4, "fifth"), (3, "fourth")):
            while len(self.exchange.jobs) <= n:
                self.fail("not sent")
            self.exchange.jobs[n][2].callback(answer(name, pieces[n].seconds))
        result = self.successResultOf(d)
        self.assertEqual(result.text, "first second third fourth fifth")
        self.assertEqual([o[0] for o in self.ordered], [0, 1, 2, 3, 4])
        self.assertEqual([p[0] for p in self.progress], [0, 1, 2, 3, 4, 5])
        starts = [s.start for s in result.segments]
        self.assertEqual(starts, sorted(starts))
        self.assertEqual(result.segments[2].start, round(pieces[1].start, 3))
        self.assertAlmostEqual(result.duration_s, len(self.pcm) / 32000, places=2)

    def test_retried(self) -> None:
        """
        A piece whose producer was lost (or none was free, or it timed out)
        is tried again after a backoff, and the job completes.
        """
        d = self.start()
        self.exchange.jobs[0][2].errback(Unavailable("producer lost"))
        self.assertEqual(len(self.exchange.jobs), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(self.exchange.jobs), 3)
        self.assertEqual(self.exchange.jobs[2][0], self.exchange.jobs[0][0])
        self.exchange.jobs[2][2].errback(NoProducer("none"))
        # Every producer is busy with this recording's other piece: the
        # piece waits for it, no try spent (however long that takes).
        self.clock.advance(5.0)
        self.assertEqual(len(self.exchange.jobs), 3)
        self.exchange.jobs[1][2].callback(Transcribed("x", "m", None, None))
        self.assertEqual(self.exchange.jobs[3][0], self.exchange.jobs[0][0])
        self.exchange.jobs[3][2].errback(TimedOut("slow"))
        self.clock.advance(2.0)
        while any(not j[2].called for j in self.exchange.jobs):
            for audio, _, job in list(self.exchange.jobs):
                if not job.called:
                    job.callback(Transcribed(str(len(self.exchange.jobs)), "m", None, None))
        self.assertEqual(len(self.successResultOf(d).segments), 5)

    def test_fewerProducersThanPieces(self) -> None:
        """
        One producer for a recording's pieces: those the farm finds no free
        producer for wait for the running one, however often, and the job
        completes (they do not spend their tries on it).
        """
        d = self.start()
        for _ in range(4):
            # The piece just sent finds no free producer; the one before it
            # still runs.
            self.exchange.jobs[-1][2].errback(NoProducer("none free"))
            self.clock.advance(100.0)
            self.assertNoResult(d)
            [running] = [job for _, _, job in self.exchange.jobs if not job.called]
            running.callback(Transcribed("x", "m", None, None))
        while any(not j[2].called for j in self.exchange.jobs):
            for audio, _, job in list(self.exchange.jobs):
                if not job.called:
                    job.callback(Transcribed("x", "m", None, None))
                    break
        self.assertEqual(len(self.successResultOf(d).segments), 5)

    def test_givesUp(self) -> None:
        """
        A piece that keeps failing fails the job after its tries, saying it
        was a piece; the other pieces in flight are cancelled.
        """
        d = self.start()
        for _ in range(4):
            self.exchange.jobs[-1 if len(self.exchange.jobs) > 2 else 0][2].errback(
                Unavailable("producer lost")
            )
            self.clock.advance(10)
        failure = self.failureResultOf(d, Unavailable)
        self.assertIn("producer lost (a piece of a recording cut into 5)", failure.value.message)
        self.assertEqual(self.exchange.cancelled, 1)

    def test_finalError(self) -> None:
        """
        An error retrying cannot help ends the job at once.
        """
        d = self.start()
        self.exchange.jobs[1][2].errback(BadInput("bad audio"))
        self.failureResultOf(d, BadInput)
        self.assertEqual(len(self.exchange.jobs), 2)
        self.assertEqual(self.exchange.cancelled, 1)

    def test_deadline(self) -> None:
        """
        No piece is given longer than the job's time left, and none is
        retried once it is past.
        """
        d = self.start(deadline=20.0)
        self.assertEqual(self.exchange.jobs[0][1], 20.0)
        self.clock.advance(19.8)
        self.exchange.jobs[0][2].errback(TimedOut("slow"))
        self.failureResultOf(d, TimedOut)

    def test_cancelled(self) -> None:
        """
        The request going away cancels every piece in flight.
        """
        d = self.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.exchange.cancelled, 2)


class Numbered(FakeExchange):
    """
    Each piece's text says which of the calls it was (they come in order).
    """

    async def transcribe(self, *args: Any, **kwargs: Any) -> Transcribed:
        await super().transcribe(*args, **kwargs)
        n = len(self.calls)
        return Transcribed(f"piece{n}", args[0], "en", 25.0, (TimedText(0.0, 2.0, f"piece{n}"),))


class RouteTests(APITestCase):
    maxUpload = 8 * 1024 * 1024
    BEARER = {"Authorization": f"Bearer {KEY}"}

    def setUp(self) -> None:
        super().setUp()
        self.exchange = Numbered()
        self.api.exchange = self.api.fanout.exchange = self.exchange
        self.api.fanout.isSpeech = SPEECH
        self.pcm = recording(*[("s", 24.5), ("q", 1.0)] * 2, ("s", 20))  # 71 s, 3 pieces

    def transcribe(self, fields: dict[str, str], path: str = "/v1/audio/transcriptions") -> Any:
        return self.postMultipart(
            path, fields, {"file": ("long.wav", pcmToWav(self.pcm, RATE))}, headers=self.BEARER
        )

    def test_verbose(self) -> None:
        """
        A recording over C{--fanout-above} goes out in pieces, each a WAV
        with its own deadline; the answer is stitched, times moved.
        """
        response, body = self.transcribe({"model": "whisper-1", "response_format": "verbose_json"})
        self.assertEqual(response.code, 200, body)
        answer = json.loads(body)
        self.assertEqual(answer["text"], "piece1 piece2 piece3")
        self.assertEqual(answer["duration"], 71.0)
        # Cut in the middle of each 1-second pause (on 30 ms frames).
        self.assertEqual([s["start"] for s in answer["segments"]], [0.0, 24.99, 50.49])
        self.assertEqual([c[4] for c in self.exchange.calls], ["wav"] * 3)
        # (decoded to 16 kHz through floats: a sample may be 1 off)
        self.assertEqual(len(wavPCM(self.exchange.calls[0][3])[0]), 833 * 960)
        # 60 s + 1 s per second of the piece.
        self.assertEqual(self.exchange.deadlines, [84.99, 85.5, 80.51])

    def test_short(self) -> None:
        """
        Below C{--fanout-above}, the upload goes out whole, as before.
        """
        self.pcm = self.pcm[: 50 * RATE * 2]
        response, body = self.transcribe({"model": "whisper-1"})
        self.assertEqual(json.loads(body), {"text": "piece1"})
        self.assertEqual(len(self.exchange.calls), 1)

    def test_stream(self) -> None:
        """
        With C{stream=true}: a progress event as each piece finishes, a delta
        for each piece's text in order, then the whole text.
        """
        response, body = self.transcribe({"model": "whisper-1", "stream": "true"})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.header(response, "content-type"), "text/event-stream; charset=utf-8")
        events = [json.loads(c[len("data: "):]) for c in body.decode().split("\n\n")[:-1]]
        self.assertEqual(events, [
            {"type": "privox.progress", "done": 0, "total": 3},
            {"type": "privox.progress", "done": 1, "total": 3},
            {"type": "transcript.text.delta", "delta": "piece1"},
            {"type": "privox.progress", "done": 2, "total": 3},
            {"type": "transcript.text.delta", "delta": " piece2"},
            {"type": "privox.progress", "done": 3, "total": 3},
            {"type": "transcript.text.delta", "delta": " piece3"},
            {"type": "transcript.text.done", "text": "piece1 piece2 piece3"},
        ])
        self.assertEqual(len(self.exchange.calls), 3)

    def test_streamKeptAlive(self) -> None:
        """
        While its pieces wait for producers, a streamed recording's events
        have an SSE comment every 15 s, which clients skip; none once the
        stream has ended.
        """
        pending = Pending()
        self.api.exchange = self.api.fanout.exchange = pending
        body, contentType = multipart(
            {"model": "whisper-1", "stream": "true"},
            {"file": ("long.wav", pcmToWav(self.pcm, RATE))},
        )
        answered = self.treq.request(
            "POST", "http://privox.test/v1/audio/transcriptions", data=body,
            headers={"Content-Type": contentType, **self.BEARER},
        )
        self.assertEqual(len(pending.jobs), 3)
        self.clock.pump([15, 15, 1])
        for n, (_, _, d) in enumerate(pending.jobs, 1):
            d.callback(Transcribed(f"piece{n}", "m", "en", 25.0))
        self.treq.flush()
        response = self.successResultOf(answered)
        content = self.treq.content(response)
        self.treq.flush()
        text = self.successResultOf(content).decode()
        self.assertEqual(text.count(": keep-alive\n\n"), 2)
        chunks = text.split("\n\n")
        self.assertEqual(chunks[1:3], [": keep-alive", ": keep-alive"])
        self.assertIn('"type":"transcript.text.done"', chunks[-2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_streamFails(self) -> None:
        """
        A failure after the first event ends the stream with an error event;
        one before it is an ordinary error answer.
        """
        self.exchange.error = NoProducer("no producer is free")
        self.api.fanout.tries = 1
        response, body = self.transcribe({"model": "whisper-1", "stream": "true"})
        self.assertEqual(response.code, 200)
        self.assertIn(b'"type":"error"', body)
        self.assertIn(b"no producer is free", body)

    def test_originalRoute(self) -> None:
        """
        The original C{/stt} fans out too.
        """
        response, body = self.transcribe({"key": KEY}, "/stt")
        self.assertEqual(body, b"piece1 piece2 piece3\n")


class SleepEngineTests(SynchronousTestCase):
    def test_spec(self) -> None:
        engine = createEngine(ModelSpec.parse("sleep:0"))
        engine.load()
        self.assertEqual(engine.name, "sleep:0")
        pcm = tonal(2.0)
        result = engine.transcribe(STTJob("sleep:0", None, "wav", 0), pcmToWav(pcm, RATE))
        self.assertEqual(result.text, sleepTranscript(pcm))
        self.assertEqual(result.duration_s, 2.0)
        self.assertEqual([(s.start, s.end) for s in result.segments], [(0.0, 2.0)])

    def test_refused(self) -> None:
        from privox.engines.base import ModelNotFound

        for model in ("fast", "-1"):
            self.assertRaises(ModelNotFound, SleepEngine(model).load)

    def test_sleepsAndStops(self) -> None:
        engine = SleepEngine("0.1")
        engine.load()
        job = STTJob("sleep:0.1", None, "wav", 0)
        started = time.monotonic()
        engine.transcribe(job, pcmToWav(quiet(2.0), RATE))
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        job.stop.set()
        started = time.monotonic()
        self.assertRaises(Cancelled, engine.transcribe, job, pcmToWav(quiet(60.0), RATE))
        self.assertLess(time.monotonic() - started, 0.1)


class KilledNodeTests(ProcessTestCase):
    """
    Real node processes (the sleep engine) behind an in-process farm.
    """

    timeout = 90

    async def startSleepNode(self, name: str, sttPort: int, slots: int) -> Any:
        node = self.spawn(
            f"node {name}", "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}",
            "--stt", SLEEP_MODEL, "--slots", str(slots), "--key", f"node-{name}",
            "--retry-max", "0.5", "--shutdown-grace", "1",
        )
        await node.waitFor(b"serving stt through", timeout=30)
        return node

    async def test_nodeKilledMidway(self) -> None:
        """
        A long recording fans out over two nodes; one is SIGKILLed with
        pieces in flight on it: they are tried again on the other, and the
        transcript completes with every piece, in order.
        """
        farm = await startFarm(self, "A", queue_timeout=20.0)
        doomed = await self.startSleepNode("doomed", farm.port("stt"), 2)
        await self.startSleepNode("survivor", farm.port("stt"), 2)
        await until(lambda: producerSessions(farm.farm) == 4, "both nodes joined", 20)
        exchange = FarmExchange([farm.entry()], reactor, deadline=60.0, rng=random.Random(1))
        self.addCleanup(exchange.stop)
        failed: list[str] = []

        class Watched:
            async def transcribe(self, *args: Any) -> Transcribed:
                try:
                    return await exchange.transcribe(*args)
                except Exception as e:
                    failed.append(str(e))
                    raise

        # 12 pieces of 25 s, 1.25 s each at the sleep engine's 0.05.
        pcm = recording(*[("s", 24.0), ("q", 1.0)] * 12)
        pieces = cutPieces(pcm)
        self.assertEqual(len(pieces), 12)
        killed: list[float] = []

        def progress(done: int, total: int) -> None:
            if done == 2 and not killed:
                killed.append(time.monotonic())
                doomed.transport.signalProcess(signal.SIGKILL)

        fanout = FanOut(Watched(), reactor, lambda f, *a: deferToThread(f, *a), atOnce=4,
                        backoff=0.2)
        started = time.monotonic()
        result = await fanout.transcribe(
            pcm, SLEEP_MODEL, None, 60.0, lambda seconds: 10 + seconds, progress=progress,
        )
        took = time.monotonic() - started
        self.assertTrue(killed)
        self.assertEqual(result.text, " ".join(sleepTranscript(p.pcm) for p in pieces))
        self.assertEqual([s.start for s in result.segments], [round(p.start, 3) for p in pieces])
        self.assertTrue(failed, "no piece was in flight on the killed node")
        reason = await doomed.whenEnded()
        self.assertEqual(getattr(reason, "signal", None), signal.SIGKILL)
        figures(
            f"fan-out, node SIGKILLed after 2 of 12 pieces: {len(failed)} piece(s) retried,"
            f" done in {took:.1f} s"
        )


class ProgressLineTests(SynchronousTestCase):
    def test_line(self) -> None:
        from privox.cli import progressLine

        self.assertEqual(progressLine(0, 4, 24), "[          ] 0/4 pieces")
        self.assertEqual(progressLine(2, 4, 24), "[#####     ] 2/4 pieces")
        self.assertEqual(progressLine(4, 4, 24), "[##########] 4/4 pieces")
        self.assertEqual(progressLine(1, 3, 12), " 1/3 pieces")
        self.assertEqual(progressLine(1, 3, 5), " 1/3")


class Terminal:
    """
    A stderr that is a terminal, recording what is drawn.
    """

    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, text: str) -> None:
        self.written.append(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


class CommandTests(TestCase):
    """
    C{privox stt} on a long file against privox-local with two slots of
    the sleep engine.
    """

    timeout = 60

    def setUp(self) -> Deferred[None]:
        from privox.local import LocalExchange, LocalSettings

        self.local = LocalExchange(LocalSettings(
            port=0, accounts="none", stt="sleep:0.01", tts="tone:x", slots=2,
            wyoming_listen="none",
        ), reactor)
        self.local.startService()
        self.addCleanup(self.local.stopService)
        return self.local.ready

    async def test_progressBar(self) -> None:
        """
        On a terminal, a bar of pieces done is drawn on stderr (then erased)
        and the text printed as usual; not on one, no bar.
        """
        import io
        import os

        from privox.cli import buildParser, runStt

        pcm = recording(*[("s", 24.0), ("q", 1.0)] * 4)
        path = os.path.abspath(self.mktemp()) + ".wav"
        with open(path, "wb") as f:
            f.write(pcmToWav(pcm, RATE))
        expected = " ".join(sleepTranscript(p.pcm) for p in cutPieces(pcm))
        args = buildParser({}).parse_args(["stt", path, "--api", self.local.url, "--key", "k"])
        for terminal in (Terminal(), io.StringIO()):
            out = io.StringIO()
            self.patch(sys, "stderr", terminal)
            self.patch(sys, "stdout", out)
            self.patch(os, "environ", dict(os.environ, TERM="xterm"))
            await runStt(reactor, args)
            if isinstance(terminal, Terminal):
                drawn = "".join(terminal.written)
                self.assertIn("0/4 pieces", drawn)
                self.assertIn("4/4 pieces", drawn)
                self.assertTrue(drawn.endswith("\r\x1b[K"), drawn[-20:])
                # Decoded through floats: a sample may differ; four pieces.
                self.assertEqual(len(out.getvalue().split()), 8)
            else:
                self.assertEqual(terminal.getvalue(), "")
                # /stt decodes the WAV as the stream did not.
                self.assertEqual(len(out.getvalue().split()), 8)
        self.assertTrue(expected)
