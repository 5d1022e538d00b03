"""
A compact PVX/2 farm on asyncio: the baseline bench/farm_relay.py holds
privox-farm against (issue 17).

What it does is what a relay must do and no more: the handshake (greeting,
HELO, OKAY; every key accepted), jobs matched to the idle producer that
serves their model and has waited longest, a FIFO queue with a timeout
(FAIL no_producer), early uploads held until a producer is assigned, RSLT
and FAIL relayed with the job id, DATA both ways, a job timeout (FAIL
timeout, CNCL), CNCL when the consumer goes, idle producers PINGed, and
backpressure (a peer whose write buffer is full pauses the reading of the
peer that feeds it). It keeps no ledger, metrics or logs, speaks no PVX/1
and checks little: a lean program doing the same work on the same wire.

With C{--reactor twisted} the same farm runs on Twisted's reactor instead,
its peers carried by Twisted TCP connections (L{TwistedPeer}): what this
design costs on Twisted, beside what it costs on asyncio, says how much of
privox-farm's cost is its own work and how much is the event loop's.

    python bench/asyncio_farm.py PORT [--max-frame N] [--early-upload N]
        [--reactor asyncio|twisted] [--twisted-reactor NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
from typing import Any

from twisted.application.reactors import installReactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

HEADER = 12
GREETING = b"who"


def frame(verb: bytes, payload: bytes = b"") -> bytes:
    return verb + b"%08d" % len(payload) + payload


def control(verb: bytes, fields: dict[str, Any]) -> bytes:
    return frame(verb, json.dumps(fields, separators=(",", ":")).encode())


class Job:
    __slots__ = ("id", "fields", "consumer", "producer", "early", "timer", "model", "language")

    def __init__(self, fields: dict[str, Any], consumer: Peer) -> None:
        self.id = os.urandom(8).hex()
        self.fields = fields
        self.consumer: Peer | None = consumer
        self.producer: Peer | None = None
        self.early: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.model = fields.get("model")
        self.language = fields.get("language")


class Farm:
    def __init__(self, args: argparse.Namespace, loop: Any) -> None:
        self.args = args
        #: What the farm asks of its event loop: time() and call_later().
        self.loop = loop
        self.producers: set[Peer] = set()
        #: Idle producers, longest idle first.
        self.idle: collections.OrderedDict[Peer, None] = collections.OrderedDict()
        self.queue: collections.deque[tuple[float, Job]] = collections.deque()
        self.queueTimer: asyncio.TimerHandle | None = None
        self.okay = control(b"OKAY", {
            "protocol": 2, "farm": "asyncio", "ping_interval": args.ping_interval,
            "max_frame": args.max_frame, "max_job_bytes": args.max_job_bytes,
            "early_upload": args.early_upload,
        })

    def anyProducer(self, fields: dict[str, Any]) -> bool:
        """
        Whether a connected producer (idle or busy) serves the job's model.
        """
        return any(p.serves2(fields.get("model"), fields.get("language")) for p in self.producers)

    def submit(self, job: Job) -> None:
        for producer in self.idle:
            if producer.serves(job):
                del self.idle[producer]
                self.assign(job, producer)
                return
        self.queue.append((self.loop.time() + self.args.queue_timeout, job))
        if self.queueTimer is None:
            self.queueTimer = self.loop.call_later(self.args.queue_timeout, self.expireQueued)
        job.timer = self.loop.call_later(job.fields["timeout_s"], self.timedOut, job)

    def expireQueued(self) -> None:
        self.queueTimer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, job = self.queue.popleft()
            job.timer.cancel()
            if job.consumer is not None:
                job.consumer.fail(None, "no_producer", "no producer became free in time")
        if self.queue:
            self.queueTimer = self.loop.call_later(self.queue[0][0] - now, self.expireQueued)

    def assign(self, job: Job, producer: Peer) -> None:
        consumer = job.consumer
        assert consumer is not None
        job.producer = producer
        producer.job = job
        producer.stopPinging()
        work = dict(job.fields, id=job.id)
        work.pop("early", None)
        producer.write(control(b"JOB_", work))
        for data in job.early:
            producer.write(frame(b"DATA", data))
        job.early = []
        if not job.fields.get("early"):
            consumer.owed = job.fields.get("size", 0)
        producer.link(consumer)
        consumer.write(control(b"ASGN", {"id": job.id}))
        if job.timer is None:
            job.timer = self.loop.call_later(job.fields["timeout_s"], self.timedOut, job)

    def idleProducer(self, producer: Peer) -> None:
        for i, (_, job) in enumerate(self.queue):
            if producer.serves(job):
                del self.queue[i]
                self.assign(job, producer)
                return
        self.idle[producer] = None
        producer.startPinging()

    def timedOut(self, job: Job) -> None:
        job.timer = None
        if job.producer is None:
            self.queue = collections.deque((t, j) for t, j in self.queue if j is not job)
            if job.consumer is not None:
                job.consumer.fail(None, "timeout", "the job ran out of time")
            return
        if job.consumer is not None:
            job.consumer.fail(job.id, "timeout", "the job ran out of time")
        job.producer.write(control(b"CNCL", {"id": job.id}))

    def finish(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        consumer, job.consumer = job.consumer, None
        if consumer is not None:
            consumer.job = None
            consumer.link(None)
        producer = job.producer
        if producer is not None:
            producer.job = None
            producer.link(None)
            if not producer.closed:
                self.idleProducer(producer)


class Peer(asyncio.Protocol):
    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.buffer = bytearray()
        self.greeted = False
        self.role: str | None = None
        self.models: set[str] = set()
        self.languages: set[str] = set()
        self.job: Job | None = None
        self.owed = 0  # DATA bytes still owed (upload, or result)
        self.closed = False
        self.ping: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        #: The peer whose reading waits while our write buffer is full.
        self.feeder: Peer | None = None
        self.writePaused = False

    # asyncio

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=512 * 1024)
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= HEADER:
            size = int(buffer[4:HEADER])
            if size > self.farm.args.max_frame:
                return self.abort()
            if len(buffer) < HEADER + size:
                return
            verb = bytes(buffer[:4])
            payload = bytes(buffer[HEADER : HEADER + size])
            del buffer[: HEADER + size]
            self.frameReceived(verb, payload)
            if self.closed:
                return

    def pause_writing(self) -> None:
        self.writePaused = True
        if self.feeder is not None and self.feeder.transport is not None:
            self.feeder.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writePaused = False
        if self.feeder is not None and self.feeder.transport is not None:
            self.feeder.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stopPinging()
        self.farm.idle.pop(self, None)
        self.farm.producers.discard(self)
        job = self.job
        if job is None:
            return
        if self.role == "consumer":
            job.consumer = None
            if job.producer is None:
                job.timer.cancel()
                self.farm.queue = collections.deque((t, j) for t, j in self.farm.queue if j is not job)
            else:
                job.producer.write(control(b"CNCL", {"id": job.id}))
        else:
            if job.consumer is not None:
                job.consumer.fail(job.id, "producer_lost", "the producer went away mid-job")
            job.producer = None
            self.farm.finish(job)

    # Frames

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        self.transport.abort()

    def fail(self, jobId: str | None, code: str, message: str) -> None:
        self.write(control(b"FAIL", {"id": jobId, "error": code, "message": message}))
        job, self.job = self.job, None
        if job is not None and job.consumer is self:
            job.consumer = None
        self.link(None)

    def link(self, feeder: Peer | None) -> None:
        old, self.feeder = self.feeder, feeder
        if old is not None and self.writePaused and old.transport is not None:
            old.transport.resume_reading()
        if feeder is not None and self.writePaused:
            feeder.transport.pause_reading()

    def frameReceived(self, verb: bytes, payload: bytes) -> None:
        if verb == b"DATA":
            return self.dataFrame(payload)
        if verb == b"PING":
            return self.write(frame(b"PONG"))
        if verb == b"PONG":
            if self.job is None and self.role == "producer":
                self.startPinging()
            return
        fields = json.loads(payload) if payload else {}
        if self.role is None:
            if verb != b"HELO":
                return self.abort()
            self.role = fields.get("role")
            self.models = set(fields.get("models") or ())
            self.languages = set(fields.get("languages") or ())
            self.write(self.farm.okay)
            if self.role == "producer":
                self.farm.producers.add(self)
                self.farm.idleProducer(self)
        elif verb == b"JOB_" and self.role == "consumer":
            self.jobReceived(fields)
        elif verb == b"RSLT" and self.job is not None:
            self.resultReceived(fields)
        elif verb == b"FAIL" and self.job is not None:
            job = self.job
            if job.consumer is not None:
                job.consumer.fail(job.id, fields.get("error", "engine_error"), fields.get("message", ""))
            self.farm.finish(job)
        else:
            self.abort()

    def jobReceived(self, fields: dict[str, Any]) -> None:
        args = self.farm.args
        size = fields.get("size", 0)
        self.owed = size if fields.get("early") else 0
        if size > args.max_job_bytes:
            return self.fail(None, "too_large", "job larger than max_job_bytes")
        if not self.farm.anyProducer(fields):
            return self.fail(None, "no_producer", "no producer serves this model")
        fields["timeout_s"] = min(fields.get("timeout_s") or args.job_timeout, args.job_timeout)
        self.job = job = Job(fields, self)
        self.farm.submit(job)

    def dataFrame(self, payload: bytes) -> None:
        job = self.job
        if len(payload) > self.owed:
            return self.abort()
        self.owed -= len(payload)
        if job is None:
            return  # a refused job's upload, dropped
        if self.role == "consumer":
            if job.producer is None:
                job.early.append(payload)
            else:
                job.producer.write(frame(b"DATA", payload))
        else:
            if job.consumer is not None:
                job.consumer.write(frame(b"DATA", payload))
            if self.owed == 0:
                self.farm.finish(job)

    def resultReceived(self, fields: dict[str, Any]) -> None:
        job = self.job
        assert job is not None
        fields["id"] = job.id
        self.owed = fields.get("size", 0) or 0
        consumer = job.consumer
        if consumer is not None:
            consumer.write(control(b"RSLT", fields))
            consumer.link(self)
        if self.owed == 0:
            self.farm.finish(job)

    # Producers

    def serves(self, job: Job) -> bool:
        return self.serves2(job.model, job.language)

    def serves2(self, model: Any, language: Any) -> bool:
        return (model in self.models or "*" in self.models) and (
            language is None or not self.languages or "*" in self.languages
            or language in self.languages)

    def startPinging(self) -> None:
        self.stopPinging()
        self.ping = self.farm.loop.call_later(self.farm.args.ping_interval, self.sendPing)

    def sendPing(self) -> None:
        self.write(frame(b"PING"))
        self.ping = self.farm.loop.call_later(self.farm.args.ping_interval / 2, self.abort)

    def stopPinging(self) -> None:
        if self.ping is not None:
            self.ping.cancel()
            self.ping = None


class TwistedLoop:
    """
    time() and call_later() from Twisted's reactor.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def time(self) -> float:
        return self.reactor.seconds()

    def call_later(self, delay: float, f: Any, *args: Any) -> _TwistedHandle:
        return _TwistedHandle(self.reactor.callLater(delay, f, *args))


