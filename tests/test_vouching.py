"""
A farm that joined an exchange lets in the nodes the exchange certified
without their keys (privox.farm.vouching), on in-memory transports; and a
farm that joins reads the exchange's key before it registers.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.static import Data

from privox.farm.registration import Registration
from privox.farm.observe import onlineNodes
from privox.farm.service import Options as FarmOptions, buildFarm, vouchingFor
from privox.farm.vouching import ExchangeOnly, Vouching
from privox.identity import (
    PASS_PREFIX,
    Certificate,
    ConnectionOffer,
    ConsumerPass,
    encodeKey,
    fingerprint,
    publicBytes,
)
from privox.keys import OpenPolicy, accountId, keyId
from privox.node.echo import DigestHandler
from privox.node.service import NodeSettings, Slot
from tests.farmharness import FarmHarness, ManualPolicy

NODE_KEY = "pvx_the-nodes-own-key"
API_KEY = "pvx_the-apis-own-key"
#: The farm's key id at its exchange.
FARM = keyId("the-farms-key")


class Node:
    def __init__(self, exchange: Ed25519PrivateKey, now: float, account: str = accountId(NODE_KEY),
                 lifetime: float = 86400.0) -> None:
        self.identity = Ed25519PrivateKey.generate()
        self.certificate = Certificate.issue(
            exchange, publicBytes(self.identity.public_key()), account, now, lifetime
        )

    def offer(self, farm: str | None = FARM) -> Any:
        return ConnectionOffer.make(self.identity, self.certificate, farm)


class NodeSealer:
    """
    A node's sealer (privox.node.enrolment.Enrolment) holding C{node}'s
    certificate.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def offer(self, farm: str | None = None) -> Any:
        return self.node.offer(farm)


class VouchedProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.exchange = Ed25519PrivateKey.generate()
        self.keys = ManualPolicy()
        self.h = FarmHarness(producerKeys=self.keys)
        self.h.clock.advance(1_000_000)
        self.h.farm.vouching = Vouching(FARM, self.exchange.public_key())

    def hello(self, node: Node | None, key: str = "", farm: str | None = FARM) -> Any:
        peer = self.h.peer()
        fields: dict[str, Any] = {"protocol": 2, "role": "producer", "service": "stt",
                                  "key": key, "models": ["*"]}
        if node is not None:
            fields["seal"] = node.offer(farm)[1].fields()
        peer.send(b"HELO", fields)
        return peer

    def assertDenied(self, peer: Any, why: str) -> None:
        [(verb, body)] = peer.messages()
        self.assertEqual((verb, body["error"]), ("DENY", "unauthorized"))
        self.assertIn(why, body["message"])
        self.assertTrue(peer.closed)

    def test_certifiedNodeNamesNoKey(self) -> None:
        """
        A node that names no key is let in by its certificate, without the
        key policy, and its session is the certificate's account.
        """
        node = Node(self.exchange, self.h.clock.seconds())
        peer = self.hello(node)
        [(verb, _)] = peer.messages()
        self.assertEqual(verb, "OKAY")
        self.assertEqual(self.keys.pending, [])
        session = peer.protocol.session
        self.assertEqual((session.accountId, session.keyId),
                         (accountId(NODE_KEY), accountId(NODE_KEY)[:12]))
        # Online, by its identity's fingerprint (what its owner's account
        # page shows); a producer let in by key is not counted.
        self.hello(node).messages()
        self.hello(None, key="hand-given")
        self.keys.pending[0][1].callback(True)
        online = {"node": fingerprint(node.certificate.identity),
                  "account": accountId(NODE_KEY)[:12]}
        self.assertEqual(onlineNodes(self.h.farm), [dict(online, connections=2)])
        peer.lose()
        self.assertEqual(onlineNodes(self.h.farm), [dict(online, connections=1)])

    def test_refused(self) -> None:
        """
        Another exchange's certificate, an expired one, one whose
        connection key its node did not sign, one that names a key id
        rather than an account, and no offer at all: each is refused,
        saying why.
        """
        now = self.h.clock.seconds()
        other = Node(Ed25519PrivateKey.generate(), now)
        self.assertDenied(self.hello(other), "certificate not signed by this exchange")
        expired = Node(self.exchange, now - 100, lifetime=50)
        self.assertDenied(self.hello(expired), "certificate expired")
        old = Node(self.exchange, now, account=accountId(NODE_KEY)[:12])
        self.assertDenied(self.hello(old), "certificate refused: it names no account id")
        # An offer another farm was shown (bound to it): whoever holds it
        # cannot get in here as that node.
        good = Node(self.exchange, now)
        self.assertDenied(self.hello(good, farm=keyId("another-farm")),
                          "certificate refused: the offer is not bound to this farm")
        # A pass offered as a certificate.
        peer = self.h.peer()
        passed = ConsumerPass.issue(self.exchange, FARM, accountId(NODE_KEY), now).text
        offer = dict(good.offer()[1].fields(), certificate=passed)
        peer.send(b"HELO", {"protocol": 2, "role": "producer", "service": "stt", "key": "",
                            "models": ["*"], "seal": offer})
        self.assertDenied(peer, "certificate refused: certificate not signed by this exchange")
        swapped = Node(self.exchange, now)
        peer = self.h.peer()
        _, offer = ConnectionOffer.make(Ed25519PrivateKey.generate(), swapped.certificate, FARM)
        peer.send(b"HELO", {"protocol": 2, "role": "producer", "service": "stt", "key": "",
                            "models": ["*"], "seal": offer.fields()})
        self.assertDenied(peer, "connection key not signed by the certified node")
        self.assertEqual(self.keys.pending, [])
        self.assertEqual(self.h.farm.dispatchers["stt"].producerCount(), 0)

    def test_keyBeforeItsExchangeKey(self) -> None:
        """
        Until the farm knows its exchange's key, a keyless node is refused
        (and tries again later).
        """
        self.h.farm.vouching = Vouching(FARM)
        peer = self.hello(Node(self.exchange, self.h.clock.seconds()))
        self.assertDenied(peer, "does not know its exchange's key yet")

    def test_namedKeysStillGoToThePolicy(self) -> None:
        """
        A producer that names a key is checked by the key policy, as on any
        farm, certificate or not; so is a keyless one that offers no offer
        bound to a farm (an unbound one is shown to any farm), and a
        keyless one on a farm that joined no exchange.
        """
        now = self.h.clock.seconds()
        self.hello(Node(self.exchange, now), key=NODE_KEY)
        self.hello(None, key="hand-given")
        self.hello(None)
        self.hello(Node(self.exchange, now), farm=None)
        self.h.farm.vouching = None
        self.hello(Node(self.exchange, now))
        self.assertEqual([k for k, _ in self.keys.pending], [NODE_KEY, "hand-given", "", "", ""])

    def test_exchangeOnly(self) -> None:
        """
        With the default policy (C{exchange}), a farm that joined refuses
        producers by key, and keyless ones without a bound offer, saying so.
        """
        self.h.farm._keyPolicies["producer"] = ExchangeOnly()
        for peer in (self.hello(None, key=NODE_KEY), self.hello(None),
                     self.hello(Node(self.exchange, self.h.clock.seconds()), farm=None)):
            self.assertDenied(peer, "only its exchange's API (by pass) and certified nodes")


