"""
Audio in and out: decoding uploads (WAV, raw PCM, zip, containers PyAV reads)
to mono float32 at the rate a model wants, and writing WAV files.

Two ways in:

  - L{decodeAudio} decodes a whole upload at once (for engines that need it
    all, such as Whisper);
  - L{PCMStream} decodes an upload as its bytes arrive, for streaming
    recognizers (Vosk): WAV and raw PCM are converted chunk by chunk, other
    formats are buffered and decoded when the upload is complete.

Both convert samples and downmix with numpy (plain format conversion) and
resample with PyAV's C{AudioResampler} (libswresample), never with DSP of our
own. PyAV is imported only when needed, so L{encodeWav} works without it.

Everything happens in memory: a zip is never extracted to disk and a
container is decoded from an C{io.BytesIO}.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from privox.audiofile import MAX_DECODED_SECONDS, BadFile, ContainerAudio, unzipWav
from privox.audiofile import sniff as _sniff
from privox.engines.errors import BadAudio
from privox.messages import AUDIO_FORMATS
from privox.wav import UNKNOWN_SIZES, BadWav, WavFormat, WavHeader, pcmToWav, readWavHeader

if TYPE_CHECKING:
    import av

@dataclass(frozen=True)
class Audio:
    """
    Decoded audio: mono float32 samples in [-1, 1] at C{rate} Hz.
    """

    samples: npt.NDArray[np.float32]
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate if self.rate else 0.0


#: The rate of C{pcm_s16le} uploads (mono, signed 16-bit little-endian).
PCM_RATE = 16000


#: C{pcm_s16le} uploads' sample format.
_PCM = WavFormat(PCM_RATE, 1, 2, "int")

_EMPTY_F32: npt.NDArray[np.float32] = np.zeros(0, np.float32)
_EMPTY_I16: npt.NDArray[np.int16] = np.zeros(0, np.int16)


def encodeWav(samples: npt.NDArray[np.int16], rate: int) -> bytes:
    """
    A complete mono RIFF/WAVE file of 16-bit PCM.
    """
    return pcmToWav(np.ascontiguousarray(samples, dtype="<i2").tobytes(), rate)


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
    @raise BadAudio: truncated, garbage or empty audio, or an unknown format.
    """
    _checkFormat(format)
    if not data:
        raise BadAudio("empty audio: the upload has 0 bytes")
    if format == "auto":
        format = _sniff(data)
    if format == "pcm_s16le":
        samples = _pcmToFloat(data)
        source = PCM_RATE
    elif format == "wav":
        header = _readHeader(data)
        if header is None:
            raise BadAudio(f"truncated WAV: the header is incomplete ({len(data)} bytes)")
        if header.format is None:
            # A codec other than PCM/float (ADPCM, a-law...): FFmpeg knows it.
            return _decodeContainer(data, rate, "WAV")
        _checkLength(header.format, header.dataBytes(len(data)))
        samples = _toFloat(header.format, data[header.dataStart : header.dataEnd])
        source = header.format.rate
    elif format == "zip":
        return decodeAudio(_unzipWav(data), "wav", rate)
    else:
        return _decodeContainer(data, rate, "audio")
    if not len(samples):
        raise BadAudio("empty audio: no samples after the header")
    resampler = _Resampler(source, rate)
    out = np.concatenate([resampler.push(samples), resampler.flush()])
    return Audio(out, rate)


