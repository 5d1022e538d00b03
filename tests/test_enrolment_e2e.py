"""
Enrolment between real processes: C{twistd privox-api} with an account
store and its exchange key, and C{twistd privox-node --exchange URL
--exchange-key KEY} enrolling with a key made by C{privox keys create}; the
node's identity across a restart, a key revoked with C{privox keys revoke},
a pinned key that is not the exchange's; and an API whose exchange key
file is unusable.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privox.identity import encodeKey, publicBytes
from privox.keys import keyId
from privox.node.enrolment import IDENTITY_FILE
from tests.test_cli import privox
from tests.test_e2e import ENV, REPO, TWISTD, WatchedProcess, freePorts
from tests.test_faults import ProcessTestCase


class EnrolmentProcessTests(ProcessTestCase):
    timeout = 180

    async def startApi(self, root: FilePath) -> str:
        self.dsn = "sqlite:" + root.child("accounts.sqlite3").path
        apiPort, self.farmPort = freePorts(2)
        api = self.spawn(
            "api", "privox-api", "--accounts", self.dsn,
            "--listen", f"tcp:{apiPort}:interface=127.0.0.1",
            "--farm", f"f tcp:host=127.0.0.1:port={self.farmPort} none",
            "--exchange-key", root.child("exchange.key").path,
        )
        await api.waitFor(b"at schema version")
        await api.waitFor(b"starting on %d" % apiPort)
        self.api = api
        return f"http://127.0.0.1:{apiPort}"

    def startNode(self, name: str, url: str, key: str, exchangeKey: str, state: FilePath) -> WatchedProcess:
        # Its farm is not there: enrolment does not need one.
        return self.spawn(
            name, "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={self.farmPort}", "--stt", "digest:x",
            "--key", key, "--exchange", url, "--exchange-key", exchangeKey,
            "--state-dir", state.path, "--retry-max", "0.5", "--shutdown-grace", "1",
        )

    async def keys(self, *argv: str) -> str:
        out, err, code = await privox("keys", *argv, "--accounts", self.dsn)
        self.assertEqual(code, 0, err)
        return out

    async def test_nodeEnrols(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        root.makedirs()
        url = await self.startApi(root)
        self.assertEqual(stat.S_IMODE(os.stat(root.child("exchange.key").path).st_mode), 0o600)
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        exchangeKey = json.loads(await (await http.get(url + "/v1/exchange")).text())["key"]
        self.assertIn(b"made a new exchange key %s" % exchangeKey[:16].encode(), self.api.output)
        key = (await self.keys("create", "--label", "node1")).splitlines()[-1]
        state = root.child("node-state")

        # Enrols at its first start, by the fingerprint of a new identity.
        node = self.startNode("node", url, key, exchangeKey, state)
        await node.waitFor(b"enrolled with " + url.encode())
        [fingerprint] = re.findall(rb"node identity (\S+): enrolling with", bytes(node.output))
        self.assertIn(b"made a new identity %s for this node" % fingerprint, node.output)
        self.assertIn(
            b"node %s enrolled with %s (account %s): certificate good for 24.0 h, renewed in 43200 s"
            % (fingerprint, url.encode(), keyId(key).encode()),
            node.output,
        )
        await self.api.waitFor(b"enrolled node %s of key %s" % (fingerprint, keyId(key).encode()))
        identity = state.child(IDENTITY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(identity.path).st_mode), 0o600)
        for output in (node.output, self.api.output):
            self.assertNotIn(key.encode(), output)
        await node.stop()

        # The same identity after a restart.
        again = self.startNode("node again", url, key, exchangeKey, state)
        await again.waitFor(b"enrolled with " + url.encode())
        self.assertEqual(
            re.findall(rb"node identity (\S+): enrolling with", bytes(again.output)), [fingerprint]
        )
        self.assertNotIn(b"made a new identity", again.output)
        await again.stop()

        # A pinned key that is not this exchange's refuses its certificate.
        impostor = encodeKey(publicBytes(Ed25519PrivateKey.generate().public_key()))
        wrong = self.startNode("node pinning another key", url, key, impostor, state)
        await wrong.waitFor(b"answered a certificate this node refuses")
        self.assertIn(b"(certificate not signed by this exchange)", wrong.output)
        self.assertNotIn(b"enrolled with", wrong.output)
        await wrong.stop()

        # Its key revoked: refused, in one line.
        await self.keys("revoke", keyId(key))
        revoked = self.startNode("node revoked", url, key, exchangeKey, state)
        await revoked.waitFor(b"trying again in 900 s")
        [line] = [l for l in bytes(revoked.output).splitlines() if b"refused to enrol" in l]
        self.assertIn(
            b"%s refused to enrol node %s (key %s): HTTP 403: the key was not accepted"
            b" (unknown, revoked, or not a user key), so this node cannot enrol; trying again"
            b" in 900 s" % (url.encode(), fingerprint, keyId(key).encode()),
            line,
        )
        self.assertNotIn(b"Traceback", revoked.output)
        await revoked.stop()

    async def test_unusableExchangeKey(self) -> None:
        """
        An exchange key file that holds no key: one line, exit status 1.
        """
        garbage = FilePath(os.path.abspath(self.mktemp()))
        garbage.setContent(b"this is not a key\n")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", "privox-api",
             "--farm", "f tcp:host=127.0.0.1:port=9 none", "--listen", "tcp:0:interface=127.0.0.1",
             "--accounts", "none", "--exchange-key", garbage.path],
            env=ENV, path=REPO, reactor=reactor,
        )
        log = (out + err).decode()
        self.assertEqual(code, 1, log)
        self.assertNotIn("Traceback", log)
        [line] = [line for line in log.splitlines() if "#critical]" in line]
        self.assertTrue(
            line.endswith(
                f"the exchange key file {garbage.path} holds no Ed25519 key (--exchange-key)"
            ),
            line,
        )
