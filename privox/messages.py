"""
The PVX/2 control messages as small typed records, and the one place that
turns frame payloads into them (and back).

Control verbs carry one UTF-8 JSON object. A payload that is not such an
object is a L{ProtocolViolation} (the connection is closed); a well-formed
C{JOB_} whose fields are missing or wrong is a L{BadRequest} (only that job
fails).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

from privox.framing import Frame, encodeFrame
from privox.languages import UnknownLanguage, languageCode

PROTOCOL_VERSION = 2
GREETING = b"who"

ROLES = ("producer", "consumer")
SERVICES = ("stt", "tts")
AUDIO_FORMATS = ("wav", "pcm_s16le", "zip", "auto")
ANY = "*"
#: What a producer may offer beyond the plain job, and a job may need
#: (privox.farm.dispatcher.Capability): sealing (§5.7), translating (§5.1).
SEAL = "seal"
TRANSLATE = "translate"
#: Streaming jobs (§5.8): the upload's length is unknown, pieces of the
#: answer (PART) come back while it arrives.
STREAM = "stream"
#: Jobs sealed before their node is known (§5.7): a producer that takes
#: them opens an upload that came with the JOB_, sealed for its key.
EARLY_SEAL = "early_seal"
#: STT tasks: C{transcribe} (the default), C{translate} (to English).
TASKS = ("transcribe", TRANSLATE)
#: The longest text a TTS job may ask for, in characters.
MAX_TEXT = 5000
#: The longest prompt an STT job may carry, in characters.
MAX_PROMPT = 2000
#: Models named so are the exchange's own (its canary job, docs/protocol.rst
#: §5.2): no producer serves one, whatever it advertises.
RESERVED_MODELS = "privox:"
#: The speeds a TTS job may ask for (OpenAI's range; 1: the voice's own).
MIN_SPEED, MAX_SPEED = 0.25, 4.0
#: Characters no text to speak may hold: control characters other than tab
#: and line breaks (a NUL ends a string in the C code under the engines).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ErrorCode:
    """
    The C{error} values of C{FAIL} and C{DENY}.
    """

    PROTOCOL = "protocol"
    UNAUTHORIZED = "unauthorized"
    NO_PRODUCER = "no_producer"
    UNSUPPORTED_MODEL = "unsupported_model"
    TIMEOUT = "timeout"
    PRODUCER_LOST = "producer_lost"
    TOO_LARGE = "too_large"
    BAD_REQUEST = "bad_request"
    ENGINE_ERROR = "engine_error"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    #: Sealed content that did not open, or a node whose seal offer the
    #: consumer could not verify (docs/privacy.rst).
    SEAL_BROKEN = "seal_broken"

    ALL = frozenset(
        [
            PROTOCOL,
            UNAUTHORIZED,
            NO_PRODUCER,
            UNSUPPORTED_MODEL,
            TIMEOUT,
            PRODUCER_LOST,
            TOO_LARGE,
            BAD_REQUEST,
            ENGINE_ERROR,
            CANCELLED,
            SHUTTING_DOWN,
            SEAL_BROKEN,
        ]
    )


class ProtocolViolation(Exception):
    """
    The peer broke PVX/2; the connection must be closed after C{FAIL protocol}.
    """


class BadRequest(Exception):
    """
    A well-formed message whose content is unacceptable; only the job fails.
    """

    def __init__(self, message: str, code: str = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def controlFrame(verb: bytes, fields: dict[str, Any]) -> bytes:
    """
    Encode a control frame: C{fields} as compact UTF-8 JSON (a float that
    is not finite goes as C{null}: JSON has no NaN or Infinity).
    """
    return encodeFrame(verb, orjson.dumps(fields))


def decodeObject(frame: Frame) -> dict[str, Any]:
    """
    The JSON object a control frame carries.

    orjson, not json: a farm decodes and encodes four control frames per
    job, and json spent about 3.5 us on each (a twelfth of the farm's
    instructions per small job; bench/README.rst). It is also the stricter
    reader: only UTF-8, no NaN, Infinity or numbers beyond a double, no
    lone surrogates.

    @raise ProtocolViolation: the payload is not one UTF-8 JSON object.
    """
    if not frame.payload:
        if frame.verb in (b"PING", b"PONG"):
            return {}
        raise ProtocolViolation(f"{frame.verb.decode()} needs a JSON object")
    try:
        value = orjson.loads(frame.payload)
    except orjson.JSONDecodeError as e:
        if str(e).startswith("depth limit"):  # "[[[[..." a million deep
            raise ProtocolViolation(f"{frame.verb.decode()} payload is nested too deeply")
        raise ProtocolViolation(f"{frame.verb.decode()} payload is not valid JSON")
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{frame.verb.decode()} payload is not a JSON object")
    return value


def _string(obj: dict[str, Any], name: str, error: type[Exception], default: Any = ...) -> Any:
    value = obj.get(name, default)
    if value is ...:
        raise error(f"missing field {name!r}")
    if value is not default and not isinstance(value, str):
        raise error(f"field {name!r} must be a string")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False
    return True


def _stringList(obj: dict[str, Any], name: str, error: type[Exception]) -> tuple[str, ...]:
    value = obj.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise error(f"field {name!r} must be a list of strings")
    return tuple(value)


def _count(obj: dict[str, Any], name: str, error: type[Exception], default: Any = ...) -> int:
    value = obj.get(name, default)
    if value is ...:
        raise error(f"missing field {name!r}")
    # bool is an int in Python; in the protocol it is not a size.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"field {name!r} must be a non-negative integer")
    return value


def _advertised(languages: tuple[str, ...]) -> tuple[str, ...]:
    """
    A producer's languages as the codes jobs carry (C{en_US} -> C{en}), each
    once. One L{languageCode} does not know stays as given: a node may speak
    a language Whisper does not (a Coqui voice), and refusing the node, or
    dropping the name (an empty list means any), would be wrong.
    """
    codes = []
    for language in languages:
        try:
            codes.append(languageCode(language))
        except UnknownLanguage:
            codes.append(language)
    return tuple(dict.fromkeys(codes))


@dataclass(frozen=True)
class Hello:
    role: str
    service: str
    key: str
    models: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    #: A producer's offer to seal (privox.identity.ConnectionOffer's
    #: fields), passed on to its consumers with ASGN; the farm only checks
    #: its shape.
    seal: dict[str, str] | None = None
    #: The STT tasks a producer does beyond transcribing (C{translate}).
    tasks: tuple[str, ...] = ()
    #: A producer that takes streaming jobs (§5.8).
    stream: bool = False
    #: A sealing producer that also opens uploads sealed before its job
    #: was assigned (§5.7).
    earlySeal: bool = False

    @property
    def features(self) -> frozenset[str]:
        """
        What this producer offers jobs that need more than the plain job.
        """
        return (
            frozenset(self.tasks)
            | ({SEAL} if self.seal is not None else frozenset())
            | ({STREAM} if self.stream else frozenset())
            | ({EARLY_SEAL} if self.earlySeal else frozenset())
        )

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Hello:
        """
        @raise ProtocolViolation: not a PVX/2 HELO.
        @raise BadRequest: a PVX/2 HELO with a bad role or service (answered
            with C{DENY bad_request}).
        """
        if obj.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolViolation(
                f"unsupported protocol version {obj.get('protocol')!r}; this farm speaks 2"
            )
        role = obj.get("role")
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}")
        service = obj.get("service")
        if service not in SERVICES:
            raise BadRequest(f"service must be one of {', '.join(SERVICES)}")
        key = _string(obj, "key", BadRequest, default="")
        if not key.isascii() and not _encodable(key):
            raise BadRequest("key must be text (UTF-8)")
        models = _stringList(obj, "models", BadRequest)
        languages = _advertised(_stringList(obj, "languages", BadRequest))
        if role == "producer" and not models:
            raise BadRequest("a producer must list the models it serves (or [\"*\"])")
        seal = _sealOffer(obj.get("seal")) if role == "producer" else None
        tasks = tuple(t for t in _stringList(obj, "tasks", BadRequest) if t in TASKS[1:])
        stream = role == "producer" and obj.get("stream") is True
        earlySeal = seal is not None and obj.get(EARLY_SEAL) is True
        return cls(role, service, key, models, languages, seal, tasks, stream, earlySeal)

    def payload(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "role": self.role,
            "service": self.service,
            "key": self.key,
        }
        if self.role == "producer":
            fields["models"] = list(self.models)
            fields["languages"] = list(self.languages)
            if self.seal is not None:
                fields["seal"] = self.seal
            if self.tasks:
                fields["tasks"] = list(self.tasks)
            if self.stream:
                fields["stream"] = True
            if self.earlySeal:
                fields[EARLY_SEAL] = True
        return fields


#: The longest field of a seal offer (a certificate is about 300 bytes).
MAX_SEAL_FIELD = 1024
_SEAL_OFFER = ("certificate", "key", "signature")


def _sealOffer(value: Any) -> dict[str, str] | None:
    """
    A producer's seal offer, if its shape is right: what it proves is for
    consumers to check (the farm holds no exchange key, and must not be
    trusted to).

    @raise BadRequest: a malformed offer.
    """
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not set(_SEAL_OFFER) <= set(value) <= set(_SEAL_OFFER) | {"farm"}
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_SEAL_FIELD for v in value.values())
    ):
        raise BadRequest(
            "seal must be an object of certificate, key and signature strings (and a farm's)"
        )
    return {k: value[k] for k in (*_SEAL_OFFER, "farm") if k in value}


def _jobSeal(value: Any) -> dict[str, str] | None:
    """
    A consumer's seal for its job: its ephemeral key (privox.sealing), and
    C{for}, the connection key of the node its early upload is sealed for.

    @raise BadRequest: a malformed one.
    """
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not {"ephemeral"} <= set(value) <= {"ephemeral", "for"}
        or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in value.values())
    ):
        raise BadRequest("seal must be an object with an ephemeral key (and the key it is for)")
    return {k: value[k] for k in ("ephemeral", "for") if k in value}


@dataclass(frozen=True)
class Okay:
    farm: str
    ping_interval: float
    max_frame: int
    max_job_bytes: int
    #: The largest upload a consumer may send right after its C{JOB_},
    #: without waiting for C{ASGN} (0, or absent: always wait).
    early_upload: int = 0
    #: Streaming jobs (§5.8): the longest a stream may last, and the longest
    #: gap between two pieces of its upload, in seconds; L{None}: the farm
    #: takes no streaming job.
    stream: StreamLimits | None = None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Okay:
        try:
            stream = obj.get("stream")
            return cls(
                str(obj["farm"]),
                float(obj["ping_interval"]),
                int(obj["max_frame"]),
                int(obj["max_job_bytes"]),
                max(0, int(obj.get("early_upload", 0))),
                StreamLimits(float(stream["max_s"]), float(stream["idle_s"]))
                if isinstance(stream, dict)
                else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolViolation(f"bad OKAY: {e}")

    def payload(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "farm": self.farm,
            "ping_interval": self.ping_interval,
            "max_frame": self.max_frame,
            "max_job_bytes": self.max_job_bytes,
            "early_upload": self.early_upload,
            **({"stream": {"max_s": self.stream.max_s, "idle_s": self.stream.idle_s}}
               if self.stream is not None else {}),
        }


@dataclass(frozen=True)
class StreamLimits:
    max_s: float
    idle_s: float


@dataclass(frozen=True)
class JobRequest:
    """
    A consumer's C{JOB_}: what it wants done. The farm forwards it to the
    producer with the farm's job id added and nothing about the consumer.
    """

    service: str
    model: str
    language: str | None
    size: int
    format: str = "auto"
    voice: str | None = None
    text: str | None = None
    timeout_s: float | None = None
    #: The consumer sends the upload right after C{JOB_}, not after C{ASGN}
    #: (§5.3, OKAY's C{early_upload}). Not forwarded to the producer.
    early: bool = False
    #: Sealed end to end (§5.7): the consumer's ephemeral key. The content
    #: (the text too) is then in the upload, and only producers that offered
    #: to seal may take the job.
    seal: dict[str, str] | None = None
    #: STT: C{transcribe} (None: the default) or C{translate} (to English).
    task: str | None = None
    #: STT: text that goes before the audio (names, spellings: Whisper's
    #: initial prompt), and the sampling temperature, 0 to 1.
    prompt: str | None = None
    temperature: float | None = None
    #: A streaming job (§5.8): the upload goes on until an empty DATA,
    #: pieces of the answer (PART) come back meanwhile.
    stream: bool = False
    #: STT: time each word of the transcript (RSLT segments' C{words},
    #: §6.2). Travels in the clear, sealed or not; producers that do not
    #: know it give no words.
    words: bool = False
    #: TTS: how fast to speak, L{MIN_SPEED} to L{MAX_SPEED} (None: 1).
    #: Travels in the clear; a producer whose engine paces its speech says
    #: so in RSLT's C{speed}, the others ignore it (§5.1).
    speed: float | None = None

    @property
    def sealed(self) -> bool:
        return self.seal is not None

    @property
    def sealedFor(self) -> str | None:
        """
        The connection key of the node an early upload is sealed for
        (§5.7), if it is.
        """
        return self.seal.get("for") if self.seal is not None else None

    def untargeted(self) -> JobRequest:
        """
        This job for any sealing node: its early upload, sealed for another,
        is not the one the node gets.
        """
        assert self.seal is not None
        return replace(self, early=False, seal={"ephemeral": self.seal["ephemeral"]})

    @property
    def needs(self) -> frozenset[str]:
        """
        What the producer must offer beyond the plain job.
        """
        needs = {SEAL} if self.seal is not None else set()
        if self.task == TRANSLATE:
            needs.add(TRANSLATE)
        if self.stream:
            needs.add(STREAM)
        return frozenset(needs)

    @classmethod
    def parse(cls, service: str, obj: dict[str, Any]) -> JobRequest:
        """
        C{language}, a name or code, becomes its code (L{languageCode}).

        @raise BadRequest: a required field is missing or has the wrong type,
            or the language is unknown.
        """
        model = _string(obj, "model", BadRequest)
        if not model:
            raise BadRequest("field 'model' must not be empty")
        language = _string(obj, "language", BadRequest, default=None)
        if language is not None:
            try:
                language = languageCode(language)
            except UnknownLanguage as e:
                raise BadRequest(str(e)) from None
        size = _count(obj, "size", BadRequest)
        seal = _jobSeal(obj.get("seal"))
        if seal is not None and "for" in seal and obj.get("early") is not True:
            raise BadRequest("a job sealed for a node's key carries its upload early")
        stream = obj.get("stream") is True
        if stream and (size != 0 or obj.get("early") is True):
            raise BadRequest("a streaming job's upload has no size: size must be 0, not early")
        timeout = obj.get("timeout_s")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or timeout <= 0
        ):
            raise BadRequest("field 'timeout_s' must be a positive number")
        if service == "stt":
            fmt = _string(obj, "format", BadRequest, default="auto")
            if fmt not in AUDIO_FORMATS:
                raise BadRequest(f"format must be one of {', '.join(AUDIO_FORMATS)}")
            if size == 0 and not stream:
                raise BadRequest("an STT job needs audio: size must be > 0")
            if stream and fmt == "zip":
                raise BadRequest("a stream's audio is wav or pcm_s16le, not zip")
            task = _string(obj, "task", BadRequest, default=None)
            if task is not None and task not in TASKS:
                raise BadRequest(f"task must be one of {', '.join(TASKS)}")
            prompt = _string(obj, "prompt", BadRequest, default=None)
            if prompt is not None and len(prompt) > MAX_PROMPT:
                raise BadRequest(f"field 'prompt' is longer than {MAX_PROMPT} characters")
            temperature = obj.get("temperature")
            if temperature is not None and not (
                isinstance(temperature, (int, float))
                and not isinstance(temperature, bool)
                and 0 <= temperature <= 1
            ):
                raise BadRequest("field 'temperature' must be a number from 0 to 1")
            words = obj.get("words")
            if words is not None and not isinstance(words, bool):
                raise BadRequest("field 'words' must be true or false")
            return cls(service, model, language, size, fmt, timeout_s=timeout,
                       early=obj.get("early") is True, seal=seal,
                       task=None if task == "transcribe" else task,
                       prompt=prompt, temperature=temperature, stream=stream,
                       words=words is True)
        voice = _string(obj, "voice", BadRequest, default=None)
        speed = parseSpeed(obj.get("speed"), BadRequest)
        if stream and speed is not None:
            # Its sentences are spoken as they come: no one pace to stretch.
            raise BadRequest("a streaming TTS job has no speed")
        if stream:
            # The text may come in pieces, in the upload (sealed: all of it).
            text = None if seal is not None else _string(obj, "text", BadRequest, default=None)
            if text is not None and CONTROL_CHARACTERS.search(text):
                raise BadRequest("field 'text' contains control characters")
            return cls(service, model, language, 0, "auto", voice, text, timeout,
                       seal=seal, stream=True)
        if seal is not None:
            # The text is in the sealed upload.
            if size == 0:
                raise BadRequest("a sealed TTS job carries its text in the upload: size must be > 0")
            return cls(service, model, language, size, "auto", voice, None, timeout,
                       early=obj.get("early") is True, seal=seal, speed=speed)
        text = _string(obj, "text", BadRequest)
        if not text.strip():
            raise BadRequest("field 'text' must not be empty")
        if CONTROL_CHARACTERS.search(text):
            raise BadRequest("field 'text' contains control characters")
        if size != 0:
            raise BadRequest("a TTS job carries its text in JOB_: size must be 0")
        return cls(service, model, language, 0, "auto", voice, text, timeout, speed=speed)

    def payload(self, jobId: str | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if jobId is not None:
            fields["id"] = jobId
        fields["model"] = self.model
        fields["language"] = self.language
        fields["size"] = self.size
        if self.service == "stt":
            fields["format"] = self.format
            if self.task is not None:
                fields["task"] = self.task
            if self.prompt is not None:
                fields["prompt"] = self.prompt
            if self.temperature is not None:
                fields["temperature"] = self.temperature
            if self.words:
                fields["words"] = True
        else:
            if self.text is not None:
                fields["text"] = self.text
            fields["voice"] = self.voice
            if self.speed is not None:
                fields["speed"] = self.speed
        if self.timeout_s is not None:
            fields["timeout_s"] = self.timeout_s
        if self.seal is not None:
            fields["seal"] = self.seal
        if self.stream:
            fields["stream"] = True
        if self.early and jobId is None:
            fields["early"] = True
        return fields


def parseSpeed(value: Any, error: type[Exception]) -> float | None:
    """
    A TTS C{speed} field: None where absent or null.

    @raise error: not a number from L{MIN_SPEED} to L{MAX_SPEED}.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not MIN_SPEED <= value <= MAX_SPEED
    ):
        raise error(f"speed must be a number from {MIN_SPEED:g} to {MAX_SPEED:g}")
    return float(value)


def failPayload(jobId: str | None, error: str, message: str) -> dict[str, Any]:
    return {"id": jobId, "error": error, "message": message}


def earlyUpload(obj: dict[str, Any], limit: int) -> int:
    """
    How many upload bytes follow this C{JOB_} at once, before C{ASGN}: its
    C{size} when it says C{"early":true}, else 0. C{limit} is the farm's
    C{early_upload} (OKAY). Only C{early} and C{size} count, so the farm
    knows what is owed even for a C{JOB_} it refuses; those bytes are then
    discarded as they come.

    @raise ProtocolViolation: an early upload that is not a count from 1
        to C{limit}.
    """
    if obj.get("early") is not True:
        return 0
    size = obj.get("size")
    if type(size) is not int or not 0 < size <= limit:
        raise ProtocolViolation(f"an early upload must be 1 to {limit} bytes (early_upload)")
    return size


def resultSize(obj: dict[str, Any]) -> int:
    """
    How many bytes of C{DATA} follow a C{RSLT}.

    @raise ProtocolViolation: C{size} is present but not a count.
    """
    return _count(obj, "size", ProtocolViolation, default=0)
