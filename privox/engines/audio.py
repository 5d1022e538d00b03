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

import io
import struct
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from privox.engines.base import Audio, BadAudio
from privox.messages import AUDIO_FORMATS
from privox.wav import pcmToWav

if TYPE_CHECKING:
    import av

#: The rate of C{pcm_s16le} uploads (mono, signed 16-bit little-endian).
PCM_RATE = 16000

#: A zip member larger than this (declared or actually read) is refused.
MAX_ZIP_MEMBER_BYTES = 200 * 1024 * 1024
#: A zip member that expands more than this many times is refused...
MAX_ZIP_RATIO = 100
#: ...unless it is at most this large: a short clip of silence compresses
#: far better than 100:1 and is harmless.
ZIP_RATIO_EXEMPT_BYTES = 10 * 1024 * 1024
_ZIP_READ_BYTES = 1024 * 1024

#: Containers (ogg, mp3...) can pack hours of audio into a small upload; a
#: decode stops with BadAudio past this many seconds.
MAX_DECODED_SECONDS = 3600

#: A WAV header (with the chunks before C{data}) larger than this is refused,
#: so a stream never buffers without bound while waiting for its audio.
MAX_WAV_HEADER_BYTES = 1024 * 1024

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
#: RIFF writers that cannot seek back put one of these as the data size.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)

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
        header = _parseWavHeader(data)
        if header is None:
            raise BadAudio(f"truncated WAV: the header is incomplete ({len(data)} bytes)")
        if header.format is None:
            # A codec other than PCM/float (ADPCM, a-law...): FFmpeg knows it.
            return _decodeContainer(data, rate, "WAV")
        samples = header.format.toFloat(data[header.dataStart : header.dataEnd])
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
        self._wav: _PCMFormat | None = None
        self._resampler: _Resampler | None = None
        #: Data bytes still expected (None: until the end of the upload).
        self._left: int | None = None
        self._buffering = format == "zip"
        self._finished = False
        if format == "pcm_s16le":
            self._start(_PCMFormat(PCM_RATE, 1, 2, "int"), None)

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
        header = _parseWavHeader(self._buffer)
        if header is None:
            if len(self._buffer) > MAX_WAV_HEADER_BYTES:
                raise BadAudio(f"WAV header longer than {MAX_WAV_HEADER_BYTES} bytes")
            return False
        if header.format is None:
            self._buffering = True
            return False
        left = None if header.dataSize in _UNKNOWN_SIZES else header.dataSize
        data = bytes(self._buffer[header.dataStart :])
        self._buffer.clear()
        self._start(header.format, left)
        self._append(data)
        return True

    def _start(self, fmt: _PCMFormat, left: int | None) -> None:
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
        if fmt.isPassthrough(self.rate):
            # The common case (16 kHz mono s16 in and out): the client's exact samples.
            out = np.frombuffer(raw, "<i2").astype(np.int16)
        else:
            samples = resampler.push(fmt.toFloat(raw))
            if final:
                samples = np.concatenate([samples, resampler.flush()])
            out = toInt16(samples)
        self.samples += len(out)
        return out


@dataclass(frozen=True)
class _PCMFormat:
    """
    Uncompressed interleaved samples: integer (unsigned when 8-bit, as in
    WAV) or float.
    """

    rate: int
    channels: int
    width: int  # bytes per sample
    kind: str  # "int" | "float"

    @property
    def frameBytes(self) -> int:
        return self.width * self.channels

    def isPassthrough(self, rate: int) -> bool:
        return (self.rate, self.channels, self.width, self.kind) == (rate, 1, 2, "int")

    def toFloat(self, raw: bytes) -> npt.NDArray[np.float32]:
        """
        Whole frames of raw samples to mono float32 (channels averaged).
        """
        raw = raw[: len(raw) - len(raw) % self.frameBytes]
        if self.kind == "float":
            x = np.frombuffer(raw, f"<f{self.width}").astype(np.float32)
            x = np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)
        elif self.width == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif self.width == 3:
            # 24-bit: place the three bytes high in an int32 so the sign comes along.
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32)
            x /= 2.0**31
        else:
            x = np.frombuffer(raw, f"<i{self.width}").astype(np.float32)
            x /= 2.0 ** (8 * self.width - 1)
        if self.channels > 1:
            x = x.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return x


@dataclass(frozen=True)
class _WavHeader:
    #: None when the codec is not plain PCM or float (FFmpeg decodes those).
    format: _PCMFormat | None
    dataStart: int
    dataSize: int

    @property
    def dataEnd(self) -> int | None:
        return None if self.dataSize in _UNKNOWN_SIZES else self.dataStart + self.dataSize


def _parseWavHeader(data: bytes | bytearray) -> _WavHeader | None:
    """
    Parse a RIFF/WAVE header up to the start of the C{data} chunk.

    @return: the header, or None when C{data} ends before it does.
    @raise BadAudio: not a WAV file, or a malformed one.
    """
    if not b"RIFF".startswith(data[:4]) or len(data) >= 12 and data[8:12] != b"WAVE":
        raise BadAudio("not a WAV file: no RIFF/WAVE header")
    fmt: _PCMFormat | None = None
    seenFmt = False
    offset = 12
    while offset + 8 <= len(data):
        chunkId = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunkId == b"data":
            if not seenFmt:
                raise BadAudio("malformed WAV: data chunk before fmt chunk")
            return _WavHeader(fmt, body, size)
        if chunkId == b"fmt ":
            if body + size > len(data):
                return None
            fmt = _parseFmt(bytes(data[body : body + size]))
            seenFmt = True
        offset = body + size + (size & 1)  # chunks are padded to even sizes
    return None


