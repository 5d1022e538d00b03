"""
One job's life inside the farm, as an explicit state machine.

A job links the consumer that asked with the producer that answers; it is the
only path between them, so a reply can reach no one but the consumer that owns
the job. The connections feed it events; it decides what each side is told.

    queued ──assign──▶ running ──RSLT──▶ returning ──last DATA──▶ recording ──▶ finished
       │                  │ │                │                                     ▲
       │                  │ └─FAIL/lost──────┼─────────────────────────────────────┤
       │        consumer lost / timeout      │ consumer lost/timeout               │
       │                  ▼                  ▼                                     │
       │              abandoned (producer finishing; output discarded)─────────────┤
       └──timeout/gone/shutdown────────────────────────────────────────────────────┘

A streaming job (docs/protocol.rst §5.8) is the same machine: its upload
runs until an empty DATA (each piece due within the farm's stream idle
gap), and while it runs the producer's PART frames, and their DATA, go
straight on to the consumer.

The end of the answer (an STT job's RSLT, the last bytes of a result) is
held while the job's ledger record is written (L{recording}): a consumer
never has an answer whose record a crash of the farm could still lose.

A job knows its two sides and its host only through the small protocols
below (L{ConsumerSide}, L{ProducerSide}, L{JobHost}): PVX/2 and PVX/1
sessions are both sides, the farm is the host.
"""

from __future__ import annotations

from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.automata import build

from privox.messages import ErrorCode, JobRequest, failPayload
from privox.timers import Timer, Timers

log = Logger()


class Relayed(Protocol):
    """
    A connection a job relays between: while its writes back up, the
    reading of the connection that feeds it waits.
    """

    transport: Any

    def feedFrom(self, source: Relayed | None) -> None:
        "Hold C{source}'s reading while this connection's writes back up."

    def abort(self) -> None: ...


class _Side(Protocol):
    #: The account id (hashed key) of the peer, for the ledger.
    accountId: str | None
    connection: Relayed
    transport: Any

    def sendControl(self, verb: bytes, fields: dict[str, Any]) -> None: ...

    def sendData(self, payload: bytes) -> None: ...


class ConsumerSide(_Side, Protocol):
    def sendResult(self, fields: dict[str, Any], raw: bytes) -> None:
        "The job's RSLT (C{raw}: its JSON, when the producer's will do)."

    def jobSubmitted(self, job: Job) -> None:
        "The job exists (queued or assigned)."

    def jobAssigned(self, job: Job) -> None:
        "A producer took it: the consumer is told (ASGN) and may upload."

    def jobDetached(self, job: Job) -> None:
        "The job is over for this consumer."

    def sendPart(self, raw: bytes) -> None:
        "A streaming job's PART, as the producer sent it (its id checked)."


class ProducerSide(_Side, Protocol):
    #: Its seal offer as JSON, if it can seal (privox.messages.Hello.seal).
    sealOffer: bytes | None
    #: Its connection key, if it opens uploads sealed for it early.
    sealKey: str | None

    def startJob(self, job: Job, upload: bytes) -> None:
        "Send the job, with the part of its upload that came early."

    def jobDetached(self, job: Job, healthy: bool) -> None:
        "The job is over; C{healthy}: the producer may take another."

    def drop(self, why: str) -> None:
        "Close the producer's connection."


class JobHost(Protocol):
    """
    What a job needs from the farm that runs it.
    """

    clock: IReactorTime
    #: The jobs' timeouts, most of which are cancelled (privox.timers).
    timers: Timers
    #: Seconds a producer has to end a cancelled job.
    cancelGrace: float
    #: Longest gap between two pieces of a stream's upload (§5.8).
    streamIdle: float

    def withdraw(self, job: Job) -> None:
        "Take a queued job out of the queue."

    def record(self, job: Job) -> Deferred[None] | None:
        """
        Put the ended job in the ledger; fires once that is durable.
        L{None}: the farm keeps no ledger, and nothing is waited for.
        """

    def jobFinished(self, job: Job) -> None:
        "The job is over: forget it."


