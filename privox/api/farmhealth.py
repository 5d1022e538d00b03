"""
Whether the API should try a farm, as a state machine::

        ┌──────failed──────┐
        ▼                  │
      down ──probe──▶ probing ──reached──▶ up
        ▲  ╲                                │
        │   ╲──reached (a late connection)──┤
        └───────────────failed──────────────┘

A farm is C{up} until a connection to it fails (refused, timed out, a
handshake refused, the farm gone silent mid-job). It is then C{down} for a
backoff from L{twisted.application.internet.backoffPolicy}: the first
C{downBackoff[0]} seconds, doubling on each failure in a row up to
C{downBackoff[1]}. Once that has passed, the next request that draws the
farm is the probe (C{probing}: other requests keep skipping it); its
connection succeeding makes the farm C{up} and resets the backoff, failing
makes it C{down} for the next step of the backoff. There is no probe traffic
of its own: a farm nobody would use is not dialled.
"""

from __future__ import annotations

from typing import Callable, Protocol

from automat import TypeMachineBuilder
from twisted.application.internet import backoffPolicy
from twisted.logger import Logger

from privox.automata import build

log = Logger()


class FarmHealth(Protocol):
    def available(self, now: float) -> bool:
        "May a request try the farm now? (Up, or down with its backoff over.)"

    def probe(self) -> None:
        "A connection to the farm begins: if it was down, this is its probe."

    def reached(self) -> None:
        "A connection's handshake succeeded."

    def failed(self, now: float, why: str) -> None:
        "A connection failed, or the farm went silent mid-job."

    def gaveUp(self) -> None:
        "A connection attempt ended undecided (its request's deadline, a cancel)."

    def isUp(self) -> bool:
        "Up (for /healthz)."

    def retryIn(self, now: float) -> float | None:
        "Seconds until a request may try the farm again; L{None} when up."


class HealthCore:
    """
    What the machine remembers and does: the backoff, and what to do when
    the farm goes down (close its idle connections).
    """

    def __init__(
        self, name: str, downBackoff: tuple[float, float], wentDown: Callable[[], None]
    ) -> None:
        first, longest = downBackoff
        self.name = name
        self.policy = backoffPolicy(
            initialDelay=first, maxDelay=longest, factor=2.0, jitter=lambda: 0.0
        )
        self.failures = 0
        self.downUntil = 0.0
        self.wentDown = wentDown

    def down(self, now: float, why: str) -> None:
        backoff = self.policy(self.failures)
        self.failures += 1
        self.downUntil = now + backoff
        log.warn(
            "farm {farm} unreachable ({why}); skipping it for {backoff} s",
            farm=self.name,
            why=why,
            backoff=backoff,
        )
        self.wentDown()

    def recovered(self) -> None:
        self.failures = 0
        log.info("farm {farm} is reachable again", farm=self.name)


builder = TypeMachineBuilder(FarmHealth, HealthCore)
up = builder.state("up")
down = builder.state("down")
probing = builder.state("probing")


@up.upon(FarmHealth.available).loop()
def _upAvailable(health: FarmHealth, core: HealthCore, now: float) -> bool:
    return True


@down.upon(FarmHealth.available).loop()
def _downAvailable(health: FarmHealth, core: HealthCore, now: float) -> bool:
    return now >= core.downUntil


@probing.upon(FarmHealth.available).loop()
def _probingAvailable(health: FarmHealth, core: HealthCore, now: float) -> bool:
    return False  # one probe at a time


@down.upon(FarmHealth.probe).to(probing)
def _probe(health: FarmHealth, core: HealthCore) -> None:
    pass


@up.upon(FarmHealth.probe).loop()
@probing.upon(FarmHealth.probe).loop()
def _noProbe(health: FarmHealth, core: HealthCore) -> None:
    pass


@up.upon(FarmHealth.failed).to(down)
@probing.upon(FarmHealth.failed).to(down)
def _failed(health: FarmHealth, core: HealthCore, now: float, why: str) -> None:
    core.down(now, why)


@down.upon(FarmHealth.failed).loop()
def _failedWhileDown(health: FarmHealth, core: HealthCore, now: float, why: str) -> None:
    # Several attempts failing together count once; one after the backoff
    # (not the probe: a connection begun before) starts the next step.
    if now >= core.downUntil:
        core.down(now, why)


@down.upon(FarmHealth.reached).to(up)
@probing.upon(FarmHealth.reached).to(up)
def _reached(health: FarmHealth, core: HealthCore) -> None:
    core.recovered()


@up.upon(FarmHealth.reached).loop()
def _stillUp(health: FarmHealth, core: HealthCore) -> None:
    pass


@probing.upon(FarmHealth.gaveUp).to(down)
def _probeGaveUp(health: FarmHealth, core: HealthCore) -> None:
    pass  # down as before: the next request probes again


@up.upon(FarmHealth.gaveUp).loop()
@down.upon(FarmHealth.gaveUp).loop()
def _nothingToGiveUp(health: FarmHealth, core: HealthCore) -> None:
    pass


@up.upon(FarmHealth.isUp).loop()
def _isUp(health: FarmHealth, core: HealthCore) -> bool:
    return True


@down.upon(FarmHealth.isUp).loop()
@probing.upon(FarmHealth.isUp).loop()
def _isDown(health: FarmHealth, core: HealthCore) -> bool:
    return False


@up.upon(FarmHealth.retryIn).loop()
def _now(health: FarmHealth, core: HealthCore, now: float) -> float | None:
    return None


@down.upon(FarmHealth.retryIn).loop()
@probing.upon(FarmHealth.retryIn).loop()
def _later(health: FarmHealth, core: HealthCore, now: float) -> float | None:
    return max(0.0, core.downUntil - now)


_newHealth = build(builder)


def farmHealth(
    name: str, downBackoff: tuple[float, float], wentDown: Callable[[], None]
) -> FarmHealth:
    """
    A farm's health, up to begin with.
    """
    return _newHealth(HealthCore(name, downBackoff, wentDown))  # type: ignore[no-any-return]


class SuccessRate:
    """
    How well a farm has served the API's jobs lately: the share it
    answered (an answer or a refusal of the job itself) of those it was
    given, not those it lost or that found it unreachable, as an
    exponentially weighted average over about C{memory} jobs. A farm starts
    trusted (1); the draw among farms weighs each by it, never below
    L{FLOOR}, so that a farm that recovers is tried again.
    """

    FLOOR = 0.05

    def __init__(self, memory: int = 20) -> None:
        self.rate = 1.0
        self._alpha = 1.0 / memory

    def record(self, served: bool) -> None:
        self.rate += self._alpha * ((1.0 if served else 0.0) - self.rate)

    def weight(self) -> float:
        return max(self.FLOOR, self.rate)
