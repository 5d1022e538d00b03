"""
PVX/1, the original Privox protocol, on the farm's ports beside PVX/2.

After the greeting C{who} a PVX/1 peer answers with a type byte (C{c}: a
producer node, C{s}: a consumer) and a 16-character key
(L{privox.farm.handshake}). From then on the bytes have no framing at all:
headers like C{model=NAME&len=N&lang=LANG}, three-letter words (C{ack},
C{nak}, C{ping}, C{pong}), raw audio, transcript text. A header or a
transcript ends when its sender goes quiet for C{pvx1_quiet} seconds (or,
for headers, at 255 bytes).

The sessions here have the faces of the PVX/2 ones
(L{privox.farm.sessions}): the L{Job} machine and the dispatcher cannot
tell the protocols apart, so a PVX/1 consumer's job may run on a PVX/2 node
and the other way round. They translate what the job says (C{ASGN},
C{RSLT}, C{DATA}, C{FAIL}, C{CNCL}) into PVX/1 bytes, and PVX/1 bytes into
job events. Each is an explicit state machine (L{Pvx1Consumer}: reading its
header, waiting for a producer, uploading, answered; L{Pvx1Producer}: idle,
waiting for the node's ack, reading a transcript, a length or a WAV).

PVX/1 nodes advertise no models: the alias table (C{pvx1_stt_models},
C{pvx1_tts_models}) maps the names they know to PVX/2 model names.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from privox.automata import build
from privox.farm.dispatcher import Capability
from privox.farm.handshake import Phase
from privox.farm.job import Job
from privox.farm.keepalive import Keepalive
from privox.farm.sessions import Connection, Session
from privox.messages import BadRequest, ErrorCode, JobRequest

log = Logger()

PRODUCER = b"c"
CONSUMER = b"s"
KEY_LEN = 16
#: A consumer's header is complete at this many bytes, quiet or not.
HEADER_CAP = 255
#: The most text a PVX/1 node's transcript may have.
TRANSCRIPT_CAP = 1024 * 1024
LENGTH_DIGITS = 8

ACK = b"ack"
NAK = b"nak"
PING = b"ping"
PONG = b"pong"

DEFAULT_LANGUAGE = "en"
DEFAULT_SPEAKER = "p236"

# Header keys per service. A TTS text may contain anything, '&' included, so
# it is the one field not split on '&'.
_STT_KEYS = ("model", "len", "lang")
_TTS_TAIL_KEYS = ("lang", "idx")


def introduction(data: bytes) -> tuple[str, str] | None:
    """
    A PVX/1 peer's first bytes: its role and key, once all 17 are here.
    """
    if len(data) < 1 + KEY_LEN:
        return None
    role = "producer" if data[:1] == PRODUCER else "consumer"
    return role, data[1 : 1 + KEY_LEN].decode("utf-8", "replace")


class BadHeader(ValueError):
    """
    A PVX/1 header that cannot be read.
    """


class Aliases:
    """
    PVX/1 model names <-> PVX/2 model names, one table per service.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.toPvx2: dict[str, str] = {}
        self.toPvx1: dict[str, str] = {}
        for entry in entries:
            old, eq, new = entry.partition("=")
            old, new = old.strip(), new.strip()
            if not eq or not old or not new:
                raise ValueError(f"PVX/1 alias {entry!r} is not PVX1NAME=PVX2NAME")
            self.toPvx2.setdefault(old, new)
            self.toPvx1.setdefault(new, old)

    def pvx2Name(self, name: str) -> str:
        "A PVX/1 consumer's model name as the farm routes it (unknown: unchanged)."
        return self.toPvx2.get(name, name)

    def pvx1Name(self, name: str) -> str:
        "A PVX/2 model name as a PVX/1 node knows it."
        return self.toPvx1.get(name, name)

    def capability(self) -> Capability:
        "What a PVX/1 node serves: every aliased PVX/2 name, in any language."
        return Capability.of(self.toPvx1, ())


def aliasesFor(settings: Any, service: str) -> Aliases:
    return Aliases(settings.pvx1_stt_models if service == "stt" else settings.pvx1_tts_models)


