"""
Observability: the Prometheus series of the API, the farm and nodes, the
status page and C{privox status}, and blurred usage figures in log lines.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import usage as twusage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api import service as apiService
from privox.api.farmlist import FarmEntry
from privox.api.farmstatus import RemoteStatus, cleanStatus
from privox.api.service import UNSERVED_CHECK_AFTER, UnservedModels
from privox.cli import statusTable
from privox.daemon import ListenService
from privox.config import resolve
from privox.farm.connection import FarmFactory
from privox.farm.settings import FarmSettings
from privox.farm.service import Options as FarmOptions
from privox.farm.service import makeService as makeFarmService
from privox.farm.splice import Splicer
from privox.local import LocalExchange, LocalSettings
from privox.farm.observe import farmStatus, instrumentFarm
from privox.logs import blurBytes, blurMs, logFigures
from privox.metrics import OTHER, CollectorRegistry, metricsSite, render
from tests.farmharness import FarmHarness
from tests.test_api_app import KEY, MODELS, WAV, APITestCase

def client() -> HTTPClient:
    """
    treq without persistent connections, so tests leave no sockets behind.
    """
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


treq = client()

STT_JOB = {"model": "whisper:tiny.en", "language": "en", "format": "wav", "size": 10}


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a Prometheus text exposition: (name, sorted labels) ->
    value.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def labelValues(text: bytes | str, name: str, label: str) -> set[str]:
    return {
        dict(labels)[label]
        for (sampleName, labels) in samples(text)
        if sampleName == name and label in dict(labels)
    }


# How many of privox-local's producers seal.
SEALING_LOCAL = "1"


class BlurTests(SynchronousTestCase):
    def test_bytes(self) -> None:
        """
        Sizes keep two significant figures; small ones stay as they are.
        """
        for exact, blurred in [
            (0, 0), (7, 7), (99, 99), (100, 100), (123, 120), (125, 130), (4321, 4300),
            (99_999, 100_000), (123_456, 120_000), (52_428_800, 52_000_000),
        ]:
            self.assertEqual(blurBytes(exact), blurred, exact)

    def test_ms(self) -> None:
        for exact, blurred in [(0, 0), (49.9, 0), (50, 100), (149, 100), (150, 200), (1234.5, 1200)]:
            self.assertEqual(blurMs(exact), blurred, exact)

    def test_logFigures(self) -> None:
        self.assertEqual(
            logFigures(False, ms=1234.4, bytes_in=123_456), {"ms": 1234, "bytes_in": 123_456}
        )
        self.assertEqual(
            logFigures(True, ms=1234.4, bytes_in=123_456), {"ms": 1200, "bytes_in": 120_000}
        )


class SwitchTests(SynchronousTestCase):
    """
    C{blur-usage}: a boolean setting, a switch on the command line.
    """

    def test_resolve(self) -> None:
        self.assertFalse(resolve(FarmSettings, {}, {}).blur_usage)
        self.assertTrue(resolve(FarmSettings, {"blur-usage": True}, {}).blur_usage)
        for word, value in [("yes", True), ("true", True), ("1", True), ("no", False), ("0", False)]:
            self.assertEqual(resolve(FarmSettings, {}, {"blur_usage": word}).blur_usage, value)
        for bad in ("maybe", 2, 1.0):
            self.assertRaises(twusage.UsageError, resolve, FarmSettings, {"blur-usage": bad}, {})
        e = self.assertRaises(twusage.UsageError, resolve, FarmSettings, {}, {"blur_usage": "x"})
        self.assertIn("blur-usage on the command line: expected true or false", str(e))

    def test_switch(self) -> None:
        options = FarmOptions()
        options.parseOptions([])
        self.assertFalse(options.settings.blur_usage)
        options = FarmOptions()
        options.parseOptions(["--blur-usage"])
        self.assertTrue(options.settings.blur_usage)
        path = FilePath(self.mktemp())
        path.setContent(b"blur-usage = true\n")
        options = FarmOptions()
        options.parseOptions(["--config", path.path])
        self.assertTrue(options.settings.blur_usage)

    def test_farmLogLine(self) -> None:
        """
        The farm's per-job line carries rounded figures when blurring.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = FarmHarness(blur_usage=True, log_jobs=True)
        producer = h.producer(models=["whisper:tiny.en"])
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=1234))
        [(_, asgn)] = consumer.messages()
        producer.messages()
        h.clock.advance(0.4321)
        producer.send(b"RSLT", {"id": asgn["id"], "text": "x"})
        [line] = [e for e in events if e.get("log_format", "").startswith("job {job_id}")]
        self.assertEqual((line["ms"], line["bytes_in"]), (400, 1200))

    def test_noJobLinesByDefault(self) -> None:
        """
        Without log_jobs the farm's log says nothing about any one job.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = FarmHarness()
        producer = h.producer(models=["whisper:tiny.en"])
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=3))
        [(_, asgn)] = consumer.messages()
        consumer.data(b"abc")
        producer.messages()
        producer.send(b"RSLT", {"id": asgn["id"], "text": "x"})
        self.assertEqual(h.farm.counters.succeeded, 1)
        self.assertFalse([e for e in events if asgn["id"] in repr(e)])

    def test_farmLogLineText(self) -> None:
        """
        The per-job line reads service, model, outcome, time and sizes, and
        keeps each of them as a field of the event.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = FarmHarness(log_jobs=True)
        producer = h.producer(models=["whisper:tiny.en"])
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=3))
        [(_, asgn)] = consumer.messages()
        consumer.data(b"abc")
        producer.messages()
        h.clock.advance(0.25)
        producer.send(b"RSLT", {"id": asgn["id"], "text": "x"})
        [line] = [e for e in events if e.get("log_format", "").startswith("job {job_id}")]
        self.assertEqual(
            formatEvent(line),
            f"job {asgn['id']} stt whisper:tiny.en ok in 250 ms (3 bytes in, 0 bytes out)",
        )
        self.assertEqual(
            {k: line[k] for k in ("service", "model", "outcome", "ms", "bytes_in", "bytes_out")},
            {"service": "stt", "model": "whisper:tiny.en", "outcome": "ok",
             "ms": 250, "bytes_in": 3, "bytes_out": 0},
        )


