"""
The real exchange behind the API: farms over PVX/2 (L{privox.api.farmlist}
lines), with weighted random selection, retry, a reserved fallback, pooled
consumer connections (L{privox.api.farmpool}) and farms marked down while
they fail (L{privox.api.farmhealth}).

How a request is placed (L{FarmExchange}):

 1. Up to C{attempts} I{distinct} non-fallback farms serving the service, each
    drawn at random in proportion to its weight from those not yet tried and
    not down; then the fallback farm(s), in configuration order.
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
    none was unreachable) does the request end in L{Unprocessable} (422).
    C{bad_request}, C{too_large}, C{engine_error}, C{cancelled} and
    C{protocol} are final at once: the same request would fail the same way
    elsewhere.
 4. When the farms run out, the last retryable C{FAIL} is mapped with
    L{fromFailCode}; if no farm answered at all (all down or unreachable) the
    error is L{Unavailable} (503) with C{Retry-After} set to when the first
    down farm will be probed again. When the deadline passes, whatever is in
    progress is abandoned (a job's connection is closed, so the farm cancels
    the job) and the request fails with L{TimedOut} (504).

A C{unauthorized} or other C{DENY} also marks a farm down: it is refusing
I{our} key, not the user's, and another farm may accept it.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.api.errors import (
    RETRYABLE,
    ApiError,
    TimedOut,
    Unavailable,
    Unprocessable,
    fromFailCode,
)
from privox.api.exchange import (
    Heard, LiveSpeech, LiveTranscription, Spoken, Transcribed, readSegments,
)
from privox.api.farmstreams import (
    FarmStream,
    SealBrokenMidStream,
    Whole,
    heardOf,
    spokenOf,
    wholeWav,
)
from privox.api.farmhealth import SuccessRate, farmHealth
from privox.api.farmlist import FarmEntry, weightedChoice
from privox.api.farmpool import Dialing, Expired, FarmPool, Unreachable, race
from privox.consumer import ConsumerProtocol, JobFailed, JobResult, Liveness, Unresponsive
from privox.sealing import OFF, PREFERRED, SealPolicy
from privox.messages import SERVICES, ErrorCode, JobRequest
from privox.wav import BadWav, wavPCM
from privox.peer import ConnectionClosed
from privox.tls import TrustRoot

log = Logger()

#: Sends one job on a connection: (connection, timeout, seal policy or None).
Sender = Callable[[ConsumerProtocol, float, "SealPolicy | None"], Deferred[JobResult]]


class Farm:
    """
    One farm of the directory as the exchange sees it: its line, its
    health, and a connection pool per service it serves.
    """

    def __init__(self, entry: FarmEntry, dialing: Dialing, downBackoff: tuple[float, float]) -> None:
        self.entry = entry
        self.health = farmHealth(entry.name, downBackoff, self._wentDown)
        #: Of the jobs it was given lately, how many it answered.
        self.served = SuccessRate()
        self.pools = {
            service: FarmPool(dialing, self.health, service, endpoint, entry.member)
            for service in SERVICES
            if (endpoint := entry.endpoint(service)) is not None
        }

    def _wentDown(self) -> None:
        # A down farm keeps no connections: its probe is a fresh one.
        for pool in self.pools.values():
            pool.closeIdle()


def transcribedOf(fields: dict[str, Any], model: str, language: str | None) -> Transcribed:
    """
    A producer's STT answer, as far as it can be trusted.

    @raise ApiError: it carries no transcript.
    """
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
        and math.isfinite(duration)
        else None,
        readSegments(fields.get("segments")),
    )


class _Transcription:
    """
    L{LiveTranscription} over a L{FarmStream}: its PARTs as L{Heard}; at
    the end, the utterances the producer had not given as final pieces
    (the last one, or all of them from a farm that takes no streams).
    """

    def __init__(
        self, stream: FarmStream, model: str, language: str | None, heard: Callable[[Heard], None]
    ) -> None:
        self._stream = stream
        self._heard = heard
        self._finals = 0
        stream.onPart = self._part
        self.done: Deferred[Transcribed] = stream.done.addCallback(self._ended, model, language)

    def _part(self, fields: dict[str, Any], data: bytes) -> None:
        heard = heardOf(fields)
        if heard is not None:
            # An empty final (a partial that came to nothing) is no segment.
            self._finals += heard.final and bool(heard.text)
            self._heard(heard)

    def _ended(self, result: JobResult, model: str, language: str | None) -> Transcribed:
        transcribed = transcribedOf(result.fields, model, language)
        if self._finals < len(transcribed.segments):
            for segment in transcribed.segments[self._finals:]:
                self._heard(Heard(segment.text, True, segment.start, segment.end))
        elif not self._finals and transcribed.text.strip():
            self._heard(Heard(transcribed.text.strip(), True, 0.0, transcribed.duration_s or 0.0))
        return transcribed

    def write(self, pcm: bytes) -> None:
        self._stream.write(pcm)

    def end(self) -> None:
        self._stream.end()

    def cancel(self) -> None:
        self._stream.cancel()


class _Speech:
    """
    L{LiveSpeech} over a L{FarmStream}: text in, each sentence's audio out.
    """

    def __init__(self, stream: FarmStream, spoken: Callable[[bytes, int], None]) -> None:
        self._stream = stream
        self._spoken = spoken
        stream.onPart = self._part
        self.done: Deferred[float] = stream.done.addCallback(_seconds)

    def _part(self, fields: dict[str, Any], data: bytes) -> None:
        audio = spokenOf(fields, data)
        if audio is not None:
            self._spoken(*audio)

    def write(self, text: str) -> None:
        self._stream.write(text.encode("utf-8"))

    def end(self) -> None:
        self._stream.end()

    def cancel(self) -> None:
        self._stream.cancel()


def _seconds(result: JobResult) -> float:
    duration = result.fields.get("duration_s")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and math.isfinite(duration):
        return max(0.0, float(duration))
    return 0.0


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
    @param exchange: the exchange's signing key: farms that joined by
        themselves are shown a pass it signs for each, not C{key}.
    @param publicOnly: farms that joined by themselves are dialled only
        where their names lead to a public address, checked at each
        connection.
    @param seal: whether jobs are sealed for their nodes (privox-api
        --e2e): a farm that assigns a node the exchange does not vouch for,
        or whose relaying breaks a seal, is marked down and the job tried
        elsewhere; with C{preferred}, a farm with no node that seals gets
        the job in the clear.
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
        seal: SealPolicy = SealPolicy(),
        exchange: Ed25519PrivateKey | None = None,
        publicOnly: bool = False,
    ) -> None:
        self.seal = seal
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
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.deadline = deadline
        self.attempts = attempts
        self.rng = rng if rng is not None else random.Random()
        self.downBackoff = (float(first), float(longest))
        self.stopped = False
        self._dialing = Dialing(
            reactor, self.clock, key, poolSize, connectTimeout, ca, liveness, exchange, publicOnly
        )
        self.farms = [Farm(entry, self._dialing, self.downBackoff) for entry in farms]

    # The directory of farms that join by themselves (privox.api.farmdirectory)

    def join(self, entry: FarmEntry) -> None:
        """
        Take C{entry} from now on, in place of a farm of the same name (how
        well that one served goes with the name).
        """
        before = [s for s in self.farms if s.entry.name == entry.name]
        self.leave(entry.name)
        farm = Farm(entry, self._dialing, self.downBackoff)
        if before:
            farm.served = before[0].served
        self.farms.append(farm)

    def keyFor(self, entry: FarmEntry) -> str:
        """
        The key this API names to the farm C{entry} (L{Dialing.keyFor}).
        """
        return self._dialing.keyFor(entry.member)

    def leave(self, name: str) -> None:
        """
        Take no more jobs to the farm C{name}; its connections close (a job
        on one goes elsewhere, as from a farm that went down).
        """
        for state in [s for s in self.farms if s.entry.name == name]:
            self.farms.remove(state)
            for pool in state.pools.values():
                pool.stop()

    # Exchange

    async def transcribe(
        self,
        model: str,
        language: str | None,
        audio: bytes,
        format: str,
        deadline: float | None = None,
        task: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        words: bool = False,
    ) -> Transcribed:
        result = await self._request(
            "stt",
            lambda conn, timeout, seal: conn.stt(
                model, audio, language=language, format=format, timeout_s=timeout, seal=seal,
                task=task, prompt=prompt, temperature=temperature, words=words,
            ),
            deadline,
        )
        return transcribedOf(result.fields, model, language)

    async def synthesize(
        self,
        model: str,
        language: str | None,
        voice: str | None,
        text: str,
        deadline: float | None = None,
        speed: float = 1.0,
    ) -> Spoken:
        result = await self._request(
            "tts",
            lambda conn, timeout, seal: conn.tts(
                model, text, voice=voice, language=language, timeout_s=timeout, seal=seal,
                speed=None if speed == 1.0 else speed,
            ),
            deadline,
        )
        if not result.data:
            raise ApiError("the farm's answer carried no audio")
        return Spoken.answered(result.data, result.fields, speed)

    def transcribeLive(
        self, model: str, language: str | None, deadline: float, heard: Callable[[Heard], None]
    ) -> LiveTranscription:
        request = JobRequest("stt", model, language, 0, "pcm_s16le", stream=True)

        async def whole(pcm: bytes, seconds: float) -> JobResult:
            return await self._request(
                "stt",
                lambda conn, timeout, seal: conn.stt(
                    model, wholeWav(pcm), language=language, format="wav", timeout_s=timeout,
                    seal=seal,
                ),
                seconds,
            )

        return _Transcription(self._stream("stt", request, deadline, whole), model, language, heard)

    def synthesizeLive(
        self,
        model: str,
        language: str | None,
        voice: str | None,
        deadline: float,
        spoken: Callable[[bytes, int], None],
    ) -> LiveSpeech:
        request = JobRequest("tts", model, language, 0, voice=voice, stream=True)

        async def whole(text: bytes, seconds: float) -> JobResult:
            result = await self._request(
                "tts",
                lambda conn, timeout, seal: conn.tts(
                    model, text.decode("utf-8", "replace"), voice=voice, language=language,
                    timeout_s=timeout, seal=seal,
                ),
                seconds,
            )
            try:
                pcm, rate = wavPCM(result.data)
            except BadWav:
                raise ApiError("the producer's answer is not a WAV file") from None
            spoken(pcm, rate)
            return JobResult(result.id, {"duration_s": len(pcm) / 2 / rate})

        return _Speech(self._stream("tts", request, deadline, whole), spoken)

    def _stream(
        self,
        service: str,
        request: JobRequest,
        deadline: float,
        whole: Whole,
    ) -> FarmStream:
        if self.stopped:
            raise Unavailable("the API is shutting down")
        return FarmStream(self._request, service, request, deadline, whole, self.clock)

    def health(self) -> dict[str, Any]:
        return {
            "farms": [
                {
                    "name": state.entry.name,
                    "services": state.entry.services,
                    "up": state.health.isUp(),
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
        send: Sender,
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
                    raise Expired()
                try:
                    result = await self._sealedOrNot(state, service, send, deadlineAt)
                    state.served.record(True)
                    return result
                except Expired:
                    # It held the job until the deadline: it did not serve it.
                    state.served.record(False)
                    raise
                except JobFailed as e:
                    # Lost, timed out, no producer: it did not serve the job.
                    state.served.record(e.code not in RETRYABLE)
                    if e.code not in RETRYABLE and e.code != ErrorCode.UNSUPPORTED_MODEL:
                        raise fromFailCode(e.code, e.message) from None
                    fails.append(e)
                    log.info(
                        "farm {farm} {service} answered {code}; another farm may serve it",
                        farm=state.entry.name,
                        service=service,
                        code=e.code,
                    )
                except Unreachable:
                    state.served.record(False)
                    unreachable += 1
        except Expired:
            raise TimedOut(f"no answer within {deadline:g} s") from None
        return self._finalError(service, serving, tried, fails, unreachable)

    def _next(
        self, serving: list[Farm], tried: set[str], primaries: int
    ) -> Farm | None:
        """
        The next farm to try: a weighted draw among the untried available
        primaries while attempts remain, then the fallbacks in order.
        """
        now = self.clock.seconds()
        if not self.stopped and primaries < self.attempts:
            candidates = [
                s for s in serving
                if not s.entry.fallback and s.entry.name not in tried and s.health.available(now)
            ]
            if candidates:
                # Its own weight, as well as it has served lately.
                return weightedChoice(
                    candidates, self.rng, lambda s: s.entry.weight * s.served.weight()
                )
        for state in serving:
            if (
                not self.stopped
                and state.entry.fallback
                and state.entry.name not in tried
                and state.health.available(now)
            ):
                return state
        return None

    def _finalError(
        self,
        service: str,
        serving: list[Farm],
        tried: set[str],
        fails: list[JobFailed],
        unreachable: int,
    ) -> JobResult:
        if self.stopped:
            raise Unavailable("the API is shutting down")
        if fails and not unreachable and all(
            f.code == ErrorCode.UNSUPPORTED_MODEL for f in fails
        ):
            raise Unprocessable(fails[-1].message)
        retryable = [f for f in fails if f.code != ErrorCode.UNSUPPORTED_MODEL]
        if retryable:
            last = retryable[-1]
            raise fromFailCode(last.code, last.message)
        now = self.clock.seconds()
        waits = [w for s in serving if (w := s.health.retryIn(now)) is not None]
        retryAfter = max(1, math.ceil(min(waits))) if waits else 5
        if not tried:
            raise Unavailable(f"every {service} farm is down", retryAfter)
        raise Unavailable(f"no {service} farm could be reached", retryAfter)

    async def _sealedOrNot(
        self, state: Farm, service: str, send: Sender, deadlineAt: float
    ) -> JobResult:
        """
        One farm's attempt, sealed as the policy says; with C{preferred}, in
        the clear when the farm has no node that seals.
        """
        seal = self.seal if self.seal.mode != OFF else None
        try:
            return await self._attempt(state, service, send, deadlineAt, seal)
        except JobFailed as e:
            if seal is None or self.seal.mode != PREFERRED or e.code != ErrorCode.NO_PRODUCER:
                raise
        log.info(
            "farm {farm} {service}: no node there seals; sending in the clear (e2e preferred)",
            farm=state.entry.name,
            service=service,
        )
        return await self._attempt(state, service, send, deadlineAt, None)

    async def _attempt(
        self,
        state: Farm,
        service: str,
        send: Sender,
        deadlineAt: float,
        seal: SealPolicy | None = None,
    ) -> JobResult:
        pool = state.pools[service]
        conn = await pool.acquire(deadlineAt)
        reusable = False
        try:
            remaining = deadlineAt - self.clock.seconds()
            if remaining <= 0:
                raise Expired()
            result = await race(
                self.clock, send(conn, round(max(remaining, 0.001), 3), seal), deadlineAt
            )
            reusable = True
            return result
        except JobFailed as e:
            if e.code == ErrorCode.SEAL_BROKEN:
                # The farm put a key of its own in a node's place, or
                # tampered with sealed content: not to be used for a while.
                log.warn(
                    "farm {farm} {service}: a sealed job failed ({why}); trying another farm",
                    farm=state.entry.name,
                    service=service,
                    why=e.message,
                )
                state.health.failed(self.clock.seconds(), "broke a seal")
                raise Unreachable(e.message) from None
            # The farm answered; the connection carries on (unless the farm
            # closed it, which release notices).
            reusable = True
            raise
        except Expired:
            log.info(
                "farm {farm} {service}: deadline passed; abandoning the job",
                farm=state.entry.name,
                service=service,
            )
            raise
        except SealBrokenMidStream as e:
            log.warn(
                "farm {farm} {service}: a sealed stream broke ({why})",
                farm=state.entry.name,
                service=service,
                why=e.message,
            )
            state.health.failed(self.clock.seconds(), "broke a seal")
            raise
        except Unresponsive as e:
            # Frozen or cut off: other requests should not wait on it either.
            state.health.failed(self.clock.seconds(), str(e))
            raise Unreachable(str(e)) from None
        except ConnectionClosed as e:
            # The connection broke mid-job (or the farm closed it).
            log.info(
                "farm {farm} {service}: connection lost during a job ({why})",
                farm=state.entry.name,
                service=service,
                why=str(e) or type(e).__name__,
            )
            raise Unreachable(str(e)) from None
        finally:
            if reusable:
                pool.release(conn)
            else:
                pool.discard(conn)
