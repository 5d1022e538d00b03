"""
Writing WAV files (mono 16-bit PCM in a RIFF/WAVE container) and reading how
long one lasts. Kept free of numpy so the command line, the API and the
farm's test engines can use it too.
"""

from __future__ import annotations

import io
import struct
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


def wavSeconds(data: bytes) -> float | None:
    """
    How many seconds of audio a RIFF/WAVE file holds, from its C{fmt} and
    C{data} chunk headers (the data counted as far as it is really there).

    @return: L{None} if C{data} is not a WAV file this can measure.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    bytesPerSecond = 0
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk == b"fmt " and size >= 16 and body + 16 <= len(data):
            bytesPerSecond = struct.unpack_from("<I", data, body + 8)[0]
        elif chunk == b"data":
            if not bytesPerSecond:
                return None
            # Streaming writers leave the size at 0 or 0xFFFFFFFF.
            available = len(data) - body
            present = available if size in (0, 0xFFFFFFFF) else min(size, available)
            return present / bytesPerSecond
        offset = body + size + (size & 1)
    return None
