"""
Reliability under load and faults, on real sockets and real processes (issue
9): many consumers and producers at once with every answer checked against
its own request; a node process SIGKILLed mid-job; farm processes killed and
restarted while the API's farm exchange is serving; a node that accepts jobs
and never answers; a node that answers garbage; and a consumer that stops
reading while a large result streams (backpressure keeps the farm's memory
flat).

Nothing sleeps: waits are L{deferLater} polls bounded by timeouts, or
process output. C{PRIVOX_SOAK_SECONDS} (set by C{soak/run.py}) scales the
load run and the failover stream up; the default keeps this module quick.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.trial.unittest import TestCase

from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.consumer import JobFailed, connectConsumer
from privox.farm.sessions import ProducerSession
from privox.messages import ErrorCode
from privox.engines.digest import digestOf, toneFor
from privox.node.echo import DigestHandler
from privox.node.worker import Answer, Collected
from tests.apifarms import DroppingEngine, HangingEngine, startFarm
from tests.loopbackfarm import StallingUpload
from tests.support import until
from tests.test_e2e import CONFIG, ENV, REPO, TWISTD, WatchedProcess, freePorts

SOAK = float(os.environ.get("PRIVOX_SOAK_SECONDS", "0") or 0)
LOAD_SECONDS = SOAK * 0.4 if SOAK else 3.0
LOAD_CONSUMERS = 64 if SOAK else 16  # half STT, half TTS
LOAD_PRODUCERS = 16 if SOAK else 8  # per service
FAILOVER_CYCLES = max(1, int(SOAK / 30)) if SOAK else 1
# Soak: seconds each phase of a failover cycle (A down, A back) keeps streaming.
FAILOVER_PHASE_S = SOAK * 0.4 / FAILOVER_CYCLES / 2 if SOAK else 0.0
STT_MODEL = "digest:x"


def figures(line: str) -> None:
    """
    Print a figure line where the person running the tests sees it.
    """
    sys.__stdout__.write(f"\n    [figures] {line}\n")
    sys.__stdout__.flush()



def transcriptOf(audio: bytes) -> str:
    return f"sha256:{digestOf(audio)} bytes:{len(audio)}"


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def producerSessions(farm: Any) -> int:
    return sum(isinstance(c.session, ProducerSession) for c in farm.connections)


class ProcessTestCase(TestCase):
    """
    Starts C{twistd privox-farm} and C{twistd privox-node} processes and
    SIGKILLs whatever is left of them on cleanup.
    """

    timeout = 60 + 2 * SOAK

    def spawn(self, name: str, *args: str) -> WatchedProcess:
        process = WatchedProcess(name)
        argv = [sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", *args]
        reactor.spawnProcess(process, sys.executable, argv, env=ENV, path=REPO)
        self.addCleanup(self.kill, process)
        return process

    def kill(self, process: WatchedProcess) -> Deferred[BaseException]:
        if process.reason is None and process.transport is not None:
            process.transport.signalProcess("KILL")
        return process.whenEnded()

    async def startFarmProcess(
        self, name: str, ports: tuple[int, int] | None = None, *extra: str
    ) -> tuple[WatchedProcess, int, int]:
        sttPort, ttsPort = ports or freePorts(2)
        farm = self.spawn(
            f"farm {name}", "privox-farm", "--config", CONFIG, "--name", name,
            "--stt-listen", f"tcp:{sttPort}:interface=127.0.0.1",
            "--tts-listen", f"tcp:{ttsPort}:interface=127.0.0.1",
            "--shutdown-grace", "1", "--stats-interval", "0", *extra,
        )
        await farm.waitFor(b"FarmFactory starting on %d\n" % sttPort)
        await farm.waitFor(b"FarmFactory starting on %d\n" % ttsPort)
        return farm, sttPort, ttsPort

    async def startNodeProcess(self, name: str, sttPort: int, slots: int = 2) -> WatchedProcess:
        node = self.spawn(
            f"node {name}", "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}",
            "--stt", STT_MODEL, "--slots", str(slots), "--key", f"node-{name}",
            "--retry-max", "0.5", "--shutdown-grace", "1",
        )
        await node.waitFor(b"serving stt through", timeout=30)
        return node


class LoadTests(TestCase):
    timeout = 60 + 2 * SOAK

    async def test_manyConsumersManyProducers(self) -> None:
        """
        16 consumers (STT and TTS) against 8 producers per service (more
        under soak) for a bounded time: every answer is the digest of its own request, nothing
        is lost, the farm counts exactly the jobs the consumers saw succeed.
        """
        farm = await startFarm(self, "load", max_job_bytes=8 * 1024 * 1024)
        for _ in range(LOAD_PRODUCERS):
            await farm.producer("stt", DigestHandler((STT_MODEL,)))
            await farm.producer("tts", DigestHandler(("tone:x",)))
        stopAt = time.monotonic() + LOAD_SECONDS
        counts = {"stt": 0, "tts": 0, "bytes": 0}

        async def sttConsumer(n: int) -> None:
            rng = random.Random(n)
            consumer = await farm.consumer("stt")
            while time.monotonic() < stopAt:
                # Distinct per request: a mixed-up answer cannot match.
                audio = n.to_bytes(2, "big") + rng.randbytes(rng.choice([16, 4096, 200_000]))
                result = await consumer.stt(STT_MODEL, audio)
                self.assertEqual(result.text, transcriptOf(audio))
                counts["stt"] += 1
                counts["bytes"] += len(audio)

        async def ttsConsumer(n: int) -> None:
            consumer = await farm.consumer("tts")
            i = 0
            while time.monotonic() < stopAt:
                text = f"consumer {n} sentence {i}"
                result = await consumer.tts("tone:x", text)
                self.assertEqual(result.data, toneFor(text))
                self.assertEqual(result.fields["text_sha256"], digestOf(text.encode()))
                counts["tts"] += 1
                i += 1

        started = time.monotonic()
        half = LOAD_CONSUMERS // 2
        runs = [Deferred.fromCoroutine(sttConsumer(n)) for n in range(half)]
        runs += [Deferred.fromCoroutine(ttsConsumer(n)) for n in range(half)]
        await DeferredList(runs, fireOnOneErrback=True, consumeErrors=True)
        for run in runs:
            await run  # re-raise an assertion from any consumer
        elapsed = time.monotonic() - started
        total = counts["stt"] + counts["tts"]
        self.assertGreater(counts["stt"], half)
        self.assertGreater(counts["tts"], half)
        # Zero lost: every job the farm took was answered and checked.
        self.assertEqual(farm.farm.counters.jobs, total)
        self.assertEqual(farm.farm.counters.succeeded, total)
        splicer = farm.farm.splicer
        spliced = f" ({splicer.relays} uploads spliced)" if splicer is not None else ""
        figures(
            f"load: {LOAD_CONSUMERS} consumers x {LOAD_PRODUCERS}+{LOAD_PRODUCERS} producers, "
            f"{elapsed:.1f} s: {total} jobs "
            f"({counts['stt']} stt, {counts['tts']} tts), {total / elapsed:.0f} jobs/s, "
            f"{counts['bytes'] / elapsed / 1e6:.1f} MB/s uploaded{spliced}, 0 lost, 0 mixed up"
        )


class NodeKilledTests(ProcessTestCase):
    async def test_nodeKilledMidJob(self) -> None:
        """
        A real node process (digest engine, two slots) is SIGKILLed while a
        job is half uploaded to it: the consumer gets producer_lost at once,
        the farm keeps serving, and the API's retry succeeds on another node.
        """
        farm = await startFarm(self, "A", queue_timeout=1.0)
        doomed = await self.startNodeProcess("doomed", farm.port("stt"))
        await until(lambda: producerSessions(farm.farm) == 2, "both slots joined", 10)

        stalled = StallingUpload("stt")
        await connectProtocol(clientFromString(reactor, farm.loopback.endpoint("stt")), stalled)
        await stalled.ready
        self.addCleanup(lambda: stalled.transport.loseConnection())
        audio = random.Random(9).randbytes(256 * 1024)
        job = stalled.stt(STT_MODEL, audio)
        await stalled.assigned.addTimeout(10, reactor)
        # The other node joins only now, so the job is surely on the doomed one.
        survivor = await self.startNodeProcess("survivor", farm.port("stt"))
        await until(lambda: producerSessions(farm.farm) == 4, "survivor joined", 10)

        killedAt = time.monotonic()
        doomed.transport.signalProcess(signal.SIGKILL)
        with self.assertRaises(JobFailed) as caught:
            await job.addTimeout(10, reactor)
        lostAfter = time.monotonic() - killedAt
        self.assertEqual(caught.exception.code, ErrorCode.PRODUCER_LOST)
        self.assertLess(lostAfter, 2.0)
        reason = await doomed.whenEnded()
        self.assertEqual(getattr(reason, "signal", None), signal.SIGKILL)
        await until(lambda: producerSessions(farm.farm) == 2, "doomed slots dropped", 10)

        # The farm keeps serving: a plain consumer, and the API through the
        # same farm, are served by the surviving node.
        consumer = await farm.consumer("stt")
        self.assertEqual((await consumer.stt(STT_MODEL, audio)).text, transcriptOf(audio))
        exchange = FarmExchange([farm.entry()], reactor, deadline=10.0, rng=random.Random(1))
        self.addCleanup(exchange.stop)
        for i in range(5):
            sample = f"after the kill {i}".encode() * 100
            answer = await exchange.transcribe(STT_MODEL, None, sample, "auto")
            self.assertEqual(answer.text, transcriptOf(sample))
        self.assertIn(b"serving stt through", survivor.output)
        figures(f"node SIGKILL mid-job: consumer told producer_lost after {lostAfter * 1000:.0f} ms")


class FarmFailoverTests(ProcessTestCase):
    async def test_farmKilledAndRestartedWhileServing(self) -> None:
        """
        Two real farm processes, each with a real node process; the API's
        farm exchange streams requests over both. Farm A is SIGKILLed
        mid-stream: every request still succeeds (failing over to B), none
        takes longer than the deadline. A restarts on the same ports and,
        once its backoff has passed, serves the exchange's requests again.
        """
        deadline = 5.0
        farmA, sttA, ttsA = await self.startFarmProcess("A", None, "--queue-timeout", "1", "--log-jobs")
        farmB, sttB, ttsB = await self.startFarmProcess("B", None, "--queue-timeout", "1", "--log-jobs")
        nodeA = await self.startNodeProcess("a", sttA)
        await self.startNodeProcess("b", sttB)
        entries = [
            FarmEntry("A", f"tcp:host=127.0.0.1:port={sttA}", f"tcp:host=127.0.0.1:port={ttsA}"),
            FarmEntry("B", f"tcp:host=127.0.0.1:port={sttB}", f"tcp:host=127.0.0.1:port={ttsB}"),
        ]
        exchange = FarmExchange(
            entries, reactor, deadline=deadline, attempts=2, rng=random.Random(7),
            downBackoff=(0.5, 1.0), connectTimeout=2.0,
        )
        self.addCleanup(exchange.stop)
        state = {"ok": 0, "stop": False, "slowest": 0.0, "inFlight": 0}
        errors: list[BaseException] = []

        async def worker(n: int) -> None:
            rng = random.Random(100 + n)
            i = 0
            while not state["stop"]:
                audio = f"worker {n} request {i} ".encode() + rng.randbytes(rng.randrange(1, 50_000))
                i += 1
                started = time.monotonic()
                try:
                    answer = await exchange.transcribe(STT_MODEL, None, audio, "auto")
                    self.assertEqual(answer.text, transcriptOf(audio))
                    state["ok"] += 1
                except BaseException as e:
                    errors.append(e)
                state["slowest"] = max(state["slowest"], time.monotonic() - started)

        workers = [Deferred.fromCoroutine(worker(n)) for n in range(4)]
        try:
            await until(
                lambda: state["ok"] >= 40 or bool(errors),
                "40 requests before the kill",
                20,
            )
            self.assertIn(b" ok in ", farmA.output)  # both farms were serving
            self.assertIn(b" ok in ", farmB.output)
            for cycle in range(FAILOVER_CYCLES):
                self.assertEqual(errors, [])
                # Kill A while the exchange has a job in flight on it.
                busyOnA = exchange.farms[0].pools["stt"].busy
                await until(lambda: len(busyOnA) > 0, "a request in flight on A", 20)
                state["inFlight"] += len(busyOnA)
                farmA.transport.signalProcess(signal.SIGKILL)
                reason = await farmA.whenEnded()
                self.assertEqual(getattr(reason, "signal", None), signal.SIGKILL)
                before = state["ok"]
                phaseEnd = time.monotonic() + FAILOVER_PHASE_S
                await until(
                    lambda: (state["ok"] >= before + 40 and time.monotonic() >= phaseEnd) or bool(errors),
                    "40 requests while A is down",
                    20 + FAILOVER_PHASE_S,
                )
                self.assertEqual(errors, [])
                # Restart A on the same ports; its node dials back in.
                served = nodeA.output.count(b"serving stt through")
                restartedAt = time.monotonic()
                farmA, _, _ = await self.startFarmProcess("A", (sttA, ttsA), "--queue-timeout", "1", "--log-jobs")
                await until(
                    lambda: nodeA.output.count(b"serving stt through") >= served + 2,
                    "node a back on the restarted farm",
                    20,
                )
                # The restarted farm logs the jobs the exchange sends it.
                await until(
                    lambda: b" ok in " in farmA.output or bool(errors),
                    "the restarted farm used again",
                    20,
                )
                usedAfter = time.monotonic() - restartedAt
                self.assertEqual(errors, [])
                self.assertTrue(exchange.health()["farms"][0]["up"])
                phaseEnd = time.monotonic() + FAILOVER_PHASE_S
                await until(
                    lambda: time.monotonic() >= phaseEnd or bool(errors),
                    "streaming with A back",
                    1 + FAILOVER_PHASE_S,
                )
                self.assertEqual(errors, [])
        finally:
            state["stop"] = True
            await DeferredList(workers, consumeErrors=True)
        for run in workers:
            await run
        self.assertEqual(errors, [])
        self.assertLess(state["slowest"], deadline + 0.5)
        self.assertGreaterEqual(state["ok"], 80)
        figures(
            f"farm failover: {FAILOVER_CYCLES} SIGKILL/restart cycle(s) "
            f"({state['inFlight']} request(s) in flight on A when killed), {state['ok']} requests, "
            f"0 failed, slowest {state['slowest'] * 1000:.0f} ms (deadline {deadline:.0f} s); "
            f"restarted farm serving the API again {usedAfter:.2f} s after its restart began"
        )


class GarbageEngine(DroppingEngine):
    """
    Answers its job with garbage: bytes that are not a PVX/2 frame, or a
    RSLT whose fields are not JSON.
    """

    def __init__(self, garbage: bytes) -> None:
        super().__init__()
        self.garbage = garbage

    def start(self, job: dict[str, Any]) -> Any:
        run = HangingEngine.start(self, job)
        assert self.protocol is not None
        reactor.callLater(0, self.protocol.transport.write, self.garbage)
        return run


class MisbehavingNodeTests(TestCase):
    timeout = 30

    async def test_nodeNeverAnswers(self) -> None:
        """
        A node that accepts jobs and never answers: the consumer gets
        C{timeout} within its job's deadline; the API retries on another farm
        and succeeds, well within its own deadline.
        """
        hang = await startFarm(self, "hang", max_job_timeout=0.5)
        good = await startFarm(self, "good")
        engine = HangingEngine()
        await hang.producer("stt", engine)
        await good.producer("stt", DigestHandler())
        consumer = await hang.consumer("stt")
        started = time.monotonic()
        with self.assertRaises(JobFailed) as caught:
            await consumer.stt(STT_MODEL, b"audio", timeout_s=0.3).addTimeout(5, reactor)
        waited = time.monotonic() - started
        self.assertEqual(caught.exception.code, ErrorCode.TIMEOUT)
        self.assertGreaterEqual(waited, 0.3)
        self.assertLess(waited, 1.5)
        await until(lambda: engine.cancelled == 1, "the hung job cancelled", 5)

        exchange = FarmExchange(
            [hang.entry(), good.entry(fallback=True)], reactor, deadline=5.0, rng=random.Random(1)
        )
        self.addCleanup(exchange.stop)
        started = time.monotonic()
        answer = await exchange.transcribe(STT_MODEL, None, b"retried audio", "auto")
        took = time.monotonic() - started
        self.assertEqual(answer.text, transcriptOf(b"retried audio"))
        self.assertEqual(engine.started, 2)  # the API did try the hanging node first
        self.assertLess(took, 2.0)
        figures(
            f"hanging node: consumer timeout after {waited * 1000:.0f} ms, "
            f"API retry served in {took * 1000:.0f} ms"
        )

    async def test_nodeAnswersGarbage(self) -> None:
        """
        A node that answers garbage (not a frame; then a RSLT that is not
        JSON) is dropped, its consumer gets C{producer_lost}, and the next
        request on the same connection is served.
        """
        farm = await startFarm(self, "garbage")
        consumer = await farm.consumer("stt")
        garbage = [b"GARBAGE!0000" + os.urandom(64), b"RSLT00000009{not json"]
        for attempt, junk in enumerate(garbage):
            engine = GarbageEngine(junk)
            producer = await farm.producer("stt", engine)
            with self.assertRaises(JobFailed) as caught:
                await consumer.stt(STT_MODEL, b"audio %d" % attempt).addTimeout(5, reactor)
            self.assertEqual(caught.exception.code, ErrorCode.PRODUCER_LOST)
            await producer.disconnected.addTimeout(5, reactor)
            self.assertEqual(engine.started, 1)
            await until(lambda: producerSessions(farm.farm) == 0, "the garbage node dropped", 5)
        await farm.producer("stt", DigestHandler())
        answer = await consumer.stt(STT_MODEL, b"good audio")
        self.assertEqual(answer.text, transcriptOf(b"good audio"))
        self.assertEqual(farm.farm.counters.succeeded, 1)


BIG = 48 * 1024 * 1024


class BigEngine:
    """
    TTS: "big" is answered with BIG bytes; anything else with a short tone.
    """

    models = ("*",)
    languages = ()

    def __init__(self) -> None:
        self.big = random.Random(42).randbytes(BIG)

    def start(self, job: dict[str, Any]) -> Collected:
        text = job.get("text")
        data = self.big if text == "big" else toneFor(str(text))
        return Collected(
            lambda _: Answer({"content_type": "audio/wav", "model": job["model"]}, data)
        )


class StallTests(ProcessTestCase):
    async def test_consumerStopsReading(self) -> None:
        """
        A consumer stops reading while a producer streams a 48 MiB TTS result
        through a real farm process: the farm stops reading the producer
        (backpressure), its RSS stays flat, and once the consumer reads again
        the result arrives intact.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint

        from privox.node.worker import ProducerProtocol

        farm, sttPort, ttsPort = await self.startFarmProcess(
            "stall", None, "--max-job-bytes", str(2 * BIG), "--max-job-timeout", "60"
        )
        engine = BigEngine()
        producer = ProducerProtocol("tts", "producer-key", engine)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ttsPort), producer)
        await producer.ready
        self.addCleanup(lambda: producer.disconnected)
        self.addCleanup(producer.transport.loseConnection)
        consumer = await connectConsumer(reactor, f"tcp:host=127.0.0.1:port={ttsPort}", "tts")
        self.addCleanup(lambda: consumer.disconnected)
        self.addCleanup(consumer.transport.loseConnection)
        for i in range(20):  # warm the farm up before the baseline
            result = await consumer.tts("tone:x", f"warm up {i}")
            self.assertEqual(result.data, toneFor(f"warm up {i}"))
        pid = farm.transport.pid
        baseline = rssKiB(pid)

        consumer.transport.pauseProducing()
        job = consumer.tts("tone:x", "big")

        def unsent() -> int:
            t = producer.transport
            return len(t.dataBuffer) - t.offset + t._tempDataLen

        history: list[int] = []

        def stalled() -> bool:
            history.append(unsent())
            recent = history[-20:]
            return len(recent) == 20 and recent[0] == recent[-1] and recent[0] > 0

        await until(stalled, "the producer's output stalled", 20)
        # The farm stopped reading the producer: most of the result is still
        # in the producer's own buffer, not in the farm.
        held = unsent()
        self.assertGreater(held, BIG // 2)
        self.assertIn(producer.transport, reactor.getWriters())
        grown = rssKiB(pid) - baseline
        # Without backpressure the farm would hold the ~40 MiB the producer
        # still has; with it, only its relay buffers (a few 1 MiB frames).
        self.assertLess(grown, BIG // 3 // 1024, f"farm RSS grew {grown} KiB, result held back")
        self.assertFalse(job.called)

        consumer.transport.resumeProducing()
        result = await job.addTimeout(30, reactor)
        self.assertEqual(len(result.data), BIG)
        self.assertEqual(hashlib.sha256(result.data).digest(), hashlib.sha256(engine.big).digest())
        after = rssKiB(pid) - baseline
        figures(
            f"stall: {BIG // 2**20} MiB result held back, {held / 2**20:.1f} MiB still at the producer; "
            f"farm RSS +{grown / 1024:.1f} MiB while stalled, +{after / 1024:.1f} MiB after delivery"
        )
