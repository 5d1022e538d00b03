"""
Live captions: C{privox caption} reads 16 kHz mono s16le PCM (e.g. from
C{arecord}) and prints what it says as it is said (L{CaptionProtocol}).

The captions come from a L{Captioner}. By default it is the API's live
transcription WebSocket, C{/v1/realtime} (L{openLive}): the exchange cuts
the speech into utterances itself and says each one's hypothesis as it is
heard, then its final transcript. Where the API has no such WebSocket (an
API from before it), or with C{--whole}, the audio is cut into utterances
here, on silence, with webrtcvad (L{Segmenter}), and each is transcribed
whole over HTTP (L{UtteranceCaptioner}): finals only.

On a terminal the hypothesis is drawn in place, dim, and each final
replaces it as a line; elsewhere (a pipe, a file) only the finals are
written, a line each (L{Screen}).
"""

from __future__ import annotations

import base64
import json
import typing
from http import HTTPStatus
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from privox.automata import Transitions, build
from privox.client import CliError, connectionProblem, oneLine
from privox.utterances import FRAME_MS, RATE, Segmenter, Utterance

#: The exit status of a second Ctrl-C.
EXIT_INTERRUPTED = 130

# FRAME_MS and the segmenter are part of what privox.cli builds a caption from.
__all__ = [
    "FRAME_MS", "Captioner", "CaptionProtocol", "NoRealtime", "Screen", "Segmenter", "Utterance",
    "UtteranceCaptioner", "openLive",
]


# -- what the captions come from ----------------------------------------------


class Listener(typing.Protocol):
    """
    What a L{Captioner} reports to (the caption's machine).
    """

    def partial(self, text: str) -> None:
        "The utterance being heard seems to say C{text} so far."

    def line(self, text: str) -> None:
        "The next utterance's final transcript (it replaces the partial)."

    def linesDone(self) -> None:
        "Every line after the end of the audio is out."

    def failed(self, error: CliError) -> None:
        "Captioning failed; nothing more comes."


class Captioner(typing.Protocol):
    """
    Turns audio into captions, reported to the L{Listener} it is attached
    to: L{LiveCaptioner} or L{UtteranceCaptioner}.
    """

    def attach(self, listener: Listener) -> None:
        "Report to C{listener} from now on."

    def feed(self, pcm: bytes) -> None:
        "16 kHz mono s16le audio, any number of bytes."

    def end(self) -> None:
        "The audio ends here: the last lines, then C{linesDone}."

    def cancel(self) -> None:
        "Stop at once; nothing more is reported."

    async def close(self) -> None:
        "Let go of the connections (after the end, or a cancel)."


# -- the live WebSocket ---------------------------------------------------------

# The live session is asked to take stdin's rate (a Privox extension).
_BYTES_PER_SECOND = RATE * 2
#: The most audio one append carries: 1 s (a 43 kB message; the API takes 1 MiB).
APPEND_BYTES = _BYTES_PER_SECOND
#: After the end, how long the API may take to say a last utterance's
#: final once it has heard all the audio.
SETTLE = 2.0
#: Seconds to wait for the API to answer our closing of the socket.
CLOSE_TIMEOUT = 2.0
#: Pings find an API that stopped answering.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0


class NoRealtime(CliError):
    """
    The API has no live transcription WebSocket: its C{/v1/realtime}
    answers 404 (an API from before it) or 426 (a proxy that drops the
    upgrade).
    """


class EventSocket(typing.Protocol):
    """
    What L{LiveCaptioner} needs of its WebSocket (L{_RealtimeSocket}).
    """

    def sendEvent(self, kind: str, **fields: Any) -> None:
        "Send the client event C{kind}."

    def hangUp(self) -> None:
        "Close the socket (or drop it, if it is still opening)."


class LiveSession(typing.Protocol):
    """
    What happens to a live session: the API's events, the caption's audio
    and its end.
    """

    def created(self) -> None:
        "The API took the key: the session is open."

    def updated(self) -> None:
        "The session has the settings asked for."

    def audio(self, pcm: bytes) -> None:
        "Audio to caption."

    def end(self) -> None:
        "The audio ends here."

    def news(self, event: dict[str, Any]) -> None:
        "An utterance started, or ended, or its hypothesis or final transcript."

    def error(self, message: str) -> None:
        "The API said that something went wrong (or stopped answering)."

    def closed(self, problem: CliError) -> None:
        "The socket is closed, for the reason said."

    def settled(self) -> None:
        "After the end, everything there was to say is said."

    def cancel(self) -> None:
        "Hang up and say nothing more."


