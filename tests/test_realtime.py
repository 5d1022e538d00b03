"""
The realtime transcription WebSocket (C{GET /v1/realtime}): its settings
and resampling; its protocol over a real loopback socket with autobahn's
own Twisted client, the jobs faked (events and their order, items, deltas,
commits, failures, keys, limits); the route in the Klein app, through the
real L{LiveJobs}; and end to end against a whole L{LocalExchange}, a
sentence spoken by Piper sent in 100 ms chunks at real-time pace, captions
coming back before it ends.
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any, Callable

import numpy as np
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from privox.api.access import Caller, PolicyAccess
from privox.api.app import PrivoxAPI
from privox.api.errors import ApiError, NoProducer, Unauthorized, Unprocessable
from privox.api.exchange import Heard, Transcribed
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.api.realtime import (
    MAX_PENDING_SECONDS,
    RETRY_AFTER,
    RealtimeFactory,
    RealtimeResource,
    Resampler,
    Settings,
    updated,
)
from privox.keys import OpenPolicy, keyId
from privox.web import PrivateSite
from tests.test_api_app import FakeExchange

MODELS = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES)
DEFAULTS = Settings("whisper-1", None, "", 24000, MODELS.openaiSttModel("whisper-1", None))


def tone(seconds: float, rate: int, hz: float = 440.0) -> bytes:
    n = np.arange(int(seconds * rate))
    return (8000 * np.sin(2 * math.pi * hz * n / rate)).astype("<i2").tobytes()


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        described = DEFAULTS.describe("sess_1")
        self.assertEqual(described["input_audio_format"], "pcm16")
        self.assertEqual(described["input_audio_rate"], 24000)
        self.assertEqual(
            described["input_audio_transcription"],
            {"model": "whisper-1", "language": None, "prompt": ""},
        )
        self.assertEqual(described["privox_model"], "whisper:tiny.en")

    def test_update(self) -> None:
        settings = updated(DEFAULTS, {
            "input_audio_format": "pcm16",
            "input_audio_rate": 16000,
            "input_audio_transcription": {"model": "fast", "language": "French", "prompt": "hi"},
            "turn_detection": {"type": "server_vad"},
        }, MODELS)
        self.assertEqual(settings.rate, 16000)
        self.assertEqual((settings.model, settings.language, settings.prompt), ("fast", "fr", "hi"))
        self.assertEqual(settings.served, MODELS.openaiSttModel("fast", "fr"))
        # What an update does not name stays.
        self.assertEqual(updated(settings, {}, MODELS), settings)
        self.assertEqual(updated(settings, {"input_audio_transcription": None}, MODELS), settings)
        # A Privox model name is taken as it is.
        self.assertEqual(
            updated(DEFAULTS, {"input_audio_transcription": {"model": "vosk:ko"}}, MODELS).served,
            "vosk:ko",
        )

    def test_refused(self) -> None:
        for session, kind in [
            ({"input_audio_format": "g711_ulaw"}, Unprocessable),
            ({"input_audio_rate": 44100}, Unprocessable),
            ({"input_audio_rate": True}, Unprocessable),
            ({"input_audio_transcription": {"model": "gpt-9"}}, Unprocessable),
            ({"input_audio_transcription": {"language": "Klingon"}}, Unprocessable),
            ({"input_audio_transcription": {"model": 3}}, ApiError),
            ({"input_audio_transcription": "whisper-1"}, ApiError),
            ("session", ApiError),
        ]:
            self.assertRaises(kind, updated, DEFAULTS, session, MODELS)


class ResamplerTests(SynchronousTestCase):
    def test_24kHz(self) -> None:
        """
        24 kHz in chunks that split samples comes out as 16 kHz of the same
        length, the tone kept.
        """
        audio = tone(1.0, 24000)
        resampler = Resampler(24000)
        out = b"".join(resampler.convert(audio[i : i + 4801]) for i in range(0, len(audio), 4801))
        out += resampler.flush()
        samples = np.frombuffer(out, "<i2")
        self.assertLess(abs(len(samples) - 16000), 32)
        spectrum = np.abs(np.fft.rfft(samples))
        self.assertLess(abs(int(np.argmax(spectrum)) * 16000 / len(samples) - 440), 3)
        # After a flush it starts afresh.
        self.assertEqual(len(resampler.convert(tone(0.3, 24000))) // 2 + len(resampler.flush()) // 2,
                         int(0.3 * 16000))

    def test_16kHz(self) -> None:
        audio = tone(0.1, 16000)
        resampler = Resampler(16000)
        self.assertEqual(resampler.convert(audio[:101]) + resampler.convert(audio[101:]), audio)
        self.assertEqual(resampler.flush(), b"")


# -- fakes of LiveJobs and Access ----------------------------------------------------


class FakeTranscription:
    def __init__(self, model: str, language: str | None, heard: Callable[[Heard], None]) -> None:
        self.model = model
        self.language = language
        self.heard = heard
        self.audio = bytearray()
        self.ended = False
        self.cancelled = False
        self.done: Deferred[Transcribed] = Deferred()

    def write(self, pcm: bytes) -> None:
        assert not self.ended and not self.cancelled
        self.audio += pcm

    def end(self) -> None:
        self.ended = True

    def cancel(self) -> None:
        self.cancelled = True
        if not self.done.called:
            self.done.errback(ApiError("cancelled"))

    def finish(self, text: str = "") -> None:
        self.done.callback(Transcribed(text, self.model, self.language, len(self.audio) / 32000))


class FakeJobs:
    def __init__(self) -> None:
        self.maxSeconds = 300.0
        self.callers: list[Caller] = []
        self.jobs: list[FakeTranscription] = []
        self.gate: Deferred[None] | None = None
        self.refuse: ApiError | None = None

    async def transcribe(
        self, caller: Caller, model: str, language: str | None, heard: Callable[[Heard], None],
        need: float | None = None,
    ) -> FakeTranscription:
        self.callers.append(caller)
        if self.gate is not None:
            await self.gate
        if self.refuse is not None:
            refused, self.refuse = self.refuse, None
            raise refused
        job = FakeTranscription(model, language, heard)
        self.jobs.append(job)
        return job


class FakeAccess:
    keyExample = None
    #: While set, keys wait for it to fire before they are checked.
    gate: Deferred[None] | None = None

    async def authorize(self, key: str | None) -> Caller:
        if self.gate is not None:
            await self.gate
        if key == "revoked":
            raise Unauthorized("the key was not accepted")
        return Caller(key, key or "anonymous")


# -- a client --------------------------------------------------------------------------


class Client(WebSocketClientProtocol):
    """
    A realtime client: sends events, keeps those it is sent.
    """

    factory: Any

    def onConnect(self, response: Any) -> None:
        self.protocolChosen = response.protocol

    def onOpen(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.events.append(json.loads(payload))
        self._check()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(Exception(f"not opened: {code} {reason}"))
            return
        self.closed.callback((code, reason))
        self._check()

    def _check(self) -> None:
        for entry in list(self._waiting):
            if entry[0]():
                self._waiting.remove(entry)
                entry[1].callback(None)

    def send(self, kind: str, **fields: Any) -> None:
        self.sendMessage(json.dumps({"type": kind, **fields}).encode(), isBinary=False)

    def append(self, pcm: bytes) -> None:
        self.send("input_audio_buffer.append", audio=base64.b64encode(pcm).decode())

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        if condition():
            return
        d: Deferred[None] = Deferred()
        entry = (condition, d)
        self._waiting.append(entry)
        d.addTimeout(timeout, reactor)
        await d

    async def count(self, kind: str, n: int = 1) -> list[dict[str, Any]]:
        await self.until(lambda: len(self.of(kind)) >= n)
        return self.of(kind)


async def connect(
    port: int, path: str = "/v1/realtime?intent=transcription",
    protocols: list[str] | None = None, headers: dict[str, str] | None = None,
) -> Client:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=protocols or [], headers=headers or {}
    )
    factory.protocol = Client
    factory.opened = Deferred()
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    reactor.connectTCP("127.0.0.1", port, factory)
    client: Client = await factory.opened.addTimeout(10, reactor)
    return client


async def tick(seconds: float = 0.05) -> None:
    await deferLater(reactor, seconds, lambda: None)


class ShiftedClock:
    """
    The reactor's clock, its C{seconds} moved on by hand (its calls are
    the reactor's): time passes for a session without a test waiting.
    """

    def __init__(self) -> None:
        self.shift = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.shift

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kwargs)


class ProtocolTests(TestCase):
    """
    Sessions over a loopback socket, served by fake jobs.
    """

    timeout = 30

    def setUp(self) -> None:
        self.jobs = FakeJobs()
        self.access = FakeAccess()
        self.factory = RealtimeFactory(self.jobs, self.access, MODELS, reactor)  # type: ignore[arg-type]
        self.port = reactor.listenTCP(0, PrivateSite(RealtimeResource(self.factory)), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clients: list[Client] = []

    def tearDown(self) -> Any:
        closing = []
        for client in self.clients:
            if client.state != client.STATE_CLOSED:
                client.dropConnection(abort=True)
            closing.append(client.closed)
        return Deferred.fromCoroutine(self._waitClosed(closing))

    async def _waitClosed(self, closing: list[Deferred[Any]]) -> None:
        for d in closing:
            await d
        # The server's side of each socket, too.
        for _ in range(100):
            if not self.factory.sessions:
                return
            await tick(0.01)

    async def open(self, **kwargs: Any) -> Client:
        client = await connect(self.port.getHost().port, **kwargs)
        self.clients.append(client)
        await client.count("transcription_session.created")
        return client

    async def job(self, n: int = 1) -> FakeTranscription:
        for _ in range(200):
            if len(self.jobs.jobs) >= n:
                return self.jobs.jobs[n - 1]
            await tick(0.01)
        raise AssertionError("no job started")

    async def test_created(self) -> None:
        client = await self.open()
        [created] = client.events
        session = created["session"]
        self.assertTrue(session["id"].startswith("sess_"))
        self.assertTrue(created["event_id"].startswith("event_"))
        self.assertEqual(session["input_audio_format"], "pcm16")
        self.assertEqual(session["input_audio_transcription"]["model"], "whisper-1")
        self.assertIsNone(session["input_audio_transcription"]["language"])
        self.assertEqual(self.jobs.callers, [])

    async def test_update(self) -> None:
        client = await self.open()
        client.send("transcription_session.update", session={
            "input_audio_format": "pcm16", "input_audio_rate": 16000,
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
        })
        [updatedEvent] = await client.count("transcription_session.updated")
        session = updatedEvent["session"]
        self.assertEqual(session["input_audio_rate"], 16000)
        self.assertEqual(session["input_audio_transcription"]["language"], "en")
        self.assertEqual(session["privox_model"], "whisper:tiny.en")
        self.assertEqual(session["id"], client.events[0]["session"]["id"])
        # A bad one changes nothing and says why, with the client's event id.
        client.send("transcription_session.update", event_id="mine",
                    session={"input_audio_transcription": {"model": "gpt-9"}})
        [error] = await client.count("error")
        self.assertEqual(error["error"]["type"], "unsupported")
        self.assertEqual(error["error"]["event_id"], "mine")
        self.assertIn("gpt-9", error["error"]["message"])
        # 16 kHz audio goes to the job as it is.
        audio = tone(0.2, 16000)
        client.append(audio)
        job = await self.job()
        await tick()
        self.assertEqual(bytes(job.audio), audio)
        self.assertEqual((job.model, job.language), ("whisper:tiny.en", "en"))

    async def test_transcript(self) -> None:
        """
        A job starts at the first append; its audio reaches it at 16 kHz;
        each hypothesis is a delta, each final an item committed and
        completed; each utterance a new item.
        """
        client = await self.open()
        client.append(tone(0.5, 24000))
        client.append(tone(0.5, 24000))
        job = await self.job()
        await tick()
        self.assertLess(abs(len(job.audio) // 2 - 16000), 32)
        self.assertEqual(self.jobs.callers, [Caller(None, "anonymous")])
        job.heard(Heard("hello", False, 0.2, 0.6))
        job.heard(Heard(" hello wor", False, 0.2, 0.9))
        job.heard(Heard("hello world", False, 0.2, 1.0))
        job.heard(Heard("hello world", False, 0.2, 1.0))  # no news: no event
        job.heard(Heard("yellow world", False, 0.2, 1.1))
        job.heard(Heard("yellow world is", False, 0.2, 1.2))
        job.heard(Heard("Hello, world.", True, 0.2, 1.4))
        job.heard(Heard("again", False, 2.0, 2.3))
        job.heard(Heard("Again!", True, 2.0, 2.5))
        await client.count("conversation.item.input_audio_transcription.completed", 2)
        self.assertEqual(client.types()[1:], [
            "input_audio_buffer.speech_started",
            *["conversation.item.input_audio_transcription.delta"] * 5,
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
            "input_audio_buffer.speech_started",
            "conversation.item.input_audio_transcription.delta",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
        ])
        deltas = client.of("conversation.item.input_audio_transcription.delta")
        self.assertEqual(
            [(d["delta"], d["text"]) for d in deltas],
            # A hypothesis's last word may change: it waits (AppendOnly).
            [("", "hello"), ("hello", "hello wor"), ("", "hello world"),
             ("", "yellow world"), ("", "yellow world is"), ("", "again")],
        )
        first, second = client.of("conversation.item.input_audio_transcription.completed")
        self.assertEqual((first["transcript"], second["transcript"]), ("Hello, world.", "Again!"))
        self.assertNotEqual(first["item_id"], second["item_id"])
        self.assertTrue(first["item_id"].startswith("item_"))
        self.assertEqual({d["item_id"] for d in deltas[:5]}, {first["item_id"]})
        self.assertEqual(deltas[5]["item_id"], second["item_id"])
        self.assertEqual({d["content_index"] for d in deltas}, {0})
        committed = client.of("input_audio_buffer.committed")
        self.assertEqual([c["item_id"] for c in committed], [first["item_id"], second["item_id"]])
        self.assertEqual([c["previous_item_id"] for c in committed], [None, first["item_id"]])
        started = client.of("input_audio_buffer.speech_started")
        self.assertEqual([s["audio_start_ms"] for s in started], [200, 2000])
        self.assertEqual(
            [s["audio_end_ms"] for s in client.of("input_audio_buffer.speech_stopped")], [1400, 2500]
        )
        self.assertEqual(len({e["event_id"] for e in client.events}), len(client.events))
        self.assertFalse(job.ended)

    async def test_commit(self) -> None:
        """
        A commit ends the job: its last finals still come; audio that comes
        meanwhile starts the next job once it is done, its times running
        on from the first's.
        """
        client = await self.open()
        client.append(tone(1.0, 24000))
        client.send("input_audio_buffer.commit")
        job = await self.job()
        await tick()
        self.assertTrue(job.ended)
        self.assertLess(abs(len(job.audio) // 2 - 16000), 32)
        client.append(tone(0.5, 24000))  # kept for the next job
        await tick()
        self.assertEqual(len(self.jobs.jobs), 1)
        job.heard(Heard("the end", True, 0.1, 0.9))
        job.finish("the end")
        # All the audio committed is transcribed: a client that ends may.
        [done] = await client.count("privox.transcription.done")
        second = await self.job(2)
        await tick()
        self.assertLess(abs(len(second.audio) // 2 - 8000), 32)
        self.assertFalse(second.ended)
        second.heard(Heard("more", True, 0.1, 0.4))
        [_, completed] = await client.count("conversation.item.input_audio_transcription.completed", 2)
        self.assertEqual(completed["transcript"], "more")
        # The second job's times follow the first's audio.
        self.assertEqual(client.of("input_audio_buffer.speech_started")[1]["audio_start_ms"], 1100)
        # A commit with nothing to commit is an error.
        client.send("input_audio_buffer.commit")
        second.finish("more")
        client.send("input_audio_buffer.commit")
        [error] = await client.count("error")
        self.assertEqual(error["error"]["type"], "invalid_request_error")
        self.assertIn("empty", error["error"]["message"])

    async def test_commitWhileStarting(self) -> None:
        """
        A commit before the job has started ends it as soon as it starts,
        with all its audio.
        """
        self.jobs.gate = Deferred()
        client = await self.open()
        client.send("transcription_session.update", session={"input_audio_rate": 16000})
        client.append(tone(0.2, 16000))
        client.append(tone(0.2, 16000))
        client.send("input_audio_buffer.commit")
        await client.count("transcription_session.updated")
        await tick()
        self.assertEqual(self.jobs.jobs, [])
        self.jobs.gate.callback(None)
        job = await self.job()
        await tick()
        self.assertEqual(len(job.audio), 2 * 2 * 3200)
        self.assertTrue(job.ended)

    async def test_openItemCompletedAtEnd(self) -> None:
        """
        A job that ends with an utterance still open completes it with its
        last hypothesis; one whose engine said nothing on the way gives
        its whole transcript.
        """
        client = await self.open()
        client.append(tone(0.2, 24000))
        client.send("input_audio_buffer.commit")
        job = await self.job()
        job.heard(Heard("so far", False, 0.0, 0.2))
        job.finish("so far")
        [completed] = await client.count("conversation.item.input_audio_transcription.completed")
        self.assertEqual(completed["transcript"], "so far")
        client.append(tone(0.2, 24000))
        client.send("input_audio_buffer.commit")
        job = await self.job(2)
        job.finish("  the whole   thing ")
        [_, completed] = await client.count("conversation.item.input_audio_transcription.completed", 2)
        self.assertEqual(completed["transcript"], "the whole thing")

    async def test_clear(self) -> None:
        client = await self.open()
        client.send("input_audio_buffer.clear")
        await client.count("input_audio_buffer.cleared")
        client.append(tone(0.2, 24000))
        job = await self.job()
        job.heard(Heard("drop", False, 0.0, 0.1))
        await client.count("conversation.item.input_audio_transcription.delta")
        client.send("input_audio_buffer.clear")
        await client.count("input_audio_buffer.cleared", 2)
        self.assertTrue(job.ended)
        job.heard(Heard("dropped", True, 0.0, 0.2))
        job.finish("dropped")
        client.append(tone(0.2, 24000))
        second = await self.job(2)
        second.heard(Heard("kept", True, 0.0, 0.2))
        [completed] = await client.count("conversation.item.input_audio_transcription.completed")
        self.assertEqual(completed["transcript"], "kept")

    async def test_failure(self) -> None:
        """
        A job that fails is an error; audio is dropped until the client
        commits (or the back-off is over: test_failureBacksOff); then the
        next append starts a job again.
        """
        self.jobs.refuse = NoProducer("no producer serves whisper:tiny.en")
        client = await self.open()
        client.append(tone(0.2, 24000))
        [error] = await client.count("error")
        self.assertEqual((error["error"]["type"], error["error"]["code"]), ("no_capacity", "no_capacity"))
        client.append(tone(0.2, 24000))
        await tick()
        self.assertEqual(len(self.jobs.callers), 1)
        client.send("input_audio_buffer.commit")
        client.append(tone(0.2, 24000))
        job = await self.job()
        job.done.errback(ApiError("the producer was lost"))
        [_, error] = await client.count("error", 2)
        self.assertEqual(error["error"]["message"], "the producer was lost")
        self.assertTrue(job.cancelled)

    async def test_failureBacksOff(self) -> None:
        """
        A client that never commits (server VAD) is heard again after a
        failure: audio is dropped for RETRY_AFTER from it, without a new
        job or error; then the next append starts a job, its audio with
        it. Each failure backs off again: one error, one try a back-off.
        """
        clock = ShiftedClock()
        self.factory.clock = clock  # type: ignore[assignment]
        self.jobs.refuse = NoProducer("no producer serves whisper:tiny.en")
        client = await self.open()
        updates = 0

        async def handled() -> None:
            # What the client sent before is handled once this is answered.
            nonlocal updates
            updates += 1
            client.send("transcription_session.update", session={"input_audio_rate": 16000})
            await client.count("transcription_session.updated", updates)

        await handled()
        client.append(tone(0.2, 16000))
        [error] = await client.count("error")
        self.assertEqual(error["error"]["code"], "no_capacity")
        # Within the back-off: dropped, no try, no error.
        clock.shift += RETRY_AFTER - 0.5
        for _ in range(3):
            client.append(tone(0.1, 16000))
        await handled()
        self.assertEqual((len(self.jobs.callers), len(client.of("error"))), (1, 1))
        # After it: the next append starts a job, with its audio.
        clock.shift += 0.5
        audio = tone(0.3, 16000, hz=300)
        client.append(audio)
        job = await self.job()
        await handled()
        self.assertEqual(len(self.jobs.callers), 2)
        self.assertEqual(bytes(job.audio), audio)
        client.append(audio)
        await handled()
        self.assertEqual(bytes(job.audio), audio * 2)

        # It fails (the exchange's stream idle timeout): one error, a new
        # back-off counted from the failure.
        clock.shift += 60
        job.done.errback(ApiError("the stream was idle"))
        [_, error] = await client.count("error", 2)
        self.assertEqual(error["error"]["message"], "the stream was idle")
        self.assertTrue(job.cancelled)
        clock.shift += RETRY_AFTER - 0.5
        client.append(audio)
        await handled()
        self.assertEqual((len(self.jobs.callers), len(client.of("error"))), (2, 2))
        # A try that fails again backs off again: one error, one try.
        clock.shift += 0.5
        self.jobs.refuse = NoProducer("no producer serves whisper:tiny.en")
        for _ in range(3):
            client.append(audio)
        await handled()
        self.assertEqual((len(self.jobs.callers), len(client.of("error"))), (3, 3))
        clock.shift += RETRY_AFTER
        client.append(audio)
        second = await self.job(2)
        await handled()
        self.assertEqual(bytes(second.audio), audio)
        self.assertEqual((len(self.jobs.callers), len(client.of("error"))), (4, 3))
        second.heard(Heard("heard again", True, 0.0, 0.3))
        [completed] = await client.count("conversation.item.input_audio_transcription.completed")
        self.assertEqual(completed["transcript"], "heard again")

    async def test_closeEndsJob(self) -> None:
        """
        A client that goes away ends its job: what it sent is paid for.
        """
        client = await self.open()
        client.append(tone(0.2, 24000))
        job = await self.job()
        client.sendClose()
        await client.closed
        for _ in range(100):
            if job.ended:
                break
            await tick(0.01)
        self.assertTrue(job.ended)
        self.assertFalse(job.cancelled)
        job.finish("nobody reads this")

    async def test_closeWhileStarting(self) -> None:
        self.jobs.gate = Deferred()
        client = await self.open()
        client.append(tone(0.2, 24000))
        await tick()
        client.sendClose()
        await client.closed
        await tick()
        self.jobs.gate.callback(None)
        job = await self.job()
        self.assertTrue(job.cancelled)
        self.assertEqual(len(job.audio), 0)

    async def test_rollover(self) -> None:
        """
        A job is ended at the longest a job may be; what follows goes to
        the next.
        """
        self.jobs.maxSeconds = 0.5
        client = await self.open()
        client.send("transcription_session.update", session={"input_audio_rate": 16000})
        for _ in range(8):
            client.append(tone(0.1, 16000))
        job = await self.job()
        for _ in range(100):
            if job.ended:
                break
            await tick(0.01)
        await tick()
        self.assertTrue(job.ended)
        self.assertEqual(len(job.audio), 16000)
        job.finish("")
        second = await self.job(2)
        await tick()
        self.assertEqual(len(second.audio), 3 * 3200)
        self.assertEqual([e for e in client.types() if e == "error"], [])

    async def test_keys(self) -> None:
        """
        A key in the Authorization header, or in the subprotocol browsers
        can send (the realtime subprotocol is echoed); a refused key gets
        an error and the socket closed with 4401.
        """
        client = await self.open(headers={"Authorization": "Bearer k1"})
        client.append(tone(0.1, 24000))
        await self.job()
        client = await self.open(protocols=["realtime", "openai-insecure-api-key.k2", "openai-beta.realtime-v1"])
        self.assertEqual(client.protocolChosen, "realtime")
        client.append(tone(0.1, 24000))
        await self.job(2)
        self.assertEqual([c.key for c in self.jobs.callers], ["k1", "k2"])

        client = await connect(self.port.getHost().port, headers={"Authorization": "Bearer revoked"})
        self.clients.append(client)
        code, reason = await client.closed
        self.assertEqual(code, 4401)
        [error] = client.events
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["error"]["code"], "invalid_api_key")

    async def test_early(self) -> None:
        """
        What a client sends before its key is checked is kept, and handled
        in order once the session is created; after a refusal nothing is.
        """
        self.access.gate = Deferred()
        client = await connect(self.port.getHost().port)
        self.clients.append(client)
        client.send("transcription_session.update", session={"input_audio_rate": 16000})
        client.append(tone(0.1, 16000))
        await tick()
        self.assertEqual(client.events, [])
        self.access.gate.callback(None)
        job = await self.job()
        await tick()
        self.assertEqual(client.types(), ["transcription_session.created", "transcription_session.updated"])
        self.assertEqual(bytes(job.audio), tone(0.1, 16000))

        self.access.gate = Deferred()
        client = await connect(self.port.getHost().port, headers={"Authorization": "Bearer revoked"})
        self.clients.append(client)
        client.append(tone(0.1, 16000))
        self.access.gate.callback(None)
        code, _ = await client.closed
        self.assertEqual((code, client.types()), (4401, ["error"]))
        self.assertEqual(len(self.jobs.callers), 1)

    async def test_logs(self) -> None:
        """
        A session's log line names the key by its keyId only; no line holds
        the key, its text or an address, even when the handshake quoting the
        key is refused.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        secret = "pvx_secret-key-1"
        doubled = [f"openai-insecure-api-key.{secret}"] * 2
        with self.assertRaises(Exception):
            await connect(self.port.getHost().port, protocols=["realtime", *doubled])
        client = await self.open(protocols=["realtime", f"openai-insecure-api-key.{secret}"])
        client.append(tone(0.2, 24000))
        job = await self.job()
        job.heard(Heard("my secret words", True, 0.0, 0.2))
        await client.count("conversation.item.input_audio_transcription.completed")
        client.sendClose()
        await client.closed
        for _ in range(100):
            if not self.factory.sessions:
                break
            await tick(0.01)
        # The server's lines (the test's client logs what it is told).
        text = "\n".join(
            formatEvent(e) or "" for e in events
            if "Client" not in e.get("log_namespace", "")
        )
        self.assertIn(f"key {keyId(secret)}", text)
        self.assertIn("realtime handshake refused: HTTP 400", text)
        for leak in (secret, "secret words", "127.0.0.1"):
            self.assertNotIn(leak, text)

    async def test_badMessages(self) -> None:
        client = await self.open()
        client.sendMessage(b"\x00\x01", isBinary=True)
        client.sendMessage(b"not json")
        client.send("response.create")
        client.send("input_audio_buffer.append", audio="***")
        client.send("input_audio_buffer.append")
        await client.count("error", 5)
        self.assertEqual({e["error"]["type"] for e in client.of("error")}, {"invalid_request_error"})
        self.assertEqual(self.jobs.callers, [])
        # The session goes on.
        client.append(tone(0.1, 24000))
        await self.job()

    async def test_tooLarge(self) -> None:
        """
        A message over the limit fails the connection.
        """
        client = await self.open()
        client.sendMessage(b'{"type": "x", "pad": "' + b"a" * (1024 * 1024) + b'"}')
        code, _ = await client.closed
        # autobahn drops the connection at once: the client may not see 1009.
        self.assertIn(code, (1006, 1009))

    async def test_pendingBounded(self) -> None:
        """
        Audio for a job that does not start is kept up to a bound; over it
        the job fails.
        """
        self.jobs.gate = Deferred()
        client = await self.open()
        client.send("transcription_session.update", session={"input_audio_rate": 16000})
        chunk = tone(1.0, 16000)
        for _ in range(int(MAX_PENDING_SECONDS) + 2):
            client.append(chunk)
        [error] = await client.count("error")
        self.assertEqual(error["error"]["type"], "request_too_large")
        self.jobs.gate.callback(None)
        job = await self.job()
        self.assertTrue(job.cancelled)

    async def test_notWebSocket(self) -> None:
        url = f"http://127.0.0.1:{self.port.getHost().port}/v1/realtime"
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url + "?intent=transcription", pool=pool)
        self.assertEqual(response.code, 426)
        body = json.loads(await response.content())
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        response = await treq.get(url + "?intent=conversation", pool=pool)
        self.assertEqual(response.code, 422)
        await response.content()

    async def test_idle(self) -> None:
        """
        A socket with no job that says nothing is closed.
        """
        self.factory.idleTimeout = 0.2
        client = await self.open()
        code, reason = await client.closed
        self.assertEqual((code, reason), (1000, "idle"))


