"""
L{privox.consumer.ConsumerProtocol}: what it writes, frame by frame, and a
whole job against a real farm connection over L{twisted.test.iosim}.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from privox.consumer import ConsumerProtocol, Liveness, Unresponsive
from privox.farm.connection import FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.framing import FrameDecoder
from privox.keys import OpenPolicy
from privox.messages import controlFrame
from privox.engines.digest import digestOf
from privox.node.echo import DigestHandler
from privox.node.worker import ProducerProtocol

OKAY = {"protocol": 2, "farm": "f", "ping_interval": 10.0, "max_frame": 4096,
        "max_job_bytes": 100_000}


class LivenessTests(SynchronousTestCase):
    """
    A farm that goes silent during a job (frozen, its host gone) is PINGed
    after a quiet spell and given up on if nothing comes back.
    """

    def consumer(self) -> tuple[ConsumerProtocol, StringTransport, Clock]:
        clock = Clock()
        consumer = ConsumerProtocol("stt", liveness=Liveness(quiet=2.0, patience=5.0), clock=clock)
        transport = StringTransport()
        consumer.makeConnection(transport)
        consumer.dataReceived(b"who")
        consumer.dataReceived(controlFrame(b"OKAY", OKAY))
        transport.clear()
        return consumer, transport, clock

    def test_silentFarmGivenUp(self) -> None:
        consumer, transport, clock = self.consumer()
        done = consumer.stt("m", b"audio")
        consumer.dataReceived(controlFrame(b"ASGN", {"id": "j1"}))
        transport.clear()
        clock.advance(2.0)
        self.assertEqual(transport.value(), b"PING00000000")
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        consumer.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(done, Unresponsive)
        self.assertIn("read and sent nothing", str(failure.value))

    def test_answeringFarmKept(self) -> None:
        """
        A farm that answers its PINGs is waited for as long as the job
        takes; nothing is PINGed once the job is over.
        """
        consumer, transport, clock = self.consumer()
        done = consumer.stt("m", b"audio")
        for _ in range(30):
            clock.advance(2.0)
            if transport.value().endswith(b"PING00000000"):
                transport.clear()
                consumer.dataReceived(b"PONG00000000")
        self.assertFalse(transport.disconnecting)
        consumer.dataReceived(controlFrame(b"ASGN", {"id": "j1"}))
        consumer.dataReceived(controlFrame(b"RSLT", {"id": "j1", "text": "at last"}))
        self.assertEqual(self.successResultOf(done).text, "at last")
        transport.clear()
        clock.advance(60)
        self.assertEqual((transport.value(), clock.getDelayedCalls()), (b"", []))

    def test_slowReaderKept(self) -> None:
        """
        An upload still in the kernel's queue, shrinking (the farm reads it
        slowly, held back by a slow producer), is a farm alive however long
        it takes; a queue that stops shrinking is a farm gone.
        """
        consumer, transport, clock = self.consumer()
        queue = [5_000_000]
        consumer.queuedBytes = lambda: queue[0]  # type: ignore[method-assign]
        done = consumer.stt("m", b"audio")
        transport.clear()
        for _ in range(60):
            queue[0] -= 50_000
            clock.advance(2.0)
        self.assertEqual(transport.value(), b"")  # no PING queued behind it
        self.assertFalse(transport.disconnecting)
        clock.advance(7.0)
        self.assertTrue(transport.disconnecting)
        consumer.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(done, Unresponsive)

    def test_notWhileSending(self) -> None:
        """
        While our own bytes are still going out the farm is not PINGed:
        its answer would queue behind them.
        """
        consumer, transport, clock = self.consumer()
        consumer.stt("m", b"audio")
        consumer.pauseProducing()
        transport.clear()
        clock.advance(30)
        self.assertEqual(transport.value(), b"")
        consumer.resumeProducing()
        clock.advance(2)
        self.assertEqual(transport.value(), b"PING00000000")


class WireTests(SynchronousTestCase):
    """
    When the upload goes: with JOB_ if OKAY allows it and it fits, else
    after ASGN.
    """

    def consumer(self, **okay: Any) -> tuple[ConsumerProtocol, StringTransport]:
        consumer = ConsumerProtocol("stt")
        transport = StringTransport()
        consumer.makeConnection(transport)
        consumer.dataReceived(b"who")
        consumer.dataReceived(controlFrame(b"OKAY", dict(OKAY, **okay)))
        self.successResultOf(consumer.ready)
        transport.clear()
        return consumer, transport

    def sent(self, transport: StringTransport) -> list[tuple[str, Any]]:
        frames = FrameDecoder(1 << 20).feed(transport.value())
        transport.clear()
        return [(f.verb.decode(), f.payload if f.verb == b"DATA" else json.loads(f.payload))
                for f in frames]

    def test_earlyWhenAllowed(self) -> None:
        consumer, transport = self.consumer(early_upload=10)
        done = consumer.stt("m", b"0123456789")
        [(verb, job), (data, audio)] = self.sent(transport)
        self.assertEqual((verb, job["early"], job["size"], data, audio),
                         ("JOB_", True, 10, "DATA", b"0123456789"))
        consumer.dataReceived(controlFrame(b"ASGN", {"id": "j1"}))
        self.assertEqual(transport.value(), b"", "the upload went twice")
        consumer.dataReceived(controlFrame(b"RSLT", {"id": "j1", "text": "ok"}))
        self.assertEqual(self.successResultOf(done).text, "ok")

    def test_afterAsgnOtherwise(self) -> None:
        """
        Larger than early_upload, or a farm that does not announce it (an
        older one): JOB_ alone, the upload once ASGN comes, split at
        max_frame.
        """
        for okay, audio in (({"early_upload": 10}, bytes(11)), ({}, b"x"), ({}, bytes(5000))):
            consumer, transport = self.consumer(**okay)
            consumer.stt("m", audio)
            [(verb, job)] = self.sent(transport)
            self.assertEqual(verb, "JOB_")
            self.assertNotIn("early", job)
            consumer.dataReceived(controlFrame(b"ASGN", {"id": "j1"}))
            frames = self.sent(transport)
            self.assertEqual({v for v, _ in frames}, {"DATA"})
            self.assertTrue(all(len(body) <= 4096 for _, body in frames))
            self.assertEqual(b"".join(body for _, body in frames), audio)

    def test_refusedEarlyJob(self) -> None:
        """
        A FAIL without id after an early upload ends the job; the connection
        takes the next one (the farm discards the bytes it was owed).
        """
        from privox.consumer import JobFailed

        consumer, transport = self.consumer(early_upload=100)
        done = consumer.stt("m", b"abc")
        consumer.dataReceived(controlFrame(
            b"FAIL", {"id": None, "error": "unsupported_model", "message": "no"}))
        self.assertEqual(self.failureResultOf(done, JobFailed).value.code, "unsupported_model")
        self.assertFalse(consumer.busy)
        transport.clear()
        consumer.stt("m", b"def")
        self.assertEqual([v for v, _ in self.sent(transport)], ["JOB_", "DATA"])


class ThroughAFarmTests(SynchronousTestCase):
    """
    A consumer, a farm connection and a digest producer, joined in memory.
    """

    def exchange(self, producers: int, consumers: int, **settings: Any) -> tuple[
        Farm, list[ConsumerProtocol], Any
    ]:
        """
        A farm with C{producers} digest producers and C{consumers} consumers
        joined to it in memory, handshakes done; and a function that moves
        every byte waiting until none is left.
        """
        clock = Clock()
        farm = Farm(FarmSettings(stats_interval=0, **settings), clock, OpenPolicy(), OpenPolicy())
        factory = FarmFactory(farm, "stt")
        peers: list[Any] = [ProducerProtocol("stt", "pk", DigestHandler()) for _ in range(producers)]
        peers += [ConsumerProtocol("stt", "ck") for _ in range(consumers)]
        pumps = []
        for peer in peers:
            connection = factory.buildProtocol(None)
            pumps.append(iosim.connect(connection, iosim.makeFakeServer(connection),
                                       peer, iosim.makeFakeClient(peer), greet=False))

        def flush() -> None:
            # Each pass ends the reactor's turn first: what the farm wrote
            # goes out (Farm.cork).
            while True:
                clock.advance(0)
                if not any([pump.pump() for pump in pumps]):
                    break

        flush()
        for peer in peers:
            self.successResultOf(peer.ready)
        return farm, peers[producers:], flush

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=8),
           st.integers(min_value=1, max_value=3), st.sampled_from([0, 64, 256]))
    def test_everyoneGetsTheirOwn(self, sizes: list[int], producers: int, early: int) -> None:
        """
        More consumers than producers, early and late uploads mixed, uploads
        in several frames: every result is the digest of its own upload, and
        queued early uploads reach the producer whole.
        """
        farm, consumers, flush = self.exchange(producers, len(sizes), early_upload=early,
                                               max_frame=200)
        audios = [bytes([n]) * size for n, size in enumerate(sizes)]
        done = [c.stt("bench:digest", audio) for c, audio in zip(consumers, audios)]
        flush()
        for d, audio in zip(done, audios):
            self.assertEqual(self.successResultOf(d).text,
                             f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        self.assertEqual(farm.counters.succeeded, len(sizes))
        self.assertEqual(farm.jobs, set())

    def test_earlyJobsAndLateJobs(self) -> None:
        farm, [consumer], flush = self.exchange(1, 1, early_upload=64, max_frame=4096)
        for audio in (b"small" * 3, b"large" * 2000):
            done = consumer.stt("bench:digest", audio)
            self.assertEqual(consumer._pending.request.early, len(audio) <= 64)
            flush()
            self.assertEqual(self.successResultOf(done).text,
                             f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        self.assertEqual(farm.counters.succeeded, 2)
