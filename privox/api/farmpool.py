"""
Connections from the API to one farm port: a pool of up to C{size}
consumer connections, each carrying one job at a time. Idle connections are
kept and reused (most recently used first); broken ones are dropped; when
all are busy and the pool is full, a request waits (within its deadline)
for the next one to come free. Connecting reports to the farm's
L{privox.api.farmhealth.FarmHealth}: a failed connection marks the farm
down, and while it is down its pools keep no idle connection.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from privox.api.farmhealth import FarmHealth
from privox.consumer import ConsumerProtocol, Liveness
from privox.directory import PLAIN_ENDPOINT
from privox.identity import PASS_PREFIX, ConsumerPass
from privox.keys import accountId
from privox.tls import TrustRoot, clientEndpoint, pinnedEndpoint

T = TypeVar("T")


class Expired(Exception):
    """
    The time allowed for a step has passed.
    """


class Unreachable(Exception):
    """
    A farm could not be connected to (the reason is the message).
    """


@dataclass(frozen=True)
class Dialing:
    """
    How every pool of an exchange connects.

    @ivar key: the consumer key the API presents to farms.
    @ivar size: most connections per pool.
    @ivar connectTimeout: longest wait for a connection and its handshake.
    @ivar ca: trust root for C{tls:} endpoints naming none of their own.
    @ivar liveness: how long a farm may stay silent during a job.
    @ivar exchange: the exchange's signing key, for the passes shown to
        farms that joined by themselves; L{None}: they are shown C{key}.
    @ivar publicOnly: farms that joined by themselves are dialled only at
        public addresses (L{publicEndpoint}).
    """

    reactor: Any
    clock: IReactorTime
    key: str
    size: int
    connectTimeout: float
    ca: TrustRoot | None
    liveness: Liveness | None
    exchange: Ed25519PrivateKey | None = None
    publicOnly: bool = False

    def keyFor(self, member: str | None) -> str:
        """
        The key a consumer names to a farm: C{key} to the API's own farms;
        to the farm of key id C{member}, which joined by itself, a pass the
        exchange signs for it alone (privox.farm.vouching).
        """
        if member is None or self.exchange is None:
            return self.key
        issued = ConsumerPass.issue(self.exchange, member, accountId(self.key), self.clock.seconds())
        return PASS_PREFIX + issued.text


class NotPublic(Exception):
    """
    A farm's name leads to an address the API must not dial for a stranger
    (private, loopback, link-local...).
    """


def isPublic(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_global


async def publicEndpoint(reactor: Any, endpoint: str, ca: TrustRoot | None) -> IStreamClientEndpoint:
    """
    The endpoint that dials a farm that joined by itself (C{endpoint}:
    C{tcp:} or C{tls:host=H:port=P}, as registrations are) at the address
    its name leads to now, if that is a public one; so that a name made to
    lead into the API's own network after the farm passed its probe (DNS
    rebinding) has the API dial nothing there.

    @raise NotPublic: it leads elsewhere.
    """
    match = PLAIN_ENDPOINT.fullmatch(endpoint)
    if match is None:
        raise NotPublic("not a plain tcp: or tls: endpoint")
    kind, host, port = match.groups()
    address = await reactor.resolve(host)
    if not isPublic(address):
        raise NotPublic("its name leads to an address that is not public")
    return pinnedEndpoint(reactor, kind == "tls", host, address, int(port), ca)


def _usable(conn: ConsumerProtocol) -> bool:
    transport = conn.transport
    return (
        transport is not None
        and not conn.disconnected.called
        and not getattr(transport, "disconnecting", False)
        and not conn.busy
    )


class FarmPool:
    """
    Up to C{dialing.size} consumer connections to one farm port.
    """

    def __init__(
        self, dialing: Dialing, health: FarmHealth, service: str, endpoint: str,
        member: str | None = None,
    ) -> None:
        self.dialing = dialing
        self.member = member
        self.health = health
        self.service = service
        self.endpoint = endpoint
        self.idle: list[ConsumerProtocol] = []
        self.busy: set[ConsumerProtocol] = set()
        self.connecting: dict[ConsumerProtocol, Deferred[Any]] = {}
        self.waiters: deque[Deferred[ConsumerProtocol | None]] = deque()
        #: Connections opened so far (handshake completed).
        self.opened = 0
        self.stopped = False

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.connecting)

    async def acquire(self, deadlineAt: float) -> ConsumerProtocol:
        """
        A connection with no job, marked busy: an idle one, a new one, or the
        next one released.

        @raise Expired: the deadline passed first.
        @raise Unreachable: the farm could not be connected to.
        """
        while self.idle:
            conn = self.idle.pop()
            if _usable(conn):
                self.busy.add(conn)
                return conn
        if self.size >= self.dialing.size:
            waiter: Deferred[ConsumerProtocol | None] = Deferred()
            self.waiters.append(waiter)
            try:
                handed = await race(self.dialing.clock, waiter, deadlineAt, self._lateHandOver)
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if handed is not None:
                return handed
            # A slot came free (a connection broke): open our own.
        return await self._connect(deadlineAt)

    async def _connect(self, deadlineAt: float) -> ConsumerProtocol:
        dialing = self.dialing
        clock = dialing.clock
        self.health.probe()
        protocol = ConsumerProtocol(self.service, dialing.keyFor(self.member), dialing.liveness, clock)
        connecting = Deferred.fromCoroutine(self._dial(protocol))
        connecting.addCallback(lambda _: protocol.ready)
        self.connecting[protocol] = connecting
        connectBy = min(deadlineAt, clock.seconds() + dialing.connectTimeout)
        try:
            await race(clock, connecting, connectBy, lambda _: _abort(protocol))
        except Expired:
            connecting.cancel()
            _abort(protocol)
            if self.stopped:
                raise Unreachable("the exchange is stopping") from None
            if clock.seconds() >= deadlineAt:
                self.health.gaveUp()
                self.connecting.pop(protocol, None)
                self._slotFreed()
                raise
            self._failed("connection timed out")
        except Exception as e:
            _abort(protocol)
            if self.stopped:
                raise Unreachable("the exchange is stopping") from None
            if isinstance(e, CancelledError):
                # The request was cancelled (its client went away).
                connecting.cancel()
                self.health.gaveUp()
                self.connecting.pop(protocol, None)
                self._slotFreed()
                raise
            self._failed(str(e) or type(e).__name__)
        finally:
            self.connecting.pop(protocol, None)
        self.opened += 1
        self.health.reached()
        protocol.disconnected.addCallback(lambda _: self._lost(protocol))
        if self.stopped:
            _abort(protocol)
            raise Unreachable("the exchange is stopping")
        self.busy.add(protocol)
        return protocol

    async def _dial(self, protocol: ConsumerProtocol) -> None:
        dialing = self.dialing
        if self.member is not None and dialing.publicOnly:
            # A stranger's farm: where its name leads is checked at each
            # connection, not only at its probe.
            endpoint = await publicEndpoint(dialing.reactor, self.endpoint, dialing.ca)
        else:
            endpoint = clientEndpoint(dialing.reactor, self.endpoint, dialing.ca)
        await connectProtocol(endpoint, protocol)

    def _failed(self, why: str) -> None:
        """
        A connection attempt failed: the farm is down; requests waiting for
        this pool move on too.
        """
        self.health.failed(self.dialing.clock.seconds(), why)
        waiting, self.waiters = self.waiters, deque()
        for waiter in waiting:
            waiter.errback(Unreachable(why))
        raise Unreachable(why)

    def release(self, conn: ConsumerProtocol) -> None:
        """
        A job on C{conn} is over: keep it for the next request.
        """
        self.busy.discard(conn)
        if not _usable(conn) or self.stopped or not self.health.isUp():
            # A down farm keeps no connections: its probe is a fresh one.
            self.discard(conn)
            return
        if self.waiters:
            self.busy.add(conn)
            self.waiters.popleft().callback(conn)
        else:
            self.idle.append(conn)

    def discard(self, conn: ConsumerProtocol) -> None:
        """
        C{conn} cannot be reused (broken, or its job was abandoned): close it.
        """
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        _abort(conn)
        self._slotFreed()

    def _lost(self, conn: ConsumerProtocol) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
            self._slotFreed()

    def _slotFreed(self) -> None:
        if self.waiters and self.size < self.dialing.size:
            self.waiters.popleft().callback(None)

    def _lateHandOver(self, handed: ConsumerProtocol | None) -> None:
        # A waiter gave up (deadline, cancel) just as something was handed to it.
        if handed is None:
            self._slotFreed()
        else:
            self.release(handed)

    def closeIdle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.loseConnection()

    def stop(self) -> None:
        self.stopped = True
        self.closeIdle()
        for conn in list(self.busy):
            _abort(conn)
        for protocol, connecting in list(self.connecting.items()):
            connecting.cancel()
            _abort(protocol)
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            waiter.errback(Unreachable("the exchange is stopping"))


def _abort(protocol: ConsumerProtocol) -> None:
    transport = protocol.transport
    if transport is not None and not protocol.disconnected.called:
        transport.abortConnection()


def race(
    clock: IReactorTime,
    d: Deferred[T],
    until: float,
    onLate: Callable[[T], None] | None = None,
) -> Deferred[T]:
    """
    A Deferred with C{d}'s outcome, or failing with L{Expired} at
    C{until}, whichever is first. C{d} itself is left alone; a result it
    produces after that is given to C{onLate}, a failure is swallowed.
    Cancelling the returned Deferred stops the timer (C{d} is again left
    to the caller's cleanup).
    """
    timer = None

    def cancel(_: Deferred[T]) -> None:
        if timer is not None and timer.active():
            timer.cancel()

    out: Deferred[T] = Deferred(cancel)

    def expire() -> None:
        if not out.called:
            out.errback(Expired())

    timer = clock.callLater(max(0.0, until - clock.seconds()), expire)

    def settle(result: T | Failure) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            if not isinstance(result, Failure) and onLate is not None:
                onLate(result)
            return None
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(settle)
    return out
