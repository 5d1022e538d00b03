"""
The HTTP layer of the API: every route, field and error status, through
C{treq.testing.StubTreq}, with the farm side stubbed by an in-test
L{Exchange}; the upload cap as bodies arrive, over a real L{ApiSite}; and
C{twistd privox-api}'s options and service tree.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import runpy
import tomllib
from typing import Any
from urllib.parse import quote_from_bytes

import av
from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from privox.api import forms
from privox.api.access import Caller, PolicyAccess
from privox.api.app import PrivoxAPI
from privox.api.site import FORM_LIMIT, LINGER_IDLE, ApiRequest, ApiSite
from privox.api.errors import (
    ApiError,
    BadInput,
    NoProducer,
    TimedOut,
    TooLarge,
    Unavailable,
    Unprocessable,
)
from privox.api.exchange import Heard, Spoken, TimedText, TimedWord, Transcribed
from privox.api.farms import FarmExchange
from privox.api.measure import spokenSeconds
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.api.service import (
    AccountsService,
    ApiSettings,
    ExchangeService,
    Options,
    TrackedFactory,
    buildApi,
    makeService,
)
from privox.config import optionName
from privox.keys import AllowListPolicy, OpenPolicy, keyId
from privox.wav import pcmToWav, wavPCM
from tests.audiofixtures import encoded, tone, withFmt, zipped

ETC = FilePath(__file__).parent().parent().child("etc")

#: A tenth of a second of silence (uploads are measured: they must be real audio).
WAV = pcmToWav(bytes(3200), 16000)
SPOKEN = pcmToWav(b"spoken" * 100, 16000)
#: A second of 440 Hz at 16 kHz, 16-bit.
TONE = b"".join(
    int(8000 * math.sin(2 * math.pi * 440 * n / 16000)).to_bytes(2, "little", signed=True)
    for n in range(16000)
)
KEY = "good-key"
MODELS = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES)


class FakeExchange:
    """
    The farm side, stubbed: records each call, answers with canned results,
    or raises C{error}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.error: Exception | None = None
        self.text = "hello world"
        self.language: str | None = "en"
        self.segments: tuple[TimedText, ...] = ()
        self.words = False
        self.speech = SPOKEN
        self.paces = False
        self.speeds: list[float] = []
        self.deadlines: list[float] = []

    async def transcribe(
        self, model: str, language: str | None, audio: bytes, format: str, deadline: float,
        task: str | None = None, prompt: str | None = None, temperature: float | None = None,
        words: bool = False,
    ) -> Transcribed:
        self.options = (prompt, temperature)
        self.words = words
        if task is not None:
            self.calls.append(("translate", model, language, audio, format))
        else:
            self.calls.append(("transcribe", model, language, audio, format))
        self.deadlines.append(deadline)
        if self.error is not None:
            raise self.error
        return Transcribed(self.text, model, self.language or language, 2.5, self.segments)

    async def synthesize(
        self, model: str, language: str | None, voice: str | None, text: str, deadline: float,
        speed: float = 1.0,
    ) -> Spoken:
        self.calls.append(("synthesize", model, language, voice, text))
        self.deadlines.append(deadline)
        self.speeds.append(speed)
        if self.error is not None:
            raise self.error
        if self.paces:
            # A producer whose engine paces its speech (Piper), up to twice
            # as fast: the speech at that speed, and it says so.
            paced = min(speed, 2.0)
            pcm, rate = wavPCM(self.speech)
            slowed = pcm * math.ceil(1 / paced)
            return Spoken(pcmToWav(slowed[: int(len(pcm) / paced) // 2 * 2], rate), paced)
        return Spoken(self.speech)

    def transcribeLive(self, model, language, deadline, heard):
        exchange = self

        class Live:
            def __init__(self) -> None:
                self.audio = bytearray()
                self.done = Deferred()

            def write(self, pcm: bytes) -> None:
                self.audio += pcm

            def end(self) -> None:
                exchange.calls.append(("transcribeLive", model, language, bytes(self.audio), "pcm"))
                exchange.deadlines.append(deadline)
                if exchange.error is not None:
                    self.done.errback(exchange.error)
                    return
                for segment in exchange.segments or (TimedText(0, 1, exchange.text),):
                    heard(Heard(segment.text, True, segment.start, segment.end))
                self.done.callback(Transcribed(
                    exchange.text, model, exchange.language or language,
                    len(self.audio) / 32000, exchange.segments,
                ))

            def cancel(self) -> None:
                pass

        return Live()

    def synthesizeLive(self, model, language, voice, deadline, spoken):
        exchange = self

        class Live:
            def __init__(self) -> None:
                self.text = ""
                self.done = Deferred()

            def write(self, text: str) -> None:
                self.text += text

            def end(self) -> None:
                exchange.calls.append(("synthesize", model, language, voice, self.text))
                exchange.deadlines.append(deadline)
                if exchange.error is not None:
                    self.done.errback(exchange.error)
                    return
                pcm, rate = wavPCM(exchange.speech)
                spoken(pcm, rate)
                self.done.callback(len(pcm) / 2 / rate)

            def cancel(self) -> None:
                pass

        return Live()

    def health(self) -> dict[str, Any]:
        return {"farms": [{"name": "alpha", "services": ["stt", "tts"], "up": True}]}


def multipart(
    fields: dict[str, str | bytes | list[str]], files: dict[str, tuple[str, bytes]] | None = None
) -> tuple[bytes, str]:
    """
    A multipart/form-data body (StubTreq cannot make one) and its type; a
    list is a field repeated, as OpenAI's SDK sends one.
    """
    boundary = "privox-test-boundary"
    parts = []
    for name, given in fields.items():
        for value in given if isinstance(given, list) else [given]:
            raw = value.encode("utf-8") if isinstance(value, str) else value
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                + raw
                + b"\r\n"
            )
    for name, (filename, data) in (files or {}).items():
        parts.append(
            (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class APITestCase(SynchronousTestCase):
    maxUpload = 4096

    def setUp(self) -> None:
        self.exchange = FakeExchange()
        self.keys = AllowListPolicy("keys.txt", frozenset([KEY]))
        self.clock = Clock()
        self.api = PrivoxAPI(
            self.exchange,
            MODELS,
            PolicyAccess(self.keys),
            maxUpload=self.maxUpload,
            clock=self.clock,
            runInThread=maybeDeferred,
        )
        self.events: list[dict[str, Any]] = []
        self.api.log = type(self.api.log)(observer=self.events.append)
        self.treq = StubTreq(self.api.app.resource())

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = self.successResultOf(self.treq.request(method, "http://privox.test" + path, **kwargs))
        return response, self.successResultOf(self.treq.content(response))

    def post(self, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        return self.request("POST", path, **kwargs)

    def postMultipart(
        self,
        path: str,
        fields: dict[str, str | bytes],
        files: dict[str, tuple[str, bytes]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, bytes]:
        body, contentType = multipart(fields, files)
        return self.post(path, data=body, headers={"Content-Type": contentType, **(headers or {})})

    def header(self, response: Any, name: str) -> str | None:
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    def assertPlainError(self, response: Any, body: bytes, status: int, reason: str) -> None:
        self.assertEqual(response.code, status, body)
        self.assertEqual(self.header(response, "content-type"), "text/plain; charset=utf-8")
        text = body.decode("utf-8")
        self.assertTrue(text.endswith("\n") and "\n" not in text[:-1], text)
        self.assertIn(reason, text)

    def assertJsonError(
        self, response: Any, body: bytes, status: int, kind: str, reason: str = ""
    ) -> dict[str, Any]:
        self.assertEqual(response.code, status, body)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertEqual(error["type"], kind)
        self.assertIn(reason, error["message"])
        return error


class SttTests(APITestCase):
    def stt(self, fields: dict[str, str | bytes], audio: bytes = WAV, **kw: Any) -> tuple[Any, bytes]:
        return self.postMultipart("/stt", {"key": KEY, **fields}, {"file": ("clip.wav", audio)}, **kw)

    def test_multipart(self) -> None:
        """
        A multipart upload with only key and file: the fast English model,
        a plain-text transcript.
        """
        response, body = self.stt({})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "text/plain; charset=utf-8")
        # A line, as the original printed it: a shell prompt after curl
        # starts on a line of its own.
        self.assertEqual(body, b"hello world\n")
        self.assertEqual(self.exchange.calls, [("transcribe", "whisper:tiny.en", "en", WAV, "wav")])

    def test_urlencoded(self) -> None:
        short = pcmToWav(bytes(320), 16000)
        response, body = self.post(
            "/stt", data={"key": KEY, "file": short, "quality": "better", "language": "fr"}
        )
        self.assertEqual((response.code, body), (200, b"hello world\n"))
        self.assertEqual(self.exchange.calls, [("transcribe", "whisper:small", "fr", short, "wav")])

    def test_qualityAndLanguageToModel(self) -> None:
        cases = [
            ({"quality": "fast", "language": "en"}, "whisper:tiny.en"),
            ({"quality": "best", "language": "de"}, "whisper:medium"),
            ({"quality": "normal"}, "whisper:base.en"),
            ({"quality": "better", "language": "en-US"}, "whisper:small.en"),
            ({"quality": "xcribe", "language": "es"}, "whisper:large"),
            ({"quality": "xcribe2"}, "whisper:large-v2"),
        ]
        for fields, model in cases:
            self.exchange.calls.clear()
            response, _ = self.stt(fields)
            self.assertEqual(response.code, 200)
            self.assertEqual(self.exchange.calls[0][1], model, fields)

    def test_languageNames(self) -> None:
        """
        The original clients send C{language=English}: it reaches the farm
        as C{en} and picks the English model, exactly as C{en} does; other
        names and region tags become their codes too.
        """
        cases = [
            ({"language": "English"}, "whisper:tiny.en", "en"),
            ({"language": "en"}, "whisper:tiny.en", "en"),
            ({"quality": "best", "language": "ENGLISH"}, "whisper:medium.en", "en"),
            ({"quality": "best", "language": "French"}, "whisper:medium", "fr"),
            ({"language": " de "}, "whisper:tiny", "de"),
            ({"language": "pt_BR"}, "whisper:tiny", "pt"),
        ]
        for fields, model, language in cases:
            self.exchange.calls.clear()
            response, body = self.stt(fields)
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.exchange.calls[0][1:3], (model, language), fields)

    def test_originalPageProxy(self) -> None:
        """
        The original web page posts through a proxy that does
        C{print(response.content)}, and then takes
        C{s.substring(2, s.length - 4)}: the transcript, exactly, because
        the body ends in exactly one newline (even where the producer's
        text ended in line breaks of its own).
        """
        for transcript in ("hello world", "hello world\n", "it's done\r\n\n"):
            self.exchange.text = transcript
            response, body = self.stt({"language": "English"})
            self.assertEqual(response.code, 200, body)
            s = repr(body) + "\n"  # what print() wrote
            self.assertEqual(s[2 : len(s) - 4], transcript.rstrip("\r\n"), body)

    def test_json(self) -> None:
        self.exchange.language = None
        response, body = self.stt(
            {"quality": "best", "language": "de"}, headers={"Accept": "text/html, application/json;q=0.9"}
        )
        self.assertEqual(self.header(response, "content-type"), "application/json")
        # The duration is the upload's own, measured by the API (the
        # producer said 2.5 s: producers do not decide what audio lasts).
        self.assertEqual(
            json.loads(body),
            {"text": "hello world", "model": "whisper:medium", "language": "de", "duration_s": 0.1},
        )

    def test_formatSniffed(self) -> None:
        opus = encoded(tone(0.1, 16000), 16000, "ogg", "libopus")
        for audio, format in ((WAV, "wav"), (zipped({"sample.wav": WAV}), "zip"), (opus, "auto")):
            self.exchange.calls.clear()
            self.assertEqual(self.stt({}, audio)[0].code, 200)
            self.assertEqual(self.exchange.calls[0][3:], (audio, format))

    def test_unreadableAudio(self) -> None:
        """
        What no node could decode is refused by the API itself, with the
        reason, and no job is sent.
        """
        cases = [
            (b"\x1aE\xdf\xa3webm", "cannot decode"),
            (b"PK\x03\x04zipped", "corrupt zip"),
            (withFmt(WAV, rate=1), "impossible WAV: 1 Hz"),
            (withFmt(WAV, channels=0), "impossible WAV: 0 channels"),
        ]
        for audio, reason in cases:
            response, body = self.stt({}, audio)
            self.assertPlainError(response, body, 400, reason)
        self.assertEqual(self.exchange.calls, [])

    def test_xlateAccepted(self) -> None:
        response, _ = self.stt({"xlate": "1"})
        self.assertEqual(response.code, 200)
        self.assertEqual(forms.SttForm(KEY, forms.Upload(WAV, None, "wav"), xlate=True).xlate, True)

    def test_bearerKey(self) -> None:
        response, _ = self.postMultipart(
            "/stt", {}, {"file": ("a.wav", WAV)}, headers={"Authorization": f"Bearer {KEY}"}
        )
        self.assertEqual(response.code, 200)

    def test_missingFile(self) -> None:
        response, body = self.postMultipart("/stt", {"key": KEY})
        self.assertPlainError(response, body, 400, "the file field is required")
        self.assertEqual(self.exchange.calls, [])

    def test_emptyFile(self) -> None:
        response, body = self.stt({}, b"")
        self.assertPlainError(response, body, 400, "the uploaded file is empty")

    def test_missingKey(self) -> None:
        response, body = self.postMultipart("/stt", {}, {"file": ("a.wav", WAV)})
        self.assertPlainError(response, body, 401, "a key is required")
        response, body = self.postMultipart("/stt", {"key": "  "}, {"file": ("a.wav", WAV)})
        self.assertPlainError(response, body, 401, "a key is required")

    def test_badKey(self) -> None:
        response, body = self.postMultipart("/stt", {"key": "wrong"}, {"file": ("a.wav", WAV)})
        self.assertPlainError(response, body, 401, "the key was not accepted")
        self.assertEqual(self.exchange.calls, [])

    def test_keyPrecedence(self) -> None:
        """
        Authorization: Bearer is the key when there is one; another kind of
        Authorization leaves the key field in charge.
        """
        response, _ = self.stt({"key": "wrong"}, headers={"Authorization": f"Bearer {KEY}"})
        self.assertEqual(response.code, 200)
        response, _ = self.stt({"key": KEY}, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        self.assertEqual(response.code, 200)
        response, body = self.stt({"key": KEY}, headers={"Authorization": "Bearer wrong"})
        self.assertPlainError(response, body, 401, "not accepted")

    def test_keyCheckedBeforeFields(self) -> None:
        """
        Without a good key, nothing is said about the other fields.
        """
        response, body = self.postMultipart("/stt", {"key": "wrong", "quality": "nope"})
        self.assertPlainError(response, body, 401, "the key was not accepted")

    def test_unknownQuality(self) -> None:
        response, body = self.stt({"quality": "superb"})
        self.assertPlainError(response, body, 400, "quality must be one of fast, normal")

    def test_unsupportedLanguage(self) -> None:
        """
        A language that is neither a name nor a code Whisper knows: 422,
        saying both are accepted; nothing reaches the farm.
        """
        for language in ("english!", "Klingon", "xx-YY", "*"):
            response, body = self.stt({"language": language})
            self.assertPlainError(response, body, 422, "give a language name or code")
        self.assertEqual(self.exchange.calls, [])

    def test_nonUtf8Field(self) -> None:
        response, body = self.stt({"quality": b"\xff\xfe"})
        self.assertPlainError(response, body, 400, "quality is not UTF-8 text")

    def test_oversize(self) -> None:
        """
        A body over the cap: 413 from Content-Length, before any parsing.
        """
        response, body = self.stt({}, b"RIFF" + bytes(self.maxUpload))
        self.assertPlainError(response, body, 413, f"the limit is {self.maxUpload} bytes")
        self.assertEqual(self.exchange.calls, [])

    def test_notAForm(self) -> None:
        response, body = self.post("/stt", data=WAV, headers={"Content-Type": "audio/wav"})
        self.assertPlainError(response, body, 400, "send the fields as multipart/form-data")

    def test_malformedMultipart(self) -> None:
        body, contentType = multipart({"key": KEY}, {"file": ("a.wav", WAV)})
        response, text = self.post("/stt", data=body[:-30], headers={"Content-Type": contentType})
        self.assertPlainError(response, text, 400, "malformed multipart body")

    def test_exchangeErrors(self) -> None:
        cases = [
            (BadInput("the audio could not be decoded"), 400, None),
            (Unprocessable("no farm serves whisper:tiny.en"), 422, None),
            (Unavailable("no producer is free"), 503, "5"),
            (Unavailable("farms refused us", retryAfter=30), 503, "30"),
            (TimedOut("no answer within 60 s"), 504, None),
            (TooLarge("the farm takes 50 MB at most"), 413, None),
            (ApiError("the engine failed"), 500, None),
        ]
        for error, status, retryAfter in cases:
            self.exchange.error = error
            response, body = self.stt({})
            self.assertPlainError(response, body, status, error.message)
            self.assertEqual(self.header(response, "retry-after"), retryAfter)

    def test_unexpectedError(self) -> None:
        """
        A bug in the exchange is a 500 with a bland reason, logged.
        """
        self.exchange.error = RuntimeError("secret internals")
        response, body = self.stt({})
        self.assertPlainError(response, body, 500, "internal error")
        self.assertNotIn(b"secret", body)
        self.assertTrue(any(e.get("log_failure") for e in self.events))


class TtsTests(APITestCase):
    def test_defaultVoice(self) -> None:
        response, body = self.post("/tts", data={"key": KEY, "text": "Hello there."})
        self.assertEqual(response.code, 200)
        # What the original /tts answered (OpenAI's /v1/audio/speech: audio/wav).
        self.assertEqual(self.header(response, "content-type"), "audio/x-wav")
        self.assertEqual(body, SPOKEN)
        self.assertEqual(
            self.exchange.calls,
            [("synthesize", "coqui:tts_models/en/vctk/vits", None, "p236", "Hello there.")],
        )

    def test_voices(self) -> None:
        for voice, speaker in (("voice1", "p236"), ("voice2", "p270")):
            self.exchange.calls.clear()
            response, _ = self.post(
                "/tts", data={"key": KEY, "text": "Hi.", "voice": voice, "language": "en"}
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(self.exchange.calls[0][2:4], ("en", speaker))

    def test_languageName(self) -> None:
        for given, code in (("English", "en"), ("german", "de"), ("en-GB", "en")):
            self.exchange.calls.clear()
            response, body = self.post("/tts", data={"key": KEY, "text": "Hi.", "language": given})
            self.assertEqual(response.code, 200, body)
            self.assertEqual(self.exchange.calls[0][2], code, given)
        response, body = self.post("/tts", data={"key": KEY, "text": "Hi.", "language": "Elvish"})
        self.assertPlainError(response, body, 422, "give a language name or code")

    def test_multipart(self) -> None:
        response, body = self.postMultipart("/tts", {"key": KEY, "text": "Grüße", "voice": "voice2"})
        self.assertEqual((response.code, body), (200, SPOKEN))
        self.assertEqual(self.exchange.calls[0][4], "Grüße")

    def test_unknownVoice(self) -> None:
        response, body = self.post("/tts", data={"key": KEY, "text": "Hi.", "voice": "voice9"})
        self.assertPlainError(response, body, 422, "unknown voice 'voice9'")

    def test_missingOrEmptyText(self) -> None:
        for data in ({"key": KEY}, {"key": KEY, "text": ""}, {"key": KEY, "text": "  \n "}):
            response, body = self.post("/tts", data=data)
            self.assertPlainError(response, body, 400, "the text field is required")
        self.assertEqual(self.exchange.calls, [])

    def test_nonUtf8Text(self) -> None:
        response, body = self.post(
            "/tts",
            data=f"key={KEY}&text=".encode() + quote_from_bytes(b"caf\xe9").encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertPlainError(response, body, 400, "text is not UTF-8 text")
        response, body = self.postMultipart("/tts", {"key": KEY, "text": b"\xff\xfeh\x00i\x00"})
        self.assertPlainError(response, body, 400, "text is not UTF-8 text")

    def test_keys(self) -> None:
        response, body = self.post("/tts", data={"text": "Hi."})
        self.assertPlainError(response, body, 401, "a key is required")
        response, body = self.post("/tts", data={"key": "wrong", "text": "Hi."})
        self.assertPlainError(response, body, 401, "the key was not accepted")
        response, _ = self.post(
            "/tts", data={"text": "Hi."}, headers={"Authorization": f"bearer {KEY}"}
        )
        self.assertEqual(response.code, 200)

    def test_exchangeErrors(self) -> None:
        self.exchange.error = Unavailable("no producer is free")
        response, body = self.post("/tts", data={"key": KEY, "text": "Hi."})
        self.assertPlainError(response, body, 503, "no producer is free")
        self.assertEqual(self.header(response, "retry-after"), "5")
        self.exchange.error = TimedOut("too slow")
        response, body = self.post("/tts", data={"key": KEY, "text": "Hi."})
        self.assertPlainError(response, body, 504, "too slow")

    def test_deadlineGrowsWithAudio(self) -> None:
        """
        A job may take --deadline plus --deadline-per-second for each second
        of its audio (the upload's, or the most its text may take to say);
        a timeout says how its deadline was made.
        """
        tenthSecond = pcmToWav(bytes(3200), 16000)
        response, _ = self.postMultipart("/stt", {"key": KEY}, {"file": ("a.wav", tenthSecond)})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.exchange.deadlines, [60.1])
        response, _ = self.post("/tts", data={"key": KEY, "text": "Hi."})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.exchange.deadlines[-1], 60.0 + spokenSeconds("Hi."))
        self.exchange.error = TimedOut("no answer within 60.1 s")
        response, body = self.postMultipart("/stt", {"key": KEY}, {"file": ("a.wav", tenthSecond)})
        self.assertPlainError(
            response, body, 504,
            "no answer within 60.1 s: the deadline for 0.1 s of audio is 60 s"
            " + 1 s per second of audio",
        )

    def test_oversize(self) -> None:
        """
        A form without a file is capped far below --max-upload.
        """
        response, body = self.post("/tts", data={"key": KEY, "text": "x" * FORM_LIMIT})
        self.assertPlainError(response, body, 413, f"the limit is {FORM_LIMIT} bytes")


class TranslationTests(APITestCase):
    BEARER = {"Authorization": f"Bearer {KEY}"}

    def translate(self, fields: dict[str, str | bytes]) -> tuple[Any, bytes]:
        return self.postMultipart(
            "/v1/audio/translations", fields, {"file": ("speech.wav", WAV)}, headers=self.BEARER
        )

    def test_translate(self) -> None:
        """
        OpenAI's translations go to a model that can (the quality's
        any-language one, never an English-only one), as a translate job.
        """
        response, body = self.translate({"model": "whisper-1"})
        self.assertEqual((response.code, json.loads(body)), (200, {"text": "hello world"}))
        self.assertEqual(self.exchange.calls, [("translate", "whisper:tiny", None, WAV, "wav")])
        self.exchange.calls.clear()
        response, body = self.translate({"model": "best", "response_format": "verbose_json"})
        self.assertEqual(json.loads(body)["task"], "translate")
        self.assertEqual(self.exchange.calls[0][1], "whisper:medium")
        response, body = self.translate({"model": "whisper:small"})
        self.assertEqual(self.exchange.calls[1][1], "whisper:small")

    def test_translationWords(self) -> None:
        """
        A translation's words, as a transcript's.
        """
        self.exchange.segments = (TimedText(0.0, 0.1, "hello", None, None, (TimedWord(0.0, 0.1, "hello"),)),)
        response, body = self.translate({
            "model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities[]": "word",
        })
        self.assertEqual(json.loads(body)["words"], [{"word": "hello", "start": 0.0, "end": 0.1}])
        self.assertTrue(self.exchange.words)

    def test_noTranslatingNode(self) -> None:
        self.exchange.error = NoProducer("no producer serving model 'whisper:tiny' that can translate")
        response, body = self.translate({"model": "whisper-1"})
        self.assertJsonError(response, body, 422, "unsupported", "no connected node translates with whisper:tiny")

    def test_unknownModel(self) -> None:
        response, body = self.translate({"model": "tts-1"})
        self.assertJsonError(response, body, 422, "unsupported", "unknown model 'tts-1'")


class TranscriptionTests(APITestCase):
    BEARER = {"Authorization": f"Bearer {KEY}"}

    def transcribe(self, fields: dict[str, str | bytes], audio: bytes = WAV) -> tuple[Any, bytes]:
        return self.postMultipart(
            "/v1/audio/transcriptions", fields, {"file": ("speech.mp3", audio)}, headers=self.BEARER
        )

    def test_json(self) -> None:
        response, body = self.transcribe({"model": "whisper-1"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        self.assertEqual(json.loads(body), {"text": "hello world"})
        self.assertEqual(self.exchange.calls, [("transcribe", "whisper:tiny.en", None, WAV, "wav")])

    def sseEvents(self, body: bytes) -> list[dict]:
        self.assertTrue(body.endswith(b"\n\n"), body)
        chunks = body.decode().split("\n\n")[:-1]
        self.assertTrue(all(c.startswith("data: ") for c in chunks), chunks)
        return [json.loads(c[len("data: "):]) for c in chunks]

    def test_stream(self) -> None:
        """
        C{stream=true}: server-sent events, an utterance's delta as each is
        heard, then the whole text; the audio goes to a live job as 16 kHz
        PCM, charged by its length.
        """
        self.exchange.segments = (TimedText(0, 1, "hello"), TimedText(1, 2, "world"))
        response, body = self.transcribe({"model": "whisper-1", "stream": "true"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "text/event-stream; charset=utf-8")
        self.assertEqual(self.sseEvents(body), [
            {"type": "transcript.text.delta", "delta": "hello "},
            {"type": "transcript.text.delta", "delta": "world "},
            {"type": "transcript.text.done", "text": "hello world"},
        ])
        [(call, model, language, pcm, fmt)] = self.exchange.calls
        self.assertEqual((call, model), ("transcribeLive", "whisper:tiny.en"))
        self.assertEqual(len(pcm), len(wavPCM(WAV)[0]) * 16000 // wavPCM(WAV)[1])

    def test_streamWhole(self) -> None:
        """
        What a live job cannot take (a prompt; audio longer than it may
        be) is transcribed whole, and sent as one delta.
        """
        response, body = self.transcribe({"model": "whisper-1", "stream": "true", "prompt": "Privox"})
        self.assertEqual(self.sseEvents(body), [
            {"type": "transcript.text.delta", "delta": "hello world"},
            {"type": "transcript.text.done", "text": "hello world"},
        ])
        self.assertEqual(self.exchange.calls[-1][0], "transcribe")
        self.assertEqual(self.exchange.options, ("Privox", None))

    def test_streamErrors(self) -> None:
        """
        A failure before any event is an ordinary error answer.
        """
        self.exchange.error = NoProducer("no producer is free")
        response, body = self.transcribe({"model": "whisper-1", "stream": "true"})
        self.assertJsonError(response, body, 503, "no_capacity", "no producer is free")
        response, body = self.transcribe({"model": "whisper-1", "stream": "maybe"})
        self.assertJsonError(response, body, 400, "invalid_request_error", "stream must be")

    def test_promptAndTemperature(self) -> None:
        """
        C{prompt} and C{temperature} go to the engine; a temperature out of
        0 to 1 is refused.
        """
        self.transcribe({"model": "whisper-1", "prompt": "Privox, Twisted", "temperature": "0.2"})
        self.assertEqual(self.exchange.options, ("Privox, Twisted", 0.2))
        self.transcribe({"model": "whisper-1"})
        self.assertEqual(self.exchange.options, (None, None))
        for bad in ("1.5", "-1", "warm", "nan"):
            response, body = self.transcribe({"model": "whisper-1", "temperature": bad})
            self.assertJsonError(response, body, 400, "invalid_request_error", "temperature must be")

    def test_text(self) -> None:
        response, body = self.transcribe({"model": "whisper-1", "response_format": "text"})
        self.assertEqual(self.header(response, "content-type"), "text/plain; charset=utf-8")
        self.assertEqual(body, b"hello world\n")

    def test_verboseJson(self) -> None:
        self.exchange.language = None
        response, body = self.transcribe(
            {"model": "whisper-1", "response_format": "verbose_json", "language": "de"}
        )
        self.assertEqual(
            json.loads(body),
            {
                "task": "transcribe",
                "language": "de",
                "duration": 0.1,
                "text": "hello world",
                # The producer gave no segments: the whole is one, as long
                # as the audio the API measured (0.1 s).
                "segments": [
                    {"id": 0, "seek": 0, "start": 0.0, "end": 0.1, "text": "hello world",
                     "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
                     "compression_ratio": 0.0, "no_speech_prob": 0.0},
                ],
            },
        )

    def test_timedSegments(self) -> None:
        """
        A producer's segments, in verbose_json, SubRip and WebVTT; none past
        the audio's measured length (0.1 s here).
        """
        self.exchange.segments = (
            TimedText(0.0, 0.04, "hello", -0.25, 0.01),
            TimedText(0.04, 0.5, "world --> on\ntwo lines", -0.5, 0.02),
        )
        _, body = self.transcribe({"model": "whisper-1", "response_format": "verbose_json"})
        segments = json.loads(body)["segments"]
        self.assertEqual([(s["id"], s["start"], s["end"], s["text"]) for s in segments],
                         [(0, 0.0, 0.04, "hello"), (1, 0.04, 0.1, "world --> on\ntwo lines")])
        self.assertEqual((segments[0]["avg_logprob"], segments[1]["no_speech_prob"]), (-0.25, 0.02))
        response, body = self.transcribe({"model": "whisper-1", "response_format": "srt"})
        self.assertEqual(self.header(response, "content-type"), "text/plain; charset=utf-8")
        self.assertEqual(body.decode(), (
            "1\n00:00:00,000 --> 00:00:00,040\nhello\n\n"
            "2\n00:00:00,040 --> 00:00:00,100\nworld -> on two lines\n\n"
        ))
        response, body = self.transcribe({"model": "whisper-1", "response_format": "vtt"})
        self.assertEqual(self.header(response, "content-type"), "text/vtt; charset=utf-8")
        self.assertEqual(body.decode(), (
            "WEBVTT\n\n"
            "00:00:00.000 --> 00:00:00.040\nhello\n\n"
            "00:00:00.040 --> 00:00:00.100\nworld -> on two lines\n\n"
        ))

    def test_unsupportedFormats(self) -> None:
        response, body = self.transcribe({"model": "whisper-1", "response_format": "xml"})
        self.assertJsonError(response, body, 422, "unsupported", "is unknown")
        self.assertEqual(self.exchange.calls, [])

    def test_models(self) -> None:
        cases = [
            ({"model": "whisper-1", "language": "de"}, "whisper:tiny"),
            ({"model": "gpt-4o-transcribe", "language": "en"}, "whisper:tiny.en"),
            ({"model": "whisper:small"}, "whisper:small"),
            ({"model": "best", "language": "fr"}, "whisper:medium"),
            ({"model": "whisper-1", "language": "English"}, "whisper:tiny.en"),
            ({"model": "whisper-1", "language": "German"}, "whisper:tiny"),
            ({}, "whisper:tiny.en"),
        ]
        for fields, model in cases:
            self.exchange.calls.clear()
            self.assertEqual(self.transcribe(fields)[0].code, 200, fields)
            self.assertEqual(self.exchange.calls[0][1], model, fields)

    def test_unknownModel(self) -> None:
        response, body = self.transcribe({"model": "gpt-9-ears"})
        error = self.assertJsonError(response, body, 422, "unsupported", "unknown model 'gpt-9-ears'")
        self.assertEqual(error["code"], "unsupported")

    def test_ignoredFields(self) -> None:
        response, _ = self.transcribe(
            {"model": "whisper-1", "prompt": "Privox", "temperature": "0.2", "user": "someone"}
        )
        self.assertEqual(response.code, 200)

    def test_wordTimestamps(self) -> None:
        """
        C{timestamp_granularities[]=word} (verbose_json): the job asks for
        words, and they come as OpenAI's top-level C{words}, in order,
        none past the audio's measured length (0.1 s); alone, without the
        segments, as OpenAI answers.
        """
        self.exchange.segments = (
            TimedText(0.0, 0.04, "hello", -0.25, 0.01, (TimedWord(0.0, 0.04, "hello", 0.9),)),
            TimedText(0.04, 0.5, "big world", -0.5, 0.02, (
                TimedWord(0.04, 0.07, "big", 0.8), TimedWord(0.07, 0.5, "world", None),
            )),
        )
        words = [{"word": "hello", "start": 0.0, "end": 0.04},
                 {"word": "big", "start": 0.04, "end": 0.07},
                 {"word": "world", "start": 0.07, "end": 0.1}]
        response, body = self.transcribe({
            "model": "whisper-1", "response_format": "verbose_json",
            "timestamp_granularities[]": "word",
        })
        self.assertEqual(response.code, 200, body)
        self.assertTrue(self.exchange.words)
        answer = json.loads(body)
        self.assertEqual(answer["words"], words)
        self.assertNotIn("segments", answer)
        self.assertEqual(answer["text"], "hello world")
        # Both, repeated as the SDK sends a list (and once more: no matter).
        _, body = self.transcribe({
            "model": "whisper-1", "response_format": "verbose_json",
            "timestamp_granularities[]": ["segment", "word", "word"],
        })
        answer = json.loads(body)
        self.assertEqual(answer["words"], words)
        self.assertEqual([s["text"] for s in answer["segments"]], ["hello", "big world"])
        # Segments alone (or no granularity): no words asked for, none given.
        for fields in ({"timestamp_granularities[]": "segment"}, {"timestamp_granularities": "segment"}, {}):
            _, body = self.transcribe({"model": "whisper-1", "response_format": "verbose_json", **fields})
            self.assertFalse(self.exchange.words, fields)
            self.assertNotIn("words", json.loads(body), fields)
            self.assertEqual(len(json.loads(body)["segments"]), 2, fields)
        # curl's -F without the brackets works too.
        _, body = self.transcribe({"model": "whisper-1", "response_format": "verbose_json",
                                   "timestamp_granularities": "word"})
        self.assertTrue(self.exchange.words)
        self.assertEqual(json.loads(body)["words"], words)

    def test_noWordsTimed(self) -> None:
        """
        A producer that timed no words (an older node): C{words} is empty,
        never made up from the segments or the text.
        """
        for segments in ((), (TimedText(0.0, 0.1, "hello world"),)):
            self.exchange.segments = segments
            _, body = self.transcribe({
                "model": "whisper-1", "response_format": "verbose_json",
                "timestamp_granularities[]": ["word", "segment"],
            })
            answer = json.loads(body)
            self.assertEqual(answer["words"], [])
            self.assertEqual([s["text"] for s in answer["segments"]], ["hello world"])

    def test_badGranularities(self) -> None:
        """
        OpenAI's rules: granularities only with verbose_json; only
        C{segment} and C{word}; here, no words in a stream either. Nothing
        is transcribed.
        """
        for format in ("json", "text", "srt", "vtt", None):
            fields = {"model": "whisper-1", "timestamp_granularities[]": "word"}
            if format is not None:
                fields["response_format"] = format
            response, body = self.transcribe(fields)
            self.assertJsonError(
                response, body, 400, "invalid_request_error",
                "timestamp_granularities[] is only supported with response_format verbose_json",
            )
        response, body = self.transcribe({
            "model": "whisper-1", "response_format": "verbose_json",
            "timestamp_granularities[]": ["word", "char"],
        })
        self.assertJsonError(response, body, 400, "invalid_request_error", "'char' is unknown")
        response, body = self.transcribe({
            "model": "whisper-1", "response_format": "verbose_json", "stream": "true",
            "timestamp_granularities[]": "word",
        })
        self.assertJsonError(response, body, 400, "invalid_request_error", "cannot be streamed")
        self.assertEqual(self.exchange.calls, [])

    def test_keys(self) -> None:
        response, body = self.postMultipart(
            "/v1/audio/transcriptions", {"model": "whisper-1"}, {"file": ("a.wav", WAV)}
        )
        error = self.assertJsonError(response, body, 401, "authentication_error", "a key is required")
        self.assertEqual(error["code"], "invalid_api_key")
        response, body = self.postMultipart(
            "/v1/audio/transcriptions",
            {"model": "whisper-1"},
            {"file": ("a.wav", WAV)},
            headers={"Authorization": "Bearer wrong"},
        )
        self.assertJsonError(response, body, 401, "authentication_error", "not accepted")
        response, _ = self.postMultipart(
            "/v1/audio/transcriptions", {"key": KEY}, {"file": ("a.wav", WAV)}
        )
        self.assertEqual(response.code, 200)

    def test_badInput(self) -> None:
        response, body = self.postMultipart(
            "/v1/audio/transcriptions", {"model": "whisper-1"}, headers=self.BEARER
        )
        self.assertJsonError(response, body, 400, "invalid_request_error", "the file field is required")
        response, body = self.transcribe({"language": "??"})
        self.assertJsonError(response, body, 422, "unsupported", "give a language name or code")

    def test_oversize(self) -> None:
        response, body = self.transcribe({}, bytes(self.maxUpload))
        self.assertJsonError(response, body, 413, "request_too_large", "the limit is")

    def test_exchangeErrors(self) -> None:
        self.exchange.error = Unavailable("no producer is free")
        response, body = self.transcribe({"model": "whisper-1"})
        error = self.assertJsonError(response, body, 503, "no_capacity", "no producer is free")
        self.assertEqual(error["code"], "no_capacity")
        self.assertEqual(self.header(response, "retry-after"), "5")
        self.exchange.error = TimedOut("too slow")
        response, body = self.transcribe({"model": "whisper-1"})
        self.assertJsonError(response, body, 504, "timeout", "too slow")
        self.exchange.error = Unprocessable("no farm serves it")
        response, body = self.transcribe({"model": "whisper-1"})
        self.assertJsonError(response, body, 422, "unsupported")


class SpeechTests(APITestCase):
    BEARER = {"Authorization": f"Bearer {KEY}"}

    def speak(self, body: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        if isinstance(body, bytes):
            return self.post(
                "/v1/audio/speech",
                data=body,
                headers={"Content-Type": "application/json", **self.BEARER, **(headers or {})},
            )
        return self.post("/v1/audio/speech", json=body, headers={**self.BEARER, **(headers or {})})

    def test_tts1(self) -> None:
        for model in ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"):
            self.exchange.calls.clear()
            response, body = self.speak(
                {"model": model, "input": "Hello.", "voice": "alloy", "response_format": "wav"}
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(self.header(response, "content-type"), "audio/wav")
            # Streamed: a WAV whose sizes say "to the end".
            self.assertEqual(wavPCM(body), wavPCM(SPOKEN))
            self.assertEqual(
                self.exchange.calls,
                [("synthesize", "coqui:tts_models/en/vctk/vits", None, "p236", "Hello.")],
            )

    def test_voices(self) -> None:
        cases = [
            ("alloy", "p236"),
            ("echo", "p270"),
            ("onyx", "p270"),
            ("nova", "p236"),
            ("voice2", "p270"),
            ("no-such-voice", "p236"),
            (None, "p236"),
        ]
        for voice, speaker in cases:
            self.exchange.calls.clear()
            request = {"model": "tts-1", "input": "Hi."}
            if voice is not None:
                request["voice"] = voice
            self.assertEqual(self.speak(request)[0].code, 200)
            self.assertEqual(self.exchange.calls[0][3], speaker, voice)

    def test_privoxModel(self) -> None:
        self.speak({"model": "piper:en_US-joe-medium", "input": "Hi.", "voice": "echo"})
        self.assertEqual(self.exchange.calls[0][1:4], ("piper:en_US-joe-medium", None, "p270"))

    def test_unknownModel(self) -> None:
        response, body = self.speak({"model": "tts-9", "input": "Hi."})
        self.assertJsonError(response, body, 422, "unsupported", "unknown model 'tts-9'")

    def test_responseFormats(self) -> None:
        """
        Every format OpenAI offers is encoded as asked, labelled as such,
        and decodes back to mono audio at least as long as what was spoken
        (mp3 when none is named, as OpenAI answers); pcm is raw 24 kHz
        16-bit samples; unknown formats are refused.
        """
        spoken = 300 / 16000  # SPOKEN's 300 samples
        cases = [
            (None, "audio/mpeg", "mp3", 16000),
            ("mp3", "audio/mpeg", "mp3", 16000),
            ("opus", "audio/ogg", "opus", 48000),
            ("aac", "audio/aac", "aac", 16000),
            ("flac", "audio/flac", "flac", 16000),
        ]
        for format, contentType, codec, rate in cases:
            request = {"model": "tts-1", "input": "Hi."}
            if format is not None:
                request["response_format"] = format
            response, body = self.speak(request)
            self.assertEqual(response.code, 200, format)
            self.assertEqual(self.header(response, "content-type"), contentType)
            with av.open(io.BytesIO(body)) as decoded:
                stream = decoded.streams.audio[0]
                self.assertEqual((stream.codec_context.name.replace("float", ""), stream.rate,
                                  stream.codec_context.channels), (codec, rate, 1), format)
                seconds = sum(frame.samples for frame in decoded.decode(audio=0)) / rate
            self.assertGreaterEqual(seconds, spoken * 0.95, format)
        response, body = self.speak({"model": "tts-1", "input": "Hi.", "response_format": "wav"})
        self.assertEqual(self.header(response, "content-type"), "audio/wav")
        self.assertEqual(wavPCM(body), wavPCM(SPOKEN))
        response, body = self.speak({"model": "tts-1", "input": "Hi.", "response_format": "pcm"})
        self.assertEqual(self.header(response, "content-type"), "audio/pcm")
        self.assertEqual(len(body) % 2, 0)
        self.assertAlmostEqual(len(body) / 2 / 24000, spoken, delta=0.003)
        response, body = self.speak({"model": "tts-1", "input": "Hi.", "response_format": "ogg"})
        self.assertJsonError(response, body, 422, "unsupported", "'ogg' is unknown")

    def test_speedPacedByTheProducer(self) -> None:
        """
        Speech a producer spoke at the speed asked (Piper's length scale)
        is encoded as it is, not stretched again; at a speed the producer
        got only part of the way to, the API stretches the rest. Slower
        speech may take longer than the text would at its own pace, and is
        not cut.
        """
        self.exchange.speech = pcmToWav(TONE, 16000)
        self.exchange.paces = True
        for speed, expected in ((2.0, 0.5), (0.5, 2.0), (4.0, 0.25)):
            response, body = self.speak(
                {"model": "tts-1", "input": "Hi.", "response_format": "wav", "speed": speed}
            )
            self.assertEqual(response.code, 200, body[:200])
            pcm, rate = wavPCM(body)
            self.assertLess(abs(len(pcm) / 2 / rate - expected), 0.01, speed)
        self.exchange.speech = pcmToWav(TONE * 8, 16000)  # 16 s at half speed: "Hi." takes less
        response, body = self.speak(
            {"model": "tts-1", "input": "Hi.", "response_format": "wav", "speed": 0.5}
        )
        pcm, rate = wavPCM(body)
        # Cut at what "Hi." may take at half speed: twice its own bound.
        self.assertLess(abs(len(pcm) / 2 / rate - 2 * spokenSeconds("Hi.")), 0.01)

    def test_ignoredFields(self) -> None:
        response, _ = self.speak({"model": "tts-1", "input": "Hi.", "instructions": "Cheerfully."})
        self.assertEqual(response.code, 200)

    def test_speed(self) -> None:
        """
        C{speed} changes how long the speech lasts (at its pitch), from 0.25
        to 4; other values are refused.
        """
        self.exchange.speech = pcmToWav(TONE, 16000)  # a second of 440 Hz

        def seconds(speed: float | None) -> float:
            request: dict[str, Any] = {"model": "tts-1", "input": "Hi.", "response_format": "wav"}
            if speed is not None:
                request["speed"] = speed
            response, body = self.speak(request)
            self.assertEqual(response.code, 200, body[:200])
            pcm, rate = wavPCM(body)
            return len(pcm) / 2 / rate

        self.assertEqual(seconds(None), 1.0)
        for speed in (0.25, 0.5, 2.0, 4.0):
            self.assertLess(abs(seconds(speed) * speed - 1.0), 0.05, speed)
        # The speed was asked of the producer each time; this one did not
        # pace its speech, so the API stretched it.
        self.assertEqual(self.exchange.speeds, [0.25, 0.5, 2.0, 4.0])
        for bad in (0.2, 4.5, "fast", True):
            response, body = self.speak({"model": "tts-1", "input": "Hi.", "speed": bad})
            self.assertJsonError(response, body, 400, "invalid_request_error", "speed must be")

    def test_sse(self) -> None:
        """
        C{stream_format: "sse"}: the audio in C{speech.audio.delta} events
        (base64), then C{speech.audio.done}.
        """
        response, body = self.speak(
            {"model": "tts-1", "input": "Hi.", "response_format": "pcm", "stream_format": "sse"}
        )
        self.assertEqual(self.header(response, "content-type"), "text/event-stream; charset=utf-8")
        chunks = [json.loads(c[len("data: "):]) for c in body.decode().split("\n\n")[:-1]]
        self.assertEqual([c["type"] for c in chunks][-1], "speech.audio.done")
        audio = b"".join(base64.b64decode(c["audio"]) for c in chunks[:-1])
        self.assertEqual(len(audio), 300 * 24000 // 16000 * 2)
        response, body = self.speak({"model": "tts-1", "input": "Hi.", "stream_format": "x"})
        self.assertJsonError(response, body, 400, "invalid_request_error", "stream_format must be")

    def test_badBodies(self) -> None:
        cases = [
            ({"model": "tts-1"}, "input is required"),
            ({"model": "tts-1", "input": "   "}, "input is required"),
            ({"model": "tts-1", "input": 42}, "input must be a string"),
            ({"model": ["tts-1"], "input": "Hi."}, "model must be a string"),
            ([1, 2], "must be a JSON object"),
            (b"model=tts-1&input=Hi", "must be a JSON object"),
            (b'{"input": "caf\xe9"}', "not UTF-8"),
            (b"", "must be a JSON object"),
        ]
        for body, reason in cases:
            response, text = self.speak(body)
            self.assertJsonError(response, text, 400, "invalid_request_error", reason)
        self.assertEqual(self.exchange.calls, [])

    def test_keys(self) -> None:
        response, body = self.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi."})
        self.assertJsonError(response, body, 401, "authentication_error", "a key is required")
        response, body = self.speak(
            {"model": "tts-1", "input": "Hi."}, headers={"Authorization": "Basic Zm9vOmJhcg=="}
        )
        self.assertJsonError(response, body, 401, "authentication_error", "a key is required")
        response, body = self.speak(
            {"model": "tts-1", "input": "Hi."}, headers={"Authorization": "Bearer wrong"}
        )
        self.assertJsonError(response, body, 401, "authentication_error", "not accepted")

    def test_oversize(self) -> None:
        response, body = self.speak({"model": "tts-1", "input": "x" * FORM_LIMIT})
        self.assertJsonError(response, body, 413, "request_too_large", f"limit is {FORM_LIMIT}")

    def test_exchangeErrors(self) -> None:
        self.exchange.error = Unavailable("no producer is free", retryAfter=7)
        response, body = self.speak({"model": "tts-1", "input": "Hi."})
        self.assertJsonError(response, body, 503, "no_capacity", "no producer is free")
        self.assertEqual(self.header(response, "retry-after"), "7")


class OtherRouteTests(APITestCase):
    def test_models(self) -> None:
        response, body = self.request("GET", "/v1/models")
        self.assertEqual(response.code, 200)
        listing = json.loads(body)
        self.assertEqual(listing["object"], "list")
        ids = [m["id"] for m in listing["data"]]
        for name in ("whisper-1", "tts-1", "tts-1-hd", "whisper:tiny.en", "whisper:medium",
                     "coqui:tts_models/en/vctk/vits"):
            self.assertIn(name, ids)
        self.assertEqual(len(ids), len(set(ids)))
        for model in listing["data"]:
            self.assertEqual((model["object"], model["owned_by"]), ("model", "privox"))

    def test_modelsServedNow(self) -> None:
        """
        Where the farms' load is known, only the names whose model a
        connected producer serves are listed, each with that model.
        """
        def load(stt: list[str], tts: list[str]) -> dict[str, Any]:
            return {"services": {
                service: {"models": {m: {"connected": 1, "sealing": 1} for m in models}}
                for service, models in (("stt", stt), ("tts", tts))
            }}

        self.api.farmStatus = lambda: {"alpha": load(["whisper:tiny.en"], [])}
        response, body = self.request("GET", "/v1/models")
        listing = {m["id"]: m for m in json.loads(body)["data"]}
        self.assertEqual(set(listing), {"whisper-1", "gpt-4o-transcribe",
                                        "gpt-4o-mini-transcribe", "whisper:tiny.en"})
        self.assertEqual(listing["whisper-1"]["privox_model"], "whisper:tiny.en")
        self.assertTrue(all(m["served"] for m in listing.values()))

    def test_fallback(self) -> None:
        """
        A model nobody serves goes to the fallback the configuration names
        (and the answer says so); with none named, it stays itself.
        """
        serving = {"alpha": {"services": {"stt": {"models": {
            "whisper:tiny.en": {"connected": 1, "sealing": 1}}}}}}
        self.api.farmStatus = lambda: serving
        self.api.models = dataclasses.replace(
            MODELS, sttFallbacks={"whisper:small.en": "whisper:tiny.en"}
        )
        response, body = self.postMultipart(
            "/stt", {"key": KEY, "quality": "better"}, {"file": ("a.wav", WAV)}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.exchange.calls[-1][1], "whisper:tiny.en")
        self.assertEqual(self.header(response, "x-privox-fallback"),
                         "whisper:small.en -> whisper:tiny.en")
        self.assertEqual(self.header(response, "x-privox-model"), "whisper:tiny.en")
        # Not named: the job goes to the model asked for.
        self.postMultipart("/stt", {"key": KEY, "quality": "best"}, {"file": ("a.wav", WAV)})
        self.assertEqual(self.exchange.calls[-1][1], "whisper:medium.en")
        # Served: no fallback.
        serving["alpha"]["services"]["stt"]["models"]["whisper:small.en"] = {"connected": 1}
        response, body = self.postMultipart(
            "/stt", {"key": KEY, "quality": "better"}, {"file": ("a.wav", WAV)}
        )
        self.assertEqual(self.exchange.calls[-1][1], "whisper:small.en")
        self.assertIsNone(response.headers.getRawHeaders("x-privox-fallback"))

    def test_modelHeader(self) -> None:
        """
        Every answer that ran a job says which model it went to.
        """
        response, body = self.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi."},
                                   headers={"Authorization": f"Bearer {KEY}"})
        self.assertEqual(self.header(response, "x-privox-model"), "coqui:tts_models/en/vctk/vits")

    def test_healthz(self) -> None:
        response, body = self.request("GET", "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        self.assertEqual(
            json.loads(body),
            {"status": "ok", "farms": [{"name": "alpha", "services": ["stt", "tts"], "up": True}]},
        )

    def test_frontPage(self) -> None:
        response, body = self.request("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
        page = body.decode("utf-8")
        self.assertIn("Privox", page)
        self.assertIn("curl -s http://privox.test/stt -F key=KEY", page)
        self.assertIn("/v1/audio/transcriptions", page)
        # Pickers from the API's own tables; a way to /status.
        self.assertIn("<select id=\"voice\" name=\"voice\"><option selected>voice1</option>", page)
        self.assertIn("<option selected>en</option>", page)
        self.assertIn('<a href="/status">', page)
        # Every example line fits the page (none runs off its right edge).
        for block in page.split("<pre>")[1:]:
            for line in block.split("</pre>")[0].splitlines():
                self.assertLessEqual(len(html.unescape(line)), 90, line)

    def test_frontPageSaysWhatKeyIsNeeded(self) -> None:
        """
        Where requests need no key (anonymous use), the examples pass none;
        where any key works, they pass demo.
        """
        for keyExample, stt, note in (
            (None, "curl -s http://privox.test/stt -F quality=fast", "No key is needed here"),
            ("demo", "curl -s http://privox.test/stt -F key=demo", "Any key works here"),
        ):
            self.api.access.keyExample = keyExample
            page = self.request("GET", "/")[1].decode("utf-8")
            self.assertIn(stt, page)
            self.assertIn(note, page)
            if keyExample is None:
                self.assertNotIn("Bearer", page)

    def test_frontPageEscapesHost(self) -> None:
        response, body = self.request("GET", "/", headers={"Host": "<script>x</script>"})
        self.assertNotIn(b"<script>", body)
        self.assertIn(b"&lt;script&gt;", body)

    def test_notFound(self) -> None:
        response, body = self.request("GET", "/nowhere")
        self.assertPlainError(response, body, 404, "not found")
        response, body = self.request("GET", "/v1/nowhere")
        self.assertJsonError(response, body, 404, "not_found", "not found")

    def test_wrongMethod(self) -> None:
        response, body = self.request("GET", "/stt")
        self.assertPlainError(response, body, 405, "method not allowed")
        self.assertIn("POST", self.header(response, "allow") or "")
        response, body = self.request("GET", "/v1/audio/speech")
        self.assertJsonError(response, body, 405, "method_not_allowed")


class LoggingTests(APITestCase):
    def test_requestLine(self) -> None:
        """
        One line per request with named fields, the key as keyId only, and
        never the text, the audio or the key.
        """
        self.clock.advance(10)
        self.post("/tts", data={"key": KEY, "text": "my secret diary"})
        self.postMultipart("/stt", {"key": KEY}, {"file": ("a.wav", WAV)})
        self.postMultipart("/stt", {"key": "wrong-key"}, {"file": ("a.wav", WAV)})
        lines = [e for e in self.events if "route" in e]
        self.assertEqual([(e["route"], e["status"]) for e in lines],
                         [("/tts", 200), ("/stt", 200), ("/stt", 401)])
        tts = lines[0]
        self.assertEqual(tts["bytes"], len(SPOKEN))
        self.assertEqual(tts["ms"], 0)
        self.assertEqual(tts["keyId"], keyId(KEY))
        self.assertEqual(tts["model"], "coqui:tts_models/en/vctk/vits")
        self.assertGreater(tts["received"], 0)
        self.assertIsNone(lines[2]["keyId"])
        from twisted.logger import formatEvent

        for event in self.events:
            text = formatEvent(event) + repr(event)
            for secret in (KEY, "wrong-key", "my secret diary", "hello world"):
                self.assertNotIn(secret, text)
            self.assertNotIn(repr(WAV[:8])[2:-1], text)


class ModelTableTests(SynchronousTestCase):
    def test_pinnedLanguages(self) -> None:
        """
        A pinned language, given by code or name, serves every way of
        naming it; English by name picks the English model as C{en} does.
        """
        for line in ("ko vosk:ko", "Korean vosk:ko", "ko-KR vosk:ko"):
            table = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES, (line,))
            self.assertEqual(table.sttLanguages, {"ko": "vosk:ko"}, line)
            for language in ("ko", "Korean", "KO_kr"):
                self.assertEqual(table.sttModel("best", language), "vosk:ko", (line, language))
            for language in (None, "en", "English", "en-US"):
                self.assertEqual(table.sttModel("best", language), "whisper:medium.en", language)
            self.assertEqual(table.sttModel("best", "fr"), "whisper:medium")

    def test_unknownPinnedLanguage(self) -> None:
        e = self.assertRaises(
            ValueError, ModelTable.parse, DEFAULT_STT, DEFAULT_VOICES, ("Klingon whisper:tiny",)
        )
        self.assertIn("language line 'Klingon whisper:tiny': unknown language", str(e))


class FormTests(SynchronousTestCase):
    def test_sniff(self) -> None:
        self.assertEqual(forms.sniffFormat(b"RIFF...."), "wav")
        self.assertEqual(forms.sniffFormat(b"PK\x03\x04"), "zip")
        self.assertEqual(forms.sniffFormat(b"ID3..."), "auto")
        # A RIFF that is not a WAVE (an AVI) is for FFmpeg, not the WAV reader.
        self.assertEqual(forms.sniffFormat(b"RIFF\x10\x00\x00\x00AVI LIST"), "auto")

    def test_recordsHideSecrets(self) -> None:
        form = forms.TtsForm(Caller("the-key"), "private words", "voice1")
        self.assertNotIn("the-key", repr(form))
        self.assertNotIn("private words", repr(form))
        upload = forms.Upload(b"RIFF" * 10, "a.wav", "wav")
        self.assertIn("40 bytes", repr(forms.SttForm(Caller("the-key"), upload)))
        self.assertNotIn("the-key", repr(forms.SttForm(Caller("the-key"), upload)))

    def test_actualSizeChecked(self) -> None:
        """
        A body with no Content-Length (and not from an L{ApiSite}) is
        measured.
        """

        class Bare:
            content = io.BytesIO(b"x" * 200)
            path = b"/v1/audio/transcriptions"

            def getHeader(self, name: bytes) -> None:
                return None

        e = self.assertRaises(TooLarge, forms.bodySize, Bare(), 100)
        self.assertIn("the request is 200 bytes; the limit is 100 bytes", e.message)
        self.assertIn("--max-upload", e.message)
        self.assertEqual(forms.bodySize(Bare(), 200), 200)

    def test_goneClientsBody(self) -> None:
        """
        When a client goes away mid-request twisted.web closes its body: the
        request's log line still says how many bytes came (none known).
        """
        from privox.api.app import _received

        class Gone:
            content = io.BytesIO(b"x" * 10)

        Gone.content.close()
        self.assertEqual(_received(Gone()), 0)

    def test_repeatedFields(self) -> None:
        """
        Every value of a repeated field, in order, blank ones left out; the
        first is still what C{text} gives.
        """
        fields = forms.Fields()
        for value in (b"segment", b"  ", b" word "):
            fields.add("timestamp_granularities[]", value)
        self.assertEqual(fields.texts("timestamp_granularities[]"), ["segment", "word"])
        self.assertEqual(fields.text("timestamp_granularities[]"), "segment")
        self.assertEqual(fields.texts("absent"), [])
        fields.add("bad", b"\xff")
        self.assertRaises(BadInput, fields.texts, "bad")

    def test_urlencodedBytes(self) -> None:
        fields = forms._readUrlencoded(b"a=1+2&b=%FF%00&c&=x&&d=%zz")
        self.assertEqual(fields.raw("a"), (b"1 2", None))
        self.assertEqual(fields.raw("b"), (b"\xff\x00", None))
        self.assertEqual(fields.raw("c"), (b"", None))
        self.assertEqual(fields.raw("d"), (b"%zz", None))


def rawRequest(site: ApiSite, data: bytes) -> bytes:
    """
    Feed raw HTTP bytes to C{site}; return what it wrote.
    """
    channel = site.buildProtocol(None)
    # The channel's idle timeout must not land on the global reactor, where
    # it would outlive this synchronous test.
    channel.callLater = Clock().callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    written = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    return written


class SiteTests(SynchronousTestCase):
    """
    Bodies over their route's limit, refused as they arrive by L{ApiSite}'s
    channels; what is let in reaches the routes unparsed by twisted.web.
    """

    def setUp(self) -> None:
        self.exchange = FakeExchange()
        self.api = PrivoxAPI(
            self.exchange, MODELS, PolicyAccess(OpenPolicy()), maxUpload=100, clock=Clock(),
            runInThread=maybeDeferred,
        )
        self.api.log = type(self.api.log)(observer=lambda e: None)
        self.site = self.api.site()
        self.seen: list[Any] = []
        original = ApiRequest.process

        def spy(request: ApiRequest) -> None:
            self.seen.append(request)
            original(request)

        self.patch(ApiRequest, "process", spy)

    def connect(self) -> tuple[Any, StringTransport, Clock]:
        clock = Clock()
        self.patch(self.site, "reactor", clock)
        channel = self.site.buildProtocol(None)
        channel.callLater = clock.callLater
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel, transport, clock

    def refusals(self) -> float:
        return self.api.registry.get_sample_value(
            "privox_api_requests_total", {"route": "/stt", "status": "413"}
        ) or 0.0

    def test_declaredTooLarge(self) -> None:
        """
        A declared body over the limit gets its 413 as soon as the headers
        are in, without the client asking first (C{Expect: 100-continue})
        and before any of the body is sent.
        """
        channel, transport, clock = self.connect()
        channel.dataReceived(
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 500\r\n\r\n"
        )
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 413 "), written)
        self.assertIn(b"Connection: close", written)
        self.assertIn(b"the request is 500 bytes; the limit is 100 bytes", written)
        self.assertEqual(self.refusals(), 1.0)
        # What the client sends anyway is dropped, never parsed or answered.
        transport.clear()
        channel.dataReceived(b"x" * 500 + b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual((self.seen, self.exchange.calls), ([], []))

    def test_formRoutesHaveASmallLimit(self) -> None:
        """
        A form without a file is refused past FORM_LIMIT, whatever
        --max-upload says.
        """
        self.site.maxUpload = 10 * FORM_LIMIT
        channel, transport, clock = self.connect()
        channel.dataReceived(
            b"POST /tts HTTP/1.1\r\nHost: p\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nContent-Length: %d\r\n\r\n" % (FORM_LIMIT + 1)
        )
        self.assertIn(b"the limit is %d bytes" % FORM_LIMIT, transport.value())

    def test_lingersThenCloses(self) -> None:
        """
        A refused client that goes on sending is read (so the 413 is not
        destroyed by a reset) until it stops for LINGER_IDLE seconds.
        """
        channel, transport, clock = self.connect()
        channel.dataReceived(
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\n\r\n"
        )
        for _ in range(3):
            clock.advance(LINGER_IDLE - 1)
            channel.dataReceived(b"y" * 65536)
            self.assertFalse(transport.disconnecting)
        clock.advance(LINGER_IDLE)
        self.assertTrue(transport.disconnecting)

    def test_chunkedTooLarge(self) -> None:
        """
        A chunked body is refused at the chunk that takes it over, in
        OpenAI's error shape under /v1.
        """
        channel, transport, clock = self.connect()
        channel.dataReceived(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer k\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for n in range(3):
            channel.dataReceived(b"%x\r\n%s\r\n" % (40, b"y" * 40))
            self.assertEqual(transport.value() == b"", n < 2)
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 413 "), written)
        error = json.loads(written.split(b"\r\n\r\n", 1)[1])["error"]
        self.assertEqual(error["type"], "request_too_large")
        self.assertIn("the request is 120 bytes; the limit is 100 bytes", error["message"])
        self.assertEqual(self.seen, [])

    def test_withinCap(self) -> None:
        body, contentType = multipart({"key": "k"}, {"file": ("a.wav", pcmToWav(b"", 16000) + b"\0\0")})
        self.api.maxUpload = self.site.maxUpload = 1000
        written = rawRequest(
            self.site,
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Type: " + contentType.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        )
        self.assertTrue(written.startswith(b"HTTP/1.1 200 "), written)
        self.assertIn(b"Content-Length: 12\r\n", written)
        self.assertTrue(written.endswith(b"\r\n\r\nhello world\n"), written)
        self.assertEqual(self.seen[0].args, {})  # twisted.web did not parse it too

    def test_garbageMultipart(self) -> None:
        """
        A body twisted.web's own parser would drop the connection over gets
        a proper reason.
        """
        written = rawRequest(
            self.site,
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 7\r\n\r\ngarbage",
        )
        self.assertTrue(written.startswith(b"HTTP/1.1 400 "), written)
        self.assertIn(b"malformed multipart body", written)

    def test_noBoundary(self) -> None:
        written = rawRequest(
            self.site,
            b"POST /stt HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/form-data\r\n"
            b"Content-Length: 7\r\n\r\ngarbage",
        )
        self.assertTrue(written.startswith(b"HTTP/1.1 400 "), written)
        self.assertIn(b"no boundary", written)

    def test_noAccessLog(self) -> None:
        self.assertIsNone(self.site.log(object()))


class OptionsTests(SynchronousTestCase):
    FARM = "alpha tcp:host=127.0.0.1:port=1776 tcp:host=127.0.0.1:port=1777"

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_accountOptions(self) -> None:
        """
        --accounts, --anonymous and --keys: what goes together, said clearly.
        """
        s = self.parse("--farm", self.FARM).settings
        self.assertEqual((s.accounts, s.anonymous, s.hourly_seconds), ("sqlite:privox-accounts.sqlite3", "off", 3600.0))
        for argv, why in (
            (["--anonymous", "maybe"], "--anonymous must be on or off"),
            (["--keys", "keys.txt"], "--keys applies only with --accounts none"),
            (["--hourly-seconds", "-1"], "must not be negative"),
        ):
            e = self.assertRaises(usage.UsageError, self.parse, "--farm", self.FARM, *argv)
            self.assertIn(why, str(e))
        self.parse("--farm", self.FARM, "--accounts", "none", "--keys", "open")
        # A bad DSN or model cost line is a usage error when the API is built.
        for settings in (ApiSettings(accounts="mysql://x"), ApiSettings(model_cost=("whisper:tiny x",))):
            e = self.assertRaises(usage.UsageError, buildApi, settings, FakeExchange(), MemoryReactor())
            self.assertTrue(str(e))

    def test_exampleConfigNamesEverySetting(self) -> None:
        """
        etc/privox-api.toml is accepted and documents every setting, with the
        defaults (and one farm, which has none).
        """
        path = ETC.child("privox-api.toml")
        fromFile = tomllib.loads(path.getContent().decode())
        self.assertEqual(
            set(fromFile), {optionName(f.name) for f in dataclasses.fields(ApiSettings)}
        )
        options = self.parse("--config", path.path)
        self.assertEqual(options.settings, ApiSettings(farm=tuple(fromFile["farm"])))
        self.assertEqual([f.name for f in options.farms], ["local"])

    def test_commandLine(self) -> None:
        options = self.parse(
            "--farm", self.FARM,
            "--farm", "beta tcp:host=b:port=1 none weight=2 fallback",
            "--listen", "tcp:9090",
            "--max-upload", "1000",
            "--voice", "v piper:en_US-joe-medium",
            "--stt-language", "ko vosk:ko",
        )
        s = options.settings
        self.assertEqual((s.listen, s.max_upload), ("tcp:9090", 1000))
        self.assertEqual(s.voice, ("v piper:en_US-joe-medium",))
        self.assertEqual(s.stt_model, DEFAULT_STT)
        self.assertEqual([(f.name, f.fallback, f.weight) for f in options.farms],
                         [("alpha", False, 1.0), ("beta", True, 2.0)])

    def test_refused(self) -> None:
        cases = [
            (("--farm-registration", "off"), "no farms"),
            (("--farm-registration", "all"), "--farm-registration must be one of"),
            (("--farm-refresh", "0"), "--farm-refresh must be positive"),
            (("--farm", "alpha"), "farm line"),
            (("--farm", self.FARM, "--farm", self.FARM), "unique"),
            (("--farm", self.FARM, "--voice", "lonely"), "voice line"),
            (("--farm", self.FARM, "--stt-model", "fast a b c"), "STT model line"),
            (("--farm", self.FARM, "--max-upload", "0"), "--max-upload"),
            (("--farm", self.FARM, "--deadline", "0"), "--deadline"),
            (("--farm", self.FARM, "--attempts", "0"), "--attempts"),
            (("--farm", self.FARM, "--pool-size", "0"), "--pool-size"),
            (("--farm", self.FARM, "--listen", " "), "--listen"),
        ]
        for argv, reason in cases:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(reason, str(e), argv)


class BuildTests(SynchronousTestCase):
    def test_buildApi(self) -> None:
        exchange = FakeExchange()
        api, site = buildApi(
            ApiSettings(accounts="none", max_upload=1234, voice=("solo piper:en_US-joe-medium",)),
            exchange,
            Clock(),
        )
        self.assertIsInstance(api, PrivoxAPI)
        self.assertIsInstance(site, ApiSite)
        self.assertEqual((api.maxUpload, site.maxUpload), (1234, 1234))
        self.assertIs(api.exchange, exchange)
        self.assertEqual(api.access.description, "user keys open, no quotas")
        self.assertEqual(list(api.models.voices), ["solo"])

    def test_buildApiBadKeys(self) -> None:
        e = self.assertRaises(
            usage.UsageError, buildApi, ApiSettings(accounts="none", keys="/nonexistent/keys"), FakeExchange(), Clock()
        )
        self.assertIn("cannot read key allow-list file", str(e))

    def test_makeService(self) -> None:
        reactor = MemoryReactorClock()
        options = Options()
        options.parseOptions(["--farm", OptionsTests.FARM, "--listen", "tcp:8123"])
        top = makeService(options, reactor)
        self.assertIsInstance(top, MultiService)
        [exchange] = [s for s in top if isinstance(s, ExchangeService)]
        self.assertIsInstance(exchange.exchange, FarmExchange)
        top.startService()
        self.assertEqual(reactor.tcpServers[0][0], 8123)
        self.assertIsInstance(reactor.tcpServers[0][1].wrappedFactory, ApiSite)
        stopped = top.stopService()
        self.successResultOf(stopped)
        self.assertTrue(exchange.exchange.stopped)

    def test_exchangeServiceStopsExchange(self) -> None:
        class Stoppable:
            def __init__(self) -> None:
                self.d: Deferred[None] = Deferred()

            def stop(self) -> Deferred[None]:
                return self.d

        stoppable = Stoppable()
        service = ExchangeService(stoppable)
        service.startService()
        d = service.stopService()
        self.assertNoResult(d)
        stoppable.d.callback(None)
        self.successResultOf(d)

    def test_accountsServiceClosesStoreLast(self) -> None:
        """
        Stopping: the store closes only once the HTTP connections have, so a
        request ending meanwhile can still settle its seconds.
        """
        class Store:
            description = "a store"
            closed = False

            async def migrate(self) -> int:
                return 1

            def close(self) -> None:
                self.closed = True

        class Access:
            store = Store()

        class Connection:
            def __init__(self) -> None:
                self.transport = StringTransport()

        http = TrackedFactory(Site(Resource()))
        connection = Connection()
        http.registerProtocol(connection)
        service = AccountsService(Access(), MemoryReactor(), http)
        service.startService()
        stopped = service.stopService()
        self.assertTrue(connection.transport.disconnecting)
        self.assertFalse(Access.store.closed)
        self.assertNoResult(stopped)
        http.unregisterProtocol(connection)
        self.assertTrue(Access.store.closed)
        self.successResultOf(stopped)

    def test_plugin(self) -> None:
        """
        twistd finds privox-api (read from this checkout: an installed copy
        of the plugin module may be older).
        """
        plugins = ETC.sibling("twisted").child("plugins").child("privox_plugins.py")
        maker = runpy.run_path(plugins.path)["privoxApi"]
        self.assertEqual(maker.tapname, "privox-api")
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService, makeService)
