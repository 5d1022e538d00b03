"""
A node's job handler with no engine behind it: answers every job with a
fingerprint of its input (L{privox.engines.digest}'s), on the reactor, with
no thread pool. It proves a farm relays the right bytes to the right peer
in tests and benchmarks, where the cost of a node must not count.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed

from privox.engines.digest import digestOf, fingerprint, toneFor
from privox.node.worker import Answer, Collected, JobRun
from privox.wav import wavSeconds


class DigestHandler:
    """
    STT: the "transcript" is C{sha256:<hex> bytes:<n>} of the audio (with
    another C{newHash}, that hash's name and digest: see L{fingerprint}).
    TTS: a short WAV derived from the text, with the text's digest in RSLT.
    """

    def __init__(
        self,
        models: tuple[str, ...] = ("*",),
        languages: tuple[str, ...] = (),
        newHash: Callable[[], Any] = hashlib.sha256,
    ) -> None:
        self.models = models
        self.languages = languages
        self._newHash = newHash

    def start(self, job: dict[str, Any]) -> JobRun:
        text = job.get("text")
        if isinstance(text, str):
            return Collected(lambda data: self.speak(job, text))
        return _Digesting(job, self._newHash())

    def speak(self, job: dict[str, Any], text: str) -> Answer:
        wav = toneFor(text)
        return Answer(
            {"content_type": "audio/wav", "model": job["model"],
             "text_sha256": digestOf(text.encode("utf-8")),
             "duration_s": wavSeconds(wav)},
            wav,
        )


class _Digesting:
    """
    An STT job of the digest engine: hashes the upload as it arrives, so the
    node never holds it whole.
    """

    def __init__(self, job: dict[str, Any], hasher: Any) -> None:
        self._model = job["model"]
        self._hash = hasher
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)

    def finish(self) -> Deferred[Answer]:
        return succeed(Answer(
            {"text": fingerprint(self._hash, self._size), "model": self._model}
        ))

    def cancel(self) -> None:
        pass
