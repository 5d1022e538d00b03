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
from privox.node.worker import Answer, Collected, JobRun, StreamSink
from privox.wav import wavPCM, wavSeconds


class DigestHandler:
    """
    STT: the "transcript" is C{sha256:<hex> bytes:<n>} of the audio (with
    another C{newHash}, that hash's name and digest: see L{fingerprint}).
    TTS: a short WAV derived from the text, with the text's digest in RSLT.
    Streaming jobs (L{_Echoing}): every piece of the upload is answered at
    once with a PART, then the whole is digested as above.
    """

    streams = True

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
        if job.get("stream") is True:
            return _Echoing(self, job, self._newHash())
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


class _Echoing:
    """
    A streaming job of the digest engine: a PART per piece of the upload,
    C{{"text": DIGEST, "final": true, "bytes": N}} for STT and the samples
    of the piece's tone (L{toneFor}) for TTS; then the whole job's answer.
    """

    def __init__(self, handler: DigestHandler, job: dict[str, Any], hasher: Any) -> None:
        self._handler = handler
        self._job = job
        self._digesting = _Digesting(job, hasher)
        # The farm forwards C{format} with STT jobs only.
        self._tts = "format" not in job
        self._text = bytearray(job.get("text") or "", "utf-8")
        self._sink: StreamSink | None = None

    def parts(self, sink: StreamSink) -> None:
        self._sink = sink

    def _send(self, answer: Answer) -> None:
        if self._sink is not None:
            self._sink.send(answer)

    def feed(self, chunk: bytes) -> None:
        self._digesting.feed(chunk)
        if self._tts:
            self._text += chunk
            pcm, rate = wavPCM(toneFor(chunk.decode("utf-8", "replace")))
            self._send(Answer(
                {"text_sha256": digestOf(chunk), "content_type": "audio/pcm", "rate": rate}, pcm
            ))
        else:
            self._send(Answer({"text": digestOf(chunk), "final": True, "bytes": len(chunk)}))

    def finish(self) -> Deferred[Answer]:
        if self._tts:
            return succeed(self._handler.speak(self._job, self._text.decode("utf-8", "replace")))
        return self._digesting.finish()

    def cancel(self) -> None:
        pass
