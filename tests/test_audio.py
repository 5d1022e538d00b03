"""
Decoding uploads: every format in, mono float32 at the model's rate out; the
streaming decoder agrees with the one-shot one however its input is cut; bad
input fails with BadAudio and a message that says what is wrong.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
import zipfile

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from privox import audiofile
from privox.engines import audio
from privox.engines.audio import PCMStream, decodeAudio, encodeWav, toInt16
from privox.engines.audio import Audio
from privox.engines.base import BadAudio
from tests.audiofixtures import (
    chunk,
    declaringSize,
    dominantFrequency,
    encoded,
    pcm16,
    stdlibWav,
    tone,
    wavFile,
    withFmt,
    zipOfZeros,
    zipped,
)


class Checks(SynchronousTestCase):
    def assertClose(self, actual: float, expected: float, tolerance: float) -> None:
        # trial's assertAlmostEqual has no working delta.
        self.assertLessEqual(abs(actual - expected), tolerance, f"{actual} not {expected} ± {tolerance}")

    def assertTone(
        self,
        decoded: Audio,
        seconds: float,
        rate: int = 16000,
        freq: float = 440.0,
        slack: float = 0.01,
    ) -> None:
        """
        C{decoded} is C{seconds} (± C{slack}, 1%) of a C{freq} Hz tone at C{rate}.
        """
        self.assertEqual(decoded.rate, rate)
        self.assertEqual(decoded.samples.dtype, np.float32)
        self.assertEqual(decoded.samples.ndim, 1)
        self.assertClose(decoded.seconds, seconds, seconds * slack)
        self.assertClose(dominantFrequency(decoded.samples, rate), freq, 2)
        self.assertLessEqual(float(np.abs(decoded.samples).max()), 1.0)

    def assertBad(self, message: str, data: bytes, format: str = "auto") -> None:
        with self.assertRaises(BadAudio) as caught:
            decodeAudio(data, format)
        self.assertIn(message, caught.exception.message)
        self.assertEqual(caught.exception.code, "bad_request")


class WavTests(Checks):
    def test_rates(self) -> None:
        """
        WAVs at the usual rates come out at 16 kHz, the tone intact.
        """
        for rate in (8000, 16000, 22050, 44100, 48000):
            decoded = decodeAudio(stdlibWav(tone(1.0, rate), rate), "wav")
            self.assertTone(decoded, 1.0)

    def test_otherTargetRate(self) -> None:
        decoded = decodeAudio(stdlibWav(tone(0.5, 16000), 16000), "wav", rate=22050)
        self.assertTone(decoded, 0.5, rate=22050)

    def test_widths(self) -> None:
        """
        8-bit (unsigned), 16, 24 and 32-bit integer and 32/64-bit float
        samples all decode to the same signal.
        """
        original = tone(0.5, 16000)
        for bits, floating, tolerance in [
            (8, False, 1 / 64),
            (16, False, 1e-4),
            (24, False, 1e-6),
            (32, False, 1e-6),
            (32, True, 1e-6),
            (64, True, 1e-6),
        ]:
            for extensible in (False, True):
                data = wavFile(original, 16000, bits, floating, extensible)
                decoded = decodeAudio(data, "wav")
                self.assertTone(decoded, 0.5)
                np.testing.assert_allclose(decoded.samples, original, atol=tolerance, err_msg=f"{bits}")

    def test_stereoIsAveraged(self) -> None:
        """
        Channels are averaged: a tone on the left and silence on the right
        is the tone at half amplitude.
        """
        left = tone(1.0, 44100, amplitude=0.8)
        stereo = np.stack([left, np.zeros_like(left)], axis=1)
        decoded = decodeAudio(stdlibWav(stereo, 44100), "wav")
        self.assertTone(decoded, 1.0)
        self.assertClose(float(np.abs(decoded.samples).max()), 0.4, 0.01)
        opposite = np.stack([left, -left], axis=1)
        cancelled = decodeAudio(wavFile(opposite, 16000), "wav").samples
        self.assertLess(float(np.abs(cancelled).max()), 1e-4)

    def test_otherChunks(self) -> None:
        """
        Chunks before the data are skipped (odd sizes padded); chunks after
        it are not audio.
        """
        original = tone(0.5, 16000)
        info = chunk(b"LIST", b"INFOISFT\x05\0\0\0abcde")
        after = chunk(b"junk", os.urandom(999))
        data = wavFile(original, 16000, chunksBefore=info, chunksAfter=after)
        decoded = decodeAudio(data, "wav")
        self.assertEqual(len(decoded.samples), len(original))
        np.testing.assert_allclose(decoded.samples, original, atol=1e-4)

    def test_unknownDataSize(self) -> None:
        """
        A streamed WAV whose writer could not fill in the data size: all
        that follows the header is audio.
        """
        for size in (0, 0xFFFFFFFF):
            decoded = decodeAudio(wavFile(tone(0.5, 16000), 16000, dataSize=size), "wav")
            self.assertTone(decoded, 0.5)

    def test_truncatedData(self) -> None:
        """
        A WAV cut short in its data (even mid-sample) decodes what is there.
        """
        data = stdlibWav(tone(1.0, 16000), 16000)
        decoded = decodeAudio(data[: 44 + 16000 + 1], "wav")
        self.assertEqual(len(decoded.samples), 8000)

    def test_compressedCodec(self) -> None:
        """
        WAVs of a codec other than PCM (mu-law, ADPCM) go to FFmpeg.
        """
        # ADPCM pads its last block (up to 256 ms here).
        for codec, slack in [("pcm_mulaw", 0.01), ("pcm_alaw", 0.01), ("adpcm_ms", 0.3)]:
            decoded = decodeAudio(encoded(tone(1.0, 8000), 8000, "wav", codec), "wav")
            self.assertTone(decoded, 1.0, slack=slack)

    def test_auto(self) -> None:
        self.assertTone(decodeAudio(stdlibWav(tone(1.0, 44100), 44100), "auto"), 1.0)


class RawAndZipTests(Checks):
    def test_pcm(self) -> None:
        original = tone(1.0, 16000)
        decoded = decodeAudio(pcm16(original), "pcm_s16le")
        self.assertTone(decoded, 1.0)
        self.assertEqual(len(decoded.samples), 16000)
        np.testing.assert_allclose(decoded.samples, original, atol=1e-4)

    def test_zip(self) -> None:
        """
        A zip holding sample.wav, as the original clients sent (also stored
        uncompressed, and sniffed by auto).
        """
        wav = stdlibWav(tone(1.0, 44100), 44100)
        for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
            archive = zipped({"notes.txt": b"hi", "sample.wav": wav}, compression)
            self.assertTone(decodeAudio(archive, "zip"), 1.0)
            self.assertTone(decodeAudio(archive, "auto"), 1.0)

    def test_zipOtherName(self) -> None:
        """
        One .wav member of another name will do; sample.wav wins among several.
        """
        wav = stdlibWav(tone(1.0, 16000), 16000)
        self.assertTone(decodeAudio(zipped({"recording.WAV": wav}), "zip"), 1.0)
        other = stdlibWav(tone(1.0, 16000, freq=1000), 16000)
        self.assertTone(decodeAudio(zipped({"a.wav": other, "sample.wav": wav}), "zip"), 1.0)

    def test_zipOfSilence(self) -> None:
        """
        A short silent clip compresses far beyond the ratio limit and is
        still accepted: the ratio only counts for large members.
        """
        archive = zipped({"sample.wav": stdlibWav(np.zeros(16000 * 10), 16000)})
        decoded = decodeAudio(archive, "zip")
        self.assertEqual(len(decoded.samples), 160000)
        self.assertFalse(decoded.samples.any())


class ContainerTests(Checks):
    """
    What browsers and phones record, encoded here by PyAV (FFmpeg).
    """

    def test_containers(self) -> None:
        for container, codec, rate in [
            ("ogg", "libopus", 48000),
            ("ogg", "vorbis", 44100),  # FFmpeg's own encoder: stereo only
            ("webm", "libopus", 48000),
            ("flac", "flac", 44100),
            ("mp3", "libmp3lame", 44100),
            ("ipod", "aac", 44100),  # .m4a
        ]:
            layout = "stereo" if codec == "vorbis" else "mono"
            # 3 s: lossy encoders add a few ms (AAC: 23 ms of priming).
            data = encoded(tone(3.0, rate), rate, container, codec, layout)
            self.assertTone(decodeAudio(data, "auto"), 3.0)

    def test_stereoContainer(self) -> None:
        data = encoded(tone(1.0, 48000), 48000, "ogg", "libopus", layout="stereo")
        self.assertTone(decodeAudio(data, "auto"), 1.0)

    def test_tooLong(self) -> None:
        """
        A container cannot expand to more than MAX_DECODED_SECONDS.
        """
        self.patch(audiofile, "MAX_DECODED_SECONDS", 1)
        self.assertBad("audio longer than 1 s", encoded(tone(3.0, 48000), 48000, "ogg", "libopus"))


class StreamTests(Checks):
    """
    PCMStream: the same samples as decodeAudio, however the upload is cut.
    """

    def stream(self, data: bytes, format: str, size: int) -> tuple[np.ndarray, int]:
        """
        Feed C{data} in chunks of C{size} bytes.

        @return: all the samples, and how many came before finish().
        """
        s = PCMStream(format)
        parts = [s.feed(data[i : i + size]) for i in range(0, len(data), size)]
        early = sum(map(len, parts))
        parts.append(s.finish())
        for part in parts:
            self.assertEqual(part.dtype, np.int16)
        out = np.concatenate(parts)
        self.assertEqual(s.samples, len(out))
        return out, early

    def assertStreams(self, data: bytes, format: str, streaming: bool = True) -> None:
        whole, early = self.stream(data, format, len(data))
        expected = toInt16(decodeAudio(data, format).samples)
        self.assertEqual(len(whole), len(expected))
        # 16 kHz s16 input passes through exactly; toInt16 may round 1 off.
        self.assertLessEqual(int(np.abs(whole.astype(int) - expected).max()), 1)
        for size in (1, 3, 1000):
            pieces, early = self.stream(data, format, size)
            np.testing.assert_array_equal(pieces, whole)
            if streaming:
                self.assertGreater(early, len(whole) // 2, "samples came only at finish()")
            else:
                self.assertEqual(early, 0)

    def test_pcm(self) -> None:
        self.assertStreams(pcm16(tone(0.5, 16000)), "pcm_s16le")

    def test_wav16k(self) -> None:
        self.assertStreams(stdlibWav(tone(0.5, 16000), 16000), "wav")

    def test_wavResampled(self) -> None:
        stereo = np.stack([tone(0.25, 44100), tone(0.25, 44100, freq=880)], axis=1)
        self.assertStreams(stdlibWav(stereo, 44100), "wav")
        self.assertStreams(wavFile(tone(0.25, 8000), 8000, bits=24), "wav")
        self.assertStreams(wavFile(tone(0.25, 48000), 48000, bits=32, floating=True), "auto")

    def test_wavChunksAround(self) -> None:
        info = chunk(b"LIST", b"INFOISFT\x05\0\0\0abcde")
        after = chunk(b"junk", b"x" * 99)
        data = wavFile(tone(0.25, 22050), 22050, chunksBefore=info, chunksAfter=after)
        self.assertStreams(data, "wav")

    def test_buffered(self) -> None:
        """
        Zips, containers and compressed WAV codecs are decoded at finish().
        """
        wav = stdlibWav(tone(0.5, 44100), 44100)
        self.assertStreams(zipped({"sample.wav": wav}), "zip", streaming=False)
        self.assertStreams(zipped({"sample.wav": wav}), "auto", streaming=False)
        opus = encoded(tone(0.5, 48000), 48000, "ogg", "libopus")
        self.assertStreams(opus, "auto", streaming=False)
        alaw = encoded(tone(0.5, 8000), 8000, "wav", "pcm_alaw")
        self.assertStreams(alaw, "wav", streaming=False)

    def assertStreamBad(self, message: str, data: bytes, format: str, size: int = 1) -> None:
        s = PCMStream(format)
        with self.assertRaises(BadAudio) as caught:
            for i in range(0, len(data), size):
                s.feed(data[i : i + size])
            s.finish()
        self.assertIn(message, caught.exception.message)

    def test_bad(self) -> None:
        wav = stdlibWav(tone(0.5, 16000), 16000)
        self.assertStreamBad("not a WAV file", b"OggS" + os.urandom(100), "wav")
        self.assertStreamBad("truncated WAV: the header is incomplete (30 bytes)", wav[:30], "wav")
        self.assertStreamBad("truncated WAV: the header is incomplete (7 bytes)", wav[:7], "auto")
        self.assertStreamBad("empty audio: no samples after the header", wav[:44], "wav")
        self.assertStreamBad("empty audio: the upload has 0 bytes", b"", "wav")
        self.assertStreamBad("empty audio: the upload has 0 bytes", b"", "pcm_s16le")
        self.assertStreamBad("empty audio: the upload has 0 bytes", b"", "auto")
        self.assertStreamBad("odd number of bytes", b"\0" * 101, "pcm_s16le")
        self.assertStreamBad("cannot decode audio", os.urandom(2000), "auto")
        hugeHeader = wav[:36] + chunk(b"big ", bytes(1 << 20))
        self.assertStreamBad("WAV header longer than 1048576 bytes", hugeHeader, "wav", 4096)
        with self.assertRaises(BadAudio) as caught:
            PCMStream("aiff")
        self.assertIn("unknown audio format 'aiff'", caught.exception.message)


class BadInputTests(Checks):
    def test_empty(self) -> None:
        for format in ("wav", "pcm_s16le", "zip", "auto"):
            self.assertBad("empty audio: the upload has 0 bytes", b"", format)
        self.assertBad("empty audio: no samples after the header", stdlibWav(np.zeros(0), 16000))
        self.assertBad("empty audio: zip member 'sample.wav' is empty", zipped({"sample.wav": b""}))
        noSamples = encoded(np.zeros(0), 48000, "flac", "flac")
        self.assertBad("empty audio: the flac file decodes to no samples", noSamples)

    def test_truncatedHeader(self) -> None:
        wav = stdlibWav(tone(0.5, 16000), 16000)
        for size in (3, 4, 11, 12, 20, 43):
            self.assertBad(f"truncated WAV: the header is incomplete ({size} bytes)", wav[:size])

    def test_garbage(self) -> None:
        noise = np.random.default_rng(7).bytes(5000)
        self.assertBad("cannot decode audio", noise, "auto")
        self.assertBad("cannot decode audio", b"hello, this is not audio at all\n" * 20, "auto")
        self.assertBad("not a WAV file: no RIFF/WAVE header", noise, "wav")
        self.assertBad("corrupt zip", b"PK\x03\x04" + noise, "auto")
        self.assertBad("corrupt zip", noise, "zip")

    def test_malformedWav(self) -> None:
        good = tone(0.1, 16000)
        twelveBits = wavFile(good, 16000).replace(b"\x10\x00data", b"\x0c\x00data")
        self.assertBad("unsupported WAV sample width: 12 bits", twelveBits)
        noFmt = b"RIFF\x10\0\0\0WAVEdata\x04\0\0\0\0\0\0\0"
        self.assertBad("malformed WAV: data chunk before fmt chunk", noFmt)
        shortFmt = b"RIFF\x20\0\0\0WAVE" + chunk(b"fmt ", b"\x01\0\x01\0") + b"data\x02\0\0\0\0\0"
        self.assertBad("malformed WAV: fmt chunk of 4 bytes", shortFmt)
        noChannels = wavFile(good, 16000).replace(b"\x01\x00\x01\x00\x80\x3e", b"\x01\x00\0\0\x80\x3e")
        self.assertBad("impossible WAV: 0 channels (accepted: 1 to 16)", noChannels)

    def test_impossibleFormats(self) -> None:
        """
        Rates and channel counts no recording has are refused from the
        header, before anything is converted or resampled: a 64 KB upload
        claiming 1 Hz would otherwise resample to 2.7 GB of samples. Each
        is refused the same way however it arrives (whole, or streamed).
        """
        good = wavFile(tone(0.1, 16000), 16000)
        cases = {
            "impossible WAV: 1 Hz (accepted: 4000 to 384000 Hz)": withFmt(good, rate=1),
            "impossible WAV: 3999 Hz": withFmt(good, rate=3999),
            "impossible WAV: 4000000000 Hz": withFmt(good, rate=4_000_000_000),
            "impossible WAV: 17 channels (accepted: 1 to 16)": withFmt(good, channels=17),
            "impossible WAV: 65535 channels": withFmt(good, channels=65535),
        }
        for message, data in cases.items():
            self.assertBad(message, data)
            self.assertBad(message, data, "wav")
            stream = PCMStream("auto")
            with self.assertRaises(BadAudio) as caught:
                for i in range(len(data)):
                    stream.feed(data[i : i + 1])
            self.assertIn(message, caught.exception.message)

    def test_lyingByteRate(self) -> None:
        """
        The fmt chunk's byte rate and block size are never believed: the
        audio decodes to its real length.
        """
        wav = wavFile(tone(1.5, 16000), 16000)
        lying = withFmt(wav, byteRate=0xFFFFFFF0, blockAlign=7)
        self.assertTone(decodeAudio(lying, "wav"), 1.5)
        stream = PCMStream("wav")
        samples = len(stream.feed(lying)) + len(stream.finish())
        self.assertEqual(samples, 24000)

    def test_longerThanAllowed(self) -> None:
        """
        A WAV whose data would last past MAX_DECODED_SECONDS is refused
        before it is converted, whole or streamed.
        """
        self.patch(audio, "MAX_DECODED_SECONDS", 1)
        wav = wavFile(tone(1.5, 16000), 16000)
        self.assertBad("audio longer than 1 s", wav)
        stream = PCMStream("auto")
        with self.assertRaises(BadAudio):
            stream.feed(wav)
            stream.finish()

    def test_impossibleContainers(self) -> None:
        """
        A container whose stream has a rate or channel count no WAV may
        have is refused as it decodes, whole (node) or measured (API).
        """
        slow = encoded(tone(1.0, 2000, freq=200), 2000, "flac", "flac")
        for refuse in (lambda: decodeAudio(slow, "auto"), lambda: audiofile.uploadSeconds(slow)):
            with self.assertRaises((BadAudio, audiofile.BadFile)) as caught:
                refuse()
            self.assertIn("impossible audio in this flac file: 2000 Hz", str(caught.exception))

    def test_oddPCM(self) -> None:
        self.assertBad("raw pcm_s16le audio has an odd number of bytes", b"\0" * 3201, "pcm_s16le")

    def test_unknownFormat(self) -> None:
        expected = "unknown audio format 'mp4'; expected one of wav, pcm_s16le, zip, auto"
        self.assertBad(expected, b"x", "mp4")

    def test_zipWithoutWav(self) -> None:
        expected = "zip must hold sample.wav (or one .wav file); it holds 'a.txt'"
        self.assertBad(expected, zipped({"a.txt": b"x"}))
        self.assertBad("it holds nothing", zipped({}))
        wav = stdlibWav(tone(0.1, 16000), 16000)
        self.assertBad("it holds 'a.wav', 'b.wav'", zipped({"a.wav": wav, "b.wav": wav}))

    def test_zipPathTricks(self) -> None:
        """
        Member names that would escape a directory are refused (nothing is
        ever extracted, but such an archive is hostile).
        """
        wav = stdlibWav(tone(0.1, 16000), 16000)
        names = ["../sample.wav", "/etc/sample.wav", "a/../../sample.wav", "..\\sample.wav", "C:x.wav"]
        for name in names:
            self.assertBad(f"refusing zip member with unsafe name {name!r}", zipped({name: wav}))

    def assertLight(self, data: bytes, message: str) -> None:
        """
        Refusing C{data} takes little time and memory: it is not expanded.
        """
        tracemalloc.start()
        started = time.monotonic()
        try:
            self.assertBad(message, data, "zip")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 5 * 1024 * 1024)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_zipBombDeclaredSize(self) -> None:
        """
        A member declaring more than MAX_ZIP_MEMBER_BYTES is refused from its
        header (this one really holds 300 MB of zeros, in 300 kB).
        """
        bomb = zipOfZeros("sample.wav", 300)
        self.assertLess(len(bomb), 1024 * 1024)
        declared = 300 * 2**20 + 76  # the zeros after a WAV header of 76 bytes
        expected = f"zip member 'sample.wav' declares {declared} bytes; the limit is 209715200"
        self.assertLight(bomb, expected)

    def test_zipBombRatio(self) -> None:
        """
        A member under the size limit that expands over MAX_ZIP_RATIO times
        is refused too.
        """
        bomb = zipOfZeros("sample.wav", 20)
        info = zipfile.ZipFile(io.BytesIO(bomb)).getinfo("sample.wav")
        ratio = round(info.file_size / info.compress_size)
        self.assertGreater(ratio, 1000)
        expected = f"zip member 'sample.wav' expands {ratio} times; the limit is 100 (a zip bomb?)"
        self.assertLight(bomb, expected)

    def test_zipLyingSize(self) -> None:
        """
        A member declaring a small size but holding more is never read past
        what it declared: the CRC check fails.
        """
        archive = zipped({"sample.wav": stdlibWav(np.zeros(16000 * 300), 16000)})
        self.assertLight(declaringSize(archive, 1000), "corrupt zip: Bad CRC-32")

    def test_caps(self) -> None:
        """
        The limits are module constants (they bound every zip we read).
        """
        self.assertEqual(audiofile.MAX_ZIP_MEMBER_BYTES, 200 * 1024 * 1024)
        self.assertEqual(audiofile.MAX_ZIP_RATIO, 100)


class EncodeTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        samples = toInt16(tone(0.5, 22050))
        decoded = decodeAudio(encodeWav(samples, 22050), "wav", rate=22050)
        np.testing.assert_array_equal(np.round(decoded.samples * 32768).astype(np.int16), samples)
