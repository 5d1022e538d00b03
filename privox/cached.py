"""
A value worked out at most every so often, however often it is asked for:
those who ask while it is being worked out wait for that one answer.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class Cached(Generic[T]):
    """
    C{work()}'s answer, kept C{seconds} on C{clock}. A failure is not kept:
    the next ask works again.
    """

    def __init__(self, clock: IReactorTime, seconds: float, work: Callable[[], Awaitable[T]]) -> None:
        self.clock = clock
        self.seconds = seconds
        self._work = work
        self._kept: tuple[float, T] | None = None
        self._waiting: list[Deferred[T]] | None = None

    async def get(self) -> T:
        now = self.clock.seconds()
        if self._kept is not None and now - self._kept[0] < self.seconds:
            return self._kept[1]
        d: Deferred[T] = Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
        else:
            # The work is no one asker's: one that gives up (a client gone)
            # cancels only its own wait. (It may be done at once.)
            self._waiting = [d]
            Deferred.fromCoroutine(self._refresh(now))
        return await d

    async def _refresh(self, now: float) -> None:
        try:
            value = await self._work()
        except BaseException as e:
            waiting, self._waiting = self._waiting or [], None
            for d in waiting:
                d.errback(e)
            return
        self._kept = (now, value)
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(value)
