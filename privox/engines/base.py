"""
What every engine is: the small interfaces the node drives, the types they
exchange, and the errors that become precise PVX/2 FAIL codes.

Engines are blocking code. The node calls every method here in a thread pool,
never on the reactor thread; an engine is loaded once (L{STTEngine.load},
L{TTSEngine.load}) and then serves job after job. An engine that cannot run
two jobs at once guards itself with a lock.

Model names are what the API asks for and what a node advertises in HELO:
C{ENGINE:MODEL}, e.g. C{whisper:tiny.en}, C{vosk:ko}, C{piper:en_US-joe-medium},
C{coqui:tts_models/en/vctk/vits}.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from privox.engines.errors import BadAudio, Cancelled, EngineError, Unsupported
from privox.messages import CONTROL_CHARACTERS, MAX_TEXT, ErrorCode

__all__ = ["BadAudio", "Cancelled", "EngineError", "Unsupported"]


def checkText(engine: str, text: str) -> None:
    """
    Refuse TTS text that is blank or longer than L{MAX_TEXT}, before any
    synthesis starts.
    """
    if not text.strip():
        raise EngineError("there is no text to speak", ErrorCode.BAD_REQUEST)
    if CONTROL_CHARACTERS.search(text):
        raise EngineError("the text contains control characters", ErrorCode.BAD_REQUEST)
    if len(text) > MAX_TEXT:
        raise EngineError(
            f"text is {len(text)} characters; {engine} takes at most {MAX_TEXT}",
            ErrorCode.TOO_LARGE,
        )


class ModelNotFound(Exception):
    """
    A model named at start-up cannot be found or loaded (a configuration
    error: the node refuses to start).
    """


class Stop:
    """
    A job's cancellation: set from the reactor (CNCL, a consumer gone),
    checked by its engine between two pieces of work (a Whisper segment, a
    block of Vosk audio, a sentence), so cancelled work ends within about a
    second instead of running on for minutes.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """
        @raise Cancelled: the job was cancelled.
        """
        if self._event.is_set():
            raise Cancelled()


@dataclass(frozen=True)
class Word:
    """
    One word of a segment and when it was said (seconds from the start of
    the audio, within its segment's times), with the engine's confidence
    in it (0 to 1) where it has one. C{word} has no surrounding spaces.
    """

    start: float
    end: float
    word: str
    probability: float | None = None


def fitWords(
    timed: Iterable[tuple[float, float, str, float | None]], start: float, end: float
) -> tuple[Word, ...]:
    """
    An engine's words (start, end, text, probability) as a segment from
    C{start} to C{end} carries them: the text stripped, blank ones left
    out, times rounded to the millisecond, each within the segment and
    starting no earlier than the one before ends; the probability from 0
    to 1.
    """
    out = []
    last = start
    for first, stop, text, probability in timed:
        text = text.strip()
        if not text or not (math.isfinite(first) and math.isfinite(stop)):
            continue
        # float(): engines hand over NumPy's floats.
        first = min(max(round(float(first), 3), last), end)
        stop = min(max(round(float(stop), 3), first), end)
        out.append(Word(
            first, stop, text,
            round(min(max(float(probability), 0.0), 1.0), 4)
            if probability is not None and math.isfinite(probability)
            else None,
        ))
        last = stop
    return tuple(out)


@dataclass(frozen=True)
class Segment:
    """
    A stretch of a transcript and when it was said (seconds from the start),
    with its words where the job asked for them (L{STTJob.words}) and the
    engine can time them.
    """

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str | None
    duration_s: float
    #: In order; empty where the engine gives none (then the API makes one
    #: segment of the whole).
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class STTJob:
    """
    What the node knows of an STT job (from the farm's JOB_).
    """

    model: str
    language: str | None
    format: str  # wav | pcm_s16le | zip | auto
    size: int
    stop: Stop = field(default_factory=Stop, compare=False, repr=False)
    #: C{transcribe}, or C{translate} (to English: engines whose
    #: C{translates} is true).
    task: str = "transcribe"
    #: Text before the audio (names, spellings), and the sampling
    #: temperature: for engines that have them (Whisper).
    prompt: str | None = None
    temperature: float | None = None
    #: Time each word too (L{Segment.words}): it costs Whisper extra work,
    #: so only when asked. Live Whisper finals ignore it.
    words: bool = False


