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
from privox.farm.splice import spliceable
from privox.keys import accountId
from privox.framing import (
    BULK_VERBS,
    HEADER_LEN,
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
    from privox.farm.splice import SpliceRelay
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
        #: Who holds this connection's reading paused, if anyone:
        #: backpressure links, a splice relay reading the socket itself.
        self._readHolds: set[object] | None = None
        #: The splice relays reading from and writing to this connection
        #: (L{privox.farm.splice}).
        self.relayIn: SpliceRelay | None = None
        self.relayOut: SpliceRelay | None = None
        #: True while dataReceived hands out frames: the decoder is ahead of
        #: what was handed out, so no relay may start until it is done.
        self._decoding = False

    def connectionMade(self) -> None:
        tuneTransport(self.transport, self.farm.settings.max_frame, RELAY_BUFFER)
        self.write(GREETING)
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
        self._decoding = True
        try:
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
        finally:
            self._decoding = False
        self.spliceRest()

    def _frameReceived(self, frame: Frame) -> None:
        if self.phase is Phase.ACTIVE:
            assert self.session is not None
            if frame.verb == b"PING":
                self.write(encodeHeader(b"PONG", 0))
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

    # Relaying through the kernel (privox.farm.splice)

    def spliceRest(self) -> None:
        """
        Hand the rest of this peer's DATA for its job (from the frame
        arriving now, or from the next header) to a splice relay, if it is
        large enough and both ends allow one.
        """
        splicer = self.farm.splicer
        session = self.session
        if (
            splicer is None
            or self.relayIn is not None
            or self._decoding
            or not isinstance(session, _Session)  # PVX/1
        ):
            return
        due = self._decoder.streamDue(b"DATA")
        if due < splicer.minimum and (due or session.relayRemaining < splicer.minimum):
            return
        sink = session.relaySink()
        if (
            sink is None
            or self.relayDue(sink) is None
            or sink.relayOut is not None
            or sink.pvx1 is not None
            or not spliceable(self.transport)
            or not spliceable(sink.transport)
        ):
            return
        splicer.relay(self, sink)

    def relayDue(self, sink: FarmConnection) -> int | None:
        """
        For the relay reading this connection: how many bytes of the DATA
        frame arriving now it may move to C{sink}; 0 if the next frame's
        header must be read first; None if it must stop.
        """
        session = self.session
        if self.phase is not Phase.ACTIVE or not isinstance(session, _Session):
            return None
        if session.relaySink() is not sink:
            return None
        due = self._decoder.streamDue(b"DATA")
        if due > session.relayRemaining:
            return None  # too much: the ordinary path says so
        if due == 0 and self.headerWanted() <= 0:
            return None  # another verb's payload is due
        return due

    def headerWanted(self) -> int:
        """
        How many bytes complete the header the decoder is waiting for.
        """
        return HEADER_LEN - self._decoder.pending()

    def relayReceived(self, data: bytes) -> None:
        """
        Header bytes the relay read: decoded as any others.
        """
        self.dataReceived(data)

    def relayTaken(self, count: int) -> None:
        """
        The relay moved C{count} payload bytes straight to its sink.
        """
        self._decoder.streamTaken(count)
        assert isinstance(self.session, _Session)
        self.session.relayed(count)

    # Reading, paused and resumed

    def holdReading(self, holder: object) -> None:
        if self._readHolds is None:
            self._readHolds = set()
            self.transport.pauseProducing()
        self._readHolds.add(holder)

    def releaseReading(self, holder: object) -> None:
        holds = self._readHolds
        if holds is not None and holder in holds:
            holds.discard(holder)
            if not holds:
                self._readHolds = None
                self.transport.resumeProducing()

    # Sending

    def write(self, data: bytes) -> None:
        relay = self.relayOut
        if relay is not None:
            # Bytes of ours after the relay's, never between them.
            relay.stop()
            if self.relayOut is not None:
                relay.later(data)
                return
        self.transport.write(data)

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.write(controlFrame(verb, fields))

    def sendData(self, payload: bytes) -> None:
        # Two writes, no copy of a payload that may be a whole MiB.
        self.write(encodeHeader(b"DATA", len(payload)))
        self.write(payload)

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
                self.write(farewell)
        self._shut()
        if self.relayOut is not None:
            self.relayOut.later(None)
        else:
            self.transport.loseConnection()

    def abort(self) -> None:
        self._shut()
        self._dropRelays()
        self.transport.abortConnection()

    def _dropRelays(self) -> None:
        # The socket is going: a relay reading it stops (its pipe still
        # drains into the other peer), one writing to it is dropped.
        if self.relayIn is not None:
            self.relayIn.stop()
        if self.relayOut is not None:
            self.relayOut.abandon()

    def _shut(self) -> None:
        # The session ends the moment we decide to close, not when the socket
        # is gone: its job must unlink the backpressure producers, or a paused
        # transport would hold the close open until the job ended.
        self.phase = Phase.CLOSED
        self._handshakeDone()
        if self.relayIn is not None:
            self.relayIn.stop()
        session, self.session = self.session, None
        if session is not None:
            session.connectionLost()

    def connectionLost(self, reason: Failure = None) -> None:
        self._shut()
        self._dropRelays()
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

    # What a splice relay reading this peer asks (privox.farm.splice).

    def relaySink(self) -> FarmConnection | None:
        """
        The connection this peer's DATA goes to now, if any.
        """
        raise NotImplementedError

    @property
    def relayRemaining(self) -> int:
        """
        How many more DATA bytes this peer owes its job.
        """
        raise NotImplementedError

    def relayed(self, count: int) -> None:
        """
        A relay moved C{count} of those bytes to L{relaySink}.
        """
        raise NotImplementedError


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

    def relaySink(self) -> FarmConnection | None:
        if self.job is None or not self._uploadRemaining:
            return None
        return self.job.uploadSink

    @property
    def relayRemaining(self) -> int:
        return self._uploadRemaining

    def relayed(self, count: int) -> None:
        self._uploadRemaining -= count

    def jobAssigned(self, job: Job) -> None:
        self.job = job
        if not job.request.early:
            self._uploadRemaining = job.request.size
        self.sendControl(b"ASGN", {"id": job.id})
        # The upload starts with the next frame: a large one can be spliced
        # from its first byte.
        self.connection.spliceRest()

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
        self.connection.write(encodeHeader(b"PING", 0))
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
        self.connection.write(job.work)

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

    def relaySink(self) -> FarmConnection | None:
        if self.job is None or not self._resultRemaining:
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
