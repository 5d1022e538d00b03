"""
The Coqui TTS engine on real Coqui and torch: tiny random VITS models
(character-based, 16 kHz, about 1 MB) are built once for this module and
loaded through L{CoquiEngine}'s normal path. Their speech is noise (random
weights); what is tested is loading, voices, languages, limits and the WAV.

Needs the Coqui stack, which C{make test} installs (tools/install-coqui.sh);
without it these tests fail, saying what to run.
"""

from __future__ import annotations

import atexit
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from privox.engines.base import Cancelled, EngineError, ModelNotFound, TTSJob, Unsupported
from privox.engines.base import MAX_TEXT
from privox.engines.coqui import CoquiEngine, _reachable
from privox.engines.tinyvits import RATE, buildTinyVits
from privox.messages import ErrorCode

# Found, not imported: importing torch and Coqui takes seconds, paid only
# when a test here runs.
_missing = (
    None
    if importlib.util.find_spec("TTS") is not None
    else "Coqui TTS is not installed; run tools/install-coqui.sh VENV"
)

SPEAKERS = ["alice", "bob"]


def _requireCoqui() -> None:
    if _missing is not None:
        raise AssertionError(_missing)


_models: dict[str, Path] = {}
_engines: dict[str, CoquiEngine] = {}


def models() -> dict[str, Path]:
    """
    The tiny models, built once for this module: C{single} and C{multi}.
    """
    _requireCoqui()
    if not _models:
        root = Path(tempfile.mkdtemp(prefix="privox-test-coqui-"))
        atexit.register(shutil.rmtree, root, True)
        buildTinyVits(root / "single", None)
        buildTinyVits(root / "multi", SPEAKERS)
        _models.update(single=root / "single", multi=root / "multi")
    return _models


def loaded(kind: str) -> CoquiEngine:
    """
    An engine for a tiny model, loaded once for this module.
    """
    if kind not in _engines:
        engine = CoquiEngine("tiny-vits-" + kind, path=str(models()[kind]))
        engine.load()
        _engines[kind] = engine
    return _engines[kind]


def job(
    text: str = "Hello there, this is a test.",
    voice: str | None = None,
    language: str | None = None,
    model: str = "coqui:tiny-vits",
) -> TTSJob:
    return TTSJob(model, language, voice, text)


class WavAssertions:
    def assertWav(self, data: bytes) -> int:
        """
        C{data} is a mono 16-bit 16 kHz RIFF/WAVE file with samples in it;
        returns the number of frames.
        """
        self.assertEqual(data[:4], b"RIFF")  # type: ignore[attr-defined]
        self.assertEqual(data[8:12], b"WAVE")  # type: ignore[attr-defined]
        with wave.open(io.BytesIO(data)) as w:
            self.assertEqual(  # type: ignore[attr-defined]
                (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getcomptype()),
                (1, 2, RATE, "NONE"),
            )
            frames = w.getnframes()
            pcm = w.readframes(frames)
        self.assertGreater(frames, 0)  # type: ignore[attr-defined]
        self.assertEqual(len(pcm), frames * 2)  # type: ignore[attr-defined]
        self.assertNotEqual(pcm, bytes(len(pcm)))  # type: ignore[attr-defined]
        return frames


class ImportTests(SynchronousTestCase):
    def test_importIsLight(self) -> None:
        """
        Importing the engine module (as the node does at start-up, for every
        engine named) imports neither torch nor Coqui.
        """
        code = (
            "import sys, privox.engines.coqui\n"
            "heavy = sorted(m for m in ('torch', 'TTS', 'torchaudio') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
        )
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)

    def test_nameAndLanguageBeforeLoad(self) -> None:
        """
        The name and, for a Coqui model name, the language are known without
        loading anything.
        """
        engine = CoquiEngine("tts_models/en/vctk/vits")
        self.assertEqual(engine.name, "coqui:tts_models/en/vctk/vits")
        self.assertEqual(engine.languages, ("en",))
        self.assertEqual(engine.voices, ())
        self.assertEqual(
            CoquiEngine("tts_models/multilingual/multi-dataset/your_tts").languages, ()
        )
        self.assertEqual(CoquiEngine("mine", language="de").languages, ("de",))

    def test_notLoaded(self) -> None:
        with self.assertRaises(EngineError):
            CoquiEngine("tts_models/en/vctk/vits").synthesize(job())


