"""
Test audio made in code: tones, WAV files of every width, containers encoded
with PyAV, zips (honest and hostile).
"""

from __future__ import annotations

import io
import struct
import wave
import zipfile

import numpy as np
import numpy.typing as npt

Signal = npt.NDArray[np.float64]


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> Signal:
    """
    A sine wave, shape (samples,).
    """
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def vowels(seconds: float, rate: int = 16000) -> Signal:
    """
    Voice-like harmonics switched on and off a few times a second: enough to
    make a recognizer output words (nonsense, but deterministic).
    """
    t = np.arange(round(seconds * rate)) / rate
    harmonics = [(150, 0.3), (700, 0.2), (1200, 0.1), (2500, 0.05)]
    voiced = sum(a * np.sin(2 * np.pi * f * t) for f, a in harmonics)
    return voiced * (np.sin(2 * np.pi * 2.5 * t) > 0)


def hiss(seconds: float, rate: int = 16000) -> Signal:
    """
    A microphone's noise floor (about 1 in 32768, the same every call): what
    a recognizer hears in a pause, where exact zeros are a sound no real
    capture makes.
    """
    return np.random.default_rng(0).normal(0, 1 / 32768, round(seconds * rate))


def dominantFrequency(samples: npt.NDArray[np.floating], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def pcm16(samples: Signal) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _frames(samples: Signal) -> Signal:
    return samples[:, None] if samples.ndim == 1 else samples


def _intFrames(frames: Signal, bits: int) -> bytes:
    if bits == 8:  # WAV's 8-bit samples are unsigned
        return (np.clip(frames, -1, 1) * 127 + 128).astype(np.uint8).tobytes()
    scaled = (np.clip(frames, -1, 1) * (2 ** (bits - 1) - 1)).astype("<i4")
    if bits == 24:
        return scaled.reshape(-1, 1).view(np.uint8)[:, :3].tobytes()
    return scaled.astype(f"<i{bits // 8}").tobytes()


def wavFile(
    samples: Signal,
    rate: int,
    bits: int = 16,
    floating: bool = False,
    extensible: bool = False,
    chunksBefore: bytes = b"",
    chunksAfter: bytes = b"",
    dataSize: int | None = None,
) -> bytes:
    """
    A WAV file written by hand (so every variant can be made): C{samples} is
    (frames,) or (frames, channels).

    @param floating: IEEE float samples of C{bits} bits, else integers.
    @param extensible: a WAVE_FORMAT_EXTENSIBLE fmt chunk.
    @param chunksBefore: raw chunks between fmt and data; C{chunksAfter}: after.
    @param dataSize: the data size to declare (default: the real one).
    """
    frames = _frames(samples)
    channels = frames.shape[1]
    if floating:
        data = frames.astype(f"<f{bits // 8}").tobytes()
    else:
        data = _intFrames(frames, bits)
    tag = 3 if floating else 1
    block = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits
    )
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + guid
    body = (
        b"WAVE"
        + chunk(b"fmt ", fmt)
        + chunksBefore
        + b"data"
        + struct.pack("<I", len(data) if dataSize is None else dataSize)
        + data
        + b"\0" * (len(data) & 1)
        + chunksAfter
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def withFmt(wav: bytes, **fields: int) -> bytes:
    """
    C{wav} (with its fmt chunk right after RIFF/WAVE) with some fields of
    that chunk overwritten: C{channels}, C{rate}, C{byteRate}, C{blockAlign},
    C{bits}. The audio is left as it is: the header lies.
    """
    assert wav[12:16] == b"fmt "
    names = ("tag", "channels", "rate", "byteRate", "blockAlign", "bits")
    values = dict(zip(names, struct.unpack_from("<HHIIHH", wav, 20)))
    values.update(fields)
    return wav[:20] + struct.pack("<HHIIHH", *(values[n] for n in names)) + wav[36:]


def chunk(name: bytes, body: bytes) -> bytes:
    return name + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)


def stdlibWav(samples: Signal, rate: int) -> bytes:
    """
    A 16-bit WAV written by the standard library, as most clients would.
    """
    out = io.BytesIO()
    frames = _frames(samples)
    with wave.open(out, "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(frames))
    return out.getvalue()


def encoded(samples: Signal, rate: int, container: str, codec: str, layout: str = "mono") -> bytes:
    """
    C{samples} (mono) encoded by PyAV into C{container}, in memory.
    """
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own vorbis encoder
        c.start_encoding()  # headers even when there are no samples
        channels = 2 if layout == "stereo" else 1
        pcm = np.repeat((np.clip(samples, -1, 1) * 32767).astype(np.int16), channels)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame) if len(samples) else []:
            c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return out.getvalue()


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, content in members.items():
            z.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
    return out.getvalue()


def zipOfZeros(name: str, megabytes: int) -> bytes:
    """
    A zip bomb: C{megabytes} of zeros after a WAV header, deflated (about
    1000:1) without ever holding them in memory.
    """
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(name, "w", force_zip64=True) as member:
            member.write(wavFile(np.zeros(16), 16000, dataSize=0xFFFFFFFF))
            block = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(block)
    return out.getvalue()


def declaringSize(archive: bytes, size: int) -> bytes:
    """
    C{archive} (one member, no zip64) with its central directory lying about
    the member's uncompressed size.
    """
    at = archive.index(b"PK\x01\x02") + 24
    return archive[:at] + struct.pack("<I", size) + archive[at + 4 :]
