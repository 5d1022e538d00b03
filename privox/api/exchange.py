"""
What the HTTP layer needs from the exchange behind it: run an STT or TTS job
somewhere, or say precisely why not. L{privox.api.farms.FarmExchange} is the
real one (farms over PVX/2, with retry and fallback).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

#: The most segments an answer is taken with (a 2-hour recording has ~1,500).
MAX_SEGMENTS = 20_000
#: The most words an answer is taken with, all segments together (a 2-hour
#: recording has ~20,000), and the longest word.
MAX_WORDS = 200_000
MAX_WORD = 200
#: How far (a factor) a producer's claimed speed may stray past the range
#: it must be in (1 to the speed asked) and still be taken, as the nearest
#: edge: a claim rounded on its way.
SPEED_SLACK = 1.01
#: How far a word may stray outside its segment's times, and start before
#: the word before it ends (seconds): engines round their times.
WORD_SLACK = 0.01


@dataclass(frozen=True)
class TimedWord:
    """
    A word of a transcript and when it was said (seconds).
    """

    start: float
    end: float
    word: str
    probability: float | None = None


@dataclass(frozen=True)
class TimedText:
    """
    A segment of a transcript: when it was said (seconds) and what; its
    words, in order, where the job asked for them and the producer timed
    them.
    """

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    words: tuple[TimedWord, ...] = ()


@dataclass(frozen=True)
class Transcribed:
    text: str
    model: str
    language: str | None
    duration_s: float | None
    #: In order; empty where the producer gave none.
    segments: tuple[TimedText, ...] = ()



@dataclass(frozen=True)
class Spoken:
    """
    A TTS answer: a WAV file, and the speed it was spoken at (the producer's
    RSLT C{speed}: 1 where its engine does not pace speech, and the API
    stretches the audio the rest of the way).
    """

    wav: bytes
    speed: float = 1.0

    @classmethod
    def answered(cls, wav: bytes, fields: dict[str, Any], asked: float) -> Spoken:
        """
        The speed a producer says it spoke at (RSLT's C{speed}) counts only
        from 1 to the speed asked for: the API then stretches the audio the
        rest of the way, never further than asked on a producer's word.
        Anything else is taken as 1.
        """
        said = fields.get("speed")
        low, high = min(1.0, asked), max(1.0, asked)
        if _number(said) and low / SPEED_SLACK <= said <= high * SPEED_SLACK:
            # A claim a rounding away from the range is taken as its edge.
            return cls(wav, min(max(float(said), low), high))
        return cls(wav, 1.0)


def readSegments(value: Any) -> tuple[TimedText, ...]:
    """
    A producer's C{segments}, if they are what they should be (in order,
    times that make sense); else none (a producer is a stranger: its
    malformed segments are not passed on). Their C{words} likewise: if any
    is malformed, no segment keeps its words (the transcript stands).
    """
    if not isinstance(value, list) or len(value) > MAX_SEGMENTS:
        return ()
    out: list[TimedText] = []
    last = 0.0
    for item in value:
        if not isinstance(item, dict):
            return ()
        start, end, text = item.get("start"), item.get("end"), item.get("text")
        if not (_number(start) and _number(end) and isinstance(text, str)):
            return ()
        if not last - 0.001 <= start <= end:
            return ()
        last = end
        scores = [item.get(k) for k in ("avg_logprob", "no_speech_prob")]
        out.append(TimedText(
            float(start), float(end), text.strip()[:10_000],
            *(float(v) if _number(v, negative=True) else None for v in scores),
        ))
    words = _readWords(value, out)
    if words is None:
        return tuple(out)
    return tuple(
        dataclasses.replace(segment, words=timed) if timed else segment
        for segment, timed in zip(out, words)
    )


def _readWords(
    items: list[dict[str, Any]], segments: list[TimedText]
) -> list[tuple[TimedWord, ...]] | None:
    """
    Each segment's words (C{items} are the producer's segments, read into
    C{segments}): finite times, in order across the whole transcript,
    within their segment (give or take L{WORD_SLACK}); L{None} if any is
    malformed, or there are too many.
    """
    out: list[tuple[TimedWord, ...]] = []
    count = 0
    last = 0.0
    for item, segment in zip(items, segments):
        value = item.get("words")
        if value is None:
            out.append(())
            continue
        if not isinstance(value, list):
            return None
        count += len(value)
        if count > MAX_WORDS:
            return None
        words = []
        for word in value:
            if not isinstance(word, dict):
                return None
            start, end, text = word.get("start"), word.get("end"), word.get("word")
            if not (_number(start) and _number(end) and isinstance(text, str)):
                return None
            text = text.strip()
            if not text or len(text) > MAX_WORD:
                return None
            if not (
                max(last, segment.start) - WORD_SLACK <= start <= end <= segment.end + WORD_SLACK
            ):
                return None
            last = end
            probability = word.get("probability")
            words.append(TimedWord(
                float(start), float(end), text,
                float(probability) if _number(probability) and probability <= 1 else None,
            ))
        out.append(tuple(words))
    return out


def _number(value: Any, negative: bool = False) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (negative or value >= 0)
    )


@dataclass(frozen=True)
class Heard:
    """
    A piece of a live transcript: what the utterance being spoken seems to
    say so far (C{final} false: a later piece replaces it), or what it said
    (C{final}: it will not change, and the next piece starts the next
    utterance). Times are seconds from the start of the stream.
    """

    text: str
    final: bool
    start: float
    end: float


class LiveTranscription(Protocol):
    """
    An STT job whose audio is sent as it is captured (PVX/2 streaming,
    docs/protocol.rst §5.8). Pieces of the transcript reach the C{heard}
    callback it was made with as the node recognizes them.
    """

    #: Fires with the whole transcript once the audio has ended and the
    #: node is done; fails with an L{privox.api.errors.ApiError}.
    done: Deferred[Transcribed]

    def write(self, pcm: bytes) -> None:
        "The next 16 kHz mono s16le audio, in order."

    def end(self) -> None:
        "No more audio."

    def cancel(self) -> None:
        "Give the job up (the caller went away): C{done} fails."


class LiveSpeech(Protocol):
    """
    A TTS job whose text may arrive in pieces (as an LLM writes it) and
    whose audio comes back sentence by sentence to the C{spoken} callback
    it was made with: C{(pcm, rate)}, mono s16le.
    """

    #: Fires with the seconds of audio spoken once the last sentence is
    #: out; fails with an L{privox.api.errors.ApiError}.
    done: Deferred[float]

    def write(self, text: str) -> None:
        "More text to say (a sentence is spoken once it is complete)."

    def end(self) -> None:
        "No more text: the rest is spoken."

    def cancel(self) -> None:
        "Give the job up: C{done} fails."


class Exchange(Protocol):
    async def transcribe(
        self,
        model: str,
        language: str | None,
        audio: bytes,
        format: str,
        deadline: float,
        task: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        words: bool = False,
    ) -> Transcribed:
        """
        @param format: C{wav}, C{pcm_s16le}, C{zip} or C{auto} (PVX/2's).
        @param task: C{translate} (to English), or L{None} to transcribe.
        @param prompt: text before the audio, for the engine (names, style).
        @param temperature: the engine's sampling temperature, 0 to 1.
        @param words: ask the producer to time each word (its segments'
            C{words}; a producer that cannot gives none).
        @param deadline: seconds the job may take, every attempt included.
        @raise privox.api.errors.ApiError: the job could not be done
            (L{privox.api.errors.TimedOut} past C{deadline}).
        """

    async def synthesize(
        self, model: str, language: str | None, voice: str | None, text: str, deadline: float,
        speed: float = 1.0,
    ) -> Spoken:
        """
        @param speed: how fast to speak, where the producer's engine paces
            its speech (the answer says whether it did).
        @return: a WAV file, and the speed it was spoken at.
        @raise privox.api.errors.ApiError: the job could not be done.
        """

    def transcribeLive(
        self, model: str, language: str | None, deadline: float, heard: Callable[[Heard], None]
    ) -> LiveTranscription:
        """
        Start a streaming STT job: audio goes in with C{write}, pieces of
        the transcript come out through C{heard}. C{deadline}: the longest
        the whole stream may last.
        """

    def synthesizeLive(
        self,
        model: str,
        language: str | None,
        voice: str | None,
        deadline: float,
        spoken: Callable[[bytes, int], None],
    ) -> LiveSpeech:
        """
        Start a streaming TTS job: text goes in with C{write}, each
        sentence's audio comes out through C{spoken}.
        """

    def health(self) -> dict[str, Any]:
        """
        Farms and whether each is reachable, for GET /healthz (no identities).
        """
