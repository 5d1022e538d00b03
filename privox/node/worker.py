"""
The producer side of PVX/2: one connection to a farm is one slot that runs
one job at a time.

A L{JobHandler} starts a L{JobRun} per job; the upload reaches the run as it
arrives (so a streaming engine works while the consumer is still sending),
then the run's answer goes back as RSLT (+DATA) or FAIL. A streaming job's
run (docs/protocol.rst §5.8) also sends pieces of its answer while the
upload goes on: each goes back as PART (+DATA).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privox.engines.errors import EngineError
from privox.framing import Frame
from privox.identity import IdentityError, decodeKey
from privox.messages import ErrorCode, Hello, ProtocolViolation, decodeObject, failPayload
from privox.peer import PeerProtocol
from privox.sealing import (
    RESULT,
    UPLOAD,
    JobKeys,
    Opener,
    SealBroken,
    Sealer,
    StreamOpener,
    StreamSealer,
    Unpacker,
    nodeKeys,
    packed,
    plainSize,
    seal,
)

log = Logger()

#: Sealed jobs one connection takes before it is closed, when idle, for a
#: new one (and a new key): what bounds the memory of those already seen.
MAX_SEALED_PER_CONNECTION = 100_000


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


class StreamSink(Protocol):
    """
    Where a streaming run's answer goes while its upload still comes.
    """

    def send(self, answer: Answer) -> None:
        "A piece of the answer (PART, and its bytes)."

    def fail(self, error: EngineError) -> None:
        "The job cannot succeed: it is answered with FAIL now."

    def writable(self) -> Deferred[None]:
        """
        Fires once the farm takes more (at once, unless it is not reading
        what was sent): work that makes large pieces waits for it, so a
        consumer that does not read holds the work back, not memory.
        """


class StreamRun(JobRun, Protocol):
    def parts(self, sink: StreamSink) -> None:
        "Where the answer goes (set once, before any chunk is fed)."


class JobHandler(Protocol):
    models: tuple[str, ...]
    languages: tuple[str, ...]
    #: Whether it takes streaming jobs (then C{start} makes a L{StreamRun}
    #: of a job that says C{"stream": true}).
    streams: bool

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


class Unsealed(EngineError):
    """
    A sealed job's upload that does not open, or one this node cannot seal.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.SEAL_BROKEN)


class SealedRun:
    """
    A sealed job (docs/privacy.rst): its upload opens as it arrives; its
    first bytes are the job's content fields (the TTS text...), with which
    the handler's run starts; the rest is fed to that run.
    """

    def __init__(self, handler: JobHandler, job: dict[str, Any], keys: JobKeys, size: int) -> None:
        self._handler = handler
        self._job = job
        self._stream = job.get("stream") is True
        self._opener: Opener | StreamOpener = (
            StreamOpener(keys.upload, UPLOAD) if self._stream else Opener(keys.upload, UPLOAD, size)
        )
        self._size = size
        self._unpacker = Unpacker()
        self._run: JobRun | None = None
        self._failure: Failure | None = None
        self._sink: StreamSink | None = None
        self.keys = keys

    def parts(self, sink: StreamSink) -> None:
        self._sink = sink

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None:
            return
        try:
            bodies = []
            for plain in self._opener.feed(chunk):
                body = self._unpacker.feed(plain)
                if self._run is None and self._unpacker.fields is not None:
                    self._run = self._handler.start(dict(self._job, **self._content()))
                    if self._sink is not None:
                        typing.cast(StreamRun, self._run).parts(self._sink)
                if body and self._run is not None:
                    bodies.append(body)
            if bodies:
                # One feed per chunk, not per record: a streaming engine
                # takes each feed in its thread (a MiB is 16 records).
                assert self._run is not None
                self._run.feed(bodies[0] if len(bodies) == 1 else b"".join(bodies))
        except SealBroken as e:
            self._fail(Unsealed(str(e)))
        except EngineError as e:
            self._fail(e)

    def _content(self) -> dict[str, Any]:
        fields = self._unpacker.fields or {}
        # What the farm saw stays as it was; the content comes from inside,
        # and the size is the audio's, not the sealed upload's.
        content = {
            k: v for k, v in fields.items() if k not in ("id", "size", "seal", "stream")
        }
        content["size"] = (
            0 if self._stream else plainSize(self._size) - self._unpacker.headerBytes
        )
        return content

    def _fail(self, error: EngineError) -> None:
        self._failure = Failure(error)
        if self._run is not None:
            self._run.cancel()
        if self._sink is not None:
            self._sink.fail(error)  # a stream is told now, not at its end

    def finish(self) -> Deferred[Answer]:
        if self._failure is None:
            try:
                self._opener.finish()
                if self._run is None:
                    raise SealBroken("the sealed content was cut short")
            except SealBroken as e:
                self._failure = Failure(Unsealed(str(e)))
        if self._failure is not None:
            return fail(self._failure)
        assert self._run is not None
        return self._run.finish()

    def cancel(self) -> None:
        if self._run is not None:
            self._run.cancel()


