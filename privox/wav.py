"""
RIFF/WAVE files: the one reader of their headers, and a writer of mono
16-bit ones. Kept free of numpy so the command line, the API and the farm's
test engines can use it too.

A header is client input, and what it says decides what audio costs and
how much memory decoding takes, so L{readWavHeader} refuses what no real
recording has (a rate under L{MIN_RATE} or over L{MAX_RATE}, more than
L{MAX_CHANNELS} channels, a sample width other than 8, 16, 24 or 32-bit
integers or 32 or 64-bit floats) and never believes the C{fmt} chunk's byte
rate or block size: a file's length is its data bytes at the sample format
it really has (L{WavFormat.seconds}).
"""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass

#: The lowest and highest sample rates accepted (telephone speech is 8 kHz;
#: studio files reach 384 kHz).
MIN_RATE = 4000
MAX_RATE = 384000
#: The most channels accepted (7.1 surround is 8).
MAX_CHANNELS = 16

#: RIFF writers that cannot seek back put one of these as the data size.
UNKNOWN_SIZES = (0, 0xFFFFFFFF)

#: The C{data} chunk must start within this many bytes: the chunks before it
#: are a few hundred bytes in any real file, and walking (or, streaming,
#: waiting for) megabytes of them costs time and memory for nothing.
MAX_HEADER_BYTES = 1024 * 1024

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_INT_BITS = (8, 16, 24, 32)
_FLOAT_BITS = (32, 64)


class BadWav(ValueError):
    """
    Not a RIFF/WAVE file, a malformed one, or one that describes audio no
    recording has. The message says which, for the client.
    """


