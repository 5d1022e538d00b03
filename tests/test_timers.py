"""
privox.timers: many timeouts on one reactor call.
"""

from __future__ import annotations

import random

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from privox.timers import Timers


class TimersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.calls: list[object] = []

    def test_runsInTimeOrder(self) -> None:
        """
        Each timer runs once, when its time comes, earliest first (equal
        times in the order they were asked for), with its arguments.
        """
        for delay, name in ((3, "c"), (1, "a"), (2, "b1"), (2, "b2")):
            self.timers.callLater(delay, self.calls.append, name)
        self.clock.advance(0.5)
        self.assertEqual(self.calls, [])
        self.clock.advance(1.5)
        self.assertEqual(self.calls, ["a", "b1", "b2"])
        self.clock.advance(1)
        self.assertEqual(self.calls, ["a", "b1", "b2", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneReactorCall(self) -> None:
        """
        However many timers wait, the reactor holds one call, for the
        earliest; an earlier timer moves it.
        """
        for delay in (5, 7, 9):
            self.timers.callLater(delay, self.calls.append, delay)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 5)
        self.timers.callLater(1, self.calls.append, 1)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 1)
        self.assertEqual(self.timers.pending(), 4)

    def test_cancel(self) -> None:
        """
        A cancelled timer never runs, and says it is no longer active; once
        none is left, neither is the reactor's call.
        """
        first = self.timers.callLater(1, self.calls.append, 1)
        second = self.timers.callLater(2, self.calls.append, 2)
        self.assertTrue(first.active())
        first.cancel()
        self.assertFalse(first.active())
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 2)
        second.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.timers.pending(), 0)
        self.clock.advance(10)
        self.assertEqual(self.calls, [])

    def test_cancelTwiceOrAfterCall(self) -> None:
        """
        As the reactor's own calls: cancelling twice, or after the call,
        raises.
        """
        timer = self.timers.callLater(1, self.calls.append, 1)
        timer.cancel()
        self.assertRaises(AlreadyCancelled, timer.cancel)
        called = self.timers.callLater(1, self.calls.append, 2)
        self.clock.advance(1)
        self.assertFalse(called.active())
        self.assertRaises(AlreadyCalled, called.cancel)
        self.assertEqual(self.calls, [2])

    def test_callAddsAndCancels(self) -> None:
        """
        A timer's call may add timers (due now too: they run in the same
        pass) and cancel others.
        """
        later = self.timers.callLater(5, self.calls.append, "later")

        def first() -> None:
            self.calls.append("first")
            later.cancel()
            self.timers.callLater(0, self.calls.append, "now")
            self.timers.callLater(3, self.calls.append, "three")

        self.timers.callLater(1, first)
        self.clock.advance(1)
        self.assertEqual(self.calls, ["first", "now"])
        self.clock.advance(3)
        self.assertEqual(self.calls, ["first", "now", "three"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failingCallLogged(self) -> None:
        """
        A call that raises is logged, and the timers after it still run.
        """

        def broken() -> None:
            raise ZeroDivisionError()

        self.timers.callLater(1, broken)
        self.timers.callLater(1, self.calls.append, "after")
        self.clock.advance(1)
        self.assertEqual(self.calls, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_cancelledAreCleared(self) -> None:
        """
        Timers cancelled behind a live one do not pile up: the heap is
        rebuilt once most of it is cancelled.
        """
        self.timers.callLater(1, self.calls.append, "first")
        for i in range(1000):
            self.timers.callLater(10 + i, self.calls.append, i).cancel()
        self.assertLess(len(self.timers._heap), 120)
        self.assertEqual(self.timers.pending(), 1)

    def test_manyAgainstTheClock(self) -> None:
        """
        Random timers, some cancelled, run exactly when and as the reactor's
        own calls would.
        """
        rng = random.Random(7)
        ours: list[int] = []
        theirs: list[int] = []
        reference = Clock()
        pairs = []
        for i in range(2000):
            delay = rng.choice([rng.uniform(0, 50), float(rng.randrange(0, 50))])
            pairs.append(
                (self.timers.callLater(delay, ours.append, i),
                 reference.callLater(delay, theirs.append, i))
            )
            if rng.random() < 0.7:
                a, b = pairs[rng.randrange(len(pairs))]
                if a.active():
                    a.cancel()
                    b.cancel()
            if rng.random() < 0.05:
                step = rng.uniform(0, 2)
                self.clock.advance(step)
                reference.advance(step)
                self.assertEqual(ours, theirs)
        for _ in range(60):
            self.clock.advance(1)
            reference.advance(1)
        self.assertEqual(sorted(ours), sorted(theirs))
        self.assertEqual(self.timers.pending(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