class PathTests(SynchronousTestCase):
    """
    C{=PATH} resolution, checked when the engine is built.
    """

    def test_missingPath(self) -> None:
        with self.assertRaises(ModelNotFound) as caught:
            CoquiEngine("x", path=self.mktemp())
        self.assertIn("no Coqui model", str(caught.exception))

    def test_noCheckpoint(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        with self.assertRaises(ModelNotFound) as caught:
            CoquiEngine("x", path=str(directory))
        self.assertIn("no checkpoint", str(caught.exception))

    def test_severalCheckpoints(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in ("a.pth", "b.pth", "config.json"):
            (directory / name).write_text("{}")
        with self.assertRaises(ModelNotFound) as caught:
            CoquiEngine("x", path=str(directory))
        self.assertIn("a.pth, b.pth", str(caught.exception))

    def test_noConfig(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "model.pth").write_bytes(b"")
        with self.assertRaises(ModelNotFound) as caught:
            CoquiEngine("x", path=str(directory / "model.pth"))
        self.assertIn("config.json", str(caught.exception))

    def test_brokenCheckpoint(self) -> None:
        """
        A checkpoint that is not one fails at load, as L{ModelNotFound}.
        """
        _requireCoqui()
        directory = Path(self.mktemp())
        directory.mkdir()
        shutil.copy(models()["single"] / "config.json", directory)
        (directory / "model.pth").write_bytes(b"not a checkpoint")
        engine = CoquiEngine("x", path=str(directory))
        self.assertRaises(ModelNotFound, engine.load)


class PhonemizerTests(SynchronousTestCase):
    def test_phonemizerMissing(self) -> None:
        """
        A model that phonemizes with espeak-ng (as Coqui's released English
        models do), on a machine without it, fails at load, saying so; its
        language comes from its config.
        """
        _requireCoqui()
        if shutil.which("espeak-ng") or shutil.which("espeak"):
            raise SkipTest("espeak-ng is installed")
        directory = Path(self.mktemp())
        directory.mkdir()
        shutil.copy(models()["single"] / "model.pth", directory)
        config = json.loads((models()["single"] / "config.json").read_text(encoding="utf-8"))
        config.update(use_phonemes=True, phonemizer="espeak", phoneme_language="en-us")
        (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
        engine = CoquiEngine("phonemes", path=str(directory))
        self.assertEqual(engine.languages, ("en", "en-us"))
        with self.assertRaises(ModelNotFound) as caught:
            engine.load()
        self.assertIn("espeak", str(caught.exception))


class SingleSpeakerTests(WavAssertions, SynchronousTestCase):
    def test_synthesize(self) -> None:
        """
        A model given by its directory loads and speaks a valid WAV at the
        model's rate.
        """
        engine = loaded("single")
        self.assertEqual((engine.name, engine.rate), ("coqui:tiny-vits-single", RATE))
        self.assertEqual(engine.voices, ())
        self.assertEqual(engine.languages, ())  # nothing says; any language
        frames = self.assertWav(engine.synthesize(job()))
        # ~1-2 s of audio for a short sentence, not a stray sample.
        self.assertGreater(frames, RATE // 4)

    def test_cancelledBetweenSentences(self) -> None:
        """
        Sentences are spoken one at a time, as Coqui splits them; a job
        whose stop is set during one speaks no further sentence.
        """
        engine = loaded("single")
        tts = engine._tts
        speak = tts.tts
        said: list[str] = []
        cancelled = job("The first sentence. The second one. And a third.")

        def counting(text: str, **kwargs: object) -> object:
            said.append(text)
            cancelled.stop.set()
            return speak(text=text, **kwargs)

        self.patch(tts, "tts", counting)
        e = self.assertRaises(Cancelled, engine.synthesize, cancelled)
        self.assertEqual(e.code, ErrorCode.CANCELLED)
        self.assertEqual(said, ["The first sentence."])

    def test_checkpointPath(self) -> None:
        """
        C{=PATH} may name the checkpoint itself (config.json beside it), and a
        language hint makes the engine advertise and check that language.
        """
        _requireCoqui()
        engine = CoquiEngine("tiny", path=str(models()["single"] / "model.pth"), language="en")
        engine.load()
        engine.load()  # once only
        self.assertEqual(engine.languages, ("en",))
        self.assertWav(engine.synthesize(job(language="en-US")))
        with self.assertRaises(Unsupported) as caught:
            engine.synthesize(job(language="de"))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_MODEL)

    def test_defaultVoice(self) -> None:
        engine = loaded("single")
        self.assertWav(engine.synthesize(job(voice="default")))
        self.assertWav(engine.synthesize(job(voice="")))

    def test_unknownVoice(self) -> None:
        with self.assertRaises(Unsupported) as caught:
            loaded("single").synthesize(job(voice="p236"))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_MODEL)
        self.assertIn("only its default voice", caught.exception.message)

    def test_emptyText(self) -> None:
        engine = loaded("single")
        for text in ("", "   \n\t"):
            with self.assertRaises(EngineError) as caught:
                engine.synthesize(job(text))
            self.assertEqual(caught.exception.code, ErrorCode.BAD_REQUEST)

    def test_tooLong(self) -> None:
        """
        Text over L{MAX_TEXT} characters is refused before any synthesis.
        """
        engine = loaded("single")
        started = time.monotonic()
        with self.assertRaises(EngineError) as caught:
            engine.synthesize(job("a" * (MAX_TEXT + 1)))
        self.assertEqual(caught.exception.code, ErrorCode.TOO_LARGE)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_concurrent(self) -> None:
        """
        Jobs from several threads at once (the node's slots) all succeed.
        """
        engine = loaded("single")
        results: list[bytes] = []
        errors: list[BaseException] = []

        def speak(n: int) -> None:
            try:
                results.append(engine.synthesize(job(f"Sentence number {n}.")))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=speak, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 4)
        for data in results:
            self.assertWav(data)


class MultiSpeakerTests(WavAssertions, SynchronousTestCase):
    def test_voices(self) -> None:
        """
        A multi-speaker model's speakers are its voices, read from the speaker
        file beside the checkpoint although its config names another path.
        """
        engine = loaded("multi")
        self.assertEqual(engine.voices, tuple(SPEAKERS))
        self.assertEqual(engine.languages, ("en",))  # from its config
        # The model's own config.json is left as it was.
        saved = json.loads((models()["multi"] / "config.json").read_text(encoding="utf-8"))
        self.assertEqual(saved["speakers_file"], "/home/trainer/vctk/speaker_ids.json")

    def test_eachVoice(self) -> None:
        engine = loaded("multi")
        for voice in SPEAKERS:
            self.assertWav(engine.synthesize(job(voice=voice)))

    def test_defaultVoice(self) -> None:
        """
        No voice means the model's first speaker (Coqui itself would refuse).
        """
        self.assertWav(loaded("multi").synthesize(job(voice=None)))

    def test_unknownVoice(self) -> None:
        with self.assertRaises(Unsupported) as caught:
            loaded("multi").synthesize(job(voice="carol"))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_MODEL)
        self.assertIn("alice, bob", caught.exception.message)