class ConsumerPassTests(SynchronousTestCase):
    """
    The exchange's API names a pass the exchange signed for this farm, in
    place of its key.
    """

    def setUp(self) -> None:
        self.exchange = Ed25519PrivateKey.generate()
        self.keys = ManualPolicy()
        self.h = FarmHarness(consumerKeys=self.keys)
        self.h.clock.advance(1_000_000)
        self.h.farm.vouching = Vouching(FARM, self.exchange.public_key())

    def hello(self, key: str) -> Any:
        peer = self.h.peer()
        peer.send(b"HELO", {"protocol": 2, "role": "consumer", "service": "stt", "key": key})
        return peer

    def passFor(self, farm: str = FARM, signer: Ed25519PrivateKey | None = None,
                at: float | None = None, lifetime: float = 3600.0) -> str:
        now = self.h.clock.seconds() if at is None else at
        issued = ConsumerPass.issue(signer or self.exchange, farm, accountId(API_KEY), now, lifetime)
        return PASS_PREFIX + issued.text

    def test_letIn(self) -> None:
        """
        The API's pass lets it in, as its account, without the key policy.
        """
        peer = self.hello(self.passFor())
        [(verb, _)] = peer.messages()
        self.assertEqual(verb, "OKAY")
        self.assertEqual(peer.protocol.session.accountId, accountId(API_KEY))
        self.assertEqual(self.keys.pending, [])

    def test_refused(self) -> None:
        """
        A pass for another farm (the one it was shown, replayed here),
        another exchange's, an expired one, one from the future, or a
        node's certificate passed off as one: each refused, saying why.
        """
        now = self.h.clock.seconds()
        node = Node(self.exchange, now)
        for key, why in (
            (self.passFor(farm=keyId("another-farm")), "pass refused: the pass is for another farm"),
            (self.passFor(signer=Ed25519PrivateKey.generate()), "pass not signed by this exchange"),
            (self.passFor(at=now - 400, lifetime=50), "pass expired"),
            (self.passFor(at=now + 3600), "pass issued in the future"),
            (PASS_PREFIX + node.certificate.text, "pass not signed by this exchange"),
            (PASS_PREFIX + "nonsense", "malformed pass"),
        ):
            peer = self.hello(key)
            [(verb, body)] = peer.messages()
            self.assertEqual((verb, body["error"]), ("DENY", "unauthorized"))
            self.assertIn(why, body["message"])
        self.assertEqual(self.keys.pending, [])

    def test_clocksDiffer(self) -> None:
        """
        A pass a few minutes past its time (this farm's clock is ahead) is
        still good; one well past it is not.
        """
        now = self.h.clock.seconds()
        [(verb, _)] = self.hello(self.passFor(at=now - 400, lifetime=300)).messages()
        self.assertEqual(verb, "OKAY")
        [(verb, _)] = self.hello(self.passFor(at=now - 601, lifetime=300)).messages()
        self.assertEqual(verb, "DENY")

    def test_exchangeOnly(self) -> None:
        """
        With the default policy (C{exchange}), a farm that joined lets in no
        key, and says so.
        """
        self.h.farm._keyPolicies["consumer"] = ExchangeOnly()
        peer = self.hello(API_KEY)
        [(verb, body)] = peer.messages()
        self.assertEqual((verb, body["error"]), ("DENY", "unauthorized"))
        self.assertIn("only its exchange's API (by pass)", body["message"])
        [(verb, _)] = self.hello(self.passFor()).messages()
        self.assertEqual(verb, "OKAY")


