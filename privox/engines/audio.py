"""
Audio in and out: decoding uploads (WAV, raw PCM, zip, containers PyAV reads)
to mono float32 at the rate a model wants, and writing WAV files.
"""

from __future__ import annotations

import io
import wave

import numpy as np
import numpy.typing as npt

from privox.engines.base import Audio


def encodeWav(samples: npt.NDArray[np.int16], rate: int) -> bytes:
    """
    A complete mono RIFF/WAVE file of 16-bit PCM.
    """
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return out.getvalue()


def toInt16(samples: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    """
    Float samples in [-1, 1] to 16-bit PCM (clipped).
    """
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def decodeAudio(data: bytes, format: str, rate: int = 16000) -> Audio:
    """
    Decode an upload to mono float32 at C{rate} Hz.

    @param format: C{wav}, C{pcm_s16le} (16 kHz mono), C{zip} (an archive
        holding C{sample.wav}) or C{auto} (sniffed: WAV, zip, or any container
        PyAV decodes: ogg, webm, mp3, flac...).
    @raise BadAudio: truncated, garbage or empty audio.
    """
    raise NotImplementedError("written in the audio-decoding change")
