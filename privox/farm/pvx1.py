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

import dataclasses
from typing import Any, Iterable, Protocol

from automat import TypeMachineBuilder
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.automata import build
from privox.farm.dispatcher import Capability
from privox.farm.handshake import Phase
from privox.farm.job import Job
from privox.farm.keepalive import Keepalive
from privox.farm.sessions import Connection, Session
from privox.engines.errors import BadAudio
from privox.farm import pvx1convert
from privox.languages import UnknownLanguage, languageCode
from privox.messages import ANY, BadRequest, ErrorCode, JobRequest
from privox.timers import Timer
from privox.wav import BadWav, joinWavs

log = Logger()

PRODUCER = b"c"
CONSUMER = b"s"
#: The longest key an original peer may send (its keys have any length).
KEY_CAP = 255
#: A consumer's header is complete at this many bytes, quiet or not.
HEADER_CAP = 255
#: The most text a PVX/1 node's transcript may have.
TRANSCRIPT_CAP = 1024 * 1024
LENGTH_DIGITS = 8
#: How long a PVX/1 peer the farm closed (FIN) has to close its end.
CLOSE_GRACE = 60.0
#: How long after a node has its whole upload the farm pings it, if no
#: transcript came yet: the node answers pong after its transcript, so the
#: pong ends a transcript (an empty one sends no byte at all). Late enough
#: that the node has read its upload, so the ping is not read as audio.
PROBE_DELAY = 0.5

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
_HEADER_START = b"model="


