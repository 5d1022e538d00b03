"""
The contribution ledger (L{privox.farm.ledger}): the record of each finished
job, the JSON-lines sink, and the HTTP sink's spool, batches, retries and
replay, against a fake API ledger that stores records by job id.
"""

from __future__ import annotations

import json
import threading
import os
from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher, formatEvent
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from privox.farm import ledger as L
from privox.farm.service import FarmService, Options
from privox.keys import accountId
from tests.farmharness import FarmHarness

FARM_KEY = "farm-secret-key-0123"
URL = "https://api.example/v1/ledger"


class RecordingSink:
    description = "recording"
    durable = False

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, transaction: dict[str, Any]) -> Deferred[None]:
        self.records.append(transaction)
        return succeed(None)

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


class FakeLedgerAPI(Resource):
    """
    The API's /v1/ledger: stores records by job id (idempotent), or answers
    503 while C{down}, or 400 to a batch holding a record with C{"bad"}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.stored: dict[str, dict[str, Any]] = {}
        self.received = 0  # records in accepted batches, duplicates included
        self.posts = 0
        self.headers: list[tuple[Any, Any]] = []
        self.onStored: Callable[[], None] = lambda: None

    def render_POST(self, request: Request) -> bytes:
        self.posts += 1
        self.headers.append(
            (
                request.requestHeaders.getRawHeaders(b"authorization"),
                request.requestHeaders.getRawHeaders(b"content-type"),
            )
        )
        if self.down:
            request.setResponseCode(503)
            return b"down"
        if request.requestHeaders.getRawHeaders(b"authorization") != [
            b"Bearer " + FARM_KEY.encode()
        ]:
            request.setResponseCode(401)
            return b"who?"
        batch = json.loads(request.content.read())["transactions"]
        assert len(batch) <= L.BATCH_SIZE
        if any("bad" in r for r in batch):
            request.setResponseCode(400)
            return b'{"error":"malformed"}'
        recorded = duplicates = 0
        for r in batch:
            self.received += 1
            if r["job_id"] in self.stored:
                duplicates += 1
            else:
                self.stored[r["job_id"]] = r
                recorded += 1
        self.onStored()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"recorded": recorded, "duplicates": duplicates}).encode()


def rec(jobId: str, **more: Any) -> dict[str, Any]:
    return dict(
        {
            "job_id": jobId, "farm": "f", "time": 1.0, "service": "stt", "model": "m",
            "input_bytes": 1, "output_bytes": 0, "audio_seconds": None,
            "processing_ms": 1.0, "status": "ok", "producer": None, "consumer": "c",
        },
        **more,
    )


def lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def captureLogs(testCase: SynchronousTestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class TransactionTests(SynchronousTestCase):
    """
    The farm records every finished job, with what it was and who took
    part (hashed), never content.
    """

    def setUp(self) -> None:
        self.h = FarmHarness(name="ledger-farm", queue_timeout=5.0)
        self.sink = RecordingSink()
        self.h.farm.ledger = self.sink

    def sttJob(self, size: int = 16000, **rslt: Any) -> dict[str, Any]:
        self.h.clock.advance(100)
        producer = self.h.producer(key="producer-key")
        consumer = self.h.consumer(key="consumer-key")
        consumer.send(b"JOB_", {"model": "whisper:tiny.en", "size": size})
        [(_, work)] = producer.messages()
        consumer.data(b"\x00" * size)
        self.h.clock.advance(0.25)
        producer.send(b"RSLT", dict({"id": work["id"], "text": "secret words"}, **rslt))
        [record] = self.sink.records
        return record

    def test_okSTTJob(self) -> None:
        record = self.sttJob(duration_s=0.5)
        self.assertEqual(
            record,
            {
                "job_id": record["job_id"],
                "farm": "ledger-farm",
                "time": 100.25,
                "service": "stt",
                "model": "whisper:tiny.en",
                "input_bytes": 16000,
                "output_bytes": 0,
                "audio_seconds": 0.5,
                "processing_ms": 250.0,
                "status": "ok",
                "producer": accountId("producer-key"),
                "consumer": accountId("consumer-key"),
            },
        )
        self.assertEqual(len(record["job_id"]), 16)
        text = json.dumps(record)
        for secret in ("producer-key", "consumer-key", "secret words"):
            self.assertNotIn(secret, text)

    def test_durationCapped(self) -> None:
        """
        A producer cannot claim more than a second per 1000 bytes.
        """
        self.assertEqual(self.sttJob(duration_s=1e9)["audio_seconds"], 16.0)

    def test_durationChecked(self) -> None:
        for bad in ("5", True, -1, None, [1]):
            self.sink.records.clear()
            self.h = FarmHarness(name="ledger-farm")
            self.h.farm.ledger = self.sink
            rslt = {} if bad is None else {"duration_s": bad}
            self.assertIsNone(self.sttJob(**rslt)["audio_seconds"], bad)

    def test_ttsJob(self) -> None:
        producer = self.h.producer(service="tts", key="p")
        consumer = self.h.consumer(service="tts", key="c")
        consumer.send(b"JOB_", {"model": "piper", "text": "hello", "size": 0})
        [(_, work)] = producer.messages()
        producer.send(
            b"RSLT", {"id": work["id"], "content_type": "audio/wav", "size": 3000, "duration_s": 1.5}
        )
        producer.data(b"\x00" * 3000)
        [record] = self.sink.records
        self.assertEqual(
            (record["service"], record["input_bytes"], record["output_bytes"],
             record["audio_seconds"], record["status"]),
            ("tts", 0, 3000, 1.5, "ok"),
        )

    def test_failedJob(self) -> None:
        producer = self.h.producer(key="producer-key")
        consumer = self.h.consumer(key="consumer-key")
        consumer.send(b"JOB_", {"model": "whisper:tiny.en", "size": 4})
        [(_, work)] = producer.messages()
        consumer.data(b"abcd")
        producer.send(
            b"FAIL", {"id": work["id"], "error": "engine_error", "message": "no", "duration_s": 3}
        )
        [record] = self.sink.records
        self.assertEqual(record["status"], "engine_error")
        self.assertEqual(record["producer"], accountId("producer-key"))
        self.assertEqual(record["consumer"], accountId("consumer-key"))
        self.assertIsNone(record["audio_seconds"])

    def test_queuedExpiredJob(self) -> None:
        producer = self.h.producer(key="producer-key")
        busy = self.h.consumer(key="first")
        busy.send(b"JOB_", {"model": "m", "size": 4})
        producer.messages()
        waiting = self.h.consumer(key="second")
        waiting.send(b"JOB_", {"model": "m", "size": 4})
        self.h.clock.advance(5.0)
        [record] = self.sink.records
        self.assertEqual(record["status"], "no_producer")
        self.assertIsNone(record["producer"])
        self.assertEqual(record["consumer"], accountId("second"))
        self.assertEqual(record["processing_ms"], 5000.0)

    def test_pvx1Consumer(self) -> None:
        """
        PVX/1 sessions carry account ids too.
        """
        producer = self.h.producer(key="producer-key")
        peer = self.h.peer()
        peer.raw(b"s" + b"k" * 16 + b"model=tiny&len=00000004")
        self.h.clock.advance(1)
        [(_, work)] = producer.messages()
        producer.send(b"FAIL", {"id": work["id"], "error": "engine_error", "message": ""})
        [record] = self.sink.records
        self.assertEqual(record["consumer"], accountId("k" * 16))
        self.assertEqual(record["producer"], accountId("producer-key"))

    def test_noLedger(self) -> None:
        """
        Without a sink nothing is recorded (and nothing fails).
        """
        self.h.farm.ledger = None
        producer = self.h.producer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "m", "size": 1})
        [(_, work)] = producer.messages()
        producer.send(b"RSLT", {"id": work["id"], "text": ""})
        self.assertEqual(self.sink.records, [])
        self.assertEqual(self.h.farm.counters.succeeded, 1)


class CountingRunner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f.__name__)
        return L.runInline(f, *args)


class JsonLinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = self.mktemp()
        self.runner = CountingRunner()
        self.sink = L.JsonLinesLedger(self.path, self.clock, self.runner)

    def test_oneLinePerJob(self) -> None:
        """
        Each job is one line, written before its consumer gets the answer;
        jobs that end together share one write.
        """
        h = FarmHarness()
        h.farm.ledger = self.sink
        producers = [h.producer() for _ in range(3)]
        consumers = [h.consumer() for _ in range(3)]
        for consumer in consumers:
            consumer.send(b"JOB_", {"model": "m", "size": 1})
            consumer.messages()
            consumer.data(b"x")
        for producer in producers:
            [(_, work), _] = producer.messages()
            producer.send(b"RSLT", {"id": work["id"], "text": "t"})
        self.assertEqual(lines(self.path), [])
        self.assertEqual([c.messages() for c in consumers], [[], [], []])
        self.clock.advance(L.FLUSH_INTERVAL)
        written = lines(self.path)
        self.assertEqual([r["status"] for r in written], ["ok"] * 3)
        self.assertEqual(len({r["job_id"] for r in written}), 3)
        self.assertEqual(self.runner.calls, ["_appendLines"])
        self.assertEqual([[v for v, _ in c.messages()] for c in consumers], [["RSLT"]] * 3)

    def test_failingDiskHoldsNoAnswer(self) -> None:
        """
        A record's Deferred fires once its write is done, or has failed.
        While writes fail, later records fire at once (answers do not wait
        on a broken disk); they are written when it works again.
        """
        broken = [True]

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if broken[0]:
                return fail(OSError(28, "No space left on device"))
            return L.runInline(f, *args)

        sink = L.JsonLinesLedger(self.path, self.clock, runner)
        first = sink.record(rec("a"))
        self.assertNoResult(first)
        self.clock.advance(L.FLUSH_INTERVAL)
        self.successResultOf(first)
        self.successResultOf(sink.record(rec("b")))
        broken[0] = False
        self.clock.advance(L.WRITE_RETRY)
        self.assertEqual([r["job_id"] for r in lines(self.path)], ["a", "b"])
        held = sink.record(rec("c"))
        self.assertNoResult(held)
        self.clock.advance(L.FLUSH_INTERVAL)
        self.successResultOf(held)
        self.flushLoggedErrors()

    def test_appends(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b'{"job_id":"old"}\n')
        self.sink.record(rec("a"))
        self.clock.advance(1)
        self.sink.record(rec("b"))
        self.successResultOf(self.sink.stop())
        self.assertEqual([r["job_id"] for r in lines(self.path)], ["old", "a", "b"])

    def test_stopWritesPending(self) -> None:
        self.sink.record(rec("a"))
        self.successResultOf(self.sink.stop())
        self.assertEqual([r["job_id"] for r in lines(self.path)], ["a"])

    def test_unfinishedLineEnded(self) -> None:
        """
        A line a crash left unfinished is ended, so the next record stays
        readable.
        """
        with open(self.path, "wb") as f:
            f.write(b'{"job_id":"cut sh')
        self.sink.record(rec("a"))
        self.successResultOf(self.sink.stop())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read().splitlines()[1], L.encode(rec("a")).strip())


class HTTPLedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.api = FakeLedgerAPI()
        self.spool = self.mktemp()
        self.logs = captureLogs(self)

    def sink(self, runner: Any = L.runInline, **kw: Any) -> L.HTTPLedger:
        sink = L.HTTPLedger(URL, FARM_KEY, self.spool, self.clock, runner, StubTreq(self.api), **kw)
        sink.start()
        return sink

    def test_delivers(self) -> None:
        sink = self.sink()
        for i in range(3):
            sink.record(rec(f"j{i}"))
        self.assertEqual(self.api.posts, 0)
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(sorted(self.api.stored), ["j0", "j1", "j2"])
        self.assertEqual(self.api.posts, 1)
        self.assertEqual(
            self.api.headers[0],
            ([b"Bearer " + FARM_KEY.encode()], [b"application/json"]),
        )
        self.assertEqual(self.api.stored["j1"], rec("j1"))
        # Everything sent: the spool is emptied, the offset reset.
        self.assertEqual(size(self.spool), 0)
        with open(self.spool + ".sent") as f:
            self.assertEqual(f.read().strip(), "0")
        self.successResultOf(sink.stop())

    def test_batches(self) -> None:
        sink = self.sink()
        for i in range(1200):
            sink.record(rec(f"j{i}"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(self.api.posts, 3)
        self.assertEqual(len(self.api.stored), 1200)
        self.assertEqual(self.api.received, 1200)
        self.assertEqual(size(self.spool), 0)

    def test_outageThenReplay(self) -> None:
        """
        While the API is down every record is spooled, and attempts back off
        from 1 s doubling to 60 s; once it is back all are delivered exactly
        once and the spool is emptied.
        """
        self.api.down = True
        sink = self.sink()
        for i in range(20):
            sink.record(rec(f"j{i}"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(len(lines(self.spool)), 20)
        posts = self.api.posts
        self.assertGreaterEqual(posts, 1)
        delays = []
        for _ in range(8):
            before = self.api.posts
            waited = 0.0
            while self.api.posts == before:
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays[:6], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
        self.assertEqual(delays[6:], [60.0, 60.0])
        self.assertEqual(self.api.stored, {})
        self.assertEqual(len(lines(self.spool)), 20)
        warnings = [e for e in self.logs if "ledger: sending" in e.get("log_format", "")]
        self.assertGreaterEqual(len(warnings), 9)
        for event in self.logs:
            self.assertNotIn(FARM_KEY, formatEvent(event))
            self.assertNotIn(FARM_KEY, repr(event))

        self.api.down = False
        self.clock.advance(60)
        self.assertEqual(sorted(self.api.stored), sorted(f"j{i}" for i in range(20)))
        self.assertEqual(self.api.received, 20)
        self.assertEqual(size(self.spool), 0)
        # Back to quick delivery.
        sink.record(rec("later"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertIn("later", self.api.stored)
        self.assertEqual(self.api.received, 21)
        self.successResultOf(sink.stop())

    def test_restartResends(self) -> None:
        """
        Records a stopped farm left unsent are sent by the next one on the
        same spool; stopping does not wait for the API.
        """
        self.api.down = True
        first = self.sink()
        for i in range(5):
            first.record(rec(f"j{i}"))
        self.clock.advance(L.FLUSH_INTERVAL)
        first.record(rec("last"))  # not yet flushed: stop writes it
        self.successResultOf(first.stop())
        self.assertEqual(len(lines(self.spool)), 6)
        self.assertEqual(self.api.stored, {})
        self.clock.advance(120)  # no retry after stop
        posts = self.api.posts

        self.api.down = False
        second = self.sink()
        self.assertEqual(self.api.posts, posts + 1)
        self.assertEqual(len(self.api.stored), 6)
        self.assertEqual(self.api.received, 6)
        self.assertEqual(size(self.spool), 0)
        self.successResultOf(second.stop())

    def test_partlySentBeforeRestart(self) -> None:
        """
        Only what is past the confirmed offset is re-sent.
        """
        first = self.sink(batchSize=2)
        self.api.onStored = lambda: setattr(self.api, "down", True)
        for i in range(5):
            first.record(rec(f"j{i}"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(sorted(self.api.stored), ["j0", "j1"])
        self.successResultOf(first.stop())
        self.api.down = False
        self.api.onStored = lambda: None
        second = self.sink(batchSize=2)
        self.assertEqual(len(self.api.stored), 5)
        self.assertEqual(self.api.received, 5)
        self.successResultOf(second.stop())

    def test_crashBetweenPostAndOffset(self) -> None:
        """
        A farm that dies after the API stored a batch but before it noted so
        sends the batch again on restart: harmless, the API is idempotent.
        """
        crashed = []

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if crashed:
                return Deferred()  # the process is gone: nothing more happens
            return L.runInline(f, *args)

        first = self.sink(runner)
        self.api.onStored = lambda: crashed.append(True)
        for i in range(4):
            first.record(rec(f"j{i}"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(self.api.received, 4)
        self.assertFalse(os.path.exists(self.spool + ".sent"))

        self.api.onStored = lambda: None
        second = self.sink()
        self.assertEqual(len(self.api.stored), 4)  # distinct
        self.assertEqual(self.api.received, 8)  # total, duplicates included
        self.assertEqual(size(self.spool), 0)
        self.successResultOf(second.stop())

    def test_crashBetweenTruncateAndOffset(self) -> None:
        """
        An offset past the spool's end (a crash after truncating the spool,
        before resetting the offset) reads as 0.
        """
        with open(self.spool + ".sent", "w") as f:
            f.write("999\n")
        with open(self.spool, "wb") as f:
            f.write(L.encode(rec("new")))
        self.sink()
        self.assertEqual(list(self.api.stored), ["new"])

    def test_malformedBatchRejected(self) -> None:
        """
        A batch the API calls malformed (400) goes to SPOOL.rejected, and
        the ledger moves on; it is not retried.
        """
        sink = self.sink()
        sink.record(rec("a", bad=True))
        sink.record(rec("b"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual([r["job_id"] for r in lines(self.spool + ".rejected")], ["a", "b"])
        self.assertEqual(self.api.stored, {})
        self.assertEqual(size(self.spool), 0)
        posts = self.api.posts
        self.clock.advance(300)
        self.assertEqual(self.api.posts, posts)
        sink.record(rec("c"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(list(self.api.stored), ["c"])
        self.successResultOf(sink.stop())

    def test_unauthorizedRetried(self) -> None:
        sink = L.HTTPLedger(URL, "wrong-key", self.spool, self.clock, L.runInline, StubTreq(self.api))
        sink.start()
        sink.record(rec("a"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(self.api.stored, {})
        self.assertEqual(len(lines(self.spool)), 1)
        self.assertEqual(lines(self.spool + ".rejected"), [])
        self.successResultOf(sink.stop())

    def test_timeout(self) -> None:
        """
        A POST unanswered for 30 s counts as a failure and is retried.
        """
        hanging: list[Request] = []
        self.api.render_POST = lambda request: (hanging.append(request), 1)[1]  # NOT_DONE_YET
        sink = self.sink()
        sink.record(rec("a"))
        self.clock.advance(L.FLUSH_INTERVAL)
        self.assertEqual(len(hanging), 1)
        self.clock.advance(L.POST_TIMEOUT)
        self.clock.advance(L.MIN_BACKOFF)
        self.assertEqual(len(hanging), 2)
        self.assertTrue(
            any("ledger: sending" in e.get("log_format", "") for e in self.logs)
        )
        self.successResultOf(sink.stop())

    def test_farmStopSpoolsRecords(self) -> None:
        """
        Stopping the farm's service writes the records of every job it
        ended (queued ones fail with shutting_down) to the spool before the
        stop completes, with the API down.
        """
        self.api.down = True
        h = FarmHarness()
        sink = L.HTTPLedger(URL, FARM_KEY, self.spool, h.clock, L.runInline, StubTreq(self.api))
        h.farm.ledger = sink
        service = FarmService(h.farm, h.clock)
        service.startService()
        producer = h.producer()
        busy = h.consumer()
        busy.send(b"JOB_", {"model": "m", "size": 1})
        [(_, work)] = producer.messages()
        busy.messages()
        waiting = h.consumer()
        waiting.send(b"JOB_", {"model": "m", "size": 1})
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual([r["status"] for r in lines(self.spool)], [])
        busy.data(b"x")
        producer.send(b"RSLT", {"id": work["id"], "text": ""})
        h.clock.advance(L.FLUSH_INTERVAL)
        self.successResultOf(stopped)
        self.assertEqual(
            sorted(r["status"] for r in lines(self.spool)), ["ok", "shutting_down"]
        )
        self.assertEqual(self.api.stored, {})


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_httpLedgerNeedsKey(self) -> None:
        e = self.assertRaises(usage.UsageError, self.parse, "--ledger", URL)
        self.assertIn("--api-key", str(e))
        settings = self.parse("--ledger", URL, "--api-key", FARM_KEY).settings
        self.assertEqual((settings.ledger, settings.api_key), (URL, FARM_KEY))
        self.assertNotIn(FARM_KEY, repr(settings))

    def test_defaults(self) -> None:
        s = self.parse().settings
        self.assertEqual(
            (s.ledger, s.ledger_spool, s.api_key), ("exchange", "privox-farm-ledger.spool", "")
        )

    def test_sinks(self) -> None:
        s = self.parse("--ledger", URL, "--api-key", FARM_KEY).settings
        self.assertIsInstance(L.ledgerFromSettings(s, Clock(), L.runInline), L.HTTPLedger)
        s = self.parse("--ledger", "/tmp/x.jsonl").settings
        self.assertIsInstance(L.ledgerFromSettings(s, Clock(), L.runInline), L.JsonLinesLedger)
        s = self.parse().settings
        self.assertIsInstance(L.ledgerFromSettings(s, Clock(), L.runInline), L.NoLedger)
        s = self.parse("--ledger", "none", "--exchange", "https://api.example.org/",
                       "--api-key", FARM_KEY, "--public", "tcp:host=farm.example.org:port=1 none").settings
        self.assertIsInstance(L.ledgerFromSettings(s, Clock(), L.runInline), L.NoLedger)

    def test_exchangesLedger(self) -> None:
        """
        By default a farm that joins an exchange posts its ledger there,
        so the nodes it serves earn their credit; one that joins none keeps
        no ledger.
        """
        s = self.parse("--exchange", "https://api.example.org/", "--api-key", FARM_KEY,
                       "--public", "tcp:host=farm.example.org:port=1 none").settings
        self.assertEqual(L.ledgerTarget(s), "https://api.example.org/v1/ledger")
        sink = L.ledgerFromSettings(s, Clock(), L.runInline)
        self.assertIsInstance(sink, L.HTTPLedger)
        self.assertEqual(L.ledgerTarget(self.parse().settings), "none")


class ThreadedWriteTests(TestCase):
    """
    The file writes really run in a thread pool.
    """

    async def test_jsonLinesInThreadPool(self) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=2, name="ledger-test")
        pool.start()
        self.addCleanup(pool.stop)
        threads: list[str] = []

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            def inThread() -> Any:
                threads.append(threading.current_thread().name)
                return f(*args)

            return deferToThreadPool(reactor, pool, inThread)

        path = self.mktemp()
        sink = L.JsonLinesLedger(path, reactor, runner)
        for i in range(50):
            sink.record(rec(f"j{i}"))

        await sink.stop()
        self.assertEqual([r["job_id"] for r in lines(path)], [f"j{i}" for i in range(50)])
        self.assertTrue(threads)
        self.assertNotIn(threading.current_thread().name, threads)
