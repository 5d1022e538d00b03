"""
The farm's protocol behaviour, peer by peer, on in-memory transports with a
fake clock: handshake, jobs, every error path, liveness, backpressure,
privacy and shutdown.
"""

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from privox.farm.farm import BLOCKING_AT_ONCE
from privox.framing import encodeFrame
from privox.keys import AllowListPolicy
from privox.messages import controlFrame
from tests.farmharness import FarmHarness, ManualPolicy

STT_JOB = {"model": "whisper:tiny.en", "language": "en", "format": "wav", "size": 10}


def helo(role="consumer", service="stt", key="k", **more):
    return {"protocol": 2, "role": role, "service": service, "key": key, **more}


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = FarmHarness(name="test-farm", max_frame=4096, max_job_bytes=100_000)

    def test_okay(self) -> None:
        peer = self.h.peer()
        peer.send(b"HELO", helo())
        self.assertEqual(
            peer.messages(),
            [("OKAY", {"protocol": 2, "farm": "test-farm", "ping_interval": 10.0,
                       "max_frame": 4096, "max_job_bytes": 100_000, "early_upload": 65536,
                       "stream": {"max_s": 600.0, "idle_s": 15.0}})],
        )
        self.assertFalse(peer.closed)

    def test_helloByteByByte(self) -> None:
        from privox.messages import controlFrame
        peer = self.h.peer()
        for b in controlFrame(b"HELO", helo()):
            peer.raw(bytes([b]))
        self.assertEqual([v for v, _ in peer.messages()], ["OKAY"])

    def test_pvx1PeerAccepted(self) -> None:
        """
        A peer answering C{who} with C{c} or C{s} and a key speaks PVX/1:
        it is let in once its key is all here (when it goes quiet; tests/
        test_pvx1.py covers the rest), and the farm sends it no PVX/2 frame.
        """
        for first in (b"c", b"s"):
            peer = self.h.peer()
            peer.raw(first + b"0123456789abcdef")
            self.h.clock.advance(self.h.farm.settings.pvx1_quiet)
            self.assertEqual(peer.transport.value(), b"")
            self.assertFalse(peer.closed)
            self.assertIsNotNone(peer.protocol.session)

    def assertProtocolError(self, peer, fragment: str) -> None:
        [(verb, body)] = peer.messages()[-1:]
        self.assertEqual((verb, body["error"], body["id"]), ("FAIL", "protocol", None))
        self.assertIn(fragment, body["message"])
        self.assertTrue(peer.closed)

    def test_garbageHeader(self) -> None:
        peer = self.h.peer()
        peer.raw(b"GET / HTTP/1.1\r\n\r\n")
        self.assertProtocolError(peer, "unknown verb")

    def test_nonDigitLength(self) -> None:
        peer = self.h.peer()
        peer.raw(b"HELO0000002x")
        self.assertProtocolError(peer, "digits")

    def test_oversizedFrameRefusedBeforeBody(self) -> None:
        peer = self.h.peer()
        peer.raw(b"HELO00004097")
        self.assertProtocolError(peer, "exceeds max_frame 4096")

    def test_invalidJson(self) -> None:
        peer = self.h.peer()
        peer.raw(b"HELO00000003{x}")
        self.assertProtocolError(peer, "not valid JSON")

    def test_firstFrameMustBeHello(self) -> None:
        peer = self.h.peer()
        peer.send(b"JOB_", STT_JOB)
        self.assertProtocolError(peer, "expected HELO")

    def test_wrongProtocolVersion(self) -> None:
        peer = self.h.peer()
        peer.send(b"HELO", dict(helo(), protocol=3))
        self.assertProtocolError(peer, "protocol version")

    def assertDenied(self, peer, code: str) -> None:
        [(verb, body)] = peer.messages()
        self.assertEqual((verb, body["error"]), ("DENY", code))
        self.assertTrue(peer.closed)

    def test_badRole(self) -> None:
        peer = self.h.peer()
        peer.send(b"HELO", helo(role="spy"))
        self.assertDenied(peer, "bad_request")

    def test_wrongServiceForPort(self) -> None:
        peer = self.h.peer("stt")
        peer.send(b"HELO", helo(service="tts"))
        self.assertDenied(peer, "bad_request")

    def test_producerWithoutModels(self) -> None:
        peer = self.h.peer()
        peer.send(b"HELO", helo(role="producer"))
        self.assertDenied(peer, "bad_request")

    def test_rejectedKeys(self) -> None:
        h = FarmHarness(
            producerKeys=AllowListPolicy("producers.txt", frozenset({"good-p"})),
            consumerKeys=AllowListPolicy("consumers.txt", frozenset({"good-c"})),
        )
        for role, key, expected in [
            ("consumer", "good-c", "OKAY"), ("consumer", "good-p", "DENY"),
            ("producer", "good-p", "OKAY"), ("producer", "good-c", "DENY"),
        ]:
            peer = h.peer()
            peer.send(b"HELO", helo(role=role, key=key, models=["*"]))
            [(verb, body)] = peer.messages()
            self.assertEqual(verb, expected, (role, key))
            if verb == "DENY":
                self.assertEqual(body["error"], "unauthorized")

    def test_asynchronousKeyCheck(self) -> None:
        policy = ManualPolicy()
        h = FarmHarness(consumerKeys=policy)
        peer = h.peer()
        peer.send(b"HELO", helo(key="secret"))
        self.assertEqual(peer.messages(), [])
        [(key, d)] = policy.pending
        self.assertEqual(key, "secret")
        d.callback(True)
        self.assertEqual([v for v, _ in peer.messages()], ["OKAY"])

    def test_keyCheckErrorRejects(self) -> None:
        policy = ManualPolicy()
        h = FarmHarness(consumerKeys=policy)
        peer = h.peer()
        peer.send(b"HELO", helo())
        policy.pending[0][1].errback(RuntimeError("validation server exploded"))
        self.assertDenied(peer, "unauthorized")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_framesDuringKeyCheck(self) -> None:
        policy = ManualPolicy()
        h = FarmHarness(consumerKeys=policy)
        peer = h.peer()
        peer.send(b"HELO", helo())
        peer.send(b"JOB_", STT_JOB)
        self.assertProtocolError(peer, "before the farm answered HELO")
        policy.pending[0][1].callback(True)  # too late: nothing more is sent
        self.assertEqual(peer.messages(), [])

    def test_peerLeavesDuringKeyCheck(self) -> None:
        policy = ManualPolicy()
        h = FarmHarness(consumerKeys=policy)
        peer = h.peer()
        peer.send(b"HELO", helo())
        peer.lose()
        policy.pending[0][1].callback(True)
        self.assertEqual(peer.messages(), [])
        self.assertEqual(h.farm.connections, set())

    def test_handshakeTimeout(self) -> None:
        h = FarmHarness(handshake_timeout=10)
        peer = h.peer()
        peer.raw(b"HEL")  # slow-loris: a few bytes, then nothing
        h.clock.advance(9.9)
        self.assertFalse(peer.closed)
        h.clock.advance(0.1)
        [(verb, body)] = peer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "timeout"))
        self.assertTrue(peer.closed)

    def test_noTimeoutAfterHello(self) -> None:
        h = FarmHarness(handshake_timeout=10)
        peer = h.consumer()
        h.clock.advance(100)
        self.assertFalse(peer.closed)

    def test_framesRightAfterHello(self) -> None:
        """
        A peer must wait for OKAY: frames that came in the same read as HELO
        were sent too early, even when the key check answers at once.
        """
        from privox.messages import controlFrame
        peer = self.h.peer()
        peer.raw(controlFrame(b"HELO", helo()) + controlFrame(b"JOB_", STT_JOB))
        self.assertEqual(
            [(v, b.get("error")) for v, b in peer.messages()],
            [("OKAY", None), ("FAIL", "protocol")],
        )
        self.assertTrue(peer.closed)

    def test_notJson(self) -> None:
        for payload in (b'{"protocol":NaN}', '{"protocol":2}'.encode("utf-16")):
            peer = self.h.peer()
            peer.raw(b"HELO%08d" % len(payload) + payload)
            self.assertProtocolError(peer, "not valid JSON")

    def test_consumerPing(self) -> None:
        peer = self.h.consumer()
        peer.send(b"PING")
        self.assertEqual(peer.messages(), [("PONG", {})])

    def test_consumerMayNotSendResults(self) -> None:
        peer = self.h.consumer()
        peer.send(b"RSLT", {"id": "x", "text": "hi"})
        self.assertProtocolError(peer, "consumer may not send RSLT")


class JobTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = FarmHarness(max_frame=4096, max_job_bytes=100_000, queue_timeout=5,
                             max_job_timeout=60, cancel_grace=10)

    def startJob(self, job=STT_JOB, models=["whisper:tiny.en"]):
        producer = self.h.producer(models=models, languages=["en"])
        consumer = self.h.consumer()
        consumer.send(b"JOB_", job)
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        [(verb, work)] = producer.messages()
        self.assertEqual(verb, "JOB_")
        self.assertEqual(work["id"], asgn["id"])
        return consumer, producer, asgn["id"]

    def test_sttRoundTrip(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.data(b"01234")
        consumer.data(b"56789")
        self.assertEqual(producer.messages(), [("DATA", b"01234"), ("DATA", b"56789")])
        producer.send(b"RSLT", {"id": jobId, "text": "hello world"})
        self.assertEqual(consumer.messages(), [("RSLT", {"id": jobId, "text": "hello world"})])
        self.assertEqual(self.h.farm.counters.succeeded, 1)
        self.assertEqual(self.h.farm.jobs, set())
        self.assertTrue(self.h.farm.dispatchers["stt"].isIdle(producer.protocol.session))

    def test_producerSeesNoConsumerIdentity(self) -> None:
        producer = self.h.producer(models=["*"])
        consumer = self.h.consumer(key="consumer-secret-key")
        consumer.send(b"JOB_", dict(STT_JOB, timeout_s=5))
        [(_, work)] = producer.messages()
        self.assertEqual(
            set(work), {"id", "model", "language", "format", "size", "timeout_s"}
        )
        self.assertNotIn(b"consumer-secret-key", producer.transport.value())

    def test_consumerSeesNoProducerIdentity(self) -> None:
        """
        ASGN carries the job id alone, and RSLT only what the producer put
        in it: the farm adds nothing about who ran the job.
        """
        producer = self.h.producer(models=["*"], key="producer-secret-key")
        consumer = self.h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=1))
        [(_, asgn)] = consumer.messages()
        self.assertEqual(list(asgn), ["id"])
        consumer.data(b"x")
        producer.send(b"RSLT", {"id": asgn["id"], "text": "x"})
        self.assertEqual(consumer.messages(), [("RSLT", {"id": asgn["id"], "text": "x"})])

    def test_ttsRoundTrip(self) -> None:
        self.h = FarmHarness(max_frame=4096)
        producer = self.h.producer("tts", models=["piper:en_US-joe-medium"])
        consumer = self.h.consumer("tts")
        consumer.send(b"JOB_", {"model": "piper:en_US-joe-medium", "language": "en",
                                "voice": None, "text": "Hello.", "size": 0})
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        [(_, work)] = producer.messages()
        self.assertEqual(work["text"], "Hello.")
        wav = b"RIFF" + bytes(5996)
        producer.send(b"RSLT", {"id": asgn["id"], "content_type": "audio/wav", "size": len(wav)})
        producer.data(wav[:4000])
        producer.data(wav[4000:])
        messages = consumer.messages()
        self.assertEqual(messages[0], ("RSLT", {"id": asgn["id"], "content_type": "audio/wav", "size": 6000}))
        self.assertEqual(b"".join(body for _, body in messages[1:]), wav)
        self.assertEqual(self.h.farm.counters.succeeded, 1)

    def test_manyJobsOnOneConnection(self) -> None:
        producer = self.h.producer(models=["*"])
        consumer = self.h.consumer()
        for n in range(3):
            consumer.send(b"JOB_", dict(STT_JOB, size=1))
            [(_, asgn)] = consumer.messages()
            producer.messages()
            consumer.data(b"x")
            producer.messages()
            producer.send(b"RSLT", {"id": asgn["id"], "text": str(n)})
            self.assertEqual(consumer.messages(), [("RSLT", {"id": asgn["id"], "text": str(n)})])
        self.assertEqual(self.h.farm.counters.succeeded, 3)

    def test_missingFieldsBadRequest(self) -> None:
        self.h.producer(models=["*"])
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "m"})
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "bad_request"))
        self.assertFalse(consumer.closed)

    def test_tooLarge(self) -> None:
        self.h.producer(models=["*"])
        consumer = self.h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=100_001))
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "too_large"))
        self.assertFalse(consumer.closed)

    def test_noProducerForTheModel(self) -> None:
        """
        A model (or language) no connected producer serves is refused at
        once as no_producer: producers come and go, so a consumer may retry.
        """
        self.h.producer(models=["whisper:tiny.en"], languages=["en"])
        consumer = self.h.consumer()
        for job in (dict(STT_JOB, model="vosk:ko"), dict(STT_JOB, language="de")):
            consumer.send(b"JOB_", job)
            [(verb, body)] = consumer.messages()
            self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "no_producer"))
            self.assertIn("is connected", body["message"])
        self.assertFalse(consumer.closed)

    def test_queueThenAssign(self) -> None:
        consumer1, producer, jobId = self.startJob()
        consumer2 = self.h.consumer()
        consumer2.send(b"JOB_", STT_JOB)
        self.assertEqual(consumer2.messages(), [])
        self.h.clock.advance(4)
        consumer1.data(b"0123456789")
        producer.messages()
        producer.send(b"RSLT", {"id": jobId, "text": "one"})
        [(verb, asgn)] = consumer2.messages()
        self.assertEqual(verb, "ASGN")
        [(verb, work)] = producer.messages()
        self.assertEqual((verb, work["id"]), ("JOB_", asgn["id"]))
        self.h.clock.advance(10)  # the old queue deadline means nothing now
        self.assertEqual(consumer2.messages(), [])

    def test_queueTimeout(self) -> None:
        self.startJob()
        consumer2 = self.h.consumer()
        consumer2.send(b"JOB_", STT_JOB)
        self.h.clock.advance(4.9)
        self.assertEqual(consumer2.messages(), [])
        self.h.clock.advance(0.1)
        [(verb, body)] = consumer2.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "no_producer"))
        self.assertEqual(self.h.farm.dispatchers["stt"].queueDepth(), 0)
        # The connection is still good for the next job.
        consumer2.send(b"JOB_", STT_JOB)
        self.assertEqual(self.h.farm.dispatchers["stt"].queueDepth(), 1)

    def test_consumerLostWhileQueued(self) -> None:
        self.startJob()
        consumer2 = self.h.consumer()
        consumer2.send(b"JOB_", STT_JOB)
        consumer2.lose()
        self.assertEqual(self.h.farm.dispatchers["stt"].queueDepth(), 0)

    def test_repliesReachTheirOwnConsumer(self) -> None:
        p1 = self.h.producer(models=["*"])
        p2 = self.h.producer(models=["*"])
        c1 = self.h.consumer()
        c2 = self.h.consumer()
        c1.send(b"JOB_", dict(STT_JOB, size=2))
        c2.send(b"JOB_", dict(STT_JOB, size=2))
        [(_, a1)] = c1.messages()
        [(_, a2)] = c2.messages()
        self.assertNotEqual(a1["id"], a2["id"])
        c2.data(b"c2")
        c1.data(b"c1")
        [(_, w1), (_, d1)] = p1.messages()
        [(_, w2), (_, d2)] = p2.messages()
        self.assertEqual((w1["id"], d1), (a1["id"], b"c1"))
        self.assertEqual((w2["id"], d2), (a2["id"], b"c2"))
        p2.send(b"RSLT", {"id": a2["id"], "text": "for c2"})
        p1.send(b"RSLT", {"id": a1["id"], "text": "for c1"})
        self.assertEqual(c1.messages(), [("RSLT", {"id": a1["id"], "text": "for c1"})])
        self.assertEqual(c2.messages(), [("RSLT", {"id": a2["id"], "text": "for c2"})])

    def test_dataBeyondSize(self) -> None:
        consumer, producer, _ = self.startJob()
        consumer.data(b"0123456789x")
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertTrue(consumer.closed)
        consumer.lose()
        self.assertEqual(producer.messages(), [("CNCL", {"id": producer.protocol.session.job.id})])

    def test_emptyDataWhileQueued(self) -> None:
        self.startJob()
        consumer2 = self.h.consumer()
        consumer2.send(b"JOB_", STT_JOB)
        consumer2.data(b"")
        [(verb, body)] = consumer2.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertEqual(self.h.farm.dispatchers["stt"].queueDepth(), 0)

    def test_emptyDataAfterUpload(self) -> None:
        consumer, producer, _ = self.startJob()
        consumer.data(b"0123456789")
        consumer.data(b"")
        self.assertEqual(consumer.messages()[-1][1]["error"], "protocol")
        self.assertEqual([v for v, _ in producer.messages()], ["DATA", "CNCL"])

    def test_producerGetsEffectiveTimeout(self) -> None:
        """
        The producer learns the job's real deadline: the consumer's wish
        capped by max_job_timeout, or job_timeout when it asked for none.
        """
        for asked, effective in ((1000, 60), (7, 7), (None, 30)):
            h = FarmHarness(max_job_timeout=60, job_timeout=30)
            producer = h.producer()
            consumer = h.consumer()
            job = dict(STT_JOB) if asked is None else dict(STT_JOB, timeout_s=asked)
            consumer.send(b"JOB_", job)
            self.assertEqual(producer.messages()[0][1]["timeout_s"], effective)

    def test_forwardedJobMustFitFrame(self) -> None:
        h = FarmHarness(max_frame=200)
        h.producer("tts")
        consumer = h.consumer("tts")
        job = {"model": "m", "size": 0, "text": "x"}
        job["text"] = "x" * (200 - len(json.dumps(job, separators=(",", ":"))) + 1)
        consumer.send(b"JOB_", job)
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "too_large"))

    def test_dataBeforeAssign(self) -> None:
        consumer = self.h.consumer()
        consumer.data(b"x")
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))

    def test_secondJobWhileBusy(self) -> None:
        consumer, _, _ = self.startJob()
        consumer.send(b"JOB_", STT_JOB)
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertTrue(consumer.closed)

    def test_engineError(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.data(b"0123456789")
        producer.send(b"FAIL", {"id": jobId, "error": "engine_error", "message": "could not decode audio"})
        self.assertEqual(
            consumer.messages(),
            [("FAIL", {"id": jobId, "error": "engine_error", "message": "could not decode audio"})],
        )
        self.assertTrue(self.h.farm.dispatchers["stt"].isIdle(producer.protocol.session))

    def test_unknownProducerErrorCode(self) -> None:
        consumer, producer, jobId = self.startJob()
        producer.send(b"FAIL", {"id": jobId, "error": "cosmic_rays", "message": 7})
        [(verb, body)] = consumer.messages()
        self.assertEqual((body["error"], body["message"]), ("engine_error", "the engine failed"))

    def test_failMidUploadDiscardsTheRest(self) -> None:
        """
        After a job-level FAIL the consumer finishes its upload into the
        void, and the connection serves the next job.
        """
        consumer, producer, jobId = self.startJob()
        consumer.data(b"0123")
        producer.messages()
        producer.send(b"FAIL", {"id": jobId, "error": "engine_error", "message": "bad audio"})
        self.assertEqual(consumer.messages()[0][0], "FAIL")
        consumer.data(b"456789")
        self.assertEqual(producer.messages(), [])
        self.assertFalse(consumer.closed)
        consumer.send(b"JOB_", dict(STT_JOB, size=1))
        [(verb, _)] = consumer.messages()
        self.assertEqual(verb, "ASGN")

    def test_producerGarbageIsProducerLost(self) -> None:
        consumer, producer, jobId = self.startJob()
        producer.raw(b"garbage!garbage!")
        self.assertTrue(producer.closed)
        producer.lose()
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", jobId, "producer_lost"))
        self.assertFalse(self.h.farm.dispatchers["stt"].canServe("whisper:tiny.en", None))

    def test_producerResultForAnotherJob(self) -> None:
        consumer, producer, jobId = self.startJob()
        producer.send(b"RSLT", {"id": "not-" + jobId, "text": "x"})
        self.assertEqual(producer.messages()[-1][1]["error"], "protocol")
        producer.lose()
        self.assertEqual(consumer.messages()[0][1]["error"], "producer_lost")

    def test_producerLostMidJob(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.data(b"01234")
        producer.lose()
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", jobId, "producer_lost"))
        consumer.data(b"56789")  # the rest of the upload is discarded
        self.assertFalse(consumer.closed)

    def test_producerLostMidResult(self) -> None:
        self.h = FarmHarness()
        producer = self.h.producer("tts", models=["*"])
        consumer = self.h.consumer("tts")
        consumer.send(b"JOB_", {"model": "m", "text": "hi", "size": 0})
        [(_, asgn)] = consumer.messages()
        producer.send(b"RSLT", {"id": asgn["id"], "size": 100})
        producer.data(b"x" * 40)
        producer.lose()
        verbs = [(v, b if v == "DATA" else b.get("error")) for v, b in consumer.messages()]
        self.assertEqual(verbs, [("RSLT", None), ("DATA", b"x" * 40), ("FAIL", "producer_lost")])

    def test_consumerLostMidJobCancels(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.data(b"01234")
        producer.messages()
        consumer.lose()
        self.assertEqual(producer.messages(), [("CNCL", {"id": jobId})])
        session = producer.protocol.session
        self.assertFalse(self.h.farm.dispatchers["stt"].isIdle(session))
        producer.send(b"FAIL", {"id": jobId, "error": "cancelled", "message": "ok"})
        self.assertTrue(self.h.farm.dispatchers["stt"].isIdle(session))

    def test_cancelledResultIsDiscarded(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.data(b"0123456789")
        consumer.lose()
        producer.messages()
        producer.send(b"RSLT", {"id": jobId, "text": "too late", "size": 3})
        producer.data(b"abc")
        self.assertTrue(self.h.farm.dispatchers["stt"].isIdle(producer.protocol.session))
        self.assertFalse(producer.closed)

    def test_cancelledProducerThatNeverAnswersIsDropped(self) -> None:
        consumer, producer, jobId = self.startJob()
        consumer.lose()
        self.h.clock.advance(9.9)
        self.assertFalse(producer.transport.disconnecting)
        self.h.clock.advance(0.1)
        self.assertTrue(producer.closed)
        self.assertEqual(self.h.farm.jobs, set())

    def test_jobTimeout(self) -> None:
        consumer, producer, jobId = self.startJob(dict(STT_JOB, timeout_s=3))
        consumer.data(b"0123456789")
        producer.messages()
        self.h.clock.advance(3)
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", jobId, "timeout"))
        self.assertEqual(producer.messages(), [("CNCL", {"id": jobId})])
        producer.send(b"FAIL", {"id": jobId, "error": "cancelled", "message": "stopped"})
        self.assertEqual(consumer.messages(), [])
        self.assertTrue(self.h.farm.dispatchers["stt"].isIdle(producer.protocol.session))

    def test_timeoutCappedByMaxJobTimeout(self) -> None:
        consumer, producer, jobId = self.startJob(dict(STT_JOB, timeout_s=1000))
        self.h.clock.advance(59.9)
        self.assertEqual(consumer.messages(), [])
        self.h.clock.advance(0.1)
        self.assertEqual(consumer.messages()[0][1]["error"], "timeout")

    def test_timeoutRunsFromJobWhileQueued(self) -> None:
        self.startJob()
        consumer2 = self.h.consumer()
        consumer2.send(b"JOB_", dict(STT_JOB, timeout_s=2))
        self.h.clock.advance(2)
        [(verb, body)] = consumer2.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "timeout"))
        self.assertEqual(self.h.farm.dispatchers["stt"].queueDepth(), 0)


class EarlyUploadTests(SynchronousTestCase):
    """
    A JOB_ with C{"early":true} brings its upload with it, without waiting
    for ASGN (docs/protocol.rst §5.3): up to the farm's early_upload bytes.
    """

    def setUp(self) -> None:
        self.h = FarmHarness(max_frame=4096, max_job_bytes=100_000, queue_timeout=5,
                             early_upload=1000)

    def jobAndUpload(self, audio: bytes, **job) -> bytes:
        from privox.framing import encodeFrame
        from privox.messages import controlFrame

        fields = dict(STT_JOB, size=len(audio), early=True, **job)
        return controlFrame(b"JOB_", fields) + encodeFrame(b"DATA", audio[:3]) + encodeFrame(b"DATA", audio[3:])

    def test_withTheJob(self) -> None:
        """
        JOB_ and its DATA in one piece, or a byte at a time: the producer
        gets the job and then the upload, the consumer ASGN and the result.
        """
        audio = b"0123456789"
        for whole in (True, False):
            h = FarmHarness(early_upload=1000)
            producer = h.producer()
            consumer = h.consumer()
            wire = self.jobAndUpload(audio)
            for piece in [wire] if whole else [bytes([b]) for b in wire]:
                consumer.raw(piece)
            [(verb, asgn)] = consumer.messages()
            self.assertEqual(verb, "ASGN")
            messages = producer.messages()
            self.assertEqual(messages[0][0], "JOB_")
            self.assertNotIn("early", messages[0][1])
            self.assertEqual(b"".join(body for _, body in messages[1:]), audio)
            producer.send(b"RSLT", {"id": asgn["id"], "text": "ok"})
            self.assertEqual(consumer.messages(), [("RSLT", {"id": asgn["id"], "text": "ok"})])
            self.assertEqual(h.farm.counters.succeeded, 1)

    def test_heldWhileQueued(self) -> None:
        """
        While the job waits for a producer the farm holds its upload, and
        the producer that takes the job gets all of it, after JOB_.
        """
        producer = self.h.producer()
        first = self.h.consumer()
        first.send(b"JOB_", dict(STT_JOB, size=1))
        [(_, busy)] = first.messages()
        producer.messages()
        queued = self.h.consumer()
        queued.raw(self.jobAndUpload(b"abcdefghij"))
        self.assertEqual(queued.messages(), [])
        first.data(b"x")
        producer.messages()
        producer.send(b"RSLT", {"id": busy["id"], "text": "first"})
        [(verb, asgn)] = queued.messages()
        self.assertEqual(verb, "ASGN")
        self.assertEqual(
            producer.messages(),
            [("JOB_", {"id": asgn["id"], "model": "whisper:tiny.en", "language": "en",
                       "size": 10, "format": "wav", "timeout_s": 60.0}),
             ("DATA", b"abcdefghij")],
        )

    def test_refusedJobsUploadDiscarded(self) -> None:
        """
        A JOB_ the farm refuses still owes its early upload: the bytes are
        read and dropped, and the connection serves the next job.
        """
        producer = self.h.producer(models=["whisper:tiny.en"], languages=["en"])
        consumer = self.h.consumer()
        consumer.raw(self.jobAndUpload(b"0123456789", model="vosk:ko"))
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["id"], body["error"]), ("FAIL", None, "no_producer"))
        self.assertEqual(producer.messages(), [])
        self.assertFalse(consumer.closed)
        consumer.raw(self.jobAndUpload(b"9876543210"))
        self.assertEqual([v for v, _ in consumer.messages()], ["ASGN"])
        self.assertEqual(b"".join(b for v, b in producer.messages() if v == "DATA"), b"9876543210")

    def test_queueTimeoutDropsTheUpload(self) -> None:
        producer = self.h.producer()
        busy = self.h.consumer()
        busy.send(b"JOB_", dict(STT_JOB, size=1))
        queued = self.h.consumer()
        queued.raw(self.jobAndUpload(b"0123456789"))
        [job] = [j for j in self.h.farm.jobs if j.consumer is queued.protocol.session]
        self.assertEqual(b"".join(job._early), b"0123456789")
        self.h.clock.advance(5)
        [(verb, body)] = queued.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "no_producer"))
        self.assertEqual(job._early, [])
        self.assertFalse(queued.closed)
        self.assertEqual([v for v, _ in producer.messages()], ["JOB_"])

    def test_uploadBeyondEarlyLimit(self) -> None:
        """
        An early upload larger than early_upload is a protocol error, and so
        is DATA before ASGN after a JOB_ that did not say early.
        """
        from privox.messages import controlFrame

        producer = self.h.producer()
        tooLarge = self.h.consumer()
        tooLarge.send(b"JOB_", dict(STT_JOB, size=1001, early=True))
        [(verb, body)] = tooLarge.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertIn("1 to 1000 bytes", body["message"])
        self.assertTrue(tooLarge.closed)

        busy = self.h.consumer()
        busy.send(b"JOB_", dict(STT_JOB, size=1))
        notEarly = self.h.consumer()
        notEarly.raw(controlFrame(b"JOB_", STT_JOB))
        notEarly.data(b"0123456789")
        self.assertEqual(notEarly.messages()[-1][1]["error"], "protocol")
        self.assertTrue(notEarly.closed)
        self.assertEqual([v for v, _ in producer.messages()], ["JOB_"])

    def test_turnedOff(self) -> None:
        h = FarmHarness(early_upload=0)
        h.producer()
        consumer = h.consumer()
        consumer.raw(self.jobAndUpload(b"0123456789"))
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "protocol"))
        self.assertIn("early_upload", body["message"])


