"""
Streaming jobs on a node (docs/protocol.rst §5.8): runs that answer in
pieces while their upload still arrives.

  - L{LiveRun}: STT. The audio goes to the engine's live transcription in
    its thread as it comes (pieces that arrive while the engine is busy
    are taken together, so a slow decode never builds a queue), and every
    piece of transcript it recognizes goes back as a PART at once.
  - L{SpeechRun}: TTS. Text arrives in pieces (an LLM writing); each
    sentence is spoken as soon as it is complete, one after another, and
    its audio goes back as a PART (mono s16le PCM at the voice's rate).
    A sentence is only known to be complete once the text after it starts
    (C{"Mr."}, C{"3."}); one whose text ends as a sentence does is spoken
    at once, on the chance it is one, and its audio held until the next
    piece of text says so (or thrown away if it does not).
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from privox.engines.base import STTJob, TTSJob, checkText
from privox.engines.errors import Cancelled, EngineError
from privox.messages import MAX_TEXT, ErrorCode
from privox.node.worker import Answer, StreamSink
from privox.wav import BadWav, wavPCM

log = Logger()

#: Runs a blocking call in the node's thread pool (metered): a Deferred.
InThread = Callable[..., Deferred[Any]]

#: Where a sentence ends: its punctuation, then a space; or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|\n+")
#: Text that may be a whole sentence, if what follows it is a space.
_MAY_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")
#: Past this many characters with no sentence end, the text is cut at its
#: last comma or space anyway, so that speaking never waits for long.
LONGEST_SENTENCE = 300


class LiveRun:
    """
    One streaming STT job of an engine with C{liveTranscription}.

    @param answer: makes the RSLT of the final transcript.
    @param report: called (on the reactor) with the outcome of the last
        step, result or failure, which it passes on.
    """

    def __init__(
        self,
        inThread: InThread,
        engine: Any,
        job: STTJob,
        answer: Callable[[Any], Answer],
        report: Callable[[Any], Any],
    ) -> None:
        self._inThread = inThread
        self._job = job
        self._answer = answer
        self._report = report
        self._sink: StreamSink | None = None
        self._waiting = bytearray()
        self._busy = True  # until the engine's transcription exists
        self._ended: Deferred[Answer] | None = None
        self._failure: Any = None
        self._transcription: Any = None
        inThread(engine.liveTranscription, job).addCallbacks(self._started, self._failed)

    def parts(self, sink: StreamSink) -> None:
        self._sink = sink

    def _started(self, transcription: Any) -> None:
        self._transcription = transcription
        self._next()

    def _failed(self, failure: Any) -> None:
        self._failure = failure
        self._busy = False
        self._waiting = bytearray()
        # The consumer is told now (the job is answered), not at the end.
        if failure.check(Cancelled) or self._sink is None:
            pass  # the job is answered already
        elif failure.check(EngineError):
            self._sink.fail(failure.value)
        else:
            log.failure("a live transcription failed", failure)
            self._sink.fail(EngineError("the engine failed", ErrorCode.ENGINE_ERROR))
        self._wrapUp()

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None:
            return
        self._waiting += chunk
        if not self._busy:
            self._next()

    def _next(self) -> None:
        """
        Feed the engine what waits, or finish once the stream ended.
        """
        if self._waiting and not self._job.stop.requested:
            chunk, self._waiting = bytes(self._waiting), bytearray()
            self._busy = True
            d = self._inThread(self._transcription.feed, chunk)
            d.addCallbacks(self._heard, self._failed)
            return
        self._busy = False
        self._wrapUp()

    def _heard(self, partials: list[Any]) -> None:
        for partial in partials:
            if self._sink is not None:
                self._sink.send(Answer(dataclasses.asdict(partial)))
        self._next()

    def _wrapUp(self) -> None:
        if self._ended is None or self._busy:
            return
        ended, self._ended = self._ended, None
        if self._failure is not None:
            d: Deferred[Any] = Deferred()
            d.errback(self._failure)
        else:
            d = self._inThread(self._transcription.finish)
        d.addBoth(self._report).addCallback(self._answer).chainDeferred(ended)

    def finish(self) -> Deferred[Answer]:
        self._ended = Deferred()
        ended = self._ended
        self._wrapUp()
        return ended

    def cancel(self) -> None:
        self._job.stop.set()


class SentenceCutter:
    """
    Text in pieces in, complete sentences out (what is left waits for more,
    or for L{rest}).
    """

    def __init__(self) -> None:
        self._text = ""

    def feed(self, text: str) -> list[str]:
        self._text += text
        out = []
        while True:
            match = _SENTENCE_END.search(self._text)
            if match is None:
                break
            out.append(self._text[: match.end()].strip())
            self._text = self._text[match.end():]
        while len(self._text) > LONGEST_SENTENCE:
            head = self._text[:LONGEST_SENTENCE]
            cut = max(head.rfind(","), head.rfind(" "))
            cut = cut + 1 if cut > 0 else LONGEST_SENTENCE
            out.append(self._text[:cut].strip())
            self._text = self._text[cut:]
        return [s for s in out if s.strip()]

    def rest(self) -> str:
        rest, self._text = self._text.strip(), ""
        return rest

    def maybe(self) -> str | None:
        """
        The text waiting, if it ends as a sentence would (the next piece
        may say it does).
        """
        text = self._text.strip()
        return text if text and _MAY_END.search(text) else None


class _Sentence:
    """
    A sentence queued to be spoken: said for sure, or on the chance that
    the text after it starts a new one (then its audio waits for that).
    """

    def __init__(self, text: str, sure: bool) -> None:
        self.text = text
        self.sure = sure
        self.dropped = False
        self.audio: tuple[bytes, int] | None = None


class SpeechRun:
    """
    One streaming TTS job: the JOB_'s C{text} (if any), then the upload's
    UTF-8 text pieces, spoken sentence by sentence.
    """

    def __init__(
        self,
        inThread: InThread,
        engine: Any,
        job: TTSJob,
        report: Callable[[Any], Any],
    ) -> None:
        self._inThread = inThread
        self._engine = engine
        self._job = job
        self._report = report
        self._sink: StreamSink | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._cutter = SentenceCutter()
        self._said = 0  # characters taken, against MAX_TEXT
        self._seconds = 0.0
        self._rate: int | None = None
        self._failure: Any = None
        self._chain: Deferred[None] = succeed(None)
        self._first = job.text
        #: The sentence spoken on the chance it is one, until the text
        #: after it says whether it is.
        self._guess: _Sentence | None = None

    def parts(self, sink: StreamSink) -> None:
        self._sink = sink
        if self._first:
            self._take(self._first)

    def feed(self, chunk: bytes) -> None:
        try:
            self._take(self._decoder.decode(chunk))
        except UnicodeDecodeError:
            self._fail(EngineError("the text is not UTF-8", ErrorCode.BAD_REQUEST))

    def _take(self, text: str) -> None:
        if self._failure is not None:
            return
        self._said += len(text)
        if self._said > MAX_TEXT * 10:
            self._fail(EngineError(f"a stream may say at most {MAX_TEXT * 10} characters",
                                   ErrorCode.TOO_LARGE))
            return
        for sentence in self._cutter.feed(text):
            self._complete(sentence)
        self._guessed(self._cutter.maybe())

    def _complete(self, sentence: str) -> None:
        """
        A sentence is complete: the guess, if it was this one, or spoken.
        """
        guess, self._guess = self._guess, None
        if guess is not None and guess.text == sentence:
            guess.sure = True
            self._release(guess)
            return
        if guess is not None:
            guess.dropped = True
        self._queue(_Sentence(sentence, True))

    def _guessed(self, maybe: str | None) -> None:
        if self._guess is not None and self._guess.text != maybe:
            self._guess.dropped = True  # "Mr." went on: " Smith"
            self._guess = None
        if maybe is not None and self._guess is None:
            self._guess = _Sentence(maybe, False)
            self._queue(self._guess)

    def _fail(self, error: EngineError) -> None:
        if self._failure is None:
            self._failure = error
            self._job.stop.set()
            if self._sink is not None:
                self._sink.fail(error)

    def _queue(self, sentence: _Sentence) -> None:
        self._chain.addCallback(lambda _: self._speak(sentence))

    def _speak(self, sentence: _Sentence) -> Deferred[None] | None:
        if self._failure is not None or self._job.stop.requested or sentence.dropped:
            return None
        try:
            checkText(self._engine.name, sentence.text)
        except EngineError:
            return None  # punctuation alone: nothing to say
        job = dataclasses.replace(self._job, text=sentence.text)
        # The next sentence is made once the farm takes more: a consumer
        # that stops reading holds the synthesis back, not the audio.
        d = self._sink.writable() if self._sink is not None else succeed(None)
        d.addCallback(lambda _: self._inThread(self._engine.synthesize, job))
        d.addCallback(self._spoken, sentence)
        d.addErrback(lambda f: self._fail(f.value if f.check(EngineError) else EngineError(
            "the engine failed", ErrorCode.ENGINE_ERROR)))
        return d

    def _spoken(self, wav: bytes, sentence: _Sentence) -> None:
        try:
            sentence.audio = wavPCM(wav)
        except BadWav:
            self._fail(EngineError("the engine made no PCM WAV", ErrorCode.ENGINE_ERROR))
            return
        self._release(sentence)

    def _release(self, sentence: _Sentence) -> None:
        """
        Send a sentence's audio once it is both made and known to be said.
        """
        if sentence.audio is None or not sentence.sure or sentence.dropped:
            return
        (pcm, rate), sentence.audio = sentence.audio, None
        self._rate = rate
        self._seconds += len(pcm) / 2 / rate
        if self._sink is not None:
            self._sink.send(Answer(
                {"content_type": "audio/pcm", "rate": rate,
                 "duration_s": round(len(pcm) / 2 / rate, 3)},
                pcm,
            ))

    def finish(self) -> Deferred[Answer]:
        rest = self._cutter.rest()
        if rest:
            self._complete(rest)
        self._chain.addCallback(lambda _: self._done())
        return self._chain.addBoth(self._report)

    def _done(self) -> Answer:
        if self._failure is not None:
            raise self._failure
        if not self._seconds:
            raise EngineError("there is no text to speak", ErrorCode.BAD_REQUEST)
        return Answer({
            "content_type": "audio/pcm",
            "rate": self._rate,
            "model": self._job.model,
            "duration_s": round(self._seconds, 3),
        })

    def cancel(self) -> None:
        self._job.stop.set()
