"""
Engines that need no model: C{digest} (STT) answers with a fingerprint of
the audio bytes, C{tone} (TTS) with a short WAV derived from the text. They
let an operator smoke-test a farm and a node end to end, and let tests check
that every answer belongs to its own request.
"""

from __future__ import annotations

import hashlib
from typing import Any

from privox.engines.base import STTJob, Transcript, TTSJob
from privox.engines.errors import EngineError
from privox.messages import ErrorCode
from privox.wav import pcmToWav


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