class LiveCaptioner:
    """
    Captions from the API's live transcription WebSocket: the audio is sent
    as it comes (base64 appends, 16 kHz), each hypothesis (the Privox
    extension C{text}, else the deltas so far) reported as a partial, each
    C{completed} transcript as a line. Its L{LiveSession} machine decides;
    the plain methods below act.

    The end of the audio is committed; the last finals then come, and
    Privox says when they all have (its extension event
    C{privox.transcription.done}). An API that does not say: the session
    is over once no utterance is open and the API has had time to hear the
    rest of the audio: what was sent after the furthest point it spoke of,
    at real-time pace (a live engine keeps up with that), plus L{SETTLE}.
    An utterance left open for C{timeout} seconds fails the caption.

    @ivar ready: fires with the captioner once the session has its
        settings; fails with a L{CliError} (L{NoRealtime} if the API has no
        such WebSocket).
    """

    session: LiveSession

    def __init__(
        self, clock: IReactorTime, api: str, settings: dict[str, Any], timeout: float
    ) -> None:
        self.clock = clock
        self.api = api
        self.settings = settings
        self.timeout = timeout
        self.socket: EventSocket | None = None
        self.listener: Listener | None = None
        self.ready: Deferred[LiveCaptioner] = Deferred(lambda d: self.session.cancel())
        self.session = LiveSessionMachine(self)
        self._gone: Deferred[None] = Deferred()
        self._sent = 0  # bytes of audio sent
        self._uncommitted = False
        self._open = False  # an utterance is being heard
        self._done = False  # the API said all it heard is transcribed
        self._sofar = ""  # its deltas, for an API that sends no whole hypothesis
        self._lastNews = 0.0
        # When the API last said how far into the audio it was, and how far.
        self._heard = (0.0, 0.0)
        self._timer: IDelayedCall | None = None

    # The captioner's faces

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    def feed(self, pcm: bytes) -> None:
        self.session.audio(pcm)

    def end(self) -> None:
        self.session.end()

    def cancel(self) -> None:
        self.session.cancel()

    async def close(self) -> None:
        self.session.cancel()
        if self.socket is not None:
            await self._gone

    # The socket's faces

    def connected(self, socket: EventSocket) -> None:
        self.socket = socket

    def disconnected(self) -> None:
        if not self._gone.called:
            self._gone.callback(None)

    # What the machine does

    def _send(self, kind: str, **fields: Any) -> None:
        assert self.socket is not None
        self.socket.sendEvent(kind, **fields)

    def _configure(self) -> None:
        self._send("transcription_session.update", session=self.settings)

    def _becomeReady(self) -> None:
        self._heard = (self.clock.seconds(), 0.0)
        self.ready.callback(self)

    def _refuse(self, problem: CliError) -> None:
        if not self.ready.called:
            self.ready.errback(problem)

    def _sendAudio(self, pcm: bytes) -> None:
        for offset in range(0, len(pcm), APPEND_BYTES):
            piece = pcm[offset : offset + APPEND_BYTES]
            self._send("input_audio_buffer.append", audio=base64.b64encode(piece).decode("ascii"))
        self._sent += len(pcm)
        # A job that ended by itself (the most one may hold) said "done"
        # for its audio, not for what comes now.
        self._done = False
        self._uncommitted = self._uncommitted or bool(pcm)

    def _commit(self) -> None:
        if self._uncommitted:  # the API refuses a commit of nothing
            self._send("input_audio_buffer.commit")
            self._uncommitted = False
        self._lastNews = self.clock.seconds()
        self._wait()

    def _report(self, event: dict[str, Any]) -> None:
        assert self.listener is not None
        self._lastNews = now = self.clock.seconds()
        kind = event.get("type")
        if kind == "input_audio_buffer.speech_started":
            self._open = True
            self._progress(now, event.get("audio_start_ms"))
        elif kind == "input_audio_buffer.speech_stopped":
            self._progress(now, event.get("audio_end_ms"))
        elif kind == "conversation.item.input_audio_transcription.delta":
            text = event.get("text")
            if not isinstance(text, str):
                delta = event.get("delta")
                text = self._sofar = self._sofar + (delta if isinstance(delta, str) else "")
            self._open = True
            self.listener.partial(text)
        elif kind == "conversation.item.input_audio_transcription.completed":
            transcript = event.get("transcript")
            self._open = False
            self._sofar = ""
            self.listener.line(transcript if isinstance(transcript, str) else "")
        elif kind == "privox.transcription.done":
            self._done = True

    def _progress(self, now: float, ms: object) -> None:
        if isinstance(ms, (int, float)) and not isinstance(ms, bool):
            if ms / 1000 >= self._heard[1]:
                self._heard = (now, ms / 1000)

    def _wait(self) -> None:
        """
        After the end: (re)arm the timer for when nothing more can come, or,
        with an utterance open, for when the API has been silent too long.
        """
        self._stopTimer()
        now = self.clock.seconds()
        if self._open:
            at = self._lastNews + self.timeout
        elif self._done or not self._sent:
            at = now
        else:
            when, where = self._heard
            at = max(self._lastNews, when + self._sent / _BYTES_PER_SECOND - where) + SETTLE
        self._timer = self.clock.callLater(max(0.0, at - now), self._waited)

    def _waited(self) -> None:
        self._timer = None
        if self._open:
            self.session.error(
                f"no answer from the Privox API at {self.api} within {self.timeout:g} s"
            )
        else:
            self.session.settled()

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, problem: CliError) -> None:
        assert self.listener is not None
        self.listener.failed(problem)

    def _hangUp(self) -> None:
        self._stopTimer()
        if self.socket is not None:
            self.socket.hangUp()

    def _linesDone(self) -> None:
        assert self.listener is not None
        self.listener.linesDone()


