"""
L{privox.caption}: how captions are drawn (L{Screen}); the caption's life
(L{CaptionProtocol}) over whole utterances and over a live session, stdin
fed whole and byte by byte; the live session's machine with a fake socket
and a fake clock; and L{openLive} over a loopback socket, against the real
realtime WebSocket (its jobs faked) and against APIs that refuse it. The
command itself, end to end: tests/test_cli.py.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from privox import caption
from privox.api.exchange import Heard
from privox.api.realtime import RealtimeFactory, RealtimeResource
from privox.caption import (
    APPEND_BYTES,
    SETTLE,
    CaptionProtocol,
    LiveCaptioner,
    NoRealtime,
    Screen,
    UtteranceCaptioner,
    openLive,
)
from privox.client import CliError
from privox.utterances import Segmenter, Utterance
from privox.web import PrivateSite
from tests.test_realtime import MODELS, FakeAccess, FakeJobs

RATE = 16000
API = "http://api.example"
TIMEOUT = 30.0


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


def loud(seconds: float, value: int = 3000) -> bytes:
    return np.full(int(seconds * RATE), value, "<i2").tobytes()


def nonZero(frame: bytes) -> bool:
    return any(frame)


def started(ms: int) -> dict[str, Any]:
    return {"type": "input_audio_buffer.speech_started", "audio_start_ms": ms, "item_id": "item_1"}


def stopped(ms: int) -> dict[str, Any]:
    return {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms, "item_id": "item_1"}


def delta(text: str, whole: bool = True) -> dict[str, Any]:
    event = {"type": "conversation.item.input_audio_transcription.delta", "delta": text}
    if whole:
        event["text"] = text
    return event


def completed(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.input_audio_transcription.completed", "transcript": text}


class _Stdio(StringTransport):
    """
    What L{CaptionProtocol} sees of L{StandardIO}: closing stdout ends it.
    """

    def loseConnection(self) -> None:
        super().loseConnection()
        self.protocol.connectionLost(None)


class FakeSocket:
    """
    A live session's WebSocket: keeps the events sent.
    """

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.hungUp = False

    def sendEvent(self, kind: str, **fields: Any) -> None:
        self.sent.append({"type": kind, **fields})

    def hangUp(self) -> None:
        self.hungUp = True

    def types(self) -> list[str]:
        return [e["type"] for e in self.sent]

    def audio(self) -> bytes:
        appends = [e for e in self.sent if e["type"] == "input_audio_buffer.append"]
        return b"".join(base64.b64decode(e["audio"]) for e in appends)


class Listener:
    """
    What a captioner reports, in order.
    """

    def __init__(self) -> None:
        self.reports: list[tuple[str, Any]] = []

    def partial(self, text: str) -> None:
        self.reports.append(("partial", text))

    def line(self, text: str) -> None:
        self.reports.append(("line", text))

    def linesDone(self) -> None:
        self.reports.append(("linesDone", None))

    def failed(self, error: CliError) -> None:
        self.reports.append(("failed", str(error)))


def liveSession(clock: Clock, timeout: float = TIMEOUT) -> tuple[LiveCaptioner, FakeSocket]:
    """
    A live captioner whose session is open and has its settings.
    """
    captioner = LiveCaptioner(clock, API, {"input_audio_rate": RATE}, timeout)
    socket = FakeSocket()
    captioner.connected(socket)
    captioner.session.created()
    captioner.session.updated()
    return captioner, socket


# -- the screen ---------------------------------------------------------------


class ScreenTests(SynchronousTestCase):
    def test_notATerminal(self) -> None:
        """
        Not a terminal: finals only, a line each, no control characters.
        """
        screen = Screen()
        self.assertEqual(screen.partial("the quick"), b"")
        self.assertEqual(screen.line(" The quick\nbrown fox. "), b"The quick brown fox.\n")
        self.assertEqual(screen.line("  "), b"")
        self.assertEqual(screen.clear(), b"")

    def test_terminal(self) -> None:
        """
        On a terminal the hypothesis is drawn in place, dim; a final erases
        it and is written as a line; an empty final only erases it.
        """
        screen = Screen(80)
        self.assertEqual(screen.partial("the"), b"\r\x1b[2K\x1b[2mthe\x1b[0m")
        self.assertEqual(screen.partial("the quick"), b"\r\x1b[2K\x1b[2mthe quick\x1b[0m")
        self.assertEqual(screen.line("The quick fox."), b"\r\x1b[2KThe quick fox.\n")
        self.assertEqual(screen.line("Nothing drawn."), b"Nothing drawn.\n")
        self.assertEqual(screen.clear(), b"")
        screen.partial("uh")
        self.assertEqual(screen.line(""), b"\r\x1b[2K")
        screen.partial("uh")
        self.assertEqual(screen.partial(" "), b"\r\x1b[2K")
        self.assertEqual(screen.clear(), b"")

    def test_longHypothesis(self) -> None:
        """
        A hypothesis longer than the line shows its end, within the line.
        """
        screen = Screen(12)
        drawn = screen.partial("one two three four five")
        self.assertEqual(drawn, "\r\x1b[2K\x1b[2m… four five\x1b[0m".encode())
        self.assertEqual(
            screen.line("one two three four five"), b"\r\x1b[2Kone two three four five\n"
        )


# -- the caption's life, over whole utterances ------------------------------------


class UtteranceCaptionTests(SynchronousTestCase):
    """
    L{CaptionProtocol} over an L{UtteranceCaptioner} whose transcriptions
    finish when the test says.
    """

    def setUp(self) -> None:
        self.jobs: list[tuple[Utterance, Deferred[str]]] = []
        self.protocol = CaptionProtocol(
            UtteranceCaptioner(Segmenter(nonZero, minSpeechMs=30), self.transcribe), Screen()
        )
        self.transport = _Stdio()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    async def transcribe(self, utterance: Utterance) -> str:
        d: Deferred[str] = Deferred()
        self.jobs.append((utterance, d))
        return await d

    def speak(self, seconds: float = 0.3) -> None:
        self.protocol.dataReceived(loud(seconds) + silence(0.7))

    def test_linesInOrder(self) -> None:
        """
        Lines come out in the order of the utterances, however the
        transcriptions finish; empty ones print nothing.
        """
        for _ in range(3):
            self.speak()
        self.assertEqual(len(self.jobs), 3)
        self.jobs[2][1].callback("three")
        self.jobs[1][1].callback("  \n")
        self.assertEqual(self.transport.value(), b"")
        self.jobs[0][1].callback("one\nline")
        self.assertEqual(self.transport.value(), b"one line\nthree\n")
        self.protocol.readConnectionLost()
        self.assertEqual(self.successResultOf(self.protocol.done), None)
        self.assertTrue(self.transport.disconnecting)

    def test_byteByByte(self) -> None:
        """
        stdin a byte at a time cuts the same utterances as stdin whole.
        """
        pcm = loud(0.3) + silence(0.7) + loud(0.4) + silence(0.7)
        self.protocol.dataReceived(pcm)
        whole = [(u.start, u.pcm) for u, _ in self.jobs]
        self.assertEqual(len(whole), 2)
        self.setUp()
        for i in range(len(pcm)):
            self.protocol.dataReceived(pcm[i : i + 1])
        self.assertEqual([(u.start, u.pcm) for u, _ in self.jobs], whole)

    def test_endOfInputWaits(self) -> None:
        """
        At the end of input the last utterance is sent, and C{done} waits
        for every line.
        """
        self.speak()
        self.protocol.dataReceived(loud(0.3))
        self.protocol.readConnectionLost()
        self.assertEqual(len(self.jobs), 2)
        self.assertNoResult(self.protocol.done)
        self.jobs[1][1].callback("two")
        self.jobs[0][1].callback("one")
        self.assertEqual(self.transport.value(), b"one\ntwo\n")
        self.successResultOf(self.protocol.done)

    def test_failure(self) -> None:
        """
        A failed transcription ends it all: the lines before it are printed,
        the ones after it cancelled, C{done} fails with the error.
        """
        for _ in range(3):
            self.speak()
        self.jobs[1][1].errback(CliError("the key was not accepted (HTTP 401)"))
        self.jobs[0][1].callback("one")
        self.assertEqual(self.transport.value(), b"one\n")
        self.failureResultOf(self.protocol.done, CliError)
        self.assertTrue(self.jobs[2][1].called)  # cancelled
        self.protocol.dataReceived(loud(0.3) + silence(1.0))
        self.assertEqual(len(self.jobs), 3)

    def test_interrupt(self) -> None:
        """
        Ctrl-C sends the utterance under way, stops reading, and ends once
        its line is out.
        """
        self.protocol.dataReceived(loud(0.3))
        self.protocol.interrupt()
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(len(self.jobs), 1)
        self.protocol.dataReceived(loud(0.3) + silence(1.0))
        self.assertEqual(len(self.jobs), 1)
        self.jobs[0][1].callback("last words")
        self.assertEqual(self.transport.value(), b"last words\n")
        self.successResultOf(self.protocol.done)

    def test_interruptTwice(self) -> None:
        """
        A second Ctrl-C quits at once with status 130.
        """
        self.speak()
        self.protocol.readConnectionLost()  # Ctrl-C stopped arecord too
        self.protocol.interrupt()
        self.assertNoResult(self.protocol.done)
        self.protocol.interrupt()
        self.assertEqual(self.failureResultOf(self.protocol.done, SystemExit).value.code, 130)
        self.assertTrue(self.jobs[0][1].called)  # cancelled

    def test_stdoutClosed(self) -> None:
        """
        Nobody reading the lines (C{privox caption | head -1}): stop, quietly.
        """
        self.speak()
        self.protocol.writeConnectionLost()
        self.successResultOf(self.protocol.done)
        self.assertTrue(self.jobs[0][1].called)  # cancelled


# -- the caption's life, over a live session ------------------------------------------


class LiveCaptionTests(SynchronousTestCase):
    """
    L{CaptionProtocol} over a L{LiveCaptioner} whose socket and clock are
    fakes: what the terminal, or a pipe, gets.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.captioner, self.socket = liveSession(self.clock)

    def caption(self, width: int | None = 40) -> tuple[CaptionProtocol, _Stdio]:
        protocol = CaptionProtocol(self.captioner, Screen(width))
        transport = _Stdio()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def hear(self, *events: dict[str, Any]) -> None:
        for event in events:
            self.captioner.session.news(event)

    def test_onATerminal(self) -> None:
        """
        Partials are drawn in place, dim; each final replaces its partial
        as a line; the end of input commits, and once the API has had time
        to say the rest, stdout is closed.
        """
        protocol, transport = self.caption()
        pcm = loud(1.0) + silence(1.0)
        protocol.dataReceived(pcm)
        self.assertEqual(self.socket.audio(), pcm)
        self.hear(started(0), delta("the quick"), delta("the quick brown"))
        self.assertEqual(
            transport.value(),
            b"\r\x1b[2K\x1b[2mthe quick\x1b[0m\r\x1b[2K\x1b[2mthe quick brown\x1b[0m",
        )
        transport.clear()
        self.hear(stopped(1200), completed("The quick brown fox."))
        self.assertEqual(transport.value(), b"\r\x1b[2KThe quick brown fox.\n")
        transport.clear()
        protocol.readConnectionLost()
        self.assertEqual(self.socket.types()[-1], "input_audio_buffer.commit")
        self.clock.advance(SETTLE - 0.01)
        self.assertNoResult(protocol.done)
        self.clock.advance(1.0)
        self.successResultOf(protocol.done)
        self.assertTrue(self.socket.hungUp)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_notATerminal(self) -> None:
        """
        Into a pipe or a file: the finals only, whether stdin comes whole
        or byte by byte.
        """
        pcm = loud(0.25) + silence(0.05)
        outputs, sent = [], []
        for chunk in (len(pcm), 1):
            self.setUp()
            protocol, transport = self.caption(width=None)
            for i in range(0, len(pcm), chunk):
                protocol.dataReceived(pcm[i : i + chunk])
            self.hear(started(0), delta("hello"), completed("Hello there."))
            self.hear(started(100), delta("and"), delta("and you", whole=False), completed(" "))
            protocol.readConnectionLost()
            self.clock.advance(SETTLE + 0.2)  # the API spoke of 0.1 s of 0.3
            self.successResultOf(protocol.done)
            outputs.append(transport.value())
            sent.append(self.socket.audio())
        self.assertEqual(outputs, [b"Hello there.\n"] * 2)
        self.assertEqual(sent, [pcm] * 2)

    def test_interrupt(self) -> None:
        """
        Ctrl-C stops reading and commits; the utterance under way is still
        finished; a second Ctrl-C quits at once, its partial erased.
        """
        protocol, transport = self.caption()
        protocol.dataReceived(loud(0.5))
        self.hear(started(0), delta("last"))
        protocol.interrupt()
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.socket.types()[-1], "input_audio_buffer.commit")
        protocol.dataReceived(loud(0.5))
        self.assertEqual(len(self.socket.audio()), len(loud(0.5)))
        self.hear(delta("last words"))
        transport.clear()
        protocol.interrupt()
        self.assertEqual(self.failureResultOf(protocol.done, SystemExit).value.code, 130)
        self.assertTrue(self.socket.hungUp)
        self.assertEqual(transport.value(), b"\r\x1b[2K")
        self.hear(completed("Last words."))
        self.assertEqual(transport.value(), b"\r\x1b[2K")

    def test_failure(self) -> None:
        """
        An error from the API: the partial is erased, stdout closed, and
        C{done} fails with the API's reason.
        """
        protocol, transport = self.caption()
        protocol.dataReceived(loud(0.5))
        self.hear(started(0), delta("so"))
        transport.clear()
        self.captioner.session.error("no producer serves whisper:tiny.en")
        self.assertEqual(transport.value(), b"\r\x1b[2K")
        self.assertTrue(self.socket.hungUp)
        error = self.failureResultOf(protocol.done, CliError).value
        self.assertEqual(str(error), "no producer serves whisper:tiny.en")

    def test_dropped(self) -> None:
        protocol, transport = self.caption()
        self.captioner.session.closed(CliError("the Privox API dropped the connection"))
        error = self.failureResultOf(protocol.done, CliError).value
        self.assertEqual(str(error), "the Privox API dropped the connection")

    def test_stdoutClosed(self) -> None:
        protocol, transport = self.caption()
        protocol.dataReceived(loud(0.5))
        protocol.writeConnectionLost()
        self.successResultOf(protocol.done)
        self.assertTrue(self.socket.hungUp)