class PCMStream:
    """
    An upload decoded as it arrives: bytes in, 16-bit mono samples at C{rate}
    out, each call returning what the bytes so far complete.

    C{pcm_s16le} and C{wav} (PCM or float) are converted chunk by chunk: the
    RIFF header is parsed once enough of it is here, partial samples are
    carried across chunk boundaries and the resampler keeps its state from
    one chunk to the next, so the output does not depend on how the upload
    was cut. Everything else (C{zip}, containers, compressed WAV codecs) is
    buffered and decoded by L{finish}; C{auto} streams when the upload starts
    like a WAV file.
    """

    def __init__(self, format: str, rate: int = 16000) -> None:
        _checkFormat(format)
        self.rate = rate
        #: Samples returned so far.
        self.samples = 0
        self._format = format
        self._buffer = bytearray()
        self._wav: WavFormat | None = None
        self._resampler: _Resampler | None = None
        #: Data bytes still expected (None: until the end of the upload).
        self._left: int | None = None
        self._buffering = format == "zip"
        self._finished = False
        if format == "pcm_s16le":
            self._start(_PCM, None)

    def feed(self, chunk: bytes) -> npt.NDArray[np.int16]:
        """
        Take the next bytes of the upload.

        @return: the samples they complete (possibly none).
        @raise BadAudio: the upload is not the format it claims to be.
        """
        if self._finished:
            raise ValueError("feed() after finish()")
        if self._wav is not None:
            self._append(chunk)
        else:
            self._buffer += chunk
            if self._buffering or not self._readHeader():
                return _EMPTY_I16
        return self._convert(final=False)

    def finish(self) -> npt.NDArray[np.int16]:
        """
        The upload is complete: return the samples still held back.

        @raise BadAudio: empty, truncated or undecodable audio.
        """
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        if self._buffering or (self._wav is None and self._format == "auto"):
            out = toInt16(decodeAudio(bytes(self._buffer), self._format, self.rate).samples)
            self._buffer.clear()
            self.samples += len(out)
            return out
        if self._wav is None:
            if not self._buffer:
                raise BadAudio("empty audio: the upload has 0 bytes")
            raise BadAudio(f"truncated WAV: the header is incomplete ({len(self._buffer)} bytes)")
        if self._format == "pcm_s16le" and len(self._buffer) % 2:
            raise BadAudio("raw pcm_s16le audio has an odd number of bytes")
        out = self._convert(final=True)
        if not self.samples:
            if self._format == "pcm_s16le":
                raise BadAudio("empty audio: the upload has 0 bytes")
            raise BadAudio("empty audio: no samples after the header")
        return out

    def _readHeader(self) -> bool:
        """
        Find out from the first bytes what to do with the rest.

        @return: whether samples can be converted now.
        """
        if self._format == "auto":
            if len(self._buffer) < 12:
                return False
            if _sniff(bytes(self._buffer[:12])) != "wav":
                self._buffering = True
                return False
        # Never buffers past privox.wav.MAX_HEADER_BYTES: the reader refuses.
        header = _readHeader(self._buffer)
        if header is None:
            return False
        if header.format is None:
            self._buffering = True
            return False
        left = None if header.dataSize in UNKNOWN_SIZES else header.dataSize
        if left is not None:
            _checkLength(header.format, left)
        data = bytes(self._buffer[header.dataStart :])
        self._buffer.clear()
        self._start(header.format, left)
        self._append(data)
        return True

    def _start(self, fmt: WavFormat, left: int | None) -> None:
        self._wav = fmt
        self._left = left
        self._resampler = _Resampler(fmt.rate, self.rate)

    def _append(self, data: bytes) -> None:
        if self._left is not None:
            # Bytes past the data chunk (e.g. a trailing LIST chunk) are not audio.
            data = data[: self._left]
            self._left -= len(data)
        self._buffer += data

    def _convert(self, final: bool) -> npt.NDArray[np.int16]:
        fmt, resampler = self._wav, self._resampler
        assert fmt is not None and resampler is not None
        usable = len(self._buffer) - len(self._buffer) % fmt.frameBytes
        raw = bytes(self._buffer[:usable])
        del self._buffer[:usable]
        if _isPassthrough(fmt, self.rate):
            # The common case (16 kHz mono s16 in and out): the client's exact samples.
            out = np.frombuffer(raw, "<i2").astype(np.int16)
        else:
            samples = resampler.push(_toFloat(fmt, raw))
            if final:
                samples = np.concatenate([samples, resampler.flush()])
            out = toInt16(samples)
        self.samples += len(out)
        if self.samples > MAX_DECODED_SECONDS * self.rate:
            raise BadAudio(f"audio longer than {MAX_DECODED_SECONDS} s")
        return out


def _isPassthrough(fmt: WavFormat, rate: int) -> bool:
    return (fmt.rate, fmt.channels, fmt.width, fmt.kind) == (rate, 1, 2, "int")