class FarmMetricsTests(SynchronousTestCase):
    """
    The farm's series, with the in-memory harness.
    """

    def setUp(self) -> None:
        self.h = FarmHarness(queue_timeout=5)
        self.registry = CollectorRegistry()
        instrumentFarm(self.h.farm, self.registry)

    def scrape(self) -> dict[Any, float]:
        return samples(render(self.registry))

    def job(self, consumer: Any, model: str = "whisper:tiny.en") -> str:
        consumer.send(b"JOB_", dict(STT_JOB, model=model, size=1))
        [asgn] = [fields for verb, fields in consumer.messages() if verb == "ASGN"]
        consumer.data(b"x")
        return str(asgn["id"])

    def test_producersAndQueue(self) -> None:
        """
        Connected, idle and busy producers per model and the queue depth are
        read from the dispatchers at each scrape.
        """
        busy = self.h.producer(models=["whisper:tiny.en"])
        self.h.producer(models=["whisper:tiny.en", "whisper:base"])
        label = (("model", "whisper:tiny.en"), ("service", "stt"))
        self.assertEqual(self.scrape()[("privox_farm_producers_connected", label)], 2)
        self.assertEqual(self.scrape()[("privox_farm_producers_idle", label)], 2)

        consumer = self.h.consumer()
        self.job(consumer)
        self.job(self.h.consumer())
        queued = self.h.consumer()
        queued.send(b"JOB_", STT_JOB)
        seen = self.scrape()
        self.assertEqual(seen[("privox_farm_producers_connected", label)], 2)
        self.assertEqual(seen[("privox_farm_producers_idle", label)], 0)
        self.assertEqual(seen[("privox_farm_producers_busy", label)], 2)
        self.assertEqual(
            seen[("privox_farm_producers_busy", (("model", "whisper:base"), ("service", "stt")))], 1
        )
        self.assertEqual(seen[("privox_farm_queue_depth", (("service", "stt"),))], 1)
        self.assertEqual(seen[("privox_farm_queue_depth", (("service", "tts"),))], 0)
        busy.lose()
        seen = self.scrape()
        self.assertEqual(seen[("privox_farm_producers_connected", label)], 1)

    def test_sealedEarly(self) -> None:
        """
        Uploads sealed early: forwarded with their job, or dropped and sent
        again (what a busy exchange costs in upload bytes).
        """
        seal = {"certificate": "c", "key": "A", "signature": "s"}
        node = self.h.producer(models=["whisper:tiny.en"], seal=seal, earlySeal=True)
        early = dict(STT_JOB, size=1, early=True, seal={"ephemeral": "E", "for": "A"})
        first = self.h.consumer()
        first.send(b"JOB_", early)
        first.data(b"x")
        second = self.h.consumer()
        second.send(b"JOB_", early)  # the node is busy: dropped
        second.data(b"x")
        node.messages()
        seen = self.scrape()
        self.assertEqual(seen[("privox_farm_sealed_early_jobs_total", (("upload", "forwarded"),))], 1)
        self.assertEqual(seen[("privox_farm_sealed_early_jobs_total", (("upload", "dropped"),))], 1)

    def test_spliced(self) -> None:
        """
        What the farm relayed inside the kernel, when it can.
        """
        self.assertNotIn(("privox_farm_spliced_bytes_total", ()), self.scrape())
        self.h.farm.splicer = Splicer(self.h.farm.clock, 131072)
        self.h.farm.splicer.relays, self.h.farm.splicer.bytes = 3, 12_345_678
        seen = self.scrape()
        self.assertEqual(seen[("privox_farm_splice_relays_total", ())], 3)
        self.assertEqual(seen[("privox_farm_spliced_bytes_total", ())], 12_345_678)

    def test_jobsAndLatency(self) -> None:
        producer = self.h.producer(models=["whisper:tiny.en"])
        consumer = self.h.consumer()
        jobId = self.job(consumer)
        producer.messages()
        self.h.clock.advance(1.5)
        producer.send(b"RSLT", {"id": jobId, "text": "hello"})
        seen = self.scrape()
        self.assertEqual(
            seen[("privox_farm_jobs_total",
                  (("model", "whisper:tiny.en"), ("outcome", "ok"), ("service", "stt")))],
            1,
        )
        self.assertEqual(seen[("privox_farm_job_seconds_count", (("service", "stt"),))], 1)
        self.assertEqual(seen[("privox_farm_job_seconds_sum", (("service", "stt"),))], 1.5)
        self.assertEqual(
            seen[("privox_farm_job_seconds_bucket", (("le", "1.0"), ("service", "stt")))], 0
        )
        self.assertEqual(
            seen[("privox_farm_job_seconds_bucket", (("le", "2.5"), ("service", "stt")))], 1
        )

        # A failed job, counted by its outcome.
        jobId = self.job(consumer)
        producer.messages()
        producer.send(b"FAIL", {"id": jobId, "error": "engine_error", "message": "no"})
        self.assertEqual(
            self.scrape()[("privox_farm_jobs_total",
                           (("model", "whisper:tiny.en"), ("outcome", "engine_error"),
                            ("service", "stt")))],
            1,
        )

    def test_unknownModelsAreOther(self) -> None:
        """
        A producer serving any model (C{*}) takes jobs for names the
        consumer made up; they are counted as C{other}, never as new label
        values.
        """
        producer = self.h.producer(models=["*"])
        consumer = self.h.consumer()
        for n in range(5):
            jobId = self.job(consumer, model=f"made-up-{n}")
            producer.messages()
            producer.send(b"RSLT", {"id": jobId, "text": "x"})
        text = render(self.registry)
        self.assertEqual(labelValues(text, "privox_farm_jobs_total", "model"), {OTHER})
        self.assertEqual(
            labelValues(text, "privox_farm_producers_connected", "model"), {"*"}
        )
        self.assertNotIn(b"made-up", text)

    def test_advertisedFlood(self) -> None:
        """
        A producer advertising a flood of names shows at most MAX_MODELS of
        them, the rest as C{other}.
        """
        from privox.metrics import MAX_MODELS

        self.h.producer(models=[f"m{n:04d}" for n in range(MAX_MODELS + 50)])
        self.h.producer(models=["popular"])
        self.h.producer(models=["popular"])
        text = render(self.registry)
        models = labelValues(text, "privox_farm_producers_connected", "model")
        self.assertEqual(len(models), MAX_MODELS + 1)
        self.assertIn("popular", models)
        self.assertIn(OTHER, models)
        seen = samples(text)
        self.assertEqual(
            seen[("privox_farm_producers_connected", (("model", OTHER), ("service", "stt")))], 51
        )
        self.assertEqual(len(farmStatus(self.h.farm)["services"]["stt"]["models"]), MAX_MODELS + 1)

    def test_noIdentities(self) -> None:
        """
        Neither keys nor job ids appear in the series or the status.
        """
        producer = self.h.producer(models=["whisper:tiny.en"], key="producer-secret")
        consumer = self.h.consumer(key="consumer-secret")
        jobId = self.job(consumer)
        producer.messages()
        producer.send(b"RSLT", {"id": jobId, "text": "words"})
        exposed = render(self.registry) + json.dumps(farmStatus(self.h.farm)).encode()
        for secret in (b"secret", jobId.encode(), b"words"):
            self.assertNotIn(secret, exposed)

    def test_status(self) -> None:
        self.h.producer(models=["whisper:tiny.en"])
        self.h.producer("tts", models=["piper:x"])
        self.job(self.h.consumer())
        status = farmStatus(self.h.farm)
        self.assertEqual(status["name"], "privox-farm")
        self.assertEqual(status["jobs"], {"total": 1, "succeeded": 0})
        self.assertEqual(
            status["services"]["stt"],
            {"producers": 1, "queue": 0, "running": 1,
             "models": {"whisper:tiny.en": {"connected": 1, "idle": 0, "busy": 1, "sealing": 0}}},
        )
        self.assertEqual(
            status["services"]["tts"]["models"], {"piper:x": {"connected": 1, "idle": 1, "busy": 0, "sealing": 0}}
        )