@dataclass(frozen=True)
class WavFormat:
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

    def seconds(self, dataBytes: int) -> float:
        """
        How long C{dataBytes} of these samples last (whole frames only).
        """
        return (dataBytes // self.frameBytes) / self.rate


@dataclass(frozen=True)
class WavHeader:
    """
    A header read up to the start of the C{data} chunk.

    @ivar format: the samples' format; L{None} for a codec other than PCM or
        float (ADPCM, a-law...), which FFmpeg decodes.
    @ivar rate: the declared rate, checked against L{MIN_RATE}-L{MAX_RATE}.
    @ivar channels: the declared channels, at most L{MAX_CHANNELS}.
    """

    format: WavFormat | None
    rate: int
    channels: int
    dataStart: int
    dataSize: int

    @property
    def dataEnd(self) -> int | None:
        return None if self.dataSize in UNKNOWN_SIZES else self.dataStart + self.dataSize

    def dataBytes(self, total: int) -> int:
        """
        The data bytes really present in a file of C{total} bytes (the
        declared size if the file holds that much).
        """
        present = max(0, total - self.dataStart)
        return present if self.dataEnd is None else min(self.dataSize, present)


def readWavHeader(data: bytes | bytearray | memoryview) -> WavHeader | None:
    """
    Parse a RIFF/WAVE header up to the start of the C{data} chunk.

    @return: the header, or L{None} when C{data} ends before it does.
    @raise BadWav: not a WAV file, a malformed one, an impossible format, or
        a C{data} chunk that would start past L{MAX_HEADER_BYTES}.
    """
    data = memoryview(data)
    if bytes(data[:4]) != b"RIFF"[: len(data[:4])] or (
        len(data) >= 12 and bytes(data[8:12]) != b"WAVE"
    ):
        raise BadWav("not a WAV file: no RIFF/WAVE header")
    found: tuple[WavFormat | None, int, int] | None = None
    offset = 12
    while offset + 8 <= len(data):
        chunkId = bytes(data[offset : offset + 4])
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunkId == b"data":
            if found is None:
                raise BadWav("malformed WAV: data chunk before fmt chunk")
            return WavHeader(*found, body, size)
        if body + size + 8 > MAX_HEADER_BYTES:
            raise BadWav(f"WAV header longer than {MAX_HEADER_BYTES} bytes")
        if chunkId == b"fmt ":
            if body + size > len(data):
                return None
            found = _readFmt(bytes(data[body : body + size]))
        offset = body + size + (size & 1)  # chunks are padded to even sizes
    return None


def _readFmt(chunk: bytes) -> tuple[WavFormat | None, int, int]:
    if len(chunk) < 16:
        raise BadWav(f"malformed WAV: fmt chunk of {len(chunk)} bytes")
    tag, channels, rate, _byteRate, _blockAlign, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(chunk) >= 26:
        (tag,) = struct.unpack_from("<H", chunk, 24)  # the sub-format GUID starts with it
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadWav(
            f"impossible WAV: {rate} Hz (accepted: {MIN_RATE} to {MAX_RATE} Hz)"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadWav(f"impossible WAV: {channels} channels (accepted: 1 to {MAX_CHANNELS})")
    if tag == _WAVE_FORMAT_PCM and bits in _INT_BITS:
        return WavFormat(rate, channels, bits // 8, "int"), rate, channels
    if tag == _WAVE_FORMAT_IEEE_FLOAT and bits in _FLOAT_BITS:
        return WavFormat(rate, channels, bits // 8, "float"), rate, channels
    if tag in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_IEEE_FLOAT):
        raise BadWav(f"unsupported WAV sample width: {bits} bits")
    return None, rate, channels


def wavSeconds(data: bytes) -> float | None:
    """
    How many seconds of audio a PCM or float WAV file holds: the data bytes
    really present, at its sample format (never its header's byte rate).

    @return: L{None} if C{data} is not a complete, valid PCM or float WAV
        header (a compressed codec's length needs decoding).
    """
    try:
        header = readWavHeader(data)
    except BadWav:
        return None
    if header is None or header.format is None:
        return None
    return header.format.seconds(header.dataBytes(len(data)))


def cutWav(data: bytes, seconds: float) -> tuple[bytes, float]:
    """
    A PCM or float WAV file cut to at most C{seconds}, and how long it
    lasts then (the data really present, at its sample format).

    @raise BadWav: not such a WAV file.
    """
    header = readWavHeader(data)
    if header is None or header.format is None:
        raise BadWav("not a complete PCM WAV file")
    fmt = header.format
    present = header.dataBytes(len(data))
    if fmt.seconds(present) <= seconds:
        return data, fmt.seconds(present)
    keep = int(seconds * fmt.rate) * fmt.frameBytes
    start = header.dataStart
    out = bytearray(data[: start + keep])
    struct.pack_into("<I", out, 4, len(out) - 8)
    struct.pack_into("<I", out, start - 4, keep)
    return bytes(out), fmt.seconds(keep)


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


def joinWavs(parts: list[bytes]) -> bytes:
    """
    One PCM or float WAV file holding the audio of C{parts} in order (all
    of one format: pieces of one text, spoken by one voice).

    @raise BadWav: a part is not such a WAV, or its format differs.
    """
    headers = []
    for part in parts:
        header = readWavHeader(part)
        if header is None or header.format is None:
            raise BadWav("not a complete PCM WAV file")
        headers.append(header)
    if len(parts) == 1:
        return parts[0]
    fmt = headers[0].format
    if any(h.format != fmt for h in headers):
        raise BadWav("WAV pieces differ in format")
    first = headers[0]
    datas = [
        part[h.dataStart : h.dataStart + h.dataBytes(len(part))]
        for part, h in zip(parts, headers)
    ]
    size = sum(len(d) for d in datas)
    out = bytearray(parts[0][: first.dataStart])
    struct.pack_into("<I", out, 4, len(out) + size - 8)
    struct.pack_into("<I", out, first.dataStart - 4, size)
    out += b"".join(datas)
    return bytes(out)


def wavPCM(data: bytes) -> tuple[bytes, int]:
    """
    The samples of a mono s16le WAV file (what engines make) and its rate.

    @raise BadWav: not such a WAV file.
    """
    header = readWavHeader(data)
    fmt = header.format if header is not None else None
    if header is None or fmt is None or fmt.kind != "int" or fmt.width != 2 or fmt.channels != 1:
        raise BadWav("not a complete mono 16-bit PCM WAV file")
    start = header.dataStart
    return data[start : start + header.dataBytes(len(data))], fmt.rate
