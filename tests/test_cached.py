"""
L{privox.cached}: worked out at most every so often; those who ask
meanwhile share the answer; a failure is not kept.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from privox.cached import Cached


class CachedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: list[Deferred[int]] = []
        self.cached = Cached(self.clock, 10.0, self.work)

    async def work(self) -> int:
        d: Deferred[int] = Deferred()
        self.pending.append(d)
        return await d

    def ask(self) -> Deferred[int]:
        return Deferred.fromCoroutine(self.cached.get())

    def test_shared(self) -> None:
        first, second = self.ask(), self.ask()
        self.assertEqual(len(self.pending), 1)
        self.pending[0].callback(7)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (7, 7))
        self.clock.advance(9.9)
        self.assertEqual(self.successResultOf(self.ask()), 7)
        self.assertEqual(len(self.pending), 1)
        self.clock.advance(0.1)
        again = self.ask()
        self.assertEqual(len(self.pending), 2)
        self.pending[1].callback(8)
        self.assertEqual(self.successResultOf(again), 8)

    def test_failureNotKept(self) -> None:
        first, second = self.ask(), self.ask()
        self.pending[0].errback(ValueError("store down"))
        self.failureResultOf(first, ValueError)
        self.failureResultOf(second, ValueError)
        third = self.ask()
        self.assertEqual(len(self.pending), 2)
        self.pending[1].callback(3)
        self.assertEqual(self.successResultOf(third), 3)

    def test_anAskerGivesUp(self) -> None:
        """
        One asker cancelled (its client went away) stops neither the work
        nor the others' answer.
        """
        first, second = self.ask(), self.ask()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.pending[0].callback(5)
        self.assertEqual(self.successResultOf(second), 5)
        self.assertEqual(self.successResultOf(self.ask()), 5)

    def test_doneAtOnce(self) -> None:
        async def now() -> int:
            return 4

        cached = Cached(self.clock, 10.0, now)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(cached.get())), 4)
