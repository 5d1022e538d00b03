"""
Streaming jobs placed on farms (docs/protocol.rst §5.8), for
L{privox.api.farms.FarmExchange}: what is written goes to the farm's
producer as it comes, and pieces of the answer come back while it does.

A stream is placed like any job (the farm drawn, retried elsewhere on a
refusal or an unreachable farm): until a producer takes it, what was
written is kept, so another farm can be sent all of it. Once a producer
has it, the stream cannot move: a failure then ends it. Where no farm
takes streams (an OKAY without them), or none has a producer that does
(original nodes, older ones), the whole recording (or text) goes as one
ordinary job once the stream has ended: slower, never wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Awaitable, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.api.errors import ApiError, NoProducer, TimedOut, Unavailable, fromFailCode
from privox.api.farmpool import Expired, race
from privox.api.exchange import Heard
from privox.consumer import ConsumerProtocol, JobFailed, JobResult, Stream
from privox.messages import ErrorCode, JobRequest
from privox.peer import ConnectionClosed
from privox.sealing import SealPolicy
from privox.wav import pcmToWav

log = Logger()

#: The slowest and fastest voices a TTS piece may claim to be at.
MIN_RATE, MAX_RATE = 8000, 96000
#: Places a job: (service, sender, deadline) -> the result (FarmExchange._request).
Placer = Callable[[str, Callable[..., Deferred[JobResult]], float], Awaitable[JobResult]]
#: The whole upload as one job, within the seconds given.
Whole = Callable[[bytes, float], Awaitable[JobResult]]


class CannotStream(Exception):
    """
    The farm takes no streaming jobs (an older farm).
    """


class SealBrokenMidStream(ApiError):
    """
    Sealed content did not open once the stream was under way: the farm
    is not to be used for a while, and the stream cannot move elsewhere.
    """


class FarmStream:
    """
    One streaming job: L{write} and L{end} its upload; each PART goes to
    L{onPart} (set it before the job can have any: at once); L{done} fires
    with the final L{JobResult}.

    @param whole: what to do instead with the whole upload (joined), once
        ended, within the seconds left, where no farm or producer takes
        streams.
    """

    def __init__(
        self,
        place: Placer,
        service: str,
        request: JobRequest,
        deadline: float,
        whole: Whole,
        clock: IReactorTime,
    ) -> None:
        self._request = request
        self._clock = clock
        self.onPart: Callable[[dict[str, Any], bytes], None] = lambda fields, data: None
        self._whole = whole
        #: Written, while no producer has the stream yet (another farm may
        #: have to be sent all of it).
        self._written: list[bytes] = []
        self._ended = False
        self._endedWaiting: Deferred[None] | None = None
        self._stream: Stream | None = None
        #: Whether a producer ever had the stream (then it cannot go whole).
        self._flowed = False
        self.done: Deferred[JobResult] = Deferred.fromCoroutine(
            self._run(place, service, deadline)
        )

    async def _run(self, place: Placer, service: str, deadline: float) -> JobResult:
        endsBy = self._clock.seconds() + deadline
        try:
            return await place(service, self._start, deadline)
        except (CannotStream, NoProducer):
            if self._flowed:
                raise
        self._stream = None
        if not self._ended:
            self._endedWaiting = Deferred()
            try:
                await race(self._clock, self._endedWaiting, endsBy)
            except Expired:
                raise TimedOut(f"the stream did not end within {deadline:g} s") from None
        remaining = max(0.001, endsBy - self._clock.seconds())
        return await self._whole(b"".join(self._written), remaining)

    def _start(
        self, conn: ConsumerProtocol, timeout: float, seal: SealPolicy | None
    ) -> Deferred[JobResult]:
        if conn.okay is None or conn.okay.stream is None:
            raise CannotStream()
        request = self._request
        if request.timeout_s is None or request.timeout_s > timeout:
            request = dataclasses.replace(request, timeout_s=timeout)
        stream = self._stream = conn.stream(
            request, lambda fields, data: self.onPart(fields, data), seal
        )
        for data in self._written:
            stream.write(data)
        if self._ended:
            stream.end()
        return stream.done.addErrback(self._failed, stream)

    def _failed(self, failure: Any, stream: Stream) -> Any:
        # Before its content flows another farm may take the stream (a
        # node whose seal does not hold included); after, it is lost.
        if not stream.assigned or failure.check(CancelledError):
            return failure
        self._flowed = True
        if failure.check(JobFailed):
            code, message = failure.value.code, failure.value.message
            if code == ErrorCode.SEAL_BROKEN:
                raise SealBrokenMidStream(message)
            error = fromFailCode(code, message)
            # Not "no producer" (the whole job would start over on what is
            # left): the one it had is gone.
            raise Unavailable(message) if isinstance(error, NoProducer) else error
        if failure.check(ConnectionClosed):
            raise ApiError("the connection to the farm broke mid-stream")
        return failure

    def write(self, data: bytes) -> None:
        if self._ended or not data:
            return
        stream = self._stream
        if stream is None or not stream.assigned:
            self._written.append(data)
        else:
            self._flowed = True
            self._written = []
        if stream is not None:
            stream.write(data)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._stream is not None:
            self._stream.end()
        waiting, self._endedWaiting = self._endedWaiting, None
        if waiting is not None:
            waiting.callback(None)

    def cancel(self) -> None:
        self.done.cancel()


def heardOf(fields: dict[str, Any]) -> Heard | None:
    """
    An STT PART as a L{Heard}, if it is one (a producer is a stranger).
    """
    text, final = fields.get("text"), fields.get("final")
    start, end = fields.get("start", 0.0), fields.get("end", 0.0)
    if not isinstance(text, str) or not isinstance(final, bool):
        return None
    if not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
        for t in (start, end)
    ):
        start = end = 0.0
    return Heard(text.strip()[:10_000], final, float(start), float(end))


def spokenOf(fields: dict[str, Any], data: bytes) -> tuple[bytes, int] | None:
    """
    A TTS PART as (mono s16le samples, rate), if it is one.
    """
    rate = fields.get("rate")
    if (
        fields.get("content_type") != "audio/pcm"
        or not isinstance(rate, int)
        or isinstance(rate, bool)
        or not MIN_RATE <= rate <= MAX_RATE
        or len(data) % 2
    ):
        return None
    return data, rate


def wholeWav(pcm: bytes) -> bytes:
    """
    A stream's 16 kHz audio as one WAV, for a farm that takes no streams.
    """
    return pcmToWav(pcm, 16000)