class FarmEndpointTests(TestCase):
    """
    C{privox-farm --metrics-listen}: /metrics and /status over a real
    loopback socket.
    """

    async def test_scrape(self) -> None:
        options = FarmOptions()
        options.parseOptions([
            "--stt-listen", "tcp:0:interface=127.0.0.1", "--tts-listen", "none",
            "--metrics-listen", "tcp:0:interface=127.0.0.1", "--name", "metered",
        ])
        top = makeFarmService(options, reactor)
        services = list(top)
        top.startService()
        self.addCleanup(top.stopService)
        metrics = services[-1]
        port = await metrics.listening
        base = f"http://127.0.0.1:{port.getHost().port}"

        response = await treq.get(base + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        text = (await response.content()).decode()
        seen = samples(text)
        self.assertEqual(seen[("privox_farm_queue_depth", (("service", "stt"),))], 0)
        self.assertIn("privox_farm_job_seconds", text)

        response = await treq.get(base + "/status")
        self.assertEqual(response.code, 200)
        status = json.loads(await response.content())
        self.assertEqual(status["name"], "metered")
        self.assertEqual(status["services"]["stt"]["producers"], 0)

        response = await treq.get(base + "/elsewhere")
        self.assertEqual(response.code, 404)
        await response.content()

    async def test_remoteStatus(self) -> None:
        """
        The API reads a remote farm's /status from the URL its farm line
        names, and keeps the answer a few seconds.
        """
        h = FarmHarness(name="remote-farm")
        h.producer(models=["whisper:tiny.en"], key="producer-secret")
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            metricsSite(CollectorRegistry(), lambda: farmStatus(h.farm))
        )
        url = f"http://127.0.0.1:{port.getHost().port}/status"
        self.addCleanup(port.stopListening)
        farms = [
            FarmEntry.parse(f"far tcp:host=127.0.0.1:port=1 none status={url}"),
            FarmEntry.parse("near tcp:host=127.0.0.1:port=2 none"),
        ]
        self.assertEqual(farms[0].status, url)
        remote = RemoteStatus(farms, reactor, cacheSeconds=60)
        self.assertEqual(list(remote.urls), ["far"])
        loads = await remote()
        self.assertEqual(list(loads), ["far"])
        self.assertEqual(loads["far"]["name"], "remote-farm")
        self.assertEqual(
            loads["far"]["services"]["stt"]["models"],
            {"whisper:tiny.en": {"connected": 1, "idle": 1, "busy": 0, "sealing": 0}},
        )
        # Kept a while: the farm is not asked again.
        await port.stopListening()
        self.assertEqual(await remote(), loads)
        # Unreachable: left out, no error.
        self.assertEqual(await RemoteStatus(farms, reactor)(), {})

    def test_statusOption(self) -> None:
        entry = FarmEntry.parse("a tcp:host=f:port=1 none weight=2 status=https://f.example/status")
        self.assertEqual((entry.weight, entry.status), (2.0, "https://f.example/status"))
        self.assertIsNone(FarmEntry.parse("a tcp:host=f:port=1 none").status)
        for bad in ("status=ftp://f/status", "status", "status="):
            e = self.assertRaises(ValueError, FarmEntry.parse, f"a tcp:host=f:port=1 none {bad}")
            self.assertIn("status must be an http(s) URL", str(e))

    def test_cleanStatus(self) -> None:
        """
        Only the known figures of a farm's answer are passed on.
        """
        self.assertIsNone(cleanStatus([1]))
        self.assertIsNone(cleanStatus({"services": "x"}))
        self.assertEqual(
            cleanStatus({
                "name": "f", "secret": "x", "jobs": {"total": 3, "succeeded": True},
                "services": {"stt": {"queue": -1, "producers": 2, "models": {
                    "m": {"connected": 2, "idle": "1", "busy": 1, "key": "k"}}},
                    "other": {}},
            }),
            {"name": "f", "accepting": True, "jobs": {"total": 3, "succeeded": 0},
             "services": {"stt": {"producers": 2, "queue": 0, "running": 0,
                                  "models": {"m": {"connected": 2, "idle": 0, "busy": 1, "sealing": 0}}}}},
        )

    def test_offByDefault(self) -> None:
        options = FarmOptions()
        options.parseOptions(["--stt-listen", "tcp:0:interface=127.0.0.1", "--tts-listen", "none"])
        self.assertEqual(options.settings.metrics_listen, "none")
        # One port, the STT one; no metrics site.
        ports = [s for s in makeFarmService(options, reactor) if isinstance(s, ListenService)]
        self.assertEqual([type(p.factory) for p in ports], [FarmFactory])


