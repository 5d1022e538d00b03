"""
What the HTTP layer needs from the exchange behind it: run an STT or TTS job
somewhere, or say precisely why not. L{privox.api.farms.FarmExchange} is the
real one (farms over PVX/2, with retry and fallback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

#: The most segments an answer is taken with (a 2-hour recording has ~1,500).
MAX_SEGMENTS = 20_000


@dataclass(frozen=True)
class TimedText:
    """
    A segment of a transcript: when it was said (seconds) and what.
    """

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class Transcribed:
    text: str
    model: str
    language: str | None
    duration_s: float | None
    #: In order; empty where the producer gave none.
    segments: tuple[TimedText, ...] = ()


def readSegments(value: Any) -> tuple[TimedText, ...]:
    """
    A producer's C{segments}, if they are what they should be (in order,
    times that make sense); else none (a producer is a stranger: its
    malformed segments are not passed on).
    """
    if not isinstance(value, list) or len(value) > MAX_SEGMENTS:
        return ()
    out: list[TimedText] = []
    last = 0.0
    for item in value:
        if not isinstance(item, dict):
            return ()
        start, end, text = item.get("start"), item.get("end"), item.get("text")
        if not (_number(start) and _number(end) and isinstance(text, str)):
            return ()
        if not last - 0.001 <= start <= end:
            return ()
        last = end
        scores = [item.get(k) for k in ("avg_logprob", "no_speech_prob")]
        out.append(TimedText(
            float(start), float(end), text.strip()[:10_000],
            *(float(v) if _number(v, negative=True) else None for v in scores),
        ))
    return tuple(out)


def _number(value: Any, negative: bool = False) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (negative or value >= 0)
    )


class Exchange(Protocol):
    async def transcribe(
        self,
        model: str,
        language: str | None,
        audio: bytes,
        format: str,
        deadline: float,
        task: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
    ) -> Transcribed:
        """
        @param format: C{wav}, C{pcm_s16le}, C{zip} or C{auto} (PVX/2's).
        @param task: C{translate} (to English), or L{None} to transcribe.
        @param prompt: text before the audio, for the engine (names, style).
        @param temperature: the engine's sampling temperature, 0 to 1.
        @param deadline: seconds the job may take, every attempt included.
        @raise privox.api.errors.ApiError: the job could not be done
            (L{privox.api.errors.TimedOut} past C{deadline}).
        """

    async def synthesize(
        self, model: str, language: str | None, voice: str | None, text: str, deadline: float
    ) -> bytes:
        """
        @return: a WAV file.
        @raise privox.api.errors.ApiError: the job could not be done.
        """

    def health(self) -> dict[str, Any]:
        """
        Farms and whether each is reachable, for GET /healthz (no identities).
        """
