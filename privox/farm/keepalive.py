"""
Keeping idle producers honest: the one keepalive both kinds of producer
session use (PVX/2's C{PING}/C{PONG} frames, PVX/1's C{ping}/C{pong}
words).

A producer idle for C{interval} seconds is pinged and must answer within
C{patience}, or it is dropped (its next job would go to a peer that is
gone). A busy one is not pinged: its job's own timeout watches it, and a
ping it owed before its job is forgiven once the job ends.

Producers go from idle to busy and back once a job, thousands of times a
second on a busy farm, so that costs no timer: a producer has at most one
timer, which, when it fires, looks at how long the producer has been idle
and sets itself again if that is not long enough.
"""

from __future__ import annotations

from typing import Callable

from privox.timers import Timer, Timers


class Keepalive:
    """
    @param ping: sends a ping.
    @param missed: the producer did not answer in time.
    """

    def __init__(
        self,
        clock: Timers,
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
        self._timer: Timer | None = None
        self._idle = False
        #: When the producer last became idle (or answered while idle).
        self._idleSince = 0.0
        self._pingedAt = 0.0
        #: A ping was sent and its answer has not come.
        self.owed = False

    def idle(self) -> None:
        """
        The producer has no job.
        """
        self._idle = True
        self._idleSince = self._clock.seconds()
        if self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._tick)

    def busy(self) -> None:
        """
        The producer took a job (or is going): no pings until it is idle.
        """
        self._idle = False

    def stop(self) -> None:
        """
        The producer is gone.
        """
        self._idle = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def answered(self) -> bool:
        """
        A pong came. Returns whether one was owed (a pong nobody asked for
        is the peer's business).
        """
        if not self.owed:
            return False
        self.owed = False
        # The timer waits for a late answer, which this is not: the next
        # ping is due an interval from now (patience may exceed it).
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._idle:
            self._idleSince = self._clock.seconds()
            self._timer = self._clock.callLater(self._interval, self._tick)
        return True

    def _tick(self) -> None:
        self._timer = None
        if not self._idle:
            return  # idle() starts the next one
        wait = self._idleSince + self._interval - self._clock.seconds()
        if wait > 0:
            self._timer = self._clock.callLater(wait, self._tick)
            return
        self._ping()
        self.owed = True
        self._pingedAt = self._clock.seconds()
        self._timer = self._clock.callLater(self._patience, self._late)

    def _late(self) -> None:
        self._timer = None
        if self.owed and self._idle and self._idleSince <= self._pingedAt:
            self._missed()
            return
        # Answered, or busy since the ping (forgiven): a fresh start.
        self.owed = False
        self._tick()