@dataclass(frozen=True)
class TTSJob:
    model: str
    language: str | None
    voice: str | None
    text: str
    stop: Stop = field(default_factory=Stop, compare=False, repr=False)
    #: How fast to speak (1: the voice's own pace), for engines that have
    #: C{pacedSpeed}; the node gives the others 1.
    speed: float = 1.0


class Transcription(Protocol):
    """
    One STT job of a streaming engine in progress. The node calls L{feed}
    with the upload's bytes in order as they arrive, then L{finish} once;
    all calls come from one worker thread at a time.
    """

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Transcript: ...


@dataclass(frozen=True)
class Partial:
    """
    A live transcript's piece: the hypothesis of the utterance being spoken
    (C{final} false: the next piece replaces it), or the utterance as it
    stands for good (C{final}); seconds from the start of the stream.
    """

    text: str
    final: bool
    start: float
    end: float


class LiveTranscription(Protocol):
    """
    One streaming STT job (PVX/2 C{"stream": true}): audio arrives as it is
    captured, for as long as the speaker talks, and pieces of the
    transcript go back while it does. All calls come from one worker
    thread at a time, in order.
    """

    def feed(self, chunk: bytes) -> list[Partial]:
        """
        The next bytes of the stream (the job's C{format}: C{pcm_s16le} at
        16 kHz mono, or a WAV's header then its samples), in any split.

        @return: the pieces recognized since the last call, in order.
        """

    def finish(self) -> Transcript:
        """
        The stream has ended: the whole transcript (every utterance,
        including the one still open), with a segment per utterance.
        """


class LiveSTTEngine(Protocol):
    """
    An engine that can transcribe a stream live (as well as whole jobs).
    """

    def liveTranscription(self, job: STTJob) -> LiveTranscription:
        """
        @raise EngineError: e.g. an unsupported language.
        """


class STTEngine(Protocol):
    """
    An engine that needs the whole upload: the node collects it, then
    calls L{transcribe} once in its thread pool.
    """

    #: The advertised model name, e.g. "whisper:tiny.en".
    name: str
    #: Languages it serves; () means any.
    languages: tuple[str, ...]

    def load(self) -> None:
        """
        Load the model (blocking, once, at start-up).

        @raise ModelNotFound: the model is missing or broken.
        """

    def transcribe(self, job: STTJob, data: bytes) -> Transcript:
        """
        Transcribe the whole upload, checking C{job.stop} as it goes.

        @raise EngineError: e.g. an unsupported language, bad audio.
        """


class StreamingSTTEngine(Protocol):
    """
    An engine that works while the upload is still arriving.
    """

    name: str
    languages: tuple[str, ...]

    def load(self) -> None: ...

    def transcription(self, job: STTJob) -> Transcription:
        """
        Start a job (its transcription checks C{job.stop} as it goes).

        @raise EngineError: e.g. an unsupported language.
        """


class TTSEngine(Protocol):
    """
    An engine may also pace its speech itself: its C{pacedSpeed(speed)}
    says the speed it speaks at when a job's C{speed} asks for C{speed}
    (blocking; called in a worker thread after L{synthesize}). Without it,
    the job's speed is 1 and the API stretches the speech instead.
    """

    name: str
    languages: tuple[str, ...]
    #: Voice names it accepts (None means its default voice); () = only default.
    voices: tuple[str, ...]

    def load(self) -> None: ...

    def synthesize(self, job: TTSJob) -> bytes:
        """
        Return a complete WAV file (RIFF, PCM s16le); C{job.stop} is checked
        between sentences.

        @raise EngineError: unknown voice, unsupported language, text too long.
        """


def findPackaged(package: str, *parts: str) -> Path | None:
    """
    The path of a model shipped inside an installed Python package (found
    offline, without importing the package), or None.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *parts)
        if candidate.exists():
            return candidate
    return None