class DirectorySlotTests(SynchronousTestCase):
    def test_keyPerFarm(self) -> None:
        """
        A slot whose farms are a stranger's that joined the exchange (the
        directory says which) and the exchange's own: the first is shown
        no key and an offer bound to it, the other the node's key.
        """
        node = Node(Ed25519PrivateKey.generate(), 0.0)

        reactor = MemoryReactorClock()
        joined, own = "tcp:host=10.0.0.1:port=1776", "tcp:host=10.0.0.2:port=1776"
        slot = Slot("stt", (joined, own), DigestHandler(("digest:x",)),
                    NodeSettings(key=NODE_KEY, stt=("digest:x",), stt_farm=(own,)), reactor,
                    sealer=NodeSealer(node), members={joined: FARM, own: None})
        slot.client.startService()
        self.addCleanup(slot.client.stopService)
        reactor.advance(0)
        [(host, _, factory, _, _)] = reactor.tcpClients
        self.assertEqual(host, "10.0.0.1")
        hello = factory.buildProtocol(None)._wrappedProtocol.hello.payload()
        self.assertEqual(hello["key"], "")
        self.assertEqual((hello["seal"]["certificate"], hello["seal"]["farm"]),
                         (node.certificate.text, FARM))
        # The joined farm does not answer: the next attempt is the own one.
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        [_, (host, _, factory, _, _)] = reactor.tcpClients
        self.assertEqual(host, "10.0.0.2")
        hello = factory.buildProtocol(None)._wrappedProtocol.hello.payload()
        self.assertEqual(hello["key"], NODE_KEY)
        self.assertNotIn("farm", hello["seal"])

    def test_strangerStaysAStranger(self) -> None:
        """
        What a slot shows each farm is what the directory it drew them
        from said: a joined farm that a later directory no longer lists
        (or whose attempt was under way meanwhile) is still shown no key.
        """
        node = Node(Ed25519PrivateKey.generate(), 0.0)

        reactor = MemoryReactorClock()
        joined, other = "tcp:host=10.0.0.1:port=1776", "tcp:host=10.0.0.3:port=1776"
        settings = NodeSettings(key=NODE_KEY, stt=("digest:x",), stt_farm=(joined,))
        slot = Slot("stt", (joined,), DigestHandler(("digest:x",)), settings, reactor,
                    sealer=NodeSealer(node), members={joined: FARM})
        slot.client.startService()
        self.addCleanup(slot.client.stopService)
        reactor.advance(0)
        # The directory changes while the attempt is under way.
        slot.setFarms((other,), {other: None})
        [(_, _, factory, _, _)] = reactor.tcpClients
        hello = factory.buildProtocol(None)._wrappedProtocol.hello.payload()
        self.assertEqual(hello["key"], "")
        # A directory that no longer lists it, nor any other: kept, as is.
        slot.setFarms((joined,), {joined: FARM})
        self.assertEqual(slot._endpoint.members, {joined: FARM})