class JobEvents(Protocol):
    def assign(self, producer: Any) -> None:
        "The dispatcher picked a producer."

    def consumerData(self, payload: bytes) -> None:
        """
        A DATA frame of the upload (before ASGN too, if small:
        early_upload); for a stream, an empty one ends it.
        """

    def partial(self, raw: bytes) -> None:
        "A stream's PART from the producer (its JSON, id checked)."

    def partialData(self, payload: bytes) -> None:
        "A DATA frame that a PART announced."

    def result(self, fields: dict[str, Any], size: int, raw: bytes) -> None:
        """
        The producer's RSLT; C{size} bytes of DATA follow. C{raw}: its JSON
        as the producer sent it (already with the job's id), or C{b""}.
        """

    def resultData(self, payload: bytes) -> None:
        "A DATA frame of the result."

    def resultComplete(self) -> None:
        "The producer has sent the whole result."

    def recorded(self) -> None:
        "The job's ledger record is on disk (or could not be written)."

    def producerFailed(self, fields: dict[str, Any]) -> None:
        "The producer answered FAIL."

    def producerLost(self) -> None:
        "The producer's connection is gone."

    def consumerLost(self) -> None:
        "The consumer's connection is gone."

    def expire(self, code: str, message: str) -> None:
        "Queue timeout, job timeout or shutdown: the consumer gets FAIL code."

    def cancelGraceOver(self) -> None:
        "A cancelled producer did not finish in time."


