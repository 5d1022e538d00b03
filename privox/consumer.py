"""
A PVX/2 consumer: sends jobs to a farm and waits for their results. Used by
the API server, the command line, the tests and the benchmarks.

A farm that stops reading and answering (frozen, SIGSTOPped, its host gone
without a FIN) would hold a job until its deadline. Given a L{Liveness}, a
consumer with a job in flight PINGs the farm after each quiet spell (once
its own bytes have left: a PING queued behind an upload proves nothing) and
gives up on the connection if nothing at all comes back in time: the job
fails with L{Unresponsive} and can be tried on another farm. The farm
answers PING itself, whatever its producer is doing. While an upload is
still leaving (the farm holding it back because its producer reads slowly),
the kernel's unacknowledged bytes going down count as a sign of life, and
their standing still as silence.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from privox.framing import HEADER_LEN, Frame, encodeHeader
from privox.messages import (
    ErrorCode,
    Hello,
    JobRequest,
    ProtocolViolation,
    controlFrame,
    decodeObject,
    resultSize,
)
from privox.identity import IdentityError, encodeKey
from privox.peer import ConnectionClosed, PeerProtocol
from privox.sealing import (
    OFF,
    RESULT,
    UPLOAD,
    Ephemeral,
    JobKeys,
    Opener,
    SealBroken,
    SealPolicy,
    StreamOpener,
    StreamSealer,
    packed,
    seal,
    sealedSize,
    unpack,
)


_TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)


@dataclass(frozen=True)
class Liveness:
    """
    @ivar quiet: seconds without a byte from the farm before it is PINGed.
    @ivar patience: seconds it then has to send something.
    """

    quiet: float = 2.0
    patience: float = 5.0


class Unresponsive(ConnectionClosed):
    """
    The farm stopped answering during a job.
    """


class JobFailed(Exception):
    """
    The farm answered C{FAIL} for a job.
    """

    def __init__(self, code: str, message: str, jobId: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.jobId = jobId


@dataclass(frozen=True)
class JobResult:
    id: str
    fields: dict[str, Any]
    data: bytes = b""

    @property
    def text(self) -> str | None:
        return self.fields.get("text")


class SealRefused(JobFailed):
    """
    The farm could not be trusted with a sealed job: the node it assigned
    had no seal offer the exchange vouches for (a farm putting its own key
    in the node's place), or sealed content did not open. Another farm
    should be tried, and this one avoided.
    """

    def __init__(self, message: str, jobId: str | None) -> None:
        super().__init__(ErrorCode.SEAL_BROKEN, message, jobId)


@dataclass
class _Sealing:
    policy: SealPolicy
    ephemeral: Ephemeral
    #: The job's content, to be sealed once the node is known: its fields
    #: (L{privox.sealing.packed}) and its upload.
    head: bytes
    body: bytes
    keys: JobKeys | None = None
    #: The connection key of the node the upload went sealed for with
    #: C{JOB_} (§5.7), if it did.
    target: str | None = None


#: Where a streaming job's pieces go: (PART fields, the bytes they announced).
PartListener = Callable[[dict[str, Any], bytes], None]


def _piece(plain: bytes, kind: str) -> tuple[dict[str, Any], bytes]:
    """
    A sealed stream's piece opened: its fields and bytes, if it is the
    C{kind} of piece it says it is, with the bytes it says (a farm joining,
    cutting or moving pieces changes what they say).

    @raise SealBroken: it is not.
    """
    fields, body = unpack(plain)
    if fields.pop("piece", None) != kind or fields.pop("bytes", None) != len(body):
        raise SealBroken(f"a sealed stream's {kind} was joined, cut or moved")
    return fields, body


def _sealing(request: JobRequest, seal: SealPolicy | None, body: bytes) -> _Sealing | None:
    """
    How C{request}'s content will be sealed, if C{seal} says it should be:
    its content fields (the text, the prompt) travel sealed, with the
    upload.
    """
    if seal is None or seal.mode == OFF:
        return None
    content = {
        name: value
        for name, value in (("text", request.text), ("prompt", request.prompt))
        if value is not None
    }
    return _Sealing(seal, Ephemeral(), packed(content), body)


def _withoutContent(request: JobRequest, sealing: _Sealing) -> JobRequest:
    """
    The JOB_ of a sealed job: its content gone, the consumer's key in (and
    the node's its upload is sealed for, if it goes early).
    """
    seal = {"ephemeral": encodeKey(sealing.ephemeral.public)}
    if sealing.target is not None:
        seal["for"] = sealing.target
    return replace(request, text=None, prompt=None, seal=seal)


#: How many kinds of job a connection remembers a node to seal early for.
MAX_EARLY_NODES = 16


def _kind(request: JobRequest) -> tuple[Any, ...]:
    """
    What a node must serve to take C{request}: a node remembered for one
    job may take the next of the same kind.
    """
    return (request.model, request.language, request.task)


#: After an upload sealed early that the farm dropped (its node was busy),
#: a connection's next jobs wait for ASGN: 1, then 2, 4... up to this many
#: after misses in a row. A busy exchange then does not carry small
#: uploads twice; one taken early starts over.
MAX_EARLY_PAUSE = 32


class _Pending:
    def __init__(self, request: JobRequest, body: bytes, sealing: _Sealing | None = None) -> None:
        self.request = request
        self.body = body
        self.sealing = sealing
        self.done: Deferred[JobResult] = Deferred()
        self.id: str | None = None
        self.result: dict[str, Any] | None = None
        self.remaining = 0
        self.chunks: list[bytes] = []
        #: A streaming job (§5.8): its pieces' listener, the upload written
        #: before ASGN, whether its end was asked for and sent, the PART
        #: whose bytes are arriving, and (sealed) the two record streams.
        self.onPart: PartListener | None = None
        self.early: list[bytes] = []
        self.ended = False
        self.endSent = False
        self.part: dict[str, Any] | None = None
        self.sealer: StreamSealer | None = None
        self.opener: StreamOpener | None = None
        #: The content goes to the producer (ASGN came; a seal checked).
        self.flowing = False


class Stream:
    """
    A streaming job in flight (L{ConsumerProtocol.stream}): C{write} its
    upload as it is captured, C{end} it; pieces of the answer reach the
    listener meanwhile, the whole answer comes in L{done}.
    """

    def __init__(self, protocol: ConsumerProtocol, pending: _Pending) -> None:
        self._protocol = protocol
        self._pending = pending
        self.done = pending.done

    @property
    def assigned(self) -> bool:
        "Whether a producer took the job and its upload flows to it."
        return self._pending.flowing

    def write(self, data: bytes) -> None:
        if data:
            self._protocol._streamWrite(self._pending, data)

    def end(self) -> None:
        self._protocol._streamEnd(self._pending)


@implementer(IPushProducer)
class ConsumerProtocol(PeerProtocol):
    """
    One connection, one job at a time (L{submit} again once the previous
    result has arrived).
    """

    def __init__(
        self,
        service: str,
        key: str = "",
        liveness: Liveness | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(Hello("consumer", service, key))
        self.service = service
        self._pending: _Pending | None = None
        self._liveness = liveness
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock: IReactorTime = clock
        self._watch: IDelayedCall | None = None
        #: Whether our transport's buffer is above its mark (Twisted says so
        #: to a registered producer): our bytes have not all left yet.
        self._sending = False
        #: When a byte last came from the farm, and whether a PING waits.
        self._heard = 0.0
        self._pinged = False
        #: The kernel's unacknowledged bytes at the last check.
        self._queued: int | None = None
        #: (model, language, task) -> the seal offer of the node that was
        #: last assigned a sealed job of that kind here, if that node opens
        #: uploads sealed early: the next such job's small upload goes
        #: sealed for it with the JOB_ (§5.7), and the farm gives it that
        #: node if it is free. Forgotten when a sealed job of it fails.
        self._earlyNodes: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        #: Misses in a row, and how many jobs are still not sealed early.
        self._earlyMisses = 0
        self._earlyPause = 0

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(
        self, request: JobRequest, body: bytes = b"", seal: SealPolicy | None = None
    ) -> Deferred[JobResult]:
        """
        Send a job; its result (or L{JobFailed}) comes in the Deferred.

        @param seal: seal the job's content for its node (unless C{off}):
            the text goes in the upload, and the upload and the answer are
            sealed (L{privox.sealing}); a node the exchange does not vouch
            for gets nothing (L{SealRefused}).
        """
        if self._pending is not None:
            raise RuntimeError("this connection already has a job in flight")
        if len(body) != request.size:
            raise ValueError("body length must equal request.size")
        sealing = _sealing(request, seal, body)
        upload: list[bytes] = [body] if body else []
        if sealing is not None:
            size = sealedSize(len(sealing.head) + len(body))
            upload = self._sealEarly(_kind(request), sealing, size)
            request = replace(_withoutContent(request, sealing), size=size)
        early = bool(upload) and self.okay is not None and request.size <= self.okay.early_upload
        if early:
            # Small enough to go at once: a round trip less than waiting for
            # ASGN, and the farm reads JOB_ and DATA together.
            request = replace(request, early=True)
        frame = controlFrame(b"JOB_", request.payload())
        if self.okay is not None and len(frame) - HEADER_LEN > self.okay.max_frame:
            # The farm would close the connection over it (a protocol error):
            # refuse here, as the job-level FAIL too_large it deserves.
            return fail(JobFailed(
                ErrorCode.TOO_LARGE,
                f"the job description is {len(frame) - HEADER_LEN} bytes;"
                f" the farm takes at most {self.okay.max_frame} (text too long?)",
                None,
            ))
        pending = self._pending = _Pending(request, body, sealing)
        self._startWatching()
        self.transport.write(frame)
        if early:
            self.sendData(*upload)
        return pending.done

    def _sealEarly(self, kind: tuple[Any, ...], sealing: _Sealing, size: int) -> list[bytes]:
        """
        The sealed upload, if it can go with the C{JOB_}: small enough, and
        sealed for the node last assigned a job of this C{kind} here, while
        the exchange still vouches for it. Otherwise nothing: it is sealed
        once ASGN names the node.
        """
        offer = self._earlyNodes.get(kind)
        if offer is None or self.okay is None or size > self.okay.early_upload:
            return []
        if self._earlyPause:
            self._earlyPause -= 1
            return []
        try:
            nodeKey = sealing.policy.nodeKey(offer, self._clock.seconds())
            sealing.keys = sealing.ephemeral.keys(None, nodeKey)
        except (IdentityError, SealBroken):
            del self._earlyNodes[kind]
            return []
        sealing.target = offer["key"]
        # The body stays until ASGN: another node may take the job.
        return seal(sealing.keys.upload, UPLOAD, sealing.head, sealing.body)

    def stt(self, model: str, audio: bytes, language: str | None = None,
            format: str = "auto", timeout_s: float | None = None,
            seal: SealPolicy | None = None, task: str | None = None,
            prompt: str | None = None, temperature: float | None = None,
            words: bool = False) -> Deferred[JobResult]:
        return self.submit(
            JobRequest("stt", model, language, len(audio), format, timeout_s=timeout_s, task=task,
                       prompt=prompt, temperature=temperature, words=words),
            audio,
            seal,
        )

    def tts(self, model: str, text: str, voice: str | None = None,
            language: str | None = None, timeout_s: float | None = None,
            seal: SealPolicy | None = None, speed: float | None = None) -> Deferred[JobResult]:
        return self.submit(
            JobRequest("tts", model, language, 0, voice=voice, text=text, timeout_s=timeout_s,
                       speed=speed),
            seal=seal,
        )

    def stream(
        self, request: JobRequest, onPart: PartListener, seal: SealPolicy | None = None
    ) -> Stream:
        """
        Start a streaming job (C{request.stream}, size 0): the farm must
        take them (OKAY's C{stream}). Its upload goes with L{Stream.write}
        (held until ASGN), each PART reaches C{onPart}, sealed ones opened.
        """
        if self._pending is not None:
            raise RuntimeError("this connection already has a job in flight")
        if not request.stream or request.size:
            raise ValueError("a streaming request has stream set and size 0")
        sealing = _sealing(request, seal, b"")
        if sealing is not None:
            request = _withoutContent(request, sealing)
        pending = self._pending = _Pending(request, b"", sealing)
        pending.onPart = onPart
        self._startWatching()
        self.transport.write(controlFrame(b"JOB_", request.payload()))
        return Stream(self, pending)

    def _streamWrite(self, pending: _Pending, data: bytes) -> None:
        if pending.ended or pending.endSent or self._pending is not pending:
            return  # over: refused, failed, or its connection gone
        if pending.id is None:
            pending.early.append(data)
        else:
            self._streamSend(pending, data)

    def _streamSend(self, pending: _Pending, data: bytes) -> None:
        if pending.sealer is not None:
            self.sendData(*pending.sealer.seal(data))
        elif pending.sealing is None:
            self.sendData(data)

    def _streamEnd(self, pending: _Pending) -> None:
        pending.ended = True
        if pending.id is not None:
            self._sendEnd(pending)

    def _sendEnd(self, pending: _Pending) -> None:
        """
        The stream's upload is over (asked for, or moot: the job ended):
        the empty DATA that says so is owed either way.
        """
        if pending.endSent or self.transport is None:
            return
        pending.endSent = True
        if pending.sealer is not None and pending.ended and self._pending is pending:
            self.sendData(*pending.sealer.close())
        self.transport.write(encodeHeader(b"DATA", 0))

    def _streamAssigned(self, pending: _Pending, offer: Any) -> None:
        sealing = pending.sealing
        if sealing is not None:
            if not self._checkSeal(pending, sealing, offer):
                return
            assert sealing.keys is not None
            pending.sealer = StreamSealer(sealing.keys.upload, UPLOAD)
            pending.opener = StreamOpener(sealing.keys.result, RESULT)
            self.sendData(*pending.sealer.seal(sealing.head))
        pending.flowing = True
        early, pending.early = pending.early, []
        for data in early:
            self._streamSend(pending, data)
        if pending.ended:
            self._sendEnd(pending)

    def _partReceived(self, pending: _Pending, fields: dict[str, Any]) -> None:
        if pending.onPart is None or pending.id is None or pending.part is not None:
            raise ProtocolViolation("PART the consumer did not expect")
        pending.part = fields
        pending.remaining = resultSize(fields)
        if pending.remaining == 0:
            self._partComplete(pending, b"")

    def _partComplete(self, pending: _Pending, data: bytes) -> None:
        fields, pending.part = pending.part, None
        assert fields is not None and pending.onPart is not None
        if pending.opener is not None:
            try:
                if fields.get("sealed") is not True:
                    raise SealBroken("a piece of a sealed stream came in the clear")
                plain = b"".join(pending.opener.feed(data))
                if not pending.opener.atEdge:
                    raise SealBroken("a sealed piece ends mid-record")
                fields, data = _piece(plain, "part")
            except SealBroken as e:
                self._refuseFarm(f"the sealed stream does not open: {e}")
                return
        pending.onPart(fields, data)

    # Liveness (see the module docstring)

    def pauseProducing(self) -> None:
        self._sending = True

    def resumeProducing(self) -> None:
        self._sending = False

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self._heard = self._clock.seconds()
        self._pinged = False
        super().dataReceived(data)

    def _startWatching(self) -> None:
        if self._liveness is None or self._watch is not None:
            return
        self._heard = self._clock.seconds()
        self._pinged = False
        self._sending = False
        self._queued = None
        # Registered only while a job runs: a TLS transport does not close
        # while a producer is registered.
        self.transport.registerProducer(self, True)
        self._watch = self._clock.callLater(self._liveness.quiet, self._check)

    def _stopWatching(self) -> None:
        if self._watch is None:
            return
        if self._watch.active():
            self._watch.cancel()
        self._watch = None
        if self.transport is not None:
            self.transport.unregisterProducer()

    def _check(self) -> None:
        liveness = self._liveness
        assert liveness is not None
        if self._pending is None or self.transport is None:
            self._stopWatching()
            return
        now = self._clock.seconds()
        queued, self._queued = self._queued, self.queuedBytes()
        # Our bytes still leaving, from Twisted's buffer or (the farm reading
        # slowly, as a slow producer holds it back) from the kernel's: alive.
        if self._sending or (queued is not None and self._queued is not None
                             and self._queued < queued):
            self._heard, self._pinged = now, False
        elif (self._pinged or self._queued) and now - self._heard >= liveness.quiet + liveness.patience:
            self._handshakeFailure = Unresponsive(
                f"the farm read and sent nothing for {now - self._heard:.0f} s"
            )
            self._stopWatching()
            self.transport.abortConnection()
            return
        elif not self._pinged and not self._queued and now - self._heard >= liveness.quiet:
            self.transport.write(encodeHeader(b"PING", 0))
            self._pinged = True
        self._watch = self._clock.callLater(
            liveness.patience if self._pinged else liveness.quiet, self._check
        )

    def queuedBytes(self) -> int | None:
        """
        Bytes written to the socket the farm has not acknowledged yet (Linux's
        TIOCOUTQ); L{None} where that cannot be asked.
        """
        transport = self.transport
        handle = getattr(transport, "getHandle", None)
        if isinstance(transport, TLSMemoryBIOProtocol):
            handle = getattr(transport.transport, "getHandle", None)
        if handle is None or _TIOCOUTQ is None:
            return None
        try:
            raw = fcntl.ioctl(handle().fileno(), _TIOCOUTQ, b"\0\0\0\0")
        except (OSError, AttributeError):
            return None
        return int(struct.unpack("i", raw)[0])

    def frameReceived(self, frame: Frame) -> None:
        pending = self._pending
        if frame.verb == b"PONG":
            return
        if pending is None and frame.verb == b"FAIL":
            # The farm is closing this connection (shutting down, say).
            fields = decodeObject(frame)
            self._handshakeFailure = JobFailed(
                str(fields.get("error")), str(fields.get("message")), None
            )
            return
        if pending is None:
            raise ProtocolViolation(f"{frame.verb.decode()} with no job in flight")
        if frame.verb == b"DATA":
            if pending.part is not None:
                if len(frame.payload) > pending.remaining:
                    raise ProtocolViolation("DATA beyond the size a PART announced")
                pending.chunks.append(frame.payload)
                pending.remaining -= len(frame.payload)
                if pending.remaining == 0:
                    data, pending.chunks = b"".join(pending.chunks), []
                    self._partComplete(pending, data)
                return
            if pending.result is None or not pending.remaining or len(frame.payload) > pending.remaining:
                raise ProtocolViolation("DATA the consumer did not expect")
            pending.chunks.append(frame.payload)
            pending.remaining -= len(frame.payload)
            if pending.remaining == 0:
                self._answered(pending, b"".join(pending.chunks))
            return
        fields = decodeObject(frame)
        if frame.verb == b"PART":
            self._partReceived(pending, fields)
        elif frame.verb == b"ASGN":
            pending.id = fields.get("id")
            if pending.request.stream:
                self._streamAssigned(pending, fields.get("seal"))
            elif pending.sealing is not None:
                self._sealFor(pending, pending.sealing, fields)
            # The whole upload goes now; the farm discards it if the job fails.
            elif pending.body and not pending.request.early:
                self.sendData(pending.body)
        elif frame.verb == b"RSLT":
            if pending.part is not None:
                raise ProtocolViolation("RSLT before a PART's bytes")
            pending.result = fields
            pending.remaining = resultSize(fields)
            if pending.remaining == 0:
                self._answered(pending, b"")
        elif frame.verb == b"FAIL":
            failure = JobFailed(
                str(fields.get("error", ErrorCode.PROTOCOL)),
                str(fields.get("message", "")),
                fields.get("id"),
            )
            if failure.code == ErrorCode.PROTOCOL and failure.jobId is None:
                self._handshakeFailure = failure
                self.transport.loseConnection()
            self._finish(failure)
        else:
            raise ProtocolViolation(f"unexpected {frame.verb.decode()}")

    def _sealFor(self, pending: _Pending, sealing: _Sealing, asgn: dict[str, Any]) -> None:
        """
        The node is assigned (C{asgn}): check that the exchange vouches for
        it, then send the content sealed to it, unless the farm says the
        upload sealed early for this node went with the job; else give the
        job up on this farm. A node that opens uploads sealed early is
        remembered for the next job of this kind (L{_kind}).
        """
        offer = asgn.get("seal")
        # Kept only for the node it was sealed for, and only if the farm
        # forwarded it: one dropped (that node was busy) is sealed again,
        # even if that node takes the job after all.
        kept = sealing.target if asgn.get("early") is True else None
        if not self._checkSeal(pending, sealing, offer, kept):
            return
        went = kept is not None and offer["key"] == kept
        if sealing.target is not None:
            if went:
                self._earlyMisses = 0
            else:
                self._earlyMisses += 1
                self._earlyPause = min(2 ** (self._earlyMisses - 1), MAX_EARLY_PAUSE)
        if asgn.get("early_seal") is True:
            kind = _kind(pending.request)
            self._earlyNodes[kind] = offer
            self._earlyNodes.move_to_end(kind)
            while len(self._earlyNodes) > MAX_EARLY_NODES:
                self._earlyNodes.popitem(last=False)
        if went:
            sealing.body = b""  # It went with the JOB_, sealed for this node.
            return
        assert sealing.keys is not None
        # Sealed again for the node that took the job (the farm dropped an
        # upload sealed for another).
        records = seal(sealing.keys.upload, UPLOAD, sealing.head, sealing.body)
        sealing.body = b""
        self.sendData(*records)

    def _checkSeal(
        self, pending: _Pending, sealing: _Sealing, offer: Any, target: str | None = None
    ) -> bool:
        """
        Whether the exchange vouches for the assigned node (then
        C{sealing.keys} are the job's); if not, the farm is given up.
        C{target}: the node the upload went sealed for with the JOB_; its
        keys stand if that node is the one assigned.
        """
        jobId = pending.id if isinstance(pending.id, str) else ""
        try:
            nodeKey = sealing.policy.nodeKey(offer, self._clock.seconds())
            if target is None or offer["key"] != target:
                sealing.keys = sealing.ephemeral.keys(jobId, nodeKey)
        except (IdentityError, SealBroken) as e:
            self._refuseFarm(f"the assigned node's seal does not hold: {e}")
            return False
        return True

    def _answered(self, pending: _Pending, data: bytes) -> None:
        fields = pending.result
        assert fields is not None
        jobId = fields.get("id", "") or pending.id or ""
        sealing = pending.sealing
        if sealing is None:
            self._finish(JobResult(jobId, fields, data))
            return
        if fields.get("sealed") is not True or sealing.keys is None:
            self._refuseFarm("a sealed job was answered in the clear")
            return
        try:
            opener = pending.opener or Opener(sealing.keys.result, RESULT, len(data))
            plain = b"".join(opener.feed(data))
            opener.finish()
            if pending.opener is not None:
                content, body = _piece(plain, "answer")
            else:
                content, body = unpack(plain)
        except SealBroken as e:
            self._refuseFarm(f"the sealed answer does not open: {e}")
            return
        # Only what the node sealed: a field the farm put beside it (a
        # speed, segments...) would change the answer unseen.
        opened = dict(content, id=jobId)
        opened.pop("size", None)
        self._finish(JobResult(jobId, opened, body))

    def _refuseFarm(self, why: str) -> None:
        pending = self._pending
        assert pending is not None
        self._finish(SealRefused(why, pending.id))
        # The farm waits for an upload that will not come, or holds a job
        # it tampered with: this connection is done.
        self.transport.loseConnection()

    def _finish(self, outcome: JobResult | Exception) -> None:
        pending = self._pending
        assert pending is not None
        if pending.request.stream and pending.id is not None and not self.disconnected.called:
            # The job is over; its upload's end is still owed (§5.8).
            self._sendEnd(pending)
        self._pending = None
        self._stopWatching()
        if isinstance(outcome, Exception):
            if pending.sealing is not None:
                # Its node may not be what its offer says (a copy of another
                # node's offer can open nothing): aim no upload at it again.
                self._earlyNodes.pop(_kind(pending.request), None)
            pending.done.errback(outcome)
        else:
            pending.done.callback(outcome)

    def peerLost(self, why: Exception) -> None:
        self._stopWatching()
        if self._pending is not None:
            self._finish(why if isinstance(why, Exception) else ConnectionClosed(str(why)))


async def connectConsumer(
    reactor: Any, endpoint: str, service: str, key: str = ""
) -> ConsumerProtocol:
    """
    Connect to a farm's C{service} port (a client endpoint string such as
    C{tcp:host=farm.example:port=1776}) and complete the handshake.
    """
    protocol = ConsumerProtocol(service, key)
    await connectProtocol(clientFromString(reactor, endpoint), protocol)
    await protocol.ready
    return protocol
