"""
The real exchange behind the API: farms over PVX/2, with weighted random
selection, retry, a reserved fallback, and persistent consumer connections.

Configuration is one line per farm (L{FarmEntry.parse})::

    NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback] [status=URL]

(C{status=URL}: the farm's C{/status}, from its C{--metrics-listen}
endpoint, which the API's own C{/status} then shows), for example C{main tcp:host=farm.example:port=1776 tcp:host=farm.example:port=1777
weight=2}. Endpoints are Twisted client endpoint strings; C{none} stands for a
service that farm does not offer.

How a request is placed (L{FarmExchange}):

 1. Up to C{attempts} I{distinct} non-fallback farms serving the service, each
    drawn at random in proportion to its weight from those not yet tried and
    not marked down; then the fallback farm(s), in configuration order.
 2. Each attempt takes a connection from that farm's pool (or opens one) and
    sends the job with C{timeout_s} set to the time left before the request's
    deadline.
 3. Another farm is tried after a connection error (refused, closed, timed
    out, handshake refused by C{DENY}, the connection dropping mid-job, the
    farm answering nothing, PINGs included, for a few seconds mid-job) and
    after a C{FAIL} whose code is in L{RETRYABLE} (C{no_producer},
    C{producer_lost}, C{timeout}, C{shutting_down}). C{unsupported_model} is
    retried on other farms too, since another farm may have a producer for the
    model; only if I{every} farm that answered said C{unsupported_model} (and
    none was unreachable) does the request end in L{Unsupported} (422).
    C{bad_request}, C{too_large}, C{engine_error}, C{cancelled} and
    C{protocol} are final at once: the same request would fail the same way
    elsewhere.
 4. When the farms run out, the last retryable C{FAIL} is mapped with
    L{fromFailCode}; if no farm answered at all (all down or unreachable) the
    error is L{Unavailable} (503) with C{Retry-After} set to when the first
    down farm will be probed again. When the deadline passes, whatever is in
    progress is abandoned (a job's connection is closed, so the farm cancels
    the job) and the request fails with L{TimedOut} (504).

Down farms: a farm whose connection attempt or handshake fails is marked down
for a backoff that starts at C{downBackoff[0]} seconds and doubles on every
failed probe up to C{downBackoff[1]}. While down it is skipped and its idle
connections are closed. Once the backoff has passed, the next request that
draws the farm is the probe: it opens a fresh connection (other requests keep
skipping the farm while that probe is in flight). A successful handshake marks
the farm up and resets the backoff; a failed one marks it down again. There is
no separate probe traffic: a farm nobody would use is not dialled. A
C{unauthorized} or other C{DENY} also marks a farm down: it is refusing I{our}
key, not the user's, and another farm may accept it.

Pools: one per (farm, service), at most C{poolSize} connections, each
carrying one job at a time. Idle connections are kept and reused (most
recently used first); broken ones are dropped; when all are busy and the pool
is full, a request waits (within its deadline) for the next one to come free.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.api.errors import (
    RETRYABLE,
    ApiError,
    TimedOut,
    Unavailable,
    Unsupported,
    fromFailCode,
)
from privox.api.exchange import Transcribed
from privox.consumer import ConsumerProtocol, JobFailed, JobResult, Liveness, Unresponsive
from privox.messages import SERVICES, ErrorCode
from privox.peer import ConnectionClosed
from privox.tls import TrustRoot, checkEndpoint, clientEndpoint

log = Logger()

T = TypeVar("T")

_NONE = "none"


@dataclass(frozen=True)
class FarmEntry:
    """
    One farm of the directory.

    @ivar stt: client endpoint string of its STT port, or C{None}.
    @ivar tts: client endpoint string of its TTS port, or C{None}.
    @ivar weight: relative chance of being drawn among non-fallback farms.
    @ivar fallback: reserved: tried only after the drawn farms failed.
    @ivar status: http(s) URL of the farm's C{/status} (its
        C{--metrics-listen} endpoint), shown on the API's C{/status}; or
        C{None}.
    """

    name: str
    stt: str | None
    tts: str | None
    weight: float = 1.0
    fallback: bool = False
    status: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a farm needs a name")
        if self.stt is None and self.tts is None:
            raise ValueError(f"farm {self.name!r} serves neither stt nor tts")
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise ValueError(f"farm {self.name!r}: weight must be a positive number")

    def endpoint(self, service: str) -> str | None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}")
        return self.stt if service == "stt" else self.tts

    @property
    def services(self) -> list[str]:
        return [s for s in SERVICES if self.endpoint(s) is not None]

    @classmethod
    def parse(cls, line: str) -> FarmEntry:
        """
        Parse C{NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback]}.

        @raise ValueError: the line is malformed (the message says how).
        """
        words = line.split()
        if len(words) < 3:
            raise ValueError(
                f"farm line {line.strip()!r}: expected "
                "'NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback]'"
            )
        name, stt, tts = words[:3]
        weight = 1.0
        fallback = False
        status = None
        seen: set[str] = set()
        for option in words[3:]:
            key = option.split("=", 1)[0]
            if key in seen:
                raise ValueError(f"farm {name!r}: {key!r} given twice")
            seen.add(key)
            if option == "fallback":
                fallback = True
            elif key == "weight":
                text = option.split("=", 1)[1] if "=" in option else ""
                try:
                    weight = float(text)
                except ValueError:
                    raise ValueError(
                        f"farm {name!r}: weight must be a positive number, not {text!r}"
                    ) from None
                if not math.isfinite(weight) or weight <= 0:
                    raise ValueError(
                        f"farm {name!r}: weight must be a positive number, not {text!r}"
                    )
            elif key == "status":
                status = option.split("=", 1)[1] if "=" in option else ""
                if not status.startswith(("http://", "https://")):
                    raise ValueError(
                        f"farm {name!r}: status must be an http(s) URL, not {status!r}"
                    )
            else:
                raise ValueError(
                    f"farm {name!r}: unknown option {option!r} "
                    "(expected weight=N, fallback or status=URL)"
                )
        endpoints = {}
        for service, text in (("stt", stt), ("tts", tts)):
            if text.lower() == _NONE:
                endpoints[service] = None
                continue
            _checkEndpoint(name, service, text)
            endpoints[service] = text
        return cls(name, endpoints["stt"], endpoints["tts"], weight, fallback, status)


def _checkEndpoint(name: str, service: str, text: str) -> None:
    """
    Reject an endpoint string Twisted could not connect with (unknown type,
    missing or bad port...), at configuration time rather than at the first
    request. Building an endpoint does not touch the reactor.
    """
    try:
        checkEndpoint(text)
    except ValueError as e:
        raise ValueError(
            f"farm {name!r}: bad {service} endpoint {text!r} ({e}); "
            "expected a Twisted client endpoint string such as "
            "'tcp:host=farm.example:port=1776', or 'none'"
        ) from None


def parseFarms(lines: Iterable[str]) -> list[FarmEntry]:
    """
    The farm directory from config lines (L{FarmEntry.parse}); blank lines
    and C{#} comments are skipped.

    @raise ValueError: a bad line (its number is in the message), a name used
        twice, or no farm at all.
    """
    farms: list[FarmEntry] = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        try:
            entry = FarmEntry.parse(line)
        except ValueError as e:
            raise ValueError(f"farm line {number}: {e}") from None
        if any(f.name == entry.name for f in farms):
            raise ValueError(f"farm line {number}: farm {entry.name!r} is listed twice")
        farms.append(entry)
    if not farms:
        raise ValueError("no farms configured")
    return farms


def weightedChoice(entries: list[FarmEntry], rng: random.Random) -> FarmEntry:
    """
    Draw one of C{entries} with probability proportional to its weight.
    """
    if not entries:
        raise ValueError("nothing to choose from")
    total = sum(e.weight for e in entries)
    point = rng.random() * total
    for entry in entries:
        point -= entry.weight
        if point < 0:
            return entry
    return entries[-1]


class _Expired(Exception):
    """
    Internal: the time allowed for a step has passed.
    """


class _Unreachable(Exception):
    """
    Internal: a farm could not be connected to (the reason is the message).
    """


def _usable(conn: ConsumerProtocol) -> bool:
    transport = conn.transport
    return (
        transport is not None
        and not conn.disconnected.called
        and not getattr(transport, "disconnecting", False)
        and not conn.busy
    )


class _FarmState:
    """
    A farm's up/down state and its connection pools.
    """

    def __init__(self, exchange: FarmExchange, entry: FarmEntry) -> None:
        self.entry = entry
        self.exchange = exchange
        self.downUntil: float | None = None
        self.nextBackoff = exchange.downBackoff[0]
        self.probing = False
        self.pools = {
            service: _Pool(exchange, self, service, endpoint)
            for service in SERVICES
            if (endpoint := entry.endpoint(service)) is not None
        }

    @property
    def up(self) -> bool:
        return self.downUntil is None

    def available(self, now: float) -> bool:
        """
        May a request try this farm now? Up, or down with its backoff over and
        no probe already in flight.
        """
        if self.downUntil is None:
            return True
        return now >= self.downUntil and not self.probing

    def markDown(self, now: float, why: str) -> None:
        self.probing = False
        if self.downUntil is not None and now < self.downUntil:
            return  # already down (several attempts failed together)
        backoff = self.nextBackoff
        self.downUntil = now + backoff
        self.nextBackoff = min(backoff * 2, self.exchange.downBackoff[1])
        log.warn(
            "farm {farm} unreachable ({why}); skipping it for {backoff} s",
            farm=self.entry.name,
            why=why,
            backoff=backoff,
        )
        for pool in self.pools.values():
            pool.closeIdle()

    def markUp(self) -> None:
        self.probing = False
        if self.downUntil is not None:
            log.info("farm {farm} is reachable again", farm=self.entry.name)
        self.downUntil = None
        self.nextBackoff = self.exchange.downBackoff[0]


class _Pool:
    """
    Up to C{poolSize} consumer connections to one farm port.
    """

    def __init__(
        self, exchange: FarmExchange, farm: _FarmState, service: str, endpoint: str
    ) -> None:
        self.exchange = exchange
        self.farm = farm
        self.service = service
        self.endpoint = endpoint
        self.idle: list[ConsumerProtocol] = []
        self.busy: set[ConsumerProtocol] = set()
        self.connecting: dict[ConsumerProtocol, Deferred[Any]] = {}
        self.waiters: deque[Deferred[ConsumerProtocol | None]] = deque()
        #: Connections opened so far (handshake completed).
        self.opened = 0

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.connecting)

    async def acquire(self, deadlineAt: float) -> ConsumerProtocol:
        """
        A connection with no job, marked busy: an idle one, a new one, or the
        next one released.

        @raise _Expired: the deadline passed first.
        @raise _Unreachable: the farm could not be connected to.
        """
        while self.idle:
            conn = self.idle.pop()
            if _usable(conn):
                self.busy.add(conn)
                return conn
        if self.size >= self.exchange.poolSize:
            waiter: Deferred[ConsumerProtocol | None] = Deferred()
            self.waiters.append(waiter)
            try:
                handed = await self.exchange._race(waiter, deadlineAt, self._lateHandOver)
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if handed is not None:
                return handed
            # A slot came free (a connection broke): open our own.
        return await self._connect(deadlineAt)

    async def _connect(self, deadlineAt: float) -> ConsumerProtocol:
        exchange = self.exchange
        clock = exchange.clock
        if not self.farm.up:
            self.farm.probing = True
        protocol = ConsumerProtocol(self.service, exchange.key, exchange.liveness, exchange.clock)
        connecting = connectProtocol(
            clientEndpoint(exchange.reactor, self.endpoint, exchange.ca), protocol
        )
        connecting.addCallback(lambda _: protocol.ready)
        self.connecting[protocol] = connecting
        connectBy = min(deadlineAt, clock.seconds() + exchange.connectTimeout)
        try:
            await exchange._race(connecting, connectBy, lambda _: _abort(protocol))
        except _Expired:
            connecting.cancel()
            _abort(protocol)
            if exchange.stopped:
                raise _Unreachable("the exchange is stopping") from None
            if clock.seconds() >= deadlineAt:
                self.farm.probing = False
                self.connecting.pop(protocol, None)
                self._slotFreed()
                raise
            self._failed("connection timed out")
        except Exception as e:
            _abort(protocol)
            if exchange.stopped:
                raise _Unreachable("the exchange is stopping") from None
            if isinstance(e, CancelledError):
                # The request was cancelled (its client went away).
                connecting.cancel()
                self.farm.probing = False
                self.connecting.pop(protocol, None)
                self._slotFreed()
                raise
            self._failed(str(e) or type(e).__name__)
        finally:
            self.connecting.pop(protocol, None)
        self.opened += 1
        self.farm.markUp()
        protocol.disconnected.addCallback(lambda _: self._lost(protocol))
        if exchange.stopped:
            _abort(protocol)
            raise _Unreachable("the exchange is stopping")
        self.busy.add(protocol)
        return protocol

    def _failed(self, why: str) -> None:
        """
        A connection attempt failed: the farm is down; requests waiting for
        this pool move on too.
        """
        self.farm.markDown(self.exchange.clock.seconds(), why)
        waiting, self.waiters = self.waiters, deque()
        for waiter in waiting:
            waiter.errback(_Unreachable(why))
        raise _Unreachable(why)

    def release(self, conn: ConsumerProtocol) -> None:
        """
        A job on C{conn} is over: keep it for the next request.
        """
        self.busy.discard(conn)
        if not _usable(conn) or self.exchange.stopped or not self.farm.up:
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
        if self.waiters and self.size < self.exchange.poolSize:
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
        self.closeIdle()
        for conn in list(self.busy):
            _abort(conn)
        for protocol, connecting in list(self.connecting.items()):
            connecting.cancel()
            _abort(protocol)
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            waiter.errback(_Unreachable("the exchange is stopping"))


def _abort(protocol: ConsumerProtocol) -> None:
    transport = protocol.transport
    if transport is not None and not protocol.disconnected.called:
        transport.abortConnection()


class FarmExchange:
    """
    L{privox.api.exchange.Exchange} over a directory of farms (see the module
    docstring for the selection, retry, fallback and pooling rules).

    @param farms: the directory; names must be unique.
    @param reactor: connects (L{privox.tls.clientEndpoint}) and, unless C{clock} is
        given, keeps time.
    @param key: the consumer key this API presents to farms.
    @param deadline: seconds a whole request may take, every attempt included.
    @param attempts: most distinct non-fallback farms tried per request.
    @param poolSize: most connections per (farm, service).
    @param rng: the source of the weighted draws (seed it for tests).
    @param downBackoff: (first, longest) seconds an unreachable farm is skipped.
    @param connectTimeout: longest wait for a connection and its handshake.
    @param clock: time source for deadlines and backoff (default C{reactor}).
    @param ca: trust root (L{privox.tls.loadCA}) for C{tls:} endpoints that
        name no C{trustRoots} of their own; default: the system's CAs.
    @param liveness: how long a farm may stay silent during a job before
        it is given up on (marked down, the job tried elsewhere); L{None}
        waits for the deadline.
    """

    def __init__(
        self,
        farms: list[FarmEntry],
        reactor: Any,
        key: str = "",
        deadline: float = 60.0,
        attempts: int = 3,
        poolSize: int = 4,
        rng: random.Random | None = None,
        downBackoff: tuple[float, float] = (1.0, 60.0),
        connectTimeout: float = 10.0,
        clock: IReactorTime | None = None,
        ca: TrustRoot | None = None,
        liveness: Liveness | None = Liveness(),
    ) -> None:
        names = [f.name for f in farms]
        if len(set(names)) != len(names):
            raise ValueError("farm names must be unique")
        if attempts < 1 or poolSize < 1:
            raise ValueError("attempts and poolSize must be at least 1")
        if deadline <= 0 or connectTimeout <= 0:
            raise ValueError("deadline and connectTimeout must be positive")
        first, longest = downBackoff
        if not 0 < first <= longest:
            raise ValueError("downBackoff must be (first, longest) with 0 < first <= longest")
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.key = key
        self.deadline = deadline
        self.attempts = attempts
        self.poolSize = poolSize
        self.rng = rng if rng is not None else random.Random()
        self.downBackoff = (float(first), float(longest))
        self.connectTimeout = connectTimeout
        self.ca = ca
        self.liveness = liveness
        self.stopped = False
        self.farms = [_FarmState(self, entry) for entry in farms]

    # Exchange

    async def transcribe(
        self,
        model: str,
        language: str | None,
        audio: bytes,
        format: str,
        deadline: float | None = None,
    ) -> Transcribed:
        result = await self._request(
            "stt",
            lambda conn, timeout: conn.stt(
                model, audio, language=language, format=format, timeout_s=timeout
            ),
            deadline,
        )
        fields = result.fields
        text = fields.get("text")
        if not isinstance(text, str):
            raise ApiError("the farm's answer carried no transcript")
        answeredModel = fields.get("model")
        answeredLanguage = fields.get("language")
        duration = fields.get("duration_s")
        return Transcribed(
            text,
            answeredModel if isinstance(answeredModel, str) and answeredModel else model,
            answeredLanguage if isinstance(answeredLanguage, str) else language,
            float(duration)
            if isinstance(duration, (int, float)) and not isinstance(duration, bool)
            else None,
        )

    async def synthesize(
        self,
        model: str,
        language: str | None,
        voice: str | None,
        text: str,
        deadline: float | None = None,
    ) -> bytes:
        result = await self._request(
            "tts",
            lambda conn, timeout: conn.tts(
                model, text, voice=voice, language=language, timeout_s=timeout
            ),
            deadline,
        )
        if not result.data:
            raise ApiError("the farm's answer carried no audio")
        return result.data

    def health(self) -> dict[str, Any]:
        return {
            "farms": [
                {
                    "name": state.entry.name,
                    "services": state.entry.services,
                    "up": state.up,
                    "fallback": state.entry.fallback,
                }
                for state in self.farms
            ]
        }

    def stop(self) -> Deferred[None]:
        """
        Close every pooled connection; fires once they are all closed. Later
        requests fail with L{Unavailable}.
        """
        self.stopped = True
        waiting: list[Deferred[None]] = []
        for state in self.farms:
            for pool in state.pools.values():
                # Only connections that got a transport will report closing.
                waiting += [
                    c.disconnected
                    for c in [*pool.idle, *pool.busy, *pool.connecting]
                    if c.transport is not None and not c.disconnected.called
                ]
                pool.stop()
        d = DeferredList(waiting, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    # Placing a request

    async def _request(
        self,
        service: str,
        send: Callable[[ConsumerProtocol, float], Deferred[JobResult]],
        deadline: float | None = None,
    ) -> JobResult:
        if self.stopped:
            raise Unavailable("the API is shutting down")
        if deadline is None:
            deadline = self.deadline
        deadlineAt = self.clock.seconds() + deadline
        serving = [s for s in self.farms if service in s.pools]
        if not serving:
            raise Unavailable(f"no farm is configured for {service}")
        tried: set[str] = set()
        primaries = 0
        fails: list[JobFailed] = []
        unreachable = 0
        try:
            while (state := self._next(serving, tried, primaries)) is not None:
                tried.add(state.entry.name)
                if not state.entry.fallback:
                    primaries += 1
                if self.clock.seconds() >= deadlineAt:
                    raise _Expired()
                try:
                    return await self._attempt(state, service, send, deadlineAt)
                except JobFailed as e:
                    if e.code not in RETRYABLE and e.code != ErrorCode.UNSUPPORTED_MODEL:
                        raise fromFailCode(e.code, e.message) from None
                    fails.append(e)
                    log.info(
                        "farm {farm} {service} answered {code}; another farm may serve it",
                        farm=state.entry.name,
                        service=service,
                        code=e.code,
                    )
                except _Unreachable:
                    unreachable += 1
        except _Expired:
            raise TimedOut(f"no answer within {deadline:g} s") from None
        return self._finalError(service, serving, tried, fails, unreachable)

    def _next(
        self, serving: list[_FarmState], tried: set[str], primaries: int
    ) -> _FarmState | None:
        """
        The next farm to try: a weighted draw among the untried available
        primaries while attempts remain, then the fallbacks in order.
        """
        now = self.clock.seconds()
        if not self.stopped and primaries < self.attempts:
            candidates = [
                s for s in serving
                if not s.entry.fallback and s.entry.name not in tried and s.available(now)
            ]
            if candidates:
                chosen = weightedChoice([s.entry for s in candidates], self.rng)
                return next(s for s in candidates if s.entry is chosen)
        for state in serving:
            if (
                not self.stopped
                and state.entry.fallback
                and state.entry.name not in tried
                and state.available(now)
            ):
                return state
        return None

    def _finalError(
        self,
        service: str,
        serving: list[_FarmState],
        tried: set[str],
        fails: list[JobFailed],
        unreachable: int,
    ) -> JobResult:
        if self.stopped:
            raise Unavailable("the API is shutting down")
        if fails and not unreachable and all(
            f.code == ErrorCode.UNSUPPORTED_MODEL for f in fails
        ):
            raise Unsupported(fails[-1].message)
        retryable = [f for f in fails if f.code != ErrorCode.UNSUPPORTED_MODEL]
        if retryable:
            last = retryable[-1]
            raise fromFailCode(last.code, last.message)
        now = self.clock.seconds()
        waits = [s.downUntil - now for s in serving if s.downUntil is not None]
        retryAfter = max(1, math.ceil(min(waits))) if waits else 5
        if not tried:
            raise Unavailable(f"every {service} farm is down", retryAfter)
        raise Unavailable(f"no {service} farm could be reached", retryAfter)

    async def _attempt(
        self,
        state: _FarmState,
        service: str,
        send: Callable[[ConsumerProtocol, float], Deferred[JobResult]],
        deadlineAt: float,
    ) -> JobResult:
        pool = state.pools[service]
        conn = await pool.acquire(deadlineAt)
        reusable = False
        try:
            remaining = deadlineAt - self.clock.seconds()
            if remaining <= 0:
                raise _Expired()
            result = await self._race(send(conn, round(max(remaining, 0.001), 3)), deadlineAt)
            reusable = True
            return result
        except JobFailed:
            # The farm answered; the connection carries on (unless the farm
            # closed it, which release notices).
            reusable = True
            raise
        except _Expired:
            log.info(
                "farm {farm} {service}: deadline passed; abandoning the job",
                farm=state.entry.name,
                service=service,
            )
            raise
        except Unresponsive as e:
            # Frozen or cut off: other requests should not wait on it either.
            state.markDown(self.clock.seconds(), str(e))
            raise _Unreachable(str(e)) from None
        except ConnectionClosed as e:
            # The connection broke mid-job (or the farm closed it).
            log.info(
                "farm {farm} {service}: connection lost during a job ({why})",
                farm=state.entry.name,
                service=service,
                why=str(e) or type(e).__name__,
            )
            raise _Unreachable(str(e)) from None
        finally:
            if reusable:
                pool.release(conn)
            else:
                pool.discard(conn)

    def _race(
        self,
        d: Deferred[T],
        until: float,
        onLate: Callable[[T], None] | None = None,
    ) -> Deferred[T]:
        """
        A Deferred with C{d}'s outcome, or failing with L{_Expired} at
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
                out.errback(_Expired())

        timer = self.clock.callLater(max(0.0, until - self.clock.seconds()), expire)

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
