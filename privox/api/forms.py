"""
What clients send, read into small typed records: the one place that looks
at request bodies and headers, and says precisely what is wrong with them.

Every parser here raises an L{ApiError} subclass, never anything else:

  - L{TooLarge} (413): the body is over the cap -- judged from
    C{Content-Length} (or from what L{privox.api.app.LimitedRequest} saw
    arrive) before the body is looked at, then from its actual size;
  - L{BadInput} (400): a malformed body, a missing or empty field, text that
    is not UTF-8, an empty file;
  - L{Unauthorized} (401): no key (unless anonymous use is on), or one the
    API's L{Access} refuses (checked before the other fields, so a caller
    without a good key learns nothing about them);
  - L{Unprocessable} (422): a language, C{response_format} or other choice this
    API does not offer.

The key comes from an C{Authorization: Bearer KEY} header or, without one,
the C{key} field, on every route. A key in the header is checked before the
body is parsed at all; one in a field (the original clients send it after
the file) once the body is. It never goes into a message or a C{repr}.

Bodies are multipart/form-data or application/x-www-form-urlencoded (the
original routes and OpenAI's transcriptions), or JSON (OpenAI's speech).
twisted.web has already buffered the body (to a temporary file when large),
within its route's limit (L{privox.api.site}). Multipart is read from it
with C{multipart}'s push parser, in chunks, so a 200 MB upload costs one
pass and one copy; a body over L{INLINE_PARSE} bytes is parsed in a thread,
never on the reactor's. A form has at most L{MAX_FIELDS} fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import IO, Any, Iterator
from urllib.parse import unquote_to_bytes

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from twisted.web.iweb import IRequest

from privox.api.access import Access, Caller
from privox.api.errors import BadInput, TooLarge, Unprocessable, tooLarge
from privox.api.site import limitName
from privox.api.speech import CONTENT_TYPES, DEFAULT_FORMAT
from privox.audiofile import sniff
from privox.languages import ANY, UnknownLanguage, languageCode
from privox.messages import CONTROL_CHARACTERS, MAX_PROMPT, MAX_TEXT, parseSpeed

#: The original API's default quality and language.
DEFAULT_QUALITY = "fast"
DEFAULT_LANGUAGE = "en"

#: OpenAI's transcription formats; the default is C{json}.
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")

#: OpenAI's C{timestamp_granularities[]}: what C{verbose_json} times.
GRANULARITIES = ("segment", "word")

#: OpenAI's speech formats, each encoded as asked (L{privox.api.speech}).
SPEECH_FORMATS = tuple(CONTENT_TYPES)

_TRUE = ("1", "true", "yes", "on")
# Over the API's malloc mmap threshold (privox.memory): each read is a
# mapping of its own, returned when freed. Smaller reads would pile up in a
# heap that a 100 MB upload grows and nothing shrinks (tests/test_attack).
_CHUNK = 1024 * 1024

#: Bodies up to this size are parsed on the reactor thread; larger ones in a thread.
INLINE_PARSE = 64 * 1024
#: The most fields (multipart parts or urlencoded pairs) a form may have.
MAX_FIELDS = 64


@dataclass(frozen=True)
class Upload:
    """
    An uploaded audio file.

    @ivar format: the PVX/2 C{format} to send it as: C{wav} (RIFF), C{zip}
        (PK) or C{auto} (let the node decode whatever container it is).
    """

    data: bytes = field(repr=False)
    filename: str | None
    format: str

    def __repr__(self) -> str:
        return f"Upload({len(self.data)} bytes, format={self.format!r})"


@dataclass(frozen=True)
class SttForm:
    """
    C{POST /stt}: the original fields.
    """

    caller: Caller
    audio: Upload
    quality: str = DEFAULT_QUALITY
    language: str = DEFAULT_LANGUAGE
    #: The original's flag for browser audio; nodes decode any container.
    xlate: bool = False


@dataclass(frozen=True)
class TtsForm:
    """
    C{POST /tts}.
    """

    caller: Caller
    text: str = field(repr=False)
    voice: str | None = None
    language: str | None = None


@dataclass(frozen=True)
class TranscriptionForm:
    """
    C{POST /v1/audio/transcriptions} and C{/v1/audio/translations}
    (OpenAI). C{prompt}, C{temperature} and a C{word} granularity go to the
    engine; other fields are accepted and ignored.
    """

    caller: Caller
    audio: Upload
    model: str | None = None
    language: str | None = None
    responseFormat: str = "json"
    prompt: str | None = None
    temperature: float | None = None
    #: Server-sent events as the transcript is heard (OpenAI's C{stream}).
    stream: bool = False
    #: OpenAI's C{timestamp_granularities[]} (L{GRANULARITIES}), each once,
    #: in order; only with C{verbose_json}. Empty: segments, as asked for
    #: C{segment} alone.
    granularities: tuple[str, ...] = ()

    @property
    def words(self) -> bool:
        """
        Whether C{verbose_json} times each word (the job asks for them).
        """
        return "word" in self.granularities

    @property
    def segments(self) -> bool:
        """
        Whether C{verbose_json} has its C{segments}: unless only words were
        asked for, as OpenAI answers.
        """
        return not self.granularities or "segment" in self.granularities


@dataclass(frozen=True)
class SpeechForm:
    """
    C{POST /v1/audio/speech} (OpenAI), a JSON body. C{responseFormat} is
    one of L{SPEECH_FORMATS} (OpenAI's default: mp3); C{speed} from 0.25 to
    4. C{instructions} is accepted and ignored.
    """

    caller: Caller
    text: str = field(repr=False)
    model: str | None = None
    voice: str | None = None
    responseFormat: str = DEFAULT_FORMAT
    speed: float = 1.0
    #: C{audio}: the audio itself, in chunks as it is spoken; C{sse}:
    #: server-sent events (OpenAI's C{stream_format}).
    streamFormat: str = "audio"


@dataclass
class Fields:
    """
    A parsed form: each name's values as raw bytes, in order, with the file
    name a multipart part gave (or L{None}).
    """

    values: dict[str, list[tuple[bytes, str | None]]] = field(default_factory=dict)

    def add(self, name: str, value: bytes, filename: str | None = None) -> None:
        self.values.setdefault(name, []).append((value, filename))

    def raw(self, name: str) -> tuple[bytes, str | None] | None:
        found = self.values.get(name)
        return found[0] if found else None

    def text(self, name: str) -> str | None:
        """
        The first value of C{name} as text, stripped; L{None} if absent or
        blank.

        @raise BadInput: it is not UTF-8.
        """
        found = self.raw(name)
        if found is None:
            return None
        return decodeText(found[0], name).strip() or None

    def texts(self, name: str) -> list[str]:
        """
        Every value of a repeated field (C{name[]=a&name[]=b}, as OpenAI's
        SDK sends a list), as text, stripped, in order; blank ones left out.

        @raise BadInput: one is not UTF-8.
        """
        found = (decodeText(value, name).strip() for value, _ in self.values.get(name, ()))
        return [value for value in found if value]


def decodeText(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{name} is not UTF-8 text") from None


def sniffFormat(data: bytes) -> str:
    """
    The PVX/2 C{format} for an upload, from its first bytes
    (L{privox.audiofile.sniff}; anything else goes as C{auto}, for the node
    to decode with FFmpeg).
    """
    kind = sniff(data)
    return "auto" if kind == "container" else kind


def bodySize(request: IRequest, maxUpload: int) -> int:
    """
    The size of the request body, once it is known to be within the cap.
    (L{privox.api.site} refuses larger bodies as they arrive; this is the
    same rule for requests that did not come through it.)

    @raise TooLarge: the body is over C{maxUpload} bytes.
    """
    declared = request.getHeader(b"content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            length = 0  # twisted.web has already refused a malformed one
        if length > maxUpload:
            raise tooLarge(length, maxUpload, limitName(request.path))
    content = request.content
    content.seek(0, 2)
    size = content.tell()
    content.seek(0, 0)
    if size > maxUpload:
        raise tooLarge(size, maxUpload, limitName(request.path))
    return size


def readForm(request: IRequest, size: int) -> Fields:
    """
    Parse a multipart/form-data or application/x-www-form-urlencoded body.

    @raise BadInput: another content type, or a malformed body.
    """
    contentType = _header(request, b"content-type")
    kind, options = parse_options_header(contentType) if contentType else ("", {})
    if kind == "multipart/form-data":
        boundary = options.get("boundary")
        if not boundary:
            raise BadInput("malformed multipart body: no boundary in Content-Type")
        return _readMultipart(request.content, boundary, size)
    if kind == "application/x-www-form-urlencoded":
        return _readUrlencoded(request.content.read())
    if size == 0:
        return Fields()
    raise BadInput(
        "send the fields as multipart/form-data or application/x-www-form-urlencoded"
    )


def _readMultipart(content: IO[bytes], boundary: str, size: int) -> Fields:
    fields = Fields()
    parser = PushMultipartParser(
        boundary, content_length=size, max_header_count=16, max_segment_count=MAX_FIELDS
    )
    segment: MultipartSegment | None = None
    chunks: list[bytes] = []
    try:
        with parser:
            for event in _events(parser, content):
                if isinstance(event, MultipartSegment):
                    segment, chunks = event, []
                elif event:
                    chunks.append(event)
                elif segment is not None:
                    fields.add(segment.name, b"".join(chunks), segment.filename)
                    segment, chunks = None, []
    except MultipartError as e:
        raise BadInput(f"malformed multipart body: {e}") from None
    return fields


def _events(parser: PushMultipartParser, content: IO[bytes]) -> Iterator[Any]:
    while chunk := content.read(_CHUNK):
        yield from parser.parse(chunk)
    yield from parser.parse(b"")


def _readUrlencoded(body: bytes) -> Fields:
    fields = Fields()
    pairs = body.split(b"&", MAX_FIELDS)
    if len(pairs) > MAX_FIELDS and any(pairs[MAX_FIELDS:]):
        raise BadInput(f"malformed form: more than {MAX_FIELDS} fields")
    for pair in pairs[:MAX_FIELDS]:
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        fields.add(
            unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace"),
            unquote_to_bytes(value.replace(b"+", b" ")),
        )
    return fields


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def findKey(request: IRequest, fields: Fields | None = None) -> str | None:
    """
    The key: C{Authorization: Bearer KEY} if the request has one, else the
    C{key} field (when C{fields} are given); L{None} if neither is given (or
    the key is blank).
    """
    authorization = _header(request, b"authorization") or ""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = fields.text("key") if fields is not None else None
    return key or None


async def authorize(request: IRequest, access: Access, fields: Fields | None = None) -> Caller:
    """
    Who is calling (see L{findKey}), once C{access} lets them.

    @raise privox.api.errors.Unauthorized: C{access} refuses them.
    """
    return await access.authorize(findKey(request, fields))


async def _callerAndFields(
    request: IRequest, limit: int, access: Access, runInThread: Any
) -> tuple[Caller, Fields]:
    """
    The form's fields and who sent them: a key in the headers is checked
    before the body is parsed, so a caller with a bad one costs no parsing;
    a large body is parsed in a thread.
    """
    size = bodySize(request, limit)
    bearer = findKey(request)
    caller = await access.authorize(bearer) if bearer is not None else None
    if size > INLINE_PARSE:
        fields = await runInThread(readForm, request, size)
    else:
        fields = readForm(request, size)
    if caller is None:
        caller = await authorize(request, access, fields)
    return caller, fields


def _speakable(text: str | None, name: str) -> str | None:
    if text is not None and CONTROL_CHARACTERS.search(text):
        raise BadInput(f"{name} contains control characters")
    if text is not None and len(text) > MAX_TEXT:
        raise TooLarge(f"{name} is {len(text)} characters; at most {MAX_TEXT} are spoken")
    return text


def _language(value: str | None) -> str | None:
    """
    The code for a language given by name or code (C{English}, C{en-US}:
    C{en}; see L{languageCode}), or L{None}.

    @raise Unprocessable: a language Whisper does not know, or C{*}.
    """
    if value is None:
        return None
    try:
        code = languageCode(value)
    except UnknownLanguage as e:
        raise Unprocessable(str(e)) from None
    if code == ANY:
        # PVX/2's "any" is for producers; engines take no job in it.
        raise Unprocessable("give a language name or code, such as English or en, or none")
    return code


def _upload(fields: Fields) -> Upload:
    found = fields.raw("file")
    if found is None:
        raise BadInput("the file field is required")
    data, filename = found
    if not data:
        raise BadInput("the uploaded file is empty")
    return Upload(data, filename, sniffFormat(data))


async def sttForm(request: IRequest, limit: int, access: Access, runInThread: Any) -> SttForm:
    """
    C{POST /stt}: C{file} and C{key} required; C{quality} (default
    C{fast}), C{language} (default C{en}), C{xlate}.
    """
    caller, fields = await _callerAndFields(request, limit, access, runInThread)
    audio = _upload(fields)
    xlate = (fields.text("xlate") or "").lower() in _TRUE
    return SttForm(
        caller,
        audio,
        fields.text("quality") or DEFAULT_QUALITY,
        _language(fields.text("language")) or DEFAULT_LANGUAGE,
        xlate,
    )


async def ttsForm(request: IRequest, limit: int, access: Access, runInThread: Any) -> TtsForm:
    """
    C{POST /tts}: C{key} and C{text} required; C{voice}, C{language}.
    """
    caller, fields = await _callerAndFields(request, limit, access, runInThread)
    text = _speakable(fields.text("text"), "text")
    if text is None:
        raise BadInput("the text field is required and must not be blank")
    return TtsForm(caller, text, fields.text("voice"), _language(fields.text("language")))


async def transcriptionForm(
    request: IRequest, limit: int, access: Access, runInThread: Any
) -> TranscriptionForm:
    """
    C{POST /v1/audio/transcriptions}: multipart C{file}; C{model},
    C{language}, C{response_format} (default C{json}).
    """
    caller, fields = await _callerAndFields(request, limit, access, runInThread)
    audio = _upload(fields)
    responseFormat = fields.text("response_format") or "json"
    if responseFormat not in TRANSCRIPTION_FORMATS:
        raise Unprocessable(
            f"response_format {responseFormat!r} is unknown; "
            f"use one of {', '.join(TRANSCRIPTION_FORMATS)}"
        )
    prompt = _speakable(fields.text("prompt"), "prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT:
        raise TooLarge(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT} are taken")
    temperature = None
    if fields.text("temperature"):
        try:
            temperature = float(fields.text("temperature") or "")
        except ValueError:
            temperature = math.nan
        if not 0 <= temperature <= 1:
            raise BadInput("temperature must be a number from 0 to 1")
    stream = (fields.text("stream") or "false").strip().lower()
    if stream not in ("true", "false", "1", "0"):
        raise BadInput("stream must be true or false")
    granularities = _granularities(fields, responseFormat)
    if "word" in granularities and stream in ("true", "1"):
        raise BadInput("timestamp_granularities[] word cannot be streamed: ask without stream")
    return TranscriptionForm(
        caller, audio, fields.text("model"), _language(fields.text("language")), responseFormat,
        prompt, temperature, stream in ("true", "1"), granularities,
    )


def _granularities(fields: Fields, responseFormat: str) -> tuple[str, ...]:
    """
    OpenAI's C{timestamp_granularities[]}, repeated as its SDK sends a list
    (or without the brackets, as a C{curl -F} may), each once.

    @raise BadInput: an unknown one, or any with a C{response_format}
        other than C{verbose_json} (OpenAI's rule).
    """
    given = fields.texts("timestamp_granularities[]") + fields.texts("timestamp_granularities")
    for value in given:
        if value not in GRANULARITIES:
            raise BadInput(
                f"timestamp_granularities[] {value[:40]!r} is unknown; use segment or word"
            )
    if given and responseFormat != "verbose_json":
        raise BadInput(
            "timestamp_granularities[] is only supported with response_format verbose_json,"
            f" not {responseFormat}"
        )
    return tuple(dict.fromkeys(given))


async def speechForm(request: IRequest, limit: int, access: Access) -> SpeechForm:
    """
    C{POST /v1/audio/speech}: a JSON object with C{input} required; C{model},
    C{voice}, C{response_format} (see L{SPEECH_FORMATS}). The body is at
    most L{privox.api.site.FORM_LIMIT} bytes: parsed where it is.
    """
    size = bodySize(request, limit)
    caller = await authorize(request, access)
    body = request.content.read() if size else b""
    try:
        decoded = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("the body is not UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deeply
        raise BadInput("the body must be a JSON object") from None
    if not isinstance(decoded, dict):
        raise BadInput("the body must be a JSON object")

    def string(name: str) -> str | None:
        value = decoded.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadInput(f"{name} must be a string")
        return value.strip() or None

    text = _speakable(string("input"), "input")
    if text is None:
        raise BadInput("input is required and must not be blank")
    responseFormat = string("response_format") or DEFAULT_FORMAT
    if responseFormat not in SPEECH_FORMATS:
        raise Unprocessable(
            f"response_format {responseFormat!r} is unknown; ask for one of"
            f" {', '.join(SPEECH_FORMATS)}"
        )
    speed = parseSpeed(decoded.get("speed"), BadInput) or 1.0
    streamFormat = string("stream_format") or "audio"
    if streamFormat not in ("audio", "sse"):
        raise BadInput("stream_format must be audio or sse")
    return SpeechForm(
        caller, text, string("model"), string("voice"), responseFormat, speed,
        streamFormat,
    )


def wantsJson(request: IRequest) -> bool:
    """
    Whether C{Accept} names C{application/json}.
    """
    accept = _header(request, b"accept") or ""
    return any(
        part.split(";", 1)[0].strip().lower() == "application/json" for part in accept.split(",")
    )
