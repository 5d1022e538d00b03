"""
The exchange's key and nodes' enrolment (L{privox.api.enrolment},
L{privox.node.enrolment}): the API's C{/v1/exchange} and C{/v1/enroll}
through C{StubTreq}; a node's L{Enrolment} driven by a L{Clock} (renewal at
half-life, backoff, refusals, certificates of another exchange), over HTTP
against the real app, and in a L{NodeService}; the key files and the
daemons' options. Real processes: L{tests.test_enrolment_e2e}.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from privox.accounts.store import Account
from privox.api.access import AccountAccess, PolicyAccess
from privox.api.app import PrivoxAPI
from privox.api.enrolment import ExchangeKey, ExchangeKeyError, readIdentity
from privox.api.errors import BadInput
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable
from privox.api.service import Options as ApiOptions
from privox.api.service import makeService as makeApi
from privox.daemon import CannotStart
from privox.identity import (
    CERTIFICATE_LIFETIME,
    Certificate,
    ConnectionOffer,
    encodeKey,
    enrolmentProof,
    exchangePublicKey,
    publicBytes,
)
from privox.keys import AllowListPolicy, OpenPolicy, accountId, keyId
from privox.node.enrolment import (
    IDENTITY_FILE,
    MIN_RENEWAL,
    Enrolment,
    EnrolmentFailed,
    EnrolmentRefused,
    httpEnrol,
    loadIdentity,
)
from privox.engines.registry import ModelSpec, createEngine
from privox.node import service as nodeService
from privox.node.service import NodeService, NodeSettings, enrolmentFor
from privox.node.service import Options as NodeOptions
from privox.node.service import makeService as makeNode
from privox.sealing import SealPolicy
from tests.test_api_app import FakeExchange
from tests.test_e2e import freePorts
from tests.test_keys import captureLogs

MODELS = ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES)
#: Now, for the clocks here: certificates carry Unix times.
NOW = 1_750_000_000.0
NODE_KEY = "pvx_the-volunteers-key"
REVOKED_KEY = "pvx_a-revoked-key"
FARM_KEY = "pvx_a-farm-key"


class KeyTable:
    """
    The part of an account store that enrolment asks: who a key is; and
    where it notes the nodes enrolled.
    """

    description = "a key table"

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.enrolled: list[tuple[str, str, float, float]] = []

    def recordEnrolment(self, node: str, keyId: str, now: float, expires: float) -> Deferred[None]:
        self.enrolled.append((node, keyId, now, expires))
        return succeed(None)

    def add(self, key: str, role: str = "user", revoked: float | None = None) -> None:
        account = accountId(key)
        self.accounts[account] = Account(account, account[:12], role, "", None, NOW, revoked)

    def authenticate(self, key: str) -> Deferred[Account | None]:
        return succeed(self.accounts.get(accountId(key)))


def nodeIdentity() -> tuple[Ed25519PrivateKey, bytes]:
    identity = Ed25519PrivateKey.generate()
    return identity, publicBytes(identity.public_key())


def enrolBody(identity: Ed25519PrivateKey, key: str = "") -> dict[str, str]:
    """
    What a node posts to C{/v1/enroll} with C{key} (its default: NODE_KEY).
    """
    return {"identity": encodeKey(publicBytes(identity.public_key())),
            "proof": enrolmentProof(identity, accountId(key or NODE_KEY))}


def messages(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) for e in events)


class RouteTests(SynchronousTestCase):
    """
    C{GET /v1/exchange} and C{POST /v1/enroll}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = KeyTable()
        self.store.add(NODE_KEY)
        self.store.add(REVOKED_KEY, revoked=NOW - 10)
        self.store.add(FARM_KEY, role="farm")
        self.exchangeKey = ExchangeKey(Ed25519PrivateKey.generate())
        self.events: list[dict[str, Any]] = []
        self.treq = self.app(AccountAccess(self.store, self.clock))  # type: ignore[arg-type]

    def app(self, access: Any, exchangeKey: ExchangeKey | None | bool = True) -> StubTreq:
        api = PrivoxAPI(
            FakeExchange(), MODELS, access, clock=self.clock, runInThread=maybeDeferred,
            exchangeKey=self.exchangeKey if exchangeKey is True else exchangeKey,  # type: ignore[arg-type]
        )
        api.log = type(api.log)(observer=self.events.append)
        return StubTreq(api.app.resource())

    def request(self, method: str, path: str, treq: StubTreq | None = None, **kwargs: Any) -> tuple[int, Any]:
        treq = treq or self.treq
        response = self.successResultOf(treq.request(method, "http://privox.test" + path, **kwargs))
        body = self.successResultOf(treq.content(response))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(body)

    def enrol(self, key: str | None, body: Any, treq: StubTreq | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", "/v1/enroll", treq, data=data,
                            headers={**headers, "Content-Type": "application/json"})

    def assertError(self, result: tuple[int, Any], status: int, kind: str, reason: str = "") -> None:
        code, body = result
        self.assertEqual(code, status, body)
        self.assertEqual(body["error"]["type"], kind)
        self.assertIn(reason, body["error"]["message"])

    def test_exchangeKey(self) -> None:
        """
        The exchange's public key, as configurations pin it; no key needed.
        """
        code, body = self.request("GET", "/v1/exchange")
        self.assertEqual((code, list(body)), (200, ["key"]))
        self.assertEqual(
            publicBytes(exchangePublicKey(body["key"])),
            publicBytes(self.exchangeKey.private.public_key()),
        )

    def test_enrol(self) -> None:
        """
        A user key's node gets a certificate of its identity, in that key's
        id, which verifies against what C{/v1/exchange} publishes.
        """
        identity, public = nodeIdentity()
        code, body = self.enrol(NODE_KEY, enrolBody(identity))
        self.assertEqual(code, 200, body)
        _, published = self.request("GET", "/v1/exchange")
        certificate = Certificate.verify(
            body["certificate"], exchangePublicKey(published["key"]), self.clock.seconds()
        )
        self.assertEqual(certificate.identity, public)
        self.assertEqual(certificate.account, accountId(NODE_KEY))
        self.assertEqual(body["expires"], certificate.expires)
        self.assertEqual(certificate.expires, NOW + CERTIFICATE_LIFETIME)
        # Noted for the key's account page, by the node's fingerprint.
        self.assertEqual(
            self.store.enrolled,
            [(encodeKey(public)[:16], keyId(NODE_KEY), NOW, NOW + CERTIFICATE_LIFETIME)],
        )
        # Logged by fingerprints and key id; never the key.
        text = messages(self.events)
        self.assertIn(f"enrolled node {encodeKey(public)[:16]} of key {keyId(NODE_KEY)}", text)
        self.assertNotIn(NODE_KEY, text)
        self.assertNotIn(encodeKey(public), text)

    def test_refusedKeys(self) -> None:
        """
        A revoked key, an unknown one, a farm's: 403. No key: 401.
        """
        identity, _ = nodeIdentity()
        body = enrolBody(identity)
        for key in (REVOKED_KEY, "pvx_nobody-made-this", FARM_KEY):
            self.assertError(self.enrol(key, body), 403, "permission_error", "cannot enrol")
        self.assertError(self.enrol(None, body), 401, "authentication_error", "Bearer")
        self.assertNotIn(REVOKED_KEY, messages(self.events))

    def test_badBody(self) -> None:
        """
        Anything but C{{"identity": KEY}} with a 32-byte key: 400.
        """
        _, public = nodeIdentity()
        for body in (
            b"not json",
            b"\xff\xfe",
            [encodeKey(public)],
            {},
            {"identity": 32},
            {"identity": encodeKey(public[:31])},
            {"identity": encodeKey(public + b"x")},
            {"identity": "!" * 43},
        ):
            self.assertError(self.enrol(NODE_KEY, body), 400, "invalid_request_error", "")

    def test_proofOfIdentity(self) -> None:
        """
        A key cannot enrol a node it does not run: the body proves the
        identity's holder signed the enrolling key's account (not another's,
        not another identity's signature, not none).
        """
        identity, public = nodeIdentity()
        other, _ = nodeIdentity()
        for body in (
            {"identity": encodeKey(public)},
            dict(enrolBody(identity), proof="nonsense"),
            enrolBody(identity, key="pvx_someone-else"),
            dict(enrolBody(identity), proof=enrolBody(other)["proof"]),
        ):
            self.assertError(self.enrol(NODE_KEY, body), 400, "invalid_request_error",
                             "proof must be the node identity's signature")
        self.assertEqual(self.store.enrolled, [])

    def test_readIdentity(self) -> None:
        _, public = nodeIdentity()
        self.assertEqual(readIdentity(json.dumps({"identity": encodeKey(public)}).encode()), public)
        self.assertRaises(BadInput, readIdentity, b'{"identity": "AAAA"}')

    def test_keyPolicy(self) -> None:
        """
        With C{--accounts none}: the key policy decides; an open policy,
        which lets any key in, enrols nobody.
        """
        identity, _ = nodeIdentity()
        body = enrolBody(identity)
        listed = self.app(PolicyAccess(AllowListPolicy("keys", frozenset([NODE_KEY]))))
        code, answer = self.enrol(NODE_KEY, body, listed)
        self.assertEqual(code, 200, answer)
        certificate = Certificate.verify(answer["certificate"], self.exchangeKey.public, NOW)
        self.assertEqual(certificate.account, accountId(NODE_KEY))
        self.assertError(self.enrol("pvx_other", body, listed), 403, "permission_error")
        anyone = self.app(PolicyAccess(OpenPolicy()))
        self.assertError(
            self.enrol(NODE_KEY, body, anyone), 403, "permission_error",
            "enrolment needs an account store or a key policy",
        )

    def test_noExchangeKey(self) -> None:
        """
        An app built without the exchange's key (a test's) serves neither.
        """
        bare = self.app(PolicyAccess(OpenPolicy()), exchangeKey=None)
        self.assertError(self.request("GET", "/v1/exchange", bare), 404, "not_found", "exchange key")
        identity, _ = nodeIdentity()
        self.assertError(self.enrol(NODE_KEY, enrolBody(identity), bare), 404, "not_found")

    def test_methods(self) -> None:
        self.assertError(self.request("GET", "/v1/enroll"), 405, "method_not_allowed")
        self.assertError(self.request("POST", "/v1/exchange"), 405, "method_not_allowed")


