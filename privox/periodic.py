"""
A service that does one thing now and again every C{every} seconds, one
run at a time (the next is counted from the end of the last), and says
how it went in the log only when that changes: a farm registering with
its exchange, a node reading the directory of farms.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

class Periodic(Service):
    """
    Runs C{work} while running. C{every} may change between runs.
    """

    #: Its lines are in the namespace of the class that does the work.
    log = Logger()

    def __init__(
        self, clock: IReactorTime, every: float, work: Callable[[], Awaitable[Any]]
    ) -> None:
        self.clock = clock
        self.every = every
        self._work = work
        self._next: IDelayedCall | None = None
        self._said: str | None = None

    def startService(self) -> None:
        super().startService()
        self._next = self.clock.callLater(0, self._run)

    def stopService(self) -> None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def _run(self) -> None:
        self._next = None
        d = Deferred.fromCoroutine(self._work())
        d.addErrback(lambda failure: self.log.failure("a periodic task failed", failure))
        d.addBoth(self._again)

    def _again(self, result: object) -> None:
        if self.running:
            self._next = self.clock.callLater(self.every, self._run)

    def say(self, what: str, warn: bool = True) -> None:
        """
        Log C{what}, unless it is what was said last.
        """
        if what != self._said:
            self._said = what
            (self.log.warn if warn else self.log.info)("{what}", what=what)
