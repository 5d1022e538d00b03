"""
The producer side of PVX/2: one connection to a farm is one slot that runs
one job at a time.

A L{JobHandler} starts a L{JobRun} per job; the upload reaches the run as it
arrives (so a streaming engine works while the consumer is still sending),
then the run's answer goes back as RSLT (+DATA) or FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.engines.errors import EngineError
from privox.framing import Frame
from privox.messages import ErrorCode, Hello, ProtocolViolation, decodeObject, failPayload
from privox.peer import PeerProtocol

log = Logger()


@dataclass(frozen=True)
class Answer:
    """
    What a job produces: RSLT fields, and the bytes that follow as DATA.
    """

    fields: dict[str, Any]
    body: bytes = b""


class JobRun(Protocol):
    def feed(self, chunk: bytes) -> None:
        "The next piece of the upload (never blocks)."

    def finish(self) -> Deferred[Answer]:
        "The upload is complete; fires with the answer or fails."

    def cancel(self) -> None:
        "The consumer went away; the answer will be discarded: stop working."


class JobHandler(Protocol):
    models: tuple[str, ...]
    languages: tuple[str, ...]

    def start(self, job: dict[str, Any]) -> JobRun:
        """
        Begin C{job} (the farm's JOB_ fields).

        @raise EngineError: the job is refused at once.
        """


class Collected:
    """
    A L{JobRun} for work that needs the whole upload at once: the chunks
    are kept on the reactor (no thread hop per chunk), then C{work(data)}
    returns an L{Answer} or a Deferred of one. C{onCancel} tells work
    already running to stop.
    """

    def __init__(
        self,
        work: Callable[[bytes], Answer | Deferred[Answer]],
        onCancel: Callable[[], None] = lambda: None,
    ) -> None:
        self._work = work
        self._onCancel = onCancel
        self._chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    def finish(self) -> Deferred[Answer]:
        data = b"".join(self._chunks)
        self._chunks = []
        return maybeDeferred(self._work, data)

    def cancel(self) -> None:
        self._chunks = []
        self._onCancel()


@dataclass
class _Current:
    id: str
    run: JobRun
    remaining: int
    cancelled: bool = False


class ProducerProtocol(PeerProtocol):
    def __init__(self, service: str, key: str, handler: JobHandler) -> None:
        super().__init__(
            Hello("producer", service, key, tuple(handler.models), tuple(handler.languages))
        )
        self.handler = handler
        self._current: _Current | None = None
        self._idle: list[Deferred[None]] = []
        self._closeWhenIdle = False

    @property
    def busy(self) -> bool:
        return self._current is not None

    def frameReceived(self, frame: Frame) -> None:
        current = self._current
        if frame.verb == b"DATA":
            if current is None:
                # Sent by the farm before it saw our early answer or our
                # FAIL: stale, and harmless.
                return
            if len(frame.payload) > current.remaining:
                raise ProtocolViolation("DATA beyond the size announced in JOB_")
            current.remaining -= len(frame.payload)
            current.run.feed(frame.payload)
            if current.remaining == 0:
                self._finish(current)
        elif frame.verb == b"JOB_":
            if current is not None:
                raise ProtocolViolation("JOB_ while a job is running")
            self._jobReceived(decodeObject(frame))
        elif frame.verb == b"CNCL":
            fields = decodeObject(frame)
            if current is None or fields.get("id") != current.id:
                return  # crossed our answer on the wire
            current.cancelled = True
            current.run.cancel()
            if current.remaining:
                # The farm sends no more DATA after CNCL.
                self._answer(current, failPayload(current.id, ErrorCode.CANCELLED, "cancelled"))
        elif frame.verb in (b"PONG", b"FAIL"):
            pass
        else:
            raise ProtocolViolation(f"unexpected {frame.verb.decode()}")

    def _jobReceived(self, fields: dict[str, Any]) -> None:
        jobId, size = fields.get("id"), fields.get("size")
        if not isinstance(jobId, str) or not isinstance(size, int) or size < 0:
            raise ProtocolViolation("JOB_ without an id and a size")
        try:
            run = self.handler.start(fields)
        except EngineError as e:
            self._refuse(jobId, e)
            return
        self._current = current = _Current(jobId, run, size)
        if size == 0:
            self._finish(current)

    def _refuse(self, jobId: str, error: EngineError) -> None:
        # No _Current: DATA that follows is stale and dropped.
        self.sendControl(b"FAIL", failPayload(jobId, error.code, error.message))

    def _finish(self, current: _Current) -> None:
        current.run.finish().addCallbacks(
            self._answered, self._failed, (current,), None, (current,), None
        )

    def _answered(self, answer: Answer, current: _Current) -> None:
        if current.cancelled:
            self._answer(current, failPayload(current.id, ErrorCode.CANCELLED, "cancelled"))
            return
        fields = dict(answer.fields, id=current.id)
        if answer.body:
            fields["size"] = len(answer.body)
        self._answer(current, fields, answer.body, verb=b"RSLT")

    def _failed(self, failure: Failure, current: _Current) -> None:
        if failure.check(EngineError):
            code, message = failure.value.code, failure.value.message
        else:
            log.failure("job {job_id} failed", failure, job_id=current.id)
            code, message = ErrorCode.ENGINE_ERROR, "the engine failed"
        if current.cancelled:
            code, message = ErrorCode.CANCELLED, "cancelled"
        self._answer(current, failPayload(current.id, code, message))

    def _answer(
        self, current: _Current, fields: dict[str, Any], body: bytes = b"", verb: bytes = b"FAIL"
    ) -> None:
        if self._current is not current:
            return  # already answered (cancelled mid-upload)
        self._current = None
        self.sendControl(verb, fields)
        if body:
            self.sendData(body)
        self._becameIdle()

    # Graceful stop

    def _becameIdle(self) -> None:
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)
        if self._closeWhenIdle:
            self.transport.loseConnection()

    def closeWhenIdle(self) -> Deferred[None]:
        """
        Take no further job: close as soon as the running one (if any) is
        answered. Fires when idle.
        """
        self._closeWhenIdle = True
        if self.disconnected.called:
            return succeed(None)
        if self._current is None:
            self.transport.loseConnection()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def peerLost(self, why: Exception) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.run.cancel()
        self._becameIdle()
