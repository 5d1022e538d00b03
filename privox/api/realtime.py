"""
Live transcription over a WebSocket, shaped like OpenAI's realtime
transcription sessions: C{GET /v1/realtime?intent=transcription}.

A client (a browser's captions, OpenAI's SDKs and their kin) sends JSON
events; the server answers with JSON events, each with an C{event_id}::

    (connect)                          -> transcription_session.created
    transcription_session.update       -> transcription_session.updated
    input_audio_buffer.append {audio}  -> (as the exchange hears it)
                                          input_audio_buffer.speech_started
                                          conversation.item.input_audio_transcription.delta*
                                          input_audio_buffer.speech_stopped
                                          input_audio_buffer.committed
                                          conversation.item.input_audio_transcription.completed
    input_audio_buffer.commit          -> (the last utterances' events, as above)
    input_audio_buffer.clear           -> input_audio_buffer.cleared
    anything wrong                     -> error {error: {type, code, message, event_id}}

Audio is base64 16-bit mono little-endian PCM (C{input_audio_format}
C{pcm16}) at 24 kHz, as OpenAI's; a Privox extension, the session field
C{input_audio_rate}, takes 16000 too. The first C{append} starts a live
job (L{privox.api.live.LiveJobs}: it holds what the caller has left, at
most C{maxSeconds} of audio, and settles the seconds sent); its audio goes
on to the exchange as 16 kHz as it comes. The exchange cuts it into
utterances on its own (C{turn_detection} is reported as C{server_vad}); each
utterance is a conversation item with an id of its own: while it is heard,
a C{delta} for each new hypothesis (C{delta}: the words it agrees on with
what was said, but its last, which may still change, or C{""}:
L{privox.api.deltas.AppendOnly}; a Privox extension, C{text}: the whole
hypothesis), then, once it is final,
C{committed} and C{completed} with its C{transcript}. C{commit} ends the
job (its last utterances still come, then a Privox extension,
C{privox.transcription.done}); the next C{append} starts another.
A job that reaches C{maxSeconds} is ended the same way and the next one
started, so a session may run for as long as its caller's allowance lasts.
While a job starts, or ends, the audio that comes is kept (at most
L{MAX_PENDING_SECONDS}) for it, or for the next. A job that fails is
reported as an C{error}; audio is then dropped for L{RETRY_AFTER} seconds
from the failure, or until the client commits, whichever comes first; the
next C{append} after that starts a new job. Clients that leave the cutting
to the server never commit: a passing failure (the exchange's stream idle
timeout after the client paused, a producer lost) must not leave them
unheard. A failure is one C{error}, and a back-off one new try at most: an
exchange with no producer for the model is not asked for a job, nor
reported, at every append.
C{clear} ends the job too, and drops what it has still to say. Closing
the socket ends the job: what was sent is paid for, what is still heard is
dropped.

Who calls: C{Authorization: Bearer KEY}; or, as browsers cannot set
headers, the subprotocol C{openai-insecure-api-key.KEY} (the C{realtime}
subprotocol is chosen, and echoed, where it is offered); or no key where
the API lets anonymous callers in. A key that is refused gets an C{error}
event and the socket closed with code 4000 plus the HTTP status (4401).

Limits: a message is at most L{MAX_MESSAGE} bytes (a larger one fails the
connection); binary messages are refused; a socket with no message and no
job for L{IDLE_TIMEOUT} seconds is closed; peers that stop answering pings
are dropped. Logs: one line a session, with named fields: no audio, no
text, no key (its L{privox.api.access.Caller.keyId}), no address.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

import av
import numpy as np
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from privox.api.deltas import AppendOnly
from privox.api.errors import ApiError, BadInput, TooLarge, Unprocessable, errorBody
from privox.api.exchange import Heard, Transcribed
from privox.api.models import ModelTable
from privox.automata import Transitions, build
from privox.languages import UnknownLanguage, languageCode
from privox.logs import logFigures

if TYPE_CHECKING:
    from privox.api.access import Access, Caller
    from privox.api.exchange import LiveTranscription

log = Logger()

#: The largest message a client may send: an append of 16 s of 24 kHz
#: audio, base64. OpenAI's limit is 15 MiB; clients send ~100 ms at a time.
MAX_MESSAGE = 1024 * 1024
#: Audio kept for a job that is starting, or for the next while one ends.
MAX_PENDING_SECONDS = 30.0
#: Seconds audio is dropped after a job fails, before an append tries again.
RETRY_AFTER = 2.0
#: Seconds a socket may stay silent, with no job, before it is closed.
IDLE_TIMEOUT = 300.0
#: Messages a client may send before its key is checked.
MAX_EARLY = 64
#: Pings keep the socket alive through proxies and find dead peers.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
#: The rates an append's PCM may have: OpenAI's, and the exchange's own.
RATES = (24000, 16000)
#: What the exchange takes.
RATE = 16000
#: OpenAI's model name for a session that names none.
DEFAULT_MODEL = "whisper-1"
#: The subprotocol that carries a browser's key, and the one echoed.
KEY_PROTOCOL = "openai-insecure-api-key."
REALTIME_PROTOCOL = "realtime"
#: The longest name (model, language) a session takes.
_MAX_NAME = 200


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)


# -- audio -------------------------------------------------------------------


class Resampler:
    """
    s16le mono at C{rate} to 16 kHz, a chunk at a time (an odd byte is
    kept for the next chunk; the resampler's state runs on until
    L{flush}).
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._carry = b""
        self._av: av.AudioResampler | None = None

    def convert(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
        whole = len(data) & ~1
        self._carry = data[whole:]
        if whole == 0:
            return b""
        if self.rate == RATE:
            return data[:whole]
        if self._av is None:
            self._av = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        samples = np.frombuffer(data[:whole], dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate
        return self._out(self._av.resample(frame))

    def flush(self) -> bytes:
        """
        What the resampler still holds; the next chunk starts afresh.
        """
        self._carry = b""
        resampler, self._av = self._av, None
        return b"" if resampler is None else self._out(resampler.resample(None))

    @staticmethod
    def _out(frames: list[Any]) -> bytes:
        return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)


# -- the session's settings ----------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """
    A session's settings: the model the client named (an OpenAI name, a
    quality or a Privox model), the language (a code, or L{None}), the
    prompt (accepted, not used), the rate of its audio, and the Privox
    model that serves them.
    """

    model: str
    language: str | None
    prompt: str
    rate: int
    served: str

    def describe(self, sessionId: str) -> dict[str, Any]:
        return {
            "id": sessionId,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_rate": self.rate,
            "input_audio_transcription": {
                "model": self.model, "language": self.language, "prompt": self.prompt,
            },
            "turn_detection": {"type": "server_vad"},
            "input_audio_noise_reduction": None,
            "include": None,
            "privox_model": self.served,
        }


def _name(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_NAME:
        raise BadInput(f"{what} must be a string of at most {_MAX_NAME} characters")
    return value.strip() or None


def updated(current: Settings, session: Any, models: ModelTable) -> Settings:
    """
    C{current} changed as C{transcription_session.update}'s C{session}
    asks; what it does not name stays as it is (C{turn_detection},
    C{input_audio_noise_reduction} and C{include} are accepted and ignored).

    @raise ApiError: a format, rate, model or language this API does not
        offer, or a malformed field.
    """
    if not isinstance(session, dict):
        raise BadInput("transcription_session.update needs a session object")
    format = session.get("input_audio_format", "pcm16")
    if format != "pcm16":
        raise Unprocessable(
            "input_audio_format must be pcm16 (16-bit mono little-endian PCM):"
            " G.711 is not offered"
        )
    rate = session.get("input_audio_rate", current.rate)
    if isinstance(rate, bool) or rate not in RATES:
        raise Unprocessable(f"input_audio_rate must be one of {', '.join(map(str, RATES))}")
    model, language, prompt = current.model, current.language, current.prompt
    transcription = session.get("input_audio_transcription")
    if transcription is not None:
        if not isinstance(transcription, dict):
            raise BadInput("input_audio_transcription must be an object")
        if "model" in transcription:
            model = _name(transcription["model"], "model") or DEFAULT_MODEL
        if "language" in transcription:
            asked = _name(transcription["language"], "language")
            try:
                language = languageCode(asked) if asked else None
            except UnknownLanguage as e:
                raise Unprocessable(str(e)) from None
        if "prompt" in transcription:
            prompt = _name(transcription["prompt"], "prompt") or ""
    served = models.openaiSttModel(model, language)
    return Settings(model, language, prompt, int(rate), served)


# -- what runs the jobs ----------------------------------------------------------


class Jobs(TypingProtocol):
    """
    What a session needs from L{privox.api.live.LiveJobs}.
    """

    maxSeconds: float

    async def transcribe(
        self, caller: Any, model: str, language: str | None, heard: Callable[[Heard], None]
    ) -> LiveTranscription: ...


# -- a session, as a machine -----------------------------------------------------


class Session(TypingProtocol):
    """
    What happens to a session once its caller is known: the client's audio
    and commits, its jobs' news, and its end.
    """

    def append(self, pcm: bytes) -> None:
        "16 kHz audio from the client."

    def commit(self, discard: bool) -> None:
        "The client's audio ends here (C{discard}: and what it still says is dropped)."

    def started(self, job: Any) -> None:
        "The exchange took the job."

    def heard(self, piece: Heard) -> None:
        "A piece of the live transcript."

    def finished(self, result: Transcribed) -> None:
        "The job is done."

    def failed(self, error: ApiError) -> None:
        "The job failed, or could not start."

    def retry(self, pcm: bytes) -> None:
        "The back-off after a failure is over: C{pcm} starts a new job."

    def lost(self) -> None:
        "The socket is gone."


class RealtimeProtocol(WebSocketServerProtocol):
    """
    One realtime session. Reads the client's events and feeds its
    L{Session} machine, which calls back the plain methods below.
    """

    factory: RealtimeFactory

    def __init__(self) -> None:
        super().__init__()
        self.session: Session | None = None
        self.caller: Caller | None = None
        self.settings: Settings | None = None
        self._key: str | None = None
        # Messages that come before the key is checked; then none are read.
        self._early: list[bytes] | None = []
        self._closing = False
        self._sessionId = _id("sess_")
        self._idle: IDelayedCall | None = None
        self._opened = 0.0
        # The job in progress: its token (news of older ones is dropped),
        # the audio kept while it starts, audio kept for the next job, its
        # resampler, the seconds it was sent, and where it starts in the
        # session's audio.
        self._token: object | None = None
        self._job: Any = None
        self._pending: list[bytes] = []
        self._next: list[bytes] = []
        self._resampler: Resampler | None = None
        self._jobBytes = 0
        self._offset = 0.0
        self._discard = False
        # When the last job failed (the session's clock): audio is dropped
        # for RETRY_AFTER from it.
        self._failedAt = 0.0
        # The job was ended at its longest: what comes goes to the next.
        self._rolled = False
        self._overflowed = False
        # The client committed the audio kept for the next job too.
        self._nextCommitted = False
        # The utterance being heard: its item id, what its deltas said, its
        # last hypothesis; the last utterance's id.
        self._item: str | None = None
        self._deltas = AppendOnly()
        self._hypothesis = ""
        self._previous: str | None = None
        self._heardAny = False
        # For the log line.
        self._jobs = 0
        self._bytes = 0
        self._utterances = 0

    # -- the socket --

    def connectionMade(self) -> None:
        super().connectionMade()
        # autobahn names the peer in its warnings: never an address here.
        self.peer = "a realtime client"

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # autobahn's reason may quote the client's headers (its key among
        # them): the client is told, the log only says that it happened.
        self.wasNotCleanReason = "a bad opening handshake"
        log.info("realtime handshake refused: HTTP {status}", status=code)
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.dropConnection(abort=False)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """
        The opening handshake: the key, and the subprotocol chosen.
        """
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            self._key = credentials.strip()
        for offered in request.protocols:
            if offered.startswith(KEY_PROTOCOL) and self._key is None:
                self._key = offered[len(KEY_PROTOCOL):] or None
        if REALTIME_PROTOCOL in request.protocols:
            return REALTIME_PROTOCOL
        plain = [p for p in request.protocols if not p.startswith(KEY_PROTOCOL)]
        return plain[0] if plain else None

    def onOpen(self) -> None:
        self.settings = self.factory.defaults
        self._opened = self.factory.clock.seconds()
        self._resetIdle()
        self.factory.opened(self)
        d = Deferred.fromCoroutine(self.factory.access.authorize(self._key))
        d.addCallbacks(self._authorized, self._refused)

    def _authorized(self, caller: Caller) -> None:
        if self.state != self.STATE_OPEN:
            return
        self.caller = caller
        self.session = _newSession(self)
        self.send("transcription_session.created", session=self._describe())
        early, self._early = self._early or [], None
        for payload in early:
            self._handle(payload)

    def _refused(self, failure: Failure) -> None:
        error = _apiError(failure)
        self._early = None
        if self.state != self.STATE_OPEN:
            return
        self._error(error)
        self._close(4000 + error.status if 400 <= error.status < 1000 else 4000, error.kind)

    def _close(self, code: int, reason: str) -> None:
        "Close the socket; nothing more it sends is read."
        self._closing = True
        self.sendClose(code, reason)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        self._resetIdle()
        if isBinary:
            self._error(BadInput("messages are JSON text; audio goes base64 in input_audio_buffer.append"))
            return
        if self._early is not None:
            if len(self._early) >= MAX_EARLY or sum(map(len, self._early)) > MAX_MESSAGE:
                self._error(BadInput("too many messages before the session was created"))
                self._close(4000 + 400, "too many messages")
                return
            self._early.append(payload)
            return
        self._handle(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.session is not None:
            self.session.lost()
        if self._opened:
            self.factory.closed(self)
            log.info(
                "realtime session closed: {bytes} bytes of audio heard in {jobs} jobs,"
                " {utterances} utterances, {ms} ms (model {model}, key {keyId})",
                jobs=self._jobs,
                utterances=self._utterances,
                model=self.settings.served if self.settings else None,
                keyId=self.caller.keyId if self.caller is not None else None,
                **logFigures(
                    self.factory.blurUsage,
                    ms=(self.factory.clock.seconds() - self._opened) * 1000,
                    bytes=self._bytes,
                ),
            )
            self._opened = 0.0

    def _resetIdle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.idleTimeout)
        else:
            self._idle = self.factory.clock.callLater(self.factory.idleTimeout, self._idleOut)

    def _idleOut(self) -> None:
        self._idle = None
        if self._token is not None:  # a job runs: the exchange works for this client
            self._resetIdle()
            return
        self._close(1000, "idle")

    def send(self, kind: str, **fields: Any) -> None:
        if self.state != self.STATE_OPEN:
            return
        event = {"type": kind, "event_id": _id("event_"), **fields}
        self.sendMessage(json.dumps(event, ensure_ascii=False).encode("utf-8"), isBinary=False)

    def _error(self, error: ApiError, eventId: Any = None) -> None:
        shape = json.loads(errorBody(error, True)[1])["error"]
        self.send("error", error={
            "type": shape["type"], "code": shape["code"], "message": shape["message"],
            "param": None, "event_id": eventId if isinstance(eventId, str) else None,
        })

    def _describe(self) -> dict[str, Any]:
        assert self.settings is not None
        return self.settings.describe(self._sessionId)

    # -- the client's events --

    def _handle(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            self._error(BadInput("a message is not JSON"))
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._error(BadInput("an event is a JSON object with a type"))
            return
        eventId = event.get("event_id")
        handler = self._handlers.get(event["type"])
        if handler is None:
            self._error(BadInput(f"unknown event type {event['type'][:_MAX_NAME]!r}"), eventId)
            return
        try:
            handler(self, event)
        except ApiError as e:
            self._error(e, eventId)

    def _update(self, event: dict[str, Any]) -> None:
        assert self.settings is not None
        settings = updated(self.settings, event.get("session"), self.factory.models)
        if settings.rate != self.settings.rate and self._resampler is not None:
            # What the old rate's resampler holds goes first.
            tail = self._resampler.flush()
            self._resampler = Resampler(settings.rate)
            if tail:
                self._feed(tail)
        self.settings = settings
        self.send("transcription_session.updated", session=self._describe())

    def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise BadInput("input_audio_buffer.append needs audio: base64 16-bit PCM")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput("audio is not base64") from None
        if not raw:
            return
        assert self.settings is not None
        if self._resampler is None:
            self._resampler = Resampler(self.settings.rate)
        self._feed(self._resampler.convert(raw))

    def _feed(self, pcm: bytes) -> None:
        if pcm:
            assert self.session is not None
            self.session.append(pcm)

    def _commit(self, event: dict[str, Any]) -> None:
        assert self.session is not None
        self.session.commit(False)

    def _clear(self, event: dict[str, Any]) -> None:
        assert self.session is not None
        self.session.commit(True)

    _handlers: dict[str, Callable[[RealtimeProtocol, dict[str, Any]], None]] = {
        "transcription_session.update": _update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
    }

    # -- jobs: what the machine's outputs call --

    def openJob(self, pcm: bytes) -> None:
        """
        Start a job with the session's settings; C{pcm} is its first audio.
        """
        assert self.settings is not None and self.caller is not None
        token = self._token = object()
        self._pending = [pcm]
        self._jobBytes = 0
        self._discard = False
        self._rolled = False
        self._overflowed = False
        self._heardAny = False
        self._jobs += 1
        settings = self.settings

        async def opening() -> LiveTranscription:
            return await self.factory.jobs.transcribe(
                self.caller, settings.served, settings.language,
                lambda piece: self._callback(token, piece),
            )

        d = Deferred.fromCoroutine(opening())
        d.addCallbacks(lambda job: self._started(token, job), lambda f: self._news(token, f))

    def _started(self, token: object, job: Any) -> None:
        if token is not self._token:
            # The client went away, or the job failed, while it started.
            job.done.addErrback(lambda failure: None)
            job.cancel()
            return
        self._job = job
        job.done.addCallbacks(lambda result: self._news(token, result), lambda f: self._news(token, f))
        assert self.session is not None
        self.session.started(job)

    def _news(self, token: object, outcome: Any) -> None:
        if token is not self._token or self.session is None:
            return
        if isinstance(outcome, Failure):
            # Even a cancellation: this job's end must reach the machine.
            self.session.failed(_apiError(outcome))
        else:
            self.session.finished(outcome)

    def _callback(self, token: object, piece: Heard) -> None:
        if token is self._token and self.session is not None:
            self.session.heard(piece)

    def keep(self, pcm: bytes) -> None:
        "Audio for the job that is starting; too much of it fails the job."
        if not self._fits(self._pending, pcm):
            assert self.session is not None
            self.session.failed(_overflow())
            return
        self._pending.append(pcm)

    def keepNext(self, pcm: bytes) -> None:
        "Audio for the job after the one that ends; too much of it is dropped."
        if not self._fits(self._next, pcm):
            if not self._overflowed:
                self._overflowed = True
                self._error(_overflow())
            return
        self._next.append(pcm)

    @staticmethod
    def _fits(buffer: list[bytes], pcm: bytes) -> bool:
        return sum(map(len, buffer)) + len(pcm) <= MAX_PENDING_SECONDS * RATE * 2

    def writePending(self) -> None:
        pending, self._pending = self._pending, []
        for pcm in pending:
            self.write(pcm)

    def write(self, pcm: bytes, roll: bool = True) -> None:
        """
        Audio for the running job. At L{Jobs.maxSeconds} of it (C{roll}),
        the job is ended, and the next one takes what follows.
        """
        if self._job is None:
            return
        if self._rolled:
            self.keepNext(pcm)
            return
        self._jobBytes += len(pcm)
        self._bytes += len(pcm)
        self._job.write(pcm)
        if roll and self._jobBytes >= self.factory.jobs.maxSeconds * RATE * 2:
            self._rolled = True
            assert self.session is not None
            self.session.commit(False)

    def flushInto(self, pending: bool) -> None:
        """
        The resampler's tail: to the job that is starting (C{pending}) or
        to the running one.
        """
        tail = self._resampler.flush() if self._resampler is not None else b""
        if not tail:
            return
        if pending:
            self._pending.append(tail)
        else:
            self.write(tail, roll=False)

    def endJob(self, discard: bool) -> None:
        self._discard = discard
        if discard:
            self._item = None
        if self._job is not None:
            self._job.end()

    def cleared(self, discard: bool) -> None:
        if discard:
            self.send("input_audio_buffer.cleared")

    def endOnStart(self, discard: bool) -> None:
        "Committed while the job starts: it is ended once it does."
        self.flushInto(pending=True)
        self._discard = discard
        self.cleared(discard)

    def nothingToCommit(self, discard: bool) -> None:
        if discard:
            self.send("input_audio_buffer.cleared")
            return
        self._error(BadInput("the input audio buffer is empty: append audio before committing"))

    def startedEnded(self, job: Any) -> None:
        "The job started after the client committed: its audio, then its end."
        if self._discard:
            self._pending = []
        else:
            self.writePending()
        self.endJob(self._discard)

    def report(self, piece: Heard) -> None:
        """
        A piece of the transcript as the client's events.
        """
        if self._discard:
            return
        text = " ".join(piece.text.split())
        if self._item is None:
            if not text:
                return
            self._item = _id("item_")
            self._deltas = AppendOnly()
            self._hypothesis = ""
            self.send(
                "input_audio_buffer.speech_started",
                audio_start_ms=self._ms(piece.start), item_id=self._item,
            )
        if piece.final:
            self._complete(text, piece.end)
            return
        if text == self._hypothesis:
            return
        self._hypothesis = text
        delta = self._deltas.heard(piece)
        self.send(
            "conversation.item.input_audio_transcription.delta",
            item_id=self._item, content_index=0, delta=delta, text=text,
        )

    def _complete(self, text: str, end: float | None) -> None:
        item, self._item = self._item, None
        self._heardAny = True
        self._utterances += 1
        if end is not None:
            self.send("input_audio_buffer.speech_stopped", audio_end_ms=self._ms(end), item_id=item)
        self.send("input_audio_buffer.committed", previous_item_id=self._previous, item_id=item)
        self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item, content_index=0, transcript=text,
        )
        self._previous = item

    def _ms(self, seconds: float) -> int:
        return max(0, round((self._offset + seconds) * 1000))

    def transcribed(self, result: Transcribed) -> None:
        """
        The job is done: an utterance still open is completed with its
        last hypothesis; a job whose engine said no final piece gives its
        whole transcript as one.
        """
        if not self._discard:
            if self._item is not None:
                self._complete(self._hypothesis, None)
            elif not self._heardAny and result.text.strip():
                self._item = _id("item_")
                self._complete(" ".join(result.text.split()), None)
        if not self._rolled:
            # A Privox extension: all the audio committed is transcribed
            # (OpenAI's sessions never say; a client that ends wants to know).
            self.send("privox.transcription.done")
        self._jobDone()

    def fail(self, error: ApiError) -> None:
        """
        The job failed (or would not start): the client is told, and its
        job given up.
        """
        log.info("realtime transcription failed: {code}", code=error.kind)
        if not self._discard:
            self._error(error)
        job = self._job
        self._jobDone()
        if job is not None:
            job.cancel()

    def backOff(self) -> None:
        "A job failed: audio is dropped for a while, counted from now."
        self._failedAt = self.factory.clock.seconds()

    def dropped(self, pcm: bytes) -> None:
        """
        Audio after a failure: dropped during the back-off; after it, it
        starts a new job (a client that never commits is heard again).
        """
        if self.factory.clock.seconds() - self._failedAt >= self.factory.retryAfter:
            assert self.session is not None
            self.session.retry(pcm)

    def _jobDone(self) -> None:
        self._offset += self._jobBytes / (RATE * 2)
        self._token = None
        self._job = None
        self._pending = []
        self._item = None
        self._discard = False

    def commitNext(self, discard: bool) -> None:
        """
        A commit while a job ends: of the audio kept for the next one (its
        job will be ended as soon as it starts), if any.
        """
        if not self._next:
            self.nothingToCommit(discard)
            return
        if discard:
            self._next = []
            self.cleared(discard)
            return
        tail = self._resampler.flush() if self._resampler is not None else b""
        if tail:
            self._next.append(tail)
        self._nextCommitted = True

    def startNext(self) -> None:
        "The next job, if audio came for it while the last one ended."
        pending, self._next = self._next, []
        committed, self._nextCommitted = self._nextCommitted, False
        if pending:
            assert self.session is not None
            self.session.append(b"".join(pending))
            if committed:
                self.session.commit(False)

    def abandon(self, running: bool) -> None:
        """
        The client went away: a running job is ended (what was sent is paid
        for), one that is starting cancelled once it starts.
        """
        job, self._job = self._job, None
        self._token = None
        self._pending, self._next = [], []
        self._nextCommitted = False
        if job is not None and running:
            job.end()


def _overflow() -> TooLarge:
    return TooLarge(
        f"the exchange is slow to take the audio: more than {MAX_PENDING_SECONDS:g} s of it"
        " waits; some was dropped"
    )


def _apiError(failure: Failure) -> ApiError:
    if failure.check(ApiError):
        return failure.value  # type: ignore[no-any-return]
    if failure.check(CancelledError):
        return ApiError("the job was cancelled on the server")
    log.failure("a realtime transcription failed", failure)
    return ApiError("the request failed on the server")


# -- the machine -------------------------------------------------------------------

_builder = TypeMachineBuilder(Session, RealtimeProtocol)
idle = _builder.state("idle")
starting = _builder.state("starting")
# Committed before the job started: it ends as soon as it starts.
startingEnded = _builder.state("startingEnded")
running = _builder.state("running")
ending = _builder.state("ending")
# A job failed: audio is dropped until the back-off is over, or the client
# commits.
discarding = _builder.state("discarding")
closed = _builder.state("closed")
_STATES = [idle, starting, startingEnded, running, ending, discarding, closed]
_INPUTS = [
    Session.append, Session.commit, Session.started, Session.heard, Session.finished,
    Session.failed, Session.retry, Session.lost,
]
_transitions = Transitions()
_on = _transitions.on


@_on([idle], Session.append, starting)
def _open(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    p.openJob(pcm)


@_on([idle], Session.commit)
def _emptyCommit(session: Session, p: RealtimeProtocol, discard: bool) -> None:
    p.nothingToCommit(discard)


@_on([starting], Session.append)
def _keep(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    p.keep(pcm)


@_on([starting], Session.commit, startingEnded)
def _commitEarly(session: Session, p: RealtimeProtocol, discard: bool) -> None:
    p.endOnStart(discard)


@_on([startingEnded, ending], Session.append)
def _keepNext(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    p.keepNext(pcm)


@_on([starting], Session.started, running)
def _started(session: Session, p: RealtimeProtocol, job: Any) -> None:
    p.writePending()


@_on([startingEnded], Session.started, ending)
def _startedEnded(session: Session, p: RealtimeProtocol, job: Any) -> None:
    p.startedEnded(job)


@_on([running], Session.append)
def _write(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    p.write(pcm)


@_on([running], Session.commit, ending)
def _commit(session: Session, p: RealtimeProtocol, discard: bool) -> None:
    p.flushInto(pending=False)
    p.endJob(discard)
    p.cleared(discard)


@_on([startingEnded, ending], Session.commit)
def _commitNext(session: Session, p: RealtimeProtocol, discard: bool) -> None:
    p.commitNext(discard)


@_on([running, ending], Session.heard)
def _heard(session: Session, p: RealtimeProtocol, piece: Heard) -> None:
    p.report(piece)


@_on([running], Session.finished, idle)
def _endedItself(session: Session, p: RealtimeProtocol, result: Transcribed) -> None:
    # The job ended before the client committed: the end of its allowance.
    p.transcribed(result)


@_on([ending], Session.finished, idle)
def _finished(session: Session, p: RealtimeProtocol, result: Transcribed) -> None:
    p.transcribed(result)
    p.startNext()


@_on([starting, running], Session.failed, discarding)
def _failed(session: Session, p: RealtimeProtocol, error: ApiError) -> None:
    p.fail(error)
    p.backOff()


@_on([startingEnded, ending], Session.failed, idle)
def _failedEnding(session: Session, p: RealtimeProtocol, error: ApiError) -> None:
    p.fail(error)
    p.startNext()


@_on([discarding], Session.append)
def _drop(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    p.dropped(pcm)


@_on([discarding], Session.retry, starting)
def _retry(session: Session, p: RealtimeProtocol, pcm: bytes) -> None:
    # As from idle: the one try this back-off allows.
    p.openJob(pcm)


@_on([discarding], Session.commit, idle)
def _discarded(session: Session, p: RealtimeProtocol, discard: bool) -> None:
    p.cleared(discard)


@_on([starting, startingEnded], Session.lost, closed)
def _lostStarting(session: Session, p: RealtimeProtocol) -> None:
    p.abandon(running=False)


@_on([running, ending], Session.lost, closed)
def _lostRunning(session: Session, p: RealtimeProtocol) -> None:
    p.abandon(running=True)


def _ignore(session: Session, p: RealtimeProtocol, *ignored: object) -> None:
    # News of a job that is over, anything once the socket is gone.
    pass


_transitions.ignoreTheRest(_STATES, _INPUTS, _ignore)

_newSession = build(_builder)


# -- serving -------------------------------------------------------------------------


class RealtimeFactory(WebSocketServerFactory):
    """
    Realtime sessions, served by C{jobs} for the callers C{access} lets in,
    with the models of C{models}, on C{clock}; after a job fails, a session
    drops audio for C{retryAfter} seconds. Knows its open sessions.
    """

    protocol = RealtimeProtocol

    def __init__(
        self,
        jobs: Jobs,
        access: Access,
        models: ModelTable,
        clock: IReactorTime,
        blurUsage: bool = False,
        idleTimeout: float = IDLE_TIMEOUT,
        maxMessage: int = MAX_MESSAGE,
        retryAfter: float = RETRY_AFTER,
    ) -> None:
        super().__init__(server="Privox")
        self.jobs = jobs
        self.access = access
        self.models = models
        self.clock = clock
        self.blurUsage = blurUsage
        self.idleTimeout = idleTimeout
        self.retryAfter = retryAfter
        self.sessions: set[RealtimeProtocol] = set()
        self.defaults = Settings(
            DEFAULT_MODEL, None, "", RATES[0], models.openaiSttModel(DEFAULT_MODEL, None)
        )
        self.setProtocolOptions(
            maxFramePayloadSize=maxMessage,
            maxMessagePayloadSize=maxMessage,
            autoPingInterval=PING_INTERVAL,
            autoPingTimeout=PING_TIMEOUT,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            webStatus=False,
        )
        self.noisy = False

    def opened(self, session: RealtimeProtocol) -> None:
        self.sessions.add(session)

    def closed(self, session: RealtimeProtocol) -> None:
        self.sessions.discard(session)


class RealtimeResource(Resource):
    """
    C{GET /v1/realtime}: a WebSocket upgrade becomes a session; anything
    else is answered with OpenAI's error shape (426 for a plain request,
    422 for an C{intent} other than C{transcription}).
    """

    isLeaf = True

    def __init__(self, factory: RealtimeFactory) -> None:
        super().__init__()
        self.factory = factory
        self._websocket = WebSocketResource(factory)

    def render(self, request: IRequest) -> bytes | int:
        intent = request.args.get(b"intent", [b"transcription"])[0]
        if intent != b"transcription":
            return _refuse(request, Unprocessable(
                "only transcription sessions are served here: ?intent=transcription"
            ))
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket" or request.method != b"GET":
            error = ApiError("this is a WebSocket: connect with Upgrade: websocket")
            error.status, error.kind = 426, "invalid_request_error"
            request.setHeader(b"Upgrade", b"websocket")
            return _refuse(request, error)
        return self._websocket.render(request)  # type: ignore[no-any-return]


def _refuse(request: IRequest, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    contentType, body = errorBody(error, True)
    request.setHeader(b"Content-Type", contentType)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def realtimeResource(
    jobs: Jobs, access: Access, models: ModelTable, clock: IReactorTime, blurUsage: bool = False
) -> RealtimeResource:
    """
    The resource C{/v1/realtime} serves.
    """
    return RealtimeResource(RealtimeFactory(jobs, access, models, clock, blurUsage))

