"""
The farm's shared state: its settings, key policies, one dispatcher per
service, the jobs in flight, their ledger records and the figures for stats
lines. The farm is the host of its jobs (L{privox.farm.job.JobHost}); the
sessions of its connections submit jobs and join as producers.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from hashlib import blake2b
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from twisted.internet.defer import Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from privox.farm.dispatcher import Capability, Dispatcher
from privox.farm.job import ConsumerSide, Job, ProducerSide, newJob
from privox.farm.ledger import Sink, Transaction
from privox.farm.settings import FarmSettings
from privox.farm.vouching import Vouching
from privox.framing import HEADER_LEN
from privox.keys import KeyPolicy
from privox.logs import logFigures
from privox.messages import (
    EARLY_SEAL, RESERVED_MODELS, SERVICES, BadRequest, ErrorCode, JobRequest, Okay, StreamLimits,
    controlFrame,
)
from privox.timers import Timers

if TYPE_CHECKING:
    from privox.farm.splice import Splicer

log = Logger()


@dataclass
class Counters:
    jobs: int = 0
    succeeded: int = 0
    #: Uploads sealed early (§5.7): forwarded with their job to the node
    #: they were sealed for, or dropped (that node busy or gone) and sent
    #: again after ASGN.
    sealedEarly: int = 0
    sealedEarlyDropped: int = 0


_EARLY_SEAL = frozenset({EARLY_SEAL})
#: How many connection keys of nodes that left a farm remembers, so that no
#: copy of their offers is taken for them (about 100 bytes each).
SPENT_SEAL_KEYS = 65536


class Producer(ProducerSide, Protocol):
    """
    A producer the dispatcher can give jobs (a PVX/2 or PVX/1 session).
    """

    service: str
    capability: Capability

    def becameIdle(self) -> None:
        "No job for now: keep the connection alive (PING)."


class Connection(Protocol):
    def close(self, code: str, message: str) -> None: ...


class JobObserver(Protocol):
    """
    Who watches jobs end (L{privox.farm.observe.FarmMetrics}).
    """

    def jobFinished(self, job: Job, seconds: float) -> None: ...


#: Blocking pieces of work (converting an upload for an original node) the
#: farm runs at once; the others wait their turn.
BLOCKING_AT_ONCE = 2


def _noProducer(request: JobRequest) -> BadRequest:
    # Not "unsupported": producers come and go (a farm that just restarted
    # has none until its nodes dial back in).
    return BadRequest(
        f"no producer serving model {request.model!r}"
        + (f" in language {request.language!r}" if request.language else "")
        + "".join(f" that can {need}" for need in sorted(request.needs))
        + " is connected",
        ErrorCode.NO_PRODUCER,
    )


class Farm:
    """
    @param ledger: where ended jobs are recorded (L{privox.farm.ledger});
        L{None} records nothing.
    @param splicer: relays large DATA through the kernel
        (L{privox.farm.splice}); L{None} relays everything through memory.
    @param runInThread: runs blocking work (converting audio for original
        nodes) off the reactor and returns a L{Deferred} of its result; by
        default it runs at once (tests driving a clock). L{runBlocking}
        runs at most L{BLOCKING_AT_ONCE} such pieces at a time.
    """

    def __init__(
        self,
        settings: FarmSettings,
        clock: IReactorTime,
        producerKeys: KeyPolicy,
        consumerKeys: KeyPolicy,
        ledger: Sink | None = None,
        splicer: Splicer | None = None,
        runInThread: Callable[..., Deferred[Any]] = maybeDeferred,
        vouching: Vouching | None = None,
    ) -> None:
        self.settings = settings
        #: The exchange this farm joined (C{--exchange}): it admits nodes
        #: that offer its certificate in place of a key.
        self.vouching = vouching
        self.runInThread = runInThread
        # Decoding a 200 MiB upload holds about a GB: a farm is a relay, and
        # a few of those at once must not take its memory.
        self._blocking = DeferredSemaphore(BLOCKING_AT_ONCE)
        self.clock = clock
        self.timers = Timers(clock)
        self._keyPolicies = {"producer": producerKeys, "consumer": consumerKeys}
        self.dispatchers = {s: Dispatcher(settings.queue_timeout) for s in SERVICES}
        self._queueTimers: dict[str, IDelayedCall] = {}
        self.connections: set[Connection] = set()
        self.jobs: set[Job] = set()
        self.counters = Counters()
        #: Watches jobs end, once the farm is instrumented.
        self.observer: JobObserver | None = None
        self.accepting = True
        self._drained: list[Deferred[None]] = []
        self.ledger = ledger
        self.splicer = splicer
        #: Keyed once: a copy of it is cheaper than keying a hash per job.
        self._idHash = blake2b(key=secrets.token_bytes(32), digest_size=8)
        #: (service, connection key) -> the producers that offered it and
        #: open uploads sealed early for it (one, unless an offer was copied).
        self._sealKeys: dict[tuple[str, str], list[Producer]] = {}
        self._spentSealKeys: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._jobs = 0
        #: While the reads of one turn of the reactor are handled,
        #: connections' writes wait (L{privox.farm.connection.FarmConnection.write})
        #: and go out together at the end: L{cork}.
        self.corked = False
        self.dirty: list[Any] = []

    def runBlocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        C{f(*args)} in a thread, once fewer than L{BLOCKING_AT_ONCE} are.
        """
        return self._blocking.run(self.runInThread, f, *args)

    def cork(self) -> None:
        """
        Hold what connections are written until the reactor has handled
        every socket that was ready with this one: a call for 0 seconds
        from now runs right after that, before the reactor waits again.
        Each connection then gets one C{sendmsg} for all its frames, and
        the system calls come after the Python work instead of between its
        steps (bench/README.rst: about a tenth of the CPU per small job).
        """
        if not self.corked:
            self.corked = True
            self.clock.callLater(0, self.uncork)

    def uncork(self) -> None:
        """
        Send what connections were written while corked, a write each.
        """
        self.corked = False
        dirty, self.dirty = self.dirty, []
        for connection in dirty:
            connection.flush()

    def _jobId(self) -> str:
        """
        A new job id: 16 hex digits, unique to this farm (a ledger's key)
        and unguessable (a keyed hash of a counter, so ids say nothing of
        how many jobs ran between two), without a system call per job.
        """
        self._jobs += 1
        idHash = self._idHash.copy()
        idHash.update(self._jobs.to_bytes(8, "big"))
        return idHash.hexdigest()

    @property
    def holdsAnswers(self) -> bool:
        """
        Whether the ends of answers wait for their records to reach a disk.
        """
        return self.ledger is not None and self.ledger.durable

    @property
    def cancelGrace(self) -> float:
        return self.settings.cancel_grace

    @property
    def streamIdle(self) -> float:
        return self.settings.stream_idle_s

    def okay(self) -> Okay:
        s = self.settings
        stream = StreamLimits(s.max_stream_s, s.stream_idle_s) if s.max_stream_s > 0 else None
        return Okay(s.name, s.ping_interval, s.max_frame, s.max_job_bytes, s.early_upload, stream)

    def keyPolicy(self, role: str) -> KeyPolicy:
        return self._keyPolicies[role]

    # Connections

    def connectionOpened(self, connection: Connection) -> None:
        self.connections.add(connection)

    def connectionClosed(self, connection: Connection) -> None:
        self.connections.discard(connection)

    # Producers

    def producerJoined(self, producer: Producer) -> None:
        key = (producer.service, producer.sealKey or "")
        if producer.sealKey is not None and key not in self._spentSealKeys:
            self._sealKeys.setdefault(key, []).append(producer)
        dispatcher = self.dispatchers[producer.service]
        self._assignOrIdle(
            producer, dispatcher.addProducer(producer, producer.capability, self.clock.seconds())
        )

    def producerIdle(self, producer: Producer) -> None:
        dispatcher = self.dispatchers[producer.service]
        self._assignOrIdle(producer, dispatcher.release(producer, self.clock.seconds()))

    def _assignOrIdle(self, producer: Producer, job: Job | None) -> None:
        if job is None:
            producer.becameIdle()
        else:
            job.events.assign(producer)

    def producerLeft(self, producer: Producer) -> None:
        self.dispatchers[producer.service].removeProducer(producer)
        key = (producer.service, producer.sealKey or "")
        holders = self._sealKeys.get(key)
        if holders is not None and producer in holders:
            holders.remove(producer)
            if not holders:
                del self._sealKeys[key]
            # A node makes a key per connection: one offered again after
            # its connection left is a copy, which could open nothing.
            self._spentSealKeys[key] = None
            while len(self._spentSealKeys) > SPENT_SEAL_KEYS:
                self._spentSealKeys.popitem(last=False)

    def _sealedFor(self, request: JobRequest) -> Producer | None:
        """
        The producer an early upload is sealed for, if it is idle, takes the
        job and opens such uploads: it is then busy with it. A key that two
        connections offer (one copied the other's offer) names neither.
        """
        holders = self._sealKeys.get((request.service, request.sealedFor or ""))
        if holders is None or len(holders) != 1:
            return None
        producer = holders[0]
        taken = self.dispatchers[request.service].takeThis(
            producer, request.model, request.language, request.needs | _EARLY_SEAL
        )
        return producer if taken else None

    # Jobs

    def submit(self, consumer: ConsumerSide, request: JobRequest) -> None:
        """
        Start a job for C{consumer}: assigned now, or queued.

        @raise BadRequest: refused before ASGN (too large, unsupported model,
            shutting down).
        """
        s = self.settings
        if not self.accepting:
            raise BadRequest("the farm is shutting down", ErrorCode.SHUTTING_DOWN)
        if request.size > s.max_job_bytes:
            raise BadRequest(
                f"job of {request.size} bytes exceeds this farm's max_job_bytes {s.max_job_bytes}",
                ErrorCode.TOO_LARGE,
            )
        if request.stream:
            if s.max_stream_s <= 0:
                raise BadRequest("this farm takes no streaming job", ErrorCode.BAD_REQUEST)
            timeout = min(request.timeout_s or s.max_stream_s, s.max_stream_s)
        else:
            timeout = min(request.timeout_s or s.job_timeout, s.max_job_timeout)
        if request.model.startswith(RESERVED_MODELS):
            raise _noProducer(request)
        jobId = self._jobId()
        # Encoded once: what the producer gets, with the effective timeout.
        work = controlFrame(b"JOB_", dict(request.payload(jobId), timeout_s=timeout))
        if len(work) - HEADER_LEN > s.max_frame:
            raise BadRequest(
                f"JOB_ does not fit in max_frame {s.max_frame} once forwarded",
                ErrorCode.TOO_LARGE,
            )
        producer = None
        if request.sealedFor is not None:
            producer = self._sealedFor(request)
            if producer is None:
                # Its upload is sealed for a node that is busy or gone: any
                # node takes it, and the upload comes again after ASGN.
                self.counters.sealedEarlyDropped += 1
                request = request.untargeted()
                work = controlFrame(b"JOB_", dict(request.payload(jobId), timeout_s=timeout))
            else:
                self.counters.sealedEarly += 1
        dispatcher = self.dispatchers[request.service]
        needs = request.needs
        # An idle producer that takes it can serve it: no other check then.
        if producer is None:
            producer = dispatcher.take(request.model, request.language, needs)
        if producer is None and not dispatcher.canServe(request.model, request.language, needs):
            raise _noProducer(request)
        job = newJob(self, jobId, request, consumer, timeout, work)
        self.jobs.add(job)
        self.counters.jobs += 1
        consumer.jobSubmitted(job)
        if producer is None:
            dispatcher.enqueue(job, request.model, request.language, self.clock.seconds(), needs)
            self._armQueueTimer(request.service)
        else:
            job.events.assign(producer)

    def withdraw(self, job: Job) -> None:
        self.dispatchers[job.request.service].withdraw(job)

    def _armQueueTimer(self, service: str) -> None:
        timer = self._queueTimers.get(service)
        if timer is not None and timer.active():
            return
        deadline = self.dispatchers[service].nextDeadline()
        if deadline is None:
            return
        delay = max(0.0, deadline - self.clock.seconds())
        self._queueTimers[service] = self.clock.callLater(
            delay, self._queueTimerFired, service
        )

    def _queueTimerFired(self, service: str) -> None:
        del self._queueTimers[service]
        for job in self.dispatchers[service].expire(self.clock.seconds()):
            job.events.expire(
                ErrorCode.NO_PRODUCER, "no producer became free in time"
            )
        self._armQueueTimer(service)

    def record(self, job: Job) -> Deferred[None] | None:
        """
        Put a job that has ended in the ledger; fires once its record is
        durable (L{None} without a ledger: a Deferred per job for nothing).
        """
        if self.ledger is None:
            return None
        return self.ledger.record(transaction(job, self.settings.name, self.clock.seconds()))

    def jobFinished(self, job: Job) -> None:
        self.jobs.discard(job)
        if job.outcome == "ok":
            self.counters.succeeded += 1
        seconds = self.clock.seconds() - job.started
        if self.observer is not None:
            self.observer.jobFinished(job, seconds)
        if self.settings.log_jobs:
            self._logJob(job, seconds)
        if not self.jobs:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def _logJob(self, job: Job, seconds: float) -> None:
        log.info(
            "job {job_id} {service} {model} {outcome} in {ms} ms "
            "({bytes_in} bytes in, {bytes_out} bytes out)",
            job_id=job.id,
            service=job.request.service,
            model=job.request.model,
            outcome=job.outcome,
            **logFigures(
                self.settings.blur_usage,
                ms=seconds * 1000,
                bytes_in=job.bytesIn,
                bytes_out=job.bytesOut,
            ),
        )

    # Stats and shutdown

    def statsLine(self, previous: Counters, seconds: float) -> None:
        """
        Log the rates since C{previous} and the current load.
        """
        c = self.counters
        producers = {
            service: d.producersByModel() for service, d in self.dispatchers.items()
        }
        log.info(
            "stats: {jobs_per_s:.2f} jobs/s, {ok_per_s:.2f} successes/s, "
            "queue {queue}, producers (connected, idle) {producers}",
            jobs_per_s=(c.jobs - previous.jobs) / seconds,
            ok_per_s=(c.succeeded - previous.succeeded) / seconds,
            queue={s: d.queueDepth() for s, d in self.dispatchers.items()},
            producers=producers,
        )

    def shutdown(self) -> Deferred[None]:
        """
        Refuse new jobs, fail queued ones with C{shutting_down}, and fire when
        the running jobs are done or C{shutdown_grace} has passed; then close
        every connection.
        """
        self.accepting = False
        for service, dispatcher in self.dispatchers.items():
            timer = self._queueTimers.pop(service, None)
            if timer is not None and timer.active():
                timer.cancel()
            for job in dispatcher.drain():
                job.events.expire(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")
        if self.jobs:
            log.info("waiting for {n} running jobs to finish", n=len(self.jobs))
            waited: Deferred[None] = Deferred()
            self._drained.append(waited)
            waited.addTimeout(self.settings.shutdown_grace, self.clock)
            waited.addErrback(lambda f: self._abandonRunning())
        else:
            waited = succeed(None)
        waited.addCallback(lambda _: self._closeAll())
        return waited

    def _abandonRunning(self) -> None:
        self._drained = []
        log.info("{n} jobs did not finish in time", n=len(self.jobs))
        for job in list(self.jobs):
            job.events.expire(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")

    def _closeAll(self) -> None:
        for connection in list(self.connections):
            connection.close(ErrorCode.SHUTTING_DOWN, "the farm is shutting down")


# The ledger's records (L{privox.farm.ledger} takes them as they are).


def audioSeconds(job: Job) -> float | None:
    """
    The seconds of audio C{job} credits: its producer's RSLT C{duration_s}
    when that is a finite number >= 0, capped at one second per 1000 bytes
    of input or output (whichever is larger; no codec is that dense) so a
    producer cannot claim absurd durations. None when absent or the job
    failed.
    """
    if job.outcome != "ok":
        return None
    value = job.resultDuration
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    bound = max(job.bytesIn, job.bytesOut) / 1000
    return round(min(value, bound), 3)


def transaction(job: Job, farm: str, now: float) -> Transaction:
    """
    The ledger record of C{job}, ended at C{now} on the farm named C{farm}:
    a plain, JSON-serialisable dict. No key, text or audio.
    """
    request = job.request
    return {
        "job_id": job.id,
        "farm": farm,
        "time": now,
        "service": request.service,
        "model": request.model,
        "input_bytes": job.bytesIn,
        "output_bytes": job.bytesOut,
        "audio_seconds": audioSeconds(job),
        "processing_ms": round(max(0.0, now - job.started) * 1000, 3),
        "status": job.outcome,
        "producer": job.producerAccount,
        "consumer": job.consumerAccount,
    }