def _piece(answer: Answer, kind: str) -> bytes:
    """
    A sealed stream's piece, packed: its fields say, sealed, which piece it
    is and how many bytes follow, so that the farm cannot join, cut or
    move pieces (their records would still open) undetected.
    """
    return packed(dict(answer.fields, piece=kind, bytes=len(answer.body)))


@dataclass
class _Current:
    id: str
    run: JobRun
    remaining: int
    cancelled: bool = False
    #: A sealed job's keys: its answer is sealed too.
    keys: JobKeys | None = None
    #: A streaming job: its upload ends with an empty DATA, and its answer
    #: (sealed: one record stream of PARTs and RSLT) goes in pieces.
    stream: bool = False
    ended: bool = False
    sealer: StreamSealer | None = None


class _Sink:
    """
    A streaming job's L{StreamSink} on its connection.
    """

    def __init__(self, protocol: ProducerProtocol, current: _Current) -> None:
        self._protocol = protocol
        self._current = current

    def send(self, answer: Answer) -> None:
        self._protocol._part(self._current, answer)

    def fail(self, error: EngineError) -> None:
        self._protocol._failNow(self._current, error)

    def writable(self) -> Deferred[None]:
        return self._protocol.writable()


@implementer(IPushProducer)
class ProducerProtocol(PeerProtocol):
    """
    @param sealer: where this connection's seal offer comes from (the
        node's enrolment); without one, or while it has no certificate, the
        node takes no sealed job.
    """

    def __init__(
        self, service: str, key: str, handler: JobHandler, sealer: Sealer | None = None,
        farm: str | None = None,
    ) -> None:
        """
        @param farm: the key id of the farm dialled, if it lets the node in
            by its certificate (a farm that joined the exchange): the HELO
            then names no key, and the offer is bound to that farm.
        """
        if farm is not None:
            key = ""
            offered = sealer.offer(farm) if sealer is not None else None
        else:
            offered = sealer.offer() if sealer is not None else None
        self._connectionKey: X25519PrivateKey | None = None
        #: The connection key as the offer gives it (what C{JOB_} names).
        self._offeredKey: str | None = None
        seal = None
        if offered is not None:
            self._connectionKey, offer = offered
            seal = offer.fields()
            self._offeredKey = seal["key"]
        super().__init__(
            Hello(
                "producer", service, key, tuple(handler.models), tuple(handler.languages), seal,
                tuple(getattr(handler, "tasks", ())), bool(getattr(handler, "streams", False)),
                earlySeal=seal is not None,
            )
        )
        self.handler = handler
        #: The consumers' keys of the sealed jobs taken on this connection.
        self._sealedFor: set[bytes] = set()
        #: While the farm reads none of what we send: who waits to send more.
        self._blocked: list[Deferred[None]] | None = None
        self._current: _Current | None = None
        self._idle: list[Deferred[None]] = []
        self._closeWhenIdle = False

    @property
    def busy(self) -> bool:
        return self._current is not None

    # Backpressure for streaming answers (registered while one runs; a TLS
    # transport does not close while a producer is registered).

    def pauseProducing(self) -> None:
        if self._blocked is None:
            self._blocked = []

    def resumeProducing(self) -> None:
        waiting, self._blocked = self._blocked or [], None
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()  # closing: what waits learns it from the job

    def writable(self) -> Deferred[None]:
        if self._blocked is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._blocked.append(d)
        return d

    def frameReceived(self, frame: Frame) -> None:
        current = self._current
        if frame.verb == b"DATA":
            if current is None or current.ended:
                # Sent by the farm before it saw our early answer or our
                # FAIL: stale, and harmless.
                return
            if current.stream:
                if frame.payload:
                    current.run.feed(frame.payload)
                else:
                    current.ended = True
                    self._finish(current)
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
            if current.remaining or (current.stream and not current.ended):
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
        stream = fields.get("stream") is True
        try:
            if stream and not getattr(self.handler, "streams", False):
                raise EngineError("this node takes no streaming job", ErrorCode.UNSUPPORTED_MODEL)
            if fields.get("seal") is not None:
                run: JobRun = self._sealedRun(jobId, fields, size)
            else:
                run = self.handler.start(fields)
        except EngineError as e:
            self._refuse(jobId, e)
            return
        keys = run.keys if isinstance(run, SealedRun) else None
        self._current = current = _Current(
            jobId, run, size, keys=keys, stream=stream,
            sealer=StreamSealer(keys.result, RESULT) if stream and keys is not None else None,
        )
        if stream:
            # The farm's reading of the answer paces the work (writable).
            self.transport.registerProducer(self, True)
            typing.cast(StreamRun, run).parts(_Sink(self, current))
        elif size == 0:
            self._finish(current)

    def _sealedRun(self, jobId: str, fields: dict[str, Any], size: int) -> SealedRun:
        if self._connectionKey is None:
            raise Unsealed("this node offered no seal")
        seal = fields["seal"]
        if not isinstance(seal, dict):
            raise Unsealed("the job's seal is not an object")
        sealedFor = seal.get("for")
        if sealedFor is not None and sealedFor != self._offeredKey:
            # The farm gave us an upload sealed for another node.
            raise Unsealed("the job's upload is sealed for another node")
        try:
            ephemeral = decodeKey(seal.get("ephemeral"))
            # Sealed early (for us, before the job had an id): no id in them.
            keys = nodeKeys(self._connectionKey, None if sealedFor else jobId, ephemeral)
        except (IdentityError, SealBroken) as e:
            raise Unsealed(f"the job's seal: {e}") from None
        # The same job sealed again (a farm replaying it) would be answered
        # under the same keys and nonces: never.
        if ephemeral in self._sealedFor:
            raise Unsealed("a sealed job this connection has seen before")
        if len(self._sealedFor) >= MAX_SEALED_PER_CONNECTION:
            # A new connection has a new key; this one has served enough.
            self._closeWhenIdle = True
        self._sealedFor.add(ephemeral)
        return SealedRun(self.handler, fields, keys, size)

    def _refuse(self, jobId: str, error: EngineError) -> None:
        # No _Current: DATA that follows is stale and dropped.
        self.sendControl(b"FAIL", failPayload(jobId, error.code, error.message))

    def _finish(self, current: _Current) -> None:
        current.run.finish().addCallbacks(
            self._answered, self._failed, (current,), None, (current,), None
        )

    def _part(self, current: _Current, answer: Answer) -> None:
        """
        A piece of a streaming job's answer: PART (+DATA), sealed if the
        job is.
        """
        if self._current is not current or current.cancelled:
            return  # answered, or cancelled: the piece is moot
        if current.sealer is not None:
            records = current.sealer.seal(_piece(answer, "part"), answer.body)
            self.sendControl(
                b"PART", {"id": current.id, "sealed": True, "size": sum(map(len, records))}
            )
            self.sendData(*records)
            return
        fields = dict(answer.fields, id=current.id)
        if answer.body:
            fields["size"] = len(answer.body)
        self.sendControl(b"PART", fields)
        if answer.body:
            self.sendData(answer.body)

    def _failNow(self, current: _Current, error: EngineError) -> None:
        """
        A streaming job that cannot succeed: FAIL now (what still comes of
        its upload is then stale, and dropped).
        """
        if self._current is not current or current.cancelled:
            return
        current.run.cancel()
        self._answer(current, failPayload(current.id, error.code, error.message))

    def _answered(self, answer: Answer, current: _Current) -> None:
        if current.cancelled:
            self._answer(current, failPayload(current.id, ErrorCode.CANCELLED, "cancelled"))
            return
        if current.sealer is not None:
            records = current.sealer.seal(_piece(answer, "answer"), answer.body)
            records += current.sealer.close()
            fields = {"id": current.id, "sealed": True, "size": sum(map(len, records))}
            if "duration_s" in answer.fields:
                fields["duration_s"] = answer.fields["duration_s"]
            self._answer(current, fields, *records, verb=b"RSLT")
            return
        if current.keys is not None:
            # The farm sees the size, and the audio's length (its ledger
            # credits the node by it); the content is sealed.
            records = seal(current.keys.result, RESULT, packed(answer.fields), answer.body)
            fields = {"id": current.id, "sealed": True, "size": sum(len(r) for r in records)}
            if "duration_s" in answer.fields:
                fields["duration_s"] = answer.fields["duration_s"]
            self._answer(current, fields, *records, verb=b"RSLT")
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
        self, current: _Current, fields: dict[str, Any], *body: bytes, verb: bytes = b"FAIL"
    ) -> None:
        if self._current is not current:
            return  # already answered (cancelled mid-upload)
        self._current = None
        if current.stream and self.transport is not None:
            self.transport.unregisterProducer()
            self.resumeProducing()
        self.sendControl(verb, fields)
        if any(body):
            self.sendData(*body)
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
