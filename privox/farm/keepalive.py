"""
Keeping idle producers honest: the one keepalive both kinds of producer
session use (PVX/2's C{PING}/C{PONG} frames, PVX/1's C{ping}/C{pong}
words).

An idle producer is pinged every C{interval} seconds and must answer within
C{patience}, or it is dropped (its job would go to a peer that is gone). A
busy one is not pinged: its job's own timeout watches it.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Keepalive:
    """
    @param ping: sends a ping.
    @param missed: the producer did not answer in time.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        patience: float,
        ping: Callable[[], None],
        missed: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._patience = patience
        self._ping = ping
        self._missed = missed
        self._timer: IDelayedCall | None = None
        #: A ping was sent and its answer has not come.
        self.owed = False

    def idle(self) -> None:
        """
        The producer has no job: ping it after C{interval}.
        """
        self._cancel()
        self._timer = self._clock.callLater(self._interval, self._send)

    def busy(self) -> None:
        """
        The producer took a job (or is going): no more pings. An answer
        still owed is still welcome (L{answered}).
        """
        self._cancel()

    def answered(self) -> bool:
        """
        A pong came. Returns whether one was owed (a pong nobody asked for
        is the peer's business).
        """
        if not self.owed:
            return False
        self.owed = False
        if self._timer is not None:  # still idle: the next ping in an interval
            self.idle()
        return True

    def _send(self) -> None:
        self._ping()
        self.owed = True
        self._timer = self._clock.callLater(self._patience, self._late)

    def _late(self) -> None:
        self._timer = None
        self._missed()

    def _cancel(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
