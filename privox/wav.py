"""
Writing WAV files: mono 16-bit PCM in a RIFF/WAVE container. Kept free of
numpy so the command line and the farm's test engines can use it too.
"""

from __future__ import annotations

import io
import wave


def pcmToWav(pcm: bytes, rate: int) -> bytes:
    """
    A complete mono RIFF/WAVE file holding C{pcm} (s16le samples).
    """
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()
