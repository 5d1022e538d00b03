"""
Live captions: C{privox caption} reads 16 kHz mono s16le PCM (e.g. from
C{arecord}), cuts it into utterances on silence with webrtcvad
(L{Segmenter}), sends each to be transcribed as soon as it is cut and
prints one line per utterance, in order (L{CaptionProtocol}).
"""

from __future__ import annotations

import typing
from typing import Awaitable, Callable

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from privox import utterances
from privox.automata import build
from privox.client import CliError, oneLine
from privox.utterances import FRAME_MS, Segmenter, Utterance

#: The exit status of a second Ctrl-C.
EXIT_INTERRUPTED = 130

# FRAME_MS and the segmenter are part of what privox.cli builds a caption from.
__all__ = ["FRAME_MS", "CaptionProtocol", "Segmenter", "Utterance", "webrtcvadClassifier"]


def webrtcvadClassifier(aggressiveness: int) -> Callable[[bytes], bool]:
    """
    webrtcvad's speech/non-speech decision for one frame of caption's input.

    @raise CliError: webrtcvad is not installed.
    """
    try:
        return utterances.webrtcvadClassifier(aggressiveness)
    except ImportError as e:
        raise CliError(f"privox caption: {e}") from None


# -- caption ----------------------------------------------------------------


# The caption's life:
#
#   reading ──end of input──▶ ending ──lines out──▶ closing ──stdout closed──▶ over
#      └────────Ctrl-C───────▶ stopping ─┘ (Ctrl-C again: quit) ─────────────▶ over
#
# A failed transcription closes stdout from any of the first three; stdout
# lost (nobody reads it), or a second Ctrl-C, ends it at once.


class CaptionEvents(typing.Protocol):
    def data(self, data: bytes) -> None:
        "PCM from stdin."

    def inputEnded(self) -> None:
        "stdin is at its end."

    def interrupt(self) -> None:
        "Ctrl-C."

    def line(self, text: str) -> None:
        "The next transcript's line, in order."

    def linesDone(self) -> None:
        "Every line after the end of input is out."

    def failed(self, error: CliError) -> None:
        "A transcription failed."

    def outputLost(self) -> None:
        "Nobody reads stdout any more."

    def lost(self) -> None:
        "stdout (and stdin) are closed."


@implementer(IHalfCloseableProtocol)
class CaptionProtocol(Protocol):
    """
    Reads PCM from its transport (stdin, through L{StandardIO}), sends each
    utterance to C{transcribe} as soon as it is cut, and writes the
    transcripts back to the transport (stdout), one line each, in order,
    whatever order they come back in. Empty transcripts print nothing.

    @ivar done: fires once every line is written and stdout is closed at the
        end of input (or after L{interrupt}); fails with the first
        L{CliError}, after the lines before it are written.
    """

    events: CaptionEvents

    def __init__(
        self, segmenter: Segmenter, transcribe: Callable[[Utterance], Awaitable[str]]
    ) -> None:
        self.segmenter = segmenter
        self.transcribe = transcribe
        self.done: Deferred[None] = Deferred()
        self._tail: Deferred[None] = succeed(None)
        self._jobs: set[Deferred[str]] = set()
        self._error: CliError | None = None
        self.events = CaptionMachine(self)

    # The transport's faces: stdin, stdout, and Ctrl-C.

    def dataReceived(self, data: bytes) -> None:
        self.events.data(data)

    def readConnectionLost(self) -> None:
        self.events.inputEnded()

    def interrupt(self) -> None:
        """
        Ctrl-C: stop reading, as if the input had ended (it may have ended
        already: Ctrl-C stops C{arecord} too); a second time, quit.
        """
        self.events.interrupt()

    def writeConnectionLost(self) -> None:
        # Nobody reads our output any more (e.g. `privox caption | head -1`):
        # that ends the work, quietly.
        self.events.outputLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.lost()

    # What the machine does

    def _submit(self, utterance: Utterance) -> None:
        job = Deferred.fromCoroutine(self.transcribe(utterance))
        self._jobs.add(job)
        job.addBoth(self._forget, job)
        self._tail = Deferred.fromCoroutine(self._printAfter(self._tail, job))

    def _forget(self, result: object, job: Deferred[str]) -> object:
        self._jobs.discard(job)
        return result

    async def _printAfter(self, previous: Deferred[None], job: Deferred[str]) -> None:
        """
        Hand C{job}'s line on once the line before it is out. Never fails.
        """
        await previous
        try:
            text = await job
        except CliError as e:
            self.events.failed(e)
            return
        except CancelledError:
            return
        except Exception as e:
            self.events.failed(CliError(f"unexpected error: {type(e).__name__}: {e}"))
            return
        line = oneLine(text)
        if line:
            self.events.line(line)

    def _endInput(self) -> None:
        for utterance in self.segmenter.finish():
            self._submit(utterance)
        self._tail.addCallback(lambda _: self.events.linesDone())

    def _cancelJobs(self) -> None:
        for job in list(self._jobs):
            job.cancel()

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        else:
            self.done.callback(None)