class ApiMetricsTests(APITestCase):
    """
    C{GET /metrics} and C{GET /status} on the API, through StubTreq.
    """

    def test_metrics(self) -> None:
        self.postMultipart("/stt", {"key": KEY}, {"file": ("a.wav", WAV)})
        self.postMultipart("/stt", {"key": "not-a-key"}, {"file": ("a.wav", WAV)})
        self.clock.advance(0)
        self.request("GET", "/nowhere")
        self.request("GET", "/no-such-route-either/" + "x" * 50)
        response, body = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(self.header(response, "content-type").startswith("text/plain; version="))
        seen = samples(body)
        self.assertEqual(
            seen[("privox_api_requests_total", (("route", "/stt"), ("status", "200")))], 1
        )
        self.assertEqual(
            seen[("privox_api_requests_total", (("route", "/stt"), ("status", "401")))], 1
        )
        self.assertEqual(seen[("privox_api_request_seconds_count", (("route", "/stt"),))], 2)
        # Routes are the app's own, not what clients asked for.
        routes = labelValues(body, "privox_api_requests_total", "route")
        self.assertEqual(routes, {"/stt"})
        self.assertNotIn(KEY.encode(), body)
        self.assertNotIn(b"not-a-key", body)

        # A scrape is counted (seen by the next one), not logged.
        _, body = self.request("GET", "/metrics")
        self.assertEqual(
            samples(body)[("privox_api_requests_total", (("route", "/metrics"), ("status", "200")))],
            1,
        )
        self.assertFalse([e for e in self.events if e.get("route") == "/metrics"])

    def test_sharedRegistry(self) -> None:
        """
        Given a registry, /metrics serves everything in it.
        """
        from privox.api.access import PolicyAccess
        from privox.api.app import PrivoxAPI
        from treq.testing import StubTreq
        from tests.test_api_app import MODELS

        registry = CollectorRegistry()
        from prometheus_client import Counter

        Counter("privox_test_things", "Things.", registry=registry).inc(3)
        api = PrivoxAPI(self.exchange, MODELS, PolicyAccess(self.keys), clock=self.clock, registry=registry)
        stub = StubTreq(api.app.resource())
        response = self.successResultOf(stub.get("http://privox.test/metrics"))
        body = self.successResultOf(stub.content(response))
        self.assertEqual(samples(body)[("privox_test_things_total", ())], 3)

    def test_blurredLogLine(self) -> None:
        self.api.blurUsage = True
        self.clock.advance(0)
        self.postMultipart("/stt", {"key": KEY}, {"file": ("a.wav", WAV * 40)})
        [event] = [e for e in self.events if e.get("route") == "/stt"]
        self.assertEqual(event["received"], blurBytes(event["received"]))
        self.assertNotEqual(event["received"] % 10, 3)
        self.assertEqual(event["ms"] % 100, 0)

    def test_statusWithoutLoad(self) -> None:
        response, body = self.request("GET", "/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        self.assertEqual(
            json.loads(body),
            {"farms": [{"name": "alpha", "services": ["stt", "tts"], "up": True, "load": None}]},
        )

    def test_statusWithLoad(self) -> None:
        h = FarmHarness(name="alpha-farm")
        h.producer(models=["whisper:tiny.en"], key="producer-secret")
        self.api.farmStatus = lambda: {"alpha": farmStatus(h.farm)}
        response, body = self.request("GET", "/status")
        [farm] = json.loads(body)["farms"]
        self.assertEqual(
            farm["load"]["services"]["stt"]["models"],
            {"whisper:tiny.en": {"connected": 1, "idle": 1, "busy": 0, "sealing": 0}},
        )
        self.assertNotIn(b"secret", body)

        # The models the API's tables name that no producer serves.
        self.assertEqual(
            json.loads(body)["unserved"],
            {"stt": sorted(MODELS.byService()["stt"] - {"whisper:tiny.en"}),
             "tts": sorted(MODELS.byService()["tts"])},
        )

        response, page = self.request("GET", "/status", headers={"Accept": "text/html"})
        self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
        self.assertIn(b"<td>whisper:tiny.en</td><td>1</td><td>1</td><td>0</td>", page)
        self.assertIn(b"<a href='/'>", page)
        self.assertIn(b"No producer serves these models", page)

    def test_unservedWhenSealingRequired(self) -> None:
        """
        With sealing required, a model served only by producers that do not
        seal is unserved: its jobs would fail no_producer.
        """
        h = FarmHarness(name="alpha-farm")
        h.producer(models=["whisper:tiny.en"], key="producer-secret")
        self.api.farmStatus = lambda: {"alpha": farmStatus(h.farm)}
        self.api.sealRequired = True
        _, body = self.request("GET", "/status")
        self.assertIn("whisper:tiny.en", json.loads(body)["unserved"]["stt"])
        h.producer(models=["whisper:tiny.en"], key="sealing-node",
                   seal={"certificate": "c", "key": "k", "signature": "s"})
        _, body = self.request("GET", "/status")
        self.assertNotIn("whisper:tiny.en", json.loads(body)["unserved"]["stt"])

    def test_unservedSaidAfterStart(self) -> None:
        """
        A while after it starts, the API logs a warning per service naming
        the models no producer serves; without any known load, it says it
        cannot tell.
        """
        h = FarmHarness(name="alpha-farm")
        h.producer(models=["whisper:tiny.en"], key="producer-secret")
        self.api.farmStatus = lambda: {"alpha": farmStatus(h.farm)}
        events: list[dict[str, Any]] = []
        self.patch(apiService, "log", Logger(observer=events.append))
        clock = Clock()
        service = UnservedModels(self.api, clock)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(UNSERVED_CHECK_AFTER)
        said = {e["service"]: e["models"] for e in events if "service" in e}
        self.assertEqual(said["tts"], ", ".join(sorted(MODELS.byService()["tts"])))
        self.assertNotIn("whisper:tiny.en", said["stt"])

        events.clear()
        self.api.farmStatus = None
        service.startService()
        clock.advance(UNSERVED_CHECK_AFTER)
        [event] = events
        self.assertIn("cannot tell", event["log_format"])

    def test_statusProviderFails(self) -> None:
        def broken() -> Any:
            raise RuntimeError("farm status broke")

        self.api.farmStatus = broken
        response, body = self.request("GET", "/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["farms"][0]["load"], None)
        self.flushLoggedErrors(RuntimeError)


class StatusTableTests(SynchronousTestCase):
    def test_table(self) -> None:
        status = {
            "farms": [
                {"name": "local", "services": ["stt", "tts"], "up": True, "load": {
                    "services": {
                        "stt": {"queue": 2, "models": {
                            "whisper:tiny.en": {"connected": 3, "idle": 1, "busy": 2, "sealing": 3}}},
                        "tts": {"queue": 0, "models": {}},
                    }}},
                {"name": "far", "services": ["stt"], "up": False, "fallback": True, "load": None},
            ]
        }
        self.assertEqual(
            statusTable(status).splitlines(),
            [
                "FARM            STATE  SERVICE  MODEL              PRODUCERS  IDLE  BUSY  SEALING  QUEUE",
                "local           up     stt      whisper:tiny.en    3          1     2     3        2",
                "local           up     tts      -                  0          0     0     0        0",
                "far (fallback)  down   stt      (no load figures)",
            ],
        )
        self.assertEqual(statusTable({"farms": []}), "no farms\n")


class LocalTests(TestCase):
    """
    privox-local: one /metrics for the farm, the node and the API; /status
    from the in-process farm; C{privox status} against it.
    """

    timeout = 240

    async def test_local(self) -> None:
        from tests.test_cli import privox

        local = LocalExchange(LocalSettings(port=0, accounts="none"), reactor)
        local.startService()
        self.addCleanup(local.stopService)
        await local.ready

        response = await treq.post(
            local.url + "/tts", data={"key": "k", "text": "Hello.", "voice": "voice1"}
        )
        self.assertEqual(response.code, 200)
        await response.content()

        response = await treq.get(local.url + "/metrics")
        text = (await response.content()).decode()
        seen = samples(text)
        tts = "piper:en_US-joe-medium"
        self.assertEqual(
            seen[("privox_farm_jobs_total", (("model", tts), ("outcome", "ok"), ("service", "tts")))], 1
        )
        self.assertEqual(
            seen[("privox_farm_producers_connected", (("model", tts), ("service", "tts")))], 1
        )
        self.assertEqual(seen[("privox_node_engine_seconds_count", (("model", tts),))], 1)
        self.assertEqual(
            seen[("privox_api_requests_total", (("route", "/tts"), ("status", "200")))], 1
        )

        response = await treq.get(local.url + "/status")
        [farm] = json.loads(await response.content())["farms"]
        self.assertEqual(farm["name"], "local")
        self.assertEqual(farm["load"]["services"]["tts"]["models"][tts]["connected"], 1)

        out, err, code = await privox("status", PRIVOX_API=local.url)
        self.assertEqual((err, code), ("", 0))
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["FARM", "STATE", "SERVICE", "MODEL", "PRODUCERS", "IDLE", "BUSY", "SEALING", "QUEUE"])
        # privox-local's node seals (its exchange vouches for it).
        self.assertIn(["local", "up", "tts", tts, "1", "1", "0", SEALING_LOCAL, "0"], [line.split() for line in lines])
        out, err, code = await privox("status", "--json", PRIVOX_API=local.url)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["farms"][0]["name"], "local")


