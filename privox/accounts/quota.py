"""
Quota arithmetic: how much audio a key may still use in the rolling window.

A key's allowance over any window (an hour by default) is its own hourly
seconds plus the quality speech seconds (QSS) it earned as a producer in
that same window; what it used in the window counts against it. Nothing
here reads a clock or a database: callers pass C{now} and the rows, so the
arithmetic is tested with plain numbers.

Rows are C{(at, amount)} pairs. A row counts while C{at > now - window}: it
drops out exactly C{window} seconds after it was written. The store keeps
use and credit as running sums per account and L{BUCKET} (so a check reads
at most a window's worth of buckets, whatever the history) and turns them
into rows with L{usedRow} and L{earnedRow}, erring on the key's side
against it: use leaves the window with the end of its bucket, credit with
the start of its own. A request in flight holds its seconds as a row that
drops out when the hold expires (L{holdRow}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

#: The rolling window, in seconds.
WINDOW = 3600.0

#: The width of the buckets use and credit are summed in, in seconds.
BUCKET = 60.0

#: Seconds of audio per window a key gets unless it says otherwise.
DEFAULT_HOURLY_SECONDS = 3600.0

#: What one second of audio earns its producer, per quality of the original
#: exchange: bigger models cost their volunteers more.
QUALITY_COSTS = {
    "fast": 1.0,
    "normal": 2.0,
    "better": 4.0,
    "best": 8.0,
    "xcribe": 16.0,
    "xcribe2": 32.0,
}

# Sums of floats drift; a request that fits exactly must still fit.
_EPSILON = 1e-6

Rows = Sequence[tuple[float, float]]


def bucketOf(at: float) -> int:
    """
    The bucket a use or credit at C{at} is summed in.
    """
    return math.floor(at / BUCKET)


def usedRow(bucket: int, seconds: float) -> tuple[float, float]:
    """
    A bucket of use as a row: it counts until the bucket's end leaves the
    window (never before any of its use has).
    """
    return ((bucket + 1) * BUCKET, seconds)


def earnedRow(bucket: int, qss: float) -> tuple[float, float]:
    """
    A bucket of credit as a row: it counts until the bucket's start leaves
    the window (never after any of its credit has).
    """
    return (bucket * BUCKET, qss)


def holdRow(expires: float, seconds: float, window: float = WINDOW) -> tuple[float, float]:
    """
    A hold as a used row that drops out of the window when the hold expires.
    """
    return (expires - window, seconds)


@dataclass(frozen=True)
class Standing:
    """
    Where a key stands in the window ending now.
    """

    #: Its own seconds per window, before any credit.
    base: float
    #: QSS earned in the window.
    earned: float
    #: Audio seconds used (or held by requests in flight) in the window.
    used: float

    @property
    def allowance(self) -> float:
        return self.base + self.earned

    @property
    def remaining(self) -> float:
        return max(0.0, self.allowance - self.used)


class QuotaExceeded(Exception):
    """
    The request does not fit in what the key has left.

    @ivar retryAfter: whole seconds until it would (at least 1).
    @ivar standing: the key's L{Standing} when it was refused.
    @ivar never: the request needs more than the key's whole base
        allowance, so waiting alone will not make it fit.
    """

    def __init__(self, retryAfter: int, standing: Standing, never: bool = False) -> None:
        super().__init__(retryAfter, standing, never)
        self.retryAfter = retryAfter
        self.standing = standing
        self.never = never


def _inWindow(rows: Iterable[tuple[float, float]], now: float, window: float) -> float:
    start = now - window
    return float(sum(amount for at, amount in rows if at > start))


def standing(base: float, used: Rows, earned: Rows, now: float, window: float = WINDOW) -> Standing:
    return Standing(base, _inWindow(earned, now, window), _inWindow(used, now, window))


def fits(state: Standing, need: float) -> bool:
    """
    Whether a request needing C{need} seconds may start: the whole need must
    fit in what is left. Needs are exact (an upload's measured length) or
    conservative estimates (text to speak), and a request holds its whole
    need while it runs, so requests admitted together cannot overspend.
    """
    return need <= state.remaining + _EPSILON


def admit(
    base: float, used: Rows, earned: Rows, need: float, now: float, window: float = WINDOW
) -> float:
    """
    Admit a request or say when to come back.

    @return: the seconds to hold for it: its whole need.
    @raise QuotaExceeded: it does not fit now.
    """
    state = standing(base, used, earned, now, window)
    if fits(state, need):
        return need
    wait, never = retryAfter(base, used, earned, need, now, window)
    raise QuotaExceeded(wait, state, never)


def retryAfter(
    base: float, used: Rows, earned: Rows, need: float, now: float, window: float = WINDOW
) -> tuple[int, bool]:
    """
    Whole seconds until the request would fit, as rows drop out of the
    window (used rows free allowance; earned rows take theirs away).

    @return: C{(seconds, never)}: C{never} when it would not fit even with
        the window empty, in which case C{seconds} is when the window will be.
    """
    start = now - window
    usedRows = [(at, amount) for at, amount in used if at > start]
    earnedRows = [(at, amount) for at, amount in earned if at > start]
    stillUsed = sum(amount for _, amount in usedRows)
    stillEarned = sum(amount for _, amount in earnedRows)
    # Everything that happens to the allowance from now on, by the time a
    # row drops out; rows written at the same moment drop out together.
    drops: dict[float, tuple[float, float]] = {}
    for at, amount in usedRows:
        u, e = drops.get(at, (0.0, 0.0))
        drops[at] = (u + amount, e)
    for at, amount in earnedRows:
        u, e = drops.get(at, (0.0, 0.0))
        drops[at] = (u, e + amount)
    for at in sorted(drops):
        u, e = drops[at]
        stillUsed -= u
        stillEarned -= e
        if fits(Standing(base, max(0.0, stillEarned), max(0.0, stillUsed)), need):
            return _whole(at + window - now), False
    if not drops:
        return _whole(window), True
    return _whole(max(drops) + window - now), True


def _whole(seconds: float) -> int:
    return max(1, math.ceil(seconds - _EPSILON))
