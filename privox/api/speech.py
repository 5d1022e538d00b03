"""
Synthesized speech in the formats OpenAI's C{/v1/audio/speech} offers:
the WAV a producer answers, at the speed asked for (a pitch-keeping time
stretch, FFmpeg's C{atempo}), encoded with PyAV (FFmpeg) as the client
asked. Blocking: the app runs L{encodeSpeech} in its thread pool.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Iterable

import av

from privox.wav import pcmToWav

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
    "wav": ("wav", "pcm_s16le", None),
}
# One atempo filter changes the tempo by 0.5 to 2 (older FFmpegs): slower
# or faster speeds chain several.
_ATEMPO_RANGE = (0.5, 2.0)


class SpeechEncodingError(ValueError):
    """
    The producer's answer is not audio that can be encoded.
    """


def encodeSpeech(wav: bytes, format: str, speed: float = 1.0) -> bytes:
    """
    The speech in C{wav} (a producer's WAV) at C{speed} as C{format}, one
    of L{CONTENT_TYPES}: mono, at the speech's own rate (Opus: 48 kHz;
    C{pcm}: 24 kHz, headerless).

    @raise SpeechEncodingError: C{wav} does not decode.
    """
    if format == "wav" and speed == 1.0:
        return wav
    try:
        with av.open(io.BytesIO(wav)) as source:
            stream = source.streams.audio[0]
            rate = int(stream.rate)
            frames = source.decode(stream)
            if speed != 1.0:
                frames = _stretched(frames, stream, speed)
            if format == "pcm":
                return b"".join(
                    bytes(f.planes[0])[: f.samples * 2] for f in _resampled(frames, "s16", PCM_RATE)
                )
            container, codec, encodedRate = _ENCODINGS[format]
            return _encoded(frames, container, codec, encodedRate or rate)
    except av.FFmpegError as e:
        raise SpeechEncodingError(f"the synthesized audio does not decode: {e}") from None


def _stretched(frames: Iterable[Any], stream: Any, speed: float) -> list[Any]:
    """
    C{frames} played C{speed} times as fast, at the same pitch.
    """
    factors = []
    low, high = _ATEMPO_RANGE
    while speed < low:
        factors.append(low)
        speed /= low
    while speed > high:
        factors.append(high)
        speed /= high
    factors.append(speed)
    graph = av.filter.Graph()
    nodes = [graph.add_abuffer(template=stream)]
    nodes += [graph.add("atempo", f"{factor:.6f}") for factor in factors]
    nodes.append(graph.add("abuffersink"))
    graph.link_nodes(*nodes).configure()
    out: list[Any] = []
    for frame in [*frames, None]:
        graph.push(frame)
        while True:
            try:
                out.append(graph.pull())
            except (av.BlockingIOError, av.EOFError):
                break
    return out


def _resampled(frames: Iterable[Any], sampleFormat: str, rate: int) -> list[Any]:
    """
    C{frames} resampled to mono C{sampleFormat} at C{rate}.
    """
    resampler = av.AudioResampler(format=sampleFormat, layout="mono", rate=rate)
    out: list[Any] = []
    for frame in frames:
        frame.pts = None
        out += resampler.resample(frame)
    out += resampler.resample(None)
    return out


def _encoded(frames: Iterable[Any], container: str, codec: str, rate: int) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format=container) as target:
        stream = target.add_stream(codec, rate=rate, layout="mono")
        context = stream.codec_context
        # Encoders such as AAC and Opus take frames of one size only.
        fifo = av.AudioFifo()
        for frame in _resampled(frames, context.format.name, rate):
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


class SpeechEncoder:
    """
    Speech encoded as it is synthesized, sentence by sentence, for a
    streamed answer: each L{feed} returns the encoded bytes it made ready,
    L{close} the rest. Blocking: run each call in a thread, one at a time.
    A container that rewrites its header at the end (WAV's sizes, FLAC's
    totals) is sent as first written: players take it as a stream.
    """

    def __init__(self, format: str) -> None:
        self._format = format
        self._out = io.BytesIO()
        self._sent = 0
        self._target: Any = None
        self._stream: Any = None
        self._resampler: Any = None
        self._fifo: Any = None
        self._rate: int | None = None

    def _open(self, rate: int) -> bytes:
        self._rate = rate
        if self._format == "wav":
            # Sizes unknown (all ones): the samples run to the end.
            header = bytearray(pcmToWav(b"", rate))
            struct.pack_into("<I", header, 4, 0xFFFFFFFF)
            struct.pack_into("<I", header, len(header) - 4, 0xFFFFFFFF)
            return bytes(header)
        if self._format == "pcm":
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
            return b""
        container, codec, encodedRate = _ENCODINGS[self._format]
        # Ogg holds packets back until a page is full (a second): each
        # sentence's should go out with it.
        options = {"page_duration": "20000", "flush_packets": "1"} if container == "ogg" else {}
        self._target = av.open(self._out, "w", format=container, options=options)
        self._stream = self._target.add_stream(codec, rate=encodedRate or rate, layout="mono")
        context = self._stream.codec_context
        self._resampler = av.AudioResampler(
            format=context.format.name, layout="mono", rate=encodedRate or rate
        )
        self._fifo = av.AudioFifo()
        return b""

    def feed(self, pcm: bytes, rate: int) -> bytes:
        """
        @raise SpeechEncodingError: the rate changed mid-stream.
        """
        header = b""
        if self._rate is None:
            header = self._open(rate)
        elif rate != self._rate:
            raise SpeechEncodingError("the speech changed its rate mid-stream")
        if self._format == "wav":
            return header + pcm[: len(pcm) // 2 * 2]
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm[: len(pcm) // 2 * 2])
        frame.sample_rate = rate
        return self._encode(self._resampler.resample(frame), final=False)

    def close(self) -> bytes:
        if self._rate is None or self._format == "wav":
            return b""
        return self._encode(self._resampler.resample(None), final=True)

    def _encode(self, frames: list[Any], final: bool) -> bytes:
        if self._format == "pcm":
            return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)
        for frame in frames:
            frame.pts = None
            self._fifo.write(frame)
        size = self._stream.codec_context.frame_size or 1024
        while self._fifo.samples >= size or (final and self._fifo.samples):
            chunk = self._fifo.read(size, partial=final)
            chunk.pts = None
            for packet in self._stream.encode(chunk):
                self._target.mux(packet)
        if final:
            for packet in self._stream.encode(None):
                self._target.mux(packet)
            self._target.close()
        data = self._out.getvalue()
        ready, self._sent = data[self._sent :], len(data)
        return ready
