"""
The account store (L{privox.accounts.store}) on a real SQLite file and a
real PostgreSQL server (tests/pgcluster.py): the same tests for both.
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.accounts import quota
from privox.accounts.admin import runKeys
from privox.accounts.store import (
    ANONYMOUS,
    HISTORY,
    AccountStore,
    StoreError,
    _migrations,
    _statements,
    parseDSN,
)
from privox.cli import buildParser
from privox.keys import accountId

PRODUCER = "ab" * 32
FARM = "fa" * 32


def record(jobId: str, **fields: Any) -> dict[str, Any]:
    """
    A checked transaction record (what L{privox.api.ledger.readLedger} gives).
    """
    base = {
        "job_id": jobId, "farm": "farm-1", "time": 100.0, "service": "stt",
        "model": "whisper:base.en", "input_bytes": 32000, "output_bytes": 0,
        "audio_seconds": 10.0, "processing_ms": 250.0, "status": "ok",
        "producer": PRODUCER, "consumer": None,
    }
    base.update(fields)
    return base


class StoreTests:
    """
    Mixed into a C{TestCase} with L{dsn} giving a fresh, empty database.
    """

    async def dsn(self) -> str:
        raise NotImplementedError()

    async def store(self) -> AccountStore:
        store = AccountStore.open(await self.dsn(), reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        await store.migrate()
        return store

    async def test_migrate(self) -> None:
        store = await self.store()
        latest = _migrations()[-1][0]
        # Twice, as every start does: the second applies nothing.
        self.assertEqual(await store.migrate(), latest)
        self.assertEqual(await store.migrate(), latest)
        self.assertEqual(await store.accounts(), [])
        # The anonymous bucket exists but is nobody's key.
        self.assertIsNotNone(await store.account(ANONYMOUS))

    async def test_farmDirectory(self) -> None:
        """
        The farms that joined, shared by API servers: a name is the first
        farm key's; registering again moves it and notes when; only its
        own key unlists it.
        """
        store = await self.store()
        self.assertTrue(await store.listFarm("alpha", "tcp:host=a:port=1", None, "key1", 10.0))
        self.assertFalse(await store.listFarm("alpha", "tcp:host=evil:port=1", None, "key2", 11.0))
        self.assertTrue(await store.listFarm("alpha", "tcp:host=a2:port=1", "tcp:host=a2:port=2",
                                             "key1", 12.0))
        self.assertTrue(await store.listFarm("beta", None, "tcp:host=b:port=2", "key2", 13.0))
        await store.listFarm("alpha", "tcp:host=a2:port=1", "tcp:host=a2:port=2", "key1", 12.0,
                             '{"stt": {"m": 2}}')
        self.assertEqual(
            sorted(f["producers"] for f in await store.listedFarms()), ['{"stt": {"m": 2}}', "{}"]
        )
        self.assertEqual(
            sorted((f["name"], f["stt"], f["tts"], f["account"], f["seen"])
                   for f in await store.listedFarms()),
            [("alpha", "tcp:host=a2:port=1", "tcp:host=a2:port=2", "key1", 12.0),
             ("beta", None, "tcp:host=b:port=2", "key2", 13.0)],
        )
        await store.unlistFarm("alpha", "key2", 20.0)
        await store.unlistFarm("alpha", "key1", 11.0)  # it registered again since
        self.assertEqual(len(await store.listedFarms()), 2)
        await store.unlistFarm("alpha", "key1", 12.0)
        self.assertEqual([f["name"] for f in await store.listedFarms()], ["beta"])
        await store.unlistStaleFarms(13.0)
        self.assertEqual(len(await store.listedFarms()), 1)
        await store.unlistStaleFarms(13.5)
        self.assertEqual(await store.listedFarms(), [])

    async def test_onlineNodes(self) -> None:
        """
        A key's enrolled nodes, with where farms last said each is online;
        a farm's next word replaces its last, and leaves with it.
        """
        store = await self.store()
        await store.recordEnrolment("node-a", "key1", 10.0, 100.0)
        await store.recordEnrolment("node-b", "key1", 11.0, 100.0)
        await store.recordEnrolment("node-c", "key2", 11.0, 100.0)

        async def online(since: float) -> dict[str, tuple[int, int]]:
            return {e["node"]: (e["farms"], e["connections"])
                    for e in await store.enrolments("key1", since)}

        self.assertEqual(await online(0.0), {"node-a": (0, 0), "node-b": (0, 0)})
        self.assertTrue(await store.listFarm("alpha", "tcp:host=a:port=1", None, "fk1", 20.0))
        self.assertTrue(await store.listFarm("beta", "tcp:host=b:port=1", None, "fk2", 20.0))
        # node-b as another key's certificate names it: not key1's to see.
        await store.noteOnline(
            "alpha", [("node-a", "key1", 2), ("node-c", "key2", 1), ("node-b", "key2", 4)], 20.0
        )
        await store.noteOnline("beta", [("node-a", "key1", 1)], 15.0)
        self.assertEqual(await online(0.0), {"node-a": (2, 3), "node-b": (0, 0)})
        self.assertEqual(await online(18.0), {"node-a": (1, 2), "node-b": (0, 0)})
        await store.noteOnline("alpha", [("node-b", "key1", 1)], 21.0)
        self.assertEqual(await online(18.0), {"node-a": (0, 0), "node-b": (1, 1)})
        # An unlisting older than the farm's latest registration keeps it.
        await store.unlistFarm("alpha", "fk1", 19.0)
        self.assertEqual(await online(18.0), {"node-a": (0, 0), "node-b": (1, 1)})
        await store.unlistFarm("alpha", "fk1", 21.0)
        self.assertEqual(await online(0.0), {"node-a": (1, 1), "node-b": (0, 0)})
        await store.unlistStaleFarms(30.0)
        self.assertEqual(await online(0.0), {"node-a": (0, 0), "node-b": (0, 0)})

    async def test_keysAreKeptAsHashes(self) -> None:
        store = await self.store()
        key, account = await store.createKey(10.0, label="alice", hourlySeconds=120.0)
        self.assertTrue(key.startswith("pvx_"))
        self.assertEqual(account.account, accountId(key))
        self.assertEqual(account.keyId, accountId(key)[:12])
        self.assertEqual(await store.authenticate(key), account)
        self.assertIsNone(await store.authenticate(key + "x"))
        self.assertIsNone(await store.authenticate(""))
        [listed] = await store.accounts()
        self.assertEqual((listed.label, listed.hourlySeconds, listed.role), ("alice", 120.0, "user"))
        self.assertNotIn(key, repr(listed))
        self.assertEqual(await store.find(account.keyId[:6]), account)
        self.assertEqual(await store.find(key), account)
        self.assertEqual(await store.find(account.account), account)
        await self.assertFails(store.find("0123456789ab"), StoreError)
        await self.assertFails(store.find("xyz"), StoreError)

    async def test_revoke(self) -> None:
        store = await self.store()
        key, account = await store.createKey(10.0, role="farm")
        self.assertTrue(await store.revoke(account.account, 20.0))
        self.assertFalse(await store.revoke(account.account, 30.0))
        revoked = await store.authenticate(key)
        assert revoked is not None
        self.assertEqual((revoked.active, revoked.revoked, revoked.role), (False, 20.0, "farm"))

    async def test_reserveSettleRelease(self) -> None:
        store = await self.store()
        _, a = await store.createKey(0.0)
        held = await store.reserve(a.account, 100.0, 30.0, 1000.0, 1100.0)
        self.assertEqual(held.held, 30.0)
        self.assertEqual(await store.settle(held, 12.5, 1000.5), 12.5)
        failed = await store.reserve(a.account, 100.0, 40.0, 1001.0, 1101.0)
        await store.release(failed)
        state = await store.standing(a.account, 100.0, 1002.0)
        self.assertEqual((state.used, state.remaining), (12.5, 87.5))
        # A need must fit whole; the 12.5 s used in the minute from
        # t=960 leave the window when that minute does.
        e = await self.assertFails(
            store.reserve(a.account, 100.0, 87.6, 1003.0, 1103.0), quota.QuotaExceeded
        )
        self.assertEqual(e.retryAfter, 1020 + 3600 - 1003)
        big = await store.reserve(a.account, 100.0, 87.5, 1003.0, 1103.0)
        self.assertEqual(big.held, 87.5)
        e = await self.assertFails(
            store.reserve(a.account, 100.0, 1.0, 1004.0, 1104.0), quota.QuotaExceeded
        )
        # Held until t=1103 (settled or not: the API may have died).
        self.assertEqual(e.retryAfter, 99)
        again = await store.reserve(a.account, 100.0, 80.0, 1103.0, 1203.0)
        # Settling charges at most what was held, whatever was reported.
        self.assertEqual(await store.settle(again, 5000.0, 1104.0), 80.0)
        state = await store.standing(a.account, 100.0, 1105.0)
        self.assertEqual(state.used, 92.5)
        # An hour after their minutes, the seconds are free again.
        state = await store.standing(a.account, 100.0, 1140.0 + 3600.0)
        self.assertEqual(state.used, 0.0)

    async def test_upgradeKeepsUseAndCredit(self) -> None:
        """
        A store of schema 1 (a row per request, credit read from the
        ledger) upgrades with its use and credit in the window intact.
        """
        store = AccountStore.open(await self.dsn(), reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        version, script = _migrations()[0]

        def schemaOne(cursor: Any) -> None:
            store._dialect.begin(cursor, write=True)
            cursor.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for statement in _statements(script):
                cursor.execute(statement)
            sql = store._dialect.sql
            cursor.execute(sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))
            for i, (at, seconds) in enumerate([(1000.0, 10.0), (1010.0, 5.0), (1100.0, 2.5)]):
                cursor.execute(
                    sql("INSERT INTO usage (id, account, at, seconds) VALUES (?, ?, ?, ?)"),
                    (f"u{i}", PRODUCER, at, seconds),
                )
            cursor.execute(
                sql(
                    "INSERT INTO transactions (farm_account, job_id, farm, at, service, model,"
                    " input_bytes, output_bytes, audio_seconds, processing_ms, status,"
                    " producer, consumer, qss, credited)"
                    " VALUES (?, 'j1', 'f', 0, 'stt', 'm', 0, 0, 4, 1, 'ok', ?, NULL, 8, 1030)"
                ),
                (FARM, PRODUCER),
            )

        await store._run(schemaOne)
        self.assertEqual(await store.migrate(), _migrations()[-1][0])
        state = await store.standing(PRODUCER, 100.0, 1200.0)
        self.assertEqual((state.used, state.earned), (17.5, 8.0))

    async def test_historyDoesNotSlowTheCheck(self) -> None:
        """
        A key with many settled requests in the window costs a check no
        more rows than a minute's sums for the window: 10,000 requests in an
        hour leave at most 61 rows to read.
        """
        store = await self.store()
        _, a = await store.createKey(0.0)
        for i in range(200):
            r = await store.reserve(a.account, 1e9, 1.0, 100.0 + i * 18.0, 1e6)
            await store.settle(r, 1.0, 100.0 + i * 18.0)
        now = 100.0 + 200 * 18.0

        def count(cursor: Any) -> int:
            cursor.execute(
                store._dialect.sql("SELECT COUNT(*) FROM quota_buckets WHERE account = ?"),
                (a.account,),
            )
            return int(cursor.fetchone()[0])

        self.assertLessEqual(await store._run(count), 61)
        state = await store.standing(a.account, 1e9, now)
        # Every request but those whose minute has left the window.
        self.assertEqual(state.used, 200.0)
        # Sums are kept a day (the account page's chart), then dropped.
        await store.reserve(a.account, 1e9, 1.0, now + 3600.0, now + 3700.0)
        self.assertEqual(await store._run(count), 61)
        await store.reserve(a.account, 1e9, 1.0, now + HISTORY, now + HISTORY + 100.0)
        self.assertLessEqual(await store._run(count), 1)

    async def test_accountPagesQueries(self) -> None:
        """
        What the account pages read: use and credit per hour, an account's
        records (paged, by role and service, newest first), what its nodes
        served, and jobs per hour over all accounts.
        """
        store = await self.store()
        now = 10 * 3600.0 + 1800.0
        consumer = "cd" * 32
        r = await store.reserve(consumer, 100.0, 5.0, now - 3600.0, now)
        await store.settle(r, 4.0, now - 3600.0)
        records = [record(f"j{n}", time=now - 2 * 3600 - n) for n in range(3)]
        records.append(record("t0", time=now - 10, service="tts", producer=None, consumer=consumer))
        await store.record(FARM, records, now, lambda model: 2.0)
        hourly = await store.hourly(PRODUCER, now)
        self.assertEqual(len(hourly), 24)
        self.assertEqual(hourly[-1], (10 * 3600.0, 0.0, 60.0))
        self.assertEqual((await store.hourly(consumer, now))[-2], (9 * 3600.0, 4.0, 0.0))
        rows, total = await store.accountLedger(PRODUCER, limit=2)
        self.assertEqual(([r["job_id"] for r in rows], total), (["j0", "j1"], 3))
        self.assertEqual({r["role"] for r in rows}, {"producer"})
        rows, total = await store.accountLedger(PRODUCER, offset=2)
        self.assertEqual([r["job_id"] for r in rows], ["j2"])
        self.assertEqual((await store.accountLedger(PRODUCER, role="consumer"))[1], 0)
        self.assertEqual((await store.accountLedger(consumer, service="tts"))[0][0]["role"],
                         "consumer")
        self.assertEqual((await store.accountLedger(consumer, service="stt"))[1], 0)
        [served] = await store.producing(PRODUCER)
        self.assertEqual(
            served,
            {"farm": "farm-1", "service": "stt", "model": "whisper:base.en", "jobs": 3.0,
             "ok": 3.0, "audio_seconds": 30.0, "qss": 60.0, "first": now - 7202, "last": now - 7200},
        )
        perHour = await store.jobsPerHour(now)
        self.assertEqual((perHour[-1], perHour[-3]), ((10 * 3600.0, 1), (8 * 3600.0, 3)))
        self.assertEqual(await store.jobsSince(now - 60), 1)

    async def test_ledgerIsIdempotentAndCredits(self) -> None:
        store = await self.store()
        cost = {"whisper:base.en": 2.0}.get
        batch = [
            record("j1"),
            record("j2", audio_seconds=5.0, model="other"),
            record("j3", status="timeout"),
            record("j4", producer=None),
        ]
        self.assertEqual(
            await store.record(FARM, batch, 50.0, lambda m: cost(m, 1.0)), (4, 0)
        )
        # Sent again (a farm replaying its spool): nothing new.
        self.assertEqual(await store.record(FARM, batch[:2], 60.0, lambda m: 1.0), (0, 2))
        # Another farm may use the same job ids.
        self.assertEqual(await store.record("fb" * 32, batch[:1], 60.0, lambda m: 1.0), (1, 0))
        stored = {(t["farm"], t["job_id"]): t for t in await store.transactions()}
        self.assertEqual(len(stored), 4)
        self.assertEqual(stored[("farm-1", "j1")]["qss"], 20.0)
        self.assertEqual(stored[("farm-1", "j2")]["qss"], 5.0)
        self.assertEqual(stored[("farm-1", "j3")]["qss"], 0.0)
        # 20 + 5 from farm-1, 10 more from the second farm's j1.
        state = await store.standing(PRODUCER, 100.0, 70.0)
        self.assertEqual((state.earned, state.allowance), (35.0, 135.0))
        # Credit is dated when the API recorded it, and leaves the window.
        self.assertEqual((await store.standing(PRODUCER, 100.0, 3650.0)).earned, 10.0)

    async def test_creditRaisesAllowance(self) -> None:
        store = await self.store()
        key, a = await store.createKey(0.0, hourlySeconds=10.0)
        await store.reserve(a.account, 10.0, 10.0, 100.0, 500.0)
        await self.assertFails(store.reserve(a.account, 10.0, 5.0, 101.0, 500.0), quota.QuotaExceeded)
        await store.record(FARM, [record("p1", producer=a.account, audio_seconds=3.0)], 102.0,
                           lambda m: 2.0)
        held = await store.reserve(a.account, 10.0, 5.0, 103.0, 500.0)
        self.assertEqual(held.held, 5.0)
        await self.assertFails(store.reserve(a.account, 10.0, 1.5, 104.0, 500.0), quota.QuotaExceeded)

    async def test_concurrentReservationsCannotOverspend(self) -> None:
        """
        Twenty requests of 10 s from one key at once, 35 s allowed: exactly
        three get through, whatever order the database runs them in.
        """
        store = await self.store()
        _, a = await store.createKey(0.0)
        attempts = [
            ensureDeferred(store.reserve(a.account, 35.0, 10.0, 500.0 + i / 100, 600.0))
            for i in range(20)
        ]
        results = await DeferredList(attempts, consumeErrors=True)
        admitted = [r for ok, r in results if ok]
        refused = [r for ok, r in results if not ok]
        self.assertEqual(len(admitted), 3)
        self.assertEqual(len(refused), 17)
        for failure in refused:
            failure.trap(quota.QuotaExceeded)
        self.assertEqual((await store.standing(a.account, 35.0, 501.0)).used, 30.0)

    async def test_twoServersCannotOverspend(self) -> None:
        """
        Two API servers (two stores, two connection pools) on one database:
        requests from one key split between them still cannot overspend it.
        """
        dsn = await self.dsn()
        stores = [AccountStore.open(dsn, reactor) for _ in range(2)]
        for store in stores:
            self.addCleanup(store.close)  # type: ignore[attr-defined]
            await store.migrate()
        _, a = await stores[0].createKey(0.0)
        attempts = [
            ensureDeferred(stores[i % 2].reserve(a.account, 45.0, 10.0, 500.0, 600.0))
            for i in range(16)
        ]
        results = await DeferredList(attempts, consumeErrors=True)
        self.assertEqual(sum(ok for ok, _ in results), 4)
        for ok, failure in results:
            if not ok:
                failure.trap(quota.QuotaExceeded)
        self.assertEqual((await stores[1].standing(a.account, 45.0, 501.0)).used, 40.0)

    async def test_keysCommand(self) -> None:
        """
        C{privox keys}: create prints the key alone on its last line; list,
        show and revoke name keys by id.
        """
        dsn = await self.dsn()
        parser = buildParser({})

        async def keys(*argv: str) -> str:
            out = io.StringIO()
            args: argparse.Namespace = parser.parse_args(["keys", *argv, "--accounts", dsn])
            await runKeys(reactor, args, out)
            return out.getvalue()

        created = await keys("create", "--hourly-seconds", "90", "--label", "bob")
        key = created.splitlines()[-1]
        self.assertTrue(key.startswith("pvx_"))
        kid = accountId(key)[:12]
        self.assertIn(kid, created.splitlines()[0])
        listed = await keys("list")
        self.assertIn(kid, listed)
        self.assertIn("bob", listed)
        self.assertNotIn(key, listed)
        shown = await keys("show", kid[:8])
        self.assertIn("allowance: 90.0", shown)
        self.assertNotIn(key, shown)
        # A key with the API's default allowance and no label says so,
        # with no empty lines.
        plain = accountId((await keys("create")).splitlines()[-1])[:12]
        shown = (await keys("show", plain, "--default-hourly-seconds", "120")).splitlines()
        self.assertIn("hourly seconds: 120 (the API's default)", shown)
        self.assertEqual([line for line in shown if line.endswith(":")], [])
        self.assertEqual([line for line in shown if line.startswith(("label", "revoked"))], [])
        self.assertEqual(await keys("revoke", kid), f"revoked key {kid}\n")
        self.assertEqual(await keys("revoke", kid), f"key {kid} was already revoked\n")
        self.assertIn("revoked 2", await keys("list"))
        self.assertIn("revoked: ", await keys("show", kid))
        await self.assertFails(keys("show", "000000"), StoreError)

    async def test_keysImport(self) -> None:
        """
        C{privox keys import FILE}: the original's users keep their keys (of
        any length up to 256) and allowances. Keys already in the store are
        counted and left alone (a revoked one stays revoked); no key is ever
        printed.
        """
        dsn = await self.dsn()
        parser = buildParser({})

        async def keys(*argv: str, stdin: bytes = b"") -> str:
            out = io.StringIO()
            args = parser.parse_args(["keys", *argv, "--accounts", dsn])
            await runKeys(reactor, args, out, io.BytesIO(stdin))
            return out.getvalue()

        long = "k" * 256
        lines = [
            "# the original exchange's users",
            "",
            "orig-1234  7200  Alice Example",
            "   orig/with+odd=chars&é  -  bob",
            "short",
            f"{long} 0.5",
            "\t  # an indented comment",
        ]
        path = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\ufeff" + "\r\n".join(lines) + "\n")
        output = await keys("import", path)
        self.assertEqual(output, "imported 4 keys (0 already present)\n")
        store = await self.opened(dsn)
        alice = await store.authenticate("orig-1234")
        assert alice is not None
        self.assertEqual(
            (alice.role, alice.hourlySeconds, alice.label, alice.active),
            ("user", 7200.0, "Alice Example", True),
        )
        self.assertEqual(alice.keyId, accountId("orig-1234")[:12])
        bob = await store.authenticate("orig/with+odd=chars&é")
        assert bob is not None
        self.assertEqual((bob.hourlySeconds, bob.label), (None, "bob"))
        short = await store.authenticate("short")
        assert short is not None
        self.assertEqual((short.hourlySeconds, short.label), (None, ""))
        self.assertEqual((await store.authenticate(long)).hourlySeconds, 0.5)  # type: ignore[union-attr]
        self.assertIsNone(await store.authenticate("# the"))
        # An imported key is named by itself too, as a made one is.
        self.assertIn("hourly seconds: 7200", await keys("show", "orig-1234"))
        self.assertEqual(await keys("revoke", "short"), f"revoked key {short.keyId}\n")

        # Again, from stdin, with one new key and Alice's allowance changed:
        # what the store has stays as it is.
        again = "orig-1234 10\nshort\nnew-one 60 carol\n"
        self.assertEqual(
            await keys("import", "-", stdin=again.encode()), "imported 1 keys (2 already present)\n"
        )
        self.assertEqual((await store.authenticate("orig-1234")).hourlySeconds, 7200.0)  # type: ignore[union-attr]
        self.assertFalse((await store.authenticate("short")).active)  # type: ignore[union-attr]
        self.assertEqual((await store.authenticate("new-one")).label, "carol")  # type: ignore[union-attr]
        for secret in ("orig-1234", "short", "new-one", long):
            self.assertNotIn(secret, await keys("list"))

    async def test_keysImportRefusesMalformed(self) -> None:
        """
        A malformed line fails the whole import, by its number and without
        its text (it holds a key); nothing is written.
        """
        dsn = await self.dsn()
        parser = buildParser({})

        async def importing(text: str) -> str:
            args = parser.parse_args(["keys", "import", "-", "--accounts", dsn])
            e = await self.assertFails(
                runKeys(reactor, args, io.StringIO(), io.BytesIO(text.encode())), StoreError
            )
            return str(e)

        cases = [
            ("good-key 60\n# fine\nsecret-key lots of seconds\n", "stdin line 3: the hourly seconds"),
            ("good-key\nsecret-key -5\n", "stdin line 2: the hourly seconds"),
            ("good-key\nsecret-key nan\n", "stdin line 2: the hourly seconds"),
            ("good-key\nsecret-key inf\n", "stdin line 2: the hourly seconds"),
            ("good-key\n" + "s" * 257 + "\n", "stdin line 2: a key is at most 256 characters"),
        ]
        for text, reason in cases:
            message = await importing(text)
            self.assertTrue(message.startswith(reason), message)
            self.assertNotIn("secret-key", message)
            self.assertNotIn("good-key", message)
        self.assertEqual(await (await self.opened(dsn)).accounts(), [])
        args = parser.parse_args(["keys", "import", self.mktemp(), "--accounts", dsn])  # type: ignore[attr-defined]
        e = await self.assertFails(runKeys(reactor, args, io.StringIO()), StoreError)
        self.assertIn("cannot read", str(e))

    async def test_keysFromTheApiConfig(self) -> None:
        """
        C{privox keys --config /etc/privox/api.toml} works on the store the
        API uses, with its hourly seconds; a relative SQLite path there is
        refused (relative to the API's working directory, unknown here).
        """
        dsn = await self.dsn()
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'accounts = "{dsn}"\nhourly-seconds = 77.0\nlisten = "tcp:8080"\n')
        parser = buildParser({})

        async def keys(*argv: str) -> str:
            out = io.StringIO()
            await runKeys(reactor, parser.parse_args(["keys", *argv, "--config", config]), out)
            return out.getvalue()

        kid = accountId((await keys("create")).splitlines()[-1])[:12]
        self.assertIn("hourly seconds: 77 (the API's default)", await keys("show", kid))
        self.assertIn(kid, await keys("list"))
        with open(config, "w") as f:
            f.write('accounts = "sqlite:privox-accounts.sqlite3"\n')
        e = await self.assertFails(keys("list"), StoreError)
        self.assertIn("relative to the API's working directory", str(e))

    async def opened(self, dsn: str) -> AccountStore:
        """
        Another store on the database at C{dsn}, as a second process sees it.
        """
        store = AccountStore.open(dsn, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        await store.migrate()
        return store

    async def assertFails(self, work: Any, kind: type[BaseException]) -> Any:
        try:
            await work
        except kind as e:
            return e
        self.fail(f"{kind.__name__} not raised")  # type: ignore[attr-defined]


class SQLiteStoreTests(StoreTests, TestCase):
    async def dsn(self) -> str:
        return "sqlite:" + os.path.abspath(self.mktemp())


class PostgreSQLStoreTests(StoreTests, TestCase):
    async def dsn(self) -> str:
        from tests.pgcluster import freshDatabase

        return await deferToThread(freshDatabase)  # type: ignore[no-any-return]


class DSNTests(SynchronousTestCase):
    def test_dsns(self) -> None:
        self.assertEqual(parseDSN("sqlite:a.db")[0].name, "sqlite")
        dialect, args, _, shown = parseDSN("postgresql://privox:s3cret@db.example/privox")
        self.assertEqual((dialect.name, args), ("postgresql", ("postgresql://privox:s3cret@db.example/privox",)))
        self.assertNotIn("s3cret", shown)
        self.assertRaises(StoreError, parseDSN, "mysql://x")
        self.assertRaises(StoreError, parseDSN, "sqlite:")

    def test_placeholders(self) -> None:
        pg = parseDSN("postgresql:///x")[0]
        self.assertEqual(pg.sql("a = ? AND b LIKE '5%'"), "a = %s AND b LIKE '5%%'")
        self.assertEqual(parseDSN("sqlite:x")[0].sql("a = ?"), "a = ?")
