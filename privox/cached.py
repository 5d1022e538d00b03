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
        if self._waiting is not None:
            d: Deferred[T] = Deferred()
            self._waiting.append(d)
            return await d
        self._waiting = []
        try:
            value = await self._work()
        except BaseException as e:
            waiting, self._waiting = self._waiting, None
            for d in waiting:
                d.errback(e)
            raise
        self._kept = (now, value)
        waiting, self._waiting = self._waiting, None
        for d in waiting:
            d.callback(value)
        return value
