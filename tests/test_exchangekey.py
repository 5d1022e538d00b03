"""
L{privox.exchangekey}: a node given no exchange key reads it once and keeps
it; a kept key is the node's from then on.
"""

from __future__ import annotations

import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.static import Data
from treq.testing import StubTreq

from privox.daemon import CannotStart
from privox.engines.registry import ModelSpec, createEngine
from privox.identity import IdentityError, encodeKey, publicBytes
from privox.exchangekey import KEPT_FILE, ExchangeKeyUnread, keep, keptKey, readExchangeKey
from privox.node.service import NodeService, NodeSettings, Options, makeService


def published(body: bytes, code: int = 200) -> StubTreq:
    root, v1 = Resource(), Resource()
    root.putChild(b"v1", v1)
    page = Data(body, "application/json")
    if code != 200:
        page = Resource()  # 404
    v1.putChild(b"exchange", page)
    return StubTreq(root)


class ExchangeKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate().public_key()
        self.text = encodeKey(publicBytes(self.key))
        self.state = os.path.abspath(self.mktemp())

    def read(self, http: StubTreq) -> Deferred:
        return Deferred.fromCoroutine(readExchangeKey("http://exchange.test/", http, Clock()))

    def test_read(self) -> None:
        key = self.successResultOf(self.read(published(json.dumps({"key": self.text}).encode())))
        self.assertEqual(publicBytes(key), publicBytes(self.key))
        for body in (b"not json", b'{"key": "short"}', b"{}"):
            self.failureResultOf(self.read(published(body)), ExchangeKeyUnread)
        self.failureResultOf(self.read(published(b"", code=404)), ExchangeKeyUnread)

    def test_kept(self) -> None:
        self.assertIsNone(keptKey(self.state))
        keep(self.state, self.key)
        self.assertEqual(publicBytes(keptKey(self.state)), publicBytes(self.key))
        with open(os.path.join(self.state, KEPT_FILE), "w") as f:
            f.write("garbage")
        self.assertRaises(IdentityError, keptKey, self.state)

    def test_nodeUsesTheKeptKey(self) -> None:
        """
        A node given no key takes the kept one (as if pinned); a kept file
        that holds none stops it with one line.
        """
        keep(self.state, self.key)
        settings = NodeSettings(stt=("digest:x",), exchange="http://exchange.test", key="k",
                                state_dir=self.state)
        node = NodeService(settings, [createEngine(ModelSpec.parse("digest:x"))], Clock())
        self.assertEqual(publicBytes(node.exchangeKey), publicBytes(self.key))
        with open(os.path.join(self.state, KEPT_FILE), "w") as f:
            f.write("garbage")
        options = Options()
        options.parseOptions(["--stt", "digest:x", "--exchange", "http://exchange.test",
                              "--key", "k", "--state-dir", self.state])
        service = makeService(options, Clock())
        self.assertIsInstance(service, CannotStart)
