"""
The API's farm exchange: the farm directory's config lines, weighted choice,
pooled connections, and retry/fallback against real loopback farms that
refuse, hang up, time out, have no free producer, lose the producer mid-job or
refuse the request; down farms and their backoff; the request deadline.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api.errors import BadInput, TimedOut, Unavailable
from privox.api.exchange import (
    MAX_SEGMENTS,
    MAX_WORDS,
    Spoken,
    TimedText,
    TimedWord,
    Transcribed,
    readSegments,
)
from privox.api.farmlist import FarmEntry, parseFarms, weightedChoice
from privox.api.farms import FarmExchange
from privox.engines.base import Segment, STTJob, Transcript, Word
from privox.engines.digest import ToneEngine, digestOf, toneFor
from privox.engines.piper import PiperEngine
from privox.node.echo import DigestHandler
from privox.node.pool import EnginePool, transcriptAnswer
from privox.wav import wavSeconds
from tests.apifarms import (
    CountingReactor,
    DroppingEngine,
    HangingEngine,
    LiveFarm,
    RecordingEngine,
    closedPort,
    deadEntry,
    hangUpServer,
    startFarm,
)
from tests.support import until


def transcript(audio: bytes) -> str:
    return f"sha256:{digestOf(audio)} bytes:{len(audio)}"


class WordsEngine:
    """
    An STT engine that hears "hello world", timing its words when the job
    asks; it keeps the jobs it was given.
    """

    name = "fake:words"
    languages = ()

    def __init__(self) -> None:
        self.jobs: list[STTJob] = []

    def load(self) -> None:
        pass

    def transcribe(self, job: STTJob, data: bytes) -> Transcript:
        self.jobs.append(job)
        words = (Word(0.0, 0.4, "hello", 0.9), Word(0.45, 0.9, "world", None)) if job.words else ()
        return Transcript(
            "hello world", "en", 1.0, (Segment(0.0, 1.0, "hello world", -0.1, 0.01, words),)
        )


# Configuration


class FarmEntryParseTests(SynchronousTestCase):
    def test_minimal(self) -> None:
        entry = FarmEntry.parse("main tcp:host=farm.example:port=1776 tcp:host=farm.example:port=1777")
        self.assertEqual(
            entry,
            FarmEntry("main", "tcp:host=farm.example:port=1776", "tcp:host=farm.example:port=1777"),
        )
        self.assertEqual(entry.weight, 1.0)
        self.assertFalse(entry.fallback)
        self.assertEqual(entry.services, ["stt", "tts"])

    def test_weightAndFallback(self) -> None:
        entry = FarmEntry.parse(
            "  spare  tcp:host=10.0.0.2:port=1776\tnone weight=2.5 fallback \n"
        )
        self.assertEqual(entry, FarmEntry("spare", "tcp:host=10.0.0.2:port=1776", None, 2.5, True))
        self.assertEqual(entry.services, ["stt"])
        self.assertEqual(entry.endpoint("tts"), None)

    def test_noneAnyCase(self) -> None:
        entry = FarmEntry.parse("voices NONE tls:host=farm.example:port=1777 fallback weight=3")
        self.assertEqual((entry.stt, entry.weight, entry.fallback), (None, 3.0, True))
        self.assertEqual(entry.services, ["tts"])

    def test_badLines(self) -> None:
        good = "tcp:host=h:port=1"
        for line, words in [
            ("", "expected 'NAME STT-ENDPOINT"),
            ("main tcp:host=h:port=1", "expected 'NAME STT-ENDPOINT"),
            ("main none none", "serves neither"),
            (f"main {good} none weight=0", "positive number"),
            (f"main {good} none weight=-2", "positive number"),
            (f"main {good} none weight=heavy", "positive number"),
            (f"main {good} none weight=", "positive number"),
            (f"main {good} none weight=nan", "positive number"),
            (f"main {good} none weight=inf", "positive number"),
            (f"main {good} none fast", "unknown option 'fast'"),
            (f"main {good} none fallback fallback", "given twice"),
            (f"main {good} none weight=1 weight=2", "given twice"),
            ("main localhost:1776 none", "bad stt endpoint 'localhost:1776'"),
            (f"main {good} tcp:host=h:port=x", "bad tts endpoint"),
            ("main tcp:host=h none", "bad stt endpoint"),
        ]:
            with self.assertRaises(ValueError, msg=line) as caught:
                FarmEntry.parse(line)
            self.assertIn(words, str(caught.exception), line)
            if line:
                self.assertIn("main", str(caught.exception))

    def test_constructorChecks(self) -> None:
        self.assertRaises(ValueError, FarmEntry, "x", None, None)
        self.assertRaises(ValueError, FarmEntry, "", "tcp:host=h:port=1", None)
        self.assertRaises(ValueError, FarmEntry, "x", "tcp:host=h:port=1", None, 0.0)
        self.assertRaises(ValueError, FarmEntry, "x", "tcp:host=h:port=1", None, True)

    def test_directory(self) -> None:
        farms = parseFarms(
            [
                "# name  stt  tts",
                "",
                "main tcp:host=a:port=1776 tcp:host=a:port=1777 weight=2  # the big one",
                "   ",
                "spare tcp:host=b:port=1776 none fallback",
            ]
        )
        self.assertEqual([f.name for f in farms], ["main", "spare"])
        self.assertEqual((farms[0].weight, farms[1].fallback), (2.0, True))
        with self.assertRaises(ValueError) as caught:
            parseFarms(["a tcp:host=a:port=1 none", "", "a tcp:host=b:port=1 none"])
        self.assertIn("line 3", str(caught.exception))
        self.assertIn("twice", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            parseFarms(["a tcp:host=a:port=1 none", "b tcp:host=b:port=1"])
        self.assertIn("line 2", str(caught.exception))
        self.assertRaises(ValueError, parseFarms, ["# nothing here"])

    def test_exchangeChecks(self) -> None:
        a = FarmEntry("a", "tcp:host=h:port=1", None)
        self.assertRaises(ValueError, FarmExchange, [a, a], Clock())
        self.assertRaises(ValueError, FarmExchange, [a], Clock(), attempts=0)
        self.assertRaises(ValueError, FarmExchange, [a], Clock(), poolSize=0)
        self.assertRaises(ValueError, FarmExchange, [a], Clock(), deadline=0)
        self.assertRaises(ValueError, FarmExchange, [a], Clock(), downBackoff=(5.0, 1.0))


# Selection (no sockets)


def entries(*specs: str) -> list[FarmEntry]:
    return [FarmEntry.parse(spec) for spec in specs]


class SelectionTests(SynchronousTestCase):
    def test_weightedDistribution(self) -> None:
        light, heavy = entries(
            "light tcp:host=h:port=1 none weight=1", "heavy tcp:host=h:port=2 none weight=3"
        )
        rng = random.Random(1776)
        draws = [weightedChoice([light, heavy], rng).name for _ in range(20000)]
        share = draws.count("heavy") / len(draws)
        self.assertTrue(0.73 < share < 0.77, share)

    def test_seededIsRepeatable(self) -> None:
        farms = entries(*(f"f{i} tcp:host=h:port={i + 1} none weight={i + 1}" for i in range(5)))
        first = [weightedChoice(farms, random.Random(7)).name for _ in range(3)]
        again = [weightedChoice(farms, random.Random(7)).name for _ in range(3)]
        self.assertEqual(first, again)

    def test_firstPickFollowsWeights(self) -> None:
        farms = entries(
            "a tcp:host=h:port=1 none weight=1",
            "b tcp:host=h:port=2 none weight=9",
            "spare tcp:host=h:port=3 none weight=1000 fallback",
        )
        exchange = FarmExchange(farms, Clock(), rng=random.Random(3))
        serving = exchange.farms
        picks = [exchange._next(serving, set(), 0).entry.name for _ in range(10000)]
        self.assertNotIn("spare", picks)  # however heavy, a fallback is never drawn
        self.assertTrue(0.88 < picks.count("b") / len(picks) < 0.92)

    def test_drawsFollowHowFarmsServed(self) -> None:
        """
        A farm that lost the jobs it was given lately is drawn less, in
        proportion, but never not at all; answering again brings it back.
        """
        farms = entries("a tcp:host=h:port=1 none", "b tcp:host=h:port=2 none")
        exchange = FarmExchange(farms, Clock(), rng=random.Random(5))
        a, b = exchange.farms

        def shareOfA() -> float:
            picks = [exchange._next(exchange.farms, set(), 0) for _ in range(10000)]
            return picks.count(a) / len(picks)

        self.assertTrue(0.48 < shareOfA() < 0.52)
        for _ in range(20):
            a.served.record(False)
        self.assertAlmostEqual(a.served.rate, 0.95 ** 20)
        self.assertTrue(0.23 < shareOfA() < 0.28, shareOfA())  # 0.36 against 1
        for _ in range(200):
            a.served.record(False)
        self.assertTrue(0.03 < shareOfA() < 0.07)  # the floor: 0.05 against 1
        for _ in range(100):
            a.served.record(True)
        self.assertTrue(0.48 < shareOfA() < 0.52)

    def test_distinctPrimariesThenFallbacksInOrder(self) -> None:
        farms = entries(
            *(f"p{i} tcp:host=h:port={i + 1} none" for i in range(5)),
            "spare2 tcp:host=h:port=10 none fallback",
            "spare1 tcp:host=h:port=11 none fallback",
        )
        for seed in range(50):
            exchange = FarmExchange(farms, Clock(), rng=random.Random(seed), attempts=3)
            tried: set[str] = set()
            order = []
            primaries = 0
            while (state := exchange._next(exchange.farms, tried, primaries)) is not None:
                tried.add(state.entry.name)
                order.append(state.entry.name)
                primaries += not state.entry.fallback
            self.assertEqual(len(order), 5)
            self.assertEqual(len(set(order[:3])), 3)
            self.assertTrue(all(name.startswith("p") for name in order[:3]))
            self.assertEqual(order[3:], ["spare2", "spare1"])

    def test_fewerPrimariesThanAttempts(self) -> None:
        farms = entries("only tcp:host=h:port=1 none", "spare tcp:host=h:port=2 none fallback")
        exchange = FarmExchange(farms, Clock(), attempts=3)
        first = exchange._next(exchange.farms, set(), 0)
        self.assertEqual(first.entry.name, "only")
        self.assertEqual(exchange._next(exchange.farms, {"only"}, 1).entry.name, "spare")
        self.assertIsNone(exchange._next(exchange.farms, {"only", "spare"}, 1))

    def test_onlyFarmsServingTheService(self) -> None:
        farms = entries("ears tcp:host=h:port=1 none", "mouth none tcp:host=h:port=2")
        exchange = FarmExchange(farms, Clock())
        self.assertEqual(sorted(exchange.farms[0].pools), ["stt"])
        self.assertEqual(sorted(exchange.farms[1].pools), ["tts"])

    def test_downBackoffDoublesToItsCap(self) -> None:
        clock = Clock()
        [entry] = entries("a tcp:host=h:port=1 none")
        exchange = FarmExchange([entry], clock, downBackoff=(1.0, 5.0))
        [farm] = exchange.farms
        health = farm.health
        self.assertTrue(health.available(clock.seconds()))
        waits = []
        for _ in range(5):
            health.failed(clock.seconds(), "refused")
            start = clock.seconds()
            self.assertFalse(health.isUp())
            self.assertFalse(health.available(clock.seconds()))
            # Another failure while already down does not lengthen the wait.
            health.failed(clock.seconds(), "refused again")
            while not health.available(clock.seconds()):
                clock.advance(0.25)
            waits.append(clock.seconds() - start)
            # Backoff over: one probe at a time.
            health.probe()
            self.assertFalse(health.available(clock.seconds()))
        self.assertEqual(waits, [1.0, 2.0, 4.0, 5.0, 5.0])
        health.reached()
        self.assertTrue(health.isUp() and health.available(clock.seconds()))
        health.failed(clock.seconds(), "refused")
        self.assertEqual(health.retryIn(clock.seconds()), 1.0)

    def test_health(self) -> None:
        farms = entries(
            "main tcp:host=secret.example:port=1 tcp:host=secret.example:port=2 weight=2",
            "spare none tcp:host=secret.example:port=3 fallback",
        )
        exchange = FarmExchange(farms, Clock(), key="api-key-123")
        exchange.farms[1].health.failed(0.0, "refused")
        health = exchange.health()
        self.assertEqual(
            health,
            {
                "farms": [
                    {"name": "main", "services": ["stt", "tts"], "up": True, "fallback": False},
                    {"name": "spare", "services": ["tts"], "up": False, "fallback": True},
                ]
            },
        )
        self.assertNotIn("secret", repr(health))
        self.assertNotIn("api-key-123", repr(health))


# Real farms on loopback


class _LiveTestCase(TestCase):
    timeout = 30

    def exchange(self, farms: list[FarmEntry], **kwargs: Any) -> FarmExchange:
        kwargs.setdefault("rng", random.Random(1776))
        exchange = FarmExchange(farms, kwargs.pop("reactor", reactor), **kwargs)
        self.addCleanup(exchange.stop)
        return exchange

    async def goodFarm(self, name: str, **settings: Any) -> LiveFarm:
        farm = await startFarm(self, name, **settings)
        await farm.producer("stt", DigestHandler())
        await farm.producer("tts", DigestHandler())
        return farm


class PoolTests(_LiveTestCase):
    async def test_sequentialJobsReuseOneConnection(self) -> None:
        farm = await self.goodFarm("main")
        exchange = self.exchange([farm.entry()])
        for n in range(3):
            audio = b"audio %d" % n
            result = await exchange.transcribe("whisper:tiny.en", "en", audio, "auto")
            self.assertEqual(result.text, transcript(audio))
            spoken = await exchange.synthesize("piper:x", "en", None, f"sentence {n}")
            self.assertEqual(spoken, Spoken(toneFor(f"sentence {n}")))
        self.assertEqual(farm.consumerConnections(), 2)  # one per service
        pools = exchange.farms[0].pools
        self.assertEqual((pools["stt"].opened, pools["tts"].opened), (1, 1))
        self.assertEqual((len(pools["stt"].idle), len(pools["stt"].busy)), (1, 0))
        self.assertEqual(farm.farm.counters.succeeded, 6)

    async def test_concurrentJobsCappedByPoolSize(self) -> None:
        farm = await startFarm(self, "main")
        for _ in range(4):
            await farm.producer("stt", DigestHandler())
        exchange = self.exchange([farm.entry()], poolSize=2)
        audios = [b"clip %d" % n for n in range(7)]
        results = await gatherResults(
            [
                Deferred.fromCoroutine(exchange.transcribe("m", None, audio, "auto"))
                for audio in audios
            ]
        )
        self.assertEqual([r.text for r in results], [transcript(a) for a in audios])
        pool = exchange.farms[0].pools["stt"]
        self.assertEqual(pool.opened, 2)
        self.assertEqual(len(pool.idle), 2)
        self.assertEqual(farm.consumerConnections(), 2)

    async def test_brokenConnectionReplaced(self) -> None:
        farm = await self.goodFarm("main")
        exchange = self.exchange([farm.entry()])
        await exchange.transcribe("m", None, b"one", "auto")
        pool = exchange.farms[0].pools["stt"]
        [conn] = pool.idle
        conn.transport.loseConnection()
        await conn.disconnected
        self.assertEqual(pool.idle, [])
        result = await exchange.transcribe("m", None, b"two", "auto")
        self.assertEqual(result.text, transcript(b"two"))
        self.assertEqual(pool.opened, 2)
        self.assertTrue(exchange.health()["farms"][0]["up"])

    async def test_transcribedFields(self) -> None:
        farm = await self.goodFarm("main")
        exchange = self.exchange([farm.entry()])
        result = await exchange.transcribe("whisper:base", "de", b"hallo", "wav")
        # DigestHandler answers text and model; language comes from the request
        # when the producer does not say.
        self.assertEqual(result, Transcribed(transcript(b"hallo"), "whisper:base", "de", None))

    async def test_words(self) -> None:
        """
        C{words=True} reaches the node's engine (its STTJob), and the words
        it timed come back in the segments; without it the job asks for
        none, and RSLT segments carry no C{words} at all.
        """
        farm = await startFarm(self, "main")
        engine = WordsEngine()
        await farm.producer("stt", EnginePool([engine], reactor, reactor.getThreadPool()).handler("stt"))
        exchange = self.exchange([farm.entry()])
        result = await exchange.transcribe("fake:words", None, b"audio", "auto", words=True)
        self.assertTrue(engine.jobs[0].words)
        self.assertEqual(result.segments, (TimedText(
            0.0, 1.0, "hello world", -0.1, 0.01,
            (TimedWord(0.0, 0.4, "hello", 0.9), TimedWord(0.45, 0.9, "world", None)),
        ),))
        result = await exchange.transcribe("fake:words", None, b"audio", "auto")
        self.assertFalse(engine.jobs[1].words)
        self.assertEqual(result.segments, (TimedText(0.0, 1.0, "hello world", -0.1, 0.01),))
        [plain] = transcriptAnswer(engine.transcribe(engine.jobs[1], b""), "m").fields["segments"]
        self.assertEqual(plain, {"start": 0.0, "end": 1.0, "text": "hello world",
                                 "avg_logprob": -0.1, "no_speech_prob": 0.01})

    async def test_wordsToOlderProducers(self) -> None:
        """
        A producer that knows nothing of words gets the flag in its JOB_
        (and ignores it): the transcript comes back without words.
        """
        farm = await startFarm(self, "main")
        engine = RecordingEngine()
        await farm.producer("stt", engine)
        exchange = self.exchange([farm.entry()])
        result = await exchange.transcribe("m", None, b"x", "auto", words=True)
        self.assertIs(engine.jobs[0]["words"], True)
        self.assertEqual(result.text, transcript(b"x"))
        await exchange.transcribe("m", None, b"x", "auto")
        self.assertNotIn("words", engine.jobs[1])

    async def test_speed(self) -> None:
        """
        A TTS job's C{speed} reaches the node: Piper speaks at it (its
        length scale) and says so; an engine that cannot pace speech gets
        the same job and answers at its own pace, which the answer says too.
        """
        farm = await startFarm(self, "main")
        piper = PiperEngine("en_US-joe-medium", deterministic=True)
        tone = ToneEngine("x")
        await deferToThread(piper.load)
        await farm.producer(
            "tts", EnginePool([piper, tone], reactor, reactor.getThreadPool()).handler("tts")
        )
        exchange = self.exchange([farm.entry()])
        text = "Please remember to water the garden."
        own = await exchange.synthesize(piper.name, "en", None, text)
        self.assertEqual(own.speed, 1.0)
        seconds = wavSeconds(own.wav)
        for speed in (0.5, 2.0, 4.0):
            spoken = await exchange.synthesize(piper.name, "en", None, text, speed=speed)
            self.assertEqual(spoken.speed, piper.pacedSpeed(speed))
            self.assertLess(abs(seconds / wavSeconds(spoken.wav) / spoken.speed - 1), 0.15)
        # Beyond the voice's reach: as fast as it goes, the rest for the API.
        self.assertTrue(1.5 < spoken.speed < 4.0, spoken.speed)
        toned = await exchange.synthesize(tone.name, "en", None, text, speed=2.0)
        self.assertEqual(toned, Spoken(toneFor(text), 1.0))

    async def test_speedToOlderProducers(self) -> None:
        """
        A producer that knows nothing of speed gets it in its JOB_ and
        ignores it: the answer is taken at its own pace.
        """
        farm = await startFarm(self, "main")
        engine = RecordingEngine(("m",))
        await farm.producer("tts", engine)
        exchange = self.exchange([farm.entry()])
        spoken = await exchange.synthesize("m", None, None, "Hi.", speed=4.0)
        self.assertEqual(engine.jobs[0]["speed"], 4.0)
        self.assertEqual(spoken.speed, 1.0)
        await exchange.synthesize("m", None, None, "Hi.")
        self.assertNotIn("speed", engine.jobs[1])

    async def test_timeoutSentIsTimeLeft(self) -> None:
        farm = await startFarm(self, "main")
        engine = RecordingEngine()
        await farm.producer("stt", engine)
        exchange = self.exchange([farm.entry()], deadline=7.0)
        await exchange.transcribe("m", None, b"x", "auto")
        [job] = engine.jobs
        self.assertTrue(6.0 < job["timeout_s"] <= 7.0, job["timeout_s"])

    async def test_stopClosesConnections(self) -> None:
        farm = await self.goodFarm("main")
        exchange = self.exchange([farm.entry()])
        await exchange.transcribe("m", None, b"x", "auto")
        await exchange.synthesize("m", None, None, "hi")
        self.assertEqual(farm.consumerConnections(), 2)
        await exchange.stop()
        await until(lambda: farm.consumerConnections() == 0, "farm.consumerConnections() == 0")
        self.assertEqual(farm.consumerConnections(), 0)
        with self.assertRaises(Unavailable):
            await exchange.transcribe("m", None, b"x", "auto")


class RetryTests(_LiveTestCase):
    """
    In each case the first farm fails in its own way and the request
    succeeds at the fallback.
    """

    async def viaFallback(self, first: FarmEntry, **kwargs: Any) -> FarmExchange:
        spare = await self.goodFarm("spare")
        exchange = self.exchange([first, spare.entry(fallback=True)], **kwargs)
        result = await exchange.transcribe("m", None, b"speech", "auto")
        self.assertEqual(result.text, transcript(b"speech"))
        self.assertEqual(spare.farm.counters.succeeded, 1)
        return exchange

    async def test_refusedConnection(self) -> None:
        exchange = await self.viaFallback(deadEntry("dead", await closedPort()))
        self.assertFalse(exchange.health()["farms"][0]["up"])

    async def test_hangsUpBeforeHandshake(self) -> None:
        port = await hangUpServer(self)
        exchange = await self.viaFallback(deadEntry("rude", port))
        self.assertFalse(exchange.health()["farms"][0]["up"])

    async def test_farmTimesOut(self) -> None:
        slow = await startFarm(self, "slow", max_job_timeout=0.3)
        engine = HangingEngine()
        await slow.producer("stt", engine)
        exchange = await self.viaFallback(slow.entry(), deadline=10.0)
        self.assertEqual(engine.started, 1)
        await until(lambda: engine.cancelled == 1, "engine.cancelled == 1")
        self.assertEqual(engine.cancelled, 1)
        # A job timeout is not a connection failure: the farm stays up, and
        # its connection is kept.
        self.assertTrue(exchange.health()["farms"][0]["up"])
        self.assertEqual(len(exchange.farms[0].pools["stt"].idle), 1)

    async def test_noProducer(self) -> None:
        busy = await startFarm(self, "busy", queue_timeout=0.2)
        engine = HangingEngine()
        await busy.producer("stt", engine)
        blocker = await busy.consumer("stt")
        blocker.stt("m", b"hog").addErrback(lambda _: None)
        await until(lambda: engine.started == 1, "engine.started == 1")
        await self.viaFallback(busy.entry())
        self.assertEqual(engine.started, 1)

    async def test_producerLostMidJob(self) -> None:
        flaky = await startFarm(self, "flaky")
        engine = DroppingEngine()
        await flaky.producer("stt", engine)
        await self.viaFallback(flaky.entry())
        self.assertEqual(engine.started, 1)

    async def test_unsupportedModelTriesAnotherFarm(self) -> None:
        other = await startFarm(self, "other")
        await other.producer("stt", DigestHandler(("vosk:de",)))
        await self.viaFallback(other.entry())

    async def test_distinctAttemptsThenFallback(self) -> None:
        counting = CountingReactor()
        ports = [await closedPort() for _ in range(4)]
        spare = await self.goodFarm("spare")
        farms = [deadEntry(f"dead{n}", port) for n, port in enumerate(ports)]
        exchange = self.exchange(
            [*farms, spare.entry(fallback=True)], reactor=counting, attempts=3
        )
        result = await exchange.transcribe("m", None, b"speech", "auto")
        self.assertEqual(result.text, transcript(b"speech"))
        tried = {port: counting.attempts.get(port, 0) for port in ports}
        self.assertEqual(sorted(tried.values()), [0, 1, 1, 1])
        self.assertEqual(counting.attempts[spare.port("stt")], 1)

    async def test_badRequestNotRetried(self) -> None:
        first = await self.goodFarm("first")
        spare = await self.goodFarm("spare")
        exchange = self.exchange([first.entry(), spare.entry(fallback=True)])
        with self.assertRaises(BadInput):
            await exchange.synthesize("piper:x", "en", None, "")
        # One attempt: the first farm refused it; the fallback never heard of it.
        self.assertEqual(first.consumerConnections(), 1)
        self.assertEqual(spare.consumerConnections(), 0)
        self.assertEqual(exchange.farms[1].pools["tts"].opened, 0)
        # The refusal left the connection usable.
        self.assertEqual((await exchange.synthesize("piper:x", "en", None, "ok")).wav, toneFor("ok"))
        self.assertEqual(exchange.farms[0].pools["tts"].opened, 1)

    async def test_noFarmHasTheModel(self) -> None:
        """
        No farm has a producer of the model connected: 503 with Retry-After
        (its nodes may be dialling back in), after asking each farm once.
        """
        a = await startFarm(self, "a")
        await a.producer("stt", DigestHandler(("vosk:de",)))
        b = await startFarm(self, "b")
        await b.producer("stt", DigestHandler(("vosk:fr",)))
        exchange = self.exchange([a.entry(), b.entry(fallback=True)])
        with self.assertRaises(Unavailable) as caught:
            await exchange.transcribe("whisper:tiny", None, b"x", "auto")
        self.assertEqual(caught.exception.status, 503)
        self.assertIsNotNone(caught.exception.retryAfter)
        self.assertIn("no producer serving model 'whisper:tiny' is connected", caught.exception.message)
        self.assertEqual((a.consumerConnections(), b.consumerConnections()), (1, 1))

    async def test_lastRetryableFailIsReported(self) -> None:
        # Unsupported at one farm, no free producer at the other: the model
        # exists, so this is 503 (try later), not 422.
        a = await startFarm(self, "a")
        await a.producer("stt", DigestHandler(("vosk:de",)))
        busy = await startFarm(self, "busy", queue_timeout=0.2)
        engine = HangingEngine()
        await busy.producer("stt", engine)
        blocker = await busy.consumer("stt")
        blocker.stt("m", b"hog").addErrback(lambda _: None)
        await until(lambda: engine.started == 1, "engine.started == 1")
        exchange = self.exchange([a.entry(), busy.entry(fallback=True)])
        with self.assertRaises(Unavailable) as caught:
            await exchange.transcribe("m", None, b"x", "auto")
        self.assertEqual(caught.exception.status, 503)
        self.assertIsNotNone(caught.exception.retryAfter)


class DownFarmTests(_LiveTestCase):
    """
    Real sockets, fake time: backoff is measured on a L{Clock}.
    """

    async def test_deadFarmSkippedUntilBackoffExpires(self) -> None:
        clock = Clock()
        counting = CountingReactor()
        dead = await closedPort()
        spare = await self.goodFarm("spare")
        exchange = self.exchange(
            [deadEntry("dead", dead), spare.entry(fallback=True)],
            reactor=counting,
            clock=clock,
            downBackoff=(1.0, 60.0),
        )

        async def request() -> None:
            result = await exchange.transcribe("m", None, b"speech", "auto")
            self.assertEqual(result.text, transcript(b"speech"))

        await request()
        self.assertEqual(counting.attempts[dead], 1)
        self.assertFalse(exchange.health()["farms"][0]["up"])
        await request()
        await request()
        self.assertEqual(counting.attempts[dead], 1)  # skipped while down
        clock.advance(1.0)
        await request()  # the probe
        self.assertEqual(counting.attempts[dead], 2)
        clock.advance(1.5)
        await request()  # backoff doubled to 2 s
        self.assertEqual(counting.attempts[dead], 2)
        clock.advance(0.5)
        await request()
        self.assertEqual(counting.attempts[dead], 3)
        # The fallback's one connection served every request.
        self.assertEqual(counting.attempts[spare.port("stt")], 1)
        self.assertEqual(spare.farm.counters.succeeded, 6)

    async def test_allDownIsUnavailable(self) -> None:
        clock = Clock()
        counting = CountingReactor()
        ports = [await closedPort(), await closedPort()]
        exchange = self.exchange(
            [deadEntry("a", ports[0]), deadEntry("b", ports[1], fallback=True)],
            reactor=counting,
            clock=clock,
            downBackoff=(10.0, 60.0),
        )
        with self.assertRaises(Unavailable) as caught:
            await exchange.transcribe("m", None, b"x", "auto")
        self.assertEqual(caught.exception.retryAfter, 10)
        self.assertEqual([counting.attempts[p] for p in ports], [1, 1])
        clock.advance(7.5)
        with self.assertRaises(Unavailable) as caught:
            await exchange.transcribe("m", None, b"x", "auto")
        self.assertEqual(caught.exception.status, 503)
        self.assertEqual(caught.exception.retryAfter, 3)
        self.assertEqual([counting.attempts[p] for p in ports], [1, 1])  # nobody dialled
        self.assertEqual([f["up"] for f in exchange.health()["farms"]], [False, False])

    async def test_probeSucceedsFarmIsUpAgain(self) -> None:
        clock = Clock()
        counting = CountingReactor()
        sttPort, ttsPort = await closedPort(), await closedPort()
        exchange = self.exchange(
            [FarmEntry("late", f"tcp:host=127.0.0.1:port={sttPort}",
                       f"tcp:host=127.0.0.1:port={ttsPort}")],
            reactor=counting,
            clock=clock,
        )
        with self.assertRaises(Unavailable):
            await exchange.transcribe("m", None, b"x", "auto")
        late = LiveFarm("late")
        await late.loopback.listen({"stt": sttPort, "tts": ttsPort})
        self.addCleanup(lambda: Deferred.fromCoroutine(late.stop()))
        await late.producer("stt", DigestHandler())
        with self.assertRaises(Unavailable):  # still within its backoff
            await exchange.transcribe("m", None, b"x", "auto")
        self.assertEqual(counting.attempts[sttPort], 1)
        clock.advance(1.0)
        result = await exchange.transcribe("m", None, b"x", "auto")
        self.assertEqual(result.text, transcript(b"x"))
        self.assertEqual(counting.attempts[sttPort], 2)
        self.assertTrue(exchange.health()["farms"][0]["up"])


class DeadlineTests(_LiveTestCase):
    async def hangingFarm(self, name: str) -> tuple[LiveFarm, HangingEngine]:
        farm = await startFarm(self, name)
        engine = HangingEngine()
        await farm.producer("stt", engine)
        return farm, engine

    async def test_deadlinePasses(self) -> None:
        a, engineA = await self.hangingFarm("a")
        b, engineB = await self.hangingFarm("b")
        # Real sockets; the deadline's time is a Clock the test moves.
        clock = Clock()
        exchange = self.exchange([a.entry(), b.entry(fallback=True)], deadline=0.5, clock=clock)
        request = Deferred.fromCoroutine(exchange.transcribe("m", None, b"x", "auto"))
        await until(lambda: engineA.started + engineB.started == 1, "the job on a producer")
        clock.advance(0.499)
        self.assertNoResult(request)
        clock.advance(0.001)
        caught = self.failureResultOf(request, TimedOut)
        self.assertEqual(caught.value.status, 504)
        # One farm had the job; it was cancelled when its connection closed.
        self.assertEqual(engineA.started + engineB.started, 1)
        await until(lambda: engineA.cancelled + engineB.cancelled == 1, "engineA.cancelled + engineB.cancelled == 1")
        self.assertEqual(engineA.cancelled + engineB.cancelled, 1)
        for state in exchange.farms:
            self.assertEqual(len(state.pools["stt"].busy), 0)

    async def test_deadlineWhileWaitingForAConnection(self) -> None:
        farm, engine = await self.hangingFarm("a")
        await farm.producer("stt", HangingEngine())
        exchange = self.exchange([farm.entry()], deadline=0.5, poolSize=1)
        first = Deferred.fromCoroutine(exchange.transcribe("m", None, b"1", "auto"))
        second = Deferred.fromCoroutine(exchange.transcribe("m", None, b"2", "auto"))
        pool = exchange.farms[0].pools["stt"]
        # The second request queues for the pool's only connection...
        await until(lambda: pool.opened == 1 and len(pool.waiters) == 1, "pool.opened == 1 and len(pool.waiters) == 1")
        # ... and both end at the deadline. (When the first's connection is
        # aborted a moment before the second's deadline, the second may just
        # get a fresh connection first; either way nothing is left behind.)
        for d in (first, second):
            with self.assertRaises(TimedOut):
                await d
        self.assertEqual((len(pool.busy), len(pool.waiters)), (0, 0))

    async def test_cancelledRequestClosesItsConnection(self) -> None:
        farm, engine = await self.hangingFarm("a")
        exchange = self.exchange([farm.entry()])
        pending = Deferred.fromCoroutine(exchange.transcribe("m", None, b"x", "auto"))
        await until(lambda: engine.started == 1, "engine.started == 1")
        pending.cancel()
        with self.assertRaises(CancelledError):
            await pending
        await until(lambda: engine.cancelled == 1, "engine.cancelled == 1")
        self.assertEqual(engine.cancelled, 1)
        self.assertEqual(len(exchange.farms[0].pools["stt"].busy), 0)

    async def test_stopFailsRequestsInFlight(self) -> None:
        farm, engine = await self.hangingFarm("a")
        exchange = self.exchange([farm.entry()])
        pending = Deferred.fromCoroutine(exchange.transcribe("m", None, b"x", "auto"))
        await until(lambda: engine.started == 1, "engine.started == 1")
        stopped = exchange.stop()
        with self.assertRaises(Unavailable):
            await pending
        await stopped
        await until(lambda: engine.cancelled == 1, "engine.cancelled == 1")
        self.assertEqual(engine.cancelled, 1)

    async def test_waiterGetsTheSlotOfABrokenConnection(self) -> None:
        farm = await startFarm(self, "a")
        hanging = HangingEngine()
        await farm.producer("stt", hanging)  # idle longest: takes the first job
        await farm.producer("stt", DigestHandler())
        exchange = self.exchange([farm.entry()], poolSize=1)
        pool = exchange.farms[0].pools["stt"]
        first = Deferred.fromCoroutine(exchange.transcribe("m", None, b"1", "auto"))
        await until(lambda: hanging.started == 1, "hanging.started == 1")
        second = Deferred.fromCoroutine(exchange.transcribe("m", None, b"2", "auto"))
        self.assertEqual(len(pool.waiters), 1)
        # The first request's client goes away: its connection is closed, and
        # the waiting request opens a new one in its place.
        first.cancel()
        with self.assertRaises(CancelledError):
            await first
        result = await second
        self.assertEqual(result.text, transcript(b"2"))
        self.assertEqual((pool.opened, len(pool.idle), len(pool.waiters)), (2, 1, 0))


class SegmentsTests(SynchronousTestCase):
    """
    A producer's timed segments are passed on only when they make sense.
    """

    def test_good(self) -> None:
        segments = readSegments([
            {"start": 0, "end": 1.5, "text": " one ", "avg_logprob": -0.2, "no_speech_prob": 0.1},
            {"start": 1.5, "end": 3, "text": "two"},
        ])
        self.assertEqual(segments, (
            TimedText(0.0, 1.5, "one", -0.2, 0.1), TimedText(1.5, 3.0, "two", None, None),
        ))

    def test_bad(self) -> None:
        for value in (
            None, "x", [1], [{"start": 0, "end": 1}], [{"start": 2, "end": 1, "text": "x"}],
            [{"start": -1, "end": 1, "text": "x"}], [{"start": True, "end": 1, "text": "x"}],
            [{"start": 0, "end": float("inf"), "text": "x"}],
            [{"start": 0, "end": 2, "text": "a"}, {"start": 1, "end": 3, "text": "b"}],
            [{"start": 0, "end": 1, "text": "x"}] * (MAX_SEGMENTS + 1),
        ):
            self.assertEqual(readSegments(value), (), value if not isinstance(value, list) else value[:2])


    def test_words(self) -> None:
        """
        Words come with their segments: stripped, probabilities kept when
        from 0 to 1; a little rounding over a segment's edges, or between
        two words, is allowed.
        """
        segments = readSegments([
            {"start": 0, "end": 1.0, "text": "hello world", "words": [
                {"start": 0, "end": 0.5, "word": " hello", "probability": 0.9},
                {"start": 0.495, "end": 1.005, "word": "world", "probability": 1.5},
            ]},
            {"start": 1.0, "end": 2.0, "text": "again", "words": []},
            {"start": 2.0, "end": 3.0, "text": "bye", "words": [
                {"start": 1.995, "end": 2.5, "word": "bye", "probability": None},
            ]},
            {"start": 3.0, "end": 4.0, "text": "no words"},
        ])
        self.assertEqual([s.words for s in segments], [
            (TimedWord(0.0, 0.5, "hello", 0.9), TimedWord(0.495, 1.005, "world", None)),
            (), (TimedWord(1.995, 2.5, "bye", None),), (),
        ])
        self.assertEqual([s.text for s in segments], ["hello world", "again", "bye", "no words"])

    def test_hostileWords(self) -> None:
        """
        One malformed word costs every word of the answer, never the
        transcript: its segments stand.
        """
        good = {"start": 0.2, "end": 0.4, "word": "fine"}
        for bad in (
            "words", [1], [None], [{"start": 0.1, "end": 0.2}],
            [{"start": 0.1, "end": 0.2, "word": 7}],
            [{"start": 0.1, "end": 0.2, "word": "   "}],
            [{"start": 0.1, "end": 0.2, "word": "x" * 201}],
            [{"start": float("nan"), "end": 0.2, "word": "x"}],
            [{"start": 0.1, "end": float("inf"), "word": "x"}],
            [{"start": -0.5, "end": 0.2, "word": "x"}],
            [{"start": True, "end": 0.2, "word": "x"}],
            [{"start": "0.1", "end": 0.2, "word": "x"}],
            [{"start": 0.3, "end": 0.2, "word": "x"}],
            # Before its segment, past it, or before the word before ends.
            [{"start": 0.05, "end": 0.2, "word": "x"}],
            [{"start": 0.2, "end": 1.2, "word": "x"}],
            [good, {"start": 0.3, "end": 0.5, "word": "back"}],
            [good] * (MAX_WORDS + 1),
        ):
            segments = readSegments([
                {"start": 0.0, "end": 0.1, "text": "first", "words": [
                    {"start": 0.0, "end": 0.1, "word": "first"},
                ]},
                {"start": 0.1, "end": 1.0, "text": "second", "words": bad},
            ])
            self.assertEqual(
                segments,
                (TimedText(0.0, 0.1, "first"), TimedText(0.1, 1.0, "second")),
                bad if not isinstance(bad, list) else bad[:2],
            )
        # Words out of order across segments, too (each within its own).
        segments = readSegments([
            {"start": 0, "end": 1, "text": "a", "words": [{"start": 0.5, "end": 1.01, "word": "a"}]},
            {"start": 1, "end": 2, "text": "b", "words": [{"start": 0.995, "end": 1.5, "word": "b"}]},
        ])
        self.assertEqual([s.words for s in segments], [(), ()])


class SpokenTests(SynchronousTestCase):
    """
    The speed a producer says it spoke at is believed only where it is the
    speed asked for: the API then stretches the rest of the way, never
    further on a producer's word.
    """

    def test_answered(self) -> None:
        cases = [
            ({"speed": 2.0}, 2.0, 2.0),
            ({"speed": 2}, 2.0, 2.0),
            ({}, 2.0, 1.0),
            ({"speed": 4.0}, 2.0, 1.0),
            ({"speed": "2"}, 2.0, 1.0),
            ({"speed": True}, 1.0, 1.0),
            ({"speed": 0.5}, 1.0, 1.0),
            # As near as the producer's engine goes: the API stretches the rest.
            ({"speed": 1.6}, 2.0, 1.6),
            ({"speed": 0.3}, 0.25, 0.3),
            ({"speed": 0.2}, 0.25, 1.0),
            ({"speed": 0.9}, 2.0, 1.0),
            ({"speed": float("nan")}, 2.0, 1.0),
            # A claim a rounding past the speed asked: taken as that speed.
            ({"speed": 0.333}, 1 / 3, 1 / 3),
            ({"speed": 1.334}, 1.3336, 1.3336),
            ({"speed": 0.7}, 0.1 * 7, 0.1 * 7),
            ({"speed": 0.999}, 1.5, 1.0),
        ]
        for fields, asked, expected in cases:
            self.assertEqual(Spoken.answered(b"w", fields, asked), Spoken(b"w", expected), fields)
