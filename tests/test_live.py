"""
Live jobs charged to their caller (L{privox.api.live}): a stream holds what
the caller has left (at most C{maxSeconds}), is cut there, and settles the
seconds it used; with no accounts, nothing is counted.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from privox.accounts.store import AccountStore
from privox.api.access import AccountAccess, PolicyAccess
from privox.api.deltas import AppendOnly
from privox.api.errors import OverQuota
from privox.api.exchange import Heard, Transcribed
from privox.api.live import LiveJobs
from privox.keys import OpenPolicy


class StreamExchange:
    """
    Live jobs that keep what they are sent and answer when told to.
    """

    def __init__(self) -> None:
        self.jobs: list = []

    def transcribeLive(self, model, language, deadline, heard):
        class Live:
            def __init__(self) -> None:
                self.audio = bytearray()
                self.ended = False
                self.done: Deferred = Deferred()

            def write(self, pcm: bytes) -> None:
                assert not self.ended
                self.audio += pcm

            def end(self) -> None:
                self.ended = True

            def cancel(self) -> None:
                self.done.cancel()

        live = Live()
        self.jobs.append((deadline, live, heard))
        return live

    def synthesizeLive(self, model, language, voice, deadline, spoken):
        return self.transcribeLive(model, language, deadline, spoken)


class LiveJobsTests(TestCase):
    async def access(self, hourly: float = 100.0):
        self.store = AccountStore.open("sqlite:" + os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(self.store.close)
        await self.store.migrate()
        self.clock = Clock()
        self.clock.advance(10_000)
        access = AccountAccess(self.store, self.clock, hourlySeconds=hourly)
        key, _ = await self.store.createKey(self.clock.seconds())
        return access, await access.authorize(key)

    async def test_heldCutSettled(self) -> None:
        """
        A stream may use what the key has left: it ends itself there, and
        the key is charged the seconds it sent.
        """
        access, caller = await self.access(hourly=100.0)
        exchange = StreamExchange()
        live = LiveJobs(exchange, access, self.clock, maxSeconds=300.0)
        job = await live.transcribe(caller, "whisper:tiny.en", None, lambda h: None)
        [(deadline, inner, heard)] = exchange.jobs
        self.assertGreaterEqual(deadline, 100.0)
        self.assertEqual((await access.standing(caller))["remaining"], 0)
        job.write(b"\0" * 32000 * 60)
        self.assertFalse(inner.ended)
        job.write(b"\0" * 32000 * 60)  # 120 s: cut at the 100 held
        self.assertTrue(inner.ended)
        self.assertEqual(len(inner.audio), 32000 * 100)
        inner.done.callback(Transcribed("", "whisper:tiny.en", None, 100.0))
        await job.done
        standing = await access.standing(caller)
        self.assertEqual((standing["used"], standing["remaining"]), (100, 0))
        with self.assertRaises(OverQuota):
            await live.transcribe(caller, "whisper:tiny.en", None, lambda h: None)

    async def test_failedReleases(self) -> None:
        access, caller = await self.access()
        exchange = StreamExchange()
        live = LiveJobs(exchange, access, self.clock, maxSeconds=30.0)
        job = await live.transcribe(caller, "whisper:tiny.en", None, lambda h: None)
        job.write(b"\0" * 32000)
        exchange.jobs[0][1].done.errback(OverQuota("x"))
        await self.assertFailure(job.done, OverQuota)
        self.assertEqual((await access.standing(caller))["used"], 0)

    async def test_failedAfterHeard(self) -> None:
        """
        A stream that fails, or is given up, after something was heard is
        charged the seconds sent (else the captions, then a failure made on
        purpose, would cost nothing).
        """
        access, caller = await self.access()
        exchange = StreamExchange()
        live = LiveJobs(exchange, access, self.clock, maxSeconds=30.0)
        job = await live.transcribe(caller, "whisper:tiny.en", None, lambda h: None)
        [(deadline, inner, heard)] = exchange.jobs
        job.write(b"\0" * 32000 * 9)
        heard(Heard("nine seconds of captions", True, 0.0, 9.0))
        job.cancel()
        await self.assertFailure(job.done, Exception)
        self.assertEqual((await access.standing(caller))["used"], 9)

    async def test_speechCut(self) -> None:
        """
        Speech stops at what was held, is charged what was heard, and the
        job is cancelled.
        """
        access, caller = await self.access(hourly=2.0)
        exchange = StreamExchange()
        live = LiveJobs(exchange, access, self.clock)
        heard: list = []
        job = await live.speak(caller, "piper:x", None, None,
                               lambda pcm, rate: heard.append(len(pcm)))
        [(deadline, inner, spoken)] = exchange.jobs
        spoken(b"\0" * 2 * 16000, 16000)
        spoken(b"\0" * 2 * 16000 * 3, 16000)
        self.assertEqual(heard, [32000, 32000])
        self.assertEqual(await job.done, 2.0)
        self.assertEqual((await access.standing(caller))["used"], 2)

    async def test_noAccounts(self) -> None:
        """
        Without an account store, a stream holds nothing and may be as
        long as C{maxSeconds}.
        """
        access = PolicyAccess(OpenPolicy())
        caller = await access.authorize("anyone")
        exchange = StreamExchange()
        live = LiveJobs(exchange, access, Clock(), maxSeconds=30.0)
        heard: list[Heard] = []
        job = await live.transcribe(caller, "whisper:tiny.en", None, heard.append)
        job.write(b"\0" * 32000 * 40)
        self.assertEqual(len(exchange.jobs[0][1].audio), 32000 * 30)
        exchange.jobs[0][1].done.callback(Transcribed("hi", "whisper:tiny.en", None, 30.0))
        self.assertEqual((await job.done).text, "hi")


class AppendOnlyTests(TestCase):
    def test_stablePrefix(self) -> None:
        """
        A hypothesis's words but its last go at once; a hypothesis that
        takes back what was said stops the deltas until the final piece,
        which says the rest only if it agrees.
        """
        deltas = AppendOnly()
        said = [
            deltas.heard(Heard(text, final, 0, 1))
            for text, final in [
                ("Please", False), ("Please remem", False), ("Please remember to", False),
                ("Please remember to water.", True),
                ("The forecast", False), ("A forecast says", False), ("The forecast says rain.", True),
                ("Close", False), ("Clothes the windows.", True),
            ]
        ]
        self.assertEqual(said, [
            "", "Please", " remember", " to water.",
            " The", "", " forecast says rain.", "", " Clothes the windows.",
        ])
        deltas = AppendOnly()
        deltas.heard(Heard("Close the", False, 0, 1))
        self.assertEqual(deltas.heard(Heard("Clothes the windows.", True, 0, 1)), "")
