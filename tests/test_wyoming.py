"""
The Wyoming server (privox.api.wyoming): its decoder, fed whole and a byte
at a time and attacked (huge lengths, bad JSON, deep nesting); its info;
transcriptions and speech over a StringTransport against a fake of
L{privox.api.live.LiveJobs}, read back with the C{wyoming} package's own
reader; the options that wire it into privox-api and privox-local; the
mDNS announcement; and, end to end, a real C{twistd privox-local} driven by
tests/wyoming_client.py, which uses the C{wyoming} package's
C{AsyncTcpClient} as Home Assistant does.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from typing import Any, Callable

import numpy as np
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from wyoming.event import Event as LibraryEvent
from wyoming.event import read_event, write_event
from wyoming.info import Info
from zope.interface import implementer

from privox.api.access import Caller
from privox.api.errors import ApiError, NoProducer, Unauthorized
from privox.api.exchange import Heard, Transcribed
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.api.wyoming import (
    IDLE_TIMEOUT,
    LINGER,
    MAX_TEXT,
    SAMPLES_PER_CHUNK,
    Announcement,
    AudioFormat,
    BadEvent,
    Converter,
    Decoder,
    Event,
    FramingError,
    WyomingFactory,
    WyomingProtocol,
    checkZeroconfName,
    describe,
    encode,
    nameLanguage,
)
from privox.languages import LANGUAGES

LOCAL = ModelTable.parse(
    tuple(f"{q} whisper:tiny.en whisper:tiny.en" for q in ("fast", "normal")),
    ("voice1 piper:en_US-joe-medium", "alloy piper:en_US-joe-medium"),
)
TABLE = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES, ("ko vosk:ko",))


def library(kind: str, data: dict[str, Any] | None = None, payload: bytes | None = None) -> bytes:
    """
    An event as the C{wyoming} package writes it.
    """
    out = io.BytesIO()
    write_event(LibraryEvent(kind, data or {}, payload), out)
    return out.getvalue()


def events(data: bytes) -> list[LibraryEvent]:
    """
    Every event in C{data}, as the C{wyoming} package reads them.
    """
    stream = io.BytesIO(data)
    found = []
    while stream.tell() < len(data):
        event = read_event(stream)
        assert event is not None, data[stream.tell():]
        found.append(event)
    return found


def pcm(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


# -- the decoder -----------------------------------------------------------------


class DecoderTests(SynchronousTestCase):
    STREAM = (
        library("describe")
        + library("transcribe", {"language": "en", "name": "fast"})
        + library("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 500)
        + b"\n\r\n"  # blank lines between events are passed over
        + library("synthesize", {"text": "Grüße, ünïcode ✓"})
    )

    def decodeAll(self, decoder: Decoder) -> list[Event]:
        out = []
        while (event := decoder.next()) is not None:
            out.append(event)
        return out

    def test_wholeAndByteByByte(self) -> None:
        whole = Decoder()
        whole.feed(self.STREAM)
        expected = self.decodeAll(whole)
        self.assertEqual([e.type for e in expected],
                         ["describe", "transcribe", "audio-chunk", "synthesize"])
        self.assertEqual(expected[1].data, {"language": "en", "name": "fast"})
        self.assertEqual(expected[2].payload, b"\x01\x02" * 500)
        self.assertEqual(expected[3].data["text"], "Grüße, ünïcode ✓")
        single = Decoder()
        got = []
        for i in range(len(self.STREAM)):
            single.feed(self.STREAM[i : i + 1])
            got += self.decodeAll(single)
        self.assertEqual(got, expected)
        self.assertEqual(single.buffered(), 0)

    def test_dataInTheHeader(self) -> None:
        """
        Older peers put C{data} in the header line; a peer may send both
        (the separate data wins where they overlap, as the library merges).
        """
        decoder = Decoder()
        decoder.feed(b'{"type": "transcribe", "data": {"language": "fr"}}\n')
        extra = json.dumps({"name": "fast", "language": "de"}).encode()
        decoder.feed(
            json.dumps({"type": "transcribe", "data": {"language": "fr", "x": 1},
                        "data_length": len(extra)}).encode() + b"\n" + extra
        )
        first, second = self.decodeAll(decoder)
        self.assertEqual(first.data, {"language": "fr"})
        self.assertEqual(second.data, {"language": "de", "x": 1, "name": "fast"})

    def test_encodeIsWhatTheLibraryReads(self) -> None:
        data = b"".join(encode("audio-chunk", {"rate": 22050, "width": 2, "channels": 1}, b"ab"))
        data += b"".join(encode("transcript", {"text": "Grüße"}))
        data += b"".join(encode("transcript-stop"))
        chunk, transcript, stop = events(data)
        self.assertEqual(
            (chunk.type, chunk.data["rate"], chunk.payload), ("audio-chunk", 22050, b"ab")
        )
        self.assertEqual(transcript.data, {"text": "Grüße"})
        self.assertEqual((stop.type, stop.data), ("transcript-stop", {}))

    def assertFraming(self, data: bytes, status: int, **limits: int) -> FramingError:
        decoder = Decoder(**limits)
        decoder.feed(data)
        e = self.assertRaises(FramingError, decoder.next)
        self.assertEqual(e.error.status, status)
        return e

    def test_lengthsCheckedBeforeTheBody(self) -> None:
        """
        A length beyond its limit is refused as soon as the header line is
        read: its body is never waited for, nor held.
        """
        self.assertFraming(b'{"type": "x", "data_length": 1000000000000}\n', 413)
        self.assertFraming(b'{"type": "x", "payload_length": 1000000000000}\n', 413)
        self.assertFraming(b'{"type": "x", "payload_length": 11}\n', 413, maxPayload=10)
        self.assertFraming(b'{"type": "x", "data_length": 11}\n', 413, maxData=10)
        for bad in (-1, "10", 1.5, True, None.__class__.__name__, [1]):
            self.assertFraming(json.dumps({"type": "x", "data_length": bad}).encode() + b"\n", 400)
        # Exactly at the limits is fine.
        decoder = Decoder(maxData=2, maxPayload=3)
        decoder.feed(b'{"type": "x", "data_length": 2, "payload_length": 3}\n{}abc')
        self.assertEqual(decoder.next(), Event("x", {}, b"abc"))

    def test_longLine(self) -> None:
        """
        A header line longer than the limit is refused once the limit is
        passed, whether or not its end has come.
        """
        decoder = Decoder(maxLine=100)
        decoder.feed(b"{" + b" " * 99)
        self.assertIsNone(decoder.next())
        decoder.feed(b" ")
        self.assertRaises(FramingError, decoder.next)
        self.assertFraming(b'{"type": "x"' + b" " * 200 + b"}\n", 413, maxLine=100)

    def test_badHeaders(self) -> None:
        for line in (
            b"not json",
            b"[1, 2]",
            b'"type"',
            b"\xff\xfe{}",
            b"[" * 100_000,  # deeper than json can go
            b'{"type": "x", "data_length": 1' + b"0" * 5000 + b"}",
        ):
            self.assertFraming(line + b"\n", 400)

    def test_badEventsAreSkipped(self) -> None:
        """
        An event whose frame is sound but whose content is not is refused
        alone: the next event reads as it should.
        """
        decoder = Decoder()
        for kind, data in (
            (None, b"{}"),
            ("", b"{}"),
            ("x" * 65, b"{}"),
            ("x", b"not json"),
            ("x", b"[1]"),
            ("x", b"\xff"),
            ("x", b"[" * 10_000 + b"]" * 10_000),
        ):
            header: dict[str, Any] = {"data_length": len(data)}
            if kind is not None:
                header["type"] = kind
            decoder.feed(json.dumps(header).encode() + b"\n" + data)
            self.assertRaises(BadEvent, decoder.next)
        decoder.feed(b'{"type": "x", "data": [1]}\n')
        self.assertRaises(BadEvent, decoder.next)
        decoder.feed(library("ping", {"text": "hi"}))
        self.assertEqual(decoder.next(), Event("ping", {"text": "hi"}))


# -- info and audio ------------------------------------------------------------------


class DescribeTests(SynchronousTestCase):
    def test_nameLanguage(self) -> None:
        for model, language in (
            ("whisper:tiny.en", "en"),
            ("whisper:tiny", None),
            ("whisper:large-v2", None),
            ("vosk:ko", "ko"),
            ("piper:en_US-joe-medium", "en"),
            ("piper:de_DE-thorsten-high", "de"),
            ("coqui:tts_models/en/vctk/vits", "en"),
            ("coqui:tts_models/multilingual/multi-dataset/xtts_v2", None),
        ):
            self.assertEqual(nameLanguage(model), language, model)

    def test_theTable(self) -> None:
        """
        The info lists each STT model the table sends jobs to, with the
        languages it sends it; the library reads it.
        """
        info = Info.from_event(LibraryEvent("info", describe(TABLE)))
        [asr] = info.asr
        self.assertTrue(asr.supports_transcript_streaming)
        models = {m.name: m for m in asr.models}
        self.assertEqual(models["whisper:tiny.en"].languages, ["en"])
        self.assertEqual(models["vosk:ko"].languages, ["ko"])
        self.assertIn("pinned for ko", models["vosk:ko"].description)
        tiny = set(models["whisper:tiny"].languages)
        self.assertEqual(tiny, set(LANGUAGES) - {"en", "ko"})
        self.assertIn("qualities fast", models["whisper:tiny"].description)
        self.assertEqual(models["whisper:large"].languages, sorted(set(LANGUAGES) - {"ko"}))
        self.assertEqual(
            models["whisper:tiny"].attribution.url, "https://github.com/SYSTRAN/faster-whisper"
        )
        self.assertTrue(all(m.installed for m in asr.models))
        [tts] = info.tts
        self.assertTrue(tts.supports_synthesize_streaming)
        voices = {v.name: v for v in tts.voices}
        self.assertEqual(set(voices), {"voice1", "voice2"})
        self.assertEqual(voices["voice1"].languages, ["en"])
        self.assertEqual([s.name for s in voices["voice1"].speakers or []], ["p236"])

    def test_englishOnlyModels(self) -> None:
        """
        A model whose name says English serves English only, whatever the
        table routes to it (privox-local maps every language to tiny.en).
        """
        info = Info.from_event(LibraryEvent("info", describe(LOCAL)))
        self.assertEqual([(m.name, m.languages) for m in info.asr[0].models],
                         [("whisper:tiny.en", ["en"])])
        self.assertEqual([(v.name, v.speakers) for v in info.tts[0].voices],
                         [("voice1", None), ("alloy", None)])


class ConverterTests(SynchronousTestCase):
    def test_passThrough(self) -> None:
        audio = pcm(0.1)
        converter = Converter(AudioFormat(16000, 2, 1))
        self.assertEqual(converter.convert(audio[:101]) + converter.convert(audio[101:]), audio)
        self.assertEqual(converter.flush(), b"")

    def test_widthsAndChannels(self) -> None:
        samples = np.array([0, 1000, -1000, 32767, -32768], dtype="<i2")
        # 8-bit unsigned, 24-bit and 32-bit signed, all of them loud the same.
        eight = ((samples >> 8) + 128).astype(np.uint8).tobytes()
        self.assertEqual(
            np.frombuffer(Converter(AudioFormat(16000, 1, 1)).convert(eight), "<i2").tolist(),
            [0, 768, -1024, 32512, -32768],
        )
        wide = (samples.astype("<i4") << 16).tobytes()
        self.assertEqual(Converter(AudioFormat(16000, 4, 1)).convert(wide), samples.tobytes())
        triples = b"".join((int(s) << 8).to_bytes(3, "little", signed=True) for s in samples)
        self.assertEqual(Converter(AudioFormat(16000, 3, 1)).convert(triples), samples.tobytes())
        stereo = np.stack([samples, samples // 2], axis=1).astype("<i2").tobytes()
        mono = np.frombuffer(Converter(AudioFormat(16000, 2, 2)).convert(stereo), "<i2")
        self.assertEqual(mono.tolist(), [0, 750, -750, 24575, -24576])

    def test_resampled(self) -> None:
        """
        44.1 kHz stereo in chunks that split frames comes out as 16 kHz
        mono of the same length, the tone kept.
        """
        rate = 44100
        tone = np.frombuffer(pcm(1.0, rate), "<i2")
        stereo = np.stack([tone, tone], axis=1).astype("<i2").tobytes()
        converter = Converter(AudioFormat(rate, 2, 2))
        out = b"".join(converter.convert(stereo[i : i + 999]) for i in range(0, len(stereo), 999))
        out += converter.flush()
        samples = np.frombuffer(out, "<i2")
        self.assertLess(abs(len(samples) - 16000), 32)
        spectrum = np.abs(np.fft.rfft(samples))
        self.assertLess(abs(int(np.argmax(spectrum)) * 16000 / len(samples) - 440), 3)


# -- a fake of LiveJobs ----------------------------------------------------------------


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


class FakeSpeech:
    def __init__(
        self, model: str, language: str | None, voice: str | None,
        spoken: Callable[[bytes, int], None], need: float | None,
    ) -> None:
        self.model = model
        self.language = language
        self.voice = voice
        self.spoken = spoken
        self.need = need
        self.text: list[str] = []
        self.ended = False
        self.cancelled = False
        self.done: Deferred[float] = Deferred()

    def write(self, text: str) -> None:
        assert not self.ended and not self.cancelled
        self.text.append(text)

    def end(self) -> None:
        self.ended = True

    def cancel(self) -> None:
        self.cancelled = True
        if not self.done.called:
            self.done.errback(ApiError("cancelled"))


class FakeJobs:
    maxSeconds = 300.0

    def __init__(self) -> None:
        self.callers: list[Caller] = []
        self.transcriptions: list[FakeTranscription] = []
        self.speeches: list[FakeSpeech] = []
        #: While set, jobs wait for it to fire before they start.
        self.gate: Deferred[None] | None = None
        #: The error the next job fails to start with.
        self.refuse: ApiError | None = None

    async def _start(self, caller: Caller) -> None:
        self.callers.append(caller)
        if self.gate is not None:
            await self.gate
        if self.refuse is not None:
            refused, self.refuse = self.refuse, None
            raise refused

    async def transcribe(
        self, caller: Caller, model: str, language: str | None, heard: Callable[[Heard], None],
        need: float | None = None,
    ) -> FakeTranscription:
        await self._start(caller)
        job = FakeTranscription(model, language, heard)
        self.transcriptions.append(job)
        return job

    async def speak(
        self, caller: Caller, model: str, language: str | None, voice: str | None,
        spoken: Callable[[bytes, int], None], need: float | None = None,
    ) -> FakeSpeech:
        await self._start(caller)
        job = FakeSpeech(model, language, voice, spoken, need)
        self.speeches.append(job)
        return job


class FakeAccess:
    async def authorize(self, key: str | None) -> Caller:
        if key == "revoked":
            raise Unauthorized("the key was not accepted")
        return Caller(key, key or "anonymous")


class ProtocolCase(SynchronousTestCase):
    """
    A Wyoming connection over a StringTransport.
    """

    def connect(
        self, models: ModelTable = TABLE, transport: type[StringTransport] = StringTransport,
        **kwargs: Any,
    ) -> WyomingProtocol:
        self.jobs = FakeJobs()
        self.clock = Clock()
        self.factory = WyomingFactory(
            self.jobs, FakeAccess(), models, self.clock, **kwargs  # type: ignore[arg-type]
        )
        self.transport = transport()
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return self.protocol

    def send(self, *pieces: bytes, byteByByte: bool = False) -> None:
        data = b"".join(pieces)
        if byteByByte:
            for i in range(len(data)):
                self.protocol.dataReceived(data[i : i + 1])
        else:
            self.protocol.dataReceived(data)

    def received(self) -> list[LibraryEvent]:
        """
        The events sent since the last call.
        """
        out = events(self.transport.value())
        self.transport.clear()
        return out

    def types(self) -> list[str]:
        return [e.type for e in self.received()]

    def assertError(self, code: str, contains: str = "") -> LibraryEvent:
        [error] = [e for e in self.received() if e.type == "error"]
        self.assertEqual(error.data["code"], code, error.data)
        self.assertIn(contains, error.data["text"])
        return error


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    """
    A transport that can end its writing side alone, as TCP's can.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


