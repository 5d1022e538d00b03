"""
The farm's shared state: its settings, key policies, one dispatcher per
service, the jobs in flight and the figures for stats lines.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from privox.config import setting
from privox.farm.dispatcher import Dispatcher
from privox.farm.job import Job, newJob
from privox.farm.ledger import transaction
from privox.farm.pvx1 import DEFAULT_STT_ALIASES, DEFAULT_TTS_ALIASES
from privox.keys import KeyPolicy
from privox.metrics import usage
from privox.framing import HEADER_LEN
from privox.messages import SERVICES, BadRequest, ErrorCode, JobRequest, Okay, controlFrame

if TYPE_CHECKING:
    from privox.farm.connection import ConsumerSession, FarmConnection, ProducerSession
    from privox.farm.ledger import Sink
    from privox.farm.splice import Splicer
    from privox.metrics import FarmMetrics

log = Logger()


@dataclass(frozen=True)
class FarmSettings:
    """
    Everything a farm can be told (command line, or the TOML file).
    """

    name: str = setting("privox-farm", "Name the farm gives itself in OKAY.")
    stt_listen: str = setting(
        "tcp:1776", "Endpoint string for STT peers, or 'none'."
    )
    tts_listen: str = setting(
        "tcp:1777", "Endpoint string for TTS peers, or 'none'."
    )
    queue_timeout: float = setting(
        5.0, "Seconds a job may wait for a free producer before FAIL no_producer."
    )
    ping_interval: float = setting(
        10.0, "Seconds between PINGs to idle producers; PONG is due in half that."
    )
    handshake_timeout: float = setting(
        10.0, "Seconds a new peer has to complete HELO."
    )
    max_job_timeout: float = setting(
        60.0, "Upper bound (and default) of a job's timeout, counted from JOB_."
    )
    cancel_grace: float = setting(
        10.0, "Seconds a producer has to end a cancelled job before it is dropped."
    )
    shutdown_grace: float = setting(
        30.0, "Seconds running jobs may take to finish when the farm stops."
    )
    max_frame: int = setting(
        1024 * 1024, "Largest frame payload in bytes (announced in OKAY)."
    )
    max_job_bytes: int = setting(
        50 * 1024 * 1024, "Largest upload or result of one job in bytes."
    )
    early_upload: int = setting(
        64 * 1024,
        "Largest upload a consumer may send with its JOB_, before ASGN (announced "
        "in OKAY; 0: always after ASGN). A queued job holds at most this much.",
    )
    splice_min: int = setting(
        128 * 1024,
        "Relay uploads and results with at least this many bytes still to come "
        "inside the kernel (Linux splice(2), both peers on plain TCP) instead of "
        "through the farm's memory; 0 turns it off.",
    )
    producer_keys: str = setting(
        "open", "Producer key policy: 'open', an allow-list file, or a validation URL."
    )
    consumer_keys: str = setting(
        "open", "Consumer key policy: 'open', an allow-list file, or a validation URL."
    )
    stats_interval: float = setting(
        60.0, "Seconds between stats log lines (0 turns them off)."
    )
    pvx1_quiet: float = setting(
        0.05, "PVX/1: seconds of silence that end a header or a node's transcript."
    )
    pvx1_stt_models: tuple[str, ...] = setting(
        DEFAULT_STT_ALIASES, "PVX/1 STT model alias, PVX1NAME=PVX2NAME."
    )
    pvx1_tts_models: tuple[str, ...] = setting(
        DEFAULT_TTS_ALIASES, "PVX/1 TTS model alias, PVX1NAME=PVX2NAME."
    )
    metrics_listen: str = setting(
        "none", "Endpoint string serving /metrics (Prometheus) and /status over HTTP, or 'none'."
    )
    blur_usage: bool = setting(
        False, "Round sizes and times in log lines (privacy)."
    )
    ledger: str = setting(
        "none",
        "Where the farm records one transaction per job: 'none', a JSON-lines "
        "file path, or the http(s) URL of an API's /v1/ledger.",
    )
    ledger_spool: str = setting(
        "privox-farm-ledger.spool",
        "File where records for an http(s) ledger wait until the API confirms them.",
    )
    api_key: str = dataclasses.field(
        default="",
        repr=False,  # a secret: never in a repr or a log line
        metadata={
            "help": "This farm's key, sent as Authorization: Bearer to the ledger URL "
            "and to key-validation URLs."
        },
    )


@dataclass
class Counters:
    jobs: int = 0
    succeeded: int = 0


class Farm:
    def __init__(
        self,
        settings: FarmSettings,
        clock: IReactorTime,
        producerKeys: KeyPolicy,
        consumerKeys: KeyPolicy,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._keyPolicies = {"producer": producerKeys, "consumer": consumerKeys}
        self.dispatchers = {s: Dispatcher(settings.queue_timeout) for s in SERVICES}
        self._queueTimers: dict[str, IDelayedCall] = {}
        self.connections: set[FarmConnection] = set()
        self.jobs: set[Job] = set()
        self.counters = Counters()
        #: A L{privox.metrics.FarmMetrics} once instrumented.
        self.metrics: FarmMetrics | None = None
        self.accepting = True
        self._drained: list[Deferred[None]] = []
        #: Where finished jobs are recorded (L{privox.farm.ledger}); None
        #: records nothing.
        self.ledger: Sink | None = None
        #: Relays large DATA through the kernel (L{privox.farm.splice});
        #: None relays everything through memory.
        self.splicer: Splicer | None = None

    def okay(self) -> Okay:
        s = self.settings
        return Okay(s.name, s.ping_interval, s.max_frame, s.max_job_bytes, s.early_upload)

    def keyPolicy(self, role: str) -> KeyPolicy:
        return self._keyPolicies[role]

    # Connections

    def connectionOpened(self, connection: FarmConnection) -> None:
        self.connections.add(connection)

    def connectionClosed(self, connection: FarmConnection) -> None:
        self.connections.discard(connection)

    # Producers

    def producerJoined(self, producer: ProducerSession) -> None:
        dispatcher = self.dispatchers[producer.connection.service]
        self._assignOrIdle(
            producer, dispatcher.addProducer(producer, producer.capability, self.clock.seconds())
        )

    def producerIdle(self, producer: ProducerSession) -> None:
        dispatcher = self.dispatchers[producer.connection.service]
        self._assignOrIdle(producer, dispatcher.release(producer, self.clock.seconds()))

    def _assignOrIdle(self, producer: ProducerSession, job: Job | None) -> None:
        if job is None:
            producer.becameIdle()
        else:
            job.events.assign(producer)

    def producerLeft(self, producer: ProducerSession) -> None:
        self.dispatchers[producer.connection.service].removeProducer(producer)

    # Jobs

    def submit(self, consumer: ConsumerSession, request: JobRequest) -> None:
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
                f"job of {request.size} bytes exceeds max_job_bytes {s.max_job_bytes}",
                ErrorCode.TOO_LARGE,
            )
        timeout = min(request.timeout_s or s.max_job_timeout, s.max_job_timeout)
        dispatcher = self.dispatchers[request.service]
        if not dispatcher.canServe(request.model, request.language):
            # Not "unsupported": producers come and go (a farm that just
            # restarted has none until its nodes dial back in).
            raise BadRequest(
                f"no producer serving model {request.model!r}"
                + (f" in language {request.language!r}" if request.language else "")
                + " is connected",
                ErrorCode.NO_PRODUCER,
            )
        jobId = secrets.token_hex(8)
        # Encoded once: what the producer gets, with the effective timeout.
        work = controlFrame(b"JOB_", dict(request.payload(jobId), timeout_s=timeout))
        if len(work) - HEADER_LEN > s.max_frame:
            raise BadRequest(
                f"JOB_ does not fit in max_frame {s.max_frame} once forwarded",
                ErrorCode.TOO_LARGE,
            )
        job = newJob(self, jobId, request, consumer, timeout, work)
        self.jobs.add(job)
        self.counters.jobs += 1
        consumer.jobSubmitted(job)
        producer = dispatcher.submit(
            job, request.model, request.language, self.clock.seconds()
        )
        if producer is None:
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

    def record(self, job: Job) -> Deferred[None]:
        """
        Put a job that has ended in the ledger; fires once its record is
        durable.
        """
        if self.ledger is None:
            return succeed(None)
        return self.ledger.record(transaction(job, self.settings.name, self.clock.seconds()))

    @property
    def holdsAnswers(self) -> bool:
        """
        Whether the ends of answers wait for their records to reach a disk.
        """
        return self.ledger is not None and self.ledger.durable

    def jobFinished(self, job: Job) -> None:
        self.jobs.discard(job)
        if job.outcome == "ok":
            self.counters.succeeded += 1
        seconds = self.clock.seconds() - job.started
        if self.metrics is not None:
            self.metrics.jobFinished(job, seconds)
        log.info(
            "job {job_id} {service} {model} {outcome} in {ms} ms "
            "({bytes_in} bytes in, {bytes_out} bytes out)",
            job_id=job.id,
            service=job.request.service,
            model=job.request.model,
            outcome=job.outcome,
            **usage(
                self.settings.blur_usage,
                ms=seconds * 1000,
                bytes_in=job.request.size,
                bytes_out=job.bytesOut,
            ),
        )
        if not self.jobs:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

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
