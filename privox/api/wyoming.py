"""
A Wyoming server: Home Assistant's Assist (and any other Wyoming client)
uses the exchange for speech to text and text to speech, both on one TCP
port (C{--wyoming-listen}).

Wyoming (U{https://github.com/OHF-Voice/wyoming}) is a stream of events.
Each is one UTF-8 JSON header line C{{"type", "data_length", "payload_length",
"version"}}, then C{data_length} bytes of JSON data, then C{payload_length}
bytes of payload (audio); older peers put C{data} in the header itself, and
both are read. L{Decoder} reads them from one buffer and checks each length
against its limit before it waits for a body, so a client cannot make the
server hold more than L{MAX_LINE}, L{MAX_DATA} and L{MAX_PAYLOAD} bytes of
one event; a header that cannot be read ends the connection, a bad event
in a readable frame is answered with an C{error} and skipped.

What a connection serves (one request at a time, in the order sent)::

    describe                                    -> info
    transcribe? audio-start audio-chunk* audio-stop
                                                -> transcript-start transcript-chunk*
                                                   transcript transcript-stop
    synthesize                                  -> audio-start audio-chunk* audio-stop
    synthesize-start synthesize-chunk* synthesize? synthesize-stop
                                                -> (audio-start audio-chunk* audio-stop)*
                                                   synthesize-stopped

A transcript's chunks are the live transcript as it is heard, append-only
(L{privox.api.deltas.AppendOnly}: the words hypotheses agree on, then each
utterance's final words); the C{transcript} has the whole text. A text stream's
audio comes sentence by sentence, each sentence framed by its own
C{audio-start} and C{audio-stop} as wyoming-piper frames them, all at the
rate of the first; the C{synthesize} a streaming client also sends (for
servers that cannot stream) is ignored. Audio comes in at any rate, width
and channel count and goes to the exchange as 16 kHz mono s16le.

Errors are C{error} events (C{text}, and C{code}: an L{ApiError}'s
C{kind}). A malformed event, or a request out of place (C{synthesize}
while an audio stream is open), is answered with one and the connection
stays usable. A request that fails (an unknown model or voice, no quota
left, no producer, the job lost) is answered with one and the connection
then ends, as wyoming-piper and wyoming-faster-whisper end theirs: the
answer its client waits for will not come, and Home Assistant waits for a
transcript, an C{audio-stop} or C{synthesize-stopped} until the connection
ends (it reads past C{error}). The server ends its side first and reads
past what the client still sends for a while (L{LINGER}), so that the
error is not lost to a reset connection. A stream the exchange ends early
(what the caller had left is used up) is answered as it stands, and the
rest of what the client sends of it is read past.

While the server waits on the exchange (a job starting, a transcript after
C{audio-stop}, speech after C{synthesize}) it reads nothing more from the
client, as a Wyoming server that handles one event at a time does; it also
stops reading while the client does not read what it is sent, and drops a
client that leaves more than L{MAX_BACKLOG} bytes unread.

Wyoming clients carry no key: every request spends the account of
C{--wyoming-key} (or anonymous use, where the API allows it).
C{--wyoming-zeroconf NAME} announces the port over mDNS
(C{_wyoming._tcp}, as Home Assistant discovers Wyoming servers) with
python-zeroconf, its blocking calls in threads (L{Announcement}).
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as packageVersion
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

import av
import numpy as np
from automat import TypeMachineBuilder
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from privox.api.deltas import AppendOnly
from privox.api.errors import ApiError, BadInput, TooLarge, Unprocessable
from privox.api.exchange import Heard, Transcribed
from privox.api.measure import spokenSeconds
from privox.api.models import ModelTable
from privox.automata import Transitions, build
from privox.daemon import ListenService
from privox.languages import LANGUAGES, UnknownLanguage, languageCode
from privox.logs import withoutPeerAddress
from privox.messages import CONTROL_CHARACTERS, MAX_TEXT

if TYPE_CHECKING:
    from privox.api.access import Access
    from privox.api.exchange import LiveSpeech, LiveTranscription

log = Logger()

#: The longest header line (with any data inline, as older peers send it).
MAX_LINE = 256 * 1024
#: The most bytes of an event's JSON data (a long text to say, a context).
MAX_DATA = 256 * 1024
#: The most bytes of an event's payload (an audio chunk: clients send ~2 KB).
MAX_PAYLOAD = 1024 * 1024
#: Bytes a client may leave unread (speech it does not take) before it is
#: dropped and its job cancelled.
MAX_BACKLOG = 8 * 1024 * 1024
#: Seconds of audio one utterance may last, by default.
MAX_SECONDS = 300.0
#: Seconds a connection may stay silent, with nothing in progress, before
#: it is closed.
IDLE_TIMEOUT = 300.0
#: Seconds a connection ended after an error reads past what its client
#: still sends, before it is closed whatever comes.
LINGER = 5.0
#: The audio the exchange takes.
RATE = 16000
#: Samples per C{audio-chunk} sent (wyoming-piper's default).
SAMPLES_PER_CHUNK = 1024
#: The version of the protocol these events follow (the first with the
#: streaming events).
WYOMING_VERSION = "1.7.0"
#: Where the exchange is found when Home Assistant announces it.
PROGRAM = "privox"

_WIDTHS = (1, 2, 3, 4)
_MAX_CHANNELS = 8
_MAX_RATE = 384_000
_MAX_TYPE = 64
_MAX_NAME = 200
#: The most characters of a client's word an error message repeats.
_SHOWN = 40


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: str
    data: dict[str, Any]
    payload: bytes = b""


class FramingError(Exception):
    """
    The stream cannot be read on (a header that is not JSON, a length
    beyond its limit): the connection ends after the C{error} it carries.
    """

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class BadEvent(Exception):
    """
    One event was malformed; its bytes were read past, so the next one can
    be read.
    """


@dataclass(frozen=True)
class _Header:
    fields: dict[str, Any]
    dataLength: int
    payloadLength: int


class Decoder:
    """
    Wyoming events from a byte stream, incrementally, in one buffer (as
    L{twisted.protocols.basic.LineReceiver} reads lines, then raw bytes).
    Every length is checked before its bytes are waited for.
    """

    def __init__(
        self, maxLine: int = MAX_LINE, maxData: int = MAX_DATA, maxPayload: int = MAX_PAYLOAD
    ) -> None:
        self.maxLine = maxLine
        self.maxData = maxData
        self.maxPayload = maxPayload
        self._buffer = bytearray()
        # How far the buffer was searched for a newline (a line arriving a
        # byte at a time is not searched again from its start each time).
        self._searched = 0
        self._header: _Header | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def buffered(self) -> int:
        return len(self._buffer)

    def next(self) -> Event | None:
        """
        The next whole event, or L{None} until more bytes come.

        @raise FramingError: the stream cannot be read on.
        @raise BadEvent: this event is malformed (and was read past).
        """
        while self._header is None:
            end = self._buffer.find(b"\n", self._searched, self.maxLine + 1)
            if end < 0:
                if len(self._buffer) > self.maxLine:
                    raise FramingError(
                        TooLarge(f"an event header is longer than {self.maxLine} bytes")
                    )
                self._searched = len(self._buffer)
                return None
            line = bytes(self._buffer[:end])
            # Deleting from the front of a bytearray is cheap (CPython moves
            # its start).
            del self._buffer[: end + 1]
            self._searched = 0
            if line.strip():
                self._header = self._parseHeader(line)
        header = self._header
        size = header.dataLength + header.payloadLength
        if len(self._buffer) < size:
            return None
        data = bytes(self._buffer[: header.dataLength])
        payload = bytes(self._buffer[header.dataLength : size])
        del self._buffer[:size]
        self._header = None
        return _event(header.fields, data, payload)

    def _parseHeader(self, line: bytes) -> _Header:
        try:
            fields = json.loads(line)
        except (ValueError, RecursionError):
            raise FramingError(BadInput("an event header is not JSON")) from None
        if not isinstance(fields, dict):
            raise FramingError(BadInput("an event header is not a JSON object"))
        return _Header(
            fields,
            _length(fields.get("data_length"), self.maxData, "data_length"),
            _length(fields.get("payload_length"), self.maxPayload, "payload_length"),
        )


def _length(value: Any, limit: int, name: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FramingError(BadInput(f"{name} is not a length"))
    if value > limit:
        raise FramingError(TooLarge(f"{name} is {value} bytes; the limit is {limit}"))
    return value


def _event(fields: dict[str, Any], data: bytes, payload: bytes) -> Event:
    kind = fields.get("type")
    if not isinstance(kind, str) or not kind or len(kind) > _MAX_TYPE:
        raise BadEvent("an event has no type")
    merged = fields.get("data") or {}
    if not isinstance(merged, dict):
        raise BadEvent(f"the data of {kind} is not a JSON object")
    if data:
        try:
            more = json.loads(data)
        except (ValueError, RecursionError):
            raise BadEvent(f"the data of {kind} is not JSON") from None
        if not isinstance(more, dict):
            raise BadEvent(f"the data of {kind} is not a JSON object")
        merged = {**merged, **more}
    return Event(kind, merged, payload)


def encode(kind: str, data: dict[str, Any] | None = None, payload: bytes = b"") -> list[bytes]:
    """
    An event as Wyoming writes it: the header line, the data, the payload.
    """
    header: dict[str, Any] = {"type": kind, "version": WYOMING_VERSION}
    body = b""
    if data:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        header["data_length"] = len(body)
    if payload:
        header["payload_length"] = len(payload)
    line = json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n"
    return [line, body, payload] if payload else [line + body]


# -- what a connection asks for ------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    rate: int
    width: int
    channels: int

    @classmethod
    def read(cls, data: dict[str, Any]) -> AudioFormat | None:
        """
        The format an C{audio-start} or C{audio-chunk} gives, or L{None}
        (absent, or beyond what is converted).
        """
        values = [data.get(k) for k in ("rate", "width", "channels")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        rate, width, channels = values
        if not (1000 <= rate <= _MAX_RATE and width in _WIDTHS and 1 <= channels <= _MAX_CHANNELS):
            return None
        return cls(rate, width, channels)


@dataclass(frozen=True)
class VoiceAsked:
    name: str | None = None
    language: str | None = None
    speaker: str | None = None

    @classmethod
    def read(cls, value: Any) -> VoiceAsked:
        if not isinstance(value, dict):
            return cls()
        return cls(*(_word(value.get(k)) for k in ("name", "language", "speaker")))


@dataclass(frozen=True)
class SpeechAsked:
    text: str
    voice: VoiceAsked
    textFormat: str | None = None


def _word(value: Any) -> str | None:
    return value.strip()[:_MAX_NAME] if isinstance(value, str) and value.strip() else None


def _shown(value: str) -> str:
    return value if len(value) <= _SHOWN else value[:_SHOWN] + "..."


# -- audio -------------------------------------------------------------------


def _toInt16(data: bytes, width: int) -> np.ndarray:
    if width == 2:
        return np.frombuffer(data, dtype="<i2")
    if width == 1:
        # Unsigned 8-bit, as WAV and audioop have it.
        return ((np.frombuffer(data, dtype=np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
    if width == 4:
        return (np.frombuffer(data, dtype="<i4") >> 16).astype(np.int16)
    # 24-bit: the top two bytes of each sample.
    triples = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
    return triples[:, 1:].copy().view("<i2").reshape(-1)


class Converter:
    """
    PCM of one format to s16le mono at C{rate}, a chunk at a time (samples
    split across chunks are kept for the next; the resampler's state runs
    on).
    """

    def __init__(self, source: AudioFormat, rate: int = RATE) -> None:
        self.source = source
        self.rate = rate
        self._frame = source.width * source.channels
        self._carry = b""
        self._resampler = (
            None
            if source.rate == rate
            else av.AudioResampler(format="s16", layout="mono", rate=rate)
        )

    def convert(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
        whole = len(data) - len(data) % self._frame
        self._carry = data[whole:]
        if whole == 0:
            return b""
        if self._resampler is None and self._frame == 2:
            return data[:whole]
        samples = _toInt16(data[:whole], self.source.width)
        if self.source.channels > 1:
            samples = samples.reshape(-1, self.source.channels).mean(axis=1).astype(np.int16)
        if self._resampler is None:
            return samples.tobytes()
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.source.rate
        return self._out(self._resampler.resample(frame))

    def flush(self) -> bytes:
        """
        What the resampler still holds, at the end of the stream.
        """
        self._carry = b""
        return b"" if self._resampler is None else self._out(self._resampler.resample(None))

    @staticmethod
    def _out(frames: list[Any]) -> bytes:
        return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)


# -- info ----------------------------------------------------------------------

_ATTRIBUTION = {
    "whisper": (
        "OpenAI Whisper, run by faster-whisper", "https://github.com/SYSTRAN/faster-whisper"
    ),
    "vosk": ("Alpha Cephei Vosk", "https://alphacephei.com/vosk/"),
    "piper": ("Rhasspy Piper", "https://github.com/rhasspy/piper"),
    "coqui": ("Coqui TTS", "https://github.com/coqui-ai/TTS"),
}


def _attribution(model: str) -> dict[str, str]:
    name, url = _ATTRIBUTION.get(model.split(":", 1)[0], ("Privox volunteers' nodes", ""))
    return {"name": name, "url": url}


def nameLanguage(model: str) -> str | None:
    """
    The language a model's name says it is for (C{whisper:tiny.en},
    C{vosk:ko}, C{piper:en_US-joe-medium}, C{coqui:tts_models/en/vctk/vits}:
    a word of the name that is a language code), or L{None} (a
    multilingual model, or one whose name does not say).
    """
    words = re.split(r"[^a-z0-9]+", model.split(":", 1)[-1].lower())
    return next((w for w in words if w in LANGUAGES), None)


def _version() -> str | None:
    try:
        return packageVersion("privox")
    except PackageNotFoundError:
        return None


def describe(models: ModelTable) -> dict[str, Any]:
    """
    The C{info} event's data for C{models}: one speech-to-text program
    whose models are the STT models the table sends jobs to, each with the
    languages the table sends it (less those its name rules out: an
    English-only model serves English only); one text-to-speech program
    whose voices are the table's, each in the language its model's name
    says (else the API's default language).
    """
    routes: dict[str, set[str]] = {}
    qualities: dict[str, list[str]] = {}
    for quality in models.stt:
        for code in LANGUAGES:
            model = models.sttModel(quality, code)
            routes.setdefault(model, set()).add(code)
            if quality not in qualities.setdefault(model, []):
                qualities[model].append(quality)
    version = _version()
    asr = []
    for model, codes in routes.items():
        own = nameLanguage(model)
        if own is not None:
            codes = codes & {own}
        if not codes:
            continue
        pinned = sorted(c for c, m in models.sttLanguages.items() if m == model)
        described = f"{model}: qualities {', '.join(qualities[model])}"
        if pinned:
            described += f"; pinned for {', '.join(pinned)}"
        asr.append({
            "name": model,
            "languages": sorted(codes),
            "attribution": _attribution(model),
            "installed": True,
            "description": described,
            "version": None,
        })
    voices = []
    for name, voice in models.voices.items():
        voices.append({
            "name": name,
            "languages": [nameLanguage(voice.model) or models.defaultLanguage],
            "speakers": [{"name": voice.speaker}] if voice.speaker else None,
            "attribution": _attribution(voice.model),
            "installed": True,
            "description": voice.model + (f" ({voice.speaker})" if voice.speaker else ""),
            "version": None,
        })
    privox = {"name": "Privox", "url": ""}
    return {
        "asr": [{
            "name": PROGRAM,
            "attribution": privox,
            "installed": True,
            "description": "Privox: speech to text on volunteers' machines",
            "version": version,
            "models": asr,
            "supports_transcript_streaming": True,
        }],
        "tts": [{
            "name": PROGRAM,
            "attribution": privox,
            "installed": True,
            "description": "Privox: text to speech on volunteers' machines",
            "version": version,
            "voices": voices,
            "supports_synthesize_streaming": True,
        }],
        "handle": [], "intent": [], "wake": [], "mic": [], "snd": [],
    }


# -- what runs the jobs --------------------------------------------------------


class Jobs(TypingProtocol):
    """
    What the server needs from L{privox.api.live.LiveJobs}: live jobs that
    hold and settle their caller's seconds.
    """

    async def transcribe(
        self, caller: Any, model: str, language: str | None, heard: Callable[[Heard], None]
    ) -> LiveTranscription: ...

    async def speak(
        self,
        caller: Any,
        model: str,
        language: str | None,
        voice: str | None,
        spoken: Callable[[bytes, int], None],
        need: float | None = None,
    ) -> LiveSpeech: ...


# -- a connection, as a machine ------------------------------------------------


class Session(TypingProtocol):
    """
    What happens to a connection: the client's requests, its jobs' news,
    and its end.
    """

    def audioStart(self, format: AudioFormat | None) -> None:
        "C{audio-start} (its format, L{None} if unusable)."

    def audioChunk(self, format: AudioFormat | None, pcm: bytes) -> None:
        "C{audio-chunk} (its own format, if it gives a usable one)."

    def audioStop(self) -> None:
        "C{audio-stop}."

    def synthesize(self, asked: SpeechAsked) -> None:
        "C{synthesize}."

    def synthesizeStart(self, voice: VoiceAsked) -> None:
        "C{synthesize-start}."

    def synthesizeChunk(self, text: str) -> None:
        "C{synthesize-chunk}."

    def synthesizeStop(self) -> None:
        "C{synthesize-stop}."

    def started(self, job: Any) -> None:
        "The exchange took the job."

    def heard(self, piece: Heard) -> None:
        "A piece of the live transcript."

    def spoken(self, pcm: bytes, rate: int) -> None:
        "A sentence's audio."

    def finished(self, result: Any) -> None:
        "The job is done (a L{Transcribed}, or the seconds spoken)."

    def failed(self, error: ApiError) -> None:
        "The request failed."

    def lost(self) -> None:
        "The connection is gone."


# -- the protocol ----------------------------------------------------------------


@implementer(IPushProducer, IHalfCloseableProtocol)
class WyomingProtocol(Protocol, TimeoutMixin):
    """
    One Wyoming client. Parses its events (L{Decoder}), answers C{describe}
    and C{ping} itself, and feeds requests to its L{Session} machine, which
    calls back the plain methods below.
    """

    factory: WyomingFactory

    def __init__(self, factory: WyomingFactory) -> None:
        self.factory = factory
        self.session: Session = _newSession(self)
        self._decoder = Decoder(factory.maxLine, factory.maxData, factory.maxPayload)
        # Why reading is held: "job" (waiting on the exchange), "writes"
        # (the client does not read).
        self._holds: set[str] = set()
        self._draining = False
        self._closing = False
        self._lingering: Any = None
        self._backlog = 0
        # transcribe's name and language, for the utterances that follow.
        self._asked: tuple[str | None, str | None] = (None, None)
        # The request in progress: its token (news of older ones is
        # dropped), the Deferred starting its job, the job.
        self._token: object | None = None
        self._starting: Deferred[Any] | None = None
        self._job: Any = None
        self._kind = ""
        self._model = ""
        # An utterance: its audio's converter, seconds heard, its language,
        # whether transcript-start was sent, chunks sent.
        self._converter: Converter | None = None
        # The chunk that began a stream that had no audio-start.
        self._pending: bytes | None = None
        self._seconds = 0.0
        self._language: str | None = None
        self._transcriptStarted = False
        self._chunks = 0
        self._appendOnly = AppendOnly()
        # Speech: the text asked for, text said so far, the rate of the
        # first audio, whether audio-start was sent.
        self._speech: SpeechAsked | None = None
        self._said = 0
        self._rate: int | None = None
        self._audioStarted = False

    # -- the connection --

    def connectionMade(self) -> None:
        withoutPeerAddress(self.transport)
        self.callLater = self.factory.clock.callLater  # type: ignore[method-assign]
        self.setTimeout(self.factory.idleTimeout)
        self.transport.registerProducer(self, True)
        self.factory.opened(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self._closing = True
        self.session.lost()
        self.factory.closed(self)

    def timeoutConnection(self) -> None:
        if self._job is not None or self._starting is not None:
            # The exchange is working for this client: not idle.
            self.setTimeout(self.factory.idleTimeout)
            return
        self.close()

    def close(self, linger: bool = True) -> None:
        """
        End the connection (its job, if any, is cancelled as it goes).

        @param linger: end only this side first (what was sent, an error,
            is read to its end), and read past what the client still sends
            until it ends its side too, for at most L{LINGER} seconds:
            closing a socket with bytes unread resets the connection, and
            a client can lose the error it was sent.
        """
        if self._closing:
            if not linger and self._lingering is not None:
                self.transport.loseConnection()
            return
        self._closing = True
        if linger and IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()
            self._lingering = self.factory.clock.callLater(
                self.factory.linger, self.transport.loseConnection
            )
            return
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        # The client ended its side: nothing more is coming.
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._closing:
            return
        self._decoder.feed(data)
        self._drain()

    # The transport's write buffer (IPushProducer, registered on it).

    def pauseProducing(self) -> None:
        self._backlog = 0
        self._hold("writes")

    def resumeProducing(self) -> None:
        self._backlog = 0
        self._release("writes")
        self._drain()

    def stopProducing(self) -> None:
        pass

    def _hold(self, why: str) -> None:
        if not self._holds and not self._closing:
            self.transport.pauseProducing()
        self._holds.add(why)

    def _release(self, why: str) -> None:
        if why in self._holds:
            self._holds.discard(why)
            if not self._holds and not self._closing:
                self.transport.resumeProducing()

    def _drain(self) -> None:
        """
        Handle the events buffered, in order, until there are no more or
        reading is held. Never nested: news from a job that comes while an
        event is being handled is handled after it (Automat queues it), and
        this loop then goes on.
        """
        if self._draining:
            return
        self._draining = True
        try:
            while not self._holds and not self._closing:
                try:
                    event = self._decoder.next()
                except BadEvent as e:
                    self._error(BadInput(str(e)))
                    continue
                except FramingError as e:
                    log.info("Wyoming client dropped: {reason}", reason=e.error.message)
                    self._error(e.error)
                    self.close()
                    break
                if event is None:
                    break
                self._dispatch(event)
        finally:
            self._draining = False

    def _send(self, kind: str, data: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        self._out(encode(kind, data, payload))

    def _out(self, pieces: list[bytes]) -> None:
        if "writes" in self._holds:
            self._backlog += sum(len(p) for p in pieces)
            if self._backlog > self.factory.maxBacklog and not self._closing:
                log.info("Wyoming client dropped: it leaves what it is sent unread")
                self._closing = True
                self.transport.abortConnection()
                return
        self.transport.writeSequence(pieces)

    def _error(self, error: ApiError) -> None:
        text = " ".join(error.message.split()) or error.kind
        self._send("error", {"text": text, "code": error.kind})

    # -- events --

    def _dispatch(self, event: Event) -> None:
        handler = self._handlers.get(event.type)
        if handler is not None:
            handler(self, event)
        # Anything else (select-program, events of other domains) is
        # dropped, as Wyoming servers do.

    def _describe(self, event: Event) -> None:
        self._out([self.factory.info])

    def _ping(self, event: Event) -> None:
        text = event.data.get("text")
        self._send("pong", {"text": text[:_MAX_NAME] if isinstance(text, str) else None})

    def _transcribe(self, event: Event) -> None:
        self._asked = (_word(event.data.get("name")), _word(event.data.get("language")))

    def _audioStart(self, event: Event) -> None:
        self.session.audioStart(AudioFormat.read(event.data))

    def _audioChunk(self, event: Event) -> None:
        self.session.audioChunk(AudioFormat.read(event.data), event.payload)

    def _audioStop(self, event: Event) -> None:
        self.session.audioStop()

    def _synthesize(self, event: Event) -> None:
        text = event.data.get("text")
        textFormat = event.data.get("text_format")
        self.session.synthesize(SpeechAsked(
            text if isinstance(text, str) else "",
            VoiceAsked.read(event.data.get("voice")),
            textFormat if isinstance(textFormat, str) else None,
        ))

    def _synthesizeStart(self, event: Event) -> None:
        self.session.synthesizeStart(VoiceAsked.read(event.data.get("voice")))

    def _synthesizeChunk(self, event: Event) -> None:
        text = event.data.get("text")
        self.session.synthesizeChunk(text if isinstance(text, str) else "")

    def _synthesizeStop(self, event: Event) -> None:
        self.session.synthesizeStop()

    _handlers: dict[str, Callable[[WyomingProtocol, Event], None]] = {
        "describe": _describe,
        "ping": _ping,
        "transcribe": _transcribe,
        "audio-start": _audioStart,
        "audio-chunk": _audioChunk,
        "audio-stop": _audioStop,
        "synthesize": _synthesize,
        "synthesize-start": _synthesizeStart,
        "synthesize-chunk": _synthesizeChunk,
        "synthesize-stop": _synthesizeStop,
    }

    # -- jobs: what the machine's outputs call --

    def _begin(self, kind: str, opening: Any) -> None:
        """
        Start a request's job (C{opening}: a coroutine that returns it),
        reading held until it runs.
        """
        self._hold("job")
        token = self._token = object()
        self._kind = kind
        self._starting = Deferred.fromCoroutine(opening(token))
        self._starting.addCallbacks(
            lambda job: self._started(token, job), lambda f: self._news(token, f)
        )

    def _started(self, token: object, job: Any) -> None:
        if token is not self._token:
            job.cancel()
            return
        self._starting = None
        self._job = job
        job.done.addCallbacks(
            lambda result: self._news(token, result), lambda f: self._news(token, f)
        )
        self.session.started(job)
        self._drain()

    def _news(self, token: object, outcome: Any) -> None:
        """
        A job's end (a result, or a L{Failure}), if it is still the
        current request's.
        """
        if token is not self._token:
            # An ended request's (cancelled here): nothing to say.
            return
        if isinstance(outcome, Failure):
            self._starting = None
            self.session.failed(_apiError(outcome))
        else:
            self.session.finished(outcome)
        self._drain()

    def _callback(self, token: object, call: Callable[[], None]) -> None:
        if token is self._token:
            call()
            self._drain()

    def release(self) -> None:
        self._release("job")

    def fail(self, error: ApiError) -> None:
        """
        The request failed: the client is told, its job (if any) given up,
        and the connection ended.
        """
        log.info(
            "Wyoming {kind} failed: {code}", kind=self._kind or "request", code=error.kind
        )
        self._error(error)
        self.endJob()
        self.close()

    def refuse(self, error: ApiError) -> None:
        """
        A request that cannot be served now: the client is told; the
        request in progress goes on.
        """
        self._error(error)

    def endJob(self) -> None:
        """
        Forget the request's job (cancelled if it still runs): its news is
        dropped from now on.
        """
        job, self._job = self._job, None
        starting, self._starting = self._starting, None
        self._token = None
        self._kind = ""
        if job is not None:
            job.cancel()
        if starting is not None:
            starting.cancel()

    def abandon(self) -> None:
        "The client went away: its job is given up."
        self.endJob()

    # Speech to text.

    def openHearing(self, format: AudioFormat | None, pcm: bytes | None) -> None:
        self._kind = "transcription"
        self._seconds = 0.0
        self._transcriptStarted = False
        self._chunks = 0
        self._appendOnly = AppendOnly()
        self._converter = None
        try:
            if format is None:
                raise BadInput(
                    "audio needs a rate (1000 to 384000 Hz), a width (1 to 4 bytes) and"
                    f" 1 to {_MAX_CHANNELS} channels"
                )
            self._converter = Converter(format)
            model, language = self._sttModel()
        except ApiError as e:
            self._failNow(e)
            return
        self._model = model
        self._language = language
        self._pending = pcm

        async def opening(token: object) -> LiveTranscription:
            caller = await self.factory.access.authorize(self.factory.key or None)
            return await self.factory.jobs.transcribe(
                caller, model, language,
                lambda piece: self._callback(token, lambda: self.session.heard(piece)),
            )

        self._begin("transcription", opening)

    def _failNow(self, error: ApiError) -> None:
        # Refused before a job: the machine hears it once this input is done.
        self.session.failed(error)

    def _sttModel(self) -> tuple[str, str | None]:
        """
        @raise ApiError: an unknown model, quality or language.
        """
        name, language = self._asked
        models = self.factory.models
        try:
            code = languageCode(language) if language else None
        except UnknownLanguage as e:
            raise Unprocessable(str(e)) from None
        if not name or name in models.stt:
            return models.sttModel(name, code), code
        if name in models.byService()["stt"]:
            return name, code
        raise Unprocessable(
            f"unknown model {_shown(name)!r}: name a model of the info, or a quality"
            f" ({', '.join(models.stt)})"
        )

    def hearingStarted(self, job: Any) -> None:
        self.release()
        pending, self._pending = self._pending, None
        if pending:
            self.hear(None, pending)

    def hear(self, format: AudioFormat | None, pcm: bytes) -> None:
        converter = self._converter
        assert converter is not None
        if format is not None and format != converter.source:
            # A chunk in another format than the stream's: convert it as it is.
            converter = self._converter = Converter(format)
        out = converter.convert(pcm)
        self._write(out)

    def _write(self, pcm: bytes) -> None:
        if not pcm or self._job is None:
            return
        self._seconds += len(pcm) / (2 * RATE)
        if self._seconds > self.factory.maxSeconds:
            self.session.failed(TooLarge(
                f"an utterance may last {self.factory.maxSeconds:g} s; this one is longer"
            ))
            return
        self._job.write(pcm)

    def endHearing(self) -> None:
        self._hold("job")
        if self._converter is not None:
            self._write(self._converter.flush())
        if self._job is not None:
            self._job.end()

    def heardPiece(self, piece: Heard) -> None:
        text = self._appendOnly.heard(piece)
        if not text:
            return
        self._startTranscript()
        self._send("transcript-chunk", {"text": text})
        self._chunks += 1

    def _startTranscript(self) -> None:
        if not self._transcriptStarted:
            self._transcriptStarted = True
            self._send("transcript-start", {"language": self._transcriptLanguage(None)})

    def _transcriptLanguage(self, result: Transcribed | None) -> str:
        said = result.language if result is not None else None
        return said or self._language or self.factory.models.defaultLanguage

    def transcript(self, result: Transcribed) -> None:
        self._startTranscript()
        text = " ".join(result.text.split())
        self._send("transcript", {"text": text, "language": self._transcriptLanguage(result)})
        self._send("transcript-stop")
        log.info(
            "Wyoming transcription with {model}: {seconds:.1f} s of audio",
            model=self._model, seconds=self._seconds,
        )
        self.endJob()

    def emptyTranscript(self) -> None:
        # audio-stop with no audio before it (wyoming-faster-whisper answers
        # the same).
        self._transcriptStarted = False
        try:
            self._language = self._sttModel()[1]
        except ApiError:
            self._language = None
        self._startTranscript()
        self._send("transcript", {"text": "", "language": self._transcriptLanguage(None)})
        self._send("transcript-stop")

    def endUtterance(self) -> None:
        self._converter = None

    # Text to speech.

    def _voice(self, asked: VoiceAsked) -> tuple[str, str | None, str | None]:
        """
        The model, language and speaker for the voice a client asks for:
        the table's voice by name, else the first voice in the language
        asked for, else the default voice.

        @raise ApiError: an unknown voice or language.
        """
        models = self.factory.models
        try:
            code = languageCode(asked.language) if asked.language else None
        except UnknownLanguage as e:
            raise Unprocessable(str(e)) from None
        if asked.name:
            try:
                voice = models.voice(asked.name)
            except Unprocessable:
                raise Unprocessable(
                    f"unknown voice {_shown(asked.name)!r}; voices: {', '.join(models.voices)}"
                ) from None
        elif code:
            voice = next(
                (
                    v for v in models.voices.values()
                    if (nameLanguage(v.model) or models.defaultLanguage) == code
                ),
                None,
            )
            if voice is None:
                raise Unprocessable(f"no voice speaks {code}")
        else:
            voice = models.voice(None)
        return voice.model, code, voice.speaker

    def _openSpeaking(self, voice: VoiceAsked, kind: str, need: float | None) -> None:
        self._said = 0
        self._rate = None
        self._audioStarted = False
        self._seconds = 0.0
        model, language, speaker = self._voice(voice)
        self._model = model

        async def opening(token: object) -> LiveSpeech:
            caller = await self.factory.access.authorize(self.factory.key or None)
            return await self.factory.jobs.speak(
                caller, model, language, speaker,
                lambda pcm, rate: self._callback(token, lambda: self.session.spoken(pcm, rate)),
                need=need,
            )

        self._begin(kind, opening)

    def openSpeech(self, asked: SpeechAsked) -> None:
        self._kind = "speech"
        self._speech = None
        try:
            if asked.textFormat not in (None, "text"):
                raise Unprocessable("only plain text is spoken (text_format 'text')")
            text = _sayable(asked.text, 0)
            if not text.strip():
                raise BadInput("there is no text to say")
            self._speech = SpeechAsked(text, asked.voice)
            # The text is known: what it may take to say is held, no more.
            self._openSpeaking(asked.voice, "speech", spokenSeconds(text))
        except ApiError as e:
            self._failNow(e)

    def speechStarted(self, job: Any) -> None:
        assert self._speech is not None
        job.write(self._speech.text)
        job.end()

    def openStream(self, voice: VoiceAsked) -> None:
        self._kind = "speech stream"
        try:
            self._openSpeaking(voice, "speech stream", None)
        except ApiError as e:
            self._failNow(e)

    def streamStarted(self, job: Any) -> None:
        pass

    def say(self, text: str) -> None:
        try:
            text = _sayable(text, self._said)
        except ApiError as e:
            self.session.failed(e)
            return
        self._said += len(text)
        if text and self._job is not None:
            self._job.write(text)

    def endStream(self) -> None:
        self._hold("job")
        if self._job is not None:
            self._job.end()

    def audio(self, pcm: bytes, rate: int, segment: bool) -> None:
        """
        Speech from the exchange, to the client in chunks (a sentence of a
        text stream framed by its own audio-start and audio-stop), all at
        the rate of the first.
        """
        if not 1000 <= rate <= _MAX_RATE:
            self.session.failed(ApiError(f"the node sent audio at {rate} Hz"))
            return
        pcm = pcm[: len(pcm) & ~1]
        if self._rate is None:
            self._rate = rate
        if rate != self._rate:
            # Rare (one model speaks at one rate): a sentence at another rate
            # is brought to the first's, whole.
            converter = Converter(AudioFormat(rate, 2, 1), self._rate)
            pcm = converter.convert(pcm) + converter.flush()
        format = {"rate": self._rate, "width": 2, "channels": 1}
        if segment or not self._audioStarted:
            self._audioStarted = True
            self._send("audio-start", format)
        self._seconds += len(pcm) / (2 * self._rate)
        step = SAMPLES_PER_CHUNK * 2
        for offset in range(0, len(pcm), step):
            self._send("audio-chunk", format, pcm[offset : offset + step])
        if segment:
            self._send("audio-stop")

    def _spokenLog(self) -> None:
        log.info(
            "Wyoming {kind} with {model}: {seconds:.1f} s of speech",
            kind=self._kind, model=self._model, seconds=self._seconds,
        )

    def audioStop(self, result: Any) -> None:
        self._spokenLog()
        self._send("audio-stop")
        self.endJob()

    def streamStopped(self, result: Any) -> None:
        if result is not None:
            self._spokenLog()
        self._send("synthesize-stopped")
        self.endJob()


# -- the machine ---------------------------------------------------------------
#
#        audio-start (or a chunk)          started          audio-stop            finished
#   idle ──────────────▶ hearingStarting ────────▶ hearing ────────▶ hearingEnding ───────▶ idle
#    │  synthesize                         started                         finished
#    ├─────────────────▶ speakingStarting ───────▶ speaking ─────────────────────────────▶ idle
#    │  synthesize-start                   started       synthesize-stop       finished
#    └─────────────────▶ streamStarting ─────────▶ streaming ──────▶ streamEnding ────────▶ idle
#
#   hearing, streaming ──finished (the exchange ended the stream)──▶ hearingDiscard, streamDiscard
#                      ──audio-stop, synthesize-stop──▶ idle
#   any of them ──failed──▶ closed (the error said, the connection ended)
#   any ──lost──▶ closed (the job cancelled)

_builder = TypeMachineBuilder(Session, WyomingProtocol)
idle = _builder.state("idle")
# The *Starting and *Ending states (and speaking) are held: the client is
# not read while the server waits on the exchange. A request that fails
# ends the connection (closed).
hearingStarting = _builder.state("hearingStarting")
hearing = _builder.state("hearing")
hearingEnding = _builder.state("hearingEnding")
# An audio stream the exchange ended early, read past until its audio-stop.
hearingDiscard = _builder.state("hearingDiscard")
speakingStarting = _builder.state("speakingStarting")
speaking = _builder.state("speaking")
streamStarting = _builder.state("streamStarting")
streaming = _builder.state("streaming")
streamEnding = _builder.state("streamEnding")
# A text stream the exchange ended early, read past until its synthesize-stop.
streamDiscard = _builder.state("streamDiscard")
closed = _builder.state("closed")
_STATES = [
    idle, hearingStarting, hearing, hearingEnding, hearingDiscard, speakingStarting,
    speaking, streamStarting, streaming, streamEnding, streamDiscard, closed,
]
_transitions = Transitions()
_on = _transitions.on


# A new utterance: audio-start, or (a client that sends none) its first chunk.
@_on([idle], Session.audioStart, hearingStarting)
def _audioStart(session: Session, p: WyomingProtocol, format: AudioFormat | None) -> None:
    p.openHearing(format, None)


@_on([idle], Session.audioChunk, hearingStarting)
def _firstChunk(
    session: Session, p: WyomingProtocol, format: AudioFormat | None, pcm: bytes
) -> None:
    p.openHearing(format, pcm)


@_on([idle], Session.audioStop)
def _noAudio(session: Session, p: WyomingProtocol) -> None:
    p.emptyTranscript()


@_on([hearingStarting], Session.started, hearing)
def _hearingStarted(session: Session, p: WyomingProtocol, job: Any) -> None:
    p.hearingStarted(job)


@_on([hearing], Session.audioChunk)
def _chunk(session: Session, p: WyomingProtocol, format: AudioFormat | None, pcm: bytes) -> None:
    p.hear(format, pcm)


@_on([hearing], Session.audioStop, hearingEnding)
def _audioStop(session: Session, p: WyomingProtocol) -> None:
    p.endHearing()


@_on([hearing, hearingEnding], Session.heard)
def _heard(session: Session, p: WyomingProtocol, piece: Heard) -> None:
    p.heardPiece(piece)


@_on([hearingEnding], Session.finished, idle)
def _transcribed(session: Session, p: WyomingProtocol, result: Any) -> None:
    p.transcript(result)
    p.release()


@_on([hearing], Session.finished, hearingDiscard)
def _transcribedEarly(session: Session, p: WyomingProtocol, result: Any) -> None:
    # The exchange ended the job before the client ended its audio.
    p.transcript(result)


@_on([hearingStarting, hearing, hearingEnding], Session.failed, closed)
@_on([speakingStarting, speaking], Session.failed, closed)
@_on([streamStarting, streaming, streamEnding], Session.failed, closed)
def _failed(session: Session, p: WyomingProtocol, error: ApiError) -> None:
    # The error, then the end of the connection: the answer the client
    # waits for (a transcript, an audio-stop, synthesize-stopped) will not
    # come, and Home Assistant waits for it until the connection ends.
    p.fail(error)


@_on([hearingDiscard], Session.audioStop, idle)
def _discarded(session: Session, p: WyomingProtocol) -> None:
    p.endUtterance()


@_on([idle], Session.synthesize, speakingStarting)
def _synthesize(session: Session, p: WyomingProtocol, asked: SpeechAsked) -> None:
    p.openSpeech(asked)


@_on([speakingStarting], Session.started, speaking)
def _speechStarted(session: Session, p: WyomingProtocol, job: Any) -> None:
    p.speechStarted(job)


@_on([speaking], Session.spoken)
def _spoken(session: Session, p: WyomingProtocol, pcm: bytes, rate: int) -> None:
    p.audio(pcm, rate, segment=False)


@_on([speaking], Session.finished, idle)
def _spokenAll(session: Session, p: WyomingProtocol, result: Any) -> None:
    p.audioStop(result)
    p.release()


@_on([idle], Session.synthesizeStart, streamStarting)
def _synthesizeStart(session: Session, p: WyomingProtocol, voice: VoiceAsked) -> None:
    p.openStream(voice)


@_on([streamStarting], Session.started, streaming)
def _streamStarted(session: Session, p: WyomingProtocol, job: Any) -> None:
    p.streamStarted(job)
    p.release()


@_on([streaming], Session.synthesizeChunk)
def _synthesizeChunk(session: Session, p: WyomingProtocol, text: str) -> None:
    p.say(text)


@_on([streaming, streamDiscard], Session.synthesize)
@_on([streamDiscard], Session.synthesizeChunk)
def _compatibility(session: Session, p: WyomingProtocol, *ignored: object) -> None:
    # The whole text again, for servers that cannot stream; or text of a
    # stream that failed.
    pass


@_on([streaming], Session.synthesizeStop, streamEnding)
def _synthesizeStop(session: Session, p: WyomingProtocol) -> None:
    p.endStream()


@_on([streaming, streamEnding], Session.spoken)
def _sentence(session: Session, p: WyomingProtocol, pcm: bytes, rate: int) -> None:
    p.audio(pcm, rate, segment=True)


@_on([streamEnding], Session.finished, idle)
def _streamDone(session: Session, p: WyomingProtocol, result: Any) -> None:
    p.streamStopped(result)
    p.release()


@_on([streaming], Session.finished, streamDiscard)
def _streamEndedEarly(session: Session, p: WyomingProtocol, result: Any) -> None:
    p.endJob()


@_on([streamDiscard], Session.synthesizeStop, idle)
def _discardedStream(session: Session, p: WyomingProtocol) -> None:
    p.streamStopped(None)


@_on([hearing, hearingDiscard], Session.synthesize)
@_on([hearing, hearingDiscard], Session.synthesizeStart)
@_on([hearing, hearingDiscard], Session.synthesizeChunk)
@_on([hearing, hearingDiscard], Session.synthesizeStop)
def _busyHearing(session: Session, p: WyomingProtocol, *ignored: object) -> None:
    p.refuse(BadInput("an audio stream is open: end it with audio-stop first"))


@_on([streaming, streamDiscard], Session.audioStart)
@_on([streaming, streamDiscard], Session.audioChunk)
@_on([streaming, streamDiscard], Session.audioStop)
@_on([streaming, streamDiscard], Session.synthesizeStart)
def _busyStreaming(session: Session, p: WyomingProtocol, *ignored: object) -> None:
    p.refuse(BadInput("a text stream is open: end it with synthesize-stop first"))


@_on([idle], Session.synthesizeChunk)
@_on([idle], Session.synthesizeStop)
def _noStream(session: Session, p: WyomingProtocol, *ignored: object) -> None:
    p.refuse(BadInput("synthesize-chunk and synthesize-stop come after synthesize-start"))


@_on([hearingStarting, speakingStarting, streamStarting], Session.lost, closed)
def _lostStarting(session: Session, p: WyomingProtocol) -> None:
    p.abandon()


@_on([hearing, hearingEnding, speaking, streaming, streamEnding], Session.lost, closed)
def _lostRunning(session: Session, p: WyomingProtocol) -> None:
    p.abandon()


@_on([idle, hearingDiscard, streamDiscard], Session.lost, closed)
def _lostIdle(session: Session, p: WyomingProtocol) -> None:
    pass


def _ignore(session: Session, p: WyomingProtocol, *ignored: object) -> None:
    # Nothing to do: an audio stream's second audio-start, a job's news
    # after it ended, anything once the connection is gone, and (never
    # seen: reading is held then) a request while the server waits.
    pass


_transitions.ignoreTheRest(_STATES, [
    Session.audioStart, Session.audioChunk, Session.audioStop, Session.synthesize,
    Session.synthesizeStart, Session.synthesizeChunk, Session.synthesizeStop,
    Session.started, Session.heard, Session.spoken, Session.finished, Session.failed,
    Session.lost,
], _ignore)

_newSession = build(_builder)


def _sayable(text: str, said: int) -> str:
    """
    Text to say, control characters made spaces.

    @param said: characters of the request said before this text.
    @raise TooLarge: the request would say more than L{MAX_TEXT} characters.
    """
    if said + len(text) > MAX_TEXT:
        raise TooLarge(f"at most {MAX_TEXT} characters are spoken in one request")
    return CONTROL_CHARACTERS.sub(" ", text)


def _apiError(failure: Failure) -> ApiError:
    if failure.check(ApiError):
        return failure.value  # type: ignore[no-any-return]
    if failure.check(CancelledError):
        return ApiError("the job was cancelled on the server")
    log.failure("a Wyoming request failed", failure)
    return ApiError("the request failed on the server")


class WyomingFactory(Factory):
    """
    Wyoming connections, served by C{jobs} for the account of C{key} (its
    holder's quota; L{None}: anonymous use) with the models of C{models}.
    Knows its open connections, so stopping can close them.

    @param maxSeconds: the longest utterance, in seconds of audio (default:
        C{jobs.maxSeconds}, as long as a live job may be).
    """

    protocol = WyomingProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        jobs: Jobs,
        access: Access,
        models: ModelTable,
        clock: Any,
        key: str | None = None,
        maxSeconds: float | None = None,
        idleTimeout: float = IDLE_TIMEOUT,
        maxLine: int = MAX_LINE,
        maxData: int = MAX_DATA,
        maxPayload: int = MAX_PAYLOAD,
        maxBacklog: int = MAX_BACKLOG,
        linger: float = LINGER,
    ) -> None:
        self.jobs = jobs
        self.access = access
        self.models = models
        self.clock = clock
        self.key = key
        # The longest utterance: as long as a live job may be.
        self.maxSeconds = (
            maxSeconds if maxSeconds is not None else getattr(jobs, "maxSeconds", MAX_SECONDS)
        )
        self.idleTimeout = idleTimeout
        self.maxLine = maxLine
        self.maxData = maxData
        self.maxPayload = maxPayload
        self.maxBacklog = maxBacklog
        self.linger = linger
        self.info = b"".join(encode("info", describe(models)))
        self.connections: set[WyomingProtocol] = set()
        self._emptied: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> WyomingProtocol:
        return WyomingProtocol(self)

    def opened(self, protocol: WyomingProtocol) -> None:
        self.connections.add(protocol)

    def closed(self, protocol: WyomingProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def closeAll(self) -> Deferred[None]:
        """
        Close every connection (their jobs are cancelled); fires once all
        are gone.
        """
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._emptied.append(d)
        for protocol in list(self.connections):
            protocol.close(linger=False)
        return d


# -- zeroconf --------------------------------------------------------------------

#: Home Assistant discovers Wyoming servers by this mDNS service type.
SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS = ("224.0.0.251", 5353)


def serving(endpoint: str) -> bool:
    "Whether C{--wyoming-listen} turns the server on (empty and C{none} do not)."
    return endpoint.strip() not in ("", "none")


def optionError(endpoint: str, zeroconfName: str) -> str | None:
    """
    Why C{--wyoming-listen} and C{--wyoming-zeroconf} cannot be used
    together, or L{None}.
    """
    if not zeroconfName:
        return None
    if not serving(endpoint):
        return "--wyoming-zeroconf needs --wyoming-listen"
    why = checkZeroconfName(zeroconfName)
    if why is not None:
        return f"--wyoming-zeroconf: {why}"
    if not zeroconfAvailable():
        return "--wyoming-zeroconf needs python-zeroconf (pip install zeroconf)"
    return None


def checkZeroconfName(name: str) -> str | None:
    """
    Why C{name} cannot be announced, or L{None}.
    """
    if not 1 <= len(name.encode("utf-8")) <= 63:
        return "the name must be 1 to 63 bytes"
    if "." in name or any(ord(c) < 32 for c in name):
        return "the name must have no dots or control characters"
    return None


def zeroconfAvailable() -> bool:
    "Whether python-zeroconf is installed (C{pip install zeroconf})."
    return importlib.util.find_spec("zeroconf") is not None


def _outwardAddress() -> str:
    """
    The address of the interface multicast leaves by (no packet is sent).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(_MDNS)
        return str(s.getsockname()[0])


def _register(name: str, address: str, port: int) -> tuple[Any, Any]:
    from zeroconf import ServiceInfo, Zeroconf

    zc = Zeroconf()
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        parsed_addresses=[address],
        server=f"{name}.local.",
    )
    try:
        zc.register_service(info)
    except BaseException:
        zc.close()
        raise
    return zc, info


def _unregister(zc: Any, info: Any) -> None:
    try:
        zc.unregister_service(info)
    finally:
        zc.close()


class Announcement(Service):
    """
    Announces the Wyoming port over mDNS (C{_wyoming._tcp}, as Home
    Assistant discovers Wyoming servers) once it listens, as C{name}; takes
    the announcement back as it stops. python-zeroconf's blocking calls run
    in C{runInThread}.

    @param listening: fires with the listening port.
    """

    def __init__(
        self,
        name: str,
        listening: Deferred[Any],
        runInThread: Callable[..., Deferred[Any]],
        register: Callable[[str, str, int], tuple[Any, Any]] = _register,
        unregister: Callable[[Any, Any], None] = _unregister,
        outwardAddress: Callable[[], str] = _outwardAddress,
    ) -> None:
        self.name = name
        self.listening = listening
        self.runInThread = runInThread
        self._register = register
        self._unregister = unregister
        self._outwardAddress = outwardAddress
        self._announced: tuple[Any, Any] | None = None
        self.announcing: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()

        def announce(port: Any) -> Any:
            self.announcing = Deferred.fromCoroutine(self._announce(port))
            self.announcing.addErrback(
                lambda f: log.failure("cannot announce the Wyoming port over mDNS", f)
            )
            return port

        self.listening.addCallback(announce)

    async def _announce(self, port: Any) -> None:
        host = port.getHost()
        address = host.host
        if address in ("0.0.0.0", "::", ""):
            try:
                address = await self.runInThread(self._outwardAddress)
            except OSError as e:
                log.warn(
                    "cannot tell this machine's address to announce the Wyoming port: {reason}",
                    reason=e.strerror or str(e),
                )
                return
        if address.startswith("127.") or address == "::1":
            log.warn(
                "announcing the Wyoming port on a loopback address ({address}): only this"
                " machine can reach it (--wyoming-listen names the interface)",
                address=address,
            )
        if not self.running:
            return
        announced = await self.runInThread(self._register, self.name, address, host.port)
        if not self.running:
            # Stopped while it was being made.
            await self.runInThread(self._unregister, *announced)
            return
        self._announced = announced
        log.info(
            "Wyoming announced over mDNS as {name} ({type}) at {address}:{port}",
            name=self.name, type=SERVICE_TYPE, address=address, port=host.port,
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._withdraw())

    async def _withdraw(self) -> None:
        if self.announcing is not None and not self.announcing.called:
            # Being made: it is taken back as soon as it is.
            await self.announcing
        announced, self._announced = self._announced, None
        if announced is None:
            return
        try:
            await self.runInThread(self._unregister, *announced)
        except Exception:
            log.failure("cannot take the mDNS announcement back")


class WyomingService(MultiService):
    """
    The Wyoming port (L{ListenService}: one that cannot be had ends the
    daemon, naming C{option}), its mDNS announcement if C{zeroconfName}, and,
    as it stops, its connections closed (their jobs cancelled) once the
    port is.
    """

    def __init__(
        self,
        endpoint: str,
        factory: WyomingFactory,
        reactor: Any,
        option: str,
        zeroconfName: str | None = None,
        runInThread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.listen = ListenService(endpoint, factory, reactor, option)
        self.listen.setServiceParent(self)
        self.announcement: Announcement | None = None
        if zeroconfName:
            assert runInThread is not None
            self.announcement = Announcement(zeroconfName, self.listen.listening, runInThread)
            self.announcement.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        await self.factory.closeAll()