class ModelNameTests(SynchronousTestCase):
    """
    Models by Coqui name, without a path: offline, start-up fails fast.
    """

    def setUp(self) -> None:
        _requireCoqui()
        # An empty model store, so nothing is found already downloaded.
        previous = os.environ.get("TTS_HOME")
        os.environ["TTS_HOME"] = os.path.abspath(self.mktemp())
        self.addCleanup(
            lambda: (
                os.environ.__setitem__("TTS_HOME", previous)
                if previous is not None
                else os.environ.pop("TTS_HOME", None)
            )
        )

    def test_unknownName(self) -> None:
        """
        A name Coqui does not know fails without touching the network.
        """
        for name in ("no-such-model", "tts_models/xx/nothing/vits"):
            started = time.monotonic()
            with self.assertRaises(ModelNotFound) as caught:
                CoquiEngine(name).load()
            self.assertLess(time.monotonic() - started, 5.0)
            self.assertIn(f"coqui:{name}=/path/to/dir", str(caught.exception))

    def test_knownNameOffline(self) -> None:
        """
        A real Coqui model that is not downloaded, on a machine that cannot
        download it, is a L{ModelNotFound} naming the way out, within
        seconds.
        """
        if _reachable("https://github.com/", 3.0):
            raise SkipTest("online: this would download tts_models/en/vctk/vits (~150 MB)")
        started = time.monotonic()
        with self.assertRaises(ModelNotFound) as caught:
            CoquiEngine("tts_models/en/vctk/vits").load()
        self.assertLess(time.monotonic() - started, 15.0)
        message = str(caught.exception)
        self.assertIn("not downloaded", message)
        self.assertIn("coqui:tts_models/en/vctk/vits=/path/to/dir", message)
        store = Path(os.environ["TTS_HOME"])
        self.assertFalse(store.exists() and any(store.iterdir()))


class StreamingTests(SynchronousTestCase):
    """
    Coqui speaks a stream sentence by sentence, as every TTS engine does
    through the node (privox.node.streams.SpeechRun): text in pieces in,
    each sentence's samples out as soon as it is complete.
    """

    def test_sentences(self) -> None:
        from twisted.internet.defer import maybeDeferred, succeed

        from privox.engines.base import TTSJob
        from privox.node.streams import SpeechRun

        engine = loaded("single")
        parts: list = []
        failures: list = []

        class Sink:
            send = parts.append
            fail = failures.append

            def writable(self):
                return succeed(None)

        run = SpeechRun(
            lambda f, *a: maybeDeferred(f, *a), engine, TTSJob("coqui:tiny-vits", None, None, ""),
            lambda result: result,
        )
        run.parts(Sink())
        run.feed("Hello there. How ".encode())
        self.assertEqual(len(parts), 1)  # the first sentence, before the text ends
        run.feed("are you?".encode())
        answer = self.successResultOf(run.finish())
        self.assertEqual((len(parts), failures), (2, []))
        for part in parts:
            self.assertEqual((part.fields["content_type"], part.fields["rate"]), ("audio/pcm", RATE))
            self.assertGreater(len(part.body), RATE // 10)
        self.assertAlmostEqual(
            answer.fields["duration_s"], sum(len(p.body) / 2 / RATE for p in parts), places=2
        )