def _parseFmt(chunk: bytes) -> _PCMFormat | None:
    if len(chunk) < 16:
        raise BadAudio(f"malformed WAV: fmt chunk of {len(chunk)} bytes")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(chunk) >= 26:
        (tag,) = struct.unpack_from("<H", chunk, 24)  # the sub-format GUID starts with it
    if not channels or not rate:
        raise BadAudio(f"malformed WAV: {channels} channels at {rate} Hz")
    if tag == _WAVE_FORMAT_PCM and bits in (8, 16, 24, 32):
        return _PCMFormat(rate, channels, bits // 8, "int")
    if tag == _WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64):
        return _PCMFormat(rate, channels, bits // 8, "float")
    if tag in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_IEEE_FLOAT):
        raise BadAudio(f"unsupported WAV sample width: {bits} bits")
    return None


def _pcmToFloat(data: bytes) -> npt.NDArray[np.float32]:
    if len(data) % 2:
        raise BadAudio("raw pcm_s16le audio has an odd number of bytes")
    return _PCMFormat(PCM_RATE, 1, 2, "int").toFloat(data)


def _checkFormat(format: str) -> None:
    if format not in AUDIO_FORMATS:
        raise BadAudio(
            f"unknown audio format {format!r}; expected one of {', '.join(AUDIO_FORMATS)}"
        )


def _sniff(data: bytes) -> str:
    """
    What an C{auto} upload is, from its first bytes: wav, zip or (anything
    else) a container for PyAV.
    """
    if b"RIFF".startswith(data[:4]) and (len(data) < 12 or data[8:12] == b"WAVE"):
        return "wav"  # a WAV, or one too short to be anything else
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip, or an empty one
        return "zip"
    return "container"


def _unzipWav(data: bytes) -> bytes:
    """
    The WAV inside a zip (C{sample.wav}, or its only C{.wav} member), read in
    memory within L{MAX_ZIP_MEMBER_BYTES} and L{MAX_ZIP_RATIO}.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in info.filename:
                raise BadAudio(f"refusing zip member with unsafe name {info.filename!r}")
        wavs = [i for i in members if i.filename.lower().endswith(".wav") and not i.is_dir()]
        chosen = [i for i in wavs if i.filename == "sample.wav"] or wavs
        if len(chosen) != 1:
            names = ", ".join(repr(i.filename) for i in members[:5]) or "nothing"
            raise BadAudio(f"zip must hold sample.wav (or one .wav file); it holds {names}")
        info = chosen[0]
        # Refuse from the declared sizes, before inflating anything.
        if info.file_size > MAX_ZIP_MEMBER_BYTES:
            raise BadAudio(
                f"zip member {info.filename!r} declares {info.file_size} bytes;"
                f" the limit is {MAX_ZIP_MEMBER_BYTES}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > ZIP_RATIO_EXEMPT_BYTES and ratio > MAX_ZIP_RATIO:
            raise BadAudio(
                f"zip member {info.filename!r} expands {ratio:.0f} times;"
                f" the limit is {MAX_ZIP_RATIO} (a zip bomb?)"
            )
        # Read in bounded steps: zipfile inflates at most what each read asks
        # for, stops at the declared size and then checks the CRC, so a
        # header that lies is caught before much is inflated.
        content = bytearray()
        with archive.open(info) as member:
            while block := member.read(_ZIP_READ_BYTES):
                content += block
                if len(content) > MAX_ZIP_MEMBER_BYTES:  # zipfile should have stopped
                    raise BadAudio(f"zip member {info.filename!r} is too large")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BadAudio(f"corrupt zip: {e}") from e
    except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown compression
        raise BadAudio(f"unreadable zip: {e}") from e
    if not content:
        raise BadAudio(f"empty audio: zip member {info.filename!r} is empty")
    return bytes(content)


def _decodeContainer(data: bytes, rate: int, what: str) -> Audio:
    """
    Decode the first audio stream of anything FFmpeg reads (ogg, webm, mp3,
    flac, m4a, compressed WAV...) from memory, resampled to mono at C{rate}.
    """
    import av

    parts: list[npt.NDArray[np.float32]] = []
    room = MAX_DECODED_SECONDS * rate  # samples still allowed

    def collect(frames: list[av.AudioFrame]) -> None:
        nonlocal room
        for samples in _frames(frames):
            parts.append(samples)
            room -= len(samples)
        if room < 0:
            raise BadAudio(f"audio longer than {MAX_DECODED_SECONDS} s")

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            what = container.format.name.split(",")[0]  # "mov,mp4,m4a,..." -> "mov"
            if not container.streams.audio:
                raise BadAudio(f"no audio stream in this {what} file")
            resampler, source = None, None
            for frame in container.decode(container.streams.audio[0]):
                # A resampler is set up for one input layout and rate; some
                # streams (chained ogg, mp3) change them midway.
                if (frame.format.name, frame.layout.name, frame.sample_rate) != source:
                    if resampler is not None:
                        collect(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
                    source = (frame.format.name, frame.layout.name, frame.sample_rate)
                collect(resampler.resample(frame))
            if resampler is not None:
                collect(resampler.resample(None))
    except av.error.FFmpegError as e:
        raise BadAudio(f"cannot decode {what}: {e.strerror or e}") from e
    samples = np.concatenate(parts).astype(np.float32, copy=False) if parts else _EMPTY_F32
    if not len(samples):
        raise BadAudio(f"empty audio: the {what} file decodes to no samples")
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