class ExchangeKeyTests(SynchronousTestCase):
    def registration(self, published: bytes, vouching: Vouching) -> tuple[Registration, list[Any]]:
        posted: list[Any] = []

        class Farms(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                posted.append(json.loads(request.content.read()))
                return b'{"listed": true}'

        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"exchange", Data(published, "application/json"))
        v1.putChild(b"farms", Farms())
        registration = Registration(
            "http://exchange.test", "farm-key", "volunteer", ("tcp:host=farm.test:port=1", None),
            Clock(), http=StubTreq(root), vouching=vouching,
        )
        return registration, posted

    def test_readBeforeRegistering(self) -> None:
        exchange = Ed25519PrivateKey.generate()
        vouching = Vouching(FARM)
        text = encodeKey(publicBytes(exchange.public_key()))
        registration, posted = self.registration(json.dumps({"key": text}).encode(), vouching)
        registration.startService()
        registration.clock.advance(0)
        self.assertEqual(publicBytes(vouching.exchange), publicBytes(exchange.public_key()))
        self.assertEqual(len(posted), 1)
        registration.stopService()

    def test_noKeyNoRegistration(self) -> None:
        """
        An exchange that publishes no usable key gets no registration: a
        farm listed there could let in none of its nodes.
        """
        vouching = Vouching(FARM)
        registration, posted = self.registration(b'{"key": "not a key"}', vouching)
        registration.startService()
        registration.clock.advance(0)
        self.assertIsNone(vouching.exchange)
        self.assertEqual(posted, [])
        registration.stopService()
        self.assertEqual(self.flushLoggedErrors(), [])


class FarmOptionsTests(SynchronousTestCase):
    JOIN = ("--exchange", "https://api.example.org", "--api-key", "farm-key",
            "--public", "tcp:host=farm.example.org:port=1776 none")

    def parse(self, *args: str) -> Any:
        options = FarmOptions()
        options.parseOptions(list(args))
        return options.settings

    def test_pinned(self) -> None:
        exchange = Ed25519PrivateKey.generate().public_key()
        settings = self.parse(*self.JOIN, "--exchange-key", encodeKey(publicBytes(exchange)))
        vouching = vouchingFor(settings)
        assert vouching is not None and vouching.exchange is not None
        self.assertEqual(publicBytes(vouching.exchange), publicBytes(exchange))
        # Not pinned: read from the exchange later. Not joined: none.
        self.assertIsNone(vouchingFor(self.parse(*self.JOIN)).exchange)  # type: ignore[union-attr]
        self.assertIsNone(vouchingFor(self.parse()))

    def test_refused(self) -> None:
        e = self.assertRaises(UsageError, self.parse, *self.JOIN, "--exchange-key", "nonsense")
        self.assertEqual(str(e), "--exchange-key is not an exchange's public key"
                                 " (43 characters of unpadded URL-safe base64)")
        key = encodeKey(publicBytes(Ed25519PrivateKey.generate().public_key()))
        e = self.assertRaises(UsageError, self.parse, "--exchange-key", key)
        self.assertIn("the key of the --exchange this farm joins", str(e))

    def test_defaultPolicies(self) -> None:
        """
        C{exchange}, the default: a farm that joins one lets in no key; one
        that joins none is open.
        """
        joined = buildFarm(self.parse(*self.JOIN), reactor)
        alone = buildFarm(self.parse(), reactor)
        for role in ("producer", "consumer"):
            self.assertIsInstance(joined.keyPolicy(role), ExchangeOnly)
            self.assertIsInstance(alone.keyPolicy(role), OpenPolicy)
        self.assertIsNone(alone.vouching)
        assert joined.vouching is not None
        self.assertEqual(joined.vouching.farm, keyId("farm-key"))


class ExpiryTests(SynchronousTestCase):
    """
    A node let in by its certificate serves while the exchange vouches
    for it: when its certificate expires it takes no more jobs.
    """

    def setUp(self) -> None:
        self.exchange = Ed25519PrivateKey.generate()
        self.h = FarmHarness()
        self.h.clock.advance(1_000_000)
        self.h.farm.vouching = Vouching(FARM, self.exchange.public_key())
        node = Node(self.exchange, self.h.clock.seconds(), lifetime=100)
        self.producer = self.h.producer(key="", seal=node.offer()[1].fields())

    def test_idleClosed(self) -> None:
        self.h.clock.advance(99)
        self.assertFalse(self.producer.closed)
        self.h.clock.advance(1)
        [(verb, fields)] = [m for m in self.producer.messages() if m[0] != "PING"]
        self.assertEqual((verb, fields["error"]), ("FAIL", "unauthorized"))
        self.assertIn("certificate expired", fields["message"])
        self.assertTrue(self.producer.closed)

    def test_busyFinishesItsJob(self) -> None:
        consumer = self.h.consumer()
        self.h.clock.advance(50)
        consumer.send(b"JOB_", {"model": "m", "format": "wav", "size": 2})
        consumer.data(b"\0\0")
        [(_, assigned)] = consumer.messages()
        self.assertEqual([v for v, _ in self.producer.messages() if v != "PING"], ["JOB_", "DATA"])
        self.h.clock.advance(50)
        self.assertFalse(self.producer.closed)
        self.producer.send(b"RSLT", {"id": assigned["id"], "text": "words"})
        self.assertTrue(self.producer.closed)
        [(verb, answer)] = consumer.messages()
        self.assertEqual((verb, answer["text"]), ("RSLT", "words"))
