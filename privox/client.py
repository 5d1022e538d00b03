"""
The Privox API's original routes and its status and account pages, as a
client over treq: every failure becomes a L{CliError} whose message is one
line a person can act on (the API's own reason, or why it cannot be
reached).
"""

from __future__ import annotations

import io
import json
import mimetypes
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import urlsplit

from treq import collect
from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from privox.wav import BadWav, readWavHeader


class CliError(Exception):
    """
    A failure to report as one line on stderr, then exit 1.
    """


class PrivoxClient:
    """
    The API's original routes over treq, every failure turned into a
    L{CliError} with a one-line message.
    """

    def __init__(self, reactor: Any, api: str, key: str | None, timeout: float) -> None:
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

    async def sttProgress(
        self,
        audio: bytes,
        filename: str,
        quality: str | None,
        language: str | None,
        progress: Callable[[int, int], None],
    ) -> str:
        """
        C{POST /v1/audio/transcriptions} with C{stream=true}: the transcript,
        C{progress(done, total)} hearing of each C{privox.progress} event
        (pieces of a long recording transcribed) as it comes. C{timeout}
        here is the longest the API may stay silent, not the whole request.
        """
        fields = {"stream": "true", "language": language or "en"}
        if quality:
            fields["model"] = quality
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        contentType = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        events = _Events(progress)
        timer: Any = None

        def heard(data: bytes) -> None:
            timer.reset(self.timeout)
            events.feed(data)

        async def request() -> tuple[Any, bytes]:
            response = await self._http.request(
                "POST", self.api + "/v1/audio/transcriptions", data=fields,
                files={"file": (filename, contentType, io.BytesIO(audio))}, headers=headers,
            )
            if response.code != 200 or not (
                (response.headers.getRawHeaders("content-type") or [""])[0]
                .startswith("text/event-stream")
            ):
                return response, await response.content()
            await collect(response, heard)
            return response, b""

        d = Deferred.fromCoroutine(request())
        timer = self.reactor.callLater(self.timeout, d.cancel)
        response, body = await self._answer(
            d, timer, f"no word from the Privox API at {self.api} for {self.timeout:g} s"
        )
        if response.code != 200:
            raise CliError(httpProblem(response, body))
        if body:
            raise CliError(
                f"the Privox API at {self.api} answered a streamed transcription with no events"
            )
        return events.result(self.api)

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
            readWavHeader(audio)
        except BadWav:
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
        timer = self.reactor.callLater(self.timeout, d.cancel)
        response, body = await self._answer(
            d, timer, f"no answer from the Privox API at {self.api} within {self.timeout:g} s"
        )
        if response.code != 200:
            raise CliError(httpProblem(response, body))
        return body

    async def _answer(
        self, d: Deferred[tuple[Any, bytes]], timer: Any, silent: str
    ) -> tuple[Any, bytes]:
        """
        C{d}'s response, or one line saying why not: C{silent} when C{timer}
        cancelled it, else what broke the connection.
        """
        try:
            return await d
        except Exception as e:
            if timer.called:  # it fired: the request was cut off
                raise CliError(silent) from None
            if isinstance(e, CancelledError):
                raise
            raise CliError(connectionProblem(self.api, e)) from None
        finally:
            if timer.active():
                timer.cancel()

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


class _Events:
    """
    A transcription's server-sent events, read as they arrive.
    """

    def __init__(self, progress: Callable[[int, int], None]) -> None:
        self._progress = progress
        self._buffer = b""
        self._deltas: list[str] = []
        self._text: str | None = None
        self._error: str | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "privox.progress":
            done, total = event.get("done"), event.get("total")
            if isinstance(done, int) and isinstance(total, int) and 0 <= done <= total:
                self._progress(done, total)
        elif kind == "transcript.text.delta" and isinstance(event.get("delta"), str):
            self._deltas.append(event["delta"])
        elif kind == "transcript.text.done" and isinstance(event.get("text"), str):
            self._text = event["text"]
        elif kind == "error":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self._error = oneLine(str(message or "error"))[:300]

    def result(self, api: str) -> str:
        if self._error is not None:
            raise CliError(f"{self._error} (the Privox API at {api}, mid-stream)")
        if self._text is None:
            raise CliError(f"the Privox API at {api} ended the transcript before it was done")
        return self._text


def connectionProblem(api: str, e: Exception) -> str:
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
        why = oneLine(str(e)) or type(e).__name__
    return f"cannot reach the Privox API at {api}: {why}"


def httpProblem(response: Any, body: bytes) -> str:
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
    reason = oneLine(reason)[:300]
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


def oneLine(text: str) -> str:
    return " ".join(text.split())
