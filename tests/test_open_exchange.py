"""
An open exchange, as separate processes: one API with accounts and no farm
of its own, two volunteers' farms that join it by themselves
(C{privox-farm --exchange URL --public ...}), and a node that knows only
the API (C{privox-node --exchange URL --exchange-key KEY}, no farm named),
which finds the farms in the signed directory. Jobs flow, sealed end to
end; a stopped farm leaves the directory while jobs keep flowing through
the other; a farm whose canary job fails is never listed.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from privox.directory import Directory
from privox.engines.digest import digestOf
from privox.identity import exchangePublicKey
from privox.node.echo import DigestHandler
from privox.node.worker import ProducerProtocol
from privox.wav import pcmToWav
from tests.support import until
from tests.test_cli import privox
from tests.test_e2e import freePorts
from tests.test_faults import ProcessTestCase


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
        farm, _, _ = await self.startFarmProcess(
            name, (stt, tts), "--exchange", self.url, "--api-key", await self.key("farm"),
            "--public", f"tcp:host=127.0.0.1:port={stt} tcp:host=127.0.0.1:port={tts}",
        )
        return farm, stt

    async def test_farmsAndNodeJoin(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        root.makedirs()
        self.dsn = "sqlite:" + root.child("accounts.sqlite3").path
        [port] = freePorts(1)
        self.url = f"http://127.0.0.1:{port}"
        api = self.spawn(
            "api", "privox-api", "--accounts", self.dsn,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--exchange-key", root.child("exchange.key").path,
            # Loopback farms may join (a private network), checked every second.
            "--farm-registration", "any", "--farm-refresh", "1",
            "--stt-model", "fast digest:x digest:x",
        )
        await api.waitFor(b"starting on %d" % port)
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        published = json.loads(await (await self.http.get(self.url + "/v1/exchange")).content())
        self.exchangeKey = exchangePublicKey(published["key"])
        self.assertEqual((await self.directory()).farms, ())

        # Two volunteers' farms join by themselves.
        first, _ = await self.volunteerFarm("first")
        second, _ = await self.volunteerFarm("second")
        for farm, name in ((first, b"first"), (second, b"second")):
            await farm.waitFor(b"listed in the directory of " + self.url.encode())
            await api.waitFor(b"farm " + name + b" of key ")
        self.assertRegex(bytes(api.output), rb"farm first of key \w{12} joined the directory")
        self.assertEqual([f.name for f in (await self.directory()).farms], ["first", "second"])

        # A node that knows only the exchange finds them, its two slots on both.
        nodeKey = await self.key("user")
        node = self.spawn(
            "node", "privox-node", "--stt", "digest:x", "--slots", "2",
            "--exchange", self.url, "--exchange-key", published["key"], "--key", nodeKey,
            "--state-dir", root.child("node").path, "--retry-max", "0.5",
            "--shutdown-grace", "1",
        )
        await node.waitFor(b"the directory of " + self.url.encode() + b" lists 2 farm(s)")
        await node.waitFor(b"enrolled with " + self.url.encode())
        await until(lambda: len(re.findall(rb"serving stt through", bytes(node.output))) >= 2,
                    "both slots serving", 30)
        served = set(re.findall(rb"serving stt through \S+ \((\w+)\)", bytes(node.output)))
        self.assertEqual(served, {b"first", b"second"})

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

        # One farm stops: it leaves the directory, and jobs keep flowing.
        await first.stop()
        await api.waitFor(b"farm first left the directory")
        self.assertEqual([f.name for f in (await self.directory()).farms], ["second"])
        for n in range(4, 10):
            await transcribe(n)

        # A farm whose canary is answered (a producer there claims every
        # model): never listed.
        liar, liarPort = await self.volunteerFarm("liar")
        claimsAll = ProducerProtocol("stt", "any", DigestHandler(("*",)))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", liarPort), claimsAll)
        await claimsAll.ready
        self.addCleanup(claimsAll.transport.loseConnection)
        await liar.waitFor(b"refused this farm: HTTP 422")
        self.assertIn(b"answered a job no producer serves", liar.output)
        await api.waitFor(b"farm liar of key ")
        self.assertNotIn(b"farm liar of key", re.sub(rb"farm liar of key \w+ failed", b"",
                                                      bytes(api.output)))
        self.assertEqual([f.name for f in (await self.directory()).farms], ["second"])
        # Nothing of the jobs' content or the farms' keys in the logs.
        for output in (api.output, node.output, second.output):
            self.assertNotIn(userKey.encode(), output)