def parseHeader(service: str, raw: bytes) -> dict[str, str]:
    """
    The fields of a PVX/1 job header. Only the fields present are returned;
    L{isComplete} says whether the required ones are there.

    STT: C{model=NAME&len=N&lang=LANG}, keys in any order. TTS:
    C{model=NAME&text=TEXT[&lang=LANG][&idx=SPEAKER]}: C{lang} and C{idx} are
    peeled off the right end, and the text is everything between C{&text=}
    and them, C{&} included.

    @raise BadHeader: not UTF-8, an unknown or repeated key, or no C{model}
        first.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":
            raise BadHeader("header is not UTF-8")
        text = raw[: e.start].decode("utf-8")  # cut short by a segment or the cap
    fields: dict[str, str] = {}
    if service == "stt":
        for part in text.split("&"):
            key, eq, value = part.partition("=")
            if not eq or key not in _STT_KEYS or key in fields:
                raise BadHeader(f"unexpected header field {part[:20]!r}")
            fields[key] = value
        if text and not text.startswith("model="):
            raise BadHeader("header does not start with model=")
        return fields
    rest = text
    while True:
        i = rest.rfind("&")
        if i < 0:
            break
        key, eq, value = rest[i + 1 :].partition("=")
        if not eq or key not in _TTS_TAIL_KEYS or key in fields:
            break
        fields[key] = value
        rest = rest[:i]
    if not rest.startswith("model="):
        raise BadHeader("header does not start with model=")
    model, amp, after = rest[len("model=") :].partition("&")
    fields["model"] = model
    if amp:
        if not after.startswith("text="):
            raise BadHeader("TTS header: model= must be followed by text=")
        fields["text"] = after[len("text=") :]
    return fields


def isComplete(service: str, fields: dict[str, str]) -> bool:
    required = ("model", "len") if service == "stt" else ("model", "text")
    return all(fields.get(k) for k in required)


def requestFrom(service: str, fields: dict[str, str], aliases: Aliases) -> JobRequest:
    """
    The PVX/2 job a PVX/1 consumer's header asks for.

    @raise BadRequest: a missing or bad field.
    """
    if not isComplete(service, fields):
        raise BadRequest("PVX/1 header lacks a required field")
    model = aliases.pvx2Name(fields["model"])
    if service == "stt":
        size = fields["len"]
        if not size.isascii() or not size.isdigit() or int(size) == 0:
            raise BadRequest("PVX/1 len must be a positive decimal number")
        return JobRequest("stt", model, fields.get("lang") or None, int(size))
    if not fields["text"].strip():
        raise BadRequest("PVX/1 text must not be blank")
    return JobRequest(
        "tts",
        model,
        fields.get("lang") or DEFAULT_LANGUAGE,
        0,
        voice=fields.get("idx") or DEFAULT_SPEAKER,
        text=fields["text"],
    )


def headerFor(job: Job, aliases: Aliases) -> bytes:
    """
    What a PVX/1 node is sent for C{job}.
    """
    r = job.request
    model = aliases.pvx1Name(r.model)
    language = r.language or DEFAULT_LANGUAGE
    if r.service == "stt":
        return f"model={model}&len={r.size:08d}&lang={language}".encode()
    voice = r.voice or DEFAULT_SPEAKER
    return f"model={model}&text={r.text}&lang={language}&idx={voice}".encode()




class _Pvx1Session(Session):
    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self.settings = connection.farm.settings
        self.aliases = aliasesFor(self.settings, connection.service)
        self._quiet: IDelayedCall | None = None

    def _armQuiet(self, then: Any) -> None:
        self._cancelQuiet()
        self._quiet = self.connection.farm.clock.callLater(self.settings.pvx1_quiet, then)

    def _cancelQuiet(self) -> None:
        if self._quiet is not None:
            if self._quiet.active():
                self._quiet.cancel()
            self._quiet = None

    def farewell(self) -> bytes:
        """
        The bytes a closing connection owes its peer.
        """
        return b""


# A PVX/1 consumer: one header, one job, one answer, then the farm closes.
#
#   reading ──quiet──▶ waiting ──assigned──▶ running ──answer──▶ answered
#
# and a FAIL, from any of them, closes (with "nak" if nothing was said yet).


class ConsumerEvents(Protocol):
    def data(self, data: bytes) -> None:
        "Bytes from the consumer."

    def quiet(self) -> None:
        "The header is complete (its sender went quiet, or it is at its cap)."

    def assigned(self, job: Job) -> None:
        "A producer took the job."

    def answer(self, fields: dict[str, Any]) -> None:
        "The job's RSLT."

    def failed(self, fields: dict[str, Any]) -> None:
        "The job's FAIL."

    def detached(self) -> None:
        "The job is over."


class Pvx1Consumer(_Pvx1Session):
    events: ConsumerEvents

    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self._header = bytearray()
        self._uploadRemaining = 0
        #: What the consumer is owed if the connection closes now: "nak"
        #: until it was told "ack" or given its answer.
        self._farewell = NAK

    def __repr__(self) -> str:
        return f"<Pvx1Consumer {self.keyId}>"

    def farewell(self) -> bytes:
        return self._farewell

    # The session's faces (the connection's, the job's)

    def dataReceived(self, data: bytes) -> None:
        self.events.data(data)

    def jobSubmitted(self, job: Job) -> None:
        self.job = job

    def jobAssigned(self, job: Job) -> None:
        self.job = job
        self.events.assigned(job)

    def jobDetached(self, job: Job) -> None:
        self.job = None
        self.events.detached()

    def sendResult(self, fields: dict[str, Any], raw: bytes) -> None:
        self.events.answer(fields)

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        if verb == b"FAIL":
            self.events.failed(fields)

    def sendData(self, payload: bytes) -> None:
        if self.service == "tts":
            self.connection.write(payload)

    def connectionLost(self) -> None:
        self._cancelQuiet()
        if self.job is not None:
            self.job.events.consumerLost()

    # What the machine does

    def _readHeader(self, data: bytes) -> None:
        self._header += data
        service = self.service
        if len(self._header) >= HEADER_CAP:
            if len(self._header) > HEADER_CAP:
                self._refuse(ErrorCode.BAD_REQUEST, "PVX/1 header longer than 255 bytes")
            else:
                self._cancelQuiet()
                self.events.quiet()
            return
        head = bytes(self._header[: len(b"model=")])
        if not b"model=".startswith(head):
            self._refuse(ErrorCode.BAD_REQUEST, "PVX/1 header does not start with model=")
            return
        try:
            fields = parseHeader(service, bytes(self._header))
        except BadHeader:
            # Maybe cut mid-field by a segment: judge the whole header when
            # it is done (quiet, or at the cap).
            fields = {}
        if isComplete(service, fields):
            self._armQuiet(self._headerQuiet)
        else:
            self._cancelQuiet()

    def _headerQuiet(self) -> None:
        self._quiet = None
        self.events.quiet()

    def _submit(self) -> None:
        # A consumer's handshake ends with its header.
        self.connection.handshakeDone()
        service = self.service
        try:
            try:
                fields = parseHeader(service, bytes(self._header))
            except BadHeader as e:
                raise BadRequest(str(e))
            request = requestFrom(service, fields, self.aliases)
            self.connection.farm.submit(self, request)
        except BadRequest as e:
            self._refuse(e.code, e.message)

    def _upload(self, data: bytes) -> None:
        if len(data) > self._uploadRemaining:
            self._refuse(ErrorCode.PROTOCOL, "PVX/1 consumer sent more than len bytes")
            return
        self._uploadRemaining -= len(data)
        job = self.job
        if job is None:
            return  # the job failed; the connection is closing
        step = self.settings.max_frame
        for start in range(0, len(data), step):
            job.events.consumerData(data[start : start + step])

    def _refuse(self, code: str, message: str) -> None:
        log.info(
            "PVX/1 consumer {key_id} refused: {code}: {why}",
            key_id=self.keyId, code=code, why=message,
        )
        self.connection.close(code, message)


_consumer = TypeMachineBuilder(ConsumerEvents, Pvx1Consumer)
reading = _consumer.state("reading")
waiting = _consumer.state("waiting")
running = _consumer.state("running")
answered = _consumer.state("answered")


@reading.upon(ConsumerEvents.data).loop()
def _headerData(events: ConsumerEvents, c: Pvx1Consumer, data: bytes) -> None:
    c._readHeader(data)


@reading.upon(ConsumerEvents.quiet).to(waiting)
def _headerDone(events: ConsumerEvents, c: Pvx1Consumer) -> None:
    c._submit()


@waiting.upon(ConsumerEvents.quiet).loop()
@running.upon(ConsumerEvents.quiet).loop()
@answered.upon(ConsumerEvents.quiet).loop()
def _lateQuiet(events: ConsumerEvents, c: Pvx1Consumer) -> None:
    pass


@waiting.upon(ConsumerEvents.data).loop()
def _outOfTurn(events: ConsumerEvents, c: Pvx1Consumer, data: bytes) -> None:
    c._refuse(ErrorCode.PROTOCOL, "PVX/1 consumer sent bytes out of turn")


@waiting.upon(ConsumerEvents.assigned).to(running)
def _assigned(events: ConsumerEvents, c: Pvx1Consumer, job: Job) -> None:
    if job.request.service == "stt":
        c._uploadRemaining = job.request.size
        c._farewell = b""
        c.connection.write(ACK)


@running.upon(ConsumerEvents.data).loop()
@answered.upon(ConsumerEvents.data).loop()
def _uploadData(events: ConsumerEvents, c: Pvx1Consumer, data: bytes) -> None:
    if not c._uploadRemaining:
        c._refuse(ErrorCode.PROTOCOL, "PVX/1 consumer sent bytes out of turn")
        return
    c._upload(data)


@running.upon(ConsumerEvents.answer).to(answered)
def _answer(events: ConsumerEvents, c: Pvx1Consumer, fields: dict[str, Any]) -> None:
    if c.service == "stt":
        text = fields.get("text")
        c.connection.write(text.encode("utf-8") if isinstance(text, str) else b"")
    else:
        c.connection.write(b"%08d" % fields.get("size", 0))
    c._farewell = b""


@reading.upon(ConsumerEvents.failed).loop()
@waiting.upon(ConsumerEvents.failed).loop()
@running.upon(ConsumerEvents.failed).loop()
@answered.upon(ConsumerEvents.failed).loop()
def _failed(events: ConsumerEvents, c: Pvx1Consumer, fields: dict[str, Any]) -> None:
    log.info(
        "PVX/1 consumer {key_id}: job failed with {code}",
        key_id=c.keyId, code=fields.get("error"),
    )
    # PVX/1 has no error message: nak before ack, else just close.
    c.connection.close(str(fields.get("error")), str(fields.get("message")))


@answered.upon(ConsumerEvents.detached).loop()
def _done(events: ConsumerEvents, c: Pvx1Consumer) -> None:
    c.connection.close("ok", "PVX/1 job done")


@reading.upon(ConsumerEvents.detached).loop()
@waiting.upon(ConsumerEvents.detached).loop()
@running.upon(ConsumerEvents.detached).loop()
def _endedUnanswered(events: ConsumerEvents, c: Pvx1Consumer) -> None:
    # The job ended without an answer: its FAIL has closed the connection,
    # or the consumer went away.
    pass


ConsumerMachine = build(_consumer)


# A PVX/1 node: pinged while idle; one job at a time, answered in PVX/1.
#
#   idle ──job──▶ waitingForAck ──ack──▶ transcribing (STT) ──quiet──▶ idle
#                      │          └─ack──▶ sizing (TTS) ──length──▶ speaking ──WAV──▶ idle
#                      └──nak──▶ idle
#
# The job lets go of the node when it ends, in any of them (detached): idle.


class ProducerEvents(Protocol):
    def start(self, job: Job) -> None:
        "The node is given a job."

    def more(self) -> None:
        "Bytes from the node are waiting in the buffer."

    def upload(self, payload: bytes) -> None:
        "Upload bytes for the node."

    def ackedToTranscribe(self) -> None:
        "The node said ack to an STT job."

    def ackedToSpeak(self) -> None:
        "The node said ack to a TTS job."

    def refused(self) -> None:
        "The node said nak."

    def transcribed(self) -> None:
        "The node went quiet after its transcript (or filled its cap)."

    def sized(self, size: int) -> None:
        "The node said how long its WAV is."

    def spoken(self) -> None:
        "The node's whole WAV is in."

    def detached(self, healthy: bool) -> None:
        "The job let go of the node."


class Pvx1Producer(_Pvx1Session):
    events: ProducerEvents

    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self.capability = self.aliases.capability()
        self._buffer = bytearray()
        #: Upload bytes held until the node says ack.
        self._held: list[bytes] = []
        self._heldBytes = 0
        self._wavRemaining = 0
        self._keepalive = Keepalive(
            connection.farm.clock,
            self.settings.ping_interval,
            self.settings.ping_interval / 2,
            lambda: self.connection.write(PING),
            lambda: self.drop("did not answer ping in time"),
        )

    def __repr__(self) -> str:
        return f"<Pvx1Producer {self.keyId} {self.service}>"

    # The session's faces (the connection's, the farm's, the job's)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self.events.more()

    def becameIdle(self) -> None:
        self._keepalive.idle()

    def startJob(self, job: Job, upload: bytes) -> None:
        self.job = job
        self.events.start(job)
        if upload:
            self.events.upload(upload)

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        # CNCL: PVX/1 cannot cancel. The node finishes, the farm discards its
        # answer, and cancel_grace drops a node that never does.
        pass

    def sendData(self, payload: bytes) -> None:
        self.events.upload(payload)

    def jobDetached(self, job: Job, healthy: bool) -> None:
        self.job = None
        self.events.detached(healthy)

    def drop(self, why: str) -> None:
        log.info("dropping PVX/1 producer {key_id}: {why}", key_id=self.keyId, why=why)
        self.connection.abort()

    def connectionLost(self) -> None:
        self._keepalive.stop()
        self._cancelQuiet()
        self.connection.farm.producerLeft(self)
        job, self.job = self.job, None
        if job is not None:
            job.events.producerLost()

    # What the machine does

    @property
    def _reading(self) -> bool:
        return bool(self._buffer) and self.connection.phase is Phase.ACTIVE

    def _takePongs(self) -> bool:
        """
        Consume the C{pong}s at the head of the buffer. False: the buffer
        holds something else (or might, once more bytes come).
        """
        while self._buffer[:4] == PONG:
            del self._buffer[:4]
            self._keepalive.answered()
        return not self._buffer or PONG.startswith(bytes(self._buffer))

    def _garbage(self, why: str) -> None:
        self._buffer.clear()
        self.drop(f"PVX/1 node sent garbage: {why}")

    def _hold(self, payload: bytes) -> None:
        self._heldBytes += len(payload)
        if self._heldBytes > self.settings.max_job_bytes:
            self.drop("held upload beyond max_job_bytes")
            return
        self._held.append(payload)

    def _release(self) -> None:
        held, self._held, self._heldBytes = self._held, [], 0
        if held:
            self.connection.write(*held)

    def _forget(self) -> None:
        self._held, self._heldBytes = [], 0
        self._cancelQuiet()

    def _transcriptQuiet(self) -> None:
        self._quiet = None
        self.events.transcribed()


_producer = TypeMachineBuilder(ProducerEvents, Pvx1Producer)
idle = _producer.state("idle")
waitingForAck = _producer.state("waitingForAck")
transcribing = _producer.state("transcribing")
sizing = _producer.state("sizing")
speaking = _producer.state("speaking")


@idle.upon(ProducerEvents.start).to(waitingForAck)
def _start(events: ProducerEvents, p: Pvx1Producer, job: Job) -> None:
    p._keepalive.busy()
    p.connection.write(headerFor(job, p.aliases))


@idle.upon(ProducerEvents.more).loop()
def _idleBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if p._reading and not p._takePongs():
        p._garbage("unexpected bytes while idle")


@idle.upon(ProducerEvents.upload).loop()
def _staleUpload(events: ProducerEvents, p: Pvx1Producer, payload: bytes) -> None:
    pass


@waitingForAck.upon(ProducerEvents.upload).loop()
def _holdUpload(events: ProducerEvents, p: Pvx1Producer, payload: bytes) -> None:
    p._hold(payload)


@transcribing.upon(ProducerEvents.upload).loop()
@sizing.upon(ProducerEvents.upload).loop()
@speaking.upon(ProducerEvents.upload).loop()
def _sendUpload(events: ProducerEvents, p: Pvx1Producer, payload: bytes) -> None:
    p.connection.write(payload)


@waitingForAck.upon(ProducerEvents.more).loop()
def _ackBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if not p._reading or p._takePongs():
        return  # nothing left, or the start of a pong
    head = bytes(p._buffer[:3])
    if head == ACK:
        del p._buffer[:3]
        assert p.job is not None
        if p.job.request.service == "stt":
            events.ackedToTranscribe()
        else:
            events.ackedToSpeak()
    elif head == NAK:
        del p._buffer[:3]
        events.refused()
    elif len(head) < 3 and (ACK.startswith(head) or NAK.startswith(head)):
        return
    else:
        p._garbage("expected ack")


@waitingForAck.upon(ProducerEvents.ackedToTranscribe).to(transcribing)
def _toTranscribe(events: ProducerEvents, p: Pvx1Producer) -> None:
    p._release()
    events.more()


@waitingForAck.upon(ProducerEvents.ackedToSpeak).to(sizing)
def _toSpeak(events: ProducerEvents, p: Pvx1Producer) -> None:
    p._release()
    events.more()


@waitingForAck.upon(ProducerEvents.refused).to(idle)
def _nak(events: ProducerEvents, p: Pvx1Producer) -> None:
    p._forget()
    assert p.job is not None
    p.job.events.producerFailed(
        {"error": ErrorCode.ENGINE_ERROR, "message": "the node refused the job"}
    )
    events.more()


@transcribing.upon(ProducerEvents.more).loop()
def _transcriptBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if not p._reading:
        return
    if len(p._buffer) >= TRANSCRIPT_CAP:
        p._cancelQuiet()
        events.transcribed()
    else:
        p._armQuiet(p._transcriptQuiet)


@transcribing.upon(ProducerEvents.transcribed).to(idle)
def _transcribed(events: ProducerEvents, p: Pvx1Producer) -> None:
    text = bytes(p._buffer[:TRANSCRIPT_CAP]).decode("utf-8", "replace")
    del p._buffer[:TRANSCRIPT_CAP]
    job = p.job
    assert job is not None
    job.events.result({"text": text}, 0, b"")
    job.events.resultComplete()
    events.more()


@sizing.upon(ProducerEvents.more).loop()
def _lengthBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if not p._reading:
        return
    if len(p._buffer) < LENGTH_DIGITS:
        if not bytes(p._buffer).isdigit():
            p._garbage("bad WAV length")
        return
    digits = bytes(p._buffer[:LENGTH_DIGITS])
    del p._buffer[:LENGTH_DIGITS]
    if not digits.isdigit() or int(digits) > p.settings.max_job_bytes:
        p._garbage("bad WAV length")
        return
    events.sized(int(digits))


@sizing.upon(ProducerEvents.sized).to(speaking)
def _sized(events: ProducerEvents, p: Pvx1Producer, size: int) -> None:
    p._wavRemaining = size
    assert p.job is not None
    p.job.events.result({"content_type": "audio/wav", "size": size}, size, b"")
    if size == 0:
        events.spoken()
    else:
        events.more()


@speaking.upon(ProducerEvents.more).loop()
def _wavBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if not p._reading:
        return
    chunk = bytes(p._buffer[: p._wavRemaining])
    del p._buffer[: len(chunk)]
    p._wavRemaining -= len(chunk)
    step = p.settings.max_frame
    assert p.job is not None
    for start in range(0, len(chunk), step):
        p.job.events.resultData(chunk[start : start + step])
    if p._wavRemaining == 0:
        events.spoken()


@speaking.upon(ProducerEvents.spoken).to(idle)
def _spoken(events: ProducerEvents, p: Pvx1Producer) -> None:
    assert p.job is not None
    p.job.events.resultComplete()
    events.more()


@idle.upon(ProducerEvents.detached).loop()
@waitingForAck.upon(ProducerEvents.detached).to(idle)
@transcribing.upon(ProducerEvents.detached).to(idle)
@sizing.upon(ProducerEvents.detached).to(idle)
@speaking.upon(ProducerEvents.detached).to(idle)
def _detached(events: ProducerEvents, p: Pvx1Producer, healthy: bool) -> None:
    p._forget()
    if healthy and p.connection.phase is Phase.ACTIVE:
        p.connection.farm.producerIdle(p)


ProducerMachine = build(_producer)


def newPvx1Session(connection: Connection, role: str, keyId: str, accountId: str) -> Session:
    """
    The session of a PVX/1 peer let in as C{role}.
    """
    if role == "producer":
        producer = Pvx1Producer(connection, keyId, accountId)
        producer.events = ProducerMachine(producer)
        return producer
    consumer = Pvx1Consumer(connection, keyId, accountId)
    consumer.events = ConsumerMachine(consumer)
    return consumer
