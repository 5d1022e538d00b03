"""
L{privox.farm.keepalive}: idle producers pinged, silent ones dropped, busy
ones left alone; with at most one timer per producer however often it goes
from idle to busy.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from privox.farm.keepalive import Keepalive


class KeepaliveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pings: list[float] = []
        self.missed: list[float] = []
        self.keepalive = Keepalive(
            self.clock, 10.0, 5.0,
            lambda: self.pings.append(self.clock.seconds()),
            lambda: self.missed.append(self.clock.seconds()),
        )

    def test_idlePingedAnsweredPingedAgain(self) -> None:
        self.keepalive.idle()
        self.clock.advance(10)
        self.assertEqual(self.pings, [10])
        self.clock.advance(1)
        self.assertTrue(self.keepalive.answered())
        self.assertFalse(self.keepalive.answered())  # one answer per ping
        self.clock.advance(10)
        self.assertEqual((self.pings, self.missed), ([10, 21], []))

    def test_silentDropped(self) -> None:
        self.keepalive.idle()
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertEqual(self.missed, [15])

    def test_busyNotPinged(self) -> None:
        """
        Busy for a long time: no pings, and one timer at most, whatever
        the number of jobs.
        """
        for _ in range(1000):
            self.keepalive.idle()
            self.keepalive.busy()
        self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(100)
        self.assertEqual(self.pings, [])
        self.keepalive.idle()
        self.clock.advance(9.9)
        self.assertEqual(self.pings, [])
        self.clock.advance(0.1)
        self.assertEqual(self.pings, [110])

    def test_idleAgainPushesThePingBack(self) -> None:
        self.keepalive.idle()
        self.clock.advance(8)
        self.keepalive.busy()
        self.keepalive.idle()
        self.clock.advance(8)
        self.assertEqual(self.pings, [])
        self.clock.advance(2)
        self.assertEqual(self.pings, [18])

    def test_busySinceThePingForgiven(self) -> None:
        """
        A producer pinged and then given a job owes nothing once the job
        ends: its job's own timeout watched it.
        """
        self.keepalive.idle()
        self.clock.advance(10)
        self.keepalive.busy()
        self.clock.advance(3)
        self.keepalive.idle()
        self.clock.advance(2)
        self.assertEqual(self.missed, [])
        self.assertFalse(self.keepalive.owed)
        self.clock.advance(8)
        self.assertEqual(self.pings, [10, 23])

    def test_stopped(self) -> None:
        self.keepalive.idle()
        self.keepalive.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