class KeysOnly(PolicyAccess):
    """
    C{--accounts none}'s access. LiveJobs asks it what a caller has left,
    which it cannot say (NotServed): here it says nothing, as it should.
    """

    async def standing(self, caller: Caller) -> dict[str, Any]:
        return {}


class AppRouteTests(TestCase):
    """
    C{/v1/realtime} in the Klein app, its jobs run by the real L{LiveJobs}
    over an in-test exchange.
    """

    timeout = 30

    async def test_route(self) -> None:
        exchange = FakeExchange()
        exchange.text = "hello world"
        api = PrivoxAPI(exchange, MODELS, KeysOnly(OpenPolicy()), clock=reactor)
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await connect(
            port.getHost().port, protocols=["realtime", "openai-insecure-api-key.k"]
        )
        await client.count("transcription_session.created")
        client.append(tone(0.5, 24000))
        client.send("input_audio_buffer.commit")
        [completed] = await client.count("conversation.item.input_audio_transcription.completed")
        self.assertEqual(completed["transcript"], "hello world")
        [(call, model, language, audio, _)] = exchange.calls
        self.assertEqual((call, model, language), ("transcribeLive", "whisper:tiny.en", None))
        self.assertLess(abs(len(audio) // 2 - 8000), 32)
        client.sendClose()
        await client.closed
        # Without a key, a key policy refuses.
        client = await connect(port.getHost().port)
        code, _ = await client.closed
        self.assertEqual(code, 4401)
        for _ in range(100):
            if not api.realtimeSessions.factory.sessions:
                break
            await tick(0.01)

    async def test_openaiSDK(self) -> None:
        """
        The stock OpenAI SDK's realtime client (its beta transcription
        sessions) connects, updates its session, sends audio and reads the
        transcript, events parsed as its own types.
        """
        import openai
        from twisted.internet.threads import deferToThread

        exchange = FakeExchange()
        exchange.text = "hello world"
        api = PrivoxAPI(exchange, MODELS, KeysOnly(OpenPolicy()), clock=reactor)
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        audio = base64.b64encode(tone(0.5, 24000)).decode()

        def session() -> list[Any]:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port.getHost().port}/v1", api_key="sdk-key",
                max_retries=0, websocket_base_url=f"ws://127.0.0.1:{port.getHost().port}/v1",
            )
            events = []
            with client.beta.realtime.connect(
                model="whisper-1", extra_query={"intent": "transcription"}
            ) as connection:
                events.append(connection.recv())
                connection.send({
                    "type": "transcription_session.update",
                    "session": {"input_audio_transcription": {"model": "whisper-1", "language": "en"}},
                })
                events.append(connection.recv())
                connection.input_audio_buffer.append(audio=audio)
                connection.input_audio_buffer.commit()
                while events[-1].type != "conversation.item.input_audio_transcription.completed":
                    events.append(connection.recv())
            return events

        events = await deferToThread(session)
        self.assertEqual(events[0].type, "transcription_session.created")
        self.assertEqual(events[1].session.input_audio_transcription.language, "en")
        self.assertEqual(events[-1].transcript, "hello world")
        self.assertEqual(exchange.calls[0][:3], ("transcribeLive", "whisper:tiny.en", "en"))
        for _ in range(100):
            if not api.realtimeSessions.factory.sessions:
                break
            await tick(0.01)


