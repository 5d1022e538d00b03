"""
Who may call the API, and how much audio they may use.

Routes ask an L{Access} three things: who the caller is (L{Access.authorize}:
401 for no key, an unknown or a revoked one), whether a request fits in
what the caller has left (L{Access.admit}: 429 with C{Retry-After} if not),
and, once the job is done, what it really cost (L{Grant.settle}) or that it
failed and costs nothing (L{Grant.release}).

Two kinds exist:

  - L{AccountAccess}: keys, quotas, producer credit and the farms' ledger in
    an L{AccountStore} (C{--accounts sqlite:...} or C{postgresql://...});
  - L{PolicyAccess}: C{--accounts none}: a plain key policy (open, an
    allow-list or a validation URL) and no quotas.

Durations (L{privox.api.measure}): an upload's real length, or a
conservative estimate of how long a text takes to say. A request is
admitted only if its whole need fits in what the caller has left, holds it
while it runs (the hold expires with the request, even if the API crashes),
and then pays what it really used, never more than it held: an STT upload
its measured length, a TTS answer the length of the audio it got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.accounts import quota
from privox.accounts.store import ANONYMOUS, Account, AccountStore, Reservation
from privox.api.errors import Forbidden, NotServed, OverQuota, Unauthorized, Unavailable
from privox.keys import KeyPolicy, OpenPolicy, keyId

log = Logger()

#: What L{AccountAccess.check} asks to be left: anything at all.
_SOMETHING = 0.001

#: A settle that fails is tried again this many times in all, after these
#: delays (1 s, growing to a minute): a request served is a request charged.
SETTLE_ATTEMPTS = 12
_settleBackoff = backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0, jitter=lambda: 0.0)

@dataclass(frozen=True)
class Caller:
    """
    Who is calling: their key (L{None} for anonymous use), their account in
    the store (L{None} without one) and their own seconds per window.
    """

    key: str | None = field(repr=False)
    account: str | None = None
    base: float = quota.DEFAULT_HOURLY_SECONDS

    @property
    def keyId(self) -> str | None:
        return keyId(self.key) if self.key else None


class Grant(Protocol):
    """
    Seconds held for one request in flight.
    """

    async def settle(self, seconds: float) -> None:
        """
        The request is done and used C{seconds}: it pays that, at most what
        it held.
        """

    async def release(self) -> None:
        "The request failed: it pays nothing."


class Access(Protocol):
    description: str
    #: The key the front page's examples pass: L{None} where requests need
    #: none (anonymous use), C{"demo"} where any key works, else C{"KEY"}.
    keyExample: str | None

    async def authorize(self, key: str | None) -> Caller:
        """
        @raise Unauthorized: no key where one is needed, or a key that is
            not accepted.
        """

    async def check(self, caller: Caller) -> None:
        """
        Before costly work for a request whose need is not known yet: is
        anything left at all?

        @raise OverQuota: nothing is.
        """

    async def admit(self, caller: Caller, need: float, lasts: float) -> Grant:
        """
        @param need: the request's audio seconds, measured or a conservative
            estimate; all of it must fit in what the caller has left.
        @param lasts: seconds the hold may last, settled or not (the
            request's deadline and a margin).
        @raise OverQuota: it does not fit in what the caller has left.
        """

    async def standing(self, caller: Caller) -> dict[str, Any]:
        """
        C{GET /v1/account}: allowance, used, earned.
        """

    async def authorizeFarm(self, key: str | None) -> str:
        """
        @return: the account id of a farm key.
        @raise Unauthorized: not an active farm key.
        """

    async def validate(self, key: str) -> bool:
        """
        Whether C{key} is a good key (for farms checking their peers).
        """

    async def authorizeNode(self, key: str | None) -> str:
        """
        A node enrolling (L{privox.api.enrolment}) with its producer key.

        @return: the key's L{keyId}, the account its certificate names.
        @raise Unauthorized: no key.
        @raise Forbidden: a key that may not enrol a node (unknown, revoked,
            a farm's), or an API that cannot tell (any key is let in).
        """

    async def record(
        self, farmAccount: str, transactions: Sequence[dict[str, Any]]
    ) -> tuple[int, int]:
        """
        Store a farm's transaction records; see L{AccountStore.record}.
        """


class _Free:
    """
    The grant of an API without quotas.
    """

    async def settle(self, seconds: float) -> None:
        pass

    async def release(self) -> None:
        pass


class PolicyAccess:
    """
    C{--accounts none}: a key is required and checked by C{policy}; nothing
    is counted.
    """

    def __init__(self, policy: KeyPolicy) -> None:
        self.policy = policy
        self.description = f"user keys {policy.description}, no quotas"
        self.keyExample = "demo" if isinstance(policy, OpenPolicy) else "KEY"

    async def authorize(self, key: str | None) -> Caller:
        if not key:
            raise Unauthorized("a key is required: send a key field or Authorization: Bearer KEY")
        if not await self.policy.check(key):
            raise Unauthorized("the key was not accepted")
        return Caller(key)

    async def check(self, caller: Caller) -> None:
        pass

    async def admit(self, caller: Caller, need: float, lasts: float) -> Grant:
        return _Free()

    async def standing(self, caller: Caller) -> dict[str, Any]:
        raise NotServed("this API keeps no accounts (it runs with --accounts none)")

    async def authorizeFarm(self, key: str | None) -> str:
        raise NotServed("this API keeps no ledger (it runs with --accounts none)")

    async def validate(self, key: str) -> bool:
        raise NotServed("this API keeps no accounts (it runs with --accounts none)")

    async def authorizeNode(self, key: str | None) -> str:
        if not key:
            raise Unauthorized(_NODE_KEY_NEEDED)
        if isinstance(self.policy, OpenPolicy):
            # Any key would do: a certificate would vouch for nobody.
            raise Forbidden(
                "enrolment needs an account store or a key policy: this API accepts"
                " any key (--accounts none --keys open)"
            )
        if not await self.policy.check(key):
            raise Forbidden("the key was not accepted, so this node cannot enrol")
        return keyId(key)

    async def record(
        self, farmAccount: str, transactions: Sequence[dict[str, Any]]
    ) -> tuple[int, int]:
        raise NotServed("this API keeps no ledger (it runs with --accounts none)")


class _Reserved:
    def __init__(self, store: AccountStore, clock: IReactorTime, reservation: Reservation) -> None:
        self._store = store
        self._clock = clock
        self.reservation = reservation

    async def settle(self, seconds: float) -> None:
        # The answer is already computed: a store hiccup now must not cost
        # the caller their result, nor make it free. Tried again in the
        # background, with backoff, until it is recorded.
        await self._settle(seconds, 0)

    async def _settle(self, seconds: float, attempt: int) -> None:
        try:
            await self._store.settle(self.reservation, seconds, self._clock.seconds())
        except Exception:
            if attempt + 1 >= SETTLE_ATTEMPTS:
                log.failure("gave up settling a quota reservation of {seconds} s", seconds=seconds)
                return
            delay = _settleBackoff(attempt)
            log.warn(
                "could not settle a quota reservation; trying again in {delay:.1f} s", delay=delay
            )
            self._clock.callLater(
                delay, lambda: Deferred.fromCoroutine(self._settle(seconds, attempt + 1))
            )

    async def release(self) -> None:
        try:
            await self._store.release(self.reservation)
        except Exception:
            # What was held stays held until the hold expires.
            log.failure("could not release a quota reservation")


class AccountAccess:
    """
    Keys, quotas and the ledger in an L{AccountStore}.

    @param anonymousSeconds: seconds per window shared by all requests
        without a key, or L{None} to refuse them (401).
    @param costOf: a model's QSS per audio second (L{modelCosts}).
    """

    def __init__(
        self,
        store: AccountStore,
        clock: IReactorTime,
        hourlySeconds: float = quota.DEFAULT_HOURLY_SECONDS,
        anonymousSeconds: float | None = None,
        costOf: Callable[[str], float] = lambda model: 1.0,
        window: float = quota.WINDOW,
    ) -> None:
        self.store = store
        self.clock = clock
        self.hourlySeconds = hourlySeconds
        self.anonymousSeconds = anonymousSeconds
        self.keyExample = None if anonymousSeconds is not None else "KEY"
        self.costOf = costOf
        self.window = window
        anonymous = "off" if anonymousSeconds is None else f"{anonymousSeconds:g} s/h shared"
        self.description = (
            f"accounts in {store.description}; {hourlySeconds:g} s/h per key, anonymous {anonymous}"
        )

    async def _account(self, key: str) -> Account | None:
        return await _unavailableIfFails(self.store.authenticate(key))  # type: ignore[no-any-return]

    async def authorize(self, key: str | None) -> Caller:
        if not key:
            if self.anonymousSeconds is None:
                raise Unauthorized(
                    "a key is required: send a key field or Authorization: Bearer KEY"
                )
            return Caller(None, ANONYMOUS, self.anonymousSeconds)
        account = await self._account(key)
        if account is None or not account.active or account.role != "user":
            raise Unauthorized("the key was not accepted (unknown, revoked, or not a user key)")
        base = self.hourlySeconds if account.hourlySeconds is None else account.hourlySeconds
        return Caller(key, account.account, base)

    async def check(self, caller: Caller) -> None:
        assert caller.account is not None
        try:
            await self.store.check(
                caller.account, caller.base, _SOMETHING, self.clock.seconds(), self.window
            )
        except quota.QuotaExceeded as e:
            raise _overQuota(e, _SOMETHING, self.window) from None
        except Exception:
            log.failure("the account store failed")
            raise _storeDown() from None

    async def admit(self, caller: Caller, need: float, lasts: float) -> Grant:
        assert caller.account is not None
        now = self.clock.seconds()
        try:
            reservation = await self.store.reserve(
                caller.account, caller.base, need, now, now + lasts, self.window
            )
        except quota.QuotaExceeded as e:
            raise _overQuota(e, need, self.window) from None
        except Exception:
            log.failure("the account store failed")
            raise _storeDown() from None
        return _Reserved(self.store, self.clock, reservation)

    async def standing(self, caller: Caller) -> dict[str, Any]:
        assert caller.account is not None
        state = await _unavailableIfFails(
            self.store.standing(caller.account, caller.base, self.clock.seconds(), self.window)
        )
        return {
            "key_id": caller.keyId or ANONYMOUS,
            "window_seconds": self.window,
            "hourly_seconds": _round(state.base),
            "earned": _round(state.earned),
            "allowance": _round(state.allowance),
            "used": _round(state.used),
            "remaining": _round(state.remaining),
        }

    async def authorizeFarm(self, key: str | None) -> str:
        account = await self._account(key) if key else None
        if account is None or not account.active or account.role != "farm":
            raise Unauthorized("a farm key is required (Authorization: Bearer FARM-KEY)")
        return account.account

    async def validate(self, key: str) -> bool:
        account = await self._account(key)
        return account is not None and account.active

    async def authorizeNode(self, key: str | None) -> str:
        if not key:
            raise Unauthorized(_NODE_KEY_NEEDED)
        account = await self._account(key)
        if account is None or not account.active or account.role != "user":
            raise Forbidden(
                "the key was not accepted (unknown, revoked, or not a user key),"
                " so this node cannot enrol"
            )
        return account.keyId

    async def record(
        self, farmAccount: str, transactions: Sequence[dict[str, Any]]
    ) -> tuple[int, int]:
        return await _unavailableIfFails(  # type: ignore[no-any-return]
            self.store.record(farmAccount, transactions, self.clock.seconds(), self.costOf)
        )


_NODE_KEY_NEEDED = "a node enrols with its producer key: Authorization: Bearer KEY"


def _storeDown() -> Unavailable:
    return Unavailable("the account store is unavailable; try again shortly")


async def _unavailableIfFails(work: Any) -> Any:
    """
    C{work}'s result; a store that fails makes the request a 503, not a 500.
    """
    try:
        return await work
    except Exception:
        log.failure("the account store failed")
        raise _storeDown() from None


def _overQuota(e: quota.QuotaExceeded, need: float, window: float) -> OverQuota:
    s = e.standing
    if need <= _SOMETHING:
        message = (
            f"quota used: {s.used:.0f} of {s.allowance:.0f} audio seconds in the last "
            f"{window:.0f} s; retry in {e.retryAfter} s"
        )
    elif e.never:
        message = (
            f"this request needs {need:.0f} s of audio, more than the {s.allowance:.0f} s "
            f"this key may use per {window:.0f} s"
        )
    else:
        message = (
            f"quota used: {s.used:.0f} of {s.allowance:.0f} audio seconds in the last "
            f"{window:.0f} s; this request needs {need:.0f} s; retry in {e.retryAfter} s"
        )
    return OverQuota(message, e.retryAfter)


def _round(value: float) -> float:
    return round(value, 3)


def modelCosts(stt: dict[str, tuple[str, str]], lines: Sequence[str]) -> Callable[[str], float]:
    """
    A model's QSS per audio second: a C{"MODEL COST"} line if one names it,
    else the multiplier of the quality it serves in the STT table (the
    original's: fast 1 ... xcribe2 32), else 1.

    @raise ValueError: a malformed line.
    """
    costs: dict[str, float] = {}
    for quality, models in stt.items():
        for model in models:
            costs[model] = max(costs.get(model, 0.0), quota.QUALITY_COSTS.get(quality, 1.0))
    for line in lines:
        parts = line.split()
        try:
            model, cost = parts
            value = float(cost)
        except ValueError:
            raise ValueError(f"model cost line {line!r} is not 'MODEL COST'") from None
        if not value >= 0:
            raise ValueError(f"model cost line {line!r}: the cost must be a number >= 0")
        costs[model] = value
    return lambda model: costs.get(model, 1.0)
