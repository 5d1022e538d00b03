"""
Engines that need no model: C{digest} (STT) answers with a fingerprint of
the audio bytes, C{tone} (TTS) with a short WAV derived from the text. They
let an operator smoke-test a farm and a node end to end, and let tests check
that every answer belongs to its own request.
"""

from __future__ import annotations

import hashlib

from privox.engines.base import STTJob, Transcript, TTSJob
from privox.engines.errors import EngineError
from privox.messages import ErrorCode
from privox.node.echo import toneFor


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
        return Transcript(
            f"sha256:{self._hash.hexdigest()} bytes:{self._size}",
            self._job.language,
            self._size / 32000,
        )


class DigestEngine:
    def __init__(self, model: str, path: str | None = None) -> None:
        self.name = f"digest:{model}"
        self.languages: tuple[str, ...] = ()

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
