"""
One Protocol per peer connected to a farm port.

A connection greets its peer, runs the handshake (L{privox.farm.handshake}:
HELO or PVX/1's type byte and key, the key check, OKAY or DENY) and then
hands what the peer sends to the session its role and protocol call for
(L{privox.farm.sessions} for PVX/2, L{privox.farm.pvx1} for PVX/1). It owns
the bytes: the framing, the writes (sent at once when the socket takes
them), closing, and the splice relays that move large DATA through the
kernel (L{privox.farm.splice}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from privox.farm import pvx1
from privox.farm.farm import Farm
from privox.farm.handshake import Phase, newHandshake
from privox.farm.sessions import ProducerSession, Session, newSession
from privox.farm.splice import spliceable
from privox.farm.vouching import ExchangeOnly
from privox.framing import (
    BULK_VERBS,
    HEADER_LEN,
    Frame,
    FrameDecoder,
    FramingError,
    encodeHeader,
    sendNow,
    tuneTransport,
)
from privox.identity import IdentityError
from privox.keys import accountId
from privox.logs import withoutPeerAddress
from privox.messages import (
    GREETING,
    BadRequest,
    ErrorCode,
    Hello,
    ProtocolViolation,
    controlFrame,
    decodeObject,
    failPayload,
)
from privox.timers import Timer

if TYPE_CHECKING:
    from privox.farm.splice import SpliceRelay

log = Logger()

#: Each farm connection's read size and write-buffer high-water mark (one
#: attribute in Twisted). DATA is relayed in pieces, so the buffer need not
#: hold a whole frame; this is what bounds the farm's memory per job in
#: flight (bench/farm_memory.py). Smaller costs more CPU per MB relayed: at
#: 256 KiB nearly every full read pauses its source (bench/README.rst).
RELAY_BUFFER = 512 * 1024

_PONG = encodeHeader(b"PONG", 0)


@implementer(IPushProducer)
class FarmConnection(Protocol):
    """
    Also its own transport's producer, for the life of the connection:
    while its writes back up, the connection feeding it (L{feedFrom})
    waits. One registration per connection, not two per job.
    """

    phase: Phase

    def __init__(self, farm: Farm, service: str) -> None:
        self.farm = farm
        self.service = service
        self.handshake = newHandshake(self)
        self.session: Session | None = None
        #: Set when the peer speaks PVX/1: its first bytes, until let in.
        self._pvx1: bytearray | None = None
        self._hello: Hello | None = None
        #: Who the peer says it is (once introduced): its role, and the
        #: account its key or its exchange certificate names.
        self._role: str | None = None
        self._account = ""
        #: A node the farm's exchange vouched for: its identity's
        #: fingerprint (privox.farm.vouching).
        self.node: str | None = None
        # DATA is relayed piece by piece as it arrives (cut-through): the
        # farm never holds a whole upload or result frame.
        self._decoder = FrameDecoder(farm.settings.max_frame, streamVerbs=BULK_VERBS)
        self._handshakeTimer: Timer | None = None
        #: Who holds this connection's reading paused, if anyone:
        #: backpressure links, a splice relay reading the socket itself.
        self._readHolds: set[object] | None = None
        #: The connection whose bytes this one writes now (its job's other
        #: side), and whether this one's write buffer is full.
        self._feeder: FarmConnection | None = None
        self._writesBlocked = False
        self._producing = False
        #: The splice relays reading from and writing to this connection
        #: (L{privox.farm.splice}).
        self.relayIn: SpliceRelay | None = None
        self.relayOut: SpliceRelay | None = None
        #: True while dataReceived hands out frames: the decoder is ahead of
        #: what was handed out, so no relay may start until it is done.
        self._decoding = False
        #: What this connection was written while the farm was corked.
        self.pending: list[bytes] = []
        #: Ends a PVX/1 peer's key when it goes quiet.
        self._keyQuiet: Timer | None = None
        #: Aborts a PVX/1 peer that does not close after the farm did.
        self._closeTimer: Timer | None = None
        #: Retires a node let in by its certificate when that expires.
        self._vouchedUntil: Timer | None = None

    @property
    def pvx1(self) -> bool:
        """
        Whether the peer speaks PVX/1.
        """
        return self._pvx1 is not None

    def connectionMade(self) -> None:
        withoutPeerAddress(self.transport)
        tuneTransport(self.transport, self.farm.settings.max_frame, RELAY_BUFFER)
        self.transport.registerProducer(self, True)
        self._producing = True
        self.write(GREETING)
        self._handshakeTimer = self.farm.timers.callLater(
            self.farm.settings.handshake_timeout, self._handshakeTimedOut
        )
        self.farm.connectionOpened(self)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        log.info("closing a peer that did not complete HELO in time")
        self.close(ErrorCode.TIMEOUT, "handshake not completed in time")

    def handshakeDone(self) -> None:
        """
        The peer has introduced itself in full: its handshake timer stops.
        (A PVX/1 consumer's does with its header.)
        """
        if self._handshakeTimer is not None:
            self._handshakeTimer.cancel()
            self._handshakeTimer = None

    # The handshake's actions (privox.farm.handshake.HandshakeCore)

    def checkKey(self, role: str, key: str) -> None:
        self._role = role
        vouching = self.farm.vouching
        hello = self._hello
        if vouching is not None and hello is not None and vouching.speaksFor(role, key, hello.seal):
            # The farm's exchange's API or one of its nodes, proving its
            # account without handing this farm a key (privox.farm.vouching).
            now = self.farm.clock.seconds()
            try:
                vouched = vouching.vouched(role, key, hello.seal, now)
            except IdentityError as e:
                self._account = accountId(key)
                what = "certificate" if role == "producer" else "pass"
                self._keyChecked(False, f"{what} refused: {e}")
                return
            self._account, self.node = vouched.account, vouched.node
            if role == "producer":
                # It serves while the exchange vouches for it (a node renews
                # at half-life, and connects again with the new one).
                self._vouchedUntil = self.farm.timers.callLater(
                    max(0.0, vouched.until - now), self._certificateExpired
                )
            self._keyChecked(True)
            return
        self._account = accountId(key)
        policy = self.farm.keyPolicy(role)
        if isinstance(policy, ExchangeOnly):
            self._keyChecked(False, policy.refusal)
            return
        d = policy.check(key)
        d.addErrback(self._keyCheckFailed)
        d.addCallback(self._keyChecked)

    def _certificateExpired(self) -> None:
        self._vouchedUntil = None
        session = self.session
        if isinstance(session, ProducerSession):
            session.retire(ErrorCode.UNAUTHORIZED, "certificate expired: enrol again")
        else:
            self.close(ErrorCode.UNAUTHORIZED, "certificate expired: enrol again")

    def _keyCheckFailed(self, failure: Failure) -> bool:
        log.failure("key check failed; rejecting", failure)
        return False

    def _keyChecked(self, accepted: bool, why: str = "key rejected") -> None:
        if not accepted:
            log.info(
                "denied {protocol}{role} with key {key_id}: {why}",
                protocol="PVX/1 " if self.pvx1 else "",
                role=self._role,
                key_id=self._account[:12],
                why=why,
            )
            self.handshake.refused(ErrorCode.UNAUTHORIZED, why)
        elif not self.farm.accepting:
            self.handshake.refused(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")
        else:
            self.handshake.accepted()

    def letIn(self) -> None:
        role = self._role
        assert role is not None
        account = self._account
        kid = account[:12]
        if self._pvx1 is None:
            assert self._hello is not None
            self.handshakeDone()
            self.sendControl(b"OKAY", self.farm.okay().payload())
            session = self.session = newSession(self, self._hello, kid, account)
        else:
            if role == "producer":
                self.handshakeDone()
            session = self.session = pvx1.newPvx1Session(self, role, kid, account)
        if role == "producer":
            self.farm.producerJoined(session)  # type: ignore[arg-type]
        log.info(
            "{protocol}{role} {key_id} joined {service}",
            protocol="PVX/1 " if self.pvx1 else "",
            role=role,
            key_id=kid,
            service=self.service,
        )
        if self._pvx1:
            # Bytes that came with the key, or during the check.
            pending, self._pvx1 = bytes(self._pvx1), bytearray()
            if pending and self.phase is Phase.ACTIVE:
                session.dataReceived(pending)

    def refuse(self, code: str, message: str) -> None:
        self.deny(code, message)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        # What handling these bytes writes, to any peer, goes out once the
        # reactor's turn ends, a write a peer: a job's JOB_ and its early
        # upload together.
        self.farm.cork()
        self._received(data)
        self.spliceRest()

    def _received(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.CLOSED:
            return
        if self._pvx1 is not None:
            self._pvx1Received(data)
            return
        if phase is Phase.GREETING:
            if data[:1] in (pvx1.PRODUCER, pvx1.CONSUMER):
                # PVX/1 answers "who" with a type byte and a 16-byte key.
                self._pvx1 = bytearray()
                self._pvx1Received(data)
                return
            self.handshake.framing()
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

    def _frameReceived(self, frame: Frame) -> None:
        if self.phase is Phase.ACTIVE:
            assert self.session is not None
            if frame.verb == b"PING":
                self.write(_PONG)
            else:
                self.session.frameReceived(frame)
        elif self.phase is Phase.HELLO:
            if frame.verb != b"HELO":
                raise ProtocolViolation(f"expected HELO, got {frame.verb.decode()}")
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
            self.deny(ErrorCode.BAD_REQUEST, f"this port serves {self.service}, not {hello.service}")
            return
        self._hello = hello
        self.handshake.introduced(hello.role, hello.key)

    def _pvx1Received(self, data: bytes) -> None:
        assert self._pvx1 is not None
        if self.phase is Phase.ACTIVE:
            assert self.session is not None
            self.session.dataReceived(data)
            return
        self._pvx1 += data
        if self.phase is Phase.GREETING:
            self._introduce(quiet=False)
            return
        if len(self._pvx1) > pvx1.HEADER_CAP + 1:
            # Nothing that long can come before the farm answers (a consumer
            # given HEADER_CAP + 1 bytes is told nak by its session).
            self.abort()

    def _introduce(self, quiet: bool) -> None:
        """
        Let a PVX/1 peer introduce itself once its key is all here: a
        consumer's ends where its header starts, a node's when it goes
        quiet (original keys have any length).
        """
        assert self._pvx1 is not None
        if self._keyQuiet is not None and self._keyQuiet.active():
            self._keyQuiet.cancel()
        self._keyQuiet = None
        introduced = pvx1.introduction(bytes(self._pvx1), quiet)
        if introduced is None:
            if len(self._pvx1) > 1 + pvx1.KEY_CAP + pvx1.HEADER_CAP:
                self.abort()
            else:
                self._keyQuiet = self.farm.timers.callLater(
                    self.farm.settings.pvx1_quiet, self._introduce, True
                )
            return
        role, key, used = introduced
        del self._pvx1[:used]
        self.handshake.introduced(role, key)
        if self.phase is Phase.AUTHENTICATING and len(self._pvx1) > pvx1.HEADER_CAP + 1:
            self.abort()

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
            or session is None
            or self.relayIn is not None
            or self._decoding
            or self.pvx1
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
            or sink.pvx1
            or not spliceable(self.transport)
            or not spliceable(sink.transport)
        ):
            return
        # The relay writes to the sink's socket itself: what the farm wrote
        # the sink (the job's JOB_) goes first.
        sink.flush()
        splicer.relay(self, sink)

    def relayDue(self, sink: FarmConnection) -> int | None:
        """
        For the relay reading this connection: how many bytes of the DATA
        frame arriving now it may move to C{sink}; 0 if the next frame's
        header must be read first; None if it must stop.
        """
        session = self.session
        if self.phase is not Phase.ACTIVE or session is None or self.pvx1:
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
        assert self.session is not None
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

    # Backpressure: this connection is its transport's (streaming) producer

    def feedFrom(self, source: FarmConnection | None) -> None:
        """
        Hold C{source}'s reading while this connection's writes back up
        (L{None}: no one's).
        """
        old, self._feeder = self._feeder, source
        if self._writesBlocked:
            if old is not None:
                old.releaseReading(self)
            if source is not None:
                source.holdReading(self)

    def pauseProducing(self) -> None:
        self._writesBlocked = True
        if self._feeder is not None:
            self._feeder.holdReading(self)

    def resumeProducing(self) -> None:
        self._writesBlocked = False
        if self._feeder is not None:
            self._feeder.releaseReading(self)

    def stopProducing(self) -> None:
        # The transport is going; connectionLost follows.
        pass

    # Sending

    def write(self, *parts: bytes) -> None:
        if self.farm.corked and self.relayOut is None:
            if not self.pending:
                self.farm.dirty.append(self)
            self.pending += parts
            return
        if self.pending:
            parts = (*self.pending, *parts)
            self.pending = []
        self._send(parts)

    def flush(self) -> None:
        """
        Send what was written while the farm was corked, now.
        """
        if self.pending:
            parts, self.pending = self.pending, []
            self._send(parts)

    def _send(self, parts: tuple[bytes, ...] | list[bytes]) -> None:
        relay = self.relayOut
        if relay is not None:
            # Bytes of ours after the relay's, never between them.
            relay.stop()
            if self.relayOut is not None:
                relay.later(b"".join(parts))
                return
        sendNow(self.transport, *parts)

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        self.write(controlFrame(verb, fields))

    def sendData(self, payload: bytes) -> None:
        # One write, no copy of a payload that may be a whole MiB.
        self.write(encodeHeader(b"DATA", len(payload)), payload)

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
        if self._pvx1 is None:
            self.sendControl(verb, fields)
        elif self._role == "consumer":
            # PVX/1 has no error frames: a consumer not yet told anything is
            # owed a "nak".
            session = self.session
            farewell = pvx1.NAK if session is None else session.farewell()  # type: ignore[attr-defined]
            if farewell:
                self.write(farewell)
        self.flush()
        self._shut()
        if self.relayOut is not None:
            self.relayOut.later(None)
        elif self._pvx1 is not None:
            self._closeGently()
        else:
            self.transport.loseConnection()

    def abort(self) -> None:
        self.pending = []
        if self._pvx1 is not None and self.phase is not Phase.CLOSED:
            # Original peers die of a reset (their recv raises), and they
            # reconnect after a close: they are never reset.
            self._shut()
            self._closeGently()
            return
        self._shut()
        self._dropRelays()
        self.transport.abortConnection()

    def _closeGently(self) -> None:
        """
        Close a PVX/1 peer with a FIN only: half-close, read and discard
        what it still sends (unread bytes at close would make the kernel
        reset it), and let it close; one that never does is reset after
        L{pvx1.CLOSE_GRACE}.
        """
        halfClose = getattr(self.transport, "loseWriteConnection", None)
        if halfClose is None:  # TLS: its close_notify is as gentle
            self.transport.loseConnection()
            return
        halfClose()
        self._closeTimer = self.farm.timers.callLater(pvx1.CLOSE_GRACE, self._closeOverdue)

    def _closeOverdue(self) -> None:
        self._closeTimer = None
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
        self.handshake.closed()
        # At once, even when the machine's own step waits (a close decided
        # during another step of the handshake): nothing may close twice.
        self.phase = Phase.CLOSED
        self.handshakeDone()
        if self.relayIn is not None:
            self.relayIn.stop()
        session, self.session = self.session, None
        if session is not None:
            session.connectionLost()
        # A streaming producer paused at close would hold a loseConnection
        # open until it resumed.
        self.feedFrom(None)
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def connectionLost(self, reason: Failure = None) -> None:
        for timer in (self._closeTimer, self._keyQuiet, self._vouchedUntil):
            if timer is not None and timer.active():
                timer.cancel()
        self._closeTimer = self._keyQuiet = self._vouchedUntil = None
        self._shut()
        self._dropRelays()
        self.farm.connectionClosed(self)


class FarmFactory(Factory):
    """
    Builds connections for one service (one listening port) of a farm.
    """

    noisy = False

    def __init__(self, farm: Farm, service: str) -> None:
        self.farm = farm
        self.service = service

    def buildProtocol(self, addr: Any) -> FarmConnection:
        connection = FarmConnection(self.farm, service=self.service)
        connection.factory = self
        return connection
