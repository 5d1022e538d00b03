"""
PVX/1, the original Privox protocol, on the farm's ports beside PVX/2.

After the greeting C{who} a PVX/1 peer answers with a type byte (C{c}: a
producer node, C{s}: a consumer) and a 16-character key. From then on the
bytes have no framing at all: headers like C{model=NAME&len=N&lang=LANG},
three-letter words (C{ack}, C{nak}, C{ping}, C{pong}), raw audio, transcript
text. A header or a transcript ends when its sender goes quiet for
C{pvx1_quiet} seconds (or, for headers, at 255 bytes).

The sessions here implement the same interface as the PVX/2
L{ConsumerSession} and L{ProducerSession}: the L{Job} machine and the
dispatcher cannot tell the protocols apart, so a PVX/1 consumer's job may run
on a PVX/2 node and the other way round. They translate what the job says
(C{ASGN}, C{RSLT}, C{DATA}, C{FAIL}, C{CNCL}) into PVX/1 bytes, and PVX/1
bytes into job events.

PVX/1 nodes advertise no models: the alias table (C{pvx1_stt_models},
C{pvx1_tts_models}) maps the names they know to PVX/2 model names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from privox.farm.dispatcher import Capability
from privox.keys import accountId
from privox.messages import BadRequest, ErrorCode, JobRequest

if TYPE_CHECKING:
    from privox.farm.connection import FarmConnection
    from privox.farm.job import Job

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

WHISPER_NAMES = (
    "tiny", "tiny.en", "base", "base.en", "small", "small.en",
    "medium", "medium.en", "large", "large-v2",
)
DEFAULT_STT_ALIASES = tuple(f"{name}=whisper:{name}" for name in WHISPER_NAMES)
DEFAULT_TTS_ALIASES = ("tts_models/en/vctk/vits=coqui:tts_models/en/vctk/vits",)

# Header keys per service. A TTS text may contain anything, '&' included, so
# it is the one field not split on '&'.
_STT_KEYS = ("model", "len", "lang")
_TTS_TAIL_KEYS = ("lang", "idx")


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


class Pvx1Peer:
    """
    A PVX/1 peer on a L{FarmConnection}: reads the type byte and key, runs
    the key policy, then hands the bytes to a L{Pvx1Consumer} or
    L{Pvx1Producer} session.
    """

    def __init__(self, connection: FarmConnection) -> None:
        self.connection = connection
        self._buffer = bytearray()
        self.session: Pvx1Consumer | Pvx1Producer | None = None
        self.kind: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            self.session.dataReceived(data)
            return
        from privox.farm.connection import Phase

        self._buffer += data
        if self.connection.phase is Phase.GREETING:
            if len(self._buffer) < 1 + KEY_LEN:
                return
            self.kind = bytes(self._buffer[:1])
            key = bytes(self._buffer[1 : 1 + KEY_LEN]).decode("utf-8", "replace")
            del self._buffer[: 1 + KEY_LEN]
            self.connection.phase = Phase.AUTHENTICATING
            role = "producer" if self.kind == PRODUCER else "consumer"
            d = self.connection.farm.keyPolicy(role).check(key)
            d.addErrback(self.connection._keyCheckFailed)
            d.addCallback(self._keyChecked, role, accountId(key))
        if len(self._buffer) > HEADER_CAP + 1:
            # Nothing that long can come before the farm answers (a consumer
            # given HEADER_CAP + 1 bytes is told nak by its session).
            self.connection.abort()

    def _keyChecked(self, accepted: bool, role: str, account: str) -> None:
        from privox.farm.connection import Phase

        kid = account[:12]
        connection = self.connection
        if connection.phase is not Phase.AUTHENTICATING:
            return  # gone while we were checking
        if not accepted:
            log.info("denied PVX/1 {role} with key {key_id}", role=role, key_id=kid)
            connection.close(ErrorCode.UNAUTHORIZED, "key rejected")
            return
        if not connection.farm.accepting:
            connection.close(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")
            return
        connection.phase = Phase.ACTIVE
        session: Pvx1Consumer | Pvx1Producer
        if role == "producer":
            connection._handshakeDone()
            session = Pvx1Producer(connection, kid, account)
            self.session = connection.session = session
            connection.farm.producerJoined(session)
        else:
            # A consumer's handshake ends with its header (its timer runs on).
            session = Pvx1Consumer(connection, kid, account)
            self.session = connection.session = session
        log.info(
            "PVX/1 {role} {key_id} joined {service}",
            role=role, key_id=kid, service=connection.service,
        )
        pending, self._buffer = bytes(self._buffer), bytearray()
        if pending and connection.phase is Phase.ACTIVE:
            session.dataReceived(pending)

    def farewell(self) -> bytes:
        """
        The bytes a closing connection owes its peer: C{nak} to a consumer
        that was told nothing yet.
        """
        if self.kind != CONSUMER:
            return b""
        if self.session is None:
            return NAK
        return self.session.farewell()


class _Pvx1Session:
    def __init__(self, connection: FarmConnection, keyId: str, accountId: str | None = None) -> None:
        self.connection = connection
        self.keyId = keyId
        #: The full SHA-256 of the key, for the ledger (never the key).
        self.accountId = accountId
        self.job: Job | None = None
        self.aliases = aliasesFor(connection.farm.settings, connection.service)
        self._quiet: IDelayedCall | None = None

    @property
    def transport(self) -> Any:
        return self.connection.transport

    @property
    def settings(self) -> Any:
        return self.connection.farm.settings

    def _armQuiet(self, then: Any) -> None:
        self._cancelQuiet()
        self._quiet = self.connection.farm.clock.callLater(self.settings.pvx1_quiet, then)

    def _cancelQuiet(self) -> None:
        if self._quiet is not None:
            if self._quiet.active():
                self._quiet.cancel()
            self._quiet = None


class Pvx1Consumer(_Pvx1Session):
    """
    A PVX/1 consumer: one header, one job, one answer, then the farm closes.
    """

    def __init__(self, connection: FarmConnection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self._header = bytearray()
        self._submitted = False
        self._acked = False
        self._answered = False  # the transcript or the length was sent
        self._uploadRemaining = 0

    def __repr__(self) -> str:
        return f"<Pvx1Consumer {self.keyId}>"

    # Bytes from the consumer

    def dataReceived(self, data: bytes) -> None:
        if not self._submitted:
            self._headerData(data)
        elif self._acked and self._uploadRemaining:
            self._upload(data)
        else:
            self._refuse(ErrorCode.PROTOCOL, "PVX/1 consumer sent bytes out of turn")

    def _headerData(self, data: bytes) -> None:
        self._header += data
        service = self.connection.service
        if len(self._header) >= HEADER_CAP:
            if len(self._header) > HEADER_CAP:
                self._refuse(ErrorCode.BAD_REQUEST, "PVX/1 header longer than 255 bytes")
            else:
                self._headerDone()
            return
        head = bytes(self._header[: len(b"model=")])
        if not b"model=".startswith(head):
            self._submitted = True
            self._refuse(ErrorCode.BAD_REQUEST, "PVX/1 header does not start with model=")
            return
        try:
            fields = parseHeader(service, bytes(self._header))
        except BadHeader:
            # Maybe cut mid-field by a segment: judge the whole header when
            # it is done (quiet, or at the cap).
            fields = {}
        if isComplete(service, fields):
            self._armQuiet(self._headerDone)
        else:
            self._cancelQuiet()

    def _headerDone(self) -> None:
        self._quiet = None
        self._submitted = True
        self.connection._handshakeDone()
        service = self.connection.service
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

    def farewell(self) -> bytes:
        return b"" if (self._acked or self._answered) else NAK

    # What the job says

    def jobSubmitted(self, job: Job) -> None:
        self.job = job

    def jobAssigned(self, job: Job) -> None:
        self.job = job
        if job.request.service == "stt":
            self._acked = True
            self._uploadRemaining = job.request.size
            self.transport.write(ACK)

    def jobDetached(self, job: Job) -> None:
        self.job = None
        if self._answered:
            self.connection.close("ok", "PVX/1 job done")

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        if verb == b"RSLT":
            if self.connection.service == "stt":
                text = fields.get("text")
                self.transport.write(text.encode("utf-8") if isinstance(text, str) else b"")
            else:
                size = fields.get("size", 0)
                self.transport.write(b"%08d" % size)
            self._answered = True
        elif verb == b"FAIL":
            log.info(
                "PVX/1 consumer {key_id}: job failed with {code}",
                key_id=self.keyId, code=fields.get("error"),
            )
            # PVX/1 has no error message: nak before ack, else just close.
            self.connection.close(str(fields.get("error")), str(fields.get("message")))

    def sendData(self, payload: bytes) -> None:
        if self.connection.service == "tts":
            self.transport.write(payload)

    def connectionLost(self) -> None:
        self._cancelQuiet()
        if self.job is not None:
            self.job.events.consumerLost()


# Producer phases
_IDLE = "idle"
_AWAIT_ACK = "await-ack"
_TRANSCRIPT = "transcript"  # STT: ack received; upload relayed, text awaited
_LENGTH = "length"  # TTS: ack received; the 8-digit length awaited
_WAV = "wav"  # TTS: the WAV bytes


class Pvx1Producer(_Pvx1Session):
    """
    A PVX/1 node: pinged while idle; one job at a time, answered in PVX/1.
    """

    def __init__(self, connection: FarmConnection, keyId: str, accountId: str | None = None) -> None:
        super().__init__(connection, keyId, accountId)
        self.capability = self.aliases.capability()
        self._phase = _IDLE
        self._buffer = bytearray()
        self._pingTimer: IDelayedCall | None = None
        self._pongOwed = False
        self._upload: list[bytes] | None = None  # held until the node's ack
        self._wavRemaining = 0

    def __repr__(self) -> str:
        return f"<Pvx1Producer {self.keyId} {self.connection.service}>"

    # Liveness

    def _schedulePing(self) -> None:
        self._cancelPing()
        self._pingTimer = self.connection.farm.clock.callLater(
            self.settings.ping_interval, self._ping
        )

    def _ping(self) -> None:
        self.transport.write(PING)
        self._pongOwed = True
        self._pingTimer = self.connection.farm.clock.callLater(
            self.settings.ping_interval / 2, self._pongMissed
        )

    def _pongMissed(self) -> None:
        self._pingTimer = None
        self.drop("did not answer ping in time")

    def _cancelPing(self) -> None:
        if self._pingTimer is not None:
            if self._pingTimer.active():
                self._pingTimer.cancel()
            self._pingTimer = None

    def becameIdle(self) -> None:
        self._schedulePing()

    def _takePongs(self) -> bool:
        """
        Consume the C{pong}s at the head of the buffer. False: the buffer
        holds something else (or might, once more bytes come).
        """
        while self._buffer[:4] == PONG:
            del self._buffer[:4]
            if self._pongOwed:
                self._pongOwed = False
                if self.job is None:
                    self._schedulePing()
        return not self._buffer or PONG.startswith(bytes(self._buffer))

    # Jobs

    def startJob(self, job: Job) -> None:
        self._cancelPing()
        self.job = job
        self._phase = _AWAIT_ACK
        self._upload = []
        self._uploadBytes = 0
        self.transport.write(headerFor(job, self.aliases))

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None:
        # CNCL: PVX/1 cannot cancel. The node finishes, the farm discards its
        # answer, and cancel_grace drops a node that never does.
        pass

    def sendData(self, payload: bytes) -> None:
        if self._upload is None:
            self.transport.write(payload)
        else:
            self._uploadBytes += len(payload)
            if self._uploadBytes > self.settings.max_job_bytes:
                self.drop("held upload beyond max_job_bytes")
                return
            self._upload.append(payload)

    def jobDetached(self, job: Job, healthy: bool) -> None:
        from privox.farm.connection import Phase

        self.job = None
        self._phase = _IDLE
        self._upload = None
        self._cancelQuiet()
        if healthy and self.connection.phase is Phase.ACTIVE:
            self.connection.farm.producerIdle(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer and self.connection.session is self:
            phase = self._phase
            if phase == _IDLE:
                if not self._takePongs():
                    self._garbage("unexpected bytes while idle")
                return
            if phase == _AWAIT_ACK:
                if self._takePongs():
                    return  # nothing left, or the start of a pong
                head = bytes(self._buffer[:3])
                if head == ACK:
                    del self._buffer[:3]
                    self._acked()
                elif head == NAK:
                    del self._buffer[:3]
                    self._refused()
                elif len(head) < 3 and (ACK.startswith(head) or NAK.startswith(head)):
                    return
                else:
                    self._garbage("expected ack")
                    return
                continue
            if phase == _TRANSCRIPT:
                if len(self._buffer) >= TRANSCRIPT_CAP:
                    self._transcriptDone()
                    continue
                self._armQuiet(self._transcriptDone)
                return
            if phase == _LENGTH:
                if len(self._buffer) < LENGTH_DIGITS:
                    if not bytes(self._buffer).isdigit():
                        self._garbage("bad WAV length")
                    return
                digits = bytes(self._buffer[:LENGTH_DIGITS])
                del self._buffer[:LENGTH_DIGITS]
                if not digits.isdigit() or int(digits) > self.settings.max_job_bytes:
                    self._garbage("bad WAV length")
                    return
                self._wavRemaining = int(digits)
                self._phase = _WAV
                assert self.job is not None
                self.job.events.result(
                    {"content_type": "audio/wav", "size": self._wavRemaining}, self._wavRemaining
                )
                if self._wavRemaining == 0:
                    self._answerDone()
                continue
            if phase == _WAV:
                chunk = bytes(self._buffer[: self._wavRemaining])
                del self._buffer[: len(chunk)]
                self._wavRemaining -= len(chunk)
                step = self.settings.max_frame
                assert self.job is not None
                for start in range(0, len(chunk), step):
                    self.job.events.resultData(chunk[start : start + step])
                if self._wavRemaining == 0 and self.job is not None:
                    self._answerDone()
                continue
            return

    def _acked(self) -> None:
        assert self.job is not None
        upload, self._upload = self._upload or [], None
        if upload:
            self.transport.writeSequence(upload)
        self._phase = _TRANSCRIPT if self.job.request.service == "stt" else _LENGTH

    def _refused(self) -> None:
        assert self.job is not None
        self._phase = _IDLE
        self._upload = None
        self.job.events.producerFailed(
            {"error": ErrorCode.ENGINE_ERROR, "message": "the node refused the job"}
        )

    def _transcriptDone(self) -> None:
        self._quiet = None
        text = bytes(self._buffer[:TRANSCRIPT_CAP]).decode("utf-8", "replace")
        del self._buffer[:TRANSCRIPT_CAP]
        job = self.job
        assert job is not None
        job.events.result({"text": text}, 0)
        self._answerDone()

    def _answerDone(self) -> None:
        job = self.job
        assert job is not None
        self._phase = _IDLE
        job.events.resultComplete()

    def _garbage(self, why: str) -> None:
        self._buffer.clear()
        self.drop(f"PVX/1 node sent garbage: {why}")

    def drop(self, why: str) -> None:
        log.info("dropping PVX/1 producer {key_id}: {why}", key_id=self.keyId, why=why)
        self.connection.abort()

    def connectionLost(self) -> None:
        self._cancelPing()
        self._cancelQuiet()
        self.connection.farm.producerLeft(self)
        job, self.job = self.job, None
        if job is not None:
            job.events.producerLost()
