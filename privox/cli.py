"""
The C{privox} command: a client of the exchange's HTTP API.

  - C{privox stt FILE} prints what the file says;
  - C{privox tts "TEXT" -o out.wav} writes speech to a WAV file;
  - C{privox caption} reads 16 kHz mono s16le PCM from stdin (e.g.
    C{arecord -f S16_LE -r 16000 -c 1 | privox caption}), cuts it into
    utterances on silence with webrtcvad and prints one line per utterance,
    in order, as each is transcribed;
  - C{privox status} prints the exchange's farms and their load (C{GET
    /status}) as a table;
  - C{privox account} prints the key's allowance, use and credit in the
    rolling hour (C{GET /v1/account});
  - C{privox keys ...} manages the keys of an account store directly (see
    L{privox.accounts.admin}; no API involved).

Every API command takes C{--api URL} (default C{$PRIVOX_API}, else
C{http://127.0.0.1:8080}), C{--key KEY} (default C{$PRIVOX_KEY}; without one,
requests go without a key, which an API with anonymous use on accepts) and
C{--timeout SECONDS} (for each request).

HTTP goes through treq on the reactor (L{react}); stdin is read with
L{StandardIO}, so reading never blocks the reactor and transcriptions run
while capture goes on.

Exit status: 0 on success; 1 with one line on stderr when something goes
wrong (the API cannot be reached, refuses the key, answers with another
error; a file cannot be read or written); 2 for usage errors. In
C{caption}, the first Ctrl-C ends capture as end of input would (the last
utterance is still transcribed and printed); a second one quits at once.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import mimetypes
import os
import signal
import sys
import tempfile
import wave
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping, Sequence
from urllib.parse import urlsplit

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.fdesc import setBlocking
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from privox.accounts.admin import addKeysParser, runKeys
from privox.accounts.store import StoreError
from privox.api.models import QUALITIES
from privox.wav import pcmToWav

#: Where the API is when neither C{--api} nor C{$PRIVOX_API} says.
DEFAULT_API = "http://127.0.0.1:8080"
#: Seconds a request may take (C{--timeout}).
DEFAULT_TIMEOUT = 120.0

#: What C{caption} reads: mono signed 16-bit little-endian PCM at this rate.
CAPTION_RATE = 16000
#: Frame lengths webrtcvad accepts, in milliseconds.
FRAME_MS = (10, 20, 30)
#: An utterance with less speech than this (a click, a cough) is not sent.
MIN_SPEECH_MS = 120

_EXIT_ERROR = 1
_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130


class CliError(Exception):
    """
    A failure to report as one line on stderr, then exit 1.
    """


# -- talking to the API -----------------------------------------------------


class PrivoxClient:
    """
    The API's original routes over treq, every failure turned into a
    L{CliError} with a one-line message.
    """

    def __init__(self, reactor: Any, api: str, key: str | None, timeout: float) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.api = api
        self.key = key
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    async def stt(
        self,
        audio: bytes,
        filename: str,
        quality: str | None = None,
        language: str | None = None,
        asJson: bool = False,
    ) -> str:
        """
        C{POST /stt}: the transcript (or, with C{asJson}, the API's JSON).
        """
        fields = self._keyField()
        if quality:
            fields["quality"] = quality
        if language:
            fields["language"] = language
        contentType = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        headers = {"Accept": "application/json"} if asJson else {}
        body = await self._post(
            "/stt",
            data=fields,
            files={"file": (filename, contentType, io.BytesIO(audio))},
            headers=headers,
        )
        return body.decode("utf-8", "replace")

    async def tts(self, text: str, voice: str | None = None, language: str | None = None) -> bytes:
        """
        C{POST /tts}: the WAV file, checked to be one.
        """
        fields = dict(self._keyField(), text=text)
        if voice:
            fields["voice"] = voice
        if language:
            fields["language"] = language
        audio = await self._post("/tts", data=fields)
        try:
            wavInfo(audio)
        except CliError:
            raise CliError(
                f"the Privox API at {self.api} answered with something that is not a WAV file"
            ) from None
        return audio

    async def status(self) -> dict[str, Any]:
        """
        C{GET /status}: the farms and their load.
        """
        body = await self._request("GET", "/status", headers={"Accept": "application/json"})
        try:
            status = json.loads(body)
            if not isinstance(status, dict) or not isinstance(status.get("farms"), list):
                raise ValueError
        except ValueError:
            raise CliError(
                f"the Privox API at {self.api} answered /status with something that is not its JSON"
            ) from None
        return status

    async def account(self) -> dict[str, Any]:
        """
        C{GET /v1/account}: this key's allowance, use and credit.
        """
        headers = {"Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        body = await self._request("GET", "/v1/account", headers=headers)
        try:
            account = json.loads(body)
            if not isinstance(account, dict) or not all(
                isinstance(account.get(name), (int, float))
                for name in ("allowance", "used", "earned", "remaining", "hourly_seconds")
            ):
                raise ValueError
        except ValueError:
            raise CliError(
                f"the Privox API at {self.api} answered /v1/account with something that is "
                "not its JSON"
            ) from None
        return account

    def _keyField(self) -> dict[str, str]:
        return {"key": self.key} if self.key else {}

    async def _post(self, path: str, **kwargs: Any) -> bytes:
        return await self._request("POST", path, **kwargs)

    async def _request(self, method: str, path: str, **kwargs: Any) -> bytes:
        async def request() -> tuple[Any, bytes]:
            response = await self._http.request(method, self.api + path, **kwargs)
            return response, await response.content()

        d = Deferred.fromCoroutine(request())
        timedOut = False

        def timeOut() -> None:
            nonlocal timedOut
            timedOut = True
            d.cancel()

        timer = self.reactor.callLater(self.timeout, timeOut)
        try:
            response, body = await d
        except Exception as e:
            if timedOut:
                raise CliError(
                    f"no answer from the Privox API at {self.api} within {self.timeout:g} s"
                ) from None
            if isinstance(e, CancelledError):
                raise
            raise CliError(_connectionProblem(self.api, e)) from None
        finally:
            if timer.active():
                timer.cancel()
        if response.code != 200:
            raise CliError(_httpProblem(response, body))
        return body

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _connectionProblem(api: str, e: Exception) -> str:
    from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

    if isinstance(e, netError.ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(e, netError.DNSLookupError):
        why = f"unknown host {urlsplit(api).hostname}"
    elif isinstance(e, (netError.TCPTimedOutError, netError.TimeoutError)):
        why = "the connection timed out"
    elif isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        reasons = [r.getErrorMessage().rstrip(".") for r in e.reasons if isinstance(r, Failure)]
        return f"the Privox API at {api} dropped the connection: " + (
            "; ".join(filter(None, reasons)) or type(e).__name__
        )
    else:
        why = _oneLine(str(e)) or type(e).__name__
    return f"cannot reach the Privox API at {api}: {why}"


def _httpProblem(response: Any, body: bytes) -> str:
    """
    An error response as a line: the API's reason, then the status.
    """
    code = response.code
    reason = ""
    contentType = (response.headers.getRawHeaders("content-type") or [""])[0]
    text = body.decode("utf-8", "replace")
    if contentType.startswith("application/json"):
        try:
            reason = str(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            pass
    elif contentType.startswith("text/plain"):
        reason = text
    reason = _oneLine(reason)[:300]
    if not reason:
        try:
            reason = HTTPStatus(code).phrase.lower()
        except ValueError:
            reason = "error"
    status = f"HTTP {code}"
    retryAfter = (response.headers.getRawHeaders("retry-after") or [None])[0]
    if retryAfter:
        status += f"; retry after {retryAfter} s"
    return f"{reason} ({status})"


def _oneLine(text: str) -> str:
    return " ".join(text.split())


# -- audio ------------------------------------------------------------------


@dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.rate


def wavInfo(data: bytes) -> WavInfo:
    """
    What a WAV file holds.

    @raise CliError: it is not a (PCM) WAV file.
    """
    try:
        with wave.open(io.BytesIO(data)) as w:
            return WavInfo(w.getframerate(), w.getnchannels(), w.getnframes())
    except (wave.Error, EOFError) as e:
        raise CliError(f"not a WAV file: {e}") from None


@dataclass(frozen=True)
class Utterance:
    """
    A stretch of speech cut from the stream, with its padding.

    @ivar pcm: its mono s16le samples.
    @ivar start: where it starts in the stream, in seconds.
    """

    pcm: bytes = field(repr=False)
    start: float
    rate: int = CAPTION_RATE

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.rate

    @property
    def end(self) -> float:
        return self.start + self.duration

    def wav(self) -> bytes:
        return pcmToWav(self.pcm, self.rate)


class Segmenter:
    """
    Cuts a stream of mono s16le PCM into utterances, frame by frame.

    A speech frame starts an utterance, which takes along up to
    C{paddingMs} of the audio before it. The utterance ends once
    C{silenceMs} of non-speech follow its last speech frame, keeping
    C{paddingMs} of that silence; the rest becomes the next one's leading
    padding. An utterance reaching C{maxSeconds} is cut there, and speech
    going on starts another. Utterances with less than C{minSpeechMs} of
    speech in them are dropped. The result does not depend on how the bytes
    are split between L{feed} calls.

    @param isSpeech: the classifier, given one frame's bytes (see
        L{webrtcvadClassifier}).
    """

    def __init__(
        self,
        isSpeech: Callable[[bytes], bool],
        rate: int = CAPTION_RATE,
        frameMs: int = 30,
        silenceMs: int = 600,
        maxSeconds: float = 30.0,
        paddingMs: int = 200,
        minSpeechMs: int = MIN_SPEECH_MS,
    ) -> None:
        if frameMs not in FRAME_MS:
            raise ValueError(f"frames must be 10, 20 or 30 ms, not {frameMs}")
        if silenceMs <= 0 or maxSeconds <= 0 or paddingMs < 0:
            raise ValueError("silenceMs and maxSeconds must be positive, paddingMs not negative")
        self.isSpeech = isSpeech
        self.rate = rate
        self.frameMs = frameMs
        self.frameBytes = rate * frameMs // 1000 * 2
        self.silenceFrames = math.ceil(silenceMs / frameMs)
        self.paddingFrames = paddingMs // frameMs
        self.maxFrames = max(1, int(maxSeconds * 1000 // frameMs))
        self.minSpeechFrames = math.ceil(minSpeechMs / frameMs)
        self._partial = bytearray()
        self._before: deque[bytes] = deque(maxlen=self.paddingFrames or None)
        self._frames: list[bytes] | None = None
        self._start = 0  # frame index of the utterance's first frame
        self._lastSpeech = 0  # index in _frames of its last speech frame
        self._voiced = 0
        self._position = 0  # frames seen
        self._finished = False

    def feed(self, data: bytes) -> list[Utterance]:
        """
        Take the next bytes of the stream.

        @return: the utterances they complete, in order.
        """
        if self._finished:
            raise ValueError("feed() after finish()")
        self._partial += data
        done: list[Utterance] = []
        whole = len(self._partial) - len(self._partial) % self.frameBytes
        for offset in range(0, whole, self.frameBytes):
            frame = bytes(self._partial[offset : offset + self.frameBytes])
            utterance = self._frame(frame)
            if utterance is not None:
                done.append(utterance)
        del self._partial[:whole]
        return done

    def finish(self) -> list[Utterance]:
        """
        The stream has ended: the utterance under way, if any. A last frame
        too short to classify is dropped.
        """
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        self._partial.clear()
        if self._frames is None:
            return []
        utterance = self._end(trim=True)
        return [] if utterance is None else [utterance]

    def _frame(self, frame: bytes) -> Utterance | None:
        speech = self.isSpeech(frame)
        self._position += 1
        if self._frames is None:
            if not speech:
                if self.paddingFrames:
                    self._before.append(frame)
                return None
            self._frames = [*self._before, frame]
            self._start = self._position - len(self._frames)
            self._before.clear()
            self._lastSpeech = len(self._frames) - 1
            self._voiced = 1
            return None
        self._frames.append(frame)
        if speech:
            self._lastSpeech = len(self._frames) - 1
            self._voiced += 1
        if len(self._frames) - 1 - self._lastSpeech >= self.silenceFrames:
            return self._end(trim=True)
        if len(self._frames) >= self.maxFrames:
            return self._end(trim=False)
        return None

    def _end(self, trim: bool) -> Utterance | None:
        frames = self._frames
        assert frames is not None
        self._frames = None
        if trim:
            keep = self._lastSpeech + 1 + self.paddingFrames
            if self.paddingFrames:
                self._before.extend(frames[keep:])
            frames = frames[:keep]
        if self._voiced < self.minSpeechFrames:
            return None
        return Utterance(b"".join(frames), self._start * self.frameMs / 1000, self.rate)


def webrtcvadClassifier(aggressiveness: int, rate: int = CAPTION_RATE) -> Callable[[bytes], bool]:
    """
    webrtcvad's speech/non-speech decision for one frame.

    @raise CliError: webrtcvad is not installed.
    """
    try:
        import webrtcvad
    except ImportError as e:
        raise CliError(
            f"privox caption needs webrtcvad ({e}): pip install webrtcvad-wheels"
        ) from None
    vad = webrtcvad.Vad(aggressiveness)

    def isSpeech(frame: bytes) -> bool:
        return bool(vad.is_speech(frame, rate))

    return isSpeech


# -- caption ----------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class CaptionProtocol(Protocol):
    """
    Reads PCM from its transport (stdin, through L{StandardIO}), sends each
    utterance to C{transcribe} as soon as it is cut, and writes the
    transcripts back to the transport (stdout), one line each, in order,
    whatever order they come back in. Empty transcripts print nothing.

    @ivar done: fires once every line is written and stdout is closed at the
        end of input (or after L{interrupt}); fails with the first
        L{CliError}, after the lines before it are written.
    """

    def __init__(
        self, segmenter: Segmenter, transcribe: Callable[[Utterance], Awaitable[str]]
    ) -> None:
        self.segmenter = segmenter
        self.transcribe = transcribe
        self.done: Deferred[None] = Deferred()
        self._tail: Deferred[None] = succeed(None)
        self._jobs: set[Deferred[str]] = set()
        self._error: Exception | None = None
        self._reading = True
        self._closing = False
        self._writable = True
        self._interrupted = False

    # stdin

    def dataReceived(self, data: bytes) -> None:
        if not self._reading:
            return
        for utterance in self.segmenter.feed(data):
            self._submit(utterance)

    def readConnectionLost(self) -> None:
        self._endOfInput()

    def interrupt(self) -> None:
        """
        Ctrl-C: stop reading, as if the input had ended (it may have ended
        already: Ctrl-C stops C{arecord} too); a second time, quit.
        """
        if not self._interrupted:
            self._interrupted = True
            if self._reading:
                self.transport.pauseProducing()  # type: ignore[union-attr]
                self._endOfInput()
        elif not self.done.called:
            self.done.errback(SystemExit(_EXIT_INTERRUPTED))
            for job in list(self._jobs):
                job.cancel()

    def _endOfInput(self) -> None:
        if not self._reading:
            return
        self._reading = False
        for utterance in self.segmenter.finish():
            self._submit(utterance)
        self._tail.addCallback(lambda _: self._close())

    # transcripts, in order

    def _submit(self, utterance: Utterance) -> None:
        job = Deferred.fromCoroutine(self.transcribe(utterance))
        self._jobs.add(job)
        job.addBoth(self._forget, job)
        self._tail = Deferred.fromCoroutine(self._printAfter(self._tail, job))

    def _forget(self, result: object, job: Deferred[str]) -> object:
        self._jobs.discard(job)
        return result

    async def _printAfter(self, previous: Deferred[None], job: Deferred[str]) -> None:
        """
        Write C{job}'s line once the line before it is out. Never fails.
        """
        await previous
        try:
            text = await job
        except CliError as e:
            self._fail(e)
            return
        except CancelledError:
            return
        except Exception as e:
            self._fail(CliError(f"unexpected error: {type(e).__name__}: {e}"))
            return
        line = _oneLine(text)
        if self._error is None and line and self._writable:
            self.transport.write(line.encode("utf-8") + b"\n")  # type: ignore[union-attr]

    def _fail(self, error: CliError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._reading = False
        for job in list(self._jobs):
            job.cancel()
        self._close()

    # stdout

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._writable:
            self.transport.loseConnection()  # type: ignore[union-attr]  # flushes first
        else:
            self._finish()

    def writeConnectionLost(self) -> None:
        # Nobody reads our output any more (e.g. `privox caption | head -1`):
        # that ends the work, quietly.
        self._writable = False
        self._reading = False
        self._closing = True
        for job in list(self._jobs):
            job.cancel()
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._finish()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._writable = False
        self._reading = False
        self._finish()

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        else:
            self.done.callback(None)


# -- the commands -------------------------------------------------------------


async def runStt(reactor: Any, args: argparse.Namespace) -> None:
    audio = readFile(args.file)
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        text = await client.stt(
            audio, os.path.basename(args.file) or "audio", args.quality, args.language, args.json
        )
    finally:
        await client.close()
    sys.stdout.write(text.strip() + "\n")
    sys.stdout.flush()


async def runTts(reactor: Any, args: argparse.Namespace) -> None:
    toStdout = args.output == "-"
    if not toStdout:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise CliError(f"cannot write {args.output}: no folder {folder}")
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        audio = await client.tts(args.text, args.voice, args.language)
    finally:
        await client.close()
    info = wavInfo(audio)
    where = "the WAV to stdout" if toStdout else args.output
    report = f"wrote {where}: {info.duration:.2f} s of audio at {info.rate} Hz\n"
    if toStdout:
        sys.stdout.buffer.write(audio)
        sys.stdout.flush()
        sys.stderr.write(report)
    else:
        writeFile(args.output, audio)
        sys.stdout.write(report)
        sys.stdout.flush()


async def runCaption(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.stdio import StandardIO

    segmenter = Segmenter(
        webrtcvadClassifier(args.aggressiveness),
        frameMs=args.frame_ms,
        silenceMs=args.silence_ms,
        maxSeconds=args.max_seconds,
        paddingMs=args.padding_ms,
    )
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)

    async def transcribe(utterance: Utterance) -> str:
        return await client.stt(utterance.wav(), "utterance.wav", args.quality, args.language)

    protocol = CaptionProtocol(segmenter, transcribe)
    StandardIO(protocol, reactor=reactor)

    def onInterrupt(signum: int, frame: Any) -> None:
        reactor.callFromThread(protocol.interrupt)

    # After the reactor's own handlers are in place (reactor.run installs them).
    reactor.callWhenRunning(signal.signal, signal.SIGINT, onInterrupt)
    try:
        await protocol.done
    finally:
        await client.close()
        try:
            setBlocking(0)  # StandardIO made stdin non-blocking; leave it as found
        except OSError:
            pass


async def runStatus(reactor: Any, args: argparse.Namespace) -> None:
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        status = await client.status()
    finally:
        await client.close()
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(statusTable(status))


async def runAccount(reactor: Any, args: argparse.Namespace) -> None:
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        account = await client.account()
    finally:
        await client.close()
    if args.json:
        sys.stdout.write(json.dumps(account, indent=2) + "\n")
        return
    window = account.get("window_seconds", 3600)
    sys.stdout.write(
        f"key {account.get('key_id', '?')}: {account['used']:g} of {account['allowance']:g} "
        f"audio seconds used in the last {window:g} s; {account['remaining']:g} left\n"
        f"allowance = {account['hourly_seconds']:g} of its own + {account['earned']:g} "
        "earned by producing (QSS)\n"
    )


def statusTable(status: dict[str, Any]) -> str:
    """
    The API's C{/status} as a table: a row per farm, service and model.
    """
    header = ["FARM", "STATE", "SERVICE", "MODEL", "PRODUCERS", "IDLE", "BUSY", "QUEUE"]
    rows: list[list[str]] = []
    for farm in status.get("farms", []):
        name = str(farm.get("name", "?")) + (" (fallback)" if farm.get("fallback") else "")
        state = "up" if farm.get("up") else "down"
        load = farm.get("load")
        if not load:
            services = ",".join(farm.get("services", [])) or "-"
            rows.append([name, state, services, "(no load figures)", "", "", "", ""])
            continue
        for service, figures in sorted(load.get("services", {}).items()):
            queue = str(figures.get("queue", 0))
            models = figures.get("models") or {}
            if not models:
                rows.append([name, state, service, "-", "0", "0", "0", queue])
            for model, counts in sorted(models.items()):
                rows.append([
                    name, state, service, model, str(counts.get("connected", 0)),
                    str(counts.get("idle", 0)), str(counts.get("busy", 0)), queue,
                ])
    if not rows:
        return "no farms\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
        for row in [header, *rows]
    )


COMMANDS = {
    "stt": runStt, "tts": runTts, "caption": runCaption, "status": runStatus,
    "account": runAccount, "keys": runKeys,
}


def readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def writeFile(path: str, data: bytes) -> None:
    """
    Write C{data} to C{path} whole or not at all (through a temporary file
    beside it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".privox-", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the command line ---------------------------------------------------------


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number")
    return number


def _positiveInt(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


def _notNegativeInt(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def buildParser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """
    The C{privox} command line; defaults for C{--api} and C{--key} come from
    C{environ} (default L{os.environ}).
    """
    env = os.environ if environ is None else environ
    # --api, --key and --timeout go before the command or after it; given
    # after it (defaults suppressed there), they win.
    common = argparse.ArgumentParser(add_help=False)
    _addConnectionOptions(common, env, afterCommand=True)
    quality = argparse.ArgumentParser(add_help=False)
    quality.add_argument(
        "--quality", choices=QUALITIES, help="transcription quality (the API's default: fast)"
    )
    quality.add_argument(
        "--language", metavar="LANG", help="the language spoken, e.g. en (the API's default: en)"
    )

    parser = argparse.ArgumentParser(
        prog="privox", description="Speech to text and text to speech through a Privox exchange."
    )
    _addConnectionOptions(parser, env, afterCommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stt = commands.add_parser(
        "stt", parents=[common, quality], help="print what an audio file says",
        description="Transcribe an audio file (WAV, or anything FFmpeg reads).",
    )
    stt.add_argument("file", metavar="FILE", help="the audio file")
    stt.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON (text, model, language, duration)",
    )

    tts = commands.add_parser(
        "tts", parents=[common], help="speak text into a WAV file",
        description="Turn text into speech, written as a WAV file.",
    )
    tts.add_argument("text", metavar="TEXT", help="what to say")
    tts.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="the WAV file to write (- for stdout)",
    )
    tts.add_argument("--voice", help="the voice, e.g. voice1 (the API's default otherwise)")
    tts.add_argument("--language", metavar="LANG", help="the text's language, e.g. en")

    caption = commands.add_parser(
        "caption", parents=[common, quality], help="live captions of 16 kHz PCM on stdin",
        description=(
            "Read 16 kHz mono signed 16-bit little-endian PCM from stdin (e.g. "
            "arecord -f S16_LE -r 16000 -c 1 | privox caption), cut it into utterances "
            "on silence and print one line per utterance. Ctrl-C ends capture and "
            "prints what is left; a second Ctrl-C quits at once."
        ),
    )
    caption.add_argument(
        "--aggressiveness", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
        help="how readily webrtcvad calls a frame non-speech (default: %(default)s)",
    )
    caption.add_argument(
        "--frame-ms", type=int, choices=FRAME_MS, default=30,
        help="the length of the frames webrtcvad judges (default: %(default)s)",
    )
    caption.add_argument(
        "--silence-ms", type=_positiveInt, default=600, metavar="MS",
        help="non-speech that ends an utterance (default: %(default)s)",
    )
    caption.add_argument(
        "--padding-ms", type=_notNegativeInt, default=200, metavar="MS",
        help="audio kept before and after the speech (default: %(default)s)",
    )
    caption.add_argument(
        "--max-seconds", type=_positive, default=30.0, metavar="SECONDS",
        help="cut utterances longer than this (default: %(default)g)",
    )
    status = commands.add_parser(
        "status", parents=[common], help="show the farms and their load",
        description=(
            "Show the exchange's farms, the producers per model (connected, idle, "
            "busy) and the queues, from the API's /status. No key is needed."
        ),
    )
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    account = commands.add_parser(
        "account", parents=[common], help="your key's allowance, use and credit this hour",
        description=(
            "Show how many audio seconds your key may use in the rolling hour, how many it "
            "used, and the quality speech seconds (QSS) its producers earned."
        ),
    )
    account.add_argument("--json", action="store_true", help="print the API's JSON")
    addKeysParser(commands, env)
    return parser


def _addConnectionOptions(
    parser: argparse.ArgumentParser, env: Mapping[str, str], afterCommand: bool
) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if afterCommand else value

    parser.add_argument(
        "--api",
        default=default(env.get("PRIVOX_API") or DEFAULT_API),
        metavar="URL",
        help=f"the Privox API (default: $PRIVOX_API, else {DEFAULT_API})",
    )
    parser.add_argument(
        "--key",
        default=default(env.get("PRIVOX_KEY") or None),
        help="your key (default: $PRIVOX_KEY; none: anonymous use, where the API allows it)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"give up on a request after this long (default: {DEFAULT_TIMEOUT:g})",
    )


def parseArguments(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """
    The parsed command line, checked.

    @raise SystemExit: (2) a usage error, after saying what it is.
    """
    parser = buildParser(environ)
    args = parser.parse_args(argv)
    if args.command == "keys":
        return args
    api = args.api.strip().rstrip("/")
    parts = urlsplit(api)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _usage(f"--api must be an http:// or https:// URL, not {args.api!r}")
    args.api = api
    # No key: requests go without one (anonymous use, where the API allows
    # it; it answers 401 where it does not).
    args.key = (args.key or "").strip() or None
    if args.command == "tts" and not args.text.strip():
        _usage("the text to speak is empty")
    if args.command == "caption" and sys.stdin is not None and sys.stdin.isatty():
        _usage(
            "privox caption reads raw 16 kHz PCM from stdin: pipe audio into it, "
            "e.g. arecord -f S16_LE -r 16000 -c 1 | privox caption"
        )
    return args


def _usage(message: str) -> None:
    sys.stderr.write(f"privox: {message}\n")
    raise SystemExit(_EXIT_USAGE)


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    try:
        await COMMANDS[args.command](reactor, args)
    except (CliError, StoreError) as e:
        _fatal(str(e))
    except Exception as e:  # a bug: still one line, and exit 1
        _fatal(f"unexpected error: {type(e).__name__}: {_oneLine(str(e))}")


def _fatal(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"privox: {message}\n")
    sys.stderr.flush()
    raise SystemExit(_EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{privox} console script.
    """
    from twisted.internet.task import react

    react(_main, (parseArguments(argv),))


if __name__ == "__main__":
    main()
