"""
The open exchange's pieces, each alone: the signed directory
(L{privox.directory}), the API's directory of farms that join
(L{privox.api.farmdirectory}), a farm registering (L{privox.farm.registration})
and a node finding farms (L{privox.node.farmfinder}). The whole, with real
processes, is in C{tests/test_open_exchange.py}.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.accounts.store import AccountStore
from privox.api import farmdirectory
from privox.api.errors import BadInput, Conflict, OverQuota, Unavailable, Unprocessable
from privox.api.farmdirectory import PROBE_SPACING, FarmDirectory, ProbeFailed, farmProber
from privox.api.farmhealth import farmHealth
from privox.api.farmlist import FarmEntry
from privox.api.farmpool import Dialing, FarmPool, Unreachable, publicEndpoint
from privox.api.farms import FarmExchange
from privox.directory import Directory, DirectoryError, ListedFarm
from privox.farm.registration import Registration, parsePublic
from privox.identity import PASS_PREFIX, ConsumerPass
from privox.node.farmfinder import FarmFinder

A = {"name": "alpha", "stt": "tcp:host=alpha.example:port=1776", "tts": None}
B = {"name": "beta", "stt": "tcp:host=beta.example:port=1776",
     "tts": "tls:host=beta.example:port=1777"}


class SignedDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.farms = [ListedFarm.parse(B), ListedFarm.parse(A)]
        self.signed = Directory.issue(self.farms, 1000.0, lifetime=600).signed(self.key)

    def test_roundTrip(self) -> None:
        directory = Directory.verify(json.loads(json.dumps(self.signed)), self.key.public_key(), 1001)
        self.assertEqual([f.name for f in directory.farms], ["alpha", "beta"])  # sorted
        self.assertEqual(directory.serving("stt"), (A["stt"], B["stt"]))
        self.assertEqual(directory.serving("tts"), (B["tts"],))
        self.assertEqual((directory.issued, directory.expires), (1000.0, 1600.0))

    def test_refused(self) -> None:
        def refused(fields: Any, now: float = 1001, key: Any = None) -> str:
            e = self.assertRaises(
                DirectoryError, Directory.verify, fields, key or self.key.public_key(), now
            )
            return str(e)

        tampered = dict(self.signed, farms=[dict(A, stt="tcp:host=evil.example:port=1776"), B])
        self.assertEqual(refused(tampered), "the directory is not signed by this exchange")
        longer = dict(self.signed, expires=99999.0)
        self.assertEqual(refused(longer), "the directory is not signed by this exchange")
        self.assertEqual(refused(self.signed, now=1600), "the directory has expired")
        self.assertEqual(refused(self.signed, now=500), "the directory was issued in the future")
        other = Ed25519PrivateKey.generate().public_key()
        self.assertEqual(refused(self.signed, key=other),
                         "the directory is not signed by this exchange")
        self.assertIn("not signed", refused(dict(self.signed, signature="x")))
        self.assertIn("version", refused(dict(self.signed, v=2)))
        self.assertIn("no name", refused(dict(self.signed, farms=[{"stt": "tcp:host=a:port=1"}])))
        self.assertIn("neither", refused(dict(self.signed, farms=[{"name": "n"}])))
        self.assertIn("not a JSON object", refused([]))


class Probes:
    """
    A probe whose answers the test decides: a farm name in C{failing}
    fails, anything else passes in 5 ms.
    """

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.probed: list[str] = []

    def __call__(self, entry: FarmEntry) -> Deferred[float]:
        self.probed.append(entry.name)
        if entry.name in self.failing:
            return fail(ProbeFailed("stt port refused the canary job with unauthorized"))
        return succeed(0.005)


class FarmDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.exchange = FarmExchange(
            [FarmEntry("own", "tcp:host=own.example:port=1776", None),
             FarmEntry("reserve", "tcp:host=reserve.example:port=1776", None, fallback=True)],
            reactor, clock=self.clock,
        )
        self.probes = Probes()
        self.key = Ed25519PrivateKey.generate()
        self.directory = FarmDirectory(
            self.exchange, self.probes, self.clock, self.key, list(self.exchange.farms[i].entry
                                                                  for i in range(2)),
            refresh=10.0,
        )
        self.directory.prober.startService()
        self.addCleanup(self.directory.prober.stopService)

    def register(self, fields: Any, account: str = "f00d00000001") -> dict[str, Any]:
        return self.successResultOf(Deferred.fromCoroutine(self.directory.register(account, fields)))

    def refused(self, kind: type, fields: Any, account: str = "f00d00000001") -> str:
        failure = self.failureResultOf(
            Deferred.fromCoroutine(self.directory.register(account, fields)), kind
        )
        return failure.value.message

    def listed(self) -> list[str]:
        signed = self.directory.signed(self.clock.seconds())
        return [f.name for f in Directory.verify(signed, self.key.public_key(), self.clock.seconds()).farms]

    def test_joins(self) -> None:
        """
        A farm that passes its probe takes jobs and is listed, beside the
        API's own primary farms (not its reserved ones).
        """
        self.assertEqual(self.listed(), ["own"])
        self.assertEqual(
            self.register(dict(A, producers={"stt": {"whisper:tiny.en": 3}})),
            {"name": "alpha", "listed": True, "refresh_s": 10.0},
        )
        self.assertEqual([f.entry.name for f in self.exchange.farms], ["own", "reserve", "alpha"])
        self.assertEqual(self.listed(), ["alpha", "own"])
        # A joined farm is listed with its key id (nodes show it no key, and
        # bind their offers to it; the API shows it passes for it); the
        # API's own farms are not.
        signed = self.directory.signed(self.clock.seconds())
        members = {f.name: f.member for f in Directory.verify(
            signed, self.key.public_key(), self.clock.seconds()).farms}
        self.assertEqual(members, {"alpha": "f00d00000001", "own": None})
        self.assertEqual(self.exchange.farms[2].entry.member, "f00d00000001")
        # Registering again refreshes it (and its producers) without a new probe.
        self.register(dict(A, producers={"stt": {"whisper:tiny.en": 5}}))
        self.assertEqual(self.probes.probed, ["alpha"])
        signed = self.directory.signed(self.clock.seconds())
        [alpha] = [f for f in Directory.verify(signed, self.key.public_key(), 0).farms
                   if f.name == "alpha"]
        self.assertEqual(alpha.producers, {"stt": {"whisper:tiny.en": 5}})
        self.refused(BadInput, dict(A, producers={"stt": {"m": -1}}))
        self.refused(BadInput, dict(A, producers={"xyz": {}}))
        # Online nodes: fingerprints and positive counts, a bounded many;
        # never in the directory.
        one = {"node": "nodeFingerprint1", "account": "f00d00000009", "connections": 2}
        self.register(dict(A, nodes=[one]))
        self.assertNotIn("nodeFingerprint1", json.dumps(self.directory.signed(self.clock.seconds())))
        for nodes in ({"nodeFingerprint1": 2}, [dict(one, node="short")],
                      [dict(one, connections=0)], [dict(one, connections=True)],
                      [dict(one, account="not-hex")], ["nodeFingerprint1"],
                      [dict(one, node=f"node{n:012d}") for n in range(1001)]):
            self.assertIn("nodes", self.refused(BadInput, dict(A, nodes=nodes)))

    def test_probeFails(self) -> None:
        self.probes.failing.add("alpha")
        message = self.refused(Unprocessable, A)
        self.assertEqual(
            message,
            "the farm did not pass its probe: stt port refused the canary job with unauthorized",
        )
        self.assertEqual(self.listed(), ["own"])
        self.assertEqual(len(self.exchange.farms), 2)

    def test_names(self) -> None:
        self.register(A)
        self.assertIn("is taken", self.refused(Conflict, A, account="f00d00000002"))
        self.assertIn("is taken", self.refused(Conflict, dict(A, name="own")))
        self.assertIn("is taken", self.refused(Conflict, dict(A, name="reserve")))
        # Its own farm may move: a new probe, then the new endpoints.
        moved = dict(A, stt="tcp:host=alpha2.example:port=1776")
        # Not probed again at once: a key may not have the API dial for it
        # as fast as it likes.
        self.assertIn("probed just now", self.refused(OverQuota, moved))
        self.clock.advance(10)
        self.register(moved)
        # Listed, its refresh probe, then the move's.
        self.assertEqual(self.probes.probed, ["alpha", "alpha", "alpha"])
        [alpha] = [f for f in self.exchange.farms if f.entry.name == "alpha"]
        self.assertEqual(alpha.entry.stt, moved["stt"])

    def test_oneKeyOneFarm(self) -> None:
        """
        A farm key lists one farm, an endpoint is one farm's, and the
        directory has a size: no key floods it.
        """
        self.register(A)
        self.assertEqual(
            self.refused(Conflict, dict(B, name="alpha2")), "this farm key lists farm 'alpha' already"
        )
        self.assertEqual(self.refused(Conflict, dict(A, name="gamma"), account="f00d00000002"),
                         "another farm lists that endpoint")
        own = dict(A, name="gamma", stt="tcp:host=own.example:port=1776")
        self.assertEqual(self.refused(Conflict, own, account="f00d00000002"),
                         "another farm lists that endpoint")
        self.patch(farmdirectory, "MAX_LISTED", 2)  # alpha and own
        self.assertIn("full", self.refused(Unavailable, B, account="f00d00000002"))
        self.assertEqual(self.probes.probed, ["alpha"])

    def test_badRegistrations(self) -> None:
        cases = [
            [],
            {"stt": A["stt"]},
            dict(A, name="two words"),
            dict(A, name="new\nline"),
            dict(A, name="-dash"),
            dict(A, name="x" * 65),
            dict(A, name="\u202eevil"),
            dict(A, stt=None),
            dict(A, stt="unix:path=/run/privox.sock"),
            dict(A, stt="tcp:host=a.example:port=1776:bindAddress=127.0.0.1"),
            dict(A, stt="tls:host=a.example:port=1776:trustRoots=/etc/ssl"),
            dict(A, stt="tls:host=a.example:port=1776:certificate=/root/key.pem"),
            dict(A, stt=7),
        ]
        for fields in cases:
            self.refused(BadInput, fields)
        self.assertEqual(self.probes.probed, [])

    def test_dropped(self) -> None:
        """
        A listed farm whose probe fails, or that stops registering, leaves
        the directory and the exchange; only a new probe lists it back.
        """
        self.register(A)
        self.register(B, account="f00d00000002")
        self.probes.failing.add("alpha")
        self.clock.advance(10)
        self.assertEqual(self.listed(), ["beta", "own"])
        self.assertNotIn("alpha", [f.entry.name for f in self.exchange.farms])
        self.assertIn("beta", [f.entry.name for f in self.exchange.farms])
        # beta stops registering: three refreshes later it is gone.
        self.clock.pump([10, 10, 10])
        self.assertEqual(self.listed(), ["own"])
        self.probes.failing.clear()
        self.register(A)
        self.assertEqual(self.listed(), ["alpha", "own"])


class SharedDirectoryTests(TestCase):
    """
    Two API servers of one exchange, one account store: a farm that joins
    one is probed and taken by the other; dropped by one, let go by both.
    """

    async def test_shared(self) -> None:
        store = AccountStore.open("sqlite:" + os.path.abspath(self.mktemp()), reactor)
        self.addCleanup(store.close)
        await store.migrate()
        clock = Clock()
        key = Ed25519PrivateKey.generate()
        apis = []
        for _ in range(3):
            probes = Probes()
            exchange = FarmExchange([], reactor, clock=clock)
            apis.append((FarmDirectory(exchange, probes, clock, key, [], refresh=10, store=store),
                         probes, exchange))
        (first, firstProbes, _), (second, secondProbes, secondExchange), (third, _, _) = apis
        node = "nodeFingerprint1"
        await store.recordEnrolment(node, "abcdef123456", clock.seconds(), clock.seconds() + 86400)
        await first.register("f00d00000001", dict(A, nodes=[
            {"node": node, "account": "abcdef123456", "connections": 2},
            # The same node under another key's certificate: not this key's.
            {"node": node, "account": "0123456789ab", "connections": 1},
        ]))
        # Its nodes are online, for their owners' pages.
        [enrolled] = await store.enrolments("abcdef123456", clock.seconds() - 300)
        self.assertEqual((enrolled["farms"], enrolled["connections"]), (1, 2))
        self.assertEqual(secondProbes.probed, [])
        await second._reprobe()
        self.assertEqual(secondProbes.probed, ["alpha"])
        self.assertEqual([f.entry.name for f in secondExchange.farms], ["alpha"])
        self.assertEqual(secondExchange.farms[0].entry.member, "f00d00000001")
        # The name is the first key's, at either API server.
        with self.assertRaises(Conflict):
            await second.register("f00d00000002", dict(A, stt="tcp:host=evil.example:port=1"))
        # Its probe fails at the first: gone from both.
        firstProbes.failing.add("alpha")
        clock.advance(5)
        await first._reprobe()
        for _ in range(500):  # its unlisting runs in the store's thread
            if not await store.listedFarms():
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(await store.listedFarms(), [])
        [enrolled] = await store.enrolments("abcdef123456", clock.seconds() - 300)
        self.assertEqual((enrolled["farms"], enrolled["connections"]), (0, 0))
        await second._reprobe()
        self.assertEqual(second.listed, {})
        self.assertEqual(secondExchange.farms, [])

        # Listed at both again; then another key holds the name at the same
        # endpoints (it went stale, and the address went to someone else):
        # the second server probes it anew and shows it passes for that key.
        firstProbes.failing.clear()
        clock.advance(PROBE_SPACING)
        await first.register("f00d00000001", A)
        await second._reprobe()
        self.assertEqual(secondExchange.farms[0].entry.member, "f00d00000001")
        await store.unlistFarm("alpha", "f00d00000001", clock.seconds())
        await third.register("f00d00000003", A)
        await second._reprobe()
        self.assertEqual(secondProbes.probed, ["alpha", "alpha", "alpha"])
        self.assertEqual([f.entry.member for f in secondExchange.farms], ["f00d00000003"])


class FakeHttp:
    """
    treq's get and post, answering what the test set.
    """

    def __init__(self) -> None:
        self.code = 200
        self.body = b"{}"
        self.requests: list[tuple[str, str, Any]] = []
        self.error: Exception | None = None

    def _answer(self) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        body = self.body

        class Response:
            code = self.code
            length = UNKNOWN_LENGTH

            def content(self) -> Deferred[bytes]:
                return succeed(body)

            def deliverBody(self, protocol: Any) -> None:
                protocol.makeConnection(StringTransport())
                for start in range(0, len(body), 65536):
                    protocol.dataReceived(body[start:start + 65536])
                protocol.connectionLost(Failure(ResponseDone()))

        return succeed(Response())

    def get(self, url: str) -> Deferred[Any]:
        self.requests.append(("GET", url, None))
        return self._answer()

    def post(self, url: str, json: Any, headers: dict[str, str]) -> Deferred[Any]:
        self.requests.append(("POST", url, (json, headers)))
        return self._answer()


class FarmFinderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.key = Ed25519PrivateKey.generate()
        self.http = FakeHttp()
        self.found: list[Directory] = []
        self.finder = FarmFinder("https://api.example/", self.key.public_key(), self.clock,
                                 self.found.append, http=self.http, refresh=60)
        self.finder.startService()
        self.addCleanup(self.finder.stopService)

    def serve(self, farms: list[dict[str, Any]], key: Any = None, issued: float | None = None) -> None:
        now = self.clock.seconds() if issued is None else issued
        directory = Directory.issue([ListedFarm.parse(f) for f in farms], now)
        self.http.body = json.dumps(directory.signed(key or self.key)).encode()

    def test_found(self) -> None:
        self.serve([A])
        self.clock.advance(0)
        self.assertEqual(self.http.requests, [("GET", "https://api.example/v1/farms", None)])
        [directory] = self.found
        self.assertEqual(directory.serving("stt"), (A["stt"],))
        # The same farms again: nothing new; another farm: told.
        self.clock.advance(60)
        self.assertEqual(len(self.found), 1)
        self.serve([A, B])
        self.clock.advance(60)
        self.assertEqual(self.found[-1].serving("stt"), (A["stt"], B["stt"]))

    def test_refused(self) -> None:
        """
        A tampered, foreign or expired directory is refused; the node
        keeps what it had.
        """
        self.serve([A])
        self.clock.advance(0)
        good = self.finder.directory
        body = json.loads(self.http.body)
        body["farms"][0]["stt"] = "tcp:host=evil.example:port=1776"
        self.http.body = json.dumps(body).encode()
        self.clock.advance(60)
        self.serve([B], key=Ed25519PrivateKey.generate())
        self.clock.advance(60)
        self.serve([B], issued=self.clock.seconds() - 700)
        self.clock.advance(60)
        self.http.code, self.http.body = 503, b"{}"
        self.clock.advance(60)
        self.http.error = ConnectionRefusedError()
        self.clock.advance(60)
        self.http.error = None
        self.http.body = b"[" + b" " * 3_000_000 + b"]"  # not read to its end
        self.clock.advance(60)
        self.assertIn("longer than 2000000 bytes", self.finder._said)
        self.http.code = 200
        self.serve([A, B], issued=self.clock.seconds() - 400)  # good, but older than the last
        self.clock.advance(60)
        # An endpoint a node must not dial: refused before its signature.
        self.http.body = json.dumps(
            Directory.issue([ListedFarm("beta", B["stt"], None)], self.clock.seconds()).signed(self.key)
        ).replace(B["stt"], "unix:path=/run/privox.sock").encode()
        self.clock.advance(60)
        self.assertIs(self.finder.directory, good)
        self.assertEqual(len(self.found), 1)
        self.assertEqual(len(self.http.requests), 9)

    def test_byNeed(self) -> None:
        """
        Farms with fewer producers of a node's models come first, drawn
        by 1/(1+producers): nodes spread, and the neediest gets the most.
        """
        farms = [
            ListedFarm("busy", "tcp:host=busy:port=1", None, {"stt": {"whisper:tiny.en": 9}}),
            ListedFarm("any", "tcp:host=any:port=1", None, {"stt": {"*": 1}}),
            ListedFarm("empty", "tcp:host=empty:port=1", None),
            ListedFarm("tts", None, "tcp:host=tts:port=1"),
        ]
        directory = Directory.issue(farms, 0.0)
        rng = random.Random(4)
        firsts = [directory.byNeed("stt", ["whisper:tiny.en"], rng)[0] for _ in range(10000)]
        shares = {e.split("=")[1].split(":")[0]: firsts.count(e) / len(firsts) for e in set(firsts)}
        # Weights 1/10, 1/2 and 1: shares 1/16, 5/16, 10/16.
        self.assertLess(abs(shares["busy"] - 1 / 16), 0.01, shares)
        self.assertLess(abs(shares["any"] - 5 / 16), 0.015, shares)
        self.assertLess(abs(shares["empty"] - 10 / 16), 0.015, shares)
        self.assertEqual(sorted(directory.byNeed("stt", [], rng)),
                         sorted(directory.serving("stt")))
        self.assertEqual(directory.byNeed("tts", ["x"], rng), ("tcp:host=tts:port=1",))


class RegistrationTests(SynchronousTestCase):
    def test_registers(self) -> None:
        """
        Now and every refresh, with the farm key; as often as the API asks.
        """
        clock = Clock()
        http = FakeHttp()
        http.body = json.dumps({"name": "alpha", "listed": True, "refresh_s": 5}).encode()
        registration = Registration(
            "https://api.example", "farmkey", "alpha", parsePublic(f"{A['stt']} none"), clock,
            http=http, refresh=60, producers=lambda: {"stt": {"whisper:tiny.en": 2}},
            online=lambda: [{"node": "nodeFingerprint1", "account": "f00d00000009", "connections": 2}],
        )
        registration.startService()
        clock.advance(0)
        [(method, url, (body, headers))] = http.requests
        self.assertEqual((method, url), ("POST", "https://api.example/v1/farms"))
        self.assertEqual(body, {"name": "alpha", "stt": A["stt"], "tts": None,
                                "producers": {"stt": {"whisper:tiny.en": 2}},
                                "nodes": [{"node": "nodeFingerprint1", "account": "f00d00000009",
                                           "connections": 2}]})
        self.assertEqual(headers, {"Authorization": "Bearer farmkey"})
        clock.advance(5)
        self.assertEqual(len(http.requests), 2)
        # Refused, or unreachable: tried again all the same.
        http.code = 422
        clock.advance(5)
        http.error = ConnectionRefusedError()
        clock.advance(5)
        self.assertEqual(len(http.requests), 4)
        registration.stopService()
        clock.advance(60)
        self.assertEqual(len(http.requests), 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_public(self) -> None:
        self.assertEqual(parsePublic("tcp:host=a:port=1 none"), ("tcp:host=a:port=1", None))
        for bad in ("", "one", "none none", "a b c"):
            self.assertRaises(ValueError, parsePublic, bad)


class ResolvingReactor(MemoryReactorClock):
    """
    A memory reactor whose names lead where the test says, as they may
    change between a probe and a job (DNS rebinding).
    """

    def __init__(self) -> None:
        super().__init__()
        self.addresses: dict[str, str] = {}

    def resolve(self, name: str, timeout: Any = None) -> Deferred[str]:
        return succeed(self.addresses[name])


class PublicDialingTests(SynchronousTestCase):
    """
    A farm that joined by itself is dialled only where its name leads to a
    public address, checked at every connection and at every probe.
    """

    def setUp(self) -> None:
        self.reactor = ResolvingReactor()
        self.exchange = Ed25519PrivateKey.generate()

    def pool(self, endpoint: str, member: str | None = "farmkeyid123", publicOnly: bool = True) -> FarmPool:
        dialing = Dialing(self.reactor, self.reactor, "api-key", 2, 10.0, None, None,
                          self.exchange, publicOnly)
        health = farmHealth("joined", (1.0, 60.0), lambda: None)
        return FarmPool(dialing, health, "stt", endpoint, member)

    def test_dialsTheCheckedAddress(self) -> None:
        self.reactor.addresses["farm.example"] = "93.184.216.34"
        pool = self.pool("tcp:host=farm.example:port=1776")
        Deferred.fromCoroutine(pool.acquire(self.reactor.seconds() + 5))
        [(host, port, factory, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 1776))
        # And it is shown a pass for that farm, not the API's key.
        protocol = factory.buildProtocol(None)._wrappedProtocol
        self.assertTrue(protocol.hello.key.startswith(PASS_PREFIX))
        ConsumerPass.verify(protocol.hello.key[len(PASS_PREFIX):], self.exchange.public_key(),
                            "farmkeyid123", self.reactor.seconds())

    def test_tlsKeepsItsName(self) -> None:
        self.reactor.addresses["farm.example"] = "93.184.216.34"
        endpoint = self.successResultOf(
            publicEndpoint(self.reactor, "tls:host=farm.example:port=1777", None)
        )
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _, _, _)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 1777))
        self.assertEqual(endpoint._wrappedEndpoint._host, "93.184.216.34")

    def test_rebound(self) -> None:
        """
        A name that leads into the API's own network now (whatever it led
        to at the probe) is not dialled: the farm counts as unreachable.
        """
        for address in ("10.0.0.7", "127.0.0.1", "169.254.169.254", "192.168.1.1"):
            self.reactor.addresses["farm.example"] = address
            pool = self.pool("tcp:host=farm.example:port=1776")
            acquired = Deferred.fromCoroutine(pool.acquire(self.reactor.seconds() + 5))
            failure = self.failureResultOf(acquired, Unreachable)
            self.assertIn("not public", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_configuredFarmsAsTheySay(self) -> None:
        """
        The API's own farms (and every farm of an API that lets private
        farms join) are dialled as their lines say, with its key.
        """
        for member, publicOnly in ((None, True), ("farmkeyid123", False)):
            pool = self.pool("tcp:host=127.0.0.1:port=1776", member, publicOnly)
            Deferred.fromCoroutine(pool.acquire(self.reactor.seconds() + 5))
        self.assertEqual([c[:2] for c in self.reactor.tcpClients],
                         [("127.0.0.1", 1776), ("127.0.0.1", 1776)])
        key = self.reactor.tcpClients[0][2].buildProtocol(None)._wrappedProtocol.hello.key
        self.assertEqual(key, "api-key")

    def test_probe(self) -> None:
        self.reactor.addresses["farm.example"] = "10.1.2.3"
        probe = farmProber(self.reactor, lambda entry: "api-key")
        entry = FarmEntry("joined", "tcp:host=farm.example:port=1776", None, member="k")
        failure = self.failureResultOf(Deferred.fromCoroutine(probe(entry)), ProbeFailed)
        self.assertEqual(str(failure.value), "stt port is not at a public address")
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.addresses["farm.example"] = "93.184.216.34"
        Deferred.fromCoroutine(probe(entry))
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("93.184.216.34", 1776)])
