"""
Scheduling rules, with time passed in as plain numbers.
"""

from twisted.trial.unittest import SynchronousTestCase

from privox.farm.dispatcher import Capability, Dispatcher, NoProducer

WHISPER = Capability.of(["whisper:tiny.en"], ["en"])
ANY_MODEL = Capability.of(["*"], [])
VOSK_KO = Capability.of(["vosk:ko"], ["ko"])


class CapabilityTests(SynchronousTestCase):
    def test_languages(self) -> None:
        self.assertTrue(WHISPER.serves("whisper:tiny.en", "en"))
        self.assertTrue(WHISPER.serves("whisper:tiny.en", None))
        self.assertFalse(WHISPER.serves("whisper:tiny.en", "de"))
        self.assertFalse(WHISPER.serves("whisper:base", "en"))
        self.assertTrue(Capability.of(["m"], ["*"]).serves("m", "xx"))
        self.assertTrue(ANY_MODEL.serves("anything", "xx"))


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.d = Dispatcher(queueTimeout=5.0)

    def test_leastRecentlyIdleFirst(self) -> None:
        """
        Jobs go to the producer idle longest, so work spreads over everyone.
        """
        for i, name in enumerate("abc"):
            self.d.addProducer(name, WHISPER, now=float(i))
        self.assertEqual(self.d.submit("j1", "whisper:tiny.en", "en", now=10), "a")
        self.assertEqual(self.d.submit("j2", "whisper:tiny.en", "en", now=10), "b")
        self.assertIsNone(self.d.release("a", now=11))
        self.assertEqual(self.d.submit("j3", "whisper:tiny.en", "en", now=12), "c")
        self.assertEqual(self.d.submit("j4", "whisper:tiny.en", "en", now=12), "a")

    def test_roundRobinUnderSteadyLoad(self) -> None:
        names = ["p0", "p1", "p2", "p3"]
        for name in names:
            self.d.addProducer(name, WHISPER, now=0)
        served = []
        for t in range(1, 13):
            producer = self.d.submit(f"j{t}", "whisper:tiny.en", None, now=t)
            served.append(producer)
            self.d.release(producer, now=t + 0.5)
        self.assertEqual(served, names * 3)

    def test_takeThis(self) -> None:
        """
        One producer by name (the node an upload was sealed for): taken only
        while idle and able to serve the job; the others keep their turn.
        """
        self.d.addProducer("a", WHISPER, now=0)
        self.d.addProducer("b", WHISPER, now=1)
        none = frozenset()
        self.assertFalse(self.d.takeThis("b", "vosk:ko", "ko", none))
        self.assertFalse(self.d.takeThis("b", "whisper:tiny.en", "en", frozenset({"seal"})))
        self.assertTrue(self.d.isIdle("b"))
        self.assertTrue(self.d.takeThis("b", "whisper:tiny.en", "en", none))
        self.assertFalse(self.d.isIdle("b"))
        self.assertFalse(self.d.takeThis("b", "whisper:tiny.en", "en", none))
        self.assertEqual(self.d.submit("j", "whisper:tiny.en", "en", now=2), "a")

    def test_capabilityMatch(self) -> None:
        self.d.addProducer("ko", VOSK_KO, now=0)
        self.d.addProducer("en", WHISPER, now=1)
        self.assertEqual(self.d.submit("j", "whisper:tiny.en", "en", now=2), "en")
        self.assertEqual(self.d.submit("k", "vosk:ko", "ko", now=2), "ko")

    def test_wildcardProducerCompetesByIdleTime(self) -> None:
        self.d.addProducer("specific", WHISPER, now=5)
        self.d.addProducer("any", ANY_MODEL, now=1)
        self.assertEqual(self.d.submit("j", "whisper:tiny.en", "en", now=6), "any")
        self.assertEqual(self.d.submit("k", "whisper:tiny.en", "en", now=6), "specific")

    def test_languageFilterSkipsIdleProducers(self) -> None:
        self.d.addProducer("en", Capability.of(["*"], ["en"]), now=0)
        self.d.addProducer("ko", Capability.of(["*"], ["ko"]), now=1)
        self.assertEqual(self.d.submit("j", "vosk:x", "ko", now=2), "ko")

    def test_unsupportedFailsAtOnce(self) -> None:
        self.d.addProducer("en", WHISPER, now=0)
        self.assertRaises(NoProducer, self.d.submit, "j", "vosk:ko", "ko", now=1)
        self.assertRaises(NoProducer, self.d.submit, "j", "whisper:tiny.en", "de", now=1)
        self.assertEqual(self.d.queueDepth(), 0)

    def test_unsupportedCountsBusyProducers(self) -> None:
        """
        A model served only by busy producers is supported: the job queues.
        """
        self.d.addProducer("en", WHISPER, now=0)
        self.d.submit("j1", "whisper:tiny.en", "en", now=1)
        self.assertIsNone(self.d.submit("j2", "whisper:tiny.en", "en", now=1))
        self.assertEqual(self.d.queueDepth(), 1)

    def test_noProducersAtAll(self) -> None:
        self.assertRaises(NoProducer, self.d.submit, "j", "m", None, now=0)

    def test_queueIsFifo(self) -> None:
        self.d.addProducer("p", WHISPER, now=0)
        self.d.submit("running", "whisper:tiny.en", None, now=0)
        for name in ("q1", "q2", "q3"):
            self.assertIsNone(self.d.submit(name, "whisper:tiny.en", None, now=1))
        self.assertEqual(self.d.release("p", now=2), "q1")
        self.assertEqual(self.d.release("p", now=3), "q2")
        self.assertEqual(self.d.release("p", now=4), "q3")
        self.assertIsNone(self.d.release("p", now=5))
        self.assertTrue(self.d.isIdle("p"))

    def test_releaseSkipsJobsTheProducerCannotServe(self) -> None:
        self.d.addProducer("ko", VOSK_KO, now=0)
        self.d.addProducer("en", WHISPER, now=0)
        self.d.submit("busy-ko", "vosk:ko", None, now=0)
        self.d.submit("busy-en", "whisper:tiny.en", None, now=0)
        self.d.submit("wants-ko", "vosk:ko", None, now=1)
        self.d.submit("wants-en", "whisper:tiny.en", None, now=1)
        self.assertEqual(self.d.release("en", now=2), "wants-en")
        self.assertEqual(self.d.release("ko", now=2), "wants-ko")

    def test_newProducerTakesQueuedJob(self) -> None:
        self.d.addProducer("p", WHISPER, now=0)
        self.d.submit("j1", "whisper:tiny.en", None, now=0)
        self.d.submit("j2", "whisper:tiny.en", None, now=1)
        self.assertEqual(self.d.addProducer("late", WHISPER, now=2), "j2")
        self.assertFalse(self.d.isIdle("late"))

    def test_queueTimeout(self) -> None:
        self.d.addProducer("p", WHISPER, now=0)
        self.d.submit("running", "whisper:tiny.en", None, now=0)
        self.d.submit("q1", "whisper:tiny.en", None, now=1)
        self.d.submit("q2", "whisper:tiny.en", None, now=2)
        self.assertEqual(self.d.nextDeadline(), 6)
        self.assertEqual(self.d.expire(now=5.9), [])
        self.assertEqual(self.d.expire(now=6), ["q1"])
        self.assertEqual(self.d.nextDeadline(), 7)
        self.assertEqual(self.d.expire(now=100), ["q2"])
        self.assertIsNone(self.d.nextDeadline())

    def test_withdraw(self) -> None:
        self.d.addProducer("p", WHISPER, now=0)
        self.d.submit("running", "whisper:tiny.en", None, now=0)
        self.d.submit("q1", "whisper:tiny.en", None, now=1)
        self.assertTrue(self.d.withdraw("q1"))
        self.assertFalse(self.d.withdraw("q1"))
        self.assertIsNone(self.d.release("p", now=2))

    def test_noDoubleAssignment(self) -> None:
        """
        However jobs and producers interleave, a producer holds at most one
        job, and every job is held by at most one producer.
        """
        caps = [WHISPER, ANY_MODEL, Capability.of(["whisper:tiny.en", "vosk:ko"], [])]
        holding: dict[str, str] = {}
        for i in range(30):
            self.d.addProducer(f"p{i}", caps[i % 3], now=i)
        now = 100.0
        for n in range(300):
            now += 1
            job = f"j{n}"
            producer = self.d.submit(job, "whisper:tiny.en", "en", now)
            if producer is not None:
                self.assertNotIn(producer, holding)
                holding[producer] = job
            if n % 3 == 0 and holding:
                done = sorted(holding)[n % len(holding)]
                del holding[done]
                nxt = self.d.release(done, now)
                if nxt is not None:
                    holding[done] = nxt
            self.d.expire(now)
        self.assertEqual(len(set(holding.values())), len(holding))

    def test_removeProducer(self) -> None:
        self.d.addProducer("a", WHISPER, now=0)
        self.d.addProducer("b", WHISPER, now=1)
        self.d.removeProducer("a")
        self.assertEqual(self.d.submit("j", "whisper:tiny.en", None, now=2), "b")
        self.d.removeProducer("b")
        self.assertFalse(self.d.canServe("whisper:tiny.en", None))
        self.assertEqual(self.d.producersByModel(), {})

    def test_producersByModel(self) -> None:
        self.d.addProducer("a", WHISPER, now=0)
        self.d.addProducer("b", WHISPER, now=0)
        self.d.addProducer("c", ANY_MODEL, now=0)
        self.d.submit("j", "whisper:tiny.en", None, now=1)
        self.assertEqual(self.d.producersByModel(), {"*": (1, 1), "whisper:tiny.en": (2, 1)})

    def test_drain(self) -> None:
        self.d.addProducer("p", WHISPER, now=0)
        self.d.submit("running", "whisper:tiny.en", None, now=0)
        self.d.submit("q1", "whisper:tiny.en", None, now=1)
        self.assertEqual(self.d.drain(), ["q1"])
        self.assertEqual(self.d.queueDepth(), 0)

    def test_addTwiceRefused(self) -> None:
        self.d.addProducer("a", WHISPER, now=0)
        self.assertRaises(ValueError, self.d.addProducer, "a", WHISPER, now=1)