def offer(key: str) -> dict[str, str]:
    # Its shape is all a farm checks; consumers check the rest.
    return {"certificate": "c", "key": key, "signature": "s"}


class EarlySealTests(SynchronousTestCase):
    """
    A sealed job whose small upload comes with its JOB_, sealed for the node
    the consumer names (docs/protocol.rst §5.7): that node takes it if it is
    idle; otherwise any node does, and the upload comes again after ASGN.
    """

    def setUp(self) -> None:
        self.h = FarmHarness(max_frame=4096, max_job_bytes=100_000, queue_timeout=5,
                             early_upload=1000)

    def node(self, key: str, early: bool = True) -> Any:
        return self.h.producer(key="pk-" + key, seal=offer(key), earlySeal=early)

    def sealedJob(self, upload: bytes, node: str | None = "A", **job: Any) -> bytes:
        seal = {"ephemeral": "E"} | ({"for": node} if node is not None else {})
        fields = dict(STT_JOB, size=len(upload), early=True, seal=seal, **job)
        return (
            controlFrame(b"JOB_", fields)
            + encodeFrame(b"DATA", upload[:3])
            + encodeFrame(b"DATA", upload[3:])
        )

    def test_theNodeItIsSealedFor(self) -> None:
        """
        The named node is idle: it gets the job, naming its key, and the
        upload that came with it (in one piece or a byte at a time); ASGN
        says the node takes early seals.
        """
        for whole in (True, False):
            self.setUp()
            b, a = self.node("B"), self.node("A")  # B is idle longest
            consumer = self.h.consumer()
            wire = self.sealedJob(b"0123456789")
            for piece in [wire] if whole else [bytes([x]) for x in wire]:
                consumer.raw(piece)
            [(verb, asgn)] = consumer.messages()
            self.assertEqual(verb, "ASGN")
            self.assertEqual(asgn["seal"]["key"], "A")
            self.assertIs(asgn["early_seal"], True)
            self.assertIs(asgn["early"], True)  # the upload went with it
            self.assertEqual(b.messages(), [])
            [(verb, job), *data] = a.messages()
            self.assertEqual((verb, job["seal"]), ("JOB_", {"ephemeral": "E", "for": "A"}))
            self.assertEqual(b"".join(body for _, body in data), b"0123456789")
            a.send(b"RSLT", {"id": asgn["id"], "sealed": True})
            self.assertEqual([v for v, _ in consumer.messages()], ["RSLT"])

    def test_busyNode(self) -> None:
        """
        The named node is busy: another takes the job, without the key it
        was sealed for, and without that upload, which the farm drops (a
        byte at a time too); the upload sealed again after ASGN is the one
        it gets.
        """
        for whole in (True, False):
            self.setUp()
            a, b = self.node("A"), self.node("B")
            first = self.h.consumer()
            first.send(b"JOB_", dict(STT_JOB, size=1))  # A, idle longest
            self.assertEqual([v for v, _ in a.messages()], ["JOB_"])
            consumer = self.h.consumer()
            wire = self.sealedJob(b"sealed-for-A")
            for piece in [wire] if whole else [bytes([x]) for x in wire]:
                consumer.raw(piece)
            [(verb, asgn)] = consumer.messages()
            self.assertEqual((verb, asgn["seal"]["key"]), ("ASGN", "B"))
            self.assertNotIn("early", asgn)
            [(verb, job)] = b.messages()
            self.assertEqual((verb, job["seal"], job["size"]), ("JOB_", {"ephemeral": "E"}, 12))
            again = encodeFrame(b"DATA", b"sealed-for-B")
            for piece in [again] if whole else [bytes([x]) for x in again]:
                consumer.raw(piece)
            self.assertEqual(b"".join(body for _, body in b.messages()), b"sealed-for-B")
            self.assertFalse(consumer.closed)
            b.send(b"RSLT", {"id": asgn["id"], "sealed": True})
            self.assertEqual([v for v, _ in consumer.messages()], ["RSLT"])
            self.assertEqual(a.messages(), [])

    def test_queuedWhileNodeBusy(self) -> None:
        """
        No node is free: the job waits for any, its early upload dropped as
        it comes, and the one that takes it gets only the upload sent after
        ASGN.
        """
        a = self.node("A")
        busy = self.h.consumer()
        busy.send(b"JOB_", dict(STT_JOB, size=1))
        [(_, first)] = busy.messages()
        consumer = self.h.consumer()
        consumer.raw(self.sealedJob(b"sealed-for-A"))
        [job] = [j for j in self.h.farm.jobs if j.consumer is consumer.protocol.session]
        self.assertEqual(job._early, [])
        busy.data(b"x")
        a.messages()
        a.send(b"RSLT", {"id": first["id"], "text": "first"})
        [(verb, asgn)] = consumer.messages()
        # The node it was sealed for, after all; but that upload was dropped.
        self.assertEqual((verb, asgn["seal"]["key"]), ("ASGN", "A"))
        self.assertNotIn("early", asgn)
        self.assertEqual(a.messages(), [("JOB_", {
            "id": asgn["id"], "model": "whisper:tiny.en", "language": "en", "size": 12,
            "format": "wav", "seal": {"ephemeral": "E"}, "timeout_s": 60.0,
        })])
        consumer.data(b"sealed-again")
        self.assertEqual(a.messages(), [("DATA", b"sealed-again")])

    def test_notEveryNode(self) -> None:
        """
        No early seal for a node that did not say it opens them, one that
        is gone, or a key two connections offer (one copied the other's):
        the job goes to the node idle longest and its upload comes again.
        """
        for target, nodes in [("old", [("old", False)]), ("C", [("C", True), ("B", True)]),
                              ("A", [("A", True), ("A", True)])]:
            self.setUp()
            peers = [self.node(key, early) for key, early in nodes]
            if target == "C":
                peers.pop(0).lose()
            consumer = self.h.consumer()
            consumer.raw(self.sealedJob(b"0123456789", node=target))
            [(verb, asgn)] = consumer.messages()
            self.assertEqual(verb, "ASGN")
            self.assertEqual(asgn["seal"]["key"], nodes[-len(peers)][0])
            [(verb, job)] = peers[0].messages()
            self.assertEqual((verb, job["seal"]), ("JOB_", {"ephemeral": "E"}), target)
            consumer.data(b"9876543210")
            self.assertEqual(peers[0].messages(), [("DATA", b"9876543210")])
            peers[0].send(b"RSLT", {"id": asgn["id"], "sealed": True})
            self.assertEqual([v for v, _ in consumer.messages()], ["RSLT"])
        peers[1].lose()
        self.assertEqual(list(self.h.farm._sealKeys), [("stt", "A")])
        peers[0].lose()
        self.assertEqual(self.h.farm._sealKeys, {})
        self.node("A")  # offered again once its connections left: a copy
        self.assertEqual(self.h.farm._sealKeys, {})

    def test_sealedForNeedsEarly(self) -> None:
        self.node("A")
        consumer = self.h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, seal={"ephemeral": "E", "for": "A"}))
        [(verb, body)] = consumer.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "bad_request"))
        self.assertIn("early", body["message"])

    def test_nextJobOnlyAfterBoth(self) -> None:
        """
        A JOB_ before the dropped upload has all come is a protocol error,
        as before any upload it owes.
        """
        self.node("A")
        self.node("B")
        busy = self.h.consumer()
        busy.send(b"JOB_", dict(STT_JOB, size=1))  # A
        consumer = self.h.consumer()
        consumer.raw(self.sealedJob(b"0123456789")[:-3])
        consumer.send(b"JOB_", STT_JOB)
        self.assertEqual(consumer.messages()[-1][1]["error"], "protocol")
        self.assertTrue(consumer.closed)


class LivenessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = FarmHarness(ping_interval=10)

    def test_idleProducerPinged(self) -> None:
        producer = self.h.producer()
        self.h.clock.advance(10)
        self.assertEqual(producer.messages(), [("PING", {})])
        producer.send(b"PONG")
        self.h.clock.advance(9.9)
        self.assertEqual(producer.messages(), [])
        self.h.clock.advance(0.1)
        self.assertEqual(producer.messages(), [("PING", {})])
        self.assertFalse(producer.closed)

    def test_silentProducerDropped(self) -> None:
        producer = self.h.producer()
        self.h.clock.advance(10)
        producer.messages()
        self.h.clock.advance(4.9)
        self.assertFalse(producer.closed)
        self.h.clock.advance(0.1)
        self.assertTrue(producer.closed)
        producer.lose()
        self.assertFalse(self.h.farm.dispatchers["stt"].canServe("x", None))

    def test_busyProducerNotPinged(self) -> None:
        producer = self.h.producer()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        producer.messages()
        self.h.clock.advance(30)
        self.assertEqual(producer.messages(), [])
        self.assertFalse(producer.closed)

    def test_producerPingAnswered(self) -> None:
        producer = self.h.producer()
        producer.send(b"PING")
        self.assertEqual(producer.messages(), [("PONG", {})])