AUDIO_START = library("audio-start", {"rate": 16000, "width": 2, "channels": 1})
AUDIO_STOP = library("audio-stop")


def chunk(audio: bytes, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    return library("audio-chunk", {"rate": rate, "width": width, "channels": channels}, audio)


# -- the protocol: describe, ping, hostile clients ------------------------------------------


class ConnectionTests(ProtocolCase):
    def test_describeAndPing(self) -> None:
        self.connect()
        self.send(library("describe"), library("ping", {"text": "are you there"}),
                  library("select-program", {"name": "privox"}), library("detect"))
        info, pong = self.received()
        self.assertEqual(info.type, "info")
        self.assertEqual(Info.from_event(info).asr[0].name, "privox")
        self.assertEqual((pong.type, pong.data), ("pong", {"text": "are you there"}))

    def test_framingErrorsEndTheConnection(self) -> None:
        """
        A header that cannot be read (not JSON, a length beyond the limits)
        is answered with an error, and the connection ends: the stream
        cannot be followed past it. Nothing of the body is waited for.
        """
        for line, code in (
            (b'{"type": "audio-chunk", "payload_length": 99999999999}\n', "request_too_large"),
            (b'{"type": "synthesize", "data_length": 99999999999}\n', "request_too_large"),
            (b"{\n", "invalid_request_error"),
            (b"[" * 200_000 + b"\n", "invalid_request_error"),
        ):
            self.connect()
            self.send(line)
            self.assertError(code)
            self.assertTrue(self.transport.disconnecting)
            # Whatever follows is not read.
            self.send(library("describe"))
            self.assertEqual(self.received(), [])

    def test_endlessLine(self) -> None:
        self.connect(maxLine=1000)
        self.send(b'{"type": "describe"' + b" " * 600)
        self.assertFalse(self.transport.disconnecting)
        self.send(b" " * 600)
        self.assertError("request_too_large", "header")
        self.assertTrue(self.transport.disconnecting)

    def test_badEventsLeaveItUsable(self) -> None:
        self.connect()
        self.send(b'{"type": "transcribe", "data_length": 3}\nabc', library("describe"))
        error, info = self.received()
        self.assertEqual((error.type, error.data["code"]), ("error", "invalid_request_error"))
        self.assertEqual(info.type, "info")
        self.assertFalse(self.transport.disconnecting)

    def test_idleConnectionsClose(self) -> None:
        self.connect()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.send(library("ping"))
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_notIdleWhileTheExchangeWorks(self) -> None:
        self.connect()
        self.send(AUDIO_START, chunk(pcm(0.1)), AUDIO_STOP)
        self.clock.advance(IDLE_TIMEOUT * 3)
        self.assertFalse(self.transport.disconnecting)
        self.jobs.transcriptions[0].done.callback(Transcribed("Hi.", "m", "en", 0.1))
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)

    def test_lingeringClose(self) -> None:
        """
        A connection ended after an error ends its writing side first, and
        reads past what the client still sends (closing with bytes unread
        would reset the connection, and the client could lose the error),
        until the client ends its side or L{LINGER} seconds pass.
        """
        for ending in ("client", "timeout", "closeAll"):
            self.connect(transport=HalfCloseableTransport)
            self.send(library("transcribe", {"name": "huge"}), AUDIO_START)
            self.assertError("unsupported")
            self.assertTrue(self.transport.writeClosed)
            self.assertFalse(self.transport.disconnecting)
            self.send(chunk(pcm(1)), AUDIO_STOP, library("describe"))
            self.assertEqual(self.received(), [])
            if ending == "client":
                self.protocol.readConnectionLost()
            elif ending == "timeout":
                self.clock.advance(LINGER - 0.1)
                self.assertFalse(self.transport.disconnecting)
                self.clock.advance(0.1)
            else:
                self.factory.closeAll()
            self.assertTrue(self.transport.disconnecting, ending)
            self.protocol.connectionLost(None)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeAll(self) -> None:
        self.connect()
        self.send(AUDIO_START)
        job = self.jobs.transcriptions[0]
        d = self.factory.closeAll()
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(d)
        self.protocol.connectionLost(None)
        self.successResultOf(d)
        self.assertTrue(job.cancelled)
        self.successResultOf(self.factory.closeAll())


