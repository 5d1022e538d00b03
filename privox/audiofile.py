"""
What an uploaded audio file is, before any engine sees it: its kind (WAV,
zip, or a container FFmpeg reads), the WAV inside a zip, and how long it
really lasts. Kept free of numpy: the API measures every upload with
L{uploadSeconds} to charge it, and the node's decoder
(L{privox.engines.audio}) unpacks uploads with the same code.

Everything here is bounded by the upload's own size: a zip member may not
expand more than L{MAX_ZIP_RATIO} times (or past L{MAX_ZIP_MEMBER_BYTES}),
and no file may decode to more than L{MAX_DECODED_SECONDS}.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath
from typing import Any, Iterator

from privox.wav import MAX_CHANNELS, MAX_RATE, MIN_RATE, BadWav, readWavHeader

#: A zip member larger than this (declared or actually read) is refused.
MAX_ZIP_MEMBER_BYTES = 200 * 1024 * 1024
#: A zip member that expands more than this many times is refused...
MAX_ZIP_RATIO = 100
#: ...unless it is at most this large: a short clip of silence compresses
#: far better than 100:1 and is harmless.
ZIP_RATIO_EXEMPT_BYTES = 10 * 1024 * 1024
_ZIP_READ_BYTES = 1024 * 1024

#: Containers (ogg, mp3...) can pack hours of audio into a small upload, and
#: a WAV header can claim hours of data: nothing decodes past this many seconds.
MAX_DECODED_SECONDS = 3600


class BadFile(ValueError):
    """
    The upload is not audio that can be read (the message says why, for
    the client).
    """


def sniff(data: bytes | bytearray) -> str:
    """
    What an upload is, from its first bytes: C{wav}, C{zip} or (anything
    else) C{container}, for PyAV.
    """
    head = bytes(data[:12])
    if b"RIFF".startswith(head[:4]) and (len(head) < 12 or head[8:12] == b"WAVE"):
        return "wav"  # a WAV, or one too short to be anything else
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip, or an empty one
        return "zip"
    return "container"


def unzipWav(data: bytes) -> bytes:
    """
    The WAV inside a zip (C{sample.wav}, or its only C{.wav} member), read in
    memory within L{MAX_ZIP_MEMBER_BYTES} and L{MAX_ZIP_RATIO}.

    @raise BadFile: a corrupt zip, unsafe names, no single WAV, a bomb.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in info.filename:
                raise BadFile(f"refusing zip member with unsafe name {info.filename!r}")
        wavs = [i for i in members if i.filename.lower().endswith(".wav") and not i.is_dir()]
        chosen = [i for i in wavs if i.filename == "sample.wav"] or wavs
        if len(chosen) != 1:
            names = ", ".join(repr(i.filename) for i in members[:5]) or "nothing"
            raise BadFile(f"zip must hold sample.wav (or one .wav file); it holds {names}")
        info = chosen[0]
        # Refuse from the declared sizes, before inflating anything.
        if info.file_size > MAX_ZIP_MEMBER_BYTES:
            raise BadFile(
                f"zip member {info.filename!r} declares {info.file_size} bytes;"
                f" the limit is {MAX_ZIP_MEMBER_BYTES}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > ZIP_RATIO_EXEMPT_BYTES and ratio > MAX_ZIP_RATIO:
            raise BadFile(
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
                    raise BadFile(f"zip member {info.filename!r} is too large")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BadFile(f"corrupt zip: {e}") from e
    except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown compression
        raise BadFile(f"unreadable zip: {e}") from e
    if not content:
        raise BadFile(f"empty audio: zip member {info.filename!r} is empty")
    return bytes(content)


def uploadSeconds(data: bytes, format: str = "auto") -> float:
    """
    How long an upload really lasts: a PCM or float WAV's data bytes at its
    true sample format (never its header's byte rate), the WAV inside a zip,
    and anything else decoded with PyAV, counting the samples it yields
    (never a container's declared duration or timestamps). Blocking: call it
    in a thread.

    @param format: PVX/2's C{wav}, C{pcm_s16le} (16 kHz mono), C{zip} or
        C{auto}.
    @raise BadFile: not audio, an impossible format, or longer than
        L{MAX_DECODED_SECONDS}.
    """
    if not data:
        raise BadFile("the uploaded file is empty")
    kind = sniff(data) if format == "auto" else format
    if kind == "pcm_s16le":
        seconds = (len(data) // 2) / 16000
    elif kind == "zip":
        return uploadSeconds(unzipWav(data), "wav")
    elif kind == "wav":
        try:
            header = readWavHeader(data)
        except BadWav as e:
            raise BadFile(str(e)) from None
        if header is None:
            raise BadFile(f"truncated WAV: the header is incomplete ({len(data)} bytes)")
        if header.format is None:
            seconds = _decodedSeconds(data, "WAV")
        else:
            seconds = header.format.seconds(header.dataBytes(len(data)))
    else:
        seconds = _decodedSeconds(data, "audio")
    if seconds > MAX_DECODED_SECONDS:
        raise BadFile(f"audio longer than {MAX_DECODED_SECONDS} s")
    if seconds <= 0:
        raise BadFile("empty audio: no samples")
    return seconds


def _decodedSeconds(data: bytes, what: str) -> float:
    """
    Decode the first audio stream and add up its frames' samples (no
    resampling, nothing kept).
    """
    seconds = 0.0
    for frame in ContainerAudio(data, what):
        seconds += frame.samples / frame.sample_rate
    return seconds


class ContainerAudio:
    """
    The frames of an upload's first audio stream, as FFmpeg decodes them
    (ogg, webm, mp3, flac, m4a, a compressed WAV...), each checked: a rate
    or channel count L{privox.wav} would refuse in a WAV header is refused
    here too, and nothing decodes past L{MAX_DECODED_SECONDS} (counted in
    samples, never from the container's timestamps).

    @ivar what: the container's name once open (C{"ogg"}, C{"mov"}...), for
        messages.
    """

    def __init__(self, data: bytes, what: str = "audio") -> None:
        self._data = data
        self.what = what

    def __iter__(self) -> Iterator[Any]:
        # PyAV is the API's and node's one dependency for containers;
        # imported here so a farm, which decodes nothing, never loads it.
        import av

        seconds = 0.0
        try:
            with av.open(io.BytesIO(self._data), mode="r") as container:
                self.what = container.format.name.split(",")[0]  # "mov,mp4,m4a" -> "mov"
                if not container.streams.audio:
                    raise BadFile(f"no audio stream in this {self.what} file")
                for frame in container.decode(container.streams.audio[0]):
                    rate, channels = frame.sample_rate, len(frame.layout.channels)
                    if not MIN_RATE <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
                        raise BadFile(
                            f"impossible audio in this {self.what} file: {rate} Hz,"
                            f" {channels} channels"
                        )
                    seconds += frame.samples / rate
                    if seconds > MAX_DECODED_SECONDS:
                        raise BadFile(f"audio longer than {MAX_DECODED_SECONDS} s")
                    yield frame
        except av.error.FFmpegError as e:
            raise BadFile(f"cannot decode {self.what}: {e.strerror or e}") from e
