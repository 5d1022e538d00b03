"""
The HTTP API as a Klein app: the original Privox routes (C{/stt}, C{/tts}),
OpenAI's audio routes (C{/v1/...}), a key's own C{/v1/account}, the farms'
C{/v1/ledger} and C{/v1/keys/validate}, the exchange's key and nodes'
enrolment (C{/v1/exchange}, C{/v1/enroll}), C{/healthz}, C{/status} (farms
and their load, JSON or HTML), C{/metrics} (Prometheus) and a front page.

Routes stay thin: L{privox.api.forms} reads and checks requests,
L{privox.api.access} says who may call and holds their audio seconds while
a job runs, L{privox.api.models} picks the model, the injected L{Exchange}
does the job. Every failure is an L{ApiError}, answered with its real status: a
one-line C{text/plain} reason on the original routes, OpenAI's
C{{"error": {"message", "type", "code"}}} on C{/v1}; C{Retry-After} when the
error carries one (503).

Privacy: each request is logged as one line of named fields (route, status,
bytes in and out, milliseconds, model, L{keyId} of the key; sizes and times
rounded with C{blurUsage}). Never the text,
the audio, the key, or the client's address; L{ApiSite} also turns off
twisted.web's access log, which would record addresses.

Bodies: L{privox.api.site.ApiSite} refuses a body over its route's limit
as it arrives (413 at once); L{privox.api.forms} parses what is let in, off
the reactor thread when it is large, after checking a key sent in the
headers. Audio is measured (L{privox.api.measure}) in a thread too.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Awaitable, Callable, TypeVar

from klein import Klein
from twisted.internet.defer import CancelledError, DeferredSemaphore, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from privox.api import forms, subtitles
from privox.api.access import Access, Caller, Grant
from privox.api.accountpages import AccountPages
from privox.api.enrolment import ExchangeKey, provenIdentity
from privox.api.errors import (
    ApiError,
    BadInput,
    NoProducer,
    NotServed,
    TimedOut,
    Unprocessable,
    errorBody,
)
from privox.api.exchange import Exchange, Spoken, Transcribed
from privox.api.fanout import DEFAULT_AT_ONCE, FanOut, InOrder, Progress
from privox.api.farmdirectory import REGISTRATION_LIMIT, FarmDirectory
from privox.api.farmstatus import unserved
from privox.api.live import LiveJobs
from privox.api.ledger import readLedger
from privox.api.measure import spokenSeconds
from privox.api.models import ModelTable
from privox.api.pages import frontPage, static, statusHtml
from privox.api.proxies import TrustedProxies
from privox.api.realtime import realtimeResource
from privox.api.site import ApiSite, bodyLimit
from privox.api.speech import CONTENT_TYPES, SpeechEncodingError, encodeSpeech
from privox.api.streaming import pcm16k, streamSpeech, streamTranscript
from privox.audiofile import MAX_DECODED_SECONDS, BadFile, uploadSeconds
from privox.identity import fingerprint
from privox.keys import accountId
from privox.logs import logFigures
from privox.messages import TRANSLATE
from privox.metrics import CONTENT_TYPE_LATEST, ApiMetrics, CollectorRegistry, render
from privox.wav import BadWav, cutWav, wavSeconds

#: The original exchange's upload limit.
DEFAULT_MAX_UPLOAD = 200 * 1024 * 1024

#: Seconds a request's hold on its key's allowance outlives its deadline (so
#: that it is settled, not expired, when the job ends just in time; and an
#: API that died mid-request holds nothing much longer than that).
HOLD_MARGIN = 5.0

#: Audio longer than this many seconds is cut into pieces transcribed by
#: several producers at once (L{privox.api.fanout}; C{--fanout-above}).
DEFAULT_FANOUT_ABOVE = 60.0

#: Runs C{f(*args)} in a thread and fires with its result.
Runner = Callable[..., Any]
T = TypeVar("T")

#: How many requests' blocking work (parsing, measuring) may run at once;
#: the rest wait their turn.
BLOCKING_AT_ONCE = 2

_PLAIN = b"text/plain; charset=utf-8"
_JSON = b"application/json"
_WAV = b"audio/wav"
#: What the original C{/tts} answered (its CGI printed this header).
_X_WAV = b"audio/x-wav"
_HTML = b"text/html; charset=utf-8"
_VTT = b"text/vtt; charset=utf-8"
_JS = b"text/javascript; charset=utf-8"

class _Done:
    """
    What a route did, for its log line. The model it sends the job to is
    also told to the client (C{X-Privox-Model}), as soon as it is chosen:
    before a streamed answer's first byte.
    """

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self._model: str | None = None
        self.caller: Caller | None = None

    @property
    def model(self) -> str | None:
        return self._model

    @model.setter
    def model(self, model: str | None) -> None:
        self._model = model
        if model is not None:
            self._request.setHeader(b"X-Privox-Model", model.encode("utf-8", "replace"))


Handler = Callable[[IRequest, _Done], Awaitable[bytes]]


class PrivoxAPI:
    """
    The Klein app. C{PrivoxAPI(...).app.resource()} is the resource;
    L{site} wraps it in an L{ApiSite}.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        exchange: Exchange,
        models: ModelTable,
        access: Access,
        maxUpload: int = DEFAULT_MAX_UPLOAD,
        clock: Any = None,
        registry: CollectorRegistry | None = None,
        farmStatus: Callable[[], Any] | None = None,
        blurUsage: bool = False,
        deadline: float = 60.0,
        runInThread: Runner | None = None,
        deadlinePerSecond: float = 1.0,
        exchangeKey: ExchangeKey | None = None,
        sealRequired: bool = False,
        fanout: int = DEFAULT_AT_ONCE,
        fanoutAbove: float = DEFAULT_FANOUT_ABOVE,
        farmDirectory: FarmDirectory | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        """
        @param registry: where the request series go and what C{/metrics}
            serves (shared with an in-process farm in privox-local); a new
            one if L{None}.
        @param farmStatus: returns (or fires with) a dict of farm name ->
            that farm's load (L{privox.farm.observe.farmStatus}), for C{/status};
            by default the exchange's own C{farmStatus}, if it has one.
        @param blurUsage: round sizes and times in the request log lines.
        @param deadline: seconds a request may take, plus
            C{deadlinePerSecond} for each second of its audio (the upload's,
            or the most its text may take to say); its hold on its key's
            allowance expires L{HOLD_MARGIN} seconds after that.
        @param runInThread: runs blocking work (parsing large bodies,
            measuring audio) off the reactor thread; default: the reactor's
            thread pool, at most L{BLOCKING_AT_ONCE} at a time (so that the
            rest of the pool, host name lookups included, stays free).
        @param sealRequired: jobs go only to nodes that seal (--e2e
            required): C{/status} calls a model served by none of those
            unserved.
        @param exchangeKey: the exchange's signing key, which
            C{/v1/exchange} publishes and C{/v1/enroll} certifies nodes
            with; without one both answer 404.
        @param fanout: pieces of a long recording in flight at once.
        @param fanoutAbove: recordings longer than this many seconds are
            cut into pieces of about 30 s transcribed at once
            (L{privox.api.fanout}), each with the deadline of its own
            length.
        @param proxies: the reverse proxies (C{--trusted-proxies}) whose
            C{X-Forwarded-For} and C{X-Forwarded-Proto} say who the client
            is and whether it came over TLS (L{privox.api.proxies}); none
            by default.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        if runInThread is None:
            from twisted.internet import reactor

            turns = DeferredSemaphore(BLOCKING_AT_ONCE)

            def runInThread(f: Callable[..., Any], *args: Any) -> Any:
                return turns.run(deferToThreadPool, reactor, reactor.getThreadPool(), f, *args)
        self.exchange = exchange
        self.models = models
        self.access = access
        self.maxUpload = maxUpload
        self.clock = clock
        self.registry = CollectorRegistry() if registry is None else registry
        self.metrics = ApiMetrics(self.registry)
        self.farmStatus = farmStatus or getattr(exchange, "farmStatus", None)
        self.blurUsage = blurUsage
        self.deadline = deadline
        self.deadlinePerSecond = deadlinePerSecond
        self.runInThread = runInThread
        self.exchangeKey = exchangeKey
        self.sealRequired = sealRequired
        self.fanoutAbove = fanoutAbove
        self.proxies = proxies if proxies is not None else TrustedProxies()
        #: Farms that joined by themselves, and the directory nodes read.
        self.farmDirectory = farmDirectory
        self.fanout = FanOut(exchange, clock, runInThread, atOnce=fanout)
        #: Streaming jobs (the streaming routes, the Wyoming server).
        self.live = LiveJobs(exchange, access, clock)
        #: OpenAI's realtime transcription sessions, over a WebSocket.
        self.realtimeSessions = realtimeResource(self.live, access, models, clock, blurUsage)
        #: /signup, /signin, /account and /about, for people in a browser.
        self.accountPages = AccountPages(
            getattr(access, "store", None), access, clock, self.statusReport,
            proxies=self.proxies,
        )

    def site(self) -> ApiSite:
        return ApiSite(
            self.app.resource(),
            self.maxUpload,
            refused=lambda route: self.metrics.request(route, 413, 0.0),
        )

    def _limit(self, request: IRequest) -> int:
        return bodyLimit(request.uri, self.maxUpload)

    # -- the original API -------------------------------------------------

    @app.route("/stt", methods=["POST"])
    async def stt(self, request: IRequest) -> bytes:
        return await self._serve(request, "/stt", self._stt, openai=False)

    async def _stt(self, request: IRequest, done: _Done) -> bytes:
        form = await forms.sttForm(request, self._limit(request), self.access, self.runInThread)
        done.caller = form.caller
        done.model = self.models.sttModel(form.quality, form.language)
        await self._fallBack(request, done)
        assert done.model is not None
        result = await self._transcribe(form.caller, done.model, form.language, form.audio)
        if forms.wantsJson(request):
            return _json(
                request,
                {
                    "text": result.text,
                    "model": result.model,
                    "language": result.language or form.language,
                    "duration_s": round(result.duration_s or 0.0, 3),
                },
            )
        return _reply(request, _PLAIN, _line(result.text))

    @app.route("/tts", methods=["POST"])
    async def tts(self, request: IRequest) -> bytes:
        return await self._serve(request, "/tts", self._tts, openai=False)

    async def _tts(self, request: IRequest, done: _Done) -> bytes:
        form = await forms.ttsForm(request, self._limit(request), self.access, self.runInThread)
        done.caller = form.caller
        voice = self.models.voice(form.voice)
        done.model = voice.model
        spoken = await self._synthesize(
            form.caller, voice.model, form.language, voice.speaker, form.text
        )
        return _reply(request, _X_WAV, spoken.wav)

    # -- OpenAI -----------------------------------------------------------

    @app.route("/v1/audio/transcriptions", methods=["POST"])
    async def transcriptions(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/audio/transcriptions", self._transcriptions)

    async def _transcriptions(self, request: IRequest, done: _Done) -> bytes:
        form = await forms.transcriptionForm(
            request, self._limit(request), self.access, self.runInThread
        )
        done.caller = form.caller
        done.model = self.models.openaiSttModel(form.model, form.language)
        await self._fallBack(request, done)
        model = done.model
        assert model is not None
        if form.stream:
            return await streamTranscript(
                request, self.live, self.runInThread, form.caller, model, form.language,
                form.audio,
                lambda: self._transcribe(
                    form.caller, model, form.language, form.audio,
                    prompt=form.prompt, temperature=form.temperature,
                ),
                asWhole=form.prompt is not None or form.temperature is not None,
                longAbove=self.fanoutAbove,
                long=lambda pcm, progress, inOrder: self._transcribe(
                    form.caller, model, form.language, form.audio,
                    prompt=form.prompt, temperature=form.temperature,
                    pcm=pcm, progress=progress, inOrder=inOrder,
                ),
            )
        result = await self._transcribe(
            form.caller, done.model, form.language, form.audio,
            prompt=form.prompt, temperature=form.temperature, words=form.words,
        )
        return self._transcript(request, form, result, form.language)

    @app.route("/v1/audio/translations", methods=["POST"])
    async def translations(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/audio/translations", self._translations)

    async def _translations(self, request: IRequest, done: _Done) -> bytes:
        form = await forms.transcriptionForm(
            request, self._limit(request), self.access, self.runInThread
        )
        done.caller = form.caller
        done.model = self.models.translationModel(form.model)
        try:
            result = await self._transcribe(
                form.caller, done.model, None, form.audio, TRANSLATE,
                prompt=form.prompt, temperature=form.temperature, words=form.words,
            )
        except NoProducer:
            raise Unprocessable(
                f"no connected node translates with {done.model}: translating needs a"
                " multilingual model (Whisper's, not an English-only .en one) on a node"
            ) from None
        return self._transcript(request, form, result, "en", "translate")

    def _transcript(
        self,
        request: IRequest,
        form: forms.TranscriptionForm,
        result: Transcribed,
        language: str | None,
        task: str = "transcribe",
    ) -> bytes:
        """
        A transcript (or translation) in OpenAI's C{response_format}; in
        C{verbose_json}, its segments and words as its
        C{timestamp_granularities[]} ask.
        """
        responseFormat = form.responseFormat
        if responseFormat == "text":
            return _reply(request, _PLAIN, _line(result.text))
        if responseFormat == "srt":
            return _reply(request, _PLAIN, subtitles.srt(subtitles.segmentsOf(result)).encode())
        if responseFormat == "vtt":
            return _reply(request, _VTT, subtitles.vtt(subtitles.segmentsOf(result)).encode())
        if responseFormat == "verbose_json":
            segments = subtitles.segmentsOf(result)
            verbose: dict[str, Any] = {
                "task": task,
                "language": result.language or language,
                "duration": result.duration_s,
                "text": result.text,
            }
            if form.segments:
                verbose["segments"] = subtitles.verboseSegments(segments)
            if form.words:
                # None where the producer timed none: never made up.
                verbose["words"] = subtitles.verboseWords(segments)
            return _json(request, verbose)
        return _json(request, {"text": result.text})

    @app.route("/v1/audio/speech", methods=["POST"])
    async def speech(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/audio/speech", self._speech)

    async def _speech(self, request: IRequest, done: _Done) -> bytes:
        form = await forms.speechForm(request, self._limit(request), self.access)
        done.caller = form.caller
        voice = self.models.openaiTtsVoice(form.model, form.voice)
        done.model = voice.model
        if form.streamFormat == "sse" and form.speed != 1.0:
            raise BadInput("speed cannot be changed with stream_format sse")
        if form.speed == 1.0:
            # Sentence by sentence: the first audio goes out once the first
            # sentence is spoken.
            return await streamSpeech(
                request, self.live, self.runInThread, form.caller, voice.model, voice.speaker,
                form.text, spokenSeconds(form.text), form.responseFormat,
                form.streamFormat == "sse",
            )
        # The producer's engine paces the speech where it can (Piper); the
        # rest of the way is a pitch-keeping stretch here.
        spoken = await self._synthesize(
            form.caller, voice.model, None, voice.speaker, form.text, form.speed
        )
        try:
            encoded = await self.runInThread(
                encodeSpeech, spoken.wav, form.responseFormat, form.speed / spoken.speed
            )
        except SpeechEncodingError as e:
            raise ApiError(str(e)) from None
        return _reply(request, CONTENT_TYPES[form.responseFormat].encode(), encoded)

    @app.route("/v1/realtime", methods=["GET"])
    def realtime(self, request: IRequest) -> Any:
        # Klein renders the resource: it upgrades the request to a WebSocket.
        return self.realtimeSessions

    @app.route("/v1/models", methods=["GET"])
    async def listModels(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/models", self._models)

    async def _models(self, request: IRequest, done: _Done) -> bytes:
        """
        The names a client may ask for whose model a connected producer
        serves now (each with the farm model it goes to); every name the
        tables know, with C{"served": null}, where no farm's load is known.
        """
        status = await self.statusReport()
        # A farm whose load is not known may serve what the others do not.
        missing = None if any(f["load"] is None for f in status["farms"]) else status.get("unserved")
        data = []
        for name in self.models.models():
            service, model = self.models.farmModel(name)
            served = None if missing is None else model not in missing.get(service, ())
            if served is False:
                continue
            data.append({
                "id": name, "object": "model", "created": 0, "owned_by": "privox",
                "privox_model": model, "service": service, "served": served,
            })
        return _json(request, {"object": "list", "data": data})

    async def _fallBack(self, request: IRequest, done: _Done) -> None:
        """
        C{done.model}, or the fallback the configuration names for it while
        no connected producer serves it (saying so: C{X-Privox-Fallback}).
        The farms' status is asked only where there is a fallback.
        """
        model = done.model
        fallback = self.models.sttFallbacks.get(model or "")
        if model is None or fallback is None:
            return
        status = await self.statusReport()
        missing = status.get("unserved")
        if missing is None or any(f["load"] is None for f in status["farms"]):
            return  # not known: the job goes to its own model
        unserved = missing.get("stt", ())
        if model in unserved and fallback not in unserved:
            done.model = fallback
            request.setHeader(b"X-Privox-Fallback", f"{model} -> {fallback}".encode())

    # -- charging for jobs -------------------------------------------------

    async def _transcribe(
        self,
        caller: Caller,
        model: str,
        language: str | None,
        audio: forms.Upload,
        task: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        words: bool = False,
        pcm: bytes | None = None,
        progress: Progress | None = None,
        inOrder: InOrder | None = None,
    ) -> Transcribed:
        """
        The transcript of C{audio}, charged to C{caller}: held on its
        allowance while the job runs, settled at the upload's length.
        Audio longer than C{fanoutAbove} is fanned out (C{pcm}: the upload
        already decoded to 16 kHz mono s16le, if it is), C{progress} and
        C{inOrder} hearing of its pieces.
        """
        # What the upload really is decides what it costs, whatever its
        # header or the producer says. Decoding costs CPU: not for a caller
        # with nothing left, and not twice (C{pcm}: decoded already).
        seconds = wavSeconds(audio.data)  # a PCM WAV's header: read at once
        if pcm is not None:
            seconds = len(pcm) / 32000
        elif seconds is None or not 0 < seconds <= MAX_DECODED_SECONDS:
            # Decoded (or refused, saying why) in a thread.
            await self.access.check(caller)
            try:
                seconds = await self.runInThread(uploadSeconds, audio.data, audio.format)
            except BadFile as e:
                raise BadInput(str(e)) from None
        deadline = self._deadline(seconds)
        grant = await self.access.admit(caller, seconds, deadline + HOLD_MARGIN)
        delivered = [0.0]  # seconds of pieces whose text the caller has
        if seconds > self.fanoutAbove:
            work = self._fanOut(
                audio, pcm, model, language, deadline, task, prompt, temperature, words,
                progress, None if inOrder is None else _counted(inOrder, delivered),
            )
        else:
            work = self.exchange.transcribe(
                model, language, audio.data, audio.format, deadline, task, prompt, temperature,
                words,
            )
        try:
            result: Transcribed = await self._within(work, seconds, "of audio")
        except BaseException:
            # What the caller was sent is paid for (a stream read to its
            # last piece, then dropped, is not free); the rest is not.
            if delivered[0]:
                await grant.settle(min(seconds, delivered[0]))
            else:
                await grant.release()
            raise
        await grant.settle(seconds)
        return dataclasses.replace(result, duration_s=seconds)

    async def _fanOut(
        self,
        audio: forms.Upload,
        pcm: bytes | None,
        model: str,
        language: str | None,
        deadline: float,
        task: str | None,
        prompt: str | None,
        temperature: float | None,
        words: bool,
        progress: Progress | None,
        inOrder: InOrder | None,
    ) -> Transcribed:
        """
        A long recording's transcript, its pieces transcribed at once
        (L{privox.api.fanout}), each within the deadline of its length.
        """
        if pcm is None:
            pcm = await self.runInThread(pcm16k, audio.data, audio.format)
        return await self.fanout.transcribe(
            pcm, model, language, deadline, self._deadline, task, prompt, temperature, words,
            progress, inOrder,
        )

    async def _synthesize(
        self, caller: Caller, model: str, language: str | None, voice: str | None, text: str,
        speed: float = 1.0,
    ) -> Spoken:
        # Admitted on what the text may take at most to say; given the
        # audio, never longer than that at the speed it was spoken (a longer
        # answer, from a rogue producer or an estimate that fell short, is
        # cut), and charged its length at the voice's own pace: the same for
        # any speed and any engine, paced or stretched.
        need = spokenSeconds(text)
        most = need / min(speed, 1.0)
        deadline = self._deadline(most)
        grant = await self.access.admit(caller, need, deadline + HOLD_MARGIN)
        spoken: Spoken = await _charged(
            grant,
            self._within(
                self.exchange.synthesize(model, language, voice, text, deadline, speed),
                most,
                "of speech at most",
            ),
        )
        try:
            audio, seconds = await self.runInThread(cutWav, spoken.wav, need / spoken.speed)
        except BadWav:
            await grant.release()
            raise ApiError("the producer's answer is not a WAV file") from None
        await grant.settle(min(need, seconds * spoken.speed))
        return Spoken(audio, spoken.speed)

    def _deadline(self, seconds: float) -> float:
        """
        The seconds a job with C{seconds} of audio may take.
        """
        return round(self.deadline + self.deadlinePerSecond * seconds, 3)

    async def _within(self, work: Awaitable[T], seconds: float, what: str) -> T:
        """
        C{work}'s result; a timeout says how its deadline was made.
        """
        try:
            return await work
        except TimedOut as e:
            raise TimedOut(
                f"{e.message}: the deadline for {seconds:.1f} s {what} is {self.deadline:g} s"
                f" + {self.deadlinePerSecond:g} s per second of audio"
            ) from None

    # -- accounts and the ledger ------------------------------------------

    @app.route("/v1/account", methods=["GET"])
    async def account(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/account", self._account)

    async def _account(self, request: IRequest, done: _Done) -> bytes:
        done.caller = await forms.authorize(request, self.access)
        return _json(request, await self.access.standing(done.caller))

    @app.route("/v1/ledger", methods=["POST"])
    async def ledger(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/ledger", self._ledger)

    async def _ledger(self, request: IRequest, done: _Done) -> bytes:
        farm = await self.access.authorizeFarm(forms.findKey(request))
        size = forms.bodySize(request, self._limit(request))
        body = request.content.read() if size else b""
        if size > forms.INLINE_PARSE:
            records = await self.runInThread(readLedger, body)
        else:
            records = readLedger(body)
        recorded, duplicates = await self.access.record(farm, records)
        return _json(request, {"recorded": recorded, "duplicates": duplicates})

    @app.route("/v1/keys/validate", methods=["POST"])
    async def validate(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/keys/validate", self._validate, openai=False)

    async def _validate(self, request: IRequest, done: _Done) -> bytes:
        await self.access.authorizeFarm(forms.findKey(request))
        fields = forms.readForm(request, forms.bodySize(request, self._limit(request)))
        key = fields.text("key")
        if key is None:
            raise BadInput("the key field is required")
        valid = await self.access.validate(key)
        # The answer farms' URL key policies read: a positive integer admits.
        return _reply(request, _PLAIN, b"1\n" if valid else b"0\n")

    # -- the exchange's key and nodes' certificates -----------------------

    @app.route("/v1/exchange", methods=["GET"])
    async def exchangeInfo(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/exchange", self._exchangeInfo)

    async def _exchangeInfo(self, request: IRequest, done: _Done) -> bytes:
        return _json(request, {"key": self._exchangeKey().publicText})

    @app.route("/v1/enroll", methods=["POST"])
    async def enroll(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/enroll", self._enroll)

    async def _enroll(self, request: IRequest, done: _Done) -> bytes:
        exchangeKey = self._exchangeKey()
        # The key first, as on every route: a caller without a good one
        # learns nothing about its body.
        key = forms.findKey(request)
        account = await self.access.authorizeNode(key)
        done.caller = Caller(key)
        size = forms.bodySize(request, self._limit(request))
        assert key is not None  # authorizeNode refuses none
        identity = provenIdentity(request.content.read() if size else b"", accountId(key))
        # The whole account id (not the key id): a farm that knows the
        # exchange credits the node by it without ever seeing its key.
        certificate = exchangeKey.issue(identity, accountId(key), self.clock.seconds())
        store = getattr(self.access, "store", None)
        if store is not None:
            # For the key's own account page.
            await store.recordEnrolment(
                fingerprint(identity), account, self.clock.seconds(), certificate.expires
            )
        self.log.info(
            "enrolled node {node} of key {keyId} until {expires}",
            node=fingerprint(identity),
            keyId=account,
            expires=certificate.expires,
        )
        return _json(request, {"certificate": certificate.text, "expires": certificate.expires})

    # -- farms that join, and their signed directory (issue 22) ----------

    @app.route("/v1/farms", methods=["GET"])
    async def farms(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/farms", self._farms, openai=False)

    async def _farms(self, request: IRequest, done: _Done) -> bytes:
        return _json(request, self._directory().signed(self.clock.seconds()))

    @app.route("/v1/farms", methods=["POST"])
    async def registerFarm(self, request: IRequest) -> bytes:
        return await self._serve(request, "/v1/farms", self._registerFarm, openai=False)

    async def _registerFarm(self, request: IRequest, done: _Done) -> bytes:
        directory = self._directory()
        account = await self.access.authorizeFarm(forms.findKey(request))
        size = forms.bodySize(request, min(self._limit(request), REGISTRATION_LIMIT))
        try:
            fields = json.loads(request.content.read() if size else b"")
        except ValueError:
            raise BadInput("a farm registers with a JSON object: name, stt, tts") from None
        return _json(request, await directory.register(account[:12], fields))

    def _directory(self) -> FarmDirectory:
        if self.farmDirectory is None:
            raise NotServed("farms do not join this API by themselves")
        return self.farmDirectory

    def _exchangeKey(self) -> ExchangeKey:
        if self.exchangeKey is None:
            raise NotServed("this API holds no exchange key")
        return self.exchangeKey

    # -- the rest ---------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        return await self._serve(request, "/healthz", self._health, openai=False)

    async def _health(self, request: IRequest, done: _Done) -> bytes:
        return _json(request, {**self.exchange.health(), "status": "ok"})

    @app.route("/", methods=["GET"])
    async def home(self, request: IRequest) -> bytes:
        return await self._serve(request, "/", self._home, openai=False)

    async def _home(self, request: IRequest, done: _Done) -> bytes:
        host = request.getHeader(b"host")
        scheme = "https" if self.proxies.ofRequest(request).secure else "http"
        base = f"{scheme}://" + (host.decode("latin-1") if host else "localhost:8080")
        page = frontPage(base, self.models, self.access.keyExample)
        return _reply(request, _HTML, page.encode("utf-8"))

    # -- the account pages (privox.api.accountpages) ----------------------

    @app.route("/signup", methods=["GET", "POST"])
    async def signupPage(self, request: IRequest) -> bytes:
        return await self._serve(request, "/signup", self.accountPages.signup, openai=False)

    @app.route("/signin", methods=["GET", "POST"])
    async def signinPage(self, request: IRequest) -> bytes:
        return await self._serve(request, "/signin", self.accountPages.signin, openai=False)

    @app.route("/signout", methods=["POST"])
    async def signoutPage(self, request: IRequest) -> bytes:
        return await self._serve(request, "/signout", self.accountPages.signout, openai=False)

    @app.route("/account", methods=["GET"])
    async def accountPage(self, request: IRequest) -> bytes:
        return await self._serve(request, "/account", self.accountPages.account, openai=False)

    @app.route("/about", methods=["GET"])
    async def aboutPage(self, request: IRequest) -> bytes:
        return await self._serve(request, "/about", self.accountPages.about, openai=False)

    @app.route("/static/page.js", methods=["GET"])
    async def pageScript(self, request: IRequest) -> bytes:
        return await self._serve(request, "/static/page.js", self._pageScript, openai=False)

    async def _pageScript(self, request: IRequest, done: _Done) -> bytes:
        return _reply(request, _JS, static("page.js").encode("utf-8"))

    @app.route("/metrics", methods=["GET"])
    async def prometheus(self, request: IRequest) -> bytes:
        return await self._serve(request, "/metrics", self._metrics, openai=False, quiet=True)

    async def _metrics(self, request: IRequest, done: _Done) -> bytes:
        return _reply(request, CONTENT_TYPE_LATEST.encode("ascii"), render(self.registry))

    @app.route("/status", methods=["GET"])
    async def status(self, request: IRequest) -> bytes:
        return await self._serve(request, "/status", self._status, openai=False, quiet=True)

    async def _status(self, request: IRequest, done: _Done) -> bytes:
        status = await self.statusReport()
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        if "text/html" in accept:
            return _reply(request, _HTML, statusHtml(status).encode("utf-8"))
        return _json(request, status)

    async def statusReport(self) -> dict[str, Any]:
        """
        The farms, each with its load where known, and (when any load is
        known) C{unserved}: per service, the models the tables send jobs to
        that no connected producer serves.
        """
        farms = [dict(farm) for farm in self.exchange.health().get("farms", [])]
        loads: dict[str, Any] = {}
        if self.farmStatus is not None:
            try:
                loads = await maybeDeferred(self.farmStatus) or {}
            except Exception:
                self.log.failure("farm status failed")
        for farm in farms:
            farm["load"] = loads.get(farm.get("name"))
        status: dict[str, Any] = {"farms": farms}
        missing = unserved(
            self.models.byService(), {f["name"]: f["load"] for f in farms}, self.sealRequired
        )
        if missing is not None:
            status["unserved"] = missing
        return status

    # -- errors and logging -----------------------------------------------

    @app.handle_errors(NotFound, MethodNotAllowed)
    def routingError(self, request: IRequest, failure: Failure) -> bytes:
        """
        No such route or method: the same error shapes as the routes' own.
        """
        http = failure.value
        error = ApiError("not found" if isinstance(http, NotFound) else "method not allowed")
        error.status = http.code
        error.kind = "not_found" if isinstance(http, NotFound) else "method_not_allowed"
        if isinstance(http, MethodNotAllowed) and http.valid_methods:
            request.setHeader(b"Allow", ", ".join(http.valid_methods).encode("ascii"))
        return self._error(request, error, openai=request.path.startswith(b"/v1/"))

    async def _serve(
        self,
        request: IRequest,
        route: str,
        handler: Handler,
        openai: bool = True,
        quiet: bool = False,
    ) -> bytes:
        """
        Run C{handler}, answer its errors, count the request and log it
        (unless C{quiet}: scrapes are counted, not logged).
        """
        started = self.clock.seconds()
        done = _Done(request)
        try:
            body = await handler(request, done)
        except ApiError as e:
            body = self._error(request, e, openai)
        except CancelledError:
            self.metrics.request(route, 499, self.clock.seconds() - started)
            self._logRequest(request, route, 499, 0, started, done)
            raise
        except Exception:
            self.log.failure("{route} failed", route=route)
            body = self._error(request, ApiError("internal error"), openai)
        self.metrics.request(route, request.code, self.clock.seconds() - started)
        if not quiet:
            self._logRequest(request, route, request.code, len(body), started, done)
        return body

    def _error(self, request: IRequest, error: ApiError, openai: bool) -> bytes:
        request.setResponseCode(error.status)
        if error.retryAfter is not None:
            request.setHeader(b"Retry-After", str(error.retryAfter).encode("ascii"))
        return _reply(request, *errorBody(error, openai))

    def _logRequest(
        self, request: IRequest, route: str, status: int, size: int, started: float, done: _Done
    ) -> None:
        self.log.info(
            "{route} {status}: {received} bytes in, {bytes} out, {ms} ms"
            " (model {model}, key {keyId})",
            route=route,
            status=status,
            model=done.model,
            **logFigures(
                self.blurUsage,
                ms=(self.clock.seconds() - started) * 1000,
                received=_received(request),
                bytes=size,
            ),
            keyId=done.caller.keyId if done.caller is not None else None,
        )


def _counted(inOrder: InOrder, delivered: list[float]) -> InOrder:
    """
    C{inOrder}, adding up the seconds of the pieces it is given.
    """

    def told(piece: Any, result: Transcribed) -> None:
        delivered[0] += piece.seconds
        inOrder(piece, result)

    return told


async def _charged(grant: Grant, work: Awaitable[Any]) -> Any:
    """
    C{work}'s result; if it fails (or is cancelled) the request costs
    nothing.
    """
    try:
        return await work
    except BaseException:
        await grant.release()
        raise


def _received(request: IRequest) -> int:
    """
    How many body bytes the request brought.
    """
    content = request.content
    if content is None or content.closed:  # the client went away
        return 0
    position = content.tell()
    content.seek(0, 2)
    size = content.tell()
    content.seek(position, 0)
    return int(size)


def _reply(request: IRequest, contentType: bytes, body: bytes) -> bytes:
    request.setHeader(b"Content-Type", contentType)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _line(text: str) -> bytes:
    """
    A plain-text answer as one line ending in exactly one C{\\n}, as the
    original printed it: a shell prompt after curl then starts on a line of
    its own, and the original web page's proxy cuts a fixed four characters
    off the C{repr} of the body (its C{\\n}, quote and a newline).
    """
    return text.rstrip("\r\n").encode("utf-8") + b"\n"


def _json(request: IRequest, value: Any) -> bytes:
    return _reply(request, _JSON, json.dumps(value, ensure_ascii=False).encode("utf-8"))