# -- speech to text ------------------------------------------------------------------------


class TranscriptionTests(ProtocolCase):
    def run_(self, byteByByte: bool) -> None:
        self.connect()
        audio = pcm(0.5)
        self.send(
            library("transcribe", {"name": "fast", "language": "English"}),
            AUDIO_START,
            chunk(audio[:6000]),
            byteByByte=byteByByte,
        )
        [job] = self.jobs.transcriptions
        self.assertEqual((job.model, job.language), ("whisper:tiny.en", "en"))
        self.assertEqual(self.jobs.callers, [Caller(None, "anonymous")])
        job.heard(Heard("Turn on", False, 0.0, 0.4))
        job.heard(Heard("Turn on the light.", True, 0.0, 0.5))
        self.send(chunk(audio[6000:]), byteByByte=byteByByte)
        job.heard(Heard("And", False, 0.6, 0.7))
        job.heard(Heard("  And   the fan. ", True, 0.6, 0.9))
        self.assertEqual(bytes(job.audio), audio)
        self.assertFalse(job.ended)
        self.send(AUDIO_STOP, library("describe"), byteByByte=byteByByte)
        self.assertTrue(job.ended)
        # The transcript is waited for before the next event is read.
        self.assertEqual(self.transport.producerState, "paused")
        streamed = self.received()
        self.assertEqual(
            [(e.type, e.data.get("text")) for e in streamed],
            # What hypotheses agree on goes at once (their last word may
            # still change); the rest with the utterance's final piece.
            [("transcript-start", None), ("transcript-chunk", "Turn"),
             ("transcript-chunk", " on the light."), ("transcript-chunk", " And the fan.")],
        )
        self.assertEqual(streamed[0].data["language"], "en")
        said = "Turn on the light. And the fan."
        job.done.callback(Transcribed(said, "whisper:tiny.en", "en", 0.5))
        self.assertEqual(self.transport.producerState, "producing")
        transcript, stop, info = self.received()
        self.assertEqual(transcript.data, {"text": said, "language": "en"})
        self.assertEqual((stop.type, info.type), ("transcript-stop", "info"))

    def test_transcription(self) -> None:
        self.run_(byteByByte=False)

    def test_byteByByte(self) -> None:
        self.run_(byteByByte=True)

    def test_noTranscribeNoAudioStart(self) -> None:
        """
        A client that sends no transcribe gets the default model; one that
        sends no audio-start, a stream begun by its first chunk, in the
        chunk's format.
        """
        self.connect()
        audio = chunk(pcm(0.1, 48000), rate=48000)
        self.send(audio, audio, AUDIO_STOP)
        [job] = self.jobs.transcriptions
        self.assertEqual((job.model, job.language), ("whisper:tiny.en", None))
        self.assertLess(abs(len(job.audio) / 32000 - 0.2), 0.005)
        job.done.callback(Transcribed("", "whisper:tiny.en", None, 0.2))
        self.assertEqual(self.types(), ["transcript-start", "transcript", "transcript-stop"])

    def test_modelsAndQualities(self) -> None:
        self.connect()
        for asked, model, language in (
            ({"name": "best", "language": "fr"}, "whisper:medium", "fr"),
            ({"name": "whisper:large"}, "whisper:large", None),
            ({"language": "ko"}, "vosk:ko", "ko"),
            ({"language": "de-AT"}, "whisper:tiny", "de"),
        ):
            self.send(library("transcribe", asked), AUDIO_START, AUDIO_STOP)
            job = self.jobs.transcriptions[-1]
            self.assertEqual((job.model, job.language), (model, language))
            job.done.callback(Transcribed("x", model, None, 0.0))
            transcript = [e for e in self.received() if e.type == "transcript"][0]
            self.assertEqual(transcript.data["language"], language or "en")

    def assertEnded(self, code: str, contains: str = "") -> None:
        """
        The request failed: an error, then the end of the connection, and
        nothing more read.
        """
        self.assertError(code, contains)
        self.assertTrue(self.transport.disconnecting)
        self.send(chunk(pcm(0.1)), AUDIO_STOP, library("describe"))
        self.assertEqual(self.received(), [])

    def test_refusals(self) -> None:
        """
        An unknown model, quality or language, or audio of no usable
        format, is an error, and the end of the connection (the transcript
        Home Assistant waits for will not come).
        """
        for asked, start, code, contains in (
            ({"name": "huge"}, AUDIO_START, "unsupported", "unknown model 'huge'"),
            ({"language": "Klingon"}, AUDIO_START, "unsupported", "unknown language"),
            ({}, library("audio-start", {"rate": 16000, "width": 7, "channels": 1}),
             "invalid_request_error", "width"),
            ({}, library("audio-start", {"rate": "fast"}), "invalid_request_error", "rate"),
            ({}, chunk(pcm(0.1), channels=0), "invalid_request_error", "channels"),
        ):
            self.connect()
            self.send(library("transcribe", asked), start, chunk(pcm(0.1)))
            self.assertEnded(code, contains)
            self.assertEqual(self.jobs.transcriptions, [])

    def test_refusedByTheExchange(self) -> None:
        self.connect(key="revoked")
        self.send(AUDIO_START, chunk(pcm(0.1)))
        self.assertEnded("authentication_error", "not accepted")
        self.connect(key="good")
        self.jobs.refuse = NoProducer("no producer serves whisper:tiny.en")
        self.send(AUDIO_START, chunk(pcm(0.1)), AUDIO_STOP)
        self.assertEnded("no_capacity", "no producer")
        self.assertEqual(self.jobs.callers, [Caller("good", "good")])

    def test_failsMidStream(self) -> None:
        self.connect()
        self.send(AUDIO_START, chunk(pcm(0.1)))
        [job] = self.jobs.transcriptions
        job.done.errback(NoProducer("the node went away"))
        self.assertEnded("no_capacity", "the node went away")
        self.assertEqual(len(job.audio), 3200)

    def test_failsAfterAudioStop(self) -> None:
        self.connect()
        self.send(AUDIO_START, chunk(pcm(0.1)), AUDIO_STOP, library("describe"))
        self.jobs.transcriptions[0].done.errback(ApiError("the engine failed"))
        self.assertEnded("server_error", "the engine failed")

    def test_unexpectedFailure(self) -> None:
        """
        Anything but an API error is logged, and the client told only that
        the request failed.
        """
        self.connect()
        self.send(AUDIO_START, AUDIO_STOP)
        self.jobs.transcriptions[0].done.errback(ZeroDivisionError())
        self.assertEnded("server_error", "the request failed on the server")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_tooLong(self) -> None:
        self.connect(maxSeconds=1.0)
        self.send(AUDIO_START, chunk(pcm(0.6)), chunk(pcm(0.6)))
        [job] = self.jobs.transcriptions
        self.assertTrue(job.cancelled)
        self.assertEqual(len(job.audio), 0.6 * 32000)
        self.assertEnded("request_too_large", "1 s")

    def test_endsEarly(self) -> None:
        """
        The exchange may end a stream before the client does (what the
        caller had left is used up): the transcript comes then, the rest
        of the audio is read past.
        """
        self.connect()
        self.send(AUDIO_START, chunk(pcm(0.1)))
        self.jobs.transcriptions[0].done.callback(Transcribed("Half.", "m", "en", 0.1))
        self.assertEqual(self.types(), ["transcript-start", "transcript", "transcript-stop"])
        self.send(chunk(pcm(0.1)), AUDIO_STOP)
        self.assertEqual(self.received(), [])

    def test_noAudio(self) -> None:
        self.connect()
        self.send(library("transcribe", {"language": "fr"}), AUDIO_STOP)
        start, transcript, stop = self.received()
        self.assertEqual(transcript.data, {"text": "", "language": "fr"})
        self.assertEqual(self.jobs.transcriptions, [])

    def test_heldWhileTheJobStarts(self) -> None:
        """
        Nothing more is read while the job starts; then what came in the
        meantime is read, in order.
        """
        self.connect()
        self.jobs.gate = Deferred()
        audio = pcm(0.2)
        self.send(AUDIO_START, chunk(audio[:3200]), chunk(audio[3200:]), AUDIO_STOP)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.jobs.transcriptions, [])
        self.jobs.gate.callback(None)
        [job] = self.jobs.transcriptions
        self.assertEqual(bytes(job.audio), audio)
        self.assertTrue(job.ended)

    def test_lostWhileStarting(self) -> None:
        self.connect()
        self.jobs.gate = Deferred()
        self.send(AUDIO_START)
        self.protocol.connectionLost(None)
        self.jobs.gate.callback(None)
        self.assertEqual(self.jobs.transcriptions, [])

    def test_lostWhileRunning(self) -> None:
        self.connect()
        self.send(AUDIO_START, chunk(pcm(0.1)))
        self.protocol.connectionLost(None)
        self.assertTrue(self.jobs.transcriptions[0].cancelled)

    def test_oneRequestAtATime(self) -> None:
        self.connect()
        self.send(AUDIO_START, library("synthesize", {"text": "Hi."}), library("synthesize-stop"))
        self.assertEqual(
            [e.data["text"] for e in self.received()],
            ["an audio stream is open: end it with audio-stop first"] * 2,
        )
        self.send(chunk(pcm(0.1)), AUDIO_STOP)
        [job] = self.jobs.transcriptions
        self.assertTrue(job.ended)
        self.assertFalse(job.cancelled)
        self.assertEqual(self.jobs.speeches, [])