class _TwistedHandle:
    def __init__(self, call: Any) -> None:
        self.call = call

    def cancel(self) -> None:
        # As asyncio's: cancelling a call that ran does nothing.
        if self.call.active():
            self.call.cancel()


class _TwistedTransport:
    """
    A Twisted TCP transport, as a Peer uses asyncio's.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.write = transport.write
        self.pause_reading = transport.pauseProducing
        self.resume_reading = transport.resumeProducing
        self.abort = transport.abortConnection

    def get_extra_info(self, name: str) -> Any:
        assert name == "socket"
        return self.transport.getHandle()

    def set_write_buffer_limits(self, high: int) -> None:
        # Twisted's one size: the most a read takes and the write buffer's
        # high-water mark (privox.framing.tuneTransport sets it the same).
        self.transport.bufferSize = high


@implementer(IPushProducer)
class TwistedPeer(Protocol):
    """
    Carries a Peer over a Twisted TCP connection: what asyncio's transport
    calls on a Peer, Twisted's calls here.
    """

    def __init__(self, farm: Farm) -> None:
        self.peer = Peer(farm)

    def connectionMade(self) -> None:
        # Twisted tells its producer when the write buffer fills.
        self.transport.registerProducer(self, True)
        self.peer.connection_made(_TwistedTransport(self.transport))

    def dataReceived(self, data: bytes) -> None:
        self.peer.data_received(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.peer.connection_lost(None)

    def pauseProducing(self) -> None:
        self.peer.pause_writing()

    def resumeProducing(self) -> None:
        self.peer.resume_writing()

    def stopProducing(self) -> None:
        pass


def serveTwisted(args: argparse.Namespace) -> None:
    reactor: Any = installReactor(args.twisted_reactor)
    farm = Farm(args, TwistedLoop(reactor))
    factory = Factory.forProtocol(lambda: TwistedPeer(farm))
    reactor.listenTCP(args.port, factory, backlog=1024, interface="127.0.0.1")
    reactor.run()


async def serve(args: argparse.Namespace) -> None:
    farm = Farm(args, asyncio.get_running_loop())
    server = await asyncio.get_running_loop().create_server(
        lambda: Peer(farm), "127.0.0.1", args.port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("--max-frame", type=int, default=1024 * 1024)
    p.add_argument("--max-job-bytes", type=int, default=50 * 1024 * 1024)
    p.add_argument("--early-upload", type=int, default=64 * 1024)
    p.add_argument("--ping-interval", type=float, default=10.0)
    p.add_argument("--queue-timeout", type=float, default=5.0)
    p.add_argument("--job-timeout", type=float, default=60.0)
    p.add_argument("--reactor", choices=["asyncio", "twisted"], default="asyncio")
    p.add_argument("--twisted-reactor", default="privox", metavar="NAME",
                   help="which of Twisted's reactors (twistd --reactor's names) [privox]")
    args = p.parse_args()
    if args.reactor == "twisted":
        serveTwisted(args)
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
