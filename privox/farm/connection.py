"""
One Protocol per peer connected to a farm port.

The connection does the handshake (greeting, HELO, key check, OKAY or DENY)
and then hands every frame to the role it negotiated: a L{ConsumerSession}
(sends jobs) or a L{ProducerSession} (runs them). Sessions never talk to each
other; they feed the L{Job} that links them.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.farm import pvx1
from privox.farm.dispatcher import Capability
from privox.farm.job import Job
from privox.keys import accountId
from privox.framing import (
    BULK_VERBS,
    Frame,
    FrameDecoder,
    FramingError,
    encodeHeader,
    tuneTransport,
)
from privox.messages import (
    GREETING,
    BadRequest,
    ErrorCode,
    Hello,
    JobRequest,
    ProtocolViolation,
    controlFrame,
    decodeObject,
    earlyUpload,
    failPayload,
    resultSize,
)

if TYPE_CHECKING:
    from privox.farm.farm import Farm
    from privox.farm.pvx1 import Pvx1Consumer, Pvx1Peer, Pvx1Producer

log = Logger()

#: Each farm connection's read size and write-buffer high-water mark (one
#: attribute in Twisted). DATA is relayed in pieces, so the buffer need not
#: hold a whole frame; this is what bounds the farm's memory per job in
#: flight (bench/farm_memory.py). Smaller costs more CPU per MB relayed: at
#: 256 KiB nearly every full read pauses its source (bench/README.rst).
RELAY_BUFFER = 512 * 1024


class Phase(enum.Enum):
    GREETING = "greeting"  # "who" sent, nothing received yet
    HELLO = "hello"  # waiting for HELO
    AUTHENTICATING = "authenticating"  # key check in progress
    ACTIVE = "active"  # OKAY sent; frames go to the session
    CLOSED = "closed"


class FarmConnection(Protocol):
    def __init__(self, farm: Farm, service: str) -> None:
        self.farm = farm
        self.service = service
        self.phase = Phase.GREETING
        self.session: ConsumerSession | ProducerSession | Pvx1Consumer | Pvx1Producer | None = None
        #: Set when the peer speaks PVX/1 (L{privox.farm.pvx1}).
        self.pvx1: Pvx1Peer | None = None
        # DATA is relayed piece by piece as it arrives (cut-through): the
        # farm never holds a whole upload or result frame.
        self._decoder = FrameDecoder(farm.settings.max_frame, streamVerbs=BULK_VERBS)
        self._handshakeTimer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        tuneTransport(self.transport, self.farm.settings.max_frame, RELAY_BUFFER)
        self.transport.write(GREETING)
        self._handshakeTimer = self.farm.clock.callLater(
            self.farm.settings.handshake_timeout, self._handshakeTimedOut
        )
        self.farm.connectionOpened(self)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        log.info("closing a peer that did not complete HELO in time")
        self.close(ErrorCode.TIMEOUT, "handshake not completed in time")

    def _handshakeDone(self) -> None:
        if self._handshakeTimer is not None:
            self._handshakeTimer.cancel()
            self._handshakeTimer = None

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.pvx1 is not None:
            self.pvx1.dataReceived(data)
            return
        if self.phase is Phase.GREETING:
            if data[:1] in (pvx1.PRODUCER, pvx1.CONSUMER):
                # PVX/1 answers "who" with a type byte and a 16-byte key.
                self.pvx1 = pvx1.Pvx1Peer(self)
                self.pvx1.dataReceived(data)
                return
            self.phase = Phase.HELLO
        try:
            frames = self._decoder.feed(data)
        except FramingError as e:
            self.protocolError(str(e))
            return
        wasHello = self.phase is Phase.HELLO
        for frame in frames:
            try:
                if wasHello and self.phase is not Phase.HELLO:
                    # Sent before the peer could have seen OKAY.
                    raise ProtocolViolation("sent a frame before the farm answered HELO")
                self._frameReceived(frame)
            except ProtocolViolation as e:
                self.protocolError(str(e))
            if self.phase is Phase.CLOSED:
                return

    def _frameReceived(self, frame: Frame) -> None:
        if self.phase is Phase.ACTIVE:
            assert self.session is not None
            if frame.verb == b"PING":
                self.transport.write(encodeHeader(b"PONG", 0))
            else:
                self.session.frameReceived(frame)
        elif self.phase is Phase.HELLO:
            if frame.verb != b"HELO":
                raise ProtocolViolation(
                    f"expected HELO, got {frame.verb.decode()}"
                )
            self._helloReceived(decodeObject(frame))
        else:
            raise ProtocolViolation("sent a frame before the farm answered HELO")

    def _helloReceived(self, fields: dict[str, Any]) -> None:
        try:
            hello = Hello.parse(fields)
        except BadRequest as e:
            self.deny(ErrorCode.BAD_REQUEST, e.message)
            return
        if hello.service != self.service:
            self.deny(
                ErrorCode.BAD_REQUEST,
                f"this port serves {self.service}, not {hello.service}",
            )
            return
        self.phase = Phase.AUTHENTICATING
        policy = self.farm.keyPolicy(hello.role)
        d = policy.check(hello.key)
        d.addErrback(self._keyCheckFailed)
        d.addCallback(self._keyChecked, hello)

    def _keyCheckFailed(self, failure: Failure) -> bool:
        log.failure("key check failed; rejecting", failure)
        return False

    def _keyChecked(self, accepted: bool, hello: Hello) -> None:
        if self.phase is not Phase.AUTHENTICATING:
            return  # the peer left while we were checking
        account = accountId(hello.key)
        kid = account[:12]
        if not accepted:
            log.info(
                "denied {role} with key {key_id}", role=hello.role, key_id=kid
            )
            self.deny(ErrorCode.UNAUTHORIZED, "key rejected")
            return
        if not self.farm.accepting:
            self.deny(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")
            return
        self._handshakeDone()
        self.phase = Phase.ACTIVE
        self.sendControl(b"OKAY", self.farm.okay().payload())
        if hello.role == "producer":
            producer = ProducerSession(self, hello, kid, account)
            self.session = producer
            self.farm.producerJoined(producer)
        else:
            self.session = ConsumerSession(self, kid, account)
        log.info(
            "{role} {key_id} joined {service}",
            role=hello.role,
            key_id=kid,
            service=self.service,
        )

    # Sending

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.transport.write(controlFrame(verb, fields))

    def sendData(self, payload: bytes) -> None:
        # Two writes, no copy of a payload that may be a whole MiB.
        self.transport.writeSequence([encodeHeader(b"DATA", len(payload)), payload])

    # Closing

    def deny(self, code: str, message: str) -> None:
        self._closeWith(b"DENY", {"error": code, "message": message})

    def protocolError(self, message: str) -> None:
        log.info("protocol error from a {service} peer: {why}", service=self.service, why=message)
        self.close(ErrorCode.PROTOCOL, message)

    def close(self, code: str, message: str) -> None:
        self._closeWith(b"FAIL", failPayload(None, code, message))

    def _closeWith(self, verb: bytes, fields: dict[str, Any]) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.pvx1 is None:
            self.sendControl(verb, fields)
        else:
            # PVX/1 has no error frames: at most a "nak".
            farewell = self.pvx1.farewell()
            if farewell:
                self.transport.write(farewell)
        self._shut()
        self.transport.loseConnection()

    def abort(self) -> None:
        self._shut()
        self.transport.abortConnection()

    def _shut(self) -> None:
        # The session ends the moment we decide to close, not when the socket
        # is gone: its job must unlink the backpressure producers, or a paused
        # transport would hold the close open until the job ended.
        self.phase = Phase.CLOSED
        self._handshakeDone()
        session, self.session = self.session, None
        if session is not None:
            session.connectionLost()

    def connectionLost(self, reason: Failure = None) -> None:
        self._shut()
        self.farm.connectionClosed(self)


class _Session:
    """
    What both roles share: the connection they speak through and the job
    they are part of, if any.
    """

    def __init__(self, connection: FarmConnection, keyId: str, accountId: str | None = None) -> None:
        self.connection = connection
        self.keyId = keyId
        #: The full SHA-256 of the HELO key (L{privox.keys.accountId}),
        #: computed once, for the ledger. Never the key.
        self.accountId = accountId
        self.job: Job | None = None

    @property
    def transport(self) -> Any:
        return self.connection.transport

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.connection.sendControl(verb, fields)

    def sendData(self, payload: bytes) -> None:
        self.connection.sendData(payload)


class ConsumerSession(_Session):
    """
    A consumer's side of the farm: one job at a time, many in a row.
    """

    def __init__(self, connection: FarmConnection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self._uploadRemaining = 0

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
        if self.job is not None or self._uploadRemaining:
            raise ProtocolViolation("JOB_ sent before the previous job ended")
        farm = self.connection.farm
        # A small upload may follow JOB_ at once. It is owed from now on,
        # even if the job is refused below (and then discarded as it comes);
        # while the job waits for a producer, the job holds it.
        self._uploadRemaining = earlyUpload(fields, farm.settings.early_upload)
        try:
            request = JobRequest.parse(self.connection.service, fields)
            farm.submit(self, request)
        except BadRequest as e:
            self.sendControl(b"FAIL", failPayload(None, e.code, e.message))

    def _dataReceived(self, payload: bytes) -> None:
        if not self._uploadRemaining or len(payload) > self._uploadRemaining:
            raise ProtocolViolation("DATA beyond the size announced in JOB_")
        self._uploadRemaining -= len(payload)
        # After a job-level FAIL the rest of the upload is discarded here.
        if self.job is not None:
            self.job.events.consumerData(payload)

    def jobAssigned(self, job: Job) -> None:
        self.job = job
        if not job.request.early:
            self._uploadRemaining = job.request.size
        self.sendControl(b"ASGN", {"id": job.id})

    def jobSubmitted(self, job: Job) -> None:
        self.job = job

    def jobDetached(self, job: Job) -> None:
        self.job = None

    def connectionLost(self) -> None:
        if self.job is not None:
            self.job.events.consumerLost()


class ProducerSession(_Session):
    """
    A producer's side of the farm: idle (pinged) or running one job.
    """

    def __init__(
        self, connection: FarmConnection, hello: Hello, keyId: str, accountId: str | None = None
    ) -> None:
        super().__init__(connection, keyId, accountId)
        self.capability = Capability.of(hello.models, hello.languages)
        self._resultRemaining = 0
        self._pingTimer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<ProducerSession {self.keyId} {sorted(self.capability.models)}>"

    # Liveness: only idle producers are pinged.

    def _schedulePing(self) -> None:
        self._cancelPing()
        self._pingTimer = self.connection.farm.clock.callLater(
            self.connection.farm.settings.ping_interval, self._ping
        )

    def _ping(self) -> None:
        self.connection.transport.write(encodeHeader(b"PING", 0))
        self._pingTimer = self.connection.farm.clock.callLater(
            self.connection.farm.settings.ping_interval / 2, self._pongMissed
        )

    def _pongMissed(self) -> None:
        self._pingTimer = None
        self.drop("did not answer PING in time")

    def _cancelPing(self) -> None:
        if self._pingTimer is not None:
            self._pingTimer.cancel()
            self._pingTimer = None

    def becameIdle(self) -> None:
        self._schedulePing()

    # Jobs

    def startJob(self, job: Job) -> None:
        self._cancelPing()
        self.job = job
        self.transport.write(job.work)

    def jobDetached(self, job: Job, healthy: bool) -> None:
        self.job = None
        if healthy and self.connection.phase is Phase.ACTIVE:
            self.connection.farm.producerIdle(self)

    def frameReceived(self, frame: Frame) -> None:
        verb = frame.verb
        if verb == b"PONG":
            if self.job is None and self._pingTimer is not None:
                self._schedulePing()
        elif verb == b"DATA":
            self._resultData(frame.payload)
        elif verb == b"RSLT":
            self._answer(decodeObject(frame), isResult=True)
        elif verb == b"FAIL":
            self._answer(decodeObject(frame), isResult=False)
        else:
            raise ProtocolViolation(f"a producer may not send {verb.decode()}")

    def _answer(self, fields: dict[str, Any], isResult: bool) -> None:
        job = self.job
        if job is None or self._resultRemaining:
            raise ProtocolViolation("RSLT or FAIL without a job to answer")
        if fields.get("id") != job.id:
            raise ProtocolViolation("RSLT or FAIL for another job id")
        if not isResult:
            job.events.producerFailed(fields)
            return
        size = resultSize(fields)
        if size > self.connection.farm.settings.max_job_bytes:
            raise ProtocolViolation("result larger than max_job_bytes")
        self._resultRemaining = size
        job.events.result(fields, size)
        if size == 0:
            job.events.resultComplete()

    def _resultData(self, payload: bytes) -> None:
        job = self.job
        if job is None or not self._resultRemaining or len(payload) > self._resultRemaining:
            raise ProtocolViolation("DATA beyond the size announced in RSLT")
        self._resultRemaining -= len(payload)
        job.events.resultData(payload)
        if self._resultRemaining == 0:
            job.events.resultComplete()

    def drop(self, why: str) -> None:
        log.info("dropping producer {key_id}: {why}", key_id=self.keyId, why=why)
        self.connection.abort()

    def connectionLost(self) -> None:
        self._cancelPing()
        self.connection.farm.producerLeft(self)
        job, self.job = self.job, None
        if job is not None:
            job.events.producerLost()


class FarmFactory(Factory):
    """
    Builds connections for one service (one listening port) of a farm.
    """

    def __init__(self, farm: Farm, service: str) -> None:
        self.farm = farm
        self.service = service

    def buildProtocol(self, addr: Any) -> FarmConnection:
        connection = FarmConnection(self.farm, self.service)
        connection.factory = self
        return connection