# -- text to speech ------------------------------------------------------------------------


class SpeechTests(ProtocolCase):
    def test_synthesize(self) -> None:
        self.connect()
        self.send(
            library("synthesize", {"text": "Hello there.\x07 Bye.", "voice": {"name": "voice2"}}),
            library("describe"),
        )
        [job] = self.jobs.speeches
        self.assertEqual((job.model, job.voice), ("coqui:tts_models/en/vctk/vits", "p270"))
        self.assertEqual((job.text, job.ended), (["Hello there.  Bye."], True))
        self.assertGreater(job.need, 1.0)
        self.assertEqual(self.transport.producerState, "paused")
        first = pcm(1.0, 22050)
        job.spoken(first, 22050)
        job.spoken(pcm(0.5, 22050), 22050)
        job.done.callback(1.5)
        received = self.received()
        self.assertEqual(received[0].type, "audio-start")
        self.assertEqual(received[0].data, {"rate": 22050, "width": 2, "channels": 1})
        chunks = [e for e in received if e.type == "audio-chunk"]
        self.assertEqual(len(chunks[0].payload), SAMPLES_PER_CHUNK * 2)
        self.assertEqual(b"".join(c.payload for c in chunks), first + pcm(0.5, 22050))
        self.assertEqual([e.type for e in received[-2:]], ["audio-stop", "info"])
        self.assertEqual(len(received), 1 + len(chunks) + 2)

    def test_voices(self) -> None:
        self.connect()
        for voice, model, language, speaker in (
            (None, "coqui:tts_models/en/vctk/vits", None, "p236"),
            ({"name": "alloy"}, "coqui:tts_models/en/vctk/vits", None, "p236"),
            ({"language": "en-GB"}, "coqui:tts_models/en/vctk/vits", "en", "p236"),
            ({"name": "voice2", "language": "en", "speaker": "x"},
             "coqui:tts_models/en/vctk/vits", "en", "p270"),
        ):
            self.send(library("synthesize", {"text": "Hi.", "voice": voice}))
            job = self.jobs.speeches[-1]
            self.assertEqual((job.model, job.language, job.voice), (model, language, speaker))
            job.done.callback(0.0)
            self.assertEqual(self.types(), ["audio-stop"])

    def test_refusals(self) -> None:
        for data, code, contains in (
            ({"text": "Hi.", "voice": {"name": "nobody"}}, "unsupported",
             "unknown voice 'nobody'"),
            ({"text": "Hi.", "voice": {"language": "fr"}}, "unsupported", "no voice speaks fr"),
            ({"text": "Hi.", "voice": {"language": "Elvish"}}, "unsupported", "unknown language"),
            ({"text": " \n "}, "invalid_request_error", "no text"),
            ({}, "invalid_request_error", "no text"),
            ({"text": "x" * (MAX_TEXT + 1)}, "request_too_large", str(MAX_TEXT)),
            ({"text": "<speak>Hi</speak>", "text_format": "ssml"}, "unsupported", "plain text"),
        ):
            self.connect()
            self.send(library("synthesize", data), library("describe"))
            self.assertError(code, contains)
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.jobs.speeches, [])
        self.connect()
        self.send(library("synthesize-start", {"voice": {"name": "nobody"}}))
        self.assertError("unsupported", "unknown voice")
        self.assertTrue(self.transport.disconnecting)

    def test_failed(self) -> None:
        self.connect()
        self.send(library("synthesize", {"text": "Hi."}))
        job = self.jobs.speeches[0]
        job.spoken(pcm(0.1, 22050), 22050)
        job.done.errback(NoProducer("no producer serves it"))
        received = self.received()
        self.assertEqual([e.type for e in received][0], "audio-start")
        self.assertEqual(received[-1].type, "error")
        self.assertNotIn("audio-stop", [e.type for e in received])
        self.assertTrue(self.transport.disconnecting)

    def stream(self, *pieces: str, compatibility: bool = True) -> FakeSpeech:
        self.send(library("synthesize-start", {"voice": {"name": "voice1"}}))
        [job] = self.jobs.speeches[-1:]
        self.assertIsNone(job.need)
        for piece in pieces:
            self.send(library("synthesize-chunk", {"text": piece}))
        if compatibility:
            whole = {"text": "".join(pieces), "voice": {"name": "voice1"}}
            self.send(library("synthesize", whole))
        return job

    def test_streaming(self) -> None:
        """
        Text streams in; each sentence's audio goes out as it comes, framed
        as wyoming-piper frames it; the compatibility synthesize is
        ignored; synthesize-stopped ends it.
        """
        self.connect()
        job = self.stream("Hello ", "there. How", " are you?")
        self.assertEqual(job.text, ["Hello ", "there. How", " are you?"])
        self.assertFalse(job.ended)
        first = pcm(0.3, 22050)
        job.spoken(first, 22050)
        self.assertEqual(self.types(), ["audio-start"] + ["audio-chunk"] * 7 + ["audio-stop"])
        self.send(library("synthesize-stop"), library("describe"))
        self.assertTrue(job.ended)
        self.assertEqual(self.transport.producerState, "paused")
        # A sentence at another rate is brought to the first's.
        job.spoken(pcm(0.3, 16000), 16000)
        job.done.callback(0.6)
        received = self.received()
        self.assertEqual(received[0].data["rate"], 22050)
        audio = b"".join(e.payload for e in received if e.type == "audio-chunk")
        self.assertLess(abs(len(audio) / 2 / 22050 - 0.3), 0.01)
        self.assertEqual(
            [e.type for e in received[-3:]], ["audio-stop", "synthesize-stopped", "info"]
        )
        self.assertEqual(len(self.jobs.speeches), 1)

    def test_streamWithoutText(self) -> None:
        self.connect()
        job = self.stream(compatibility=False)
        self.send(library("synthesize-stop"))
        job.done.callback(0.0)
        self.assertEqual(self.types(), ["synthesize-stopped"])

    def test_streamFails(self) -> None:
        """
        A stream that fails says so, and the connection ends: nothing more
        of it is read.
        """
        self.connect()
        job = self.stream("Hello.")
        job.done.errback(NoProducer("the node went away"))
        self.assertError("no_capacity")
        self.assertTrue(self.transport.disconnecting)
        self.send(library("synthesize-chunk", {"text": "More."}), library("synthesize-stop"))
        self.assertEqual(self.received(), [])
        self.assertEqual(job.text, ["Hello."])

    def test_streamTooLong(self) -> None:
        self.connect()
        job = self.stream("x" * MAX_TEXT, "y")
        self.assertError("request_too_large")
        self.assertTrue(job.cancelled)
        self.assertTrue(self.transport.disconnecting)

    def test_streamFailsAtTheEnd(self) -> None:
        self.connect()
        job = self.stream("Hello.")
        self.send(library("synthesize-stop"))
        job.spoken(pcm(0.1, 22050), 22050)
        job.done.errback(ApiError("the engine failed"))
        self.assertEqual(self.types()[-2:], ["audio-stop", "error"])
        self.assertTrue(self.transport.disconnecting)

    def test_streamRefusedAtTheStart(self) -> None:
        self.connect()
        self.jobs.refuse = Unauthorized("a key is required")
        self.send(library("synthesize-start"), library("synthesize-chunk", {"text": "Hi."}),
                  library("synthesize"), library("synthesize-stop"))
        self.assertEqual(self.types(), ["error"])
        self.assertTrue(self.transport.disconnecting)

    def test_streamEndsEarly(self) -> None:
        """
        The exchange may end a text stream before the client does (what
        the caller had left is said): the rest is read past, and its
        synthesize-stop answered.
        """
        self.connect()
        job = self.stream("Hello.", compatibility=False)
        job.spoken(pcm(0.1, 22050), 22050)
        job.done.callback(0.1)
        self.send(library("synthesize-chunk", {"text": "More."}), library("synthesize"),
                  library("synthesize-stop"), library("describe"))
        self.assertEqual(self.types()[-2:], ["synthesize-stopped", "info"])
        self.assertEqual(job.text, ["Hello."])

    def test_outOfPlace(self) -> None:
        self.connect()
        self.send(library("synthesize-chunk", {"text": "Hi."}), library("synthesize-stop"))
        self.assertEqual(
            [e.data["text"] for e in self.received()],
            ["synthesize-chunk and synthesize-stop come after synthesize-start"] * 2,
        )
        job = self.stream("Hi.")
        self.send(AUDIO_START, chunk(pcm(0.1)), library("synthesize-start"))
        self.assertEqual(self.types(), ["error"] * 3)
        self.assertFalse(job.cancelled)
        self.assertEqual(self.jobs.transcriptions, [])

    def test_clientThatDoesNotRead(self) -> None:
        """
        While the client does not read, nothing more is read from it; one
        that leaves more than the backlog unread is dropped.
        """
        self.connect(maxBacklog=100_000)
        self.send(library("synthesize", {"text": "Hi."}))
        job = self.jobs.speeches[0]
        self.protocol.pauseProducing()  # as the transport does when its buffer fills
        job.spoken(pcm(1.0, 22050), 22050)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.resumeProducing()
        self.protocol.pauseProducing()
        job.spoken(pcm(3.0, 22050), 22050)
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(None)
        self.assertTrue(job.cancelled)

    def test_pausedByTheTransport(self) -> None:
        self.connect()
        self.protocol.pauseProducing()
        self.send(library("describe"))
        self.assertEqual(self.received(), [])
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.resumeProducing()
        self.assertEqual(self.types(), ["info"])
        self.assertEqual(self.transport.producerState, "producing")


