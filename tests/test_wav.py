"""
L{privox.wav}: the one RIFF/WAVE header reader, and cutting a WAV short.
"""

from __future__ import annotations

import io
import wave

from twisted.trial.unittest import SynchronousTestCase

from privox.wav import MAX_HEADER_BYTES, BadWav, cutWav, pcmToWav, readWavHeader, wavSeconds
from tests.audiofixtures import chunk, tone, wavFile, withFmt


class HeaderTests(SynchronousTestCase):
    def test_lengthFromTheSampleFormat(self) -> None:
        """
        A WAV lasts its data at its real sample format, whatever its byte
        rate and block size say.
        """
        wav = wavFile(tone(2.0, 16000), 16000)
        self.assertEqual(wavSeconds(wav), 2.0)
        self.assertEqual(wavSeconds(withFmt(wav, byteRate=0xFFFFFFF0, blockAlign=9)), 2.0)
        self.assertEqual(wavSeconds(withFmt(wav, byteRate=1)), 2.0)

    def test_headerWalkBounded(self) -> None:
        """
        Chunks before the data that go past MAX_HEADER_BYTES are refused
        from their sizes, without walking or waiting for them.
        """
        junk = chunk(b"junk", bytes(MAX_HEADER_BYTES))
        with self.assertRaises(BadWav) as caught:
            readWavHeader(wavFile(tone(0.1, 16000), 16000, chunksBefore=junk))
        self.assertIn("WAV header longer than", str(caught.exception))
        # Declared, not present: refused as soon as the size is read.
        declared = b"RIFF\xff\xff\xff\xffWAVEjunk\x00\x00\x20\x00"
        self.assertRaises(BadWav, readWavHeader, declared)
        many = b"".join(chunk(b"junk", b"") for _ in range(MAX_HEADER_BYTES // 8))
        self.assertRaises(BadWav, readWavHeader, b"RIFF\0\0\0\0WAVE" + many)


class CutTests(SynchronousTestCase):
    def test_cut(self) -> None:
        """
        A WAV longer than allowed is cut to it, its sizes rewritten so any
        reader agrees; a shorter one is left as it is.
        """
        wav = pcmToWav(bytes(2 * 16000 * 3), 16000)
        cut, seconds = cutWav(wav, 1.25)
        self.assertEqual(seconds, 1.25)
        with wave.open(io.BytesIO(cut)) as w:
            self.assertEqual(w.getnframes(), 20000)
        self.assertEqual(wavSeconds(cut), 1.25)
        self.assertEqual(cutWav(wav, 10.0), (wav, 3.0))

    def test_notPCM(self) -> None:
        self.assertRaises(BadWav, cutWav, b"ID3 not a wav", 1.0)
        self.assertRaises(BadWav, cutWav, b"RIFF\x04\0\0\0WAVE", 1.0)