# A live session's life:
#
#   opening ──created──▶ configuring ──updated──▶ streaming ──end──▶ draining
#      draining ──settled──▶ finished
#
# An error, or the socket closing, ends it from any of the first four (before
# it streams, openLive fails); so does a cancel, quietly.

_live = TypeMachineBuilder(LiveSession, LiveCaptioner)
opening = _live.state("opening")
configuring = _live.state("configuring")
streaming = _live.state("streaming")
draining = _live.state("draining")
finished = _live.state("finished")
_LIVE_STATES = [opening, configuring, streaming, draining, finished]
_LIVE_INPUTS = [
    LiveSession.created, LiveSession.updated, LiveSession.audio, LiveSession.end,
    LiveSession.news, LiveSession.error, LiveSession.closed, LiveSession.settled,
    LiveSession.cancel,
]
_transitions = Transitions()
_on = _transitions.on


@_on([opening], LiveSession.created, configuring)
def _configure(s: LiveSession, c: LiveCaptioner) -> None:
    c._configure()


@_on([configuring], LiveSession.updated, streaming)
def _ready(s: LiveSession, c: LiveCaptioner) -> None:
    c._becomeReady()


@_on([opening], LiveSession.error)
def _refusedFirst(s: LiveSession, c: LiveCaptioner, message: str) -> None:
    pass  # the key was refused: the socket's close says it, with its status


@_on([configuring], LiveSession.error, finished)
def _settingsRefused(s: LiveSession, c: LiveCaptioner, message: str) -> None:
    c._hangUp()
    c._refuse(CliError(message))


@_on([opening, configuring], LiveSession.closed, finished)
def _notOpened(s: LiveSession, c: LiveCaptioner, problem: CliError) -> None:
    c._refuse(problem)


@_on([streaming], LiveSession.audio)
def _audio(s: LiveSession, c: LiveCaptioner, pcm: bytes) -> None:
    c._sendAudio(pcm)


@_on([streaming], LiveSession.end, draining)
def _end(s: LiveSession, c: LiveCaptioner) -> None:
    c._commit()


