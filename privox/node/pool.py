"""
The node's engines: loaded once, at start-up, and driven from a thread pool
so the reactor stays free to answer PING while a model works.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from privox.engines.base import Segment, STTJob, Transcript, TTSJob
from privox.engines.errors import Unsupported
from privox.logs import logFigures
from privox.messages import TRANSLATE, parseSpeed
from privox.metrics import NodeMetrics
from privox.node.streams import LiveRun, SpeechRun
from privox.node.worker import Answer, Collected, JobRun
from privox.wav import wavSeconds

log = Logger()
T = TypeVar("T")


class EngineTime:
    """
    The time one job's engine calls took, summed in their threads (the calls
    of one job run one after another).
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, f: Callable[..., T], *args: Any) -> T:
        started = time.monotonic()
        try:
            return f(*args)
        finally:
            self.seconds += time.monotonic() - started


class EnginePool:
    """
    Every engine this node runs, by advertised model name, and the threads
    they run in.
    """

    def __init__(
        self,
        engines: list[Any],
        reactor: Any,
        threadpool: ThreadPool,
        metrics: NodeMetrics | None = None,
        blurUsage: bool = False,
    ) -> None:
        self.engines = {engine.name: engine for engine in engines}
        self._reactor = reactor
        self._threadpool = threadpool
        self.metrics = metrics
        self.blurUsage = blurUsage

    def inThread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def timed(self, meter: EngineTime, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        L{inThread}, adding the time C{f} takes in its thread to C{meter}.
        """
        return self.inThread(meter.run, f, *args)

    def jobDone(self, model: str, meter: EngineTime, outcome: str, bytesIn: int) -> None:
        """
        Count and log one job's engine time.
        """
        if self.metrics is not None:
            self.metrics.engineTime(model, meter.seconds)
        log.info(
            "{model} {outcome}: {ms} ms of engine time ({bytes_in} bytes in)",
            model=model,
            outcome=outcome,
            **logFigures(self.blurUsage, ms=meter.seconds * 1000, bytes_in=bytesIn),
        )

    def report(self, result: Any, model: str, meter: EngineTime, bytesIn: int) -> Any:
        """
        A callback for both outcomes of a job's last step: L{jobDone}, then
        C{result} passed on.
        """
        self.jobDone(model, meter, "failed" if isinstance(result, Failure) else "ok", bytesIn)
        return result

    async def load(self) -> None:
        """
        Load every model, one after another (each is memory-hungry), logging
        how long each took.
        """
        for name, engine in self.engines.items():
            log.info("loading {model}...", model=name)
            started = time.monotonic()
            await self.inThread(engine.load)
            log.info(
                "loaded {model} in {seconds:.1f} s", model=name, seconds=time.monotonic() - started
            )

    def handler(self, service: str) -> EngineHandler:
        return EngineHandler(
            self, {n: e for n, e in self.engines.items() if serviceOf(e) == service}
        )


def serviceOf(engine: Any) -> str:
    """
    C{stt} for an L{STTEngine} or L{StreamingSTTEngine}, else C{tts}.
    """
    return "tts" if hasattr(engine, "synthesize") else "stt"


def advertisedLanguages(engines: list[Any]) -> tuple[str, ...]:
    """
    The languages to put in HELO: the union of the engines', or () (any) if
    one of them takes any language.
    """
    languages: set[str] = set()
    for engine in engines:
        if not engine.languages:
            return ()
        languages.update(engine.languages)
    return tuple(sorted(languages))


class EngineHandler:
    """
    The L{JobHandler} of one service's slots: picks the engine by the job's
    model and runs it in the pool.
    """

    def __init__(self, pool: EnginePool, engines: dict[str, Any]) -> None:
        self._pool = pool
        self._engines = engines
        self.models = tuple(sorted(engines))
        self.languages = advertisedLanguages(list(engines.values()))
        #: STT tasks beyond transcribing that some engine here does.
        self.tasks: tuple[str, ...] = (
            (TRANSLATE,) if any(getattr(e, "translates", False) for e in engines.values()) else ()
        )
        #: Streaming jobs: every TTS engine speaks sentence by sentence; STT
        #: engines need a live transcription.
        self.streams = bool(engines) and all(
            serviceOf(e) == "tts" or hasattr(e, "liveTranscription") for e in engines.values()
        )

    def _engine(self, job: dict[str, Any]) -> Any:
        engine = self._engines.get(job.get("model"))
        if engine is None:
            raise Unsupported(f"this node does not serve model {job.get('model')!r}")
        return engine

    def start(self, job: dict[str, Any]) -> JobRun:
        engine = self._engine(job)
        if serviceOf(engine) == "stt":
            task = job.get("task") or "transcribe"
            if task == TRANSLATE and not getattr(engine, "translates", False):
                raise Unsupported(f"{job['model']} cannot translate (an English-only model?)")
            prompt, temperature = job.get("prompt"), job.get("temperature")
            stt = STTJob(
                job["model"], job.get("language"), job.get("format", "auto"), job["size"], task=task,
                prompt=prompt if isinstance(prompt, str) else None,
                temperature=float(temperature)
                if isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and 0 <= temperature <= 1
                else None,
                words=job.get("words") is True,
            )
            if job.get("stream") is True:
                return self._live(engine, stt)
            if hasattr(engine, "transcription"):
                return TranscriptionRun(self._pool, engine, stt)
            return Collected(lambda data: self._transcribe(engine, stt, data), stt.stop.set)
        tts = TTSJob(
            job["model"], job.get("language"), job.get("voice"), job.get("text") or "",
            speed=_speed(job.get("speed")) if hasattr(engine, "pacedSpeed") else 1.0,
        )
        if job.get("stream") is True:
            meter = EngineTime()
            return SpeechRun(
                lambda f, *a: self._pool.timed(meter, f, *a), engine, tts,
                lambda result: self._pool.report(result, tts.model, meter, 0),
            )
        return Collected(lambda _: self._synthesize(engine, tts), tts.stop.set)

    def _live(self, engine: Any, stt: STTJob) -> JobRun:
        if not hasattr(engine, "liveTranscription"):
            raise Unsupported(f"{stt.model} cannot transcribe a stream")
        meter = EngineTime()
        return LiveRun(
            lambda f, *a: self._pool.timed(meter, f, *a), engine, stt,
            lambda transcript: transcriptAnswer(transcript, stt.model),
            lambda result: self._pool.report(result, stt.model, meter, stt.size),
        )

    def _transcribe(self, engine: Any, stt: STTJob, data: bytes) -> Deferred[Answer]:
        meter = EngineTime()
        d = self._pool.timed(meter, engine.transcribe, stt, data)
        d.addBoth(self._pool.report, stt.model, meter, stt.size)
        return d.addCallback(transcriptAnswer, stt.model)

    def _synthesize(self, engine: Any, tts: TTSJob) -> Deferred[Answer]:
        meter = EngineTime()
        d = self._pool.timed(meter, _spoken, engine, tts)
        d.addBoth(self._pool.report, tts.model, meter, len(tts.text.encode("utf-8")))
        return d.addCallback(_speech, tts.model)


def transcriptAnswer(transcript: Transcript, model: str) -> Answer:
    fields: dict[str, Any] = {
        "text": transcript.text,
        "language": transcript.language,
        "duration_s": round(transcript.duration_s, 3),
        "model": model,
    }
    if transcript.segments:
        fields["segments"] = [_segment(s) for s in transcript.segments]
    return Answer(fields)


def _segment(segment: Segment) -> dict[str, Any]:
    """
    A segment as RSLT carries it (§6.2): C{words} only where it has some.
    """
    fields = dataclasses.asdict(segment)
    if segment.words:
        fields["words"] = list(fields["words"])
    else:
        del fields["words"]
    return fields


def _speed(value: Any) -> float:
    """
    A job's C{speed} as the engine takes it: 1 where absent or out of
    range (the farm checked it; a PVX/1 bridge may not have).
    """
    try:
        return parseSpeed(value, ValueError) or 1.0
    except ValueError:
        return 1.0


def _spoken(engine: Any, tts: TTSJob) -> tuple[bytes, float]:
    """
    The engine's speech, and the speed it spoke at (in its thread).
    """
    wav = engine.synthesize(tts)
    return wav, engine.pacedSpeed(tts.speed) if tts.speed != 1.0 else 1.0


def _speech(spoken: tuple[bytes, float], model: str) -> Answer:
    wav, speed = spoken
    return Answer(speechFields(wav, model, speed), wav)


def speechFields(wav: bytes, model: str, speed: float = 1.0) -> dict[str, Any]:
    """
    The RSLT fields of a TTS answer: its type, model, the speed it was
    spoken at where not 1 (§6.2) and, when the WAV's header can be read,
    C{duration_s} (seconds of audio synthesized), which the farm's ledger
    credits.
    """
    fields: dict[str, Any] = {"content_type": "audio/wav", "model": model}
    if speed != 1.0:
        fields["speed"] = speed
    seconds = wavSeconds(wav)
    if seconds is not None:
        fields["duration_s"] = round(seconds, 3)
    return fields


class TranscriptionRun:
    """
    One STT job of a streaming engine: every chunk goes to the engine's
    Transcription in order, in the pool, while the rest of the upload is
    still arriving.
    """

    def __init__(self, pool: EnginePool, engine: Any, job: STTJob) -> None:
        self._pool = pool
        self._job = job
        self._meter = EngineTime()
        # A chain that runs one step at a time, in order: start, feeds, finish.
        self._chain: Deferred[Any] = pool.timed(self._meter, engine.transcription, job)

    def feed(self, chunk: bytes) -> None:
        self._chain.addCallback(self._feed, chunk)

    def _feed(self, transcription: Any, chunk: bytes) -> Any:
        if self._job.stop.requested:
            return transcription
        return self._pool.timed(self._meter, transcription.feed, chunk).addCallback(
            lambda _: transcription
        )

    def finish(self) -> Deferred[Answer]:
        return (
            self._chain.addCallback(
                lambda transcription: self._pool.timed(self._meter, transcription.finish)
            )
            .addBoth(self._pool.report, self._job.model, self._meter, self._job.size)
            .addCallback(transcriptAnswer, self._job.model)
        )

    def cancel(self) -> None:
        self._job.stop.set()