class NodeMetricsTests(SynchronousTestCase):
    def test_engineTime(self) -> None:
        """
        A job's engine time goes into the histogram by model, and into the
        node's log line, rounded with blur-usage.
        """
        from twisted.logger import globalLogPublisher

        from privox.metrics import NodeMetrics
        from privox.node.pool import EnginePool, EngineTime

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        registry = CollectorRegistry()
        pool = EnginePool([], reactor, None, metrics=NodeMetrics(registry), blurUsage=True)
        meter = EngineTime()
        self.assertEqual(meter.run(lambda x: x * 2, 21), 42)
        meter.seconds = 0.7777
        pool.jobDone("piper:x", meter, "ok", 4321)
        seen = samples(render(registry))
        self.assertEqual(seen[("privox_node_engine_seconds_count", (("model", "piper:x"),))], 1)
        self.assertEqual(seen[("privox_node_engine_seconds_sum", (("model", "piper:x"),))], 0.7777)
        [line] = [e for e in events if e.get("log_format", "").startswith("{model} {outcome}")]
        self.assertEqual((line["ms"], line["bytes_in"]), (800, 4300))

    def test_metricsListen(self) -> None:
        from twisted.application.service import MultiService

        from privox.memory import NODE, TunedMallocService
        from privox.node.service import NodeService
        from privox.node.service import Options as NodeOptions
        from privox.node.service import makeService as makeNodeService

        argv = ["--tts", "piper:en_US-joe-medium", "--tts-farm", "tcp:host=127.0.0.1:port=1"]
        options = NodeOptions()
        options.parseOptions(argv)
        self.assertEqual(options.settings.metrics_listen, "none")
        [tuning, node] = list(makeNodeService(options, reactor))
        self.assertIsInstance(node, NodeService)
        self.assertIsNone(node.pool.metrics)
        options = NodeOptions()
        options.parseOptions(argv + ["--metrics-listen", "tcp:0:interface=127.0.0.1", "--blur-usage"])
        self.assertTrue(options.settings.blur_usage)
        top = makeNodeService(options, reactor)
        self.assertIsInstance(top, MultiService)
        [tuning, node, metrics] = list(top)
        self.assertIsInstance(tuning, TunedMallocService)
        self.assertEqual(tuning.tuning, NODE)
        self.assertIsInstance(node, NodeService)
        self.assertIsNotNone(node.pool.metrics)
        self.assertTrue(node.pool.blurUsage)


