"""
What the HTTP layer needs from the exchange behind it: run an STT or TTS job
somewhere, or say precisely why not. L{privox.api.farms.FarmExchange} is the
real one (farms over PVX/2, with retry and fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Transcribed:
    text: str
    model: str
    language: str | None
    duration_s: float | None


class Exchange(Protocol):
    async def transcribe(
        self, model: str, language: str | None, audio: bytes, format: str, deadline: float
    ) -> Transcribed:
        """
        @param format: C{wav}, C{pcm_s16le}, C{zip} or C{auto} (PVX/2's).
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
