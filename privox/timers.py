"""
Many timeouts that are mostly cancelled, on one of the reactor's calls.

A farm gives every job a deadline, every new connection a handshake timeout
and every idle producer a keepalive, and cancels nearly all of them. As a
reactor call each costs a L{DelayedCall}, a place in the reactor's heap
(whose comparisons are Python code), its cancellation and, later, the heap's
clean-up; and the bigger that heap, the more the farm's one call per turn of
the reactor costs too (L{privox.farm.farm.Farm.cork}). L{Timers} keeps its
own heap of plain tuples, compared in C, and holds one reactor call, for the
earliest of them (bench/README.rst: 4 % of the instructions a farm spends
on a small relayed job).
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import count
from typing import Any, Callable

from twisted.internet.error import AlreadyCancelled, AlreadyCalled
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Cancelled timers are left in the heap until this many, and half of it,
#: are; then it is rebuilt without them (as the reactor does its own).
_REBUILD_AT = 50


class Timer:
    """
    One timeout of a L{Timers}: C{active()} until it runs or is cancelled.
    """

    __slots__ = ("time", "_timers", "_f", "_args", "_state")

    _PENDING, _CALLED, _CANCELLED = 0, 1, 2

    def __init__(self, timers: Timers, time: float, f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.time = time
        self._timers = timers
        self._f = f
        self._args = args
        self._state = Timer._PENDING

    def active(self) -> bool:
        return self._state == Timer._PENDING

    def cancel(self) -> None:
        if self._state == Timer._CALLED:
            raise AlreadyCalled()
        if self._state == Timer._CANCELLED:
            raise AlreadyCancelled()
        self._state = Timer._CANCELLED
        self._f = self._args = None  # type: ignore[assignment]
        self._timers._cancelled(self)


class Timers:
    """
    C{callLater} for timeouts, all of them waiting on one reactor call; and
    C{seconds}, the clock's, so that it stands for the clock where only
    these two are used.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: (time, order, timer): the order keeps equal times first come,
        #: first served, and spares comparing timers.
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = count()
        self._cancelledCount = 0
        self._call: IDelayedCall | None = None
        #: The time the reactor's call was asked for (its own, recomputed
        #: from a delay, may differ in the last bit).
        self._armedAt = 0.0

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Timer:
        """
        Call C{f(*args)} C{delay} seconds from now, unless cancelled first.
        """
        timer = Timer(self, self._clock.seconds() + delay, f, args)
        heappush(self._heap, (timer.time, next(self._order), timer))
        self._arm()
        return timer

    def pending(self) -> int:
        """
        How many timers are waiting.
        """
        return len(self._heap) - self._cancelledCount

    def _arm(self) -> None:
        # The reactor's call waits for the earliest timer, which is alive.
        heap = self._heap
        call = self._call
        if not heap:
            if call is not None:
                self._call = None
                call.cancel()
            return
        first = heap[0][0]
        if call is not None and first == self._armedAt:
            return
        self._armedAt = first
        delay = max(0.0, first - self._clock.seconds())
        if call is None:
            self._call = self._clock.callLater(delay, self._fire)
        else:
            call.reset(delay)

    def _cancelled(self, timer: Timer) -> None:
        heap = self._heap
        if heap[0][2] is timer:
            # The earliest went: so do the cancelled ones behind it, and the
            # reactor's call waits for the next one alive, if any.
            heappop(heap)
            while heap and heap[0][2]._state == Timer._CANCELLED:
                heappop(heap)
                self._cancelledCount -= 1
            self._arm()
            return
        self._cancelledCount += 1
        if self._cancelledCount > _REBUILD_AT and self._cancelledCount > len(heap) >> 1:
            self._heap = [entry for entry in heap if entry[2]._state == Timer._PENDING]
            heapify(self._heap)
            self._cancelledCount = 0

    def _fire(self) -> None:
        self._call = None
        heap = self._heap
        now = self._clock.seconds()
        # The timers due now run in time order; one may add or cancel others.
        while heap and heap[0][0] <= now:
            timer = heappop(heap)[2]
            if timer._state == Timer._CANCELLED:
                self._cancelledCount -= 1
                continue
            f, args = timer._f, timer._args
            timer._state = Timer._CALLED
            timer._f = timer._args = None  # type: ignore[assignment]
            try:
                f(*args)
            except Exception:
                log.failure("a timer's call failed")
            heap = self._heap  # rebuilt by a cancellation, perhaps
        while heap and heap[0][2]._state == Timer._CANCELLED:
            heappop(heap)
            self._cancelledCount -= 1
        self._arm()
