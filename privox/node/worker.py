"""
The producer side of PVX/2: one connection to a farm is one slot that runs
one job at a time on a L{JobHandler}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.framing import Frame
from privox.messages import ErrorCode, Hello, ProtocolViolation, decodeObject, failPayload
from privox.peer import PeerProtocol

log = Logger()


@dataclass(frozen=True)
class Answer:
    """
    What a handler returns: RSLT fields, and the bytes that follow as DATA.
    """

    fields: dict[str, Any]
    body: bytes = b""


class EngineError(Exception):
    """
    The engine could not do this job; C{code} goes to the consumer.
    """

    def __init__(self, message: str, code: str = ErrorCode.ENGINE_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobHandler(Protocol):
    models: tuple[str, ...]
    languages: tuple[str, ...]

    def run(self, job: dict[str, Any], data: bytes) -> Deferred[Answer] | Answer:
        """
        Do C{job} (the farm's JOB_ fields) on C{data} (the upload).
        """


@dataclass
class _Current:
    fields: dict[str, Any]
    remaining: int
    chunks: list[bytes] = field(default_factory=list)
    cancelled: bool = False


class ProducerProtocol(PeerProtocol):
    def __init__(self, service: str, key: str, handler: JobHandler) -> None:
        super().__init__(
            Hello("producer", service, key, tuple(handler.models), tuple(handler.languages))
        )
        self.handler = handler
        self._current: _Current | None = None

    def frameReceived(self, frame: Frame) -> None:
        current = self._current
        if frame.verb == b"DATA":
            if current is None or not current.remaining or len(frame.payload) > current.remaining:
                raise ProtocolViolation("DATA beyond the size announced in JOB_")
            current.chunks.append(frame.payload)
            current.remaining -= len(frame.payload)
            if current.remaining == 0:
                self._run(current)
        elif frame.verb == b"JOB_":
            if current is not None:
                raise ProtocolViolation("JOB_ while a job is running")
            fields = decodeObject(frame)
            size = fields.get("size")
            if not isinstance(fields.get("id"), str) or not isinstance(size, int) or size < 0:
                raise ProtocolViolation("JOB_ without an id and a size")
            self._current = current = _Current(fields, size)
            if size == 0:
                self._run(current)
        elif frame.verb == b"CNCL":
            fields = decodeObject(frame)
            if current is None or fields.get("id") != current.fields["id"]:
                return  # a job we already finished
            if current.remaining:
                # The farm sends no more DATA after CNCL.
                self._fail(current, ErrorCode.CANCELLED, "cancelled")
            else:
                current.cancelled = True
        elif frame.verb in (b"PONG", b"FAIL"):
            pass
        else:
            raise ProtocolViolation(f"unexpected {frame.verb.decode()}")

    def _run(self, current: _Current) -> None:
        data = b"".join(current.chunks)
        current.chunks = []
        d = maybeDeferred(self.handler.run, current.fields, data)
        d.addCallbacks(self._answered, self._failed, (current,), None, (current,), None)

    def _answered(self, answer: Answer, current: _Current) -> None:
        if current.cancelled:
            self._fail(current, ErrorCode.CANCELLED, "cancelled")
            return
        if self._current is not current:
            return
        self._current = None
        fields = dict(answer.fields, id=current.fields["id"])
        if answer.body:
            fields["size"] = len(answer.body)
        self.sendControl(b"RSLT", fields)
        if answer.body:
            self.sendData(answer.body)

    def _failed(self, failure: Failure, current: _Current) -> None:
        if failure.check(EngineError):
            code, message = failure.value.code, failure.value.message
        else:
            log.failure("job {job_id} failed", failure, job_id=current.fields["id"])
            code, message = ErrorCode.ENGINE_ERROR, "the engine failed"
        self._fail(current, code, message)

    def _fail(self, current: _Current, code: str, message: str) -> None:
        if self._current is not current:
            return
        self._current = None
        self.sendControl(b"FAIL", failPayload(current.fields["id"], code, message))
