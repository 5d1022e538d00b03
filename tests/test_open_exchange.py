"""
An open exchange, as separate processes: one API with accounts and no farm
of its own, two volunteers' farms that join it by themselves
(C{privox-farm --exchange URL --public ...}), and a node that knows only
the API (C{privox-node --exchange URL --exchange-key KEY}, no farm named),
which finds the farms in the signed directory. Jobs flow, sealed end to
end; a stopped farm leaves the directory while jobs keep flowing through
the other; a farm whose canary job fails is never listed; a node served a
forged or expired directory dials none of its farms.
"""

from __future__ import annotations

import json
import os
import re

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from treq.client import HTTPClient

from privox.consumer import ConsumerProtocol
from privox.directory import Directory, ListedFarm
from privox.engines.digest import digestOf
from privox.framing import FrameDecoder
from privox.identity import encodeKey, exchangePublicKey, publicBytes
from privox.messages import GREETING, Okay, controlFrame
from privox.node.echo import DigestHandler
from privox.node.worker import ProducerProtocol
from privox.peer import Denied
from privox.wav import pcmToWav
from tests.support import until
from tests.test_cli import privox
from tests.test_e2e import freePorts
from tests.test_faults import ProcessTestCase


class LyingFarm(Protocol):
    """
    A "farm" that lets anyone in and answers every job itself.
    """

    def connectionMade(self) -> None:
        self.decoder = FrameDecoder(1 << 20)
        self.transport.write(GREETING)

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.verb == b"HELO":
                self.transport.write(controlFrame(b"OKAY", Okay("liar", 30, 1 << 20, 1 << 20).payload()))
            elif frame.verb == b"JOB_":
                self.transport.write(controlFrame(b"ASGN", {"id": "j1"}))
                self.transport.write(controlFrame(b"RSLT", {"id": "j1", "text": "anything"}))


class LyingFarmFactory(Factory):
    protocol = LyingFarm


