"""
What a PVX/2 peer is to the farm once it is let in: a L{ConsumerSession}
(sends jobs) or a L{ProducerSession} (runs them). Sessions never talk to
each other; they feed the L{Job} that links them, and the job talks to them
through the sides it defines (L{privox.farm.job.ConsumerSide},
L{privox.farm.job.ProducerSide}). PVX/1 peers have sessions of their own
(L{privox.farm.pvx1}) with the same faces.

A session speaks through its connection (L{Connection}): the framing, the
writes, closing, and the splice relays belong to it.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.logger import Logger

from privox.farm.dispatcher import Capability
from privox.farm.farm import Farm
from privox.farm.handshake import Phase
from privox.farm.job import Job
from privox.farm.keepalive import Keepalive
from privox.framing import Frame, encodeHeader
from privox.messages import (
    BadRequest,
    Hello,
    JobRequest,
    ProtocolViolation,
    decodeObject,
    earlyUpload,
    failPayload,
    resultSize,
)

log = Logger()

_PING = encodeHeader(b"PING", 0)


class Connection(Protocol):
    """
    The connection a session speaks through (L{privox.farm.connection}).
    """

    farm: Farm
    service: str
    phase: Phase
    transport: Any

    def write(self, *parts: bytes) -> None: ...

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None: ...

    def sendData(self, payload: bytes) -> None: ...

    def abort(self) -> None: ...

    def close(self, code: str, message: str) -> None: ...

    def holdReading(self, holder: object) -> None: ...

    def releaseReading(self, holder: object) -> None: ...


class Session:
    """
    What every session has: the connection it speaks through, its peer's
    key ids (hashed: never the key) and the job it is part of, if any.
    """

    #: A producer's seal offer as JSON, for the ASGN of its sealed jobs
    #: (L{privox.messages.Hello.seal}); L{None}: it cannot seal.
    sealOffer: bytes | None = None
    #: Its connection key as the offer gives it, if it also opens uploads
    #: sealed early for that key (§5.7): what a consumer's C{JOB_} names.
    sealKey: str | None = None

    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        self.connection = connection
        self.service = connection.service
        self.keyId = keyId
        #: The full SHA-256 of the key (L{privox.keys.accountId}), for the
        #: ledger.
        self.accountId = accountId
        self.job: Job | None = None

    @property
    def transport(self) -> Any:
        return self.connection.transport

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.connection.sendControl(verb, fields)

    def sendData(self, payload: bytes) -> None:
        self.connection.sendData(payload)

    def dataReceived(self, data: bytes) -> None:
        "Bytes for a session that reads its own (PVX/1); PVX/2 gets frames."
        raise NotImplementedError

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def connectionLost(self) -> None:
        "The connection is closing (the session ends now)."

    # What a splice relay reading this peer asks (privox.farm.splice).

    def relaySink(self) -> Any:
        """
        The connection this peer's DATA goes to now, if any.
        """
        return None

    @property
    def relayRemaining(self) -> int:
        """
        How many more DATA bytes this peer owes its job.
        """
        return 0

    def relayed(self, count: int) -> None:
        """
        A relay moved C{count} of those bytes to L{relaySink}.
        """


class ConsumerSession(Session):
    """
    A consumer's side of the farm: one job at a time, many in a row.
    """

    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self._uploadRemaining = 0
        #: An early upload the job does not carry (sealed for a node that
        #: did not take it, §5.7): owed all the same, and dropped as it comes.
        self._discarding = 0
        #: A stream's upload is owed until its empty DATA (§5.8), counted
        #: against max_job_bytes.
        self._streaming = False
        self._streamed = 0

    def frameReceived(self, frame: Frame) -> None:
        if frame.verb == b"DATA":
            self._dataReceived(frame.payload)
        elif frame.verb == b"JOB_":
            self._jobReceived(decodeObject(frame))
        elif frame.verb == b"PONG":
            pass
        else:
            raise ProtocolViolation(f"a consumer may not send {frame.verb.decode()}")

    def _jobReceived(self, fields: dict[str, Any]) -> None:
        if self.job is not None or self._uploadRemaining or self._discarding or self._streaming:
            raise ProtocolViolation("JOB_ sent before the previous job ended")
        farm = self.connection.farm
        # A small upload may follow JOB_ at once. It is owed from now on,
        # even if the job is refused below (and then discarded as it comes);
        # while the job waits for a producer, the job holds it.
        self._uploadRemaining = earlyUpload(fields, farm.settings.early_upload)
        try:
            request = JobRequest.parse(self.service, fields)
            farm.submit(self, request)
        except BadRequest as e:
            self.sendControl(b"FAIL", failPayload(None, e.code, e.message))

    def _dataReceived(self, payload: bytes) -> None:
        if self._streaming:
            self._streamReceived(payload)
            return
        if self._discarding:
            dropped = min(len(payload), self._discarding)
            self._discarding -= dropped
            if dropped == len(payload):
                return
            payload = payload[dropped:]
        if not self._uploadRemaining or len(payload) > self._uploadRemaining:
            raise ProtocolViolation("DATA beyond the size announced in JOB_")
        self._uploadRemaining -= len(payload)
        # After a job-level FAIL the rest of the upload is discarded here.
        if self.job is not None:
            self.job.events.consumerData(payload)

    def _streamReceived(self, payload: bytes) -> None:
        if not payload:
            self._streaming = False
        else:
            self._streamed += len(payload)
            if self._streamed > self.connection.farm.settings.max_job_bytes:
                raise ProtocolViolation("a stream longer than max_job_bytes")
        # After a job-level FAIL the rest of the stream is discarded here.
        if self.job is not None:
            self.job.events.consumerData(payload)

    def sendPart(self, raw: bytes) -> None:
        self.connection.write(encodeHeader(b"PART", len(raw)), raw)

    def sendResult(self, fields: dict[str, Any], raw: bytes) -> None:
        if raw:
            # The producer's own JSON: its id is the job's (checked), and
            # its fields go on unchanged, so it is not encoded again.
            self.connection.write(encodeHeader(b"RSLT", len(raw)), raw)
        else:
            self.sendControl(b"RSLT", fields)

    def jobSubmitted(self, job: Job) -> None:
        self.job = job
        if self._uploadRemaining and not job.request.early:
            # Sealed for a node that was not free: the upload comes again,
            # sealed for the node ASGN names.
            self._discarding, self._uploadRemaining = self._uploadRemaining, 0

    def jobAssigned(self, job: Job) -> None:
        self.job = job
        if job.request.stream:
            self._streaming, self._streamed = True, 0
        elif not job.request.early:
            self._uploadRemaining = job.request.size
        # Formatted, not encoded: a job id is 16 hex digits.
        if job.request.sealed:
            # The producer's offer, for the consumer to check and seal to.
            assert job.producer is not None and job.producer.sealOffer is not None
            body = b'{"id":"%s","seal":%s%s%s}' % (
                job.id.encode(),
                job.producer.sealOffer,
                # It opens uploads sealed for it early: the next job may be.
                b',"early_seal":true' if job.producer.sealKey is not None else b"",
                # The upload sealed for it early went with the job; without
                # this, the consumer seals it again, even for the same node.
                b',"early":true' if job.request.sealedFor is not None else b"",
            )
            self.connection.write(b"ASGN%08d" % len(body), body)
        else:
            self.connection.write(b'ASGN%08d{"id":"%s"}' % (len(job.id) + 9, job.id.encode()))
        # The upload starts with the next frame: a large one can be spliced
        # from its first byte.
        self.connection.spliceRest()

    def jobDetached(self, job: Job) -> None:
        self.job = None

    def connectionLost(self) -> None:
        if self.job is not None:
            self.job.events.consumerLost()

    def relaySink(self) -> Any:
        if self.job is None or not self._uploadRemaining or self._discarding:
            return None
        return self.job.uploadSink

    @property
    def relayRemaining(self) -> int:
        return self._uploadRemaining

    def relayed(self, count: int) -> None:
        self._uploadRemaining -= count


class ProducerSession(Session):
    """
    A producer's side of the farm: idle (pinged) or running one job.
    """

    def __init__(
        self, connection: Connection, hello: Hello, keyId: str, accountId: str | None = None
    ) -> None:
        super().__init__(connection, keyId, accountId)
        self.capability = Capability.of(hello.models, hello.languages, hello.features)
        if hello.seal is not None:
            self.sealOffer = json.dumps(hello.seal, separators=(",", ":")).encode()
            if hello.earlySeal:
                self.sealKey = hello.seal["key"]
        self._resultRemaining = 0
        #: Why it closes once its job ends (L{retire}), if it does.
        self._retiring: tuple[str, str] | None = None
        #: Whether the DATA due (L{_resultRemaining}) is a PART's, and what
        #: a stream's answer has sent so far (max_job_bytes bounds it).
        self._partRemaining = False
        self._answered = 0
        settings = connection.farm.settings
        self._keepalive = Keepalive(
            connection.farm.timers,
            settings.ping_interval,
            settings.ping_interval / 2,
            lambda: connection.write(_PING),
            lambda: self.drop("did not answer PING in time"),
        )

    def __repr__(self) -> str:
        return f"<ProducerSession {self.keyId} {sorted(self.capability.models)}>"

    def becameIdle(self) -> None:
        self._keepalive.idle()

    def retire(self, code: str, message: str) -> None:
        """
        Take no more jobs: close now if idle, else once its job ends.
        """
        if self.job is None:
            self.connection.close(code, message)
        else:
            self._retiring = (code, message)

    # Jobs

    def startJob(self, job: Job, upload: bytes) -> None:
        self._keepalive.busy()
        self.job = job
        self._answered = 0
        if upload:
            # The job and its early upload in one write.
            self.connection.write(job.work, encodeHeader(b"DATA", len(upload)), upload)
        else:
            self.connection.write(job.work)

    def jobDetached(self, job: Job, healthy: bool) -> None:
        self.job = None
        if self._retiring is not None:
            self.connection.close(*self._retiring)
        elif healthy and self.connection.phase is Phase.ACTIVE:
            self.connection.farm.producerIdle(self)

    def frameReceived(self, frame: Frame) -> None:
        verb = frame.verb
        if verb == b"PONG":
            self._keepalive.answered()
        elif verb == b"DATA":
            self._resultData(frame.payload)
        elif verb == b"RSLT":
            self._answer(decodeObject(frame), frame.payload)
        elif verb == b"FAIL":
            self._answer(decodeObject(frame), None)
        elif verb == b"PART":
            self._part(decodeObject(frame), frame.payload)
        else:
            raise ProtocolViolation(f"a producer may not send {verb.decode()}")

    def _part(self, fields: dict[str, Any], raw: bytes) -> None:
        job = self.job
        if job is None or not job.request.stream or self._resultRemaining:
            raise ProtocolViolation("PART outside a streaming job's answer")
        if fields.get("id") != job.id:
            raise ProtocolViolation("PART for another job id")
        # Its JSON counts too: a producer may not flood the consumer with
        # PARTs of no size.
        size = self._counted(resultSize(fields))
        self._counted(len(raw))
        self._resultRemaining, self._partRemaining = size, bool(size)
        job.events.partial(raw)

    def _counted(self, size: int) -> int:
        self._answered += size
        if self._answered > self.connection.farm.settings.max_job_bytes:
            raise ProtocolViolation("result larger than max_job_bytes")
        return size

    def _answer(self, fields: dict[str, Any], raw: bytes | None) -> None:
        """
        RSLT (C{raw}: its payload) or FAIL (C{raw} is L{None}).
        """
        job = self.job
        if job is None or self._resultRemaining:
            raise ProtocolViolation("RSLT or FAIL without a job to answer")
        if fields.get("id") != job.id:
            raise ProtocolViolation("RSLT or FAIL for another job id")
        if raw is None:
            job.events.producerFailed(fields)
            return
        size = self._counted(resultSize(fields))
        self._resultRemaining = size
        job.events.result(fields, size, raw)
        if size == 0:
            job.events.resultComplete()

    def _resultData(self, payload: bytes) -> None:
        job = self.job
        if job is None or not self._resultRemaining or len(payload) > self._resultRemaining:
            raise ProtocolViolation("DATA beyond the size announced in RSLT")
        self._resultRemaining -= len(payload)
        if self._partRemaining:
            self._partRemaining = self._resultRemaining > 0
            job.events.partialData(payload)
            return
        job.events.resultData(payload)
        if self._resultRemaining == 0:
            job.events.resultComplete()

    def relaySink(self) -> Any:
        if self.job is None or not self._resultRemaining or self._partRemaining:
            return None
        return self.job.resultSink

    @property
    def relayRemaining(self) -> int:
        if self.connection.farm.holdsAnswers:
            # The last byte comes the ordinary way, for the job to hold
            # until its record is on disk (privox.farm.job).
            return max(0, self._resultRemaining - 1)
        return self._resultRemaining

    def relayed(self, count: int) -> None:
        job = self.job
        assert job is not None
        self._resultRemaining -= count
        job.bytesOut += count
        if self._resultRemaining == 0:
            job.events.resultComplete()

    def drop(self, why: str) -> None:
        log.info("dropping producer {key_id}: {why}", key_id=self.keyId, why=why)
        self.connection.abort()

    def connectionLost(self) -> None:
        self._keepalive.stop()
        self.connection.farm.producerLeft(self)
        job, self.job = self.job, None
        if job is not None:
            job.events.producerLost()


def newSession(connection: Connection, hello: Hello, keyId: str, accountId: str) -> Session:
    """
    The session of a PVX/2 peer let in with C{hello}.
    """
    if hello.role == "producer":
        return ProducerSession(connection, hello, keyId, accountId)
    return ConsumerSession(connection, keyId, accountId)
