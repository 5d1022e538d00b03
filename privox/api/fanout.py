"""
Long recordings transcribed by many producers at once (issue 21).

A recording longer than the API's C{--fanout-above} is decoded to 16 kHz
mono PCM and cut into pieces of about 30 seconds (L{cutPieces}): each cut
falls in the longest pause webrtcvad hears between 20 and 30 seconds into
the piece (never mid-word when a pause exists there), or, in a stretch
with no pause, at its quietest frame. Whisper decodes 30-second windows,
so pieces this long cost it nothing in accuracy.

L{FanOut} sends the pieces, each as a WAV, through the exchange at most
C{atOnce} at a time: a piece that fails for a reason worth another try
(L{Unavailable}, L{NoProducer}, L{TimedOut}: a producer lost or busy) is
tried again after a short backoff, up to C{tries} times, while the
request's deadline allows; any other failure ends the whole job (the
pieces still in flight are cancelled). Each piece's deadline follows its
own length. The transcripts are stitched in order (L{stitch}): the text
joined, segments and words moved by the piece's start.

A progress callback hears C{(done, total)} as pieces finish (once with
C{done} 0 when the pieces are cut), and an in-order callback each piece's
result (with its times already moved) as soon as every piece before it is
done: the streaming route sends both as server-sent events.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.api.errors import ApiError, NoProducer, TimedOut, Unavailable
from privox.api.farmpool import Expired, race
from privox.api.exchange import Exchange, TimedText, TimedWord, Transcribed
from privox.utterances import webrtcvadClassifier
from privox.wav import pcmToWav

log = Logger()

#: The rate pieces are cut and sent at: mono s16le.
RATE = 16000
#: webrtcvad's frame, in milliseconds.
FRAME_MS = 30
#: A piece is cut in the longest pause from this many seconds into it...
SHORTEST = 20.0
#: ...to this many (Whisper's window): a recording no longer is one piece.
LONGEST = 30.0
#: The last piece is at least this long where it can be (no 1-second tail).
SHORTEST_TAIL = 5.0
#: Pieces in flight at once (the API's C{--fanout}).
DEFAULT_AT_ONCE = 8
#: Tries per piece, and the first backoff between them (doubling).
DEFAULT_TRIES = 4
DEFAULT_BACKOFF = 0.5
#: webrtcvad's aggressiveness for finding pauses.
VAD_AGGRESSIVENESS = 2

#: (done, total)
Progress = Callable[[int, int], None]
#: (piece, its transcript with times moved to the recording's)
InOrder = Callable[["Piece", Transcribed], None]
#: Runs C{f(*args)} in a thread and fires with its result.
Runner = Callable[..., Any]


@dataclass(frozen=True)
class Piece:
    """
    A stretch of the recording sent as one job.

    @ivar start: where it starts in the recording, in seconds.
    """

    index: int
    start: float
    pcm: bytes = field(repr=False)
    rate: int = RATE

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.rate

    @property
    def end(self) -> float:
        return self.start + self.seconds

    def wav(self) -> bytes:
        return pcmToWav(self.pcm, self.rate)


def defaultClassifier(rate: int = RATE) -> Callable[[bytes], bool]:
    return webrtcvadClassifier(VAD_AGGRESSIVENESS, rate)


def _frameEnergies(pcm: bytes, frameBytes: int) -> list[float]:
    whole = len(pcm) - len(pcm) % frameBytes
    if not whole:
        return []
    samples = numpy.frombuffer(pcm[:whole], dtype="<i2").astype(numpy.float32)
    frames = samples.reshape(-1, frameBytes // 2)
    return [float(e) for e in numpy.mean(frames**2, axis=1)]


def cutPieces(
    pcm: bytes,
    isSpeech: Callable[[bytes], bool] | None = None,
    rate: int = RATE,
    shortest: float = SHORTEST,
    longest: float = LONGEST,
    frameMs: int = FRAME_MS,
) -> list[Piece]:
    """
    C{pcm} (mono s16le at C{rate}) cut into pieces of at most C{longest}
    seconds, each cut in the middle of the longest run of non-speech frames
    between C{shortest} and C{longest} seconds into its piece (the later of
    equal ones); where that stretch has no non-speech frame, at its
    quietest frame. Blocking (webrtcvad on every frame): run it in a
    thread. The pieces together are exactly C{pcm}.
    """
    if not 0 < shortest <= longest:
        raise ValueError("need 0 < shortest <= longest")
    if isSpeech is None:
        isSpeech = defaultClassifier(rate)
    pcm = pcm[: len(pcm) - len(pcm) % 2]
    frameBytes = rate * frameMs // 1000 * 2
    frameCount = len(pcm) // frameBytes
    perSecond = 1000 / frameMs
    longestFrames = int(longest * perSecond)
    if len(pcm) <= longestFrames * frameBytes:
        return [Piece(0, 0.0, pcm, rate)] if pcm else []
    speech = [isSpeech(pcm[i * frameBytes : (i + 1) * frameBytes]) for i in range(frameCount)]
    energies: list[float] | None = None
    shortestFrames = max(1, int(shortest * perSecond))
    tailFrames = int(SHORTEST_TAIL * perSecond)
    cuts: list[int] = []  # frame indices where a piece starts
    position = 0
    while len(pcm) - position * frameBytes > longestFrames * frameBytes:
        last = min(position + longestFrames, frameCount - tailFrames)
        first = min(position + shortestFrames, last)
        if last <= position:
            break
        cut = _longestPause(speech, first, last)
        if cut is None:
            if energies is None:
                energies = _frameEnergies(pcm, frameBytes)
            window = range(first, last + 1)
            cut = min(window, key=lambda i: (energies[i] if i < len(energies) else math.inf, -i))
        cut = max(cut, position + 1)
        cuts.append(cut)
        position = cut
    pieces = []
    bounds = [0, *cuts, None]
    for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
        chunk = pcm[a * frameBytes : None if b is None else b * frameBytes]
        pieces.append(Piece(index, a * frameMs / 1000, chunk, rate))
    return pieces


def _longestPause(speech: Sequence[bool], first: int, last: int) -> int | None:
    """
    The frame in the middle of the longest run of non-speech frames within
    C{first}..C{last} (inclusive; the later of equal runs), or L{None}.
    """
    best: tuple[int, int] | None = None  # (length, middle)
    run = 0
    for i in range(first, last + 1):
        quiet = i < len(speech) and not speech[i]
        if quiet:
            run += 1
        if run and (not quiet or i == last):
            end = i if quiet else i - 1
            length = run
            middle = end - (length - 1) // 2
            if best is None or length >= best[0]:
                best = (length, middle)
            run = 0
    return None if best is None else best[1]


def moved(result: Transcribed, piece: Piece) -> Transcribed:
    """
    A piece's transcript with its segments (and their words) moved to the
    recording's times and kept within the piece; a piece with text but no
    segments gets one segment of the whole piece.
    """
    offset, end = piece.start, piece.end

    def at(t: float) -> float:
        return round(min(max(piece.start + t, offset), end), 3)

    segments = tuple(
        dataclasses.replace(
            s,
            start=at(s.start),
            end=at(s.end),
            words=tuple(
                dataclasses.replace(w, start=at(w.start), end=at(w.end)) for w in s.words
            ),
        )
        for s in result.segments
    )
    if not segments and result.text.strip():
        segments = (TimedText(round(offset, 3), round(end, 3), result.text.strip()),)
    return dataclasses.replace(result, segments=segments, duration_s=piece.seconds)


def stitch(
    pieces: Sequence[Piece], results: Sequence[Transcribed], model: str, language: str | None
) -> Transcribed:
    """
    The recording's transcript from its pieces' (already L{moved}), in
    order: texts joined by a space, segments one after the other (each
    starting no earlier than the one before ends), the language most pieces
    heard.
    """
    text = " ".join(r.text.strip() for r in results if r.text.strip())
    segments: list[TimedText] = []
    last = 0.0
    lastWord = 0.0
    for result in results:
        for s in result.segments:
            start = max(s.start, last)
            end = max(s.end, start)
            words = []
            for w in s.words:
                first = min(max(w.start, lastWord, start), end)
                stop = min(max(w.end, first), end)
                words.append(TimedWord(first, stop, w.word, w.probability))
                lastWord = stop
            segments.append(TimedText(start, end, s.text, s.avg_logprob, s.no_speech_prob,
                                      tuple(words)))
            last = end
    heard = Counter(r.language for r in results if r.language)
    return Transcribed(
        text,
        model,
        heard.most_common(1)[0][0] if heard else language,
        round(sum(p.seconds for p in pieces), 3),
        tuple(segments),
    )


def retryable(error: Exception) -> bool:
    return isinstance(error, (Unavailable, TimedOut))


class FanOut:
    """
    Transcribes pieces of a recording through C{exchange}, at most
    C{atOnce} at a time.

    @param clock: for backoffs and deadlines (C{seconds}, C{callLater}).
    @param runInThread: where cutting (webrtcvad over the whole recording)
        runs.
    @param isSpeech: the frame classifier (default webrtcvad's).
    """

    def __init__(
        self,
        exchange: Exchange,
        clock: Any,
        runInThread: Runner,
        atOnce: int = DEFAULT_AT_ONCE,
        tries: int = DEFAULT_TRIES,
        backoff: float = DEFAULT_BACKOFF,
        isSpeech: Callable[[bytes], bool] | None = None,
    ) -> None:
        if atOnce < 1 or tries < 1:
            raise ValueError("atOnce and tries must be at least 1")
        self.exchange = exchange
        self.clock = clock
        self.runInThread = runInThread
        self.atOnce = atOnce
        self.tries = tries
        self.backoff = backoff
        self.isSpeech = isSpeech

    async def cut(self, pcm: bytes) -> list[Piece]:
        return list(await self.runInThread(cutPieces, pcm, self.isSpeech))

    async def transcribe(
        self,
        pcm: bytes,
        model: str,
        language: str | None,
        deadline: float,
        pieceDeadline: Callable[[float], float],
        task: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        words: bool = False,
        progress: Progress | None = None,
        inOrder: InOrder | None = None,
    ) -> Transcribed:
        """
        The stitched transcript of C{pcm} (16 kHz mono s16le).

        @param deadline: seconds the whole job may take.
        @param pieceDeadline: the seconds a piece of so many seconds may
            take (each try; never past C{deadline}).
        @raise ApiError: a piece failed for good (the last error of its
            last try), or the deadline passed (L{TimedOut}).
        """
        endsAt = self.clock.seconds() + deadline
        pieces = await self.cut(pcm)
        if not pieces:
            return Transcribed("", model, language, 0.0)
        total = len(pieces)
        if progress is not None:
            progress(0, total)
        results: list[Transcribed | None] = [None] * total
        state = {"next": 0, "done": 0, "sent": 0, "running": 0}
        # Pieces waiting for one of this recording's others to finish.
        waiting: list[Deferred[None]] = []

        def finishedOne() -> None:
            woken, waiting[:] = list(waiting), []
            for d in woken:
                d.callback(None)
        inFlight: set[Deferred[Any]] = set()
        failure: list[ApiError] = []

        def deliver() -> None:
            while state["sent"] < total and results[state["sent"]] is not None:
                index = state["sent"]
                state["sent"] += 1
                if inOrder is not None:
                    inOrder(pieces[index], results[index])  # type: ignore[arg-type]

        async def one(piece: Piece) -> Transcribed:
            wav = piece.wav()
            delay = self.backoff
            attempt = 0
            while True:
                left = endsAt - self.clock.seconds()
                if left <= 0:
                    raise TimedOut(f"piece {piece.index + 1} of {total} was not done in time")
                state["running"] += 1
                try:
                    return await self.exchange.transcribe(
                        model, language, wav, "wav",
                        round(min(pieceDeadline(piece.seconds), left), 3),
                        task, prompt, temperature, words,
                    )
                except ApiError as e:
                    error = e
                finally:
                    state["running"] -= 1
                if isinstance(error, NoProducer) and state["running"]:
                    # Every producer is busy with this recording's other
                    # pieces: wait for one of them, no try spent.
                    woken: Deferred[None] = Deferred()
                    waiting.append(woken)
                    try:
                        await race(self.clock, woken, endsAt)
                    except Expired:
                        raise TimedOut(
                            f"piece {piece.index + 1} of {total} was not done in time"
                        ) from None
                    continue
                attempt += 1
                left = endsAt - self.clock.seconds()
                if not retryable(error) or attempt >= self.tries or left <= delay:
                    raise error
                log.info(
                    "fan-out: piece {n} of {total} failed ({code}); trying again",
                    n=piece.index + 1, total=total, code=error.kind,
                )
                await deferLater(self.clock, delay, lambda: None)
                delay *= 2

        async def worker() -> None:
            while not failure and state["next"] < total:
                piece = pieces[state["next"]]
                state["next"] += 1
                d = ensureDeferred(one(piece))
                inFlight.add(d)
                try:
                    result = await d
                except CancelledError:
                    raise
                except Exception as e:
                    if not failure:
                        failure.append(e if isinstance(e, ApiError) else ApiError(
                            "a piece of the recording failed"))
                        if not isinstance(e, ApiError):
                            log.failure("fan-out: a piece failed", Failure(e))
                        for other in list(inFlight):
                            if other is not d:
                                other.cancel()
                    return
                finally:
                    inFlight.discard(d)
                    finishedOne()
                results[piece.index] = moved(result, piece)
                state["done"] += 1
                if progress is not None:
                    progress(state["done"], total)
                deliver()

        workers = [ensureDeferred(worker()) for _ in range(min(self.atOnce, total))]
        try:
            outcome = await DeferredList(workers, consumeErrors=True)
        except BaseException:
            for d in list(inFlight):
                d.cancel()
            for w in workers:
                w.cancel()
            raise
        if failure:
            raise _told(failure[0], total)
        for ok, value in outcome:
            if not ok:  # a cancelled piece, or a bug
                value.raiseException()
        return stitch(pieces, [r for r in results if r is not None], model, language)


def _told(error: ApiError, total: int) -> ApiError:
    """
    C{error}, saying it ended a job of C{total} pieces.
    """
    told = type(error)(f"{error.message} (a piece of a recording cut into {total})")
    told.retryAfter = error.retryAfter
    return told