class BackpressureTests(SynchronousTestCase):
    def test_slowProducerPausesConsumer(self) -> None:
        h = FarmHarness()
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        # The producer's socket buffer fills: Twisted pauses its producer.
        producer.transport.producer.pauseProducing()
        self.assertEqual(consumer.transport.producerState, "paused")
        producer.transport.producer.resumeProducing()
        self.assertEqual(consumer.transport.producerState, "producing")

    def test_slowConsumerPausesProducer(self) -> None:
        h = FarmHarness()
        producer = h.producer("tts")
        consumer = h.consumer("tts")
        consumer.send(b"JOB_", {"model": "m", "text": "hi", "size": 0})
        consumer.transport.producer.pauseProducing()
        self.assertEqual(producer.transport.producerState, "paused")

    def test_closingUnlinksAtOnce(self) -> None:
        """
        A connection the farm closes lets go of its job at once, so a paused
        peer resumes and the close is not held open by the relay.
        """
        h = FarmHarness()
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        [(_, asgn)] = consumer.messages()
        consumer.transport.producer.pauseProducing()
        self.assertEqual(producer.transport.producerState, "paused")
        producer.raw(b"garbage!garbage!")
        # The closed connection no longer produces for its transport; the
        # open one stays its own transport's producer, linked to no one.
        self.assertIsNone(producer.transport.producer)
        self.assertIs(consumer.transport.producer, consumer.protocol)
        self.assertEqual(producer.transport.producerState, "producing")
        consumer.transport.producer.resumeProducing()
        consumer.transport.producer.pauseProducing()
        self.assertEqual(producer.transport.producerState, "producing")
        self.assertEqual(consumer.messages()[0][1]["error"], "producer_lost")

    def test_pausedConnectionCloses(self) -> None:
        """
        A connection is its transport's producer for its whole life; one
        whose writes are backed up when the farm closes it stops being
        one, so Twisted's loseConnection is not held open by it.
        """
        h = FarmHarness()
        producer = h.producer()
        producer.transport.producer.pauseProducing()
        producer.raw(b"garbage!garbage!")
        self.assertIsNone(producer.transport.producer)
        self.assertTrue(producer.transport.disconnecting)

    def test_jobEndResumesPausedPeer(self) -> None:
        h = FarmHarness()
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", STT_JOB)
        [(_, asgn)] = consumer.messages()
        producer.transport.producer.pauseProducing()
        producer.send(b"FAIL", {"id": asgn["id"], "error": "engine_error", "message": "x"})
        # The consumer must be able to finish its (discarded) upload.
        self.assertEqual(consumer.transport.producerState, "producing")
        # Unlinked: the producer's writes backing up again hold no one.
        producer.transport.producer.resumeProducing()
        producer.transport.producer.pauseProducing()
        self.assertEqual(consumer.transport.producerState, "producing")
        self.assertIs(producer.transport.producer, producer.protocol)