# -- the mDNS announcement -----------------------------------------------------------------


class FakePort:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def getHost(self) -> Any:
        return self


class AnnouncementTests(SynchronousTestCase):
    def announce(self, host: str) -> tuple[Announcement, list[tuple[Any, ...]]]:
        calls: list[tuple[Any, ...]] = []
        listening: Deferred[Any] = Deferred()
        announcement = Announcement(
            "privox",
            listening,
            lambda f, *a: succeed(f(*a)),
            register=lambda *a: (calls.append(("register", *a)), ("zc", "info"))[1],
            unregister=lambda *a: calls.append(("unregister", *a)),
            outwardAddress=lambda: "192.0.2.7",
        )
        announcement.startService()
        self.assertEqual(calls, [])
        listening.callback(FakePort(host, 10300))
        return announcement, calls

    def test_announced(self) -> None:
        announcement, calls = self.announce("0.0.0.0")
        self.assertEqual(calls, [("register", "privox", "192.0.2.7", 10300)])
        self.successResultOf(announcement.stopService())
        self.assertEqual(calls[-1], ("unregister", "zc", "info"))

    def test_stoppedWhileAnnouncing(self) -> None:
        """
        Stopped while the announcement is being made (in a thread), it is
        taken back once made.
        """
        calls: list[tuple[Any, ...]] = []
        registered: Deferred[Any] = Deferred()

        def inThread(f: Callable[..., Any], *a: Any) -> Deferred[Any]:
            if f is register:
                return registered
            return succeed(f(*a))

        def register(*a: Any) -> Any:
            raise AssertionError("run in the fake thread")

        listening: Deferred[Any] = Deferred()
        announcement = Announcement(
            "privox", listening, inThread, register=register,
            unregister=lambda *a: calls.append(("unregister", *a)),
        )
        announcement.startService()
        listening.callback(FakePort("192.0.2.7", 10300))
        stopped = announcement.stopService()
        self.assertNoResult(stopped)
        registered.callback(("zc", "info"))
        self.successResultOf(stopped)
        self.assertEqual(calls, [("unregister", "zc", "info")])

    def test_loopback(self) -> None:
        announcement, calls = self.announce("127.0.0.1")
        self.assertEqual(calls, [("register", "privox", "127.0.0.1", 10300)])

    def test_names(self) -> None:
        self.assertIsNone(checkZeroconfName("Privox kitchen"))
        for bad in ("", "a.b", "x" * 64, "tab\there"):
            self.assertIsNotNone(checkZeroconfName(bad), bad)