class OpenExchangeTests(ProcessTestCase):
    timeout = 180

    async def key(self, role: str) -> str:
        out, err, code = await privox("keys", "create", "--role", role, "--accounts", self.dsn)
        self.assertEqual(code, 0, err)
        return out.splitlines()[-1]

    async def directory(self) -> Directory:
        response = await self.http.get(self.url + "/v1/farms")
        self.assertEqual(response.code, 200)
        body = json.loads(await response.content())
        return Directory.verify(body, self.exchangeKey, reactor.seconds())

    async def volunteerFarm(self, name: str) -> tuple[object, int]:
        stt, tts = freePorts(2)
        here = FilePath(os.path.abspath(self.mktemp()))
        here.makedirs()
        # The farm lets in producers by key only if they hold this one: a
        # node that finds the farm in the directory gets in by its
        # certificate, naming no key at all.
        here.child("producers").setContent(self.handKey.encode() + b"\n")
        farm, _, _ = await self.startFarmProcess(
            name, (stt, tts), "--exchange", self.url, "--api-key", await self.key("farm"),
            "--public", f"tcp:host=127.0.0.1:port={stt} tcp:host=127.0.0.1:port={tts}",
            "--producer-keys", here.child("producers").path,
            "--ledger-spool", here.child("ledger.spool").path,
        )
        return farm, stt

    async def test_farmsAndNodeJoin(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        root.makedirs()
        self.dsn = "sqlite:" + root.child("accounts.sqlite3").path
        self.apiKey = await self.key("user")
        [port] = freePorts(1)
        self.url = f"http://127.0.0.1:{port}"
        api = self.spawn(
            "api", "privox-api", "--accounts", self.dsn,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--exchange-key", root.child("exchange.key").path,
            # Loopback farms may join (a private network), checked every second.
            "--farm-registration", "any", "--farm-refresh", "1",
            "--stt-model", "fast digest:x digest:x",
            # Its consumer key: only the farms of its own configuration see it.
            "--farm-key", self.apiKey,
        )
        await api.waitFor(b"starting on %d" % port)
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        published = json.loads(await (await self.http.get(self.url + "/v1/exchange")).content())
        self.exchangeKey = exchangePublicKey(published["key"])
        self.assertEqual((await self.directory()).farms, ())

        # Two volunteers' farms join by themselves.
        self.handKey = await self.key("user")
        first, _ = await self.volunteerFarm("first")
        second, secondStt = await self.volunteerFarm("second")
        for farm, name in ((first, b"first"), (second, b"second")):
            # The exchange's key, read before registering, is the one it publishes.
            await farm.waitFor(b"signs with key " + published["key"][:16].encode())
            await farm.waitFor(b"listed in the directory of " + self.url.encode())
            await api.waitFor(b"farm " + name + b" of key ")
        self.assertRegex(bytes(api.output), rb"farm first of key \w{12} joined the directory")
        self.assertEqual([f.name for f in (await self.directory()).farms], ["first", "second"])

        # A node that knows only the exchange's URL and its own key finds
        # them, its two slots on both; it pins the exchange's key on first use.
        nodeKey = await self.key("user")
        node = self.spawn(
            "node", "privox-node", "--stt", "digest:x", "--slots", "2",
            "--exchange", self.url, "--key", nodeKey,
            "--state-dir", root.child("node").path, "--retry-max", "0.5",
            "--shutdown-grace", "1",
        )
        await node.waitFor(b"pinned the exchange key " + published["key"][:16].encode())
        self.assertEqual(root.child("node").child("exchange.pub").getContent().strip(),
                         published["key"].encode())
        await node.waitFor(b"the directory of " + self.url.encode() + b" lists 2 farm(s)")
        await node.waitFor(b"enrolled with " + self.url.encode())
        await until(lambda: len(re.findall(rb"serving stt through", bytes(node.output))) >= 2,
                    "both slots serving", 30)
        served = set(re.findall(rb"serving stt through \S+ \((\w+)\)", bytes(node.output)))
        self.assertEqual(served, {b"first", b"second"})
        # The farms tell the directory their producers: one each now.
        for _ in range(100):
            counts = {f.name: f.producers for f in (await self.directory()).farms}
            if all(c.get("stt", {}).get("digest:x") == 1 for c in counts.values()):
                break
            await deferLater(reactor, 0.1)
        self.assertEqual(counts, {"first": {"stt": {"digest:x": 1}, "tts": {}},
                                  "second": {"stt": {"digest:x": 1}, "tts": {}}})

        # And that the node is online there, which its owner's page shows.
        async def online() -> bool:
            response = await self.http.get(self.url + "/account",
                                           headers={"Cookie": f"privox_key={nodeKey}"})
            return "online: 2 connections at 2 farms" in (await response.text())

        await until(online, "the node online on its owner's page", 20, every=0.2)

        userKey = await self.key("user")

        async def transcribe(n: int) -> None:
            audio = pcmToWav(bytes([n]) * 3200, 16000)
            response = await self.http.post(
                self.url + "/v1/audio/transcriptions",
                files={"file": ("a.wav", audio)}, data={"model": "whisper-1"},
                headers={"Authorization": f"Bearer {userKey}"},
            )
            body = await response.content()
            self.assertEqual(response.code, 200, body)
            self.assertEqual(json.loads(body)["text"],
                             f"sha256:{digestOf(audio)} bytes:{len(audio)}")

        for n in range(4):
            await transcribe(n)

        # The farms never saw the node's key (they let in no key but
        # handKey), yet their ledgers, posted to the exchange by default,
        # credit the node's account by its certificate.
        async def credited() -> bool:
            response = await self.http.get(self.url + "/v1/account",
                                           headers={"Authorization": f"Bearer {nodeKey}"})
            # Four jobs of 0.1 s of audio, at the "fast" model's cost of 1.
            return float(json.loads(await response.content())["earned"]) >= 0.4 - 1e-6

        await until(credited, "the node's credit", 30, every=0.2)

        # The farms were shown no consumer key either (the API shows each a
        # pass the exchange signed for it alone), and take no one else's: a
        # user dialing a farm straight, to skip the exchange's quotas, is
        # refused.
        direct = ConsumerProtocol("stt", userKey)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", secondStt), direct)
        denied = await self.assertFailure(direct.ready, Denied)
        self.assertEqual(denied.code, "unauthorized")
        self.assertIn("only its exchange's API", denied.message)

        # One farm stops: it leaves the directory, and jobs keep flowing.
        await first.stop()
        await api.waitFor(b"farm first left the directory")
        self.assertEqual([f.name for f in (await self.directory()).farms], ["second"])
        for n in range(4, 10):
            await transcribe(n)

        # A node that claims every model cannot get an honest farm dropped:
        # the farm refuses the canary's reserved model itself.
        claimsAll = ProducerProtocol("stt", self.handKey, DigestHandler(("*",)))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", secondStt), claimsAll)
        await claimsAll.ready
        self.addCleanup(claimsAll.transport.loseConnection)
        # Two of the API's probes (each a consumer joining each port) since.
        joined = second.output.count(b"consumer ")
        await until(lambda: second.output.count(b"consumer ") >= joined + 4, "two probes", 10)
        self.assertNotIn(b"farm second left", api.output)
        self.assertEqual([f.name for f in (await self.directory()).farms], ["second"])

        # A farm that answers a job no producer can serve: never listed.
        liar = reactor.listenTCP(0, LyingFarmFactory(), interface="127.0.0.1")
        self.addCleanup(liar.stopListening)
        endpoint = f"tcp:host=127.0.0.1:port={liar.getHost().port}"
        response = await self.http.post(
            self.url + "/v1/farms", json={"name": "liar", "stt": endpoint, "tts": None},
            headers={"Authorization": f"Bearer {await self.key('farm')}"},
        )
        self.assertEqual(response.code, 422)
        self.assertIn(b"stt port answered a job no producer serves", await response.content())
        self.assertEqual([f.name for f in (await self.directory()).farms], ["second"])
        # Nothing of the jobs' content or the farms' keys in the logs.
        for output in (api.output, node.output, second.output):
            self.assertNotIn(userKey.encode(), output)
            self.assertNotIn(self.apiKey.encode(), output)

    async def test_nodeRefusesAForgedDirectory(self) -> None:
        """
        A node whose exchange's directory comes back changed on the way (a
        farm swapped in), or expired, dials none of its farms.
        """
        exchange = Ed25519PrivateKey.generate()
        directory = Directory.issue([ListedFarm("honest", "tcp:host=127.0.0.1:port=9", None)],
                                    reactor.seconds())
        forged = directory.signed(exchange)
        forged["farms"][0]["stt"] = "tcp:host=127.0.0.1:port=10"
        stale = Directory.issue([ListedFarm("honest", "tcp:host=127.0.0.1:port=9", None)],
                                reactor.seconds() - 3600).signed(exchange)
        for name, served, why in (
            ("forged", forged, b"the directory is not signed by this exchange"),
            ("stale", stale, b"the directory has expired"),
        ):
            root = Resource()
            v1 = Resource()
            root.putChild(b"v1", v1)
            v1.putChild(b"farms", Data(json.dumps(served).encode(), "application/json"))
            port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            url = f"http://127.0.0.1:{port.getHost().port}"
            node = self.spawn(
                f"node {name}", "privox-node", "--stt", "digest:x",
                "--exchange", url, "--exchange-key", encodeKey(publicBytes(exchange.public_key())),
                "--key", "node-key", "--state-dir", os.path.abspath(self.mktemp()),
                "--shutdown-grace", "1",
            )
            await node.waitFor(b"refused the directory of " + url.encode() + b": " + why)
            await node.waitFor(b"stt: no farm to serve")
            self.assertNotIn(b"serving stt through", node.output)
            self.assertNotIn(b"port=10", node.output)
            await node.stop()