class CutThroughTests(SynchronousTestCase):
    """
    DATA is relayed as it arrives: the farm holds no whole frame.
    """

    def test_uploadForwardedInPieces(self) -> None:
        h = FarmHarness()
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=10))
        [(_, asgn)] = consumer.messages()
        producer.messages()
        consumer.raw(b"DATA00000010abcd")
        self.assertEqual(producer.messages(), [("DATA", b"abcd")])
        self.assertEqual(consumer.protocol._decoder.pending(), 0)
        consumer.raw(b"efghij")
        self.assertEqual(producer.messages(), [("DATA", b"efghij")])

    def test_resultForwardedInPieces(self) -> None:
        h = FarmHarness()
        producer = h.producer("tts")
        consumer = h.consumer("tts")
        consumer.send(b"JOB_", {"model": "m", "text": "hi", "size": 0})
        [(_, asgn)] = consumer.messages()
        producer.messages()
        producer.send(b"RSLT", {"id": asgn["id"], "format": "wav", "size": 6})
        consumer.messages()
        producer.raw(b"DATA00000006abc")
        self.assertEqual(consumer.messages(), [("DATA", b"abc")])
        producer.raw(b"def")
        self.assertEqual(consumer.messages(), [("DATA", b"def")])

    def test_oversizedPieceRefused(self) -> None:
        """
        DATA beyond the upload announced in JOB_ is a protocol error even
        when it arrives in pieces.
        """
        h = FarmHarness()
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=4))
        consumer.messages()
        producer.messages()
        consumer.raw(b"DATA00000006abcd")
        consumer.raw(b"ef")
        self.assertTrue(consumer.closed)


