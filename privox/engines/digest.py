"""
Engines that need no model: C{digest} (STT) answers with a fingerprint of
the audio bytes, C{tone} (TTS) with a short WAV derived from the text. They
let an operator smoke-test a farm and a node end to end, and let tests check
that every answer belongs to its own request.

C{sleep:RTF} (STT) takes time in proportion to the audio, as a real engine
does: it sleeps C{RTF} seconds per second of audio (C{sleep:0.1}: a minute
in 6 s), checking the job's stop as it goes, and answers with a
fingerprint of the samples (L{sleepTranscript}) and one segment of the
whole: for tests and benchmarks of fanning long recordings out
(L{privox.api.fanout}).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from privox.engines.base import ModelNotFound, Segment, STTJob, Transcript, TTSJob
from privox.engines.errors import EngineError
from privox.messages import ErrorCode
from privox.wav import BadWav, pcmToWav, wavPCM


def digestOf(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(hasher: Any, size: int) -> str:
    """
    The digest engine's transcript of C{size} bytes that went into C{hasher}
    (a C{hashlib} object, or one with the same C{name} and C{hexdigest}).
    """
    return f"{hasher.name.lower()}:{hasher.hexdigest()} bytes:{size}"


def toneFor(text: str, seconds: float = 0.1, rate: int = 16000) -> bytes:
    """
    A WAV whose samples are derived from C{text}: different texts give
    different audio, the same text the same audio.
    """
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    frames = int(seconds * rate) * 2
    samples = (seed * (frames // len(seed) + 1))[:frames]
    return pcmToWav(samples, rate)


class _DigestTranscription:
    def __init__(self, job: STTJob) -> None:
        self._job = job
        self._hash = hashlib.sha256()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)

    def finish(self) -> Transcript:
        # A duration as if the bytes were 16 kHz 16-bit mono, so the ledger
        # and producer credit have something real to count in smoke tests.
        text = fingerprint(self._hash, self._size)
        if self._job.task == "translate":
            # A model-free stand-in: says it translated, and what.
            return Transcript(f"translated {text}", "en", self._size / 32000)
        return Transcript(text, self._job.language, self._size / 32000)


class DigestEngine:
    def __init__(self, model: str, path: str | None = None) -> None:
        self.name = f"digest:{model}"
        self.languages: tuple[str, ...] = ()
        #: It "translates" (for tests of the route, with no model).
        self.translates = True

    def load(self) -> None:
        pass

    def transcription(self, job: STTJob) -> _DigestTranscription:
        return _DigestTranscription(job)


class ToneEngine:
    def __init__(self, model: str, path: str | None = None) -> None:
        self.name = f"tone:{model}"
        self.languages: tuple[str, ...] = ()
        self.voices: tuple[str, ...] = ()

    def load(self) -> None:
        pass

    def synthesize(self, job: TTSJob) -> bytes:
        if not job.text.strip():
            raise EngineError("no text to speak", ErrorCode.BAD_REQUEST)
        return toneFor(job.text)


#: The longest the sleep engine sleeps between two checks of a job's stop.
SLEEP_STEP = 0.05


def sleepTranscript(pcm: bytes, rate: int = 16000) -> str:
    """
    What the sleep engine says of C{pcm} (mono s16le samples at C{rate}).
    """
    return f"pcm:{hashlib.sha256(pcm).hexdigest()[:16]} seconds:{len(pcm) / 2 / rate:.2f}"


class SleepEngine:
    """
    C{sleep:RTF}: sleeps C{RTF} seconds per second of audio (in the node's
    thread pool, where every engine call runs), then answers with
    L{sleepTranscript} of the WAV's samples (or of the bytes, taken as
    16 kHz s16le, when they are not a WAV).
    """

    def __init__(self, model: str, path: str | None = None) -> None:
        self.name = f"sleep:{model}"
        self.languages: tuple[str, ...] = ()
        self.translates = True
        self._model = model
        self.rtf = 0.0

    def load(self) -> None:
        try:
            rtf = float(self._model)
        except ValueError:
            rtf = -1.0
        if not 0 <= rtf <= 100:
            raise ModelNotFound(
                f"{self.name}: the model is the real-time factor, a number from 0 to 100"
            )
        self.rtf = rtf

    def transcribe(self, job: STTJob, data: bytes) -> Transcript:
        try:
            pcm, rate = wavPCM(data)
        except BadWav:
            pcm, rate = data[: len(data) - len(data) % 2], 16000
        seconds = len(pcm) / 2 / rate
        until = time.monotonic() + self.rtf * seconds
        while True:
            job.stop.check()
            left = until - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, SLEEP_STEP))
        text = sleepTranscript(pcm, rate)
        return Transcript(text, job.language, seconds, (Segment(0.0, round(seconds, 3), text),))