class JsonLogTests(SynchronousTestCase):
    def test_jsonFile(self) -> None:
        """
        C{twistd --logger privox.logs.jsonFile}: one JSON object per line,
        with the event's named fields.
        """
        from twisted.logger import Logger

        from privox.logs import jsonFile, jsonStdout

        self.assertIsNotNone(jsonStdout())
        path = self.mktemp()
        observer = jsonFile(path)
        Logger(observer=observer).info("job {ms} ms", ms=1200, bytes_in=4300)
        observer.flush()
        observer._out.close()
        with open(path) as f:
            [line] = f.read().splitlines()
        event = json.loads(line)
        self.assertEqual((event["ms"], event["bytes_in"]), (1200, 4300))


class _Output(io.StringIO):
    """
    A file that says when something was written to it, and from which thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        self.written.set()
        return super().write(text)


class BufferedLogTests(SynchronousTestCase):
    """
    L{privox.logs.BufferedLogObserver}: lines wait in memory and are written
    together, off the thread that logged them; warnings at once.
    """

    def observer(self, **kwargs: Any) -> tuple[Any, _Output]:
        from privox.logs import BufferedLogObserver

        out = _Output()
        # An interval no test waits for: only the test that wants the
        # writer thread sets a short one.
        kwargs.setdefault("interval", 3600.0)
        return BufferedLogObserver(out, lambda e: e["text"] + "\n", **kwargs), out

    def test_waitsThenWritesTogether(self) -> None:
        from twisted.logger import LogLevel

        observer, out = self.observer()
        for n in range(3):
            observer({"text": f"line {n}", "log_level": LogLevel.info})
        self.assertEqual(out.getvalue(), "")
        observer.flush()
        self.assertEqual(out.getvalue(), "line 0\nline 1\nline 2\n")

    def test_warningsAtOnce(self) -> None:
        from twisted.logger import LogLevel

        observer, out = self.observer()
        observer({"text": "before", "log_level": LogLevel.info})
        observer({"text": "trouble", "log_level": LogLevel.warn})
        self.assertEqual(out.getvalue(), "before\ntrouble\n")
        observer({"text": "worse", "log_level": LogLevel.critical})
        self.assertEqual(out.getvalue(), "before\ntrouble\nworse\n")

    def test_fullBufferWritten(self) -> None:
        from twisted.logger import LogLevel

        observer, out = self.observer(maxPending=20)
        observer({"text": "a" * 10, "log_level": LogLevel.info})
        self.assertEqual(out.getvalue(), "")
        observer({"text": "b" * 10, "log_level": LogLevel.info})
        self.assertEqual(out.getvalue(), "a" * 10 + "\n" + "b" * 10 + "\n")

    def test_immediateWhileTold(self) -> None:
        """
        While C{immediate()} holds (for twistd: while the reactor is not
        running), every line is written at once, with those waiting.
        """
        from twisted.logger import LogLevel

        running = [True]
        observer, out = self.observer(immediate=lambda: not running[0])
        observer({"text": "serving", "log_level": LogLevel.info})
        self.assertEqual(out.getvalue(), "")
        running[0] = False
        observer({"text": "Main loop terminated.", "log_level": LogLevel.info})
        self.assertEqual(out.getvalue(), "serving\nMain loop terminated.\n")

    def test_writerThread(self) -> None:
        """
        Left alone, lines are written by the observer's own thread.
        """
        from twisted.logger import LogLevel

        observer, out = self.observer(interval=0.01)
        observer({"text": "quietly", "log_level": LogLevel.info})
        self.assertTrue(out.written.wait(30))
        self.assertEqual(out.getvalue(), "quietly\n")
        self.assertEqual(out.writers, {"privox-log-writer"})

    def test_afterFork(self) -> None:
        """
        In a forked child (twistd daemonising) the writer thread is gone:
        the next event starts another, and the lock is a fresh one.
        """
        from twisted.logger import LogLevel

        observer, out = self.observer(interval=0.01)
        lock = observer._lock
        observer._afterFork()
        self.assertIsNot(observer._lock, lock)
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        observer._writer = dead
        observer({"text": "in the child", "log_level": LogLevel.info})
        self.assertTrue(observer._writer.is_alive())
        self.assertTrue(out.written.wait(30))
        self.assertEqual(out.getvalue(), "in the child\n")

    def test_textFormat(self) -> None:
        """
        C{privox.logs.textStdout} writes what twistd's own text log would.
        """
        from twisted.logger import Logger, formatEventAsClassicLogText

        from privox.logs import textStdout

        observer = textStdout()
        events: list[dict[str, Any]] = []
        observer._out = _Output()
        log = Logger(namespace="privox.test", observer=lambda e: (events.append(e), observer(e)))
        log.info("job {job_id} ok", job_id="ab12")
        observer.flush()
        self.assertEqual(observer._out.getvalue(), formatEventAsClassicLogText(events[0]))
        self.assertIn("[privox.test#info] job ab12 ok", observer._out.getvalue())
