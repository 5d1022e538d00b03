"""
Synthesized speech in the formats OpenAI's C{/v1/audio/speech} offers:
the WAV a producer answers, encoded with PyAV (FFmpeg) as the client asked.
Blocking: the app runs L{encodeSpeech} in its thread pool.
"""

from __future__ import annotations

import io
from typing import Any

import av

#: response_format -> Content-Type, as OpenAI names them.
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: OpenAI's default format.
DEFAULT_FORMAT = "mp3"
#: C{pcm}: raw signed 16-bit little-endian mono samples at this rate.
PCM_RATE = 24000

# response_format -> (container, encoder, rate or None for the speech's own).
_ENCODINGS: dict[str, tuple[str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", None),
    "opus": ("ogg", "libopus", 48000),  # Opus runs at 48 kHz (or 24, 16...)
    "aac": ("adts", "aac", None),
    "flac": ("flac", "flac", None),
}


class SpeechEncodingError(ValueError):
    """
    The producer's answer is not audio that can be encoded.
    """


def encodeSpeech(wav: bytes, format: str) -> bytes:
    """
    The speech in C{wav} (a producer's WAV) as C{format}, one of
    L{CONTENT_TYPES}: mono, at the speech's own rate (Opus: 48 kHz; C{pcm}:
    24 kHz, headerless).

    @raise SpeechEncodingError: C{wav} does not decode.
    """
    if format == "wav":
        return wav
    try:
        if format == "pcm":
            return b"".join(
                bytes(frame.planes[0])[: frame.samples * 2]
                for frame in _decoded(wav, "s16", PCM_RATE)
            )
        container, codec, rate = _ENCODINGS[format]
        return _encoded(wav, container, codec, rate)
    except av.FFmpegError as e:
        raise SpeechEncodingError(f"the synthesized audio does not decode: {e}") from None


def _speechRate(wav: bytes) -> int:
    with av.open(io.BytesIO(wav)) as source:
        return int(source.streams.audio[0].rate)


def _decoded(wav: bytes, sampleFormat: str, rate: int) -> list[Any]:
    """
    The frames of C{wav}, resampled to mono C{sampleFormat} at C{rate}.
    """
    resampler = av.AudioResampler(format=sampleFormat, layout="mono", rate=rate)
    frames: list[Any] = []
    with av.open(io.BytesIO(wav)) as source:
        for frame in source.decode(audio=0):
            frames += resampler.resample(frame)
    frames += resampler.resample(None)
    return frames


def _encoded(wav: bytes, container: str, codec: str, rate: int | None) -> bytes:
    rate = rate or _speechRate(wav)
    out = io.BytesIO()
    with av.open(out, "w", format=container) as target:
        stream = target.add_stream(codec, rate=rate, layout="mono")
        context = stream.codec_context
        # Encoders such as AAC and Opus take frames of one size only.
        fifo = av.AudioFifo()
        for frame in _decoded(wav, context.format.name, rate):
            fifo.write(frame)
        size = context.frame_size or 1024
        while fifo.samples:
            frame = fifo.read(size, partial=True)
            frame.pts = None
            for packet in stream.encode(frame):
                target.mux(packet)
        for packet in stream.encode(None):
            target.mux(packet)
    return out.getvalue()