class ExchangeKeyTests(SynchronousTestCase):
    """
    The exchange key file, and the API's settings for it.
    """

    def test_madeOnceKeptAfter(self) -> None:
        path = FilePath(self.mktemp()).child("keys").child("exchange.key")
        key, made = ExchangeKey.load(path.path)
        self.assertTrue(made)
        self.assertEqual(stat.S_IMODE(os.stat(path.path).st_mode), 0o600)
        again, made = ExchangeKey.load(path.path)
        self.assertFalse(made)
        self.assertEqual(again.publicText, key.publicText)
        self.assertEqual(key.fingerprint, key.publicText[:16])
        self.assertNotIn(key.publicText, repr(key))

    def test_unusable(self) -> None:
        garbage = FilePath(self.mktemp())
        garbage.setContent(b"not a key\n")
        e = self.assertRaises(ExchangeKeyError, ExchangeKey.load, garbage.path)
        self.assertEqual(str(e), f"the exchange key file {garbage.path} holds no Ed25519 key")
        directory = FilePath(self.mktemp())
        directory.makedirs()
        e = self.assertRaises(ExchangeKeyError, ExchangeKey.load, directory.path)
        self.assertIn(f"cannot read or make the exchange key {directory.path}: Is a directory", str(e))

    def parse(self, *argv: str) -> ApiOptions:
        options = ApiOptions()
        options.parseOptions(["--farm", "a tcp:host=127.0.0.1:port=9 none", *argv])
        return options

    def test_options(self) -> None:
        s = self.parse().settings
        self.assertEqual((s.exchange_key, s.e2e), ("privox-exchange.key", "required"))
        self.assertEqual(self.parse("--e2e", "required").settings.e2e, "required")
        e = self.assertRaises(usage.UsageError, self.parse, "--e2e", "always")
        self.assertIn("--e2e must be one of required, preferred, off", str(e))
        self.assertRaises(usage.UsageError, self.parse, "--exchange-key", "")

    def test_sealPolicy(self) -> None:
        """
        What the API will hand its farm exchange.
        """
        key = ExchangeKey(Ed25519PrivateKey.generate())
        for mode in ("required", "preferred", "off"):
            self.assertEqual(SealPolicy(mode, key.public).mode, mode)
        self.assertRaises(ValueError, SealPolicy, "sometimes", key.public)

    def test_unreadableKeyIsOneLine(self) -> None:
        """
        An exchange key that cannot be used: the API's service tree is one
        line and exit status 1 when it starts.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        service = makeApi(self.parse("--exchange-key", directory.path), Clock())
        self.assertIsInstance(service, CannotStart)
        events = captureLogs(self)
        e = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(e.code, 1)
        [event] = [e for e in events if e.get("log_level") is not None and e["log_level"].name == "critical"]
        self.assertEqual(
            messages([event]),
            f"cannot read or make the exchange key {directory.path}: Is a directory (--exchange-key)",
        )


class FakeExchangeEnrol:
    """
    The exchange, for a node: each request waits for the test to answer it.
    """

    def __init__(self, key: ExchangeKey, clock: Clock) -> None:
        self.key = key
        self.clock = clock
        self.requests: list[tuple[bytes, Deferred[str]]] = []
        self.cancelled = 0

    def __call__(self, identity: bytes) -> Deferred[str]:
        def cancel(d: Deferred[str]) -> None:
            self.cancelled += 1

        d: Deferred[str] = Deferred(cancel)
        self.requests.append((identity, d))
        return d

    def certify(self, account: str = "0123456789ab", key: ExchangeKey | None = None) -> Certificate:
        identity, d = self.requests[-1]
        certificate = (key or self.key).issue(identity, account, self.clock.seconds())
        d.callback(certificate.text)
        return certificate

    def fail(self, error: Exception) -> None:
        self.requests[-1][1].errback(error)


class EnrolmentTests(SynchronousTestCase):
    """
    A node's L{Enrolment}, on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.exchangeKey = ExchangeKey(Ed25519PrivateKey.generate(), lifetime=3600.0)
        self.exchange = FakeExchangeEnrol(self.exchangeKey, self.clock)
        self.identity, self.public = nodeIdentity()
        self.events = captureLogs(self)
        self.enrolment = Enrolment(
            self.identity, self.exchangeKey.public, self.exchange, self.clock,
            where="http://exchange.test", account="0123456789ab", jitter=lambda: 0.0,
        )
        self.enrolment.startService()
        self.addCleanup(lambda: self.enrolment.stopService() if self.enrolment.running else None)

    def advanceTo(self, requests: int, seconds: float) -> None:
        """
        After C{seconds} more, and not a moment before, the node has made
        C{requests} requests.
        """
        self.clock.advance(seconds - 0.001)
        self.assertEqual(len(self.exchange.requests), requests - 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.exchange.requests), requests)

    def test_offerOnceCertified(self) -> None:
        """
        No offer before the certificate; then a fresh connection key per
        offer, signed by the node and vouched for by the exchange.
        """
        tried = self.enrolment.tried()
        self.assertEqual([identity for identity, _ in self.exchange.requests], [self.public])
        self.assertIsNone(self.enrolment.offer())
        self.assertNoResult(tried)
        self.exchange.certify()
        self.successResultOf(tried)
        self.successResultOf(self.enrolment.tried())
        private, offer = self.enrolment.offer()  # type: ignore[misc]
        certificate, key = offer.verify(self.exchangeKey.public, self.clock.seconds())
        self.assertEqual(certificate.identity, self.public)
        self.assertEqual(publicBytes(key), publicBytes(private.public_key()))
        _, second = self.enrolment.offer()  # type: ignore[misc]
        self.assertNotEqual(second.key, offer.key)
        self.assertIsInstance(ConnectionOffer.parse(offer.fields()), ConnectionOffer)
        text = messages(self.events)
        self.assertIn(f"node identity {self.enrolment.fingerprint}: enrolling with http://exchange.test", text)
        self.assertIn(f"node {self.enrolment.fingerprint} enrolled with http://exchange.test", text)
        self.assertNotIn(encodeKey(self.public), text)

    def test_renewsAtHalfLife(self) -> None:
        self.exchange.certify()
        self.advanceTo(2, 1800.0)
        first = self.enrolment.certificate
        self.clock.advance(5)
        self.exchange.certify()
        self.assertNotEqual(self.enrolment.certificate, first)
        self.advanceTo(3, 1800.0)

    def test_renewalTold(self) -> None:
        """
        Each new certificate is told to whoever watches (the node's slots,
        which connect again to offer it).
        """
        told: list[float] = []
        self.enrolment.whenRenewed(lambda: told.append(self.clock.seconds()))
        self.exchange.certify()
        self.assertEqual(told, [NOW])
        self.clock.advance(1800.0)
        self.assertEqual(len(told), 1)  # asked, not yet answered
        self.exchange.certify()
        self.assertEqual(told, [NOW, NOW + 1800.0])

    def test_renewalNeverTooSoon(self) -> None:
        self.exchangeKey = ExchangeKey(self.exchangeKey.private, lifetime=10.0)
        self.exchange.certify(key=self.exchangeKey)
        self.advanceTo(2, MIN_RENEWAL)

    def test_retriesWithBackoff(self) -> None:
        """
        An exchange that cannot be reached is tried again after 1, 2, 4...
        seconds, and again at half-life once it answers.
        """
        for attempt, wait in enumerate([1.0, 2.0, 4.0, 8.0], start=2):
            self.exchange.fail(EnrolmentFailed("ConnectionRefusedError: refused"))
            self.advanceTo(attempt, wait)
        self.assertIsNone(self.enrolment.offer())
        self.assertIn(
            "cannot enrol with http://exchange.test: ConnectionRefusedError: refused;"
            " trying again in 8.0 s",
            messages(self.events),
        )
        self.exchange.certify()
        self.assertIsNotNone(self.enrolment.offer())
        self.advanceTo(6, 1800.0)
        # The backoff starts over.
        self.exchange.fail(EnrolmentFailed("HTTP 503"))
        self.advanceTo(7, 1.0)

    def test_unexpectedErrorRetried(self) -> None:
        self.exchange.fail(ValueError("odd"))
        self.advanceTo(2, 1.0)
        self.assertIn("ValueError: odd", messages(self.events))

    def test_refusal(self) -> None:
        """
        A refusal is one clear line, and tried again slowly.
        """
        self.exchange.fail(EnrolmentRefused("HTTP 403: the key was not accepted"))
        refusals = [e for e in self.events if "refused to enrol" in messages([e])]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(refusals[0]["log_level"].name, "error")
        self.assertEqual(
            messages(refusals),
            f"http://exchange.test refused to enrol node {self.enrolment.fingerprint}"
            " (key 0123456789ab): HTTP 403: the key was not accepted; trying again in 900 s",
        )
        self.assertIsNone(self.enrolment.offer())
        self.advanceTo(2, 900.0)

    def test_refusedAfterCertified(self) -> None:
        """
        A key revoked after it enrolled: the certificate it has holds until
        it expires, and then the node offers nothing, saying so once.
        """
        self.exchange.certify()
        self.clock.advance(1800.0)
        self.exchange.fail(EnrolmentRefused("HTTP 403"))
        self.assertIsNotNone(self.enrolment.offer())
        self.clock.advance(1800.0)
        self.assertIsNone(self.enrolment.offer())
        self.assertIsNone(self.enrolment.offer())
        expired = [e for e in self.events if "has expired" in messages([e])]
        self.assertEqual(len(expired), 1)

    def test_anotherExchangesCertificate(self) -> None:
        """
        A certificate signed by any key but the pinned one (a wrong URL, a
        fake exchange) is refused; so is one for another node.
        """
        impostor = ExchangeKey(Ed25519PrivateKey.generate())
        self.exchange.certify(key=impostor)
        self.assertIsNone(self.enrolment.offer())
        self.assertIsNone(self.enrolment.certificate)
        self.assertIn(
            "http://exchange.test answered a certificate this node refuses (certificate not"
            " signed by this exchange): a wrong --exchange URL",
            messages(self.events),
        )
        self.advanceTo(2, 900.0)
        identity, d = self.exchange.requests[-1]
        _, other = nodeIdentity()
        d.callback(self.exchangeKey.issue(other, "x", self.clock.seconds()).text)
        self.assertIsNone(self.enrolment.offer())
        self.assertIn("(the certificate names another node)", messages(self.events))
        self.advanceTo(3, 900.0)
        self.exchange.fail(EnrolmentFailed("x"))
        self.advanceTo(4, 1.0)
        self.exchange.requests[-1][1].callback("garbage")
        self.assertIn("(malformed certificate)", messages(self.events))

    def test_stopCancels(self) -> None:
        """
        Stopping cancels the request in flight and the next try.
        """
        self.enrolment.stopService()
        self.assertEqual(self.exchange.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.enrolment.startService()
        self.exchange.certify()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.enrolment.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn("cannot enrol", messages(self.events))


class StatusResource(Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes = b"") -> None:
        super().__init__()
        self.code = code
        self.body = body

    def render(self, request: Any) -> Any:
        if self.code == 0:
            return NOT_DONE_YET  # never answers
        request.setResponseCode(self.code)
        return self.body


class HttpEnrolTests(SynchronousTestCase):
    """
    L{httpEnrol}: a node's side of C{POST /v1/enroll}, against the real app.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        store = KeyTable()
        store.add(NODE_KEY)
        store.add(REVOKED_KEY, revoked=NOW)
        self.exchangeKey = ExchangeKey(Ed25519PrivateKey.generate())
        api = PrivoxAPI(
            FakeExchange(), MODELS, AccountAccess(store, self.clock), clock=self.clock,  # type: ignore[arg-type]
            runInThread=maybeDeferred, exchangeKey=self.exchangeKey,
        )
        self.http = StubTreq(api.app.resource())
        self.identity, self.public = nodeIdentity()

    def enrol(self, key: str, http: Any = None) -> Deferred[str]:
        enrol = httpEnrol("http://api.test/", key, self.identity, self.clock, http or self.http)
        return Deferred.fromCoroutine(enrol(self.public))  # type: ignore[arg-type]

    def test_certified(self) -> None:
        text = self.successResultOf(self.enrol(NODE_KEY))
        certificate = Certificate.verify(text, self.exchangeKey.public, NOW)
        self.assertEqual((certificate.identity, certificate.account), (self.public, accountId(NODE_KEY)))

    def test_enrolmentOverHttp(self) -> None:
        enrolment = Enrolment(
            self.identity, self.exchangeKey.public,
            httpEnrol("http://api.test", NODE_KEY, self.identity, self.clock, self.http), self.clock,
        )
        enrolment.startService()
        self.addCleanup(enrolment.stopService)
        self.assertIsNotNone(enrolment.offer())

    def test_refused(self) -> None:
        failure = self.failureResultOf(self.enrol(REVOKED_KEY), EnrolmentRefused)
        self.assertEqual(
            str(failure.value),
            "HTTP 403: the key was not accepted (unknown, revoked, or not a user key),"
            " so this node cannot enrol",
        )
        failure = self.failureResultOf(self.enrol("pvx_unknown"), EnrolmentRefused)
        self.assertIn("HTTP 403", str(failure.value))

    def test_notAnExchange(self) -> None:
        failure = self.failureResultOf(
            self.enrol(NODE_KEY, StubTreq(StatusResource(404, b"<html>nope</html>"))), EnrolmentRefused
        )
        self.assertEqual(str(failure.value), "HTTP 404 (is http://api.test/ the API's base URL?)")

    def test_failures(self) -> None:
        for resource, why in (
            (StatusResource(503, b'{"error": {"message": "later"}}'), "HTTP 503: later"),
            (StatusResource(200, b'{"certificate": 7}'), "HTTP 200 without a certificate"),
            (StatusResource(200, b"not json"), "HTTP 200 without a certificate"),
        ):
            failure = self.failureResultOf(self.enrol(NODE_KEY, StubTreq(resource)), EnrolmentFailed)
            self.assertEqual(str(failure.value), why)
        # Nothing listening.
        refused = type("Refusing", (), {"post": lambda self, url, **kw: fail(ConnectionRefusedError())})()
        failure = self.failureResultOf(self.enrol(NODE_KEY, refused), EnrolmentFailed)
        self.assertIn("ConnectionRefusedError", str(failure.value))

    def test_timeout(self) -> None:
        d = self.enrol(NODE_KEY, StubTreq(StatusResource(0)))
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, EnrolmentFailed)
        self.assertEqual(str(failure.value), "no answer within 30 s")


class NodeSettingsTests(SynchronousTestCase):
    """
    The node's C{--exchange}, C{--exchange-key} and C{--state-dir}.
    """

    EXCHANGE_KEY = ExchangeKey(Ed25519PrivateKey.generate()).publicText

    def parse(self, *argv: str) -> NodeOptions:
        options = NodeOptions()
        options.parseOptions(["--stt-farm", "tcp:host=127.0.0.1:port=9", "--stt", "digest:x", *argv])
        return options

    def test_defaults(self) -> None:
        s = self.parse().settings
        self.assertEqual((s.exchange, s.exchange_key, s.state_dir), ("none", "", "privox-node-state"))
        self.assertIsNone(enrolmentFor(s, Clock()))

    def test_exampleConfig(self) -> None:
        """
        etc/privox-node.toml names the settings at their defaults.
        """
        path = FilePath(__file__).parent().parent().child("etc").child("privox-node.toml")
        fromFile = tomllib.loads(path.getContent().decode())
        defaults = NodeSettings()
        for name in ("exchange", "exchange_key", "state_dir"):
            self.assertEqual(fromFile[name.replace("_", "-")], getattr(defaults, name))

    def test_refused(self) -> None:
        cases = [
            (["--exchange", "api.example.org", "--exchange-key", self.EXCHANGE_KEY, "--key", "k"],
             "--exchange must be the API's http(s) base URL"),
            (["--exchange", "https://api.example.org", "--exchange-key", self.EXCHANGE_KEY],
             "--exchange needs --key"),
            (["--exchange", "https://api.example.org", "--exchange-key", "short", "--key", "k"],
             "--exchange-key is not an exchange's public key"),
            (["--state-dir", ""], "--state-dir"),
        ]
        for argv, why in cases:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(why, str(e), argv)

    def test_identityKeptInStateDir(self) -> None:
        state = FilePath(self.mktemp())
        settings = NodeSettings(
            exchange="http://127.0.0.1:9", exchange_key=self.EXCHANGE_KEY, key="k",
            state_dir=state.path,
        )
        first = enrolmentFor(settings, Clock())
        assert first is not None
        path = state.child(IDENTITY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path.path).st_mode), 0o600)
        second = enrolmentFor(settings, Clock())
        assert second is not None
        self.assertEqual(first.public, second.public)
        self.assertEqual(first.account, keyId("k"))
        self.assertEqual(first.where, "http://127.0.0.1:9")
        self.assertEqual(loadIdentity(state.path)[1], False)

    def test_unusableStateDir(self) -> None:
        """
        An identity that cannot be read or made: one line, exit status 1.
        """
        blocker = FilePath(self.mktemp())
        blocker.setContent(b"a file where the directory should be")
        options = self.parse(
            "--exchange", "http://127.0.0.1:9", "--exchange-key", self.EXCHANGE_KEY,
            "--key", "k", "--state-dir", blocker.path,
        )
        service = makeNode(options, Clock())
        self.assertIsInstance(service, CannotStart)
        self.assertEqual(
            service.reason,  # type: ignore[attr-defined]
            f"cannot read or make the node's identity key {blocker.path}/{IDENTITY_FILE}:"
            " Not a directory (--state-dir)",
        )


class NodeServiceEnrolmentTests(TestCase):
    """
    The node starts its enrolment with itself, waits a little for it
    before its slots dial their farms, hands it to them, and stops it.
    """

    def startNode(self, sealer: Any) -> NodeService:
        settings = NodeSettings(
            stt_farm=(f"tcp:host=127.0.0.1:port={freePorts(1)[0]}",), stt=("digest:x",),
            retry_max=0.5, shutdown_grace=1.0,
        )
        node = NodeService(
            settings, [createEngine(ModelSpec.parse("digest:x"))], reactor,
            stopOnFailure=False, sealer=sealer,
        )
        node.startService()
        self.addCleanup(lambda: node.stopService() if node.running else None)
        self.addCleanup(node._threadpool.stop)
        return node

    async def test_enrolledFirst(self) -> None:
        exchangeKey = ExchangeKey(Ed25519PrivateKey.generate())
        identity, _ = nodeIdentity()

        async def certify(public: bytes) -> str:
            return exchangeKey.issue(public, "k", reactor.seconds()).text

        enrolment = Enrolment(identity, exchangeKey.public, certify, reactor)
        node = self.startNode(enrolment)
        self.assertTrue(enrolment.running)
        await node.ready
        [slot] = node.slots
        self.assertIs(slot._sealer, enrolment)
        self.assertIsNotNone(enrolment.offer())
        await node.stopService()
        self.assertFalse(enrolment.running)

    async def test_exchangeSilent(self) -> None:
        """
        An exchange that does not answer holds the slots back
        L{ENROL_WAIT} seconds at most.
        """
        self.patch(nodeService, "ENROL_WAIT", 0.1)
        events = captureLogs(self)
        cancelled = []
        exchangeKey = ExchangeKey(Ed25519PrivateKey.generate())
        identity, _ = nodeIdentity()
        enrolment = Enrolment(
            identity, exchangeKey.public,
            lambda public: Deferred(lambda d: cancelled.append(d)), reactor, where="http://silent.test",
        )
        node = self.startNode(enrolment)
        await node.ready
        self.assertEqual(len(node.slots), 1)
        self.assertIsNone(enrolment.offer())
        self.assertIn(
            "no answer from http://silent.test in 0.1 s: serving unsealed jobs meanwhile",
            messages(events),
        )
        await node.stopService()
        self.assertEqual(len(cancelled), 1)

    async def test_noExchange(self) -> None:
        events = captureLogs(self)
        node = self.startNode(None)
        await node.ready
        self.assertIsNone(node.slots[0]._sealer)
        self.assertIn(
            "this node names no exchange (--exchange): it cannot seal, and takes only unsealed jobs",
            messages(events),
        )