class ZeroconfTests(TestCase):
    """
    The announcement made for real with python-zeroconf, and found by a
    browser as Home Assistant's finds it.
    """

    timeout = 60

    async def test_announcedForReal(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from privox.api.wyoming import SERVICE_TYPE, WyomingService, _outwardAddress

        try:
            _outwardAddress()
        except OSError as e:
            raise SkipTest(f"no route for multicast here: {e}")
        name = f"privox-test-{os.getpid()}"
        factory = WyomingFactory(
            FakeJobs(), FakeAccess(), LOCAL, reactor  # type: ignore[arg-type]
        )
        service = WyomingService(
            "tcp:0:interface=127.0.0.1", factory, reactor, "--wyoming-listen",
            zeroconfName=name, runInThread=deferToThread,
        )
        service.startService()
        stopped = False

        async def stop() -> None:
            if not stopped:
                await service.stopService()

        self.addCleanup(stop)
        port = (await service.listen.listening).getHost().port
        assert service.announcement is not None and service.announcement.announcing is not None
        await service.announcement.announcing

        def lookup(timeout: int = 5000) -> Any:
            from zeroconf import Zeroconf

            zc = Zeroconf()
            try:
                info = zc.get_service_info(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", timeout=timeout)
                return info and (info.parsed_addresses(), info.port)
            finally:
                zc.close()

        self.assertEqual(await deferToThread(lookup), (["127.0.0.1"], port))
        stopped = True
        await service.stopService()
        self.assertIsNone(await deferToThread(lookup, 1500))


# -- options ---------------------------------------------------------------------------


class OptionTests(SynchronousTestCase):
    FARM = "alpha tcp:host=a:port=1 tcp:host=a:port=2"

    def api(self, *argv: str) -> Any:
        from privox.api.service import Options

        options = Options()
        options.parseOptions(["--farm", self.FARM, *argv])
        return options.settings

    def test_api(self) -> None:
        s = self.api()
        self.assertEqual((s.wyoming_listen, s.wyoming_key, s.wyoming_zeroconf), ("", "", ""))
        s = self.api("--wyoming-listen", "tcp:10300", "--wyoming-key", "K",
                     "--wyoming-zeroconf", "Privox")
        self.assertEqual((s.wyoming_listen, s.wyoming_key, s.wyoming_zeroconf),
                         ("tcp:10300", "K", "Privox"))
        self.api("--wyoming-listen", "tcp:10300", "--anonymous", "on")
        self.api("--wyoming-listen", "none")
        for argv, why in (
            (["--wyoming-listen", "tcp:10300"], "--wyoming-key"),
            (["--wyoming-listen", "tcp:10300", "--accounts", "none"], "--wyoming-key"),
            (["--wyoming-listen", "tcp:1", "--wyoming-key", "K", "--wyoming-zeroconf", "a.b"],
             "--wyoming-zeroconf"),
            (["--wyoming-zeroconf", "Privox"], "--wyoming-zeroconf needs --wyoming-listen"),
        ):
            e = self.assertRaises(usage.UsageError, self.api, *argv)
            self.assertIn(why, str(e))

    def test_local(self) -> None:
        from privox.local import LocalSettings, Options

        self.assertEqual(LocalSettings().wyoming_listen, "tcp:10300:interface=127.0.0.1")
        options = Options()
        options.parseOptions(["--wyoming-listen", "none", "--wyoming-key", "K"])
        self.assertEqual((options.settings.wyoming_listen, options.settings.wyoming_key),
                         ("none", "K"))
        e = self.assertRaises(usage.UsageError, Options().parseOptions,
                              ["--wyoming-zeroconf", "a.b"])
        self.assertIn("--wyoming-zeroconf", str(e))


# -- end to end ------------------------------------------------------------------------------


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EndToEndTests(TestCase):
    """
    A real C{twistd privox-local} (its bundled models, sealed jobs) serving
    Wyoming, and tests/wyoming_client.py talking to it with the C{wyoming}
    package's C{AsyncTcpClient}, as Home Assistant does: describe, speech
    plain and streamed, and that speech transcribed back, streamed.
    """

    timeout = 240

    async def test_homeAssistantClient(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        from tests.support import until
        from tests.test_e2e import ENV, REPO, TWISTD
        from tests.wer import wer

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        web, wyoming = freePort(), freePort()
        process = _Twistd()
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", "privox-local",
             "--port", str(web), "--wyoming-listen", f"tcp:{wyoming}:interface=127.0.0.1",
             "--accounts", f"sqlite:{os.path.join(work, 'accounts.sqlite3')}"],
            env=dict(ENV, HF_HUB_OFFLINE="1"), path=work,
        )
        self.addCleanup(process.stop)
        await until(lambda: b"Privox is serving" in process.output or process.ended is not None,
                    "privox-local starting", timeout=180)
        self.assertIsNone(process.ended, process.output.decode(errors="replace"))
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [os.path.join(REPO, "tests", "wyoming_client.py"), "127.0.0.1", str(wyoming)],
            env=ENV, path=REPO, reactor=reactor,
        )
        self.assertEqual(
            code, 0,
            (out + err + b"\n--- privox-local ---\n" + process.output[-20000:]).decode(
                errors="replace"
            ),
        )
        report = json.loads(out)
        [asr] = report["info"]["asr"]
        self.assertTrue(asr["supports_transcript_streaming"])
        self.assertEqual([m["name"] for m in asr["models"]], ["whisper:tiny.en"])
        self.assertTrue(report["info"]["tts"][0]["supports_synthesize_streaming"])
        sentence = report["sentence"]
        for name in ("plain", "streamed"):
            speech = report[name]
            self.assertGreater(speech["seconds"], 1.0, name)
            self.assertEqual(speech["rates"][:1], [22050], name)
        self.assertEqual(report["streamed"]["last"], "synthesize-stopped")
        self.assertGreaterEqual(report["streamed"]["segments"], 2)
        heard = report["heard"]
        self.assertEqual(heard["order"][0], "transcript-start")
        self.assertEqual(heard["order"][-2:], ["transcript", "transcript-stop"])
        self.assertLessEqual(wer(sentence, heard["text"]), 0.25, heard)
        self.assertLessEqual(wer(heard["text"], "".join(heard["chunks"])), 0.25, heard)
        # A request that fails: its error, then the end of its connection.
        self.assertEqual(
            report["refused"], {"code": "unsupported", "then": "closed", "next": "privox"}
        )
        self.assertNotIn(b"Traceback", process.output)