@_on([streaming], LiveSession.news)
def _news(s: LiveSession, c: LiveCaptioner, event: dict[str, Any]) -> None:
    c._report(event)


@_on([draining], LiveSession.news)
def _lastNews(s: LiveSession, c: LiveCaptioner, event: dict[str, Any]) -> None:
    c._report(event)
    c._wait()


@_on([draining], LiveSession.settled, finished)
def _settled(s: LiveSession, c: LiveCaptioner) -> None:
    c._hangUp()
    c._linesDone()


@_on([streaming, draining], LiveSession.error, finished)
def _error(s: LiveSession, c: LiveCaptioner, message: str) -> None:
    c._hangUp()
    c._fail(CliError(message))


@_on([streaming, draining], LiveSession.closed, finished)
def _dropped(s: LiveSession, c: LiveCaptioner, problem: CliError) -> None:
    c._stopTimer()
    c._fail(problem)


@_on([opening, configuring, streaming, draining], LiveSession.cancel, finished)
def _cancel(s: LiveSession, c: LiveCaptioner) -> None:
    c._hangUp()


def _ignore(s: LiveSession, c: LiveCaptioner, *ignored: object) -> None:
    # Audio after the end; anything once it is over.
    pass


_transitions.ignoreTheRest(_LIVE_STATES, _LIVE_INPUTS, _ignore)

LiveSessionMachine = build(_live)

#: The API's events that tell of the transcript.
_NEWS = {
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
}


class _RealtimeSocket(WebSocketClientProtocol):
    """
    The WebSocket under a L{LiveCaptioner}: JSON events to its machine's
    inputs, and the socket's end to a L{CliError} that says why.
    """

    factory: _RealtimeFactory

    def __init__(self) -> None:
        super().__init__()
        self._lastError: str | None = None
        self._opened = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.captioner.connected(self)

    def onOpen(self) -> None:
        self._opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        session = self.factory.captioner.session
        kind = event.get("type")
        if kind == "transcription_session.created":
            session.created()
        elif kind == "transcription_session.updated":
            session.updated()
        elif kind == "error":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self._lastError = oneLine(str(message or "the Privox API reported an error"))[:300]
            session.error(self._lastError)
        elif kind in _NEWS:
            session.news(event)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        captioner = self.factory.captioner
        captioner.session.closed(self._problem(code, reason))
        captioner.disconnected()

    def _problem(self, code: int | None, reason: str | None) -> CliError:
        api = self.factory.api
        status = _status(getattr(self, "http_status_line", None))
        if status is not None and status != 101:
            if status in (404, 426):
                return NoRealtime(
                    f"the Privox API at {api} has no live transcription (HTTP {status})"
                )
            try:
                phrase = HTTPStatus(status).phrase.lower()
            except ValueError:
                phrase = "error"
            return CliError(f"{phrase} (HTTP {status})")
        if self._lastError is not None:
            if code is not None and 4400 <= code < 4600:  # 4000 + the HTTP status
                return CliError(f"{self._lastError} (HTTP {code - 4000})")
            return CliError(self._lastError)
        if not self._opened or code in (None, 1006):
            why = self.wasNotCleanReason or "no reason given"
            return CliError(f"the Privox API at {api} dropped the connection: {oneLine(why)}")
        why = oneLine(reason or "") or "no reason given"
        return CliError(
            f"the Privox API at {api} closed the live session: {why} (WebSocket close {code})"
        )

    # The captioner's socket

    def sendEvent(self, kind: str, **fields: Any) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps({"type": kind, **fields}).encode("utf-8"), isBinary=False)

    def hangUp(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)


