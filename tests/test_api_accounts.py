"""
Keys, quotas, credit and the ledger through the HTTP API: a real
L{PrivoxAPI} on a loopback port over a real SQLite account store, with the
farms replaced by an in-test exchange and the quota's clock by a L{Clock}.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from privox.accounts.store import AccountStore
from privox.api.access import AccountAccess, PolicyAccess, modelCosts
from privox.api.app import PrivoxAPI
from privox.api.errors import Unavailable
from privox.api.exchange import Spoken, Transcribed
from privox.api.measure import spokenSeconds
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.keys import OpenPolicy, accountId
from privox.wav import pcmToWav, wavSeconds
from tests.audiofixtures import encoded, tone, withFmt
from tests.test_api_app import multipart
from tests.support import until
from tests.test_cli import privox

MODELS = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES)


def wav(seconds: float, rate: int = 8000) -> bytes:
    return pcmToWav(b"\0\0" * int(seconds * rate), rate)


class SecondsExchange:
    """
    The farms, stubbed: transcripts last what the upload lasts (or
    C{reported}); speech lasts C{spoken} seconds; C{error} fails jobs.
    """

    def __init__(self) -> None:
        self.spoken = 2.0
        #: Speaks at the speed asked (as Piper does), else at its own pace.
        self.paces = False
        self.reported: float | None = None
        self.error: Exception | None = None
        self.jobs = 0

    async def transcribe(
        self, model: str, language: str | None, audio: bytes, format: str, deadline: float,
        task: str | None = None, prompt: str | None = None, temperature: float | None = None,
        words: bool = False,
    ) -> Transcribed:
        self.jobs += 1
        if self.error is not None:
            raise self.error
        return Transcribed("hello", model, language, self.reported)

    async def synthesize(
        self, model: str, language: str | None, voice: str | None, text: str, deadline: float,
        speed: float = 1.0,
    ) -> Spoken:
        self.jobs += 1
        if self.error is not None:
            raise self.error
        if self.paces:
            return Spoken(wav(self.spoken / speed), speed)
        return Spoken(wav(self.spoken))

    def health(self) -> dict[str, Any]:
        return {"farms": []}


class AccountsAPITests(TestCase):
    anonymous: float | None = None

    async def start(self, anonymous: float | None = None, hourly: float = 60.0) -> None:
        # Absolute: a privox command run elsewhere opens it too.
        self.dsn = "sqlite:" + os.path.abspath(self.mktemp())
        self.store = AccountStore.open(self.dsn, reactor)
        self.addCleanup(self.store.close)
        await self.store.migrate()
        self.clock = Clock()
        self.clock.advance(10_000)
        self.exchange = SecondsExchange()
        self.access = AccountAccess(
            self.store, self.clock, hourlySeconds=hourly, anonymousSeconds=anonymous,
            costOf=modelCosts(MODELS.stt, ["whisper:small.en 4"]),
        )
        api = PrivoxAPI(self.exchange, MODELS, self.access, clock=self.clock)
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def key(self, **kwargs: Any) -> str:
        key, _ = await self.store.createKey(self.clock.seconds(), **kwargs)
        return key

    async def stt(self, key: str | None, audio: bytes, path: str = "/stt") -> tuple[int, Any, bytes]:
        fields = {"key": key} if key else {}
        body, contentType = multipart(fields, {"file": ("a.wav", audio)})
        response = await self.http.post(self.url + path, data=body, headers={"Content-Type": contentType})
        return response.code, response.headers, await response.content()

    async def tts(self, key: str | None, text: str = "Hello there.") -> tuple[int, Any, bytes]:
        data = {"text": text, "voice": "voice1"}
        if key:
            data["key"] = key
        response = await self.http.post(self.url + "/tts", data=data)
        return response.code, response.headers, await response.content()

    async def account(self, key: str | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = await self.http.get(self.url + "/v1/account", headers=headers)
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())  # type: ignore[no-any-return]

    async def post(self, path: str, key: str | None, **kwargs: Any) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        response = await self.http.post(self.url + path, headers=headers, **kwargs)
        return response.code, await response.content()

    async def test_unauthorized(self) -> None:
        await self.start()
        good = await self.key()
        revoked = await self.key()
        farm = await self.key(role="farm")
        await self.store.revoke(accountId(revoked), self.clock.seconds())
        for key in (None, "pvx_nobody", revoked, farm):
            code, _, body = await self.stt(key, wav(1))
            self.assertEqual(code, 401, (key, body))
        # OpenAI's route says so in its own shape.
        code, _, body = await self.stt("pvx_nobody", wav(1), "/v1/audio/transcriptions")
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        self.assertEqual(self.exchange.jobs, 0)
        self.assertEqual((await self.stt(good, wav(1)))[0], 200)

    async def test_usageAndTooManyRequests(self) -> None:
        """
        60 s an hour: a 20 s WAV counts 20 s, TTS counts the seconds it
        generated; over the allowance comes 429 with Retry-After, until the
        window has moved on.
        """
        await self.start(hourly=60.0)
        key = await self.key()
        self.assertEqual((await self.stt(key, wav(20)))[0], 200)
        self.assertEqual((await self.tts(key))[0], 200)
        standing = await self.account(key)
        self.assertEqual(
            {k: standing[k] for k in ("allowance", "used", "remaining", "earned")},
            {"allowance": 60.0, "used": 22.0, "remaining": 38.0, "earned": 0.0},
        )
        self.clock.advance(100)
        code, headers, body = await self.stt(key, wav(40))
        self.assertEqual(code, 429)
        self.assertIn(b"quota used: 22 of 60", body)
        self.assertIn(b"this request needs 40 s", body)
        # The 20 s and 2 s leave the window with the end of the minute
        # they were used in (t=10,020), 3,520 s from now.
        self.assertEqual(headers.getRawHeaders("retry-after"), ["3520"])
        code, headers, body = await self.stt(key, wav(40), "/v1/audio/transcriptions")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (429, "rate_limit_exceeded"))
        # More than the whole allowance: waiting will not help, and it says so.
        code, _, body = await self.stt(key, wav(61))
        self.assertEqual(code, 429)
        self.assertIn(b"more than the 60 s", body)
        self.clock.advance(3519)
        self.assertEqual((await self.stt(key, wav(40)))[0], 429)
        self.clock.advance(1)
        self.assertEqual((await self.stt(key, wav(40)))[0], 200)
        self.assertEqual((await self.account(key))["used"], 40.0)

    async def test_lyingWavHeaderPaysItsLength(self) -> None:
        """
        A 22.3 s WAV whose header claims a byte rate of 0xFFFFFFF0 pays its
        22.3 s (and a key with less gets 429); one claiming 1 Hz is refused
        as impossible before any job.
        """
        await self.start(hourly=60.0)
        key = await self.key()
        lying = withFmt(wav(22.3, 16000), byteRate=0xFFFFFFF0, blockAlign=1)
        self.assertEqual((await self.stt(key, lying))[0], 200)
        self.assertAlmostEqual((await self.account(key))["used"], 22.3)
        poor = await self.key(hourlySeconds=20.0)
        self.assertEqual((await self.stt(poor, lying))[0], 429)
        code, _, body = await self.stt(key, withFmt(wav(1, 16000), rate=1))
        self.assertEqual(code, 400)
        self.assertIn(b"impossible WAV: 1 Hz", body)
        self.assertEqual(self.exchange.jobs, 1)

    async def test_controlCharactersRefused(self) -> None:
        """
        Text with a NUL (or another control character) is not text to
        speak: 400 at once, nothing charged.
        """
        await self.start()
        key = await self.key()
        code, _, body = await self.tts(key, "Hello\x00there")
        self.assertEqual((code, body), (400, b"text contains control characters\n"))
        code, body = await self.post(
            "/v1/audio/speech", key, json={"model": "tts-1", "input": "a\x07b"}
        )
        self.assertEqual(code, 400)
        self.assertIn(b"input contains control characters", body)
        self.assertEqual((self.exchange.jobs, (await self.account(key))["used"]), (0, 0.0))

    async def test_settleTriedAgain(self) -> None:
        """
        A settle the store fails is tried again until it is recorded: the
        seconds still count once the request's hold has expired.
        """
        await self.start(hourly=60.0)
        key = await self.key()
        original = self.store.settle
        failures = [2]

        async def flaky(reservation: Any, seconds: float, now: float) -> float:
            if failures[0]:
                failures[0] -= 1
                raise RuntimeError("the store is down")
            return await original(reservation, seconds, now)

        self.patch(self.store, "settle", flaky)
        self.assertEqual((await self.stt(key, wav(10)))[0], 200)
        for _ in range(2):
            self.clock.advance(60)
            await until(lambda: not failures[0] or self.clock.getDelayedCalls(), "a retry")
        await until(lambda: not self.clock.getDelayedCalls(), "the settle")
        self.clock.advance(600)  # long after the hold's expiry
        self.assertEqual(failures, [0])
        self.assertEqual((await self.account(key))["used"], 10.0)

    async def test_ownHourlySeconds(self) -> None:
        await self.start(hourly=60.0)
        key = await self.key(hourlySeconds=5.0)
        self.assertEqual((await self.account(key))["allowance"], 5.0)
        self.assertEqual((await self.stt(key, wav(6)))[0], 429)

    async def test_failedJobsCostNothing(self) -> None:
        await self.start()
        key = await self.key()
        self.exchange.error = Unavailable("no producer")
        self.assertEqual((await self.stt(key, wav(30)))[0], 503)
        self.assertEqual((await self.tts(key))[0], 503)
        self.assertEqual((await self.account(key))["used"], 0.0)

    async def test_compressedAudioPaysItsDecodedLength(self) -> None:
        """
        Compressed audio pays its length as the API decodes it, whatever the
        producer reports; what cannot be decoded is refused and costs
        nothing.
        """
        await self.start()
        key = await self.key()
        self.exchange.reported = 3000.0
        opus = encoded(tone(3.0, 16000), 16000, "ogg", "libopus")
        self.assertEqual((await self.stt(key, opus))[0], 200)
        used = (await self.account(key))["used"]
        self.assertTrue(2.9 < used < 3.1, used)
        code, _, body = await self.stt(key, b"OggS" + bytes(20_000))
        self.assertEqual(code, 400, body)
        self.assertEqual((await self.account(key))["used"], used)
        self.assertEqual(self.exchange.jobs, 1)

    async def test_ttsPaysWhatItGotAtMostItsEstimate(self) -> None:
        """
        TTS is admitted on a conservative estimate of the text (digits are
        read slowly), pays the audio's length, and never more than that
        estimate, however long the audio a producer sends.
        """
        await self.start(hourly=20.0)
        key = await self.key()
        # Forty digits may take over 20 s to read: never within 20 s.
        code, _, body = await self.tts(key, "1" * 40)
        self.assertEqual(code, 429, body)
        self.assertIn(b"more than the 20 s", body)
        # A producer answering 600 s of audio: the caller gets, and pays,
        # no more than the text was admitted for.
        self.exchange.spoken = 600.0
        code, _, audio = await self.tts(key, "Hello there.")
        self.assertEqual(code, 200)
        served = wavSeconds(audio)
        self.assertAlmostEqual(served, spokenSeconds("Hello there."), places=3)
        self.assertAlmostEqual((await self.account(key))["used"], served, places=3)

    async def test_speechPaysItsOwnPace(self) -> None:
        """
        Speech at another speed costs what it would at the voice's own
        pace, whether the producer paced it or the API stretched it.
        """
        await self.start()
        key = await self.key()
        for paces in (False, True):
            self.exchange.paces = paces
            for speed in (0.5, 2.0):
                before = (await self.account(key))["used"]
                code, body = await self.post(
                    "/v1/audio/speech", key,
                    json={"model": "tts-1", "input": "Hello there.", "speed": speed,
                          "response_format": "wav"},
                )
                self.assertEqual(code, 200, body)
                # (a stretch's length is within a few hundredths of a second)
                self.assertLess(abs(wavSeconds(body) * speed - 2.0), 0.05, (paces, speed))
                used = (await self.account(key))["used"] - before
                self.assertLess(abs(used - 2.0), 0.001, (paces, speed, used))

    async def test_anonymous(self) -> None:
        await self.start(anonymous=30.0)
        self.assertEqual((await self.stt(None, wav(20)))[0], 200)
        self.assertEqual((await self.account(None))["remaining"], 10.0)
        # Shared by everyone without a key.
        self.assertEqual((await self.stt(None, wav(20)))[0], 429)
        # A key nobody made is still refused, not treated as anonymous.
        self.assertEqual((await self.stt("pvx_nobody", wav(1)))[0], 401)
        # Keys have their own allowance.
        self.assertEqual((await self.stt(await self.key(), wav(20)))[0], 200)

    async def test_anonymousCommand(self) -> None:
        """
        C{privox} without a key uses the anonymous allowance.
        """
        await self.start(anonymous=30.0)
        self.assertEqual((await self.stt(None, wav(5)))[0], 200)
        out, err, code = await privox("account", PRIVOX_API=self.url, PRIVOX_KEY="")
        self.assertEqual((err, code), ("", 0))
        self.assertTrue(out.startswith("key anonymous: 5 of 30 audio seconds used"), out)

    async def test_concurrentRequestsCannotOverspend(self) -> None:
        await self.start(hourly=35.0)
        key = await self.key()
        results = await DeferredList(
            [ensureDeferred(self.stt(key, wav(10))) for _ in range(8)]
        )
        codes = sorted(code for ok, (code, _, _) in results if ok)
        self.assertEqual(codes, [200] * 3 + [429] * 5)
        self.assertEqual((await self.account(key))["used"], 30.0)

    def ledgerBody(self, *records: dict[str, Any]) -> dict[str, Any]:
        return {"json": {"transactions": list(records)}}

    def record(self, jobId: str, producer: str | None, seconds: float = 10.0, **kw: Any) -> dict[str, Any]:
        r = {
            "job_id": jobId, "farm": "farm-1", "time": 9_000.0, "service": "stt",
            "model": "whisper:tiny.en", "input_bytes": 320_000, "output_bytes": 0,
            "audio_seconds": seconds, "processing_ms": 800.0, "status": "ok",
            "producer": producer, "consumer": "cd" * 32,
        }
        r.update(kw)
        return r

    async def test_producerCreditRaisesAllowance(self) -> None:
        """
        A farm posts the jobs a key's node did; the key earns QSS (audio
        seconds times the model's cost) and may use that much more.
        """
        await self.start(hourly=60.0)
        volunteer = await self.key()
        farm = await self.key(role="farm")
        self.assertEqual((await self.stt(volunteer, wav(60)))[0], 200)
        self.assertEqual((await self.stt(volunteer, wav(30)))[0], 429)
        producer = accountId(volunteer)
        code, body = await self.post(
            "/v1/ledger", farm,
            **self.ledgerBody(
                self.record("a", producer, 10.0),  # fast: 1 QSS/s
                self.record("b", producer, 5.0, model="whisper:small.en"),  # 4 by --model-cost
                self.record("c", producer, 99.0, status="timeout"),  # failed: nothing
            ),
        )
        self.assertEqual((code, json.loads(body)), (200, {"recorded": 3, "duplicates": 0}))
        standing = await self.account(volunteer)
        self.assertEqual((standing["earned"], standing["allowance"]), (30.0, 90.0))
        self.assertEqual((await self.stt(volunteer, wav(30)))[0], 200)

    async def test_importedKeys(self) -> None:
        """
        Keys taken over with C{privox keys import} call the API at once,
        each with its own hourly seconds or the API's default.
        """
        await self.start(hourly=60.0)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("# from the original exchange\nOrigKey-1 30 alice\nOrigKey-2 -\n")
        out, err, code = await privox("keys", "import", path, "--accounts", self.dsn)
        self.assertEqual((out, err, code), ("imported 2 keys (0 already present)\n", "", 0))
        self.assertEqual((await self.account("OrigKey-1"))["allowance"], 30.0)
        self.assertEqual((await self.account("OrigKey-2"))["allowance"], 60.0)
        self.assertEqual((await self.stt("OrigKey-1", wav(20)))[0], 200)
        self.assertEqual((await self.stt("OrigKey-1", wav(20)))[0], 429)
        self.assertEqual((await self.stt("OrigKey-3", wav(1)))[0], 401)

    async def test_accountCommand(self) -> None:
        """
        C{privox account} shows the key's standing, in words or as JSON.
        """
        await self.start(hourly=60.0)
        key = await self.key()
        self.assertEqual((await self.stt(key, wav(15)))[0], 200)
        out, err, code = await privox("account", PRIVOX_API=self.url, PRIVOX_KEY=key)
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(
            out,
            f"key {accountId(key)[:12]}: 15 of 60 audio seconds used in the last 3600 s; 45 left\n"
            "allowance = 60 of its own + 0 earned by producing (QSS)\n",
        )
        out, err, code = await privox("account", "--json", PRIVOX_API=self.url, PRIVOX_KEY=key)
        self.assertEqual(json.loads(out)["remaining"], 45.0)
        out, err, code = await privox("account", PRIVOX_API=self.url, PRIVOX_KEY="pvx_nobody")
        self.assertEqual(code, 1)
        self.assertIn("(HTTP 401)", err)

    async def test_ledgerEndpoint(self) -> None:
        await self.start()
        farm = await self.key(role="farm")
        user = await self.key()
        body = self.ledgerBody(self.record("j1", None), self.record("j2", None))
        for key in (None, user, "pvx_nobody"):
            self.assertEqual((await self.post("/v1/ledger", key, **body))[0], 401)
        code, reply = await self.post("/v1/ledger", farm, **body)
        self.assertEqual(json.loads(reply), {"recorded": 2, "duplicates": 0})
        code, reply = await self.post("/v1/ledger", farm, **body)
        self.assertEqual(json.loads(reply), {"recorded": 0, "duplicates": 2})
        bad = self.ledgerBody(self.record("j3", None), self.record("j4", "not-an-id"))
        code, reply = await self.post("/v1/ledger", farm, **bad)
        self.assertEqual(code, 400)
        self.assertIn(b"record 1: producer", reply)
        code, reply = await self.post("/v1/ledger", farm, data=b"{[", headers={"Content-Type": "application/json"})
        self.assertEqual(code, 400)
        # Nothing of the refused batch was stored.
        self.assertEqual(sorted(t["job_id"] for t in await self.store.transactions()), ["j1", "j2"])

    async def test_validateEndpoint(self) -> None:
        """
        Farms check their peers' keys here (their URL key policy): 1 for a
        good key, 0 otherwise; only a farm key may ask.
        """
        await self.start()
        farm = await self.key(role="farm")
        user = await self.key()
        revoked = await self.key()
        await self.store.revoke(accountId(revoked), 1.0)
        for key, answer in ((user, b"1\n"), (farm, b"1\n"), (revoked, b"0\n"), ("pvx_x", b"0\n")):
            self.assertEqual(
                await self.post("/v1/keys/validate", farm, data={"key": key}), (200, answer)
            )
        self.assertEqual((await self.post("/v1/keys/validate", user, data={"key": user}))[0], 401)


class StoreDownTests(TestCase):
    async def test_storeDown(self) -> None:
        """
        An account store that cannot be used makes requests 503, with the
        reason logged, not 500 or a hang.
        """
        store = AccountStore.open("sqlite:" + self.mktemp() + "/missing/dir.sqlite3", reactor)
        self.addCleanup(store.close)
        access = AccountAccess(store, Clock(), anonymousSeconds=60.0)
        api = PrivoxAPI(SecondsExchange(), MODELS, access, clock=Clock())
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        body, contentType = multipart({}, {"file": ("a.wav", wav(1))})
        for headers in ({}, {"Authorization": "Bearer pvx_somebody"}):
            response = await http.post(
                url + "/stt", data=body, headers={"Content-Type": contentType, **headers}
            )
            self.assertEqual(response.code, 503)
            self.assertIn(b"account store is unavailable", await response.content())
        self.assertTrue(self.flushLoggedErrors())


class WithoutAccountsTests(TestCase):
    async def test_notServed(self) -> None:
        """
        C{--accounts none}: no quotas, and the account routes say why not.
        """
        api = PrivoxAPI(SecondsExchange(), MODELS, PolicyAccess(OpenPolicy()), clock=Clock())
        port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        response = await http.get(url + "/v1/account", headers={"Authorization": "Bearer k"})
        self.assertEqual(response.code, 404)
        self.assertIn(b"--accounts none", await response.content())
        response = await http.post(url + "/v1/ledger", json={"transactions": []})
        self.assertEqual(response.code, 404)
        await response.content()