def exchange(port: int, request: bytes, until: str | None = None, timeout: float = 30.0) -> bytes:
    """
    Send C{request} to a Wyoming port and read what comes back until an
    event of type C{until}, or until the connection ends (blocking: run it
    in a thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                return data
            data += piece
            if until is not None and until in [e.type for e in _whole(data)]:
                return data


def _whole(data: bytes) -> list[LibraryEvent]:
    stream = io.BytesIO(data)
    found = []
    while (event := read_event(stream)) is not None:
        found.append(event)
    return found


class ApiProcessTests(TestCase):
    """
    C{twistd privox-api} with a Wyoming port: it serves describe, and a
    request whose job fails (no farm can be reached) is an error and the
    end of its connection; a Wyoming port that is taken ends the API with
    one line.
    """

    timeout = 120

    def start(self, *argv: str) -> _Twistd:
        from twisted.internet import reactor

        from tests.test_e2e import ENV, TWISTD

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        process = _Twistd()
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", "privox-api",
             "--listen", f"tcp:{freePort()}:interface=127.0.0.1",
             "--farm", "f tcp:host=127.0.0.1:port=9 tcp:host=127.0.0.1:port=9",
             "--accounts", f"sqlite:{os.path.join(work, 'accounts.sqlite3')}", *argv],
            env=ENV, path=work,
        )
        self.addCleanup(process.stop)
        return process

    async def test_serves(self) -> None:
        from twisted.internet.threads import deferToThread

        from tests.support import until

        port = freePort()
        process = self.start(
            "--anonymous", "on", "--wyoming-listen", f"tcp:{port}:interface=127.0.0.1"
        )
        await until(lambda: b"schema version" in process.output or process.ended is not None,
                    "privox-api starting")
        self.assertIsNone(process.ended, process.output)
        [info] = events(await deferToThread(exchange, port, library("describe"), "info"))
        self.assertEqual(Info.from_event(info).asr[0].models[0].name, "whisper:tiny.en")
        answer = events(await deferToThread(
            exchange, port, library("transcribe") + AUDIO_START + chunk(pcm(0.5)) + AUDIO_STOP
        ))
        self.assertEqual([e.type for e in answer], ["error"], answer)
        self.assertEqual(answer[0].data["code"], "no_capacity", answer[0].data)
        self.assertNotIn(b"Traceback", process.output)

    async def test_portTaken(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        process = self.start("--anonymous", "on", "--wyoming-listen", endpoint)
        await process.gone
        self.assertEqual(process.ended, 1, process.output)
        [line] = [line for line in process.output.decode().splitlines() if "#critical]" in line]
        self.assertIn(f"cannot listen on {endpoint}: Address already in use", line)
        self.assertIn("choose another with --wyoming-listen", line)


class LocalPortTests(TestCase):
    """
    C{twistd privox-local}: its default Wyoming port taken is a warning
    (another Wyoming server may hold it); a port named on the command line
    that cannot be had ends it with one line.
    """

    timeout = 180

    def start(self, *argv: str) -> _Twistd:
        from twisted.internet import reactor

        from tests.test_e2e import ENV, TWISTD

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        process = _Twistd()
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", "privox-local",
             "--port", "0", "--accounts", f"sqlite:{os.path.join(work, 'accounts.sqlite3')}",
             *argv],
            env=dict(ENV, HF_HUB_OFFLINE="1"), path=work,
        )
        self.addCleanup(process.stop)
        return process

    def take(self, port: int = 0) -> tuple[socket.socket | None, int]:
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", port))
        except OSError:
            taken.close()
            return None, port  # taken already
        taken.listen()
        self.addCleanup(taken.close)
        return taken, taken.getsockname()[1]

    async def test_defaultTaken(self) -> None:
        from tests.support import until

        self.take(10300)
        process = self.start()
        await until(lambda: b"Privox is serving" in process.output or process.ended is not None,
                    "privox-local starting", timeout=150)
        await until(lambda: b"no Wyoming server" in process.output or process.ended is not None,
                    "the warning")
        self.assertIsNone(process.ended, process.output)
        [line] = [line for line in process.output.decode().splitlines() if "no Wyoming" in line]
        self.assertIn("#warn]", line)
        self.assertIn("cannot listen on tcp:10300:interface=127.0.0.1", line)

    async def test_namedTaken(self) -> None:
        _, port = self.take()
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        process = self.start("--wyoming-listen", endpoint)
        await process.gone
        self.assertEqual(process.ended, 1, process.output)
        [line] = [line for line in process.output.decode().splitlines() if "#critical]" in line]
        self.assertIn(f"cannot listen on {endpoint} for Wyoming: Address already in use", line)
        self.assertIn("--wyoming-listen", line)
        self.assertNotIn(b"Traceback", process.output)


class _Twistd(ProcessProtocol):
    """
    A twistd process's output, and its end.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: int | None = None
        self.gone: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended = getattr(reason.value, "exitCode", -1)
        self.gone.callback(None)

    def stop(self) -> Deferred[None]:
        if self.ended is None:
            self.transport.signalProcess("TERM")
        return self.gone