# -- the live session's machine ---------------------------------------------------------


class LiveCaptionerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.listener = Listener()

    def opening(self) -> tuple[LiveCaptioner, FakeSocket]:
        captioner = LiveCaptioner(self.clock, API, {"input_audio_rate": RATE}, TIMEOUT)
        socket = FakeSocket()
        captioner.connected(socket)
        return captioner, socket

    def live(self, timeout: float = TIMEOUT) -> tuple[LiveCaptioner, FakeSocket]:
        captioner, socket = liveSession(self.clock, timeout)
        captioner.attach(self.listener)
        return captioner, socket

    def test_opening(self) -> None:
        """
        Once the session is created its settings are sent; once they are
        taken it is ready.
        """
        captioner, socket = self.opening()
        captioner.session.created()
        self.assertEqual(
            socket.sent,
            [{"type": "transcription_session.update", "session": {"input_audio_rate": RATE}}],
        )
        self.assertNoResult(captioner.ready)
        captioner.session.updated()
        self.assertIs(self.successResultOf(captioner.ready), captioner)

    def test_settingsRefused(self) -> None:
        captioner, socket = self.opening()
        captioner.session.created()
        captioner.session.error("unknown language 'xx'")
        error = self.failureResultOf(captioner.ready, CliError).value
        self.assertEqual(str(error), "unknown language 'xx'")
        self.assertTrue(socket.hungUp)

    def test_closedWhileOpening(self) -> None:
        """
        An error before the session is created (a refused key) waits for
        the close, which says it with its status.
        """
        captioner, socket = self.opening()
        captioner.session.error("the key was not accepted")
        self.assertNoResult(captioner.ready)
        captioner.session.closed(CliError("the key was not accepted (HTTP 401)"))
        error = self.failureResultOf(captioner.ready, CliError).value
        self.assertEqual(str(error), "the key was not accepted (HTTP 401)")

    def test_cancelWhileOpening(self) -> None:
        captioner, socket = self.opening()
        captioner.ready.cancel()
        self.failureResultOf(captioner.ready, CancelledError)
        self.assertTrue(socket.hungUp)
        captioner.session.created()
        self.assertEqual(socket.sent, [])

    def test_audio(self) -> None:
        """
        Audio goes as base64 appends of at most L{APPEND_BYTES}.
        """
        captioner, socket = self.live()
        pcm = loud(2.5)
        captioner.feed(pcm)
        captioner.feed(b"\x01")
        sizes = [len(base64.b64decode(e["audio"])) for e in socket.sent[1:]]
        self.assertEqual(sizes, [APPEND_BYTES, APPEND_BYTES, len(pcm) - 2 * APPEND_BYTES, 1])
        self.assertEqual(socket.audio(), pcm + b"\x01")

    def test_reports(self) -> None:
        """
        Deltas are partials (their C{text}, or, from an API that sends none,
        the deltas so far); completions are lines.
        """
        captioner, socket = self.live()
        for event in [
            started(0), delta("the"), delta("the quick"), stopped(900), completed("The quick."),
            started(1000), delta("one ", whole=False), delta("two", whole=False),
            completed("One, two."),
            {"type": "input_audio_buffer.committed"}, {"type": "something.new"},
        ]:
            captioner.session.news(event)
        self.assertEqual(self.listener.reports, [
            ("partial", "the"), ("partial", "the quick"), ("line", "The quick."),
            ("partial", "one "), ("partial", "one two"), ("line", "One, two."),
        ])

    def test_endWaitsForTheOpenUtterance(self) -> None:
        """
        After the end, an utterance being heard is waited for.
        """
        captioner, socket = self.live()
        captioner.feed(loud(1.0))
        captioner.session.news(started(100))
        captioner.end()
        self.assertEqual(socket.types()[-1], "input_audio_buffer.commit")
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual(self.listener.reports, [])
        captioner.session.news(completed("Hello."))
        self.clock.advance(SETTLE - 0.01)
        self.assertEqual(self.listener.reports, [("line", "Hello.")])
        self.clock.advance(0.01)
        self.assertEqual(self.listener.reports, [("line", "Hello."), ("linesDone", None)])
        self.assertTrue(socket.hungUp)

    def test_endWaitsForTheRest(self) -> None:
        """
        Audio sent faster than it is spoken (a file): after the end, the
        API has the time to hear what it has not spoken of yet, at
        real-time pace, plus L{SETTLE}.
        """
        captioner, socket = self.live()
        captioner.feed(loud(10.0))
        captioner.end()
        self.clock.advance(10.0 + SETTLE - 0.01)
        self.assertEqual(self.listener.reports, [])
        captioner.session.news(started(2000))
        captioner.session.news(stopped(4000))
        captioner.session.news(completed("Four seconds in."))
        # The API said where it was: 6 s of audio are left to hear.
        self.clock.advance(6.0 + SETTLE - 0.01)
        self.assertEqual(self.listener.reports, [("line", "Four seconds in.")])
        captioner.session.news(started(9000))
        captioner.session.news(stopped(9800))
        captioner.session.news(completed("The end."))
        self.clock.advance(0.2 + SETTLE - 0.01)
        self.assertEqual(len(self.listener.reports), 2)
        self.clock.advance(0.01)
        self.assertEqual(self.listener.reports[-1], ("linesDone", None))

    def test_endSaidDone(self) -> None:
        """
        Privox says when all the audio committed is transcribed: no wait.
        """
        captioner, socket = self.live()
        captioner.feed(loud(10.0))
        captioner.end()
        captioner.session.news(started(2000))
        captioner.session.news(completed("Two seconds in."))
        captioner.session.news({"type": "privox.transcription.done"})
        self.clock.advance(0)
        self.assertEqual(
            self.listener.reports, [("line", "Two seconds in."), ("linesDone", None)]
        )
        self.assertTrue(socket.hungUp)

    def test_doneForEarlierAudio(self) -> None:
        """
        A "done" for a job that ended by itself (at the most one holds)
        does not end the caption: audio sent after it is still awaited.
        """
        captioner, socket = self.live()
        captioner.feed(loud(1.0))
        captioner.session.news({"type": "privox.transcription.done"})
        captioner.feed(loud(2.0))
        captioner.end()
        self.clock.advance(1.0)
        self.assertEqual(self.listener.reports, [])
        captioner.session.news({"type": "privox.transcription.done"})
        self.clock.advance(0)
        self.assertEqual(self.listener.reports, [("linesDone", None)])

    def test_endOfNothing(self) -> None:
        """
        With no audio sent, nothing is committed (the API would refuse it)
        and the lines are done at once.
        """
        captioner, socket = self.live()
        captioner.end()
        self.clock.advance(0)
        self.assertEqual(self.listener.reports, [("linesDone", None)])
        self.assertEqual(socket.types(), ["transcription_session.update"])

    def test_noAnswer(self) -> None:
        """
        An utterance left open for the timeout after the end fails.
        """
        captioner, socket = self.live(timeout=5.0)
        captioner.feed(loud(1.0))
        captioner.session.news(started(0))
        captioner.end()
        self.clock.advance(4.0)
        captioner.session.news(delta("still"))
        self.clock.advance(4.99)
        self.assertEqual(self.listener.reports, [("partial", "still")])
        self.clock.advance(0.01)
        self.assertEqual(
            self.listener.reports[-1],
            ("failed", f"no answer from the Privox API at {API} within 5 s"),
        )
        self.assertTrue(socket.hungUp)

    def test_error(self) -> None:
        captioner, socket = self.live()
        captioner.feed(loud(1.0))
        captioner.session.error("the exchange is slow to take the audio")
        self.assertEqual(
            self.listener.reports, [("failed", "the exchange is slow to take the audio")]
        )
        self.assertTrue(socket.hungUp)
        captioner.session.news(completed("late"))
        captioner.feed(loud(1.0))
        self.assertEqual(len(self.listener.reports), 1)
        self.assertEqual(len(socket.audio()), len(loud(1.0)))

    def test_dropped(self) -> None:
        captioner, socket = self.live()
        captioner.feed(loud(1.0))
        captioner.end()
        captioner.session.closed(CliError("dropped"))
        self.clock.advance(100)
        self.assertEqual(self.listener.reports, [("failed", "dropped")])

    def test_cancel(self) -> None:
        """
        A cancel hangs up; nothing more is reported.
        """
        captioner, socket = self.live()
        captioner.feed(loud(1.0))
        captioner.end()
        captioner.cancel()
        self.assertTrue(socket.hungUp)
        captioner.session.news(completed("late"))
        captioner.session.closed(CliError("closed"))
        self.clock.advance(100)
        self.assertEqual(self.listener.reports, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- over a socket -----------------------------------------------------------------------


def tone(seconds: float) -> bytes:
    n = np.arange(int(seconds * RATE))
    return (8000 * np.sin(2 * np.pi * 440 * n / RATE)).astype("<i2").tobytes()


class Refusing(Resource):
    """
    An API whose C{/v1/realtime} answers C{code}.
    """

    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return b"no"


class OpenLiveTests(TestCase):
    """
    L{openLive} over a loopback socket: against the real realtime
    WebSocket, its jobs and keys faked; against APIs that refuse it; and
    where nothing answers.
    """

    timeout = 30

    def listen(self, site: Any) -> str:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def realtime(self) -> tuple[str, FakeJobs, RealtimeFactory]:
        jobs = FakeJobs()
        factory = RealtimeFactory(jobs, FakeAccess(), MODELS, reactor)  # type: ignore[arg-type]
        return self.listen(PrivateSite(RealtimeResource(factory))), jobs, factory

    async def test_session(self) -> None:
        """
        The session takes the key, the quality and language asked for and
        16 kHz audio as it is; the job's pieces come back as partials and
        lines; the end commits it, and once the job is done the session
        is closed.
        """
        self.patch(caption, "SETTLE", 0.05)
        api, jobs, factory = self.realtime()
        captioner = await openLive(reactor, api, "k1", 10.0, "fast", "en")
        listener = Listener()
        captioner.attach(listener)
        audio = tone(0.5)
        captioner.feed(audio[:1001])
        captioner.feed(audio[1001:])
        for _ in range(200):
            if jobs.jobs and len(jobs.jobs[0].audio) == len(audio):
                break
            await deferLater(reactor, 0.01, lambda: None)
        [job] = jobs.jobs
        self.assertEqual([c.key for c in jobs.callers], ["k1"])
        self.assertEqual((job.model, job.language), (MODELS.openaiSttModel("fast", "en"), "en"))
        self.assertEqual(bytes(job.audio), audio)
        job.heard(Heard("hello", False, 0.0, 0.3))
        job.heard(Heard("hello world", True, 0.0, 0.5))
        captioner.end()
        for _ in range(200):
            if job.ended:
                break
            await deferLater(reactor, 0.01, lambda: None)
        job.finish("hello world")
        for _ in range(200):
            if listener.reports and listener.reports[-1][0] == "linesDone":
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(
            listener.reports,
            [("partial", "hello"), ("line", "hello world"), ("linesDone", None)],
        )
        await captioner.close()
        for _ in range(100):
            if not factory.sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.sessions, set())

    async def test_refusedKey(self) -> None:
        api, jobs, factory = self.realtime()
        with self.assertRaises(CliError) as raised:
            await openLive(reactor, api, "revoked", 10.0)
        self.assertEqual(str(raised.exception), "the key was not accepted (HTTP 401)")

    async def test_settingsRefused(self) -> None:
        api, jobs, factory = self.realtime()
        with self.assertRaises(CliError) as raised:
            await openLive(reactor, api, "k", 10.0, language="Klingon")
        self.assertIn("Klingon", str(raised.exception))

    async def test_noRealtime(self) -> None:
        """
        An API without C{/v1/realtime} (404), or one behind a proxy that
        drops the upgrade (426); other refusals are errors.
        """
        for code in (404, 426):
            api = self.listen(Site(Refusing(code)))
            with self.assertRaises(NoRealtime) as raised:
                await openLive(reactor, api, "k", 10.0)
            self.assertEqual(
                str(raised.exception),
                f"the Privox API at {api} has no live transcription (HTTP {code})",
            )
        api = self.listen(Site(Refusing(503)))
        with self.assertRaises(CliError) as raised:
            await openLive(reactor, api, "k", 10.0)
        self.assertNotIsInstance(raised.exception, NoRealtime)
        self.assertEqual(str(raised.exception), "service unavailable (HTTP 503)")

    async def test_unreachable(self) -> None:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        api = f"http://127.0.0.1:{port.getHost().port}"
        await port.stopListening()
        with self.assertRaises(CliError) as raised:
            await openLive(reactor, api, "k", 10.0)
        self.assertEqual(
            str(raised.exception), f"cannot reach the Privox API at {api}: connection refused"
        )

    async def test_noAnswer(self) -> None:
        api = self.listen(Factory.forProtocol(Protocol))
        with self.assertRaises(CliError) as raised:
            await openLive(reactor, api, "k", 0.3)
        self.assertEqual(
            str(raised.exception), f"no answer from the Privox API at {api} within 0.3 s"
        )
