"""
Live jobs for the front ends that stream (the Wyoming server, streaming
HTTP, the WebSocket): a caller's streaming STT or TTS job, charged like any
other. What a stream will use is not known when it starts, so it holds what
the caller has left (at most L{LiveJobs.maxSeconds} of audio), is cut there,
and settles what it used: the seconds of audio sent, or spoken.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from privox.api.access import Access, Caller, Grant
from privox.api.errors import NotServed, OverQuota
from privox.api.exchange import Exchange, Heard, LiveSpeech, LiveTranscription, Transcribed

#: 16 kHz mono s16le, what live STT takes.
BYTES_PER_SECOND = 32000
#: Seconds a stream may run past its audio (the last decode, a slow farm).
DEADLINE_MARGIN = 60.0
#: Seconds a hold outlives its stream's deadline.
HOLD_MARGIN = 5.0


class LiveJobs:
    """
    @param maxSeconds: the longest stream one job may be, in seconds of
        audio (heard or spoken).
    """

    def __init__(
        self, exchange: Exchange, access: Access, clock: IReactorTime, maxSeconds: float = 300.0
    ) -> None:
        self.exchange = exchange
        self.access = access
        self.clock = clock
        self.maxSeconds = maxSeconds

    async def _hold(self, caller: Caller, need: float | None) -> tuple[Grant, float]:
        """
        C{need} seconds held for a stream; if it is not known, what the
        caller has left, up to L{maxSeconds}.

        @raise OverQuota: that is not left.
        """
        if need is None:
            await self.access.check(caller)
            try:
                remaining = (await self.access.standing(caller)).get("remaining")
            except NotServed:  # no accounts: no allowance to count
                remaining = None
            need = self.maxSeconds
            if isinstance(remaining, (int, float)) and not isinstance(remaining, bool):
                need = min(need, float(remaining))
            if need < 1:
                raise OverQuota("nothing is left of this key's allowance for a stream")
        grant = await self.access.admit(caller, need, need + DEADLINE_MARGIN + HOLD_MARGIN)
        return grant, need

    async def transcribe(
        self,
        caller: Caller,
        model: str,
        language: str | None,
        heard: Callable[[Heard], None],
        need: float | None = None,
    ) -> LiveTranscription:
        """
        A live STT job for C{caller}: 16 kHz mono s16le in, pieces out.

        @param need: the audio's seconds, where they are known (a file).
        """
        grant, need = await self._hold(caller, need)
        charged: _ChargedTranscription

        def metered(piece: Heard) -> None:
            charged.heard(piece, heard)

        try:
            live = self.exchange.transcribeLive(model, language, need + DEADLINE_MARGIN, metered)
        except BaseException:
            await grant.release()
            raise
        charged = _ChargedTranscription(live, grant, need)
        return charged

    async def speak(
        self,
        caller: Caller,
        model: str,
        language: str | None,
        voice: str | None,
        spoken: Callable[[bytes, int], None],
        need: float | None = None,
    ) -> LiveSpeech:
        """
        A live TTS job for C{caller}: text in, each sentence's audio out.

        @param need: the most seconds the text may take to say, where it is
            known already.
        """
        grant, need = await self._hold(caller, need)
        charged: _ChargedSpeech

        def metered(pcm: bytes, rate: int) -> None:
            charged.spoken(pcm, rate, spoken)

        try:
            live = self.exchange.synthesizeLive(
                model, language, voice, need + DEADLINE_MARGIN, metered
            )
        except BaseException:
            await grant.release()
            raise
        charged = _ChargedSpeech(live, grant, need)
        return charged


def _settled(grant: Grant, seconds: float, result: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(grant.settle(seconds)).addCallback(lambda _: result)


def _released(grant: Grant, failure: Failure) -> Deferred[Any]:
    return Deferred.fromCoroutine(grant.release()).addCallback(lambda _: failure)


class _ChargedTranscription:
    """
    A live STT job that ends itself at the seconds it holds, and settles
    the seconds sent: when it succeeds, and when it fails or is given up
    after something was heard (else a client could take the captions and
    then make the job fail).
    """

    def __init__(self, live: LiveTranscription, grant: Grant, need: float) -> None:
        self._live = live
        self._limit = int(need * BYTES_PER_SECOND) & ~1
        self._sent = 0
        self._ended = False
        self._heard = False
        self.done: Deferred[Transcribed] = live.done.addCallbacks(
            lambda result: _settled(grant, self._sent / BYTES_PER_SECOND, result),
            lambda failure: _settled(grant, self._sent / BYTES_PER_SECOND, failure)
            if self._heard else _released(grant, failure),
        )

    def heard(self, piece: Heard, deliver: Callable[[Heard], None]) -> None:
        self._heard = True
        deliver(piece)

    def write(self, pcm: bytes) -> None:
        room = self._limit - self._sent
        if room <= 0 or self._ended:
            return
        pcm = pcm[:room]
        self._sent += len(pcm)
        self._live.write(pcm)
        if self._sent >= self._limit:
            self.end()

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._live.end()

    def cancel(self) -> None:
        self._live.cancel()


class _ChargedSpeech:
    """
    A live TTS job whose audio stops at the seconds it holds (the job is
    then cancelled), and which settles the seconds spoken.
    """

    def __init__(self, live: LiveSpeech, grant: Grant, need: float) -> None:
        self._live = live
        self._need = need
        self._seconds = 0.0
        self._cut = False
        self.done: Deferred[float] = live.done.addCallbacks(
            lambda seconds: _settled(grant, self._seconds, self._seconds),
            self._failed, errbackArgs=(grant,),
        )

    def _failed(self, failure: Failure, grant: Grant) -> Deferred[Any]:
        if self._cut:  # cancelled here, at the end of what was held
            return _settled(grant, self._seconds, self._seconds)
        if self._seconds:  # what was heard is paid for
            return _settled(grant, self._seconds, failure)
        return _released(grant, failure)

    def spoken(self, pcm: bytes, rate: int, deliver: Callable[[bytes, int], None]) -> None:
        room = self._need - self._seconds
        if room <= 0:
            return
        keep = min(len(pcm), int(room * rate) * 2)
        self._seconds += keep / 2 / rate
        deliver(pcm[:keep], rate)
        if keep < len(pcm):
            self._cut = True
            self._live.cancel()

    def write(self, text: str) -> None:
        self._live.write(text)

    def end(self) -> None:
        self._live.end()

    def cancel(self) -> None:
        self._live.cancel()
