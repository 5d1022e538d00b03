"""
Quota arithmetic over the rolling window (L{privox.accounts.quota}), with
C{now} passed in: no clock, no database.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from privox.accounts import quota
from privox.accounts.quota import QuotaExceeded, Standing, admit, retryAfter, standing

HOUR = 3600.0


class StandingTests(SynchronousTestCase):
    def test_rowsCountForExactlyTheWindow(self) -> None:
        """
        A row counts while it is younger than the window, and drops out the
        moment it is as old as the window.
        """
        used = [(1000.0, 60.0)]
        self.assertEqual(standing(3600, used, [], 1000.0).used, 60.0)
        self.assertEqual(standing(3600, used, [], 1000.0 + HOUR - 0.001).used, 60.0)
        self.assertEqual(standing(3600, used, [], 1000.0 + HOUR).used, 0.0)

    def test_earnedRaisesTheAllowance(self) -> None:
        s = standing(100, [(10.0, 90.0)], [(20.0, 50.0), (30.0, 25.0)], 40.0)
        self.assertEqual((s.base, s.earned, s.allowance, s.used, s.remaining), (100, 75, 175, 90, 85))

    def test_remainingNeverNegative(self) -> None:
        self.assertEqual(Standing(10, 0, 25).remaining, 0.0)

    def test_defaultsFromTheOriginal(self) -> None:
        self.assertEqual(quota.DEFAULT_HOURLY_SECONDS, 3600)
        self.assertEqual(
            quota.QUALITY_COSTS,
            {"fast": 1, "normal": 2, "better": 4, "best": 8, "xcribe": 16, "xcribe2": 32},
        )


class AdmitTests(SynchronousTestCase):
    def test_exactNeedMustFitWhole(self) -> None:
        used = [(0.0, 3590.0)]
        self.assertEqual(admit(3600, used, [], 10.0, 100.0), 10.0)
        e = self.assertRaises(QuotaExceeded, admit, 3600, used, [], 10.5, 100.0)
        # 3,590 s used at t=0 free up at t=3,600: 3,500 s from now.
        self.assertEqual((e.retryAfter, e.never), (3500, False))
        self.assertEqual(e.standing.used, 3590.0)

    def test_estimatedNeedMustFitWholeToo(self) -> None:
        """
        An estimate (text to speak) must fit whole as well, and is held
        whole: two requests that each fit alone are not both admitted when
        together they would overspend.
        """
        used = [(0.0, 3590.0)]
        self.assertRaises(QuotaExceeded, admit, 3600, used, [], 50.0, 100.0)
        held = admit(3600, used, [], 6.0, 100.0)
        self.assertEqual(held, 6.0)
        e = self.assertRaises(QuotaExceeded, admit, 3600, used + [(100.0, held)], [], 6.0, 100.0)
        self.assertEqual(e.retryAfter, 3500)

    def test_retryAfterWaitsForEnoughToDropOut(self) -> None:
        """
        Retry-After is when enough used rows have left the window, not the
        first one.
        """
        used = [(0.0, 10.0), (100.0, 20.0), (200.0, 3570.0)]
        # 25 s needed: the first row frees 10 (not enough), the second 30.
        wait, never = retryAfter(3600, used, [], 25.0, 1000.0)
        self.assertEqual((wait, never), (100 + 3600 - 1000, False))
        self.assertRaises(QuotaExceeded, admit, 3600, used, [], 25.0, 1000.0)
        self.assertRaises(QuotaExceeded, admit, 3600, used, [], 25.0, 3699.0)
        self.assertEqual(admit(3600, used, [], 25.0, 3700.0), 25.0)

    def test_expiringCreditDelaysRetry(self) -> None:
        """
        Credit that drops out of the window takes its allowance with it, so
        the wait accounts for both kinds of row.
        """
        # Base 100, earned 100 at t=0, used 190 at t=10: 10 left.
        used, earned = [(10.0, 190.0)], [(0.0, 100.0)]
        e = self.assertRaises(QuotaExceeded, admit, 100, used, earned, 20.0, 20.0)
        # At t=3600 the credit goes (allowance 100, used 190: nothing left);
        # at t=3610 the use goes too.
        self.assertEqual(e.retryAfter, 3610 - 20)

    def test_neverFits(self) -> None:
        e = self.assertRaises(QuotaExceeded, admit, 60, [], [], 61.0, 0.0)
        self.assertTrue(e.never)
        self.assertEqual(e.retryAfter, 3600)
        e = self.assertRaises(QuotaExceeded, admit, 60, [(10.0, 30.0)], [], 61.0, 20.0)
        self.assertEqual((e.never, e.retryAfter), (True, 3590))

    def test_zeroQuota(self) -> None:
        """
        A key with 0 s per hour (a producer-only key) can spend only credit.
        """
        self.assertRaises(QuotaExceeded, admit, 0, [], [], 1.0, 0.0)
        self.assertEqual(admit(0, [], [(0.0, 8.0)], 5.0, 1.0), 5.0)

    def test_floatSumsStillFit(self) -> None:
        used = [(float(i), 0.1) for i in range(10)]
        self.assertEqual(admit(2.0, used, [], 1.0, 20.0), 1.0)

    def test_rollingThroughAnHour(self) -> None:
        """
        Spending a minute every minute: a 600 s quota admits ten, refuses
        the eleventh until the first leaves the window, then admits one per
        minute as each old one leaves.
        """
        used: list[tuple[float, float]] = []
        admitted = []
        for minute in range(120):
            now = minute * 60.0
            try:
                used.append((now, admit(600, used, [], 60.0, now)))
                admitted.append(minute)
            except QuotaExceeded as e:
                self.assertGreaterEqual(e.retryAfter, 1)
        self.assertEqual(admitted, list(range(10)) + list(range(60, 70)))


class BucketTests(SynchronousTestCase):
    def test_useLeavesWithTheEndOfItsBucket(self) -> None:
        """
        Use summed per minute counts until the end of its minute has left
        the window: never less than the exact rows would.
        """
        bucket = quota.bucketOf(1000.0)
        self.assertEqual(bucket, 16)
        row = quota.usedRow(bucket, 30.0)
        self.assertEqual(row, (1020.0, 30.0))
        self.assertEqual(standing(100, [row], [], 1000.0 + HOUR).used, 30.0)
        self.assertEqual(standing(100, [row], [], 1020.0 + HOUR).used, 0.0)

    def test_creditLeavesWithTheStartOfItsBucket(self) -> None:
        """
        Credit summed per minute stops counting when the start of its minute
        leaves the window: never later than the exact rows would.
        """
        row = quota.earnedRow(quota.bucketOf(1019.0), 8.0)
        self.assertEqual(row, (960.0, 8.0))
        self.assertEqual(standing(100, [], [row], 959.0 + HOUR).earned, 8.0)
        self.assertEqual(standing(100, [], [row], 960.0 + HOUR).earned, 0.0)

    def test_holdsDropOutWhenTheyExpire(self) -> None:
        """
        A hold counts until it expires, then frees its seconds (an API that
        crashed mid-request holds nothing for long).
        """
        row = quota.holdRow(expires=500.0, seconds=10.0)
        self.assertEqual(standing(10, [row], [], 499.0).remaining, 0.0)
        self.assertEqual(standing(10, [row], [], 500.0).remaining, 10.0)
        e = self.assertRaises(QuotaExceeded, admit, 10, [row], [], 5.0, 400.0)
        self.assertEqual(e.retryAfter, 100)