class Job:
    """
    The state a job's machine works on. L{events} is the machine: feed it.
    """

    events: JobEvents

    def __init__(
        self,
        host: JobHost,
        jobId: str,
        request: JobRequest,
        consumer: ConsumerSide,
        timeout: float,
        work: bytes,
    ) -> None:
        self.host = host
        self.id = jobId
        self.request = request
        #: The JOB_ frame the producer gets.
        self.work = work
        self.consumer: ConsumerSide | None = consumer
        self.producer: ProducerSide | None = None
        self.started = host.clock.seconds()
        #: The upload's bytes (a stream's, as they came) and the answer's.
        self.bytesIn = request.size
        self.bytesOut = 0
        self.outcome = "queued"
        #: For the ledger (L{privox.farm.ledger}): the account ids (hashed
        #: keys) of the consumer and of the producer that took the job (None
        #: while none did), and the RSLT's C{duration_s} as the producer sent
        #: it (unchecked).
        self.consumerAccount: str | None = consumer.accountId
        self.producerAccount: str | None = None
        self.resultDuration: Any = None
        #: The result's size as its RSLT announced it.
        self.resultSize = 0
        #: The end of the answer, held while the job is recorded: the verb
        #: (RSLT or DATA) and what it carries.
        self._held: tuple[bytes, Any] | None = None
        #: An early upload (docs/protocol.rst §5.3) that came while the job
        #: waited for a producer, at most the farm's early_upload bytes.
        self._early: list[bytes] = []
        #: Where the upload's and the result's bytes go now (the producer's
        #: and the consumer's connections), for a splice relay
        #: (L{privox.farm.splice}); set and cleared by the transitions that
        #: start and end forwarding each, which the relay follows.
        self.uploadSink: Relayed | None = None
        self.resultSink: Relayed | None = None
        #: The two connections fed by each other while the job runs.
        self._linked: tuple[Relayed, Relayed] | None = None
        self._timeout: Timer | None = host.timers.callLater(
            timeout, self._timedOut
        )
        self._grace: Timer | None = None
        #: A stream's upload must keep coming (L{JobHost.streamIdle}).
        self._idle: Timer | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.request.service} {self.request.model}>"

    def _timedOut(self) -> None:
        self._timeout = None
        self.events.expire(ErrorCode.TIMEOUT, "the job ran out of time")

    def _streamIdle(self) -> None:
        self._idle = None
        self.events.expire(
            ErrorCode.TIMEOUT,
            f"the stream sent nothing for {self.host.streamIdle:g} s (the farm's stream_idle_s)",
        )

    def _streamed(self, payload: bytes) -> None:
        """
        A piece of a stream's upload came: wait for the next one, unless it
        was the end.
        """
        self.bytesIn += len(payload)
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = (
            self.host.timers.callLater(self.host.streamIdle, self._streamIdle) if payload else None
        )

    # Helpers the transitions share.

    def _startOn(self, producer: ProducerSide) -> None:
        assert self.consumer is not None
        self.producer = producer
        self.producerAccount = producer.accountId
        early, self._early = b"".join(self._early), []
        producer.startJob(self, early)
        self.uploadSink = producer.connection
        self.consumer.jobAssigned(self)
        if self.request.stream:
            self._idle = self.host.timers.callLater(self.host.streamIdle, self._streamIdle)
        # Backpressure both ways: the upload, then the answer.
        consumer, producing = self.consumer.connection, producer.connection
        producing.feedFrom(consumer)
        consumer.feedFrom(producing)
        self._linked = (consumer, producing)

    def _unlink(self) -> None:
        linked, self._linked = self._linked, None
        if linked is not None:
            for connection in linked:
                connection.feedFrom(None)

    def _failConsumer(self, code: str, message: str, withId: bool = True) -> None:
        consumer = self._detachConsumer()
        if consumer is not None:
            consumer.sendControl(
                b"FAIL", failPayload(self.id if withId else None, code, message)
            )

    def _detachConsumer(self) -> ConsumerSide | None:
        consumer, self.consumer = self.consumer, None
        # Without a consumer nothing is forwarded either way.
        self.uploadSink = self.resultSink = None
        self._unlink()
        if consumer is not None:
            consumer.jobDetached(self)
        return consumer

    def _abandon(
        self, outcome: str, sendCancel: bool, failure: tuple[str, str] | None = None
    ) -> None:
        """
        Let the consumer go (telling it C{failure}, if any) and wait, a
        bounded time, for the producer to wind the job down.
        """
        if failure is None:
            self._detachConsumer()
        else:
            self._failConsumer(*failure)
        self.outcome = outcome
        self._cancelProducer(sendCancel)

    def _cancelProducer(self, sendCancel: bool) -> None:
        assert self.producer is not None
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if sendCancel:
            self.producer.sendControl(b"CNCL", {"id": self.id})
        self._grace = self.host.timers.callLater(self.host.cancelGrace, self._graceOver)

    def _graceOver(self) -> None:
        self._grace = None
        self.events.cancelGraceOver()

    def _stopTimers(self) -> None:
        for call in (self._timeout, self._grace, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._timeout = self._grace = self._idle = None

    def _record(self, outcome: str, releaseProducer: bool) -> Deferred[None] | None:
        """
        The job has ended with C{outcome}: record it, then let its producer
        go (back to work, or dropped). Fires once the record is durable
        (L{None}: no ledger).
        """
        self.outcome = outcome
        self._early = []
        self._stopTimers()
        # Nothing more flows between the two sides.
        self.uploadSink = self.resultSink = None
        self._unlink()
        recorded = self.host.record(self)
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.jobDetached(self, healthy=releaseProducer)
        return recorded

    def _close(self) -> None:
        self._detachConsumer()
        self.host.jobFinished(self)

    def _recordingFailed(self, failure: Failure) -> None:
        # A bug, not a disk (a failed write fires recorded too): the job
        # must still end, or its consumer could never send another.
        log.failure("job {job_id}: delivering its answer failed", failure, job_id=self.id)
        if self.consumer is not None:
            self.consumer.connection.abort()
        self._close()

    def _finish(self, outcome: str, releaseProducer: bool) -> None:
        """
        End a job that gives its consumer no answer (failed, cancelled,
        expired): nothing waits for its record.
        """
        self._record(outcome, releaseProducer)
        self._close()


builder = TypeMachineBuilder(JobEvents, Job)
queued = builder.state("queued")
running = builder.state("running")
returning = builder.state("returning")
recording = builder.state("recording")
abandoned = builder.state("abandoned")
finished = builder.state("finished")


@queued.upon(JobEvents.assign).to(running)
def _assign(events: JobEvents, job: Job, producer: ProducerSide) -> None:
    job._startOn(producer)


@queued.upon(JobEvents.consumerLost).to(finished)
def _goneWhileQueued(events: JobEvents, job: Job) -> None:
    job.host.withdraw(job)
    job._finish("cancelled", releaseProducer=False)


@queued.upon(JobEvents.expire).to(finished)
def _expireQueued(events: JobEvents, job: Job, code: str, message: str) -> None:
    job.host.withdraw(job)
    # Before ASGN the consumer has no job id yet.
    job._failConsumer(code, message, withId=False)
    job._finish(code, releaseProducer=False)


@queued.upon(JobEvents.consumerData).loop()
def _earlyUpload(events: JobEvents, job: Job, payload: bytes) -> None:
    # Bounded: the consumer session admits no more than early_upload bytes
    # before ASGN.
    job._early.append(payload)


@running.upon(JobEvents.consumerData).loop()
def _upload(events: JobEvents, job: Job, payload: bytes) -> None:
    assert job.producer is not None
    if job.request.stream:
        job._streamed(payload)
    job.producer.sendData(payload)


@running.upon(JobEvents.partial).loop()
def _partial(events: JobEvents, job: Job, raw: bytes) -> None:
    assert job.consumer is not None
    job.consumer.sendPart(raw)


@running.upon(JobEvents.partialData).loop()
def _partialData(events: JobEvents, job: Job, payload: bytes) -> None:
    assert job.consumer is not None
    job.bytesOut += len(payload)
    job.consumer.sendData(payload)


@running.upon(JobEvents.result).to(returning)
def _result(events: JobEvents, job: Job, fields: dict[str, Any], size: int, raw: bytes) -> None:
    assert job.consumer is not None
    job.resultDuration = fields.get("duration_s")
    fields["id"] = job.id
    job.resultSize = size
    if size:
        job.consumer.sendResult(fields, raw)
    else:
        job._held = (b"RSLT", (fields, raw))  # the whole answer: see recording
    # The rest of the upload is moot now (_uploadAfterResult).
    job.uploadSink = None
    if job._idle is not None and job._idle.active():
        job._idle.cancel()
    job._idle = None
    job.resultSink = job.consumer.connection


@running.upon(JobEvents.producerFailed).to(finished)
def _producerFailed(events: JobEvents, job: Job, fields: dict[str, Any]) -> None:
    code = fields.get("error")
    if code not in ErrorCode.ALL:
        code = ErrorCode.ENGINE_ERROR
    message = fields.get("message")
    job._failConsumer(code, message if isinstance(message, str) else "the engine failed")
    job._finish(code, releaseProducer=True)


@running.upon(JobEvents.producerLost).to(finished)
@returning.upon(JobEvents.producerLost).to(finished)
def _producerLost(events: JobEvents, job: Job) -> None:
    job._failConsumer(ErrorCode.PRODUCER_LOST, "the producer went away mid-job")
    job._finish(ErrorCode.PRODUCER_LOST, releaseProducer=False)


@running.upon(JobEvents.consumerLost).to(abandoned)
def _consumerLostRunning(events: JobEvents, job: Job) -> None:
    job._abandon("cancelled", sendCancel=True)


@running.upon(JobEvents.expire).to(abandoned)
def _expireRunning(events: JobEvents, job: Job, code: str, message: str) -> None:
    job._abandon(code, sendCancel=True, failure=(code, message))


@returning.upon(JobEvents.resultData).loop()
def _resultData(events: JobEvents, job: Job, payload: bytes) -> None:
    assert job.consumer is not None
    job.bytesOut += len(payload)
    if job.bytesOut >= job.resultSize:
        job._held = (b"DATA", payload)  # the answer's last bytes: see recording
    else:
        job.consumer.sendData(payload)


@returning.upon(JobEvents.resultComplete).to(recording)
def _resultComplete(events: JobEvents, job: Job) -> None:
    recorded = job._record("ok", releaseProducer=True)
    if recorded is None:
        job.events.recorded()
        return
    recorded.addCallback(lambda _: job.events.recorded())
    recorded.addErrback(job._recordingFailed)


@recording.upon(JobEvents.recorded).to(finished)
def _recorded(events: JobEvents, job: Job) -> None:
    held, job._held = job._held, None
    if held is not None and job.consumer is not None:
        verb, body = held
        if verb == b"RSLT":
            job.consumer.sendResult(*body)
        else:
            job.consumer.sendData(body)
    job._close()


@recording.upon(JobEvents.consumerLost).loop()
def _goneWhileRecorded(events: JobEvents, job: Job) -> None:
    job._held = None
    job._detachConsumer()


@recording.upon(JobEvents.consumerData).loop()
@returning.upon(JobEvents.consumerData).loop()
def _uploadAfterResult(events: JobEvents, job: Job, payload: bytes) -> None:
    # The producer answered before the upload ended; the rest is moot.
    pass


@recording.upon(JobEvents.expire).loop()
def _answeredAlready(events: JobEvents, job: Job, code: str, message: str) -> None:
    # The answer is complete and only waits for its record.
    pass


@returning.upon(JobEvents.consumerLost).to(abandoned)
def _consumerLostReturning(events: JobEvents, job: Job) -> None:
    # After RSLT the producer must send every announced byte; no CNCL.
    job._abandon("cancelled", sendCancel=False)


@returning.upon(JobEvents.expire).to(abandoned)
def _expireReturning(events: JobEvents, job: Job, code: str, message: str) -> None:
    job._abandon(code, sendCancel=False, failure=(code, message))


@abandoned.upon(JobEvents.result).loop()
def _discardResult(
    events: JobEvents, job: Job, fields: dict[str, Any], size: int, raw: bytes
) -> None:
    pass


@abandoned.upon(JobEvents.resultData).loop()
@abandoned.upon(JobEvents.partialData).loop()
def _discardData(events: JobEvents, job: Job, payload: bytes) -> None:
    pass


@abandoned.upon(JobEvents.partial).loop()
def _discardPart(events: JobEvents, job: Job, raw: bytes) -> None:
    pass


@abandoned.upon(JobEvents.resultComplete).to(finished)
def _producerDone(events: JobEvents, job: Job) -> None:
    job._finish(job.outcome, releaseProducer=True)


@abandoned.upon(JobEvents.producerFailed).to(finished)
def _producerGaveUp(events: JobEvents, job: Job, fields: dict[str, Any]) -> None:
    job._finish(job.outcome, releaseProducer=True)


@abandoned.upon(JobEvents.producerLost).to(finished)
def _producerLostAbandoned(events: JobEvents, job: Job) -> None:
    job._finish(job.outcome, releaseProducer=False)


@abandoned.upon(JobEvents.cancelGraceOver).to(finished)
def _graceOver(events: JobEvents, job: Job) -> None:
    assert job.producer is not None
    job.producer.drop("did not finish a cancelled job in time")
    job._finish(job.outcome, releaseProducer=False)


@abandoned.upon(JobEvents.consumerLost).loop()
@finished.upon(JobEvents.consumerLost).loop()
def _nothingToDo(events: JobEvents, job: Job) -> None:
    pass


@abandoned.upon(JobEvents.expire).loop()
@finished.upon(JobEvents.expire).loop()
def _alreadyOver(events: JobEvents, job: Job, code: str, message: str) -> None:
    pass


@finished.upon(JobEvents.producerLost).loop()
def _lateLoss(events: JobEvents, job: Job) -> None:
    pass


JobMachine = build(builder)


def newJob(
    host: JobHost,
    jobId: str,
    request: JobRequest,
    consumer: ConsumerSide,
    timeout: float,
    work: bytes,
) -> Job:
    job = Job(host, jobId, request, consumer, timeout, work)
    job.events = JobMachine(job)
    return job
