"""
Keys, credit and the ledger across real processes: C{twistd privox-api}
with a SQLite account store, C{twistd privox-farm} posting its ledger to it
and checking producer keys against it, and C{twistd privox-node} (digest and
tone engines) producing under a volunteer's key.

The API is stopped while jobs keep running through the farm; the farm
spools their records and, once the API is back, delivers every one exactly
once.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from privox.accounts.store import AccountStore
from privox.consumer import connectConsumer
from privox.keys import accountId
from privox.wav import pcmToWav
from tests.test_api_app import multipart
from tests.test_e2e import WatchedProcess, freePorts
from tests.support import until
from tests.test_faults import ProcessTestCase

WAIT_S = 30.0



class LedgerEndToEndTests(ProcessTestCase):
    timeout = 120

    async def startApi(self) -> WatchedProcess:
        api = self.spawn(
            "api", "privox-api", "--accounts", self.dsn,
            "--listen", f"tcp:{self.apiPort}:interface=127.0.0.1",
            "--farm", f"local tcp:host=127.0.0.1:port={self.stt} tcp:host=127.0.0.1:port={self.tts}",
            "--stt-model", "fast digest:x digest:x", "--voice", "voice1 tone:x",
            "--e2e", "off",  # the ledger, not sealing: its nodes enrol nowhere
        )
        await api.waitFor(b"at schema version")
        await api.waitFor(b"starting on %d" % self.apiPort)
        return api

    async def account(self, key: str) -> dict[str, Any]:
        response = await self.http.get(
            f"{self.url}/v1/account", headers={"Authorization": f"Bearer {key}"}
        )
        return json.loads(await response.content())  # type: ignore[no-any-return]

    async def transactions(self) -> list[dict[str, Any]]:
        store = AccountStore.open(self.dsn, reactor)
        try:
            return await store.transactions()
        finally:
            store.close()

    async def test_creditAndLedgerAcrossAnOutage(self) -> None:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        self.dsn = f"sqlite:{work}/accounts.sqlite3"
        spool = f"{work}/ledger.spool"
        store = AccountStore.open(self.dsn, reactor)
        await store.migrate()
        user, _ = await store.createKey(0.0, hourlySeconds=100.0)
        volunteer, _ = await store.createKey(0.0, hourlySeconds=0.0, label="node owner")
        farmKey, _ = await store.createKey(0.0, role="farm")
        store.close()
        self.apiPort, self.stt, self.tts = freePorts(3)
        self.url = f"http://127.0.0.1:{self.apiPort}"
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

        api = await self.startApi()
        farm = self.spawn(
            "farm", "privox-farm", "--name", "farm-e2e",
            "--stt-listen", f"tcp:{self.stt}:interface=127.0.0.1",
            "--tts-listen", f"tcp:{self.tts}:interface=127.0.0.1",
            "--ledger", f"{self.url}/v1/ledger", "--api-key", farmKey, "--ledger-spool", spool,
            "--producer-keys", f"{self.url}/v1/keys/validate",
            "--stats-interval", "0", "--shutdown-grace", "1",
        )
        await farm.waitFor(b"FarmFactory starting on %d\n" % self.tts)
        # A key the API does not know may not produce.
        stranger = self.spawn(
            "stranger", "privox-node", "--stt-farm", f"tcp:host=127.0.0.1:port={self.stt}",
            "--stt", "digest:x", "--key", "pvx_not-a-key", "--retry-max", "30",
        )
        await farm.waitFor(b"denied producer with key " + accountId("pvx_not-a-key")[:12].encode())
        await self.kill(stranger)
        node = self.spawn(
            "node", "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={self.stt}",
            "--tts-farm", f"tcp:host=127.0.0.1:port={self.tts}",
            "--stt", "digest:x", "--tts", "tone:x", "--key", volunteer,
        )
        await node.waitFor(b"serving stt through", timeout=WAIT_S)
        await node.waitFor(b"serving tts through", timeout=WAIT_S)

        # A user's 4 s WAV through the API: charged 4 s; the volunteer's
        # node did it and earns (digest:x costs 1 QSS a second).
        clip = pcmToWav(b"\x01\x00" * 16000 * 4, 16000)
        body, contentType = multipart({"key": user}, {"file": ("a.wav", clip)})
        response = await self.http.post(self.url + "/stt", data=body, headers={"Content-Type": contentType})
        self.assertEqual(response.code, 200, await response.text())
        self.assertEqual((await self.account(user))["used"], 4.0)

        async def earned(amount: float) -> bool:
            return bool((await self.account(volunteer))["earned"] >= amount)

        await until(lambda: earned(4.0), "the volunteer's credit")
        # A producer-only key (0 s/h of its own) may now use what it earned.
        standing = await self.account(volunteer)
        self.assertEqual((standing["hourly_seconds"], standing["allowance"]), (0.0, standing["earned"]))

        # The API goes away; jobs still run through the farm directly.
        await api.stop()
        consumer = await connectConsumer(reactor, f"tcp:host=127.0.0.1:port={self.stt}", "stt")
        jobs = []
        for n in range(5):
            result = await consumer.stt("digest:x", bytes([n]) * 32000)
            jobs.append(result.fields["id"])
        consumer.transport.loseConnection()
        await farm.waitFor(b"ledger: sending")  # it cannot deliver, and will retry
        self.assertGreater(os.path.getsize(spool), 0)

        # Back again: everything spooled arrives, once.
        api = await self.startApi()
        await until(
            lambda: ensureDeferred(self._delivered(jobs)), "the spooled records", timeout=90
        )
        records = await self.transactions()
        ids = [r["job_id"] for r in records]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), 6)
        self.assertTrue(set(jobs) <= set(ids))
        for r in records:
            self.assertEqual((r["farm"], r["status"], r["producer"]), ("farm-e2e", "ok", accountId(volunteer)))
            # digest:x counts bytes as 16 kHz 16-bit audio: the WAV's header too.
            self.assertAlmostEqual(r["audio_seconds"], 1.0 if r["job_id"] in jobs else 4.0, places=2)
        self.assertAlmostEqual((await self.account(volunteer))["earned"], 4.0 + 5 * 1.0, places=2)
        await until(
            lambda: ensureDeferred(_equal(os.path.getsize(spool), 0)), "the spool to empty"
        )
        # No record, log line or spool holds a key.
        await self.kill(farm)
        for text in (farm.output, api.output, node.output):
            for key in (user, volunteer, farmKey):
                self.assertNotIn(key.encode(), bytes(text))

    async def _delivered(self, jobs: list[str]) -> bool:
        return set(jobs) <= {r["job_id"] for r in await self.transactions()}


async def _equal(a: object, b: object) -> bool:
    return a == b
