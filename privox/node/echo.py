"""
The digest engine: answers every job with a fingerprint of its input. It
proves a farm relays the right bytes to the right peer (tests, benchmarks,
and an operator's smoke test of a new farm) without loading a model.
"""

from __future__ import annotations

import hashlib
from typing import Any

from privox.node.worker import Answer, Collected
from privox.wav import pcmToWav, wavSeconds


def digestOf(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def toneFor(text: str, seconds: float = 0.1, rate: int = 16000) -> bytes:
    """
    A WAV whose samples are derived from C{text}: different texts give
    different audio, the same text the same audio.
    """
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    frames = int(seconds * rate) * 2
    samples = (seed * (frames // len(seed) + 1))[:frames]
    return pcmToWav(samples, rate)


class DigestEngine:
    """
    STT: the "transcript" is C{sha256:<hex> bytes:<n>} of the audio.
    TTS: a short WAV derived from the text, with the text's digest in RSLT.
    """

    def __init__(self, models: tuple[str, ...] = ("*",), languages: tuple[str, ...] = ()) -> None:
        self.models = models
        self.languages = languages

    def start(self, job: dict[str, Any]) -> Collected:
        return Collected(lambda data: self.run(job, data))

    def run(self, job: dict[str, Any], data: bytes) -> Answer:
        text = job.get("text")
        if isinstance(text, str):
            wav = toneFor(text)
            return Answer(
                {"content_type": "audio/wav", "model": job["model"],
                 "text_sha256": digestOf(text.encode("utf-8")),
                 "duration_s": wavSeconds(wav)},
                wav,
            )
        return Answer(
            {"text": f"sha256:{digestOf(data)} bytes:{len(data)}", "model": job["model"]}
        )