_caption = TypeMachineBuilder(CaptionEvents, CaptionProtocol)
reading = _caption.state("reading")
ending = _caption.state("ending")
stopping = _caption.state("stopping")
closing = _caption.state("closing")
over = _caption.state("over")


@reading.upon(CaptionEvents.data).loop()
def _read(events: CaptionEvents, c: CaptionProtocol, data: bytes) -> None:
    for utterance in c.segmenter.feed(data):
        c._submit(utterance)


@ending.upon(CaptionEvents.data).loop()
@stopping.upon(CaptionEvents.data).loop()
@closing.upon(CaptionEvents.data).loop()
@over.upon(CaptionEvents.data).loop()
def _unread(events: CaptionEvents, c: CaptionProtocol, data: bytes) -> None:
    pass  # what came after the end (or a pause still in flight)


@reading.upon(CaptionEvents.inputEnded).to(ending)
def _inputEnded(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._endInput()


@ending.upon(CaptionEvents.inputEnded).loop()
@stopping.upon(CaptionEvents.inputEnded).loop()
@closing.upon(CaptionEvents.inputEnded).loop()
@over.upon(CaptionEvents.inputEnded).loop()
def _endedAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.interrupt).to(stopping)
def _stop(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.transport.pauseProducing()  # type: ignore[union-attr]
    c._endInput()


@ending.upon(CaptionEvents.interrupt).to(stopping)
def _stopEnded(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass  # the input had ended already (Ctrl-C stops arecord too)


@stopping.upon(CaptionEvents.interrupt).to(over)
@closing.upon(CaptionEvents.interrupt).to(over)
def _quit(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.done.errback(SystemExit(EXIT_INTERRUPTED))
    c._cancelJobs()


@over.upon(CaptionEvents.interrupt).loop()
def _overAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.line).loop()
@ending.upon(CaptionEvents.line).loop()
@stopping.upon(CaptionEvents.line).loop()
def _write(events: CaptionEvents, c: CaptionProtocol, text: str) -> None:
    c.transport.write(text.encode("utf-8") + b"\n")  # type: ignore[union-attr]


@closing.upon(CaptionEvents.line).loop()
@over.upon(CaptionEvents.line).loop()
def _unwritten(events: CaptionEvents, c: CaptionProtocol, text: str) -> None:
    pass  # after a failure, or with stdout gone


@ending.upon(CaptionEvents.linesDone).to(closing)
@stopping.upon(CaptionEvents.linesDone).to(closing)
def _allOut(events: CaptionEvents, c: CaptionProtocol) -> None:
    c.transport.loseConnection()  # type: ignore[union-attr]  # flushes first


@closing.upon(CaptionEvents.linesDone).loop()
@over.upon(CaptionEvents.linesDone).loop()
def _outAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


@reading.upon(CaptionEvents.failed).to(closing)
@ending.upon(CaptionEvents.failed).to(closing)
@stopping.upon(CaptionEvents.failed).to(closing)
def _failed(events: CaptionEvents, c: CaptionProtocol, error: CliError) -> None:
    c._error = error
    c._cancelJobs()
    c.transport.loseConnection()  # type: ignore[union-attr]


@closing.upon(CaptionEvents.failed).loop()
@over.upon(CaptionEvents.failed).loop()
def _failedAlready(events: CaptionEvents, c: CaptionProtocol, error: CliError) -> None:
    pass  # the first error is the one said


@reading.upon(CaptionEvents.outputLost).to(over)
@ending.upon(CaptionEvents.outputLost).to(over)
@stopping.upon(CaptionEvents.outputLost).to(over)
@closing.upon(CaptionEvents.outputLost).to(over)
def _deaf(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._cancelJobs()
    c.transport.pauseProducing()  # type: ignore[union-attr]
    c._finish()


@reading.upon(CaptionEvents.lost).to(over)
@ending.upon(CaptionEvents.lost).to(over)
@stopping.upon(CaptionEvents.lost).to(over)
@closing.upon(CaptionEvents.lost).to(over)
@over.upon(CaptionEvents.lost).loop()
def _lost(events: CaptionEvents, c: CaptionProtocol) -> None:
    c._finish()


@over.upon(CaptionEvents.outputLost).loop()
def _deafAlready(events: CaptionEvents, c: CaptionProtocol) -> None:
    pass


CaptionMachine = build(_caption)
