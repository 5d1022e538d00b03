"""
makeService: the service tree twistd runs, on real ports.
"""

from __future__ import annotations

import resource

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.consumer import connectConsumer
from privox.daemon import ListenService
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.keys import OpenPolicy
from privox.farm.service import FarmService, Options, makeService
from privox.fdlimit import OpenFileLimitService
from privox.peer import Denied


class ServiceTests(TestCase):
    timeout = 30

    async def test_serveAndStop(self) -> None:
        options = Options()
        options.parseOptions(["--stt-listen", "tcp:0:interface=127.0.0.1", "--tts-listen", "none"])
        top = makeService(options, reactor)
        # The limit first, then the ports; and twistd's farm splices.
        self.assertIsInstance(list(top)[0], OpenFileLimitService)
        [farmService] = [s for s in top if isinstance(s, FarmService)]
        self.assertIsNotNone(farmService.farm.splicer)
        self.addCleanup(
            resource.setrlimit, resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)
        )
        top.startService()
        ports = [s.port for s in top if isinstance(s, ListenService)]
        self.assertEqual(len(ports), 1)
        endpoint = f"tcp:host=127.0.0.1:port={ports[0].getHost().port}"
        with self.assertRaises(Denied) as caught:
            await connectConsumer(reactor, endpoint, "tts")
        self.assertEqual(caught.exception.code, "bad_request")
        consumer = await connectConsumer(reactor, endpoint, "stt")
        self.assertEqual(consumer.okay.farm, "privox-farm")
        closed = Deferred()
        consumer.peerLost = closed.callback
        await top.stopService()
        await closed

    def test_badKeyFile(self) -> None:
        options = Options()
        options.parseOptions(["--producer-keys", "/nonexistent/keys.txt"])
        self.assertRaises(usage.UsageError, makeService, options, reactor)


class StatsTests(SynchronousTestCase):
    def test_statsLine(self) -> None:
        clock = Clock()
        farm = Farm(FarmSettings(stats_interval=10), clock, OpenPolicy(), OpenPolicy())
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = FarmService(farm, clock)
        service.startService()
        farm.counters.jobs = 25
        farm.counters.succeeded = 20
        clock.advance(10)
        [stats] = [e for e in events if e.get("log_format", "").startswith("stats:")]
        self.assertEqual((stats["jobs_per_s"], stats["ok_per_s"]), (2.5, 2.0))
        self.assertEqual(stats["queue"], {"stt": 0, "tts": 0})
        self.assertEqual(stats["log_level"], LogLevel.info)
        self.successResultOf(service.stopService())
        self.assertFalse(farm.accepting)