# -- end to end ---------------------------------------------------------------------------

SENTENCE = "Please call me back when you get this message."
MAX_WER = 0.25
#: What a client sends at a time, as OpenAI's examples do.
CHUNK_S = 0.1


def speech24k(text: str, lead: float = 0.5, tail: float = 1.5) -> bytes:
    """
    Piper saying C{text}, as 24 kHz s16le mono (OpenAI's pcm16), with
    silence before and after.
    """
    import io

    import av

    from tests.test_roundtrip import speak

    resampler = av.AudioResampler(format="s16", layout="mono", rate=24000)
    frames = []
    with av.open(io.BytesIO(speak(text))) as container:
        for frame in container.decode(audio=0):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    pcm = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)
    return bytes(int(lead * 24000) * 2) + pcm + bytes(int(tail * 24000) * 2)


class EndToEndTests(TestCase):
    """
    A whole local exchange (its bundled Whisper tiny.en, sealed jobs), a
    sentence sent as a microphone would send it.
    """

    timeout = 120

    async def test_liveCaptions(self) -> None:
        from privox.local import LocalExchange, LocalSettings
        from tests.wer import wer

        local = LocalExchange(
            LocalSettings(port=0, accounts=f"sqlite:{self.mktemp()}", wyoming_listen="none"),
            reactor,
        )
        local.startService()
        self.addCleanup(lambda: local.stopService() if local.running else None)
        await local.ready
        assert local.store is not None
        key, _ = await local.store.createKey(reactor.seconds())
        audio = speech24k(SENTENCE)
        port = int(local.url.rsplit(":", 1)[1])

        client = await connect(port, headers={"Authorization": f"Bearer {key}"})
        await client.count("transcription_session.created")
        arrived: dict[str, float] = {}
        sent: list[float] = []

        def seen() -> None:
            for event in client.events:
                arrived.setdefault(event["type"], time.monotonic())

        original = client.onMessage

        def onMessage(payload: bytes, isBinary: bool) -> None:
            original(payload, isBinary)
            seen()

        client.onMessage = onMessage  # type: ignore[method-assign]
        chunk = int(CHUNK_S * 24000) * 2
        start = time.monotonic()
        for n, at in enumerate(range(0, len(audio), chunk)):
            # Real-time pace: each chunk when a microphone would have it.
            delay = start + (n + 1) * CHUNK_S - time.monotonic()
            if delay > 0:
                await tick(delay)
            client.append(audio[at : at + chunk])
            sent.append(time.monotonic())
        client.send("input_audio_buffer.commit")
        ended = time.monotonic()

        def transcript() -> str:
            return " ".join(
                e["transcript"]
                for e in client.of("conversation.item.input_audio_transcription.completed")
            )

        try:
            await client.until(lambda: wer(SENTENCE, transcript()) <= MAX_WER, timeout=60)
        except Exception:
            self.fail(f"no good transcript: {transcript()!r}; events: {client.types()}")
        client.sendClose()
        await client.closed

        deltas = client.of("conversation.item.input_audio_transcription.delta")
        completed = arrived["conversation.item.input_audio_transcription.completed"]
        delta = arrived["conversation.item.input_audio_transcription.delta"]
        speechStarts = start + 0.5
        print(
            f"\ntranscript {transcript()!r}; {len(deltas)} deltas, the first"
            f" {delta - speechStarts:.2f} s after speech began; first completed"
            f" {completed - ended:+.2f} s after the audio ended"
        )
        self.assertTrue(deltas, client.types())
        # Captions came while the sentence was being sent.
        self.assertLess(delta, completed)
        self.assertLess(delta, ended)
        self.assertTrue(any(d["delta"] for d in deltas))
        # Every delta of an item before its completion, in order.
        for item in client.of("conversation.item.input_audio_transcription.completed"):
            types = [
                e["type"] for e in client.events if e.get("item_id") == item["item_id"]
            ]
            self.assertEqual(types[-1], "conversation.item.input_audio_transcription.completed")
        self.assertEqual(client.of("error"), [])

        # Stopping the exchange closes a session that is still open, its
        # job under way.
        client = await connect(port, headers={"Authorization": f"Bearer {key}"})
        await client.count("transcription_session.created")
        client.append(audio[: 24000 * 2])
        await tick(0.5)
        await local.stopService()
        code, _ = await client.closed
        self.assertIsNotNone(code)