def _status(statusLine: str | None) -> int | None:
    "The status of an HTTP status line (C{HTTP/1.1 404 Not Found})."
    parts = (statusLine or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


class _RealtimeFactory(WebSocketClientFactory):
    protocol = _RealtimeSocket

    def __init__(
        self, url: str, headers: dict[str, str], captioner: LiveCaptioner, api: str
    ) -> None:
        super().__init__(url, headers=headers)
        self.captioner = captioner
        self.api = api
        self.setProtocolOptions(
            openHandshakeTimeout=0,  # openLive's own timeout covers it
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            autoPingInterval=PING_INTERVAL,
            autoPingTimeout=PING_TIMEOUT,
        )
        self.noisy = False


async def openLive(
    reactor: Any,
    api: str,
    key: str | None,
    timeout: float,
    model: str | None = None,
    language: str | None = None,
) -> LiveCaptioner:
    """
    A live session with the API at C{api} (C{http://} or C{https://}), for
    16 kHz audio transcribed by C{model} (a quality, or the API's default)
    in C{language} (or the API's default), once it has its settings.

    @raise NoRealtime: the API has no C{/v1/realtime}.
    @raise CliError: it cannot be reached, refuses the key or the settings,
        or does not answer within C{timeout} seconds.
    """
    parts = urlsplit(api)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = parts.path.rstrip("/") + "/v1/realtime?intent=transcription"
    url = f"{'wss' if secure else 'ws'}://{parts.netloc}{path}"
    settings: dict[str, Any] = {"input_audio_format": "pcm16", "input_audio_rate": RATE}
    transcription = {"model": model, "language": language}
    if model or language:  # else the API's defaults
        settings["input_audio_transcription"] = {k: v for k, v in transcription.items() if v}
    captioner = LiveCaptioner(reactor, api, settings, timeout)
    factory = _RealtimeFactory(
        url, {"Authorization": f"Bearer {key}"} if key else {}, captioner, api
    )
    endpoint = HostnameEndpoint(reactor, host, port)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)

    async def opening() -> LiveCaptioner:
        try:
            await endpoint.connect(factory)
        except CancelledError:
            raise
        except Exception as e:
            raise CliError(connectionProblem(api, e)) from None
        return await captioner.ready

    try:
        return await Deferred.fromCoroutine(opening()).addTimeout(timeout, reactor)
    except BaseException as e:
        await captioner.close()  # the socket, if there is one, gone first
        if isinstance(e, TimeoutError):
            raise CliError(f"no answer from the Privox API at {api} within {timeout:g} s") from None
        raise


# -- whole utterances, for an API without the live WebSocket ------------------------


