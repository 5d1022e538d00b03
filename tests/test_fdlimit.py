"""
Daemons raise their own soft open-file limit to the hard one.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from privox import fdlimit
from privox.fdlimit import OpenFileLimitService, raiseOpenFileLimit


class RaiseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.original)
        self.hard = self.original[1]
        if self.hard == resource.RLIM_INFINITY:
            self.hard = fdlimit._ceiling()

    def lower(self, soft: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, self.original[1]))

    def test_softRaisedToHard(self) -> None:
        self.lower(256)
        self.assertEqual(raiseOpenFileLimit(), (256, self.hard))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], self.hard)

    def test_alreadyThere(self) -> None:
        self.lower(self.hard)
        self.assertEqual(raiseOpenFileLimit(), (self.hard, self.hard))

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_serviceSaysSo(self) -> None:
        self.lower(256)
        events = self.events()
        OpenFileLimitService().startService()
        [raised] = [e for e in events if e.get("log_format", "").startswith("open-file limit raised")]
        self.assertEqual((raised["before"], raised["after"]), (256, self.hard))

    def test_serviceWarnsWhenTooLow(self) -> None:
        self.patch(fdlimit, "ENOUGH", self.hard + 1)
        events = self.events()
        OpenFileLimitService().startService()
        [warned] = [e for e in events if "raise LimitNOFILE" in e.get("log_format", "")]
        self.assertEqual(warned["limit"], self.hard)