def introduction(data: bytes, quiet: bool) -> tuple[str, str, int] | None:
    """
    A PVX/1 peer's role and key, and how many bytes of C{data} they took;
    L{None} until the key is all here. Original keys have any length: a
    consumer's ends where its header (C{model=}) starts, a node's when it
    goes C{quiet}.
    """
    role = "producer" if data[:1] == PRODUCER else "consumer"
    end = data.find(_HEADER_START, 1) if role == "consumer" else -1
    if end < 0:
        if not quiet or len(data) > 1 + KEY_CAP:
            return None
        end = len(data)
    return role, data[1:end].decode("utf-8", "replace"), end


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
    The PVX/2 job a PVX/1 consumer's header asks for. Its language may be a
    name, as the original's clients send it (C{English}).

    @raise BadRequest: a missing or bad field.
    """
    if not isComplete(service, fields):
        raise BadRequest("PVX/1 header lacks a required field")
    model = aliases.pvx2Name(fields["model"])
    try:
        language = languageCode(fields["lang"]) if fields.get("lang") else None
    except UnknownLanguage as e:
        raise BadRequest(str(e)) from None
    if service == "stt":
        size = fields["len"]
        if not size.isascii() or not size.isdigit() or int(size) == 0:
            raise BadRequest("PVX/1 len must be a positive decimal number")
        return JobRequest("stt", model, language, int(size))
    if not fields["text"].strip():
        raise BadRequest("PVX/1 text must not be blank")
    return JobRequest(
        "tts",
        model,
        language or DEFAULT_LANGUAGE,
        0,
        voice=fields.get("idx") or DEFAULT_SPEAKER,
        text=fields["text"],
    )


def sttHeader(job: Job, aliases: Aliases, size: int) -> bytes:
    """
    What a PVX/1 node is sent for an STT job whose upload, as the node
    reads it, has C{size} bytes.
    """
    r = job.request
    model = aliases.pvx1Name(r.model)
    return f"model={model}&len={size:08d}&lang={r.language or DEFAULT_LANGUAGE}".encode()


def ttsHeaders(job: Job, aliases: Aliases) -> list[bytes]:
    """
    What a PVX/1 node is sent for a TTS job: a header for each piece of its
    text, each short enough for the node's one read, with no C{&} or C{=}
    in the text (L{pvx1convert}).
    """
    r = job.request
    model = aliases.pvx1Name(r.model)
    language = r.language or DEFAULT_LANGUAGE
    head = f"model={model}&text="
    tail = f"&lang={language}&idx={r.voice or DEFAULT_SPEAKER}"
    room = pvx1convert.MAX_HEADER - len(head.encode()) - len(tail.encode())
    text = pvx1convert.speakable(r.text or "", language)
    return [f"{head}{piece}{tail}".encode() for piece in pvx1convert.textPieces(text, room)]


def ttsSubstitute(farm: Any, request: JobRequest) -> JobRequest:
    """
    An original consumer's TTS job as the farm routes it: to the model it
    names if a producer serves it, else to the first of C{pvx1_tts_fallback}
    that one does, in the model's own default voice (the original's
    speakers, C{p236}..., are Coqui VCTK's).
    """
    dispatcher = farm.dispatchers["tts"]
    if dispatcher.canServe(request.model, request.language):
        return request
    for choice in farm.settings.pvx1_tts_fallback:
        models = dispatcher.models(request.language) if choice == ANY else [choice]
        for model in models:
            if dispatcher.canServe(model, request.language):
                return dataclasses.replace(request, model=model, voice=None)
    return request


class _Pvx1Session(Session):
    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self.settings = connection.farm.settings
        self.aliases = aliasesFor(self.settings, connection.service)
        self._quiet: Timer | None = None

    def _armQuiet(self, then: Any) -> None:
        self._cancelQuiet()
        self._quiet = self.connection.farm.timers.callLater(self.settings.pvx1_quiet, then)

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
            if service == "tts":
                request = ttsSubstitute(self.connection.farm, request)
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
#   idle ──transcribe──▶ collecting ──converted──▶ waitingForAck ──ack──▶ transcribing ──quiet──▶ idle
#     └────speak─────────────────────────────────▶ waitingForAck ──ack──▶ sizing ──length──▶ speaking
#                                        ▲   └──nak──▶ idle                                      │
#                                        └──────────────── next piece ◀───────────────────────────┘
#
# An STT upload is collected whole and converted to what the node reads
# before the header (which carries its length) goes out; a TTS text goes in
# pieces, whose WAVs are joined. No header goes to a node that owes a pong:
# the original reads "ping" and a header in one read as a ping, and loses
# the job. The job lets go of the node when it ends, in any state
# (detached): idle.


class ProducerEvents(Protocol):
    def transcribe(self, job: Job) -> None:
        "The node is given an STT job; its upload follows."

    def speak(self, job: Job) -> None:
        "The node is given a TTS job."

    def upload(self, payload: bytes) -> None:
        "Upload bytes for the node."

    def converted(self, audio: bytes | BadAudio) -> None:
        "The upload as the node reads it, or why it is not audio."

    def cancel(self) -> None:
        "The job is cancelled (PVX/1 has no cancel of its own)."

    def more(self) -> None:
        "Bytes from the node are waiting in the buffer."

    def ackedToTranscribe(self) -> None:
        "The node said ack to an STT job."

    def ackedToSpeak(self) -> None:
        "The node said ack to a TTS job (or one piece of it)."

    def refused(self) -> None:
        "The node said nak."

    def transcribed(self) -> None:
        "The node went quiet after its transcript (or filled its cap)."

    def sized(self, size: int) -> None:
        "The node said how long its WAV is."

    def pieceSpoken(self) -> None:
        "The WAV of one piece of the text is in; more pieces follow."

    def spoken(self) -> None:
        "The WAV of the whole text is in."

    def detached(self, healthy: bool) -> None:
        "The job let go of the node."


class Pvx1Producer(_Pvx1Session):
    events: ProducerEvents

    def __init__(self, connection: Connection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self.capability = self.aliases.capability()
        self._buffer = bytearray()
        #: An STT job's upload, collected whole before anything goes out.
        self._upload: list[bytes] = []
        self._uploadBytes = 0
        #: The upload as the node reads it, sent after its ack.
        self._audio = b""
        #: A TTS job's headers still to send, one per piece of its text,
        #: and the WAVs of the pieces spoken so far.
        self._pieces: list[bytes] = []
        self._wavs: list[bytes] = []
        self._wav = bytearray()
        self._wavRemaining = 0
        #: Pings the node has not answered yet.
        self._pongsOwed = 0
        #: A header waiting for those answers.
        self._heldHeader: bytes | None = None
        self._pongTimer: Timer | None = None
        self._probe: Timer | None = None
        self._keepalive = Keepalive(
            connection.farm.timers,
            self.settings.ping_interval,
            self.settings.pvx1_pong_timeout,
            self._ping,
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
        if job.request.service == "stt":
            self.events.transcribe(job)
        else:
            self.events.speak(job)
        if upload:
            self.events.upload(upload)

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        # CNCL: PVX/1 cannot cancel. A node not yet sent the job is let go
        # at once; one working on it finishes, the farm discards its
        # answer, and cancel_grace drops a node that never does.
        if verb == b"CNCL":
            self.events.cancel()

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
        self._stopTimers()
        self.connection.farm.producerLeft(self)
        job, self.job = self.job, None
        if job is not None:
            job.events.producerLost()

    # What the machine does

    @property
    def _reading(self) -> bool:
        return bool(self._buffer) and self.connection.phase is Phase.ACTIVE

    def _ping(self) -> None:
        self._pongsOwed += 1
        self.connection.write(PING)

    def _takePongs(self) -> bool:
        """
        Consume the C{pong}s at the head of the buffer. False: the buffer
        holds something else (or might, once more bytes come).
        """
        while self._buffer[:4] == PONG:
            del self._buffer[:4]
            self._ponged()
        return not self._buffer or PONG.startswith(bytes(self._buffer))

    def _ponged(self) -> None:
        self._keepalive.answered()
        self._pongsOwed = max(0, self._pongsOwed - 1)
        if not self._pongsOwed and self._heldHeader is not None:
            header, self._heldHeader = self._heldHeader, None
            self._stopPongTimer()
            self.connection.write(header)

    def _sendHeader(self, header: bytes) -> None:
        if not self._pongsOwed:
            self.connection.write(header)
            return
        self._heldHeader = header
        self._pongTimer = self.connection.farm.timers.callLater(
            self.settings.pvx1_pong_timeout, self.drop, "did not answer ping in time"
        )

    def _stopPongTimer(self) -> None:
        if self._pongTimer is not None and self._pongTimer.active():
            self._pongTimer.cancel()
        self._pongTimer = None

    def _stopTimers(self) -> None:
        self._stopPongTimer()
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    def _garbage(self, why: str) -> None:
        self._buffer.clear()
        self.drop(f"PVX/1 node sent garbage: {why}")

    def _collect(self, payload: bytes) -> None:
        job = self.job
        assert job is not None
        self._upload.append(payload)
        self._uploadBytes += len(payload)
        if self._uploadBytes < job.request.size:
            return
        data, self._upload, self._uploadBytes = b"".join(self._upload), [], 0
        converting = self.connection.farm.runBlocking(
            pvx1convert.readableAudio,
            data,
            job.request.format,
            isinstance(job.consumer, Pvx1Consumer),
        )
        converting.addCallbacks(
            lambda audio: self._converted(job, audio), lambda failure: self._notAudio(job, failure)
        )

    def _converted(self, job: Job, audio: bytes | BadAudio) -> None:
        if job is self.job:  # not a job that ended while it was converted
            self.events.converted(audio)

    def _notAudio(self, job: Job, failure: Failure) -> None:
        if not failure.check(BadAudio):
            log.failure("converting an upload for a PVX/1 node failed", failure)
            failure = Failure(BadAudio("the upload could not be converted"))
        self._converted(job, failure.value)

    def _sendAudio(self) -> None:
        audio, self._audio = self._audio, b""
        self.connection.write(audio)
        self._probe = self.connection.farm.timers.callLater(PROBE_DELAY, self._probeTranscript)

    def _probeTranscript(self) -> None:
        self._probe = None
        if not self._buffer:
            self._ping()

    def _forget(self) -> None:
        self._upload, self._uploadBytes, self._audio = [], 0, b""
        self._pieces, self._wavs, self._wav = [], [], bytearray()
        self._heldHeader = None
        self._cancelQuiet()
        self._stopTimers()

    def _transcriptQuiet(self) -> None:
        self._quiet = None
        self.events.transcribed()


_producer = TypeMachineBuilder(ProducerEvents, Pvx1Producer)
idle = _producer.state("idle")
collecting = _producer.state("collecting")
waitingForAck = _producer.state("waitingForAck")
transcribing = _producer.state("transcribing")
sizing = _producer.state("sizing")
speaking = _producer.state("speaking")


@idle.upon(ProducerEvents.transcribe).to(collecting)
def _transcribe(events: ProducerEvents, p: Pvx1Producer, job: Job) -> None:
    p._keepalive.busy()


@idle.upon(ProducerEvents.speak).to(waitingForAck)
def _speak(events: ProducerEvents, p: Pvx1Producer, job: Job) -> None:
    p._keepalive.busy()
    p._pieces = ttsHeaders(job, p.aliases)
    p._sendHeader(p._pieces.pop(0))


@collecting.upon(ProducerEvents.upload).loop()
def _collectUpload(events: ProducerEvents, p: Pvx1Producer, payload: bytes) -> None:
    p._collect(payload)


@collecting.upon(ProducerEvents.converted).to(waitingForAck)
def _convertedUpload(events: ProducerEvents, p: Pvx1Producer, audio: bytes | BadAudio) -> None:
    job = p.job
    assert job is not None
    if isinstance(audio, BadAudio):
        job.events.producerFailed({"error": audio.code, "message": audio.message})
        return
    p._audio = audio
    p._sendHeader(sttHeader(job, p.aliases, len(audio)))


@collecting.upon(ProducerEvents.cancel).loop()
def _cancelUnsent(events: ProducerEvents, p: Pvx1Producer) -> None:
    # The node has not heard of the job: it is free now.
    assert p.job is not None
    p.job.events.producerFailed({"error": ErrorCode.CANCELLED, "message": "cancelled"})


@idle.upon(ProducerEvents.cancel).loop()
@waitingForAck.upon(ProducerEvents.cancel).loop()
@transcribing.upon(ProducerEvents.cancel).loop()
@sizing.upon(ProducerEvents.cancel).loop()
@speaking.upon(ProducerEvents.cancel).loop()
def _cancelSent(events: ProducerEvents, p: Pvx1Producer) -> None:
    pass


@idle.upon(ProducerEvents.more).loop()
def _idleBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if p._reading and not p._takePongs():
        p._garbage("unexpected bytes while idle")


@collecting.upon(ProducerEvents.more).loop()
def _collectingBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if p._reading and not p._takePongs():
        p._garbage("unexpected bytes before its job")


@idle.upon(ProducerEvents.upload).loop()
@waitingForAck.upon(ProducerEvents.upload).loop()
@transcribing.upon(ProducerEvents.upload).loop()
@sizing.upon(ProducerEvents.upload).loop()
@speaking.upon(ProducerEvents.upload).loop()
def _staleUpload(events: ProducerEvents, p: Pvx1Producer, payload: bytes) -> None:
    pass  # collected already, or a job that ended


@waitingForAck.upon(ProducerEvents.more).loop()
def _ackBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if not p._reading or p._takePongs():
        return  # nothing left, or the start of a pong
    if p._heldHeader is not None:
        p._garbage("bytes before its ping's pong")
        return
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
    p._sendAudio()
    events.more()


@waitingForAck.upon(ProducerEvents.ackedToSpeak).to(sizing)
def _toSpeak(events: ProducerEvents, p: Pvx1Producer) -> None:
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
    text = bytes(p._buffer[:TRANSCRIPT_CAP])
    del p._buffer[:TRANSCRIPT_CAP]
    if p._pongsOwed and text.endswith(PONG):
        # The probe's answer, right behind the transcript (maybe empty).
        text = text[: -len(PONG)]
        p._ponged()
    p._stopTimers()
    job = p.job
    assert job is not None
    job.events.result({"text": text.decode("utf-8", "replace")}, 0, b"")
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
    spoken = sum(len(w) for w in p._wavs)
    if not digits.isdigit() or spoken + int(digits) > p.settings.max_job_bytes:
        p._garbage("bad WAV length")
        return
    events.sized(int(digits))


@sizing.upon(ProducerEvents.sized).to(speaking)
def _sized(events: ProducerEvents, p: Pvx1Producer, size: int) -> None:
    p._wavRemaining = size
    events.more()


@speaking.upon(ProducerEvents.more).loop()
def _wavBytes(events: ProducerEvents, p: Pvx1Producer) -> None:
    if p._wavRemaining and not p._reading:
        return
    chunk = p._buffer[: p._wavRemaining]
    del p._buffer[: len(chunk)]
    p._wav += chunk
    p._wavRemaining -= len(chunk)
    if p._wavRemaining:
        return
    p._wavs.append(bytes(p._wav))
    p._wav = bytearray()
    if p._pieces:
        events.pieceSpoken()
    else:
        events.spoken()


@speaking.upon(ProducerEvents.pieceSpoken).to(waitingForAck)
def _nextPiece(events: ProducerEvents, p: Pvx1Producer) -> None:
    p._sendHeader(p._pieces.pop(0))
    events.more()


@speaking.upon(ProducerEvents.spoken).to(idle)
def _spoken(events: ProducerEvents, p: Pvx1Producer) -> None:
    wavs, p._wavs = p._wavs, []
    job = p.job
    assert job is not None
    try:
        wav = joinWavs(wavs)
    except BadWav as e:
        job.events.producerFailed({"error": ErrorCode.ENGINE_ERROR, "message": str(e)})
        events.more()
        return
    job.events.result({"content_type": "audio/wav", "size": len(wav)}, len(wav), b"")
    step = p.settings.max_frame
    for start in range(0, len(wav), step):
        job.events.resultData(wav[start : start + step])
    job.events.resultComplete()
    events.more()


@idle.upon(ProducerEvents.detached).loop()
@collecting.upon(ProducerEvents.detached).to(idle)
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