class UtteranceCaptioner:
    """
    Cuts the audio into utterances on silence here (L{Segmenter}) and sends
    each to C{transcribe} as soon as it is cut; their lines are reported in
    order, whatever order the transcripts come back in. No partials.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        transcribe: Callable[[Utterance], Awaitable[str]],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.transcribe = transcribe
        self._close = close
        self.listener: Listener | None = None
        self._tail: Deferred[None] = succeed(None)
        self._jobs: set[Deferred[str]] = set()

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    def feed(self, pcm: bytes) -> None:
        for utterance in self.segmenter.feed(pcm):
            self._submit(utterance)

    def end(self) -> None:
        for utterance in self.segmenter.finish():
            self._submit(utterance)
        self._tail.addCallback(lambda _: self._linesDone())

    def cancel(self) -> None:
        for job in list(self._jobs):
            job.cancel()

    async def close(self) -> None:
        if self._close is not None:
            await self._close()

    def _submit(self, utterance: Utterance) -> None:
        job = Deferred.fromCoroutine(self._transcribe(utterance))
        self._jobs.add(job)
        job.addBoth(self._forget, job)
        self._tail = Deferred.fromCoroutine(self._lineAfter(self._tail, job))

    async def _transcribe(self, utterance: Utterance) -> str:
        return await self.transcribe(utterance)

    def _forget(self, result: object, job: Deferred[str]) -> object:
        self._jobs.discard(job)
        return result

    async def _lineAfter(self, previous: Deferred[None], job: Deferred[str]) -> None:
        """
        Report C{job}'s line once the line before it is out. Never fails.
        """
        await previous
        assert self.listener is not None
        try:
            text = await job
        except CliError as e:
            self.listener.failed(e)
            return
        except CancelledError:
            return
        except Exception as e:
            self.listener.failed(CliError(f"unexpected error: {type(e).__name__}: {e}"))
            return
        self.listener.line(text)

    def _linesDone(self) -> None:
        assert self.listener is not None
        self.listener.linesDone()


# -- what stdout shows ----------------------------------------------------------------

_ERASE = b"\r\x1b[2K"  # to the line's start, and clear it
_DIM = b"\x1b[2m"
_PLAIN = b"\x1b[0m"


class Screen:
    """
    Captions as bytes for stdout. On a terminal (C{width}: its columns) the
    hypothesis is drawn in place on the last line, dim (its end, where it
    is longer than the line), and a final replaces it as a line of its
    own; elsewhere (C{width} L{None}) only the finals are written, a line
    each, with no control characters. Empty finals are not written.
    """

    def __init__(self, width: int | None = None) -> None:
        self.width = width
        self._shown = False

    def partial(self, text: str) -> bytes:
        text = oneLine(text)
        if self.width is None:
            return b""
        if not text:
            return self.clear()
        room = max(self.width - 1, 2)  # the last column would wrap on some terminals
        if len(text) > room:
            text = "…" + text[-(room - 1) :]
        self._shown = True
        return _ERASE + _DIM + text.encode("utf-8") + _PLAIN

    def line(self, text: str) -> bytes:
        text = oneLine(text)
        return self.clear() + (text.encode("utf-8") + b"\n" if text else b"")

    def clear(self) -> bytes:
        "The hypothesis drawn, if any, erased."
        if not self._shown:
            return b""
        self._shown = False
        return _ERASE


# -- caption ----------------------------------------------------------------


# The caption's life:
#
#   reading ──end of input──▶ ending ──lines out──▶ closing ──stdout closed──▶ over
#      └────────Ctrl-C───────▶ stopping ─┘ (Ctrl-C again: quit) ─────────────▶ over
#
# A failed captioner closes stdout from any of the first three; stdout
# lost (nobody reads it), or a second Ctrl-C, ends it at once.


class CaptionEvents(typing.Protocol):
    def data(self, data: bytes) -> None:
        "PCM from stdin."

    def inputEnded(self) -> None:
        "stdin is at its end."

    def interrupt(self) -> None:
        "Ctrl-C."

    def partial(self, text: str) -> None:
        "The utterance being heard, so far."

    def line(self, text: str) -> None:
        "The next transcript's line, in order."

    def linesDone(self) -> None:
        "Every line after the end of input is out."

    def failed(self, error: CliError) -> None:
        "Captioning failed."

    def outputLost(self) -> None:
        "Nobody reads stdout any more."

    def lost(self) -> None:
        "stdout (and stdin) are closed."


@implementer(IHalfCloseableProtocol)
class CaptionProtocol(Protocol):
    """
    Reads PCM from its transport (stdin, through L{StandardIO}) into its
    L{Captioner}, and writes what it reports back to the transport
    (stdout), as L{Screen} draws it.

    @ivar done: fires once every line is written and stdout is closed at
        the end of input (or after L{interrupt}); fails with the first
        L{CliError}, after the lines before it are written.
    """

    events: CaptionEvents

    def __init__(self, captioner: Captioner, screen: Screen) -> None:
        self.captioner = captioner
        self.screen = screen
        self.done: Deferred[None] = Deferred()
        self._error: CliError | None = None
        self.events = CaptionMachine(self)
        captioner.attach(self.events)

    # The transport's faces: stdin, stdout, and Ctrl-C.

    def dataReceived(self, data: bytes) -> None:
        self.events.data(data)

    def readConnectionLost(self) -> None:
        self.events.inputEnded()

    def interrupt(self) -> None:
        """
        Ctrl-C: stop reading, as if the input had ended (it may have ended
        already: Ctrl-C stops C{arecord} too); a second time, quit.
        """
        self.events.interrupt()

    def writeConnectionLost(self) -> None:
        # Nobody reads our output any more (e.g. `privox caption | head -1`):
        # that ends the work, quietly.
        self.events.outputLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.lost()

    # What the machine does

    def _show(self, output: bytes) -> None:
        if output:
            self.transport.write(output)  # type: ignore[union-attr]

    def _close(self) -> None:
        self._show(self.screen.clear())
        self.transport.loseConnection()  # type: ignore[union-attr]  # flushes first

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        else:
            self.done.callback(None)


_caption = TypeMachineBuilder(CaptionEvents, CaptionProtocol)
reading = _caption.state("reading")
ending = _caption.state("ending")
stopping = _caption.state("stopping")
closing = _caption.state("closing")
over = _caption.state("over")


@reading.upon(CaptionEvents.data).loop()
def _read(events: CaptionEvents, c: CaptionProtocol, data: bytes) -> None:
    c.captioner.feed(data)


@ending.upon(CaptionEvents.data).loop()
@stopping.upon(CaptionEvents.data).loop()
@closing.upon(CaptionEvents.data).loop()
@over.upon(CaptionEvents.data).loop()
def _unread(events: CaptionEvents, c: CaptionProtocol, data: bytes) -> None:
    pass  # what came after the end (or a pause still in flight)


@reading.upon(CaptionEvents.inputEnded).to(ending)
def _inputEnded(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.captioner.end()


@ending.upon(CaptionEvents.inputEnded).loop()
@stopping.upon(CaptionEvents.inputEnded).loop()
@closing.upon(CaptionEvents.inputEnded).loop()
@over.upon(CaptionEvents.inputEnded).loop()
def _endedAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.interrupt).to(stopping)
def _stop(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.transport.pauseProducing()  # type: ignore[union-attr]
    c.captioner.end()


@ending.upon(CaptionEvents.interrupt).to(stopping)
def _stopEnded(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass  # the input had ended already (Ctrl-C stops arecord too)


@stopping.upon(CaptionEvents.interrupt).to(over)
@closing.upon(CaptionEvents.interrupt).to(over)
def _quit(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._show(c.screen.clear())
    c.done.errback(SystemExit(EXIT_INTERRUPTED))
    c.captioner.cancel()


@over.upon(CaptionEvents.interrupt).loop()
def _overAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.partial).loop()
@ending.upon(CaptionEvents.partial).loop()
@stopping.upon(CaptionEvents.partial).loop()
def _draw(events: CaptionEvents, c: CaptionProtocol, text: str) -> None:
    c._show(c.screen.partial(text))


@reading.upon(CaptionEvents.line).loop()
@ending.upon(CaptionEvents.line).loop()
@stopping.upon(CaptionEvents.line).loop()
def _write(events: CaptionEvents, c: CaptionProtocol, text: str) -> None:
    c._show(c.screen.line(text))


@closing.upon(CaptionEvents.partial).loop()
@over.upon(CaptionEvents.partial).loop()
@closing.upon(CaptionEvents.line).loop()
@over.upon(CaptionEvents.line).loop()
def _unwritten(events: CaptionEvents, c: CaptionProtocol, text: str) -> None:
    pass  # after a failure, or with stdout over


@ending.upon(CaptionEvents.linesDone).to(closing)
@stopping.upon(CaptionEvents.linesDone).to(closing)
def _allOut(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._close()


@closing.upon(CaptionEvents.linesDone).loop()
@over.upon(CaptionEvents.linesDone).loop()
def _outAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.failed).to(closing)
@ending.upon(CaptionEvents.failed).to(closing)
@stopping.upon(CaptionEvents.failed).to(closing)
def _failed(events: CaptionEvents, c: CaptionProtocol, error: CliError) -> None:
    c._error = error
    c.captioner.cancel()
    c._close()


@closing.upon(CaptionEvents.failed).loop()
@over.upon(CaptionEvents.failed).loop()
def _failedAlready(events: CaptionEvents, c: CaptionProtocol, error: CliError) -> None:
    pass  # the first error is the one said


@reading.upon(CaptionEvents.outputLost).to(over)
@ending.upon(CaptionEvents.outputLost).to(over)
@stopping.upon(CaptionEvents.outputLost).to(over)
@closing.upon(CaptionEvents.outputLost).to(over)
def _deaf(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.captioner.cancel()
    c.transport.pauseProducing()  # type: ignore[union-attr]
    c._finish()


@reading.upon(CaptionEvents.lost).to(over)
@ending.upon(CaptionEvents.lost).to(over)
@stopping.upon(CaptionEvents.lost).to(over)
@closing.upon(CaptionEvents.lost).to(over)
@over.upon(CaptionEvents.lost).loop()
def _lost(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._finish()


@over.upon(CaptionEvents.outputLost).loop()
def _deafAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


CaptionMachine = build(_caption)