def _toFloat(fmt: WavFormat, raw: bytes) -> npt.NDArray[np.float32]:
    """
    Whole frames of raw samples to mono float32 (channels averaged).
    """
    raw = raw[: len(raw) - len(raw) % fmt.frameBytes]
    if fmt.kind == "float":
        x = np.frombuffer(raw, f"<f{fmt.width}").astype(np.float32)
        x = np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)
    elif fmt.width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif fmt.width == 3:
        # 24-bit: place the three bytes high in an int32 so the sign comes along.
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32)
        x /= 2.0**31
    else:
        x = np.frombuffer(raw, f"<i{fmt.width}").astype(np.float32)
        x /= 2.0 ** (8 * fmt.width - 1)
    if fmt.channels > 1:
        x = x.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
    return x


def _readHeader(data: bytes | bytearray) -> WavHeader | None:
    try:
        return readWavHeader(data)
    except BadWav as e:
        raise BadAudio(str(e)) from None


def _checkLength(fmt: WavFormat, dataBytes: int) -> None:
    """
    Refuse WAV data longer than L{MAX_DECODED_SECONDS} before converting it:
    with the rates L{privox.wav} accepts, what decoding allocates is then
    bounded both by that and by a few times the upload's size.
    """
    if fmt.seconds(dataBytes) > MAX_DECODED_SECONDS:
        raise BadAudio(f"audio longer than {MAX_DECODED_SECONDS} s")


def _pcmToFloat(data: bytes) -> npt.NDArray[np.float32]:
    if len(data) % 2:
        raise BadAudio("raw pcm_s16le audio has an odd number of bytes")
    return _toFloat(_PCM, data)


def _checkFormat(format: str) -> None:
    if format not in AUDIO_FORMATS:
        raise BadAudio(
            f"unknown audio format {format!r}; expected one of {', '.join(AUDIO_FORMATS)}"
        )


def _unzipWav(data: bytes) -> bytes:
    try:
        return unzipWav(data)
    except BadFile as e:
        raise BadAudio(str(e)) from e


def _decodeContainer(data: bytes, rate: int, what: str) -> Audio:
    """
    Decode the first audio stream of anything FFmpeg reads (ogg, webm, mp3,
    flac, m4a, compressed WAV...) from memory, resampled to mono at C{rate}.
    """
    import av

    parts: list[npt.NDArray[np.float32]] = []
    decoded = ContainerAudio(data, what)
    try:
        resampler, source = None, None
        for frame in decoded:
            # A resampler is set up for one input layout and rate; some
            # streams (chained ogg, mp3) change them midway.
            if (frame.format.name, frame.layout.name, frame.sample_rate) != source:
                if resampler is not None:
                    parts += _frames(resampler.resample(None))
                resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
                source = (frame.format.name, frame.layout.name, frame.sample_rate)
            parts += _frames(resampler.resample(frame))
        if resampler is not None:
            parts += _frames(resampler.resample(None))
    except BadFile as e:
        raise BadAudio(str(e)) from e
    except av.error.FFmpegError as e:
        raise BadAudio(f"cannot decode {decoded.what}: {e.strerror or e}") from e
    samples = np.concatenate(parts).astype(np.float32, copy=False) if parts else _EMPTY_F32
    if not len(samples):
        raise BadAudio(f"empty audio: the {decoded.what} file decodes to no samples")
    return Audio(samples, rate)


class _Resampler:
    """
    Mono float32 resampling through PyAV's C{AudioResampler}: libswresample
    keeps its filter state between calls, so pushing a signal in pieces gives
    the same samples as pushing it whole.
    """

    def __init__(self, source: int, target: int) -> None:
        self._source = source
        self._pts = 0
        self._av: av.AudioResampler | None = None
        if source != target:
            import av

            self._av = av.AudioResampler(format="flt", layout="mono", rate=target)

    def push(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self._av is None or not len(samples):
            return samples if self._av is None else _EMPTY_F32
        import av

        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, np.float32).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate = self._source
        frame.time_base = Fraction(1, self._source)
        frame.pts = self._pts
        self._pts += len(samples)
        return self._collect(self._av.resample(frame))

    def flush(self) -> npt.NDArray[np.float32]:
        return _EMPTY_F32 if self._av is None else self._collect(self._av.resample(None))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> npt.NDArray[np.float32]:
        return np.concatenate(_frames(frames)) if frames else _EMPTY_F32


def _frames(frames: list[av.AudioFrame]) -> list[npt.NDArray[np.float32]]:
    """
    The samples of PyAV's packed mono float frames.
    """
    return [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]
