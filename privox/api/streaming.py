"""
Answers that stream over HTTP, as OpenAI's SDK reads them:

  - C{POST /v1/audio/transcriptions} with C{stream=true}: server-sent events,
    a C{transcript.text.delta} for each utterance as it is heard, then
    C{transcript.text.done} with the whole text; for a long recording, cut
    into pieces transcribed at once (L{privox.api.fanout}), a Privox
    C{privox.progress} event (C{done}, C{total} pieces) as pieces finish and
    a delta for each piece's text, in order;
  - C{POST /v1/audio/speech}: the audio in chunks (chunked transfer) as each
    sentence is spoken, or with C{stream_format: "sse"} C{speech.audio.delta}
    events (base64 audio) and C{speech.audio.done}.

Once the first byte is out the status is sent: a failure after it ends the
stream with an C{error} event (SSE), or cuts the audio short. A long
recording's events are kept alive (an SSE comment every L{KEEP_ALIVE}
seconds) while its pieces wait for producers, so that no proxy between
takes the quiet for a dead stream.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from privox.api.access import Caller
from privox.api.errors import ApiError, BadInput
from privox.api.exchange import Heard, Transcribed
from privox.api.fanout import InOrder, Piece, Progress
from privox.api.forms import Upload
from privox.api.live import LiveJobs
from privox.api.speech import CONTENT_TYPES, SpeechEncoder, SpeechEncodingError
from privox.engines.audio import decodeAudio, toInt16
from privox.engines.errors import BadAudio

log = Logger()

#: Runs C{f(*args)} in a thread and fires with its result.
Runner = Callable[..., Any]

#: Seconds between two SSE comments on a long recording's quiet stream
#: (under the 30 to 60 s a proxy commonly waits for a byte).
KEEP_ALIVE = 15.0


def sseEvent(fields: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(fields, separators=(",", ":")).encode() + b"\n\n"


def _startEvents(request: IRequest) -> None:
    request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-cache")


def _errorEvent(error: ApiError) -> bytes:
    return sseEvent({"type": "error", "error": {"message": error.message, "type": error.kind}})


def pcm16k(data: bytes, format: str) -> bytes:
    """
    An upload as 16 kHz mono s16le (blocking: run in a thread).

    @raise BadInput: it does not decode.
    """
    try:
        return toInt16(decodeAudio(data, format, 16000).samples).tobytes()
    except BadAudio as e:
        raise BadInput(str(e)) from None


async def streamTranscript(
    request: IRequest,
    live: LiveJobs,
    runInThread: Runner,
    caller: Caller,
    model: str,
    language: str | None,
    audio: Upload,
    whole: Callable[[], Awaitable[Transcribed]],
    asWhole: bool = False,
    longAbove: float | None = None,
    long: Callable[[bytes, Progress, InOrder], Awaitable[Transcribed]] | None = None,
) -> bytes:
    """
    The transcript of C{audio} as server-sent events, utterance by
    utterance. Errors before the first event are raised, as usual. Audio
    longer than C{longAbove} seconds is transcribed by C{long} (given the
    decoded PCM, a progress and an in-order callback: see
    L{streamPieces}). Audio longer than a live job may be (or C{asWhole}:
    what a live job cannot take, a prompt...) is transcribed by C{whole},
    and its text sent as one delta.
    """
    pcm = await runInThread(pcm16k, audio.data, audio.format)
    if long is not None and longAbove is not None and len(pcm) / 32000 > longAbove:
        return await streamPieces(request, pcm, long, live.clock)
    if asWhole or len(pcm) / 32000 > live.maxSeconds:
        result = await whole()
        _startEvents(request)
        return sseEvent({"type": "transcript.text.delta", "delta": result.text}) + sseEvent(
            {"type": "transcript.text.done", "text": result.text}
        )
    started = False

    def heard(piece: Heard) -> None:
        nonlocal started
        if not piece.final or not piece.text:
            return
        if not started:
            _startEvents(request)
            started = True
        request.write(sseEvent({"type": "transcript.text.delta", "delta": piece.text + " "}))

    job = await live.transcribe(caller, model, language, heard, need=len(pcm) / 32000)
    job.write(pcm)
    job.end()
    try:
        result = await job.done
    except ApiError as e:
        if not started:
            raise
        return _errorEvent(e)
    if not started:
        _startEvents(request)
    return sseEvent({"type": "transcript.text.done", "text": result.text})


async def streamPieces(
    request: IRequest,
    pcm: bytes,
    long: Callable[[bytes, Progress, InOrder], Awaitable[Transcribed]],
    clock: IReactorTime,
) -> bytes:
    """
    A long recording's transcript as its pieces finish: a
    C{{"type": "privox.progress", "done": n, "total": m}} event each time
    one does (the first, with C{done} 0, once it is cut and the job
    admitted), a C{transcript.text.delta} with each piece's text in the
    recording's order, then C{transcript.text.done}; an SSE comment every
    L{KEEP_ALIVE} seconds between. A failure after the first event ends
    the stream with an C{error} event.
    """
    started = False
    spoke = False
    keepAlive = LoopingCall(request.write, b": keep-alive\n\n")
    keepAlive.clock = clock

    def begin() -> None:
        nonlocal started
        if not started:
            _startEvents(request)
            started = True
            keepAlive.start(KEEP_ALIVE, now=False)

    def progress(done: int, total: int) -> None:
        begin()
        request.write(sseEvent({"type": "privox.progress", "done": done, "total": total}))

    def inOrder(piece: Piece, result: Transcribed) -> None:
        nonlocal spoke
        text = result.text.strip()
        if not text:
            return
        begin()
        request.write(sseEvent({"type": "transcript.text.delta",
                                "delta": (" " if spoke else "") + text}))
        spoke = True

    try:
        result = await long(pcm, progress, inOrder)
    except ApiError as e:
        if not started:
            raise
        log.info("a streamed transcript was cut short: {kind}", kind=e.kind)
        return _errorEvent(e)
    finally:
        if keepAlive.running:
            keepAlive.stop()
    if not started:
        _startEvents(request)
    return sseEvent({"type": "transcript.text.done", "text": result.text})


class _SpeechOut:
    """
    Each sentence's audio, encoded in a thread, written in order.
    """

    def __init__(self, request: IRequest, runInThread: Runner, format: str, sse: bool) -> None:
        self._request = request
        self._runInThread = runInThread
        self._encoder = SpeechEncoder(format)
        self._format = format
        self._sse = sse
        self._chain: Deferred[Any] = succeed(None)
        self.started = False
        self.failure: Exception | None = None

    def spoken(self, pcm: bytes, rate: int) -> None:
        self._chain.addCallback(lambda _: self._runInThread(self._encoder.feed, pcm, rate))
        self._chain.addCallback(self._write)

    def _begin(self) -> None:
        if not self.started:
            self.started = True
            self._request.setHeader(
                b"Content-Type",
                b"text/event-stream; charset=utf-8" if self._sse else self._contentType(),
            )

    def _write(self, data: bytes) -> None:
        if data:
            self._begin()
            self._request.write(self._wrap(data))

    def _contentType(self) -> bytes:
        return CONTENT_TYPES[self._format].encode()

    def _wrap(self, data: bytes) -> bytes:
        if not self._sse:
            return data
        return sseEvent({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

    async def close(self) -> bytes:
        await self._chain
        rest = await self._runInThread(self._encoder.close)
        self._begin()
        if not self._sse:
            return rest
        tail = self._wrap(rest) if rest else b""
        return tail + sseEvent({"type": "speech.audio.done"})


async def streamSpeech(
    request: IRequest,
    live: LiveJobs,
    runInThread: Runner,
    caller: Caller,
    model: str,
    voice: str | None,
    text: str,
    need: float,
    format: str,
    sse: bool,
) -> bytes:
    """
    C{text} spoken, sentence by sentence, as C{format} (raw chunks, or SSE).
    """
    out = _SpeechOut(request, runInThread, format, sse)
    job = await live.speak(caller, model, None, voice, out.spoken, need=need)
    job.write(text)
    job.end()
    try:
        await job.done
        return await out.close()
    except (ApiError, SpeechEncodingError) as e:
        if not out.started:
            raise ApiError(str(e)) if isinstance(e, SpeechEncodingError) else e
        log.info("a streamed answer was cut short: {kind}", kind=type(e).__name__)
        return _errorEvent(e if isinstance(e, ApiError) else ApiError(str(e))) if sse else b""