class ShutdownTests(SynchronousTestCase):
    def test_gracefulStop(self) -> None:
        h = FarmHarness(shutdown_grace=30)
        producer = h.producer()
        running = h.consumer()
        running.send(b"JOB_", dict(STT_JOB, size=1))
        [(_, asgn)] = running.messages()
        queued = h.consumer()
        queued.send(b"JOB_", STT_JOB)
        stopped = h.farm.shutdown()
        [(verb, body)] = queued.messages()
        self.assertEqual((verb, body["error"]), ("FAIL", "shutting_down"))
        self.assertNoResult(stopped)
        # New work is refused, running work finishes.
        queued.send(b"JOB_", STT_JOB)
        self.assertEqual(queued.messages()[0][1]["error"], "shutting_down")
        late = h.peer()
        late.send(b"HELO", helo())
        self.assertEqual(late.messages()[0][1]["error"], "shutting_down")
        running.data(b"x")
        producer.send(b"RSLT", {"id": asgn["id"], "text": "done"})
        self.successResultOf(stopped)
        self.assertEqual(
            running.messages(),
            [("RSLT", {"id": asgn["id"], "text": "done"}),
             ("FAIL", {"id": None, "error": "shutting_down", "message": "the farm is shutting down"})],
        )
        self.assertTrue(running.closed and producer.closed and queued.closed)

    def test_graceBound(self) -> None:
        h = FarmHarness(shutdown_grace=5)
        producer = h.producer()
        consumer = h.consumer()
        consumer.send(b"JOB_", dict(STT_JOB, size=1))
        consumer.messages()
        stopped = h.farm.shutdown()
        h.clock.advance(5)
        self.successResultOf(stopped)
        [(verb, body), (closing, _)] = consumer.messages()
        self.assertEqual((verb, body["error"], closing), ("FAIL", "shutting_down", "FAIL"))
        self.assertIsNotNone(body["id"])
        self.assertTrue(consumer.closed and producer.closed)


class BlockingWorkTests(SynchronousTestCase):
    def test_fewAtOnce(self) -> None:
        """
        Blocking work (converting uploads for original nodes) runs at most
        BLOCKING_AT_ONCE pieces at a time; the rest wait their turn.
        """
        started: list[Deferred[str]] = []

        def runInThread(f, *args):
            d: Deferred[str] = Deferred()
            started.append(d)
            return d

        h = FarmHarness()
        h.farm.runInThread = runInThread
        results = [h.farm.runBlocking(str, n) for n in range(BLOCKING_AT_ONCE + 2)]
        self.assertEqual(len(started), BLOCKING_AT_ONCE)
        started[0].callback("done")
        self.assertEqual(self.successResultOf(results[0]), "done")
        self.assertEqual(len(started), BLOCKING_AT_ONCE + 1)
