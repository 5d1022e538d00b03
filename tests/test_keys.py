"""
Tests for L{privox.keys}.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

import treq
from privox.keys import (
    AllowListPolicy,
    KeyPolicyError,
    OpenPolicy,
    URLPolicy,
    keyId,
    policyFromSpec,
)

VALIDATION_URL = "https://auth.example.com/validate"
SECRET = "s3cret-key-0123456789"


class RecordingResource(Resource):
    """
    A validation endpoint that answers every request with a fixed status and
    body, and remembers what it was sent.
    """

    isLeaf = True

    def __init__(self, body: bytes = b"1", code: int = 200) -> None:
        super().__init__()
        self.body = body
        self.code = code
        self.hang = False
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "contentType": request.requestHeaders.getRawHeaders(
                    b"content-type"
                ),
                "body": request.content.read(),
                "authorization": request.requestHeaders.getRawHeaders(
                    b"authorization"
                ),
            }
        )
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.body


class FailingClient:
    """
    An HTTP client whose every request fails as if the connection were
    refused.
    """

    def __init__(self) -> None:
        self.calls = 0

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        return fail(ConnectionRefusedError())


def captureLogs(testCase: SynchronousTestCase) -> list[dict[str, Any]]:
    """
    Collect every log event emitted until the end of C{testCase}.
    """
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class OpenPolicyTests(SynchronousTestCase):
    def test_acceptsAnything(self) -> None:
        policy = OpenPolicy()
        for key in ["", "anything", SECRET]:
            self.assertIs(self.successResultOf(policy.check(key)), True)

    def test_description(self) -> None:
        self.assertEqual(OpenPolicy().description, "open")


class AllowListPolicyTests(SynchronousTestCase):
    def writeFile(self, content: str) -> FilePath[str]:
        fp = FilePath(self.mktemp())
        fp.setContent(content.encode("utf-8"))
        return fp

    def test_parsing(self) -> None:
        """
        Keys are stripped; blank lines and C{#} comments (even indented) are
        skipped.
        """
        fp = self.writeFile(
            "# producers\n"
            "alpha\n"
            "\n"
            "   beta   \n"
            "\tgamma\t\r\n"
            "   # indented comment\n"
            "   \n"
            "clé-ünïcode\n"
        )
        policy = AllowListPolicy.fromFile(fp)
        self.assertEqual(policy.keys, {"alpha", "beta", "gamma", "clé-ünïcode"})
        self.assertEqual(policy.description, "allow-list file (4 keys)")

    def test_fromStrPath(self) -> None:
        fp = self.writeFile("alpha\n")
        policy = AllowListPolicy.fromFile(fp.path)
        self.assertEqual(policy.keys, {"alpha"})

    def test_acceptReject(self) -> None:
        policy = AllowListPolicy.fromFile(self.writeFile("alpha\n  beta\n"))
        self.assertIs(self.successResultOf(policy.check("alpha")), True)
        self.assertIs(self.successResultOf(policy.check("beta")), True)
        self.assertIs(self.successResultOf(policy.check("gamma")), False)
        # Matching is exact: no stripping or case-folding of presented keys.
        self.assertIs(self.successResultOf(policy.check(" alpha")), False)
        self.assertIs(self.successResultOf(policy.check("ALPHA")), False)
        # Comment lines are not keys.
        self.assertIs(self.successResultOf(policy.check("# beta")), False)

    def test_emptyKeyRejected(self) -> None:
        policy = AllowListPolicy(FilePath(self.mktemp()), frozenset(["", "a"]))
        self.assertIs(self.successResultOf(policy.check("")), False)
        self.assertIs(self.successResultOf(policy.check("a")), True)

    def test_readOnce(self) -> None:
        """
        Changes to the file after start-up have no effect.
        """
        fp = self.writeFile("alpha\n")
        policy = AllowListPolicy.fromFile(fp)
        fp.setContent(b"beta\n")
        self.assertIs(self.successResultOf(policy.check("alpha")), True)
        self.assertIs(self.successResultOf(policy.check("beta")), False)

    def test_emptyFile(self) -> None:
        """
        A file with no keys is allowed but refuses everyone, and says so.
        """
        events = captureLogs(self)
        fp = self.writeFile("# nobody yet\n\n")
        policy = AllowListPolicy.fromFile(fp)
        self.assertEqual(policy.description, "allow-list file (0 keys)")
        self.assertIs(self.successResultOf(policy.check("alpha")), False)
        self.assertTrue(
            any("has no keys" in formatEvent(e) for e in events), events
        )

    def test_missingFile(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(KeyPolicyError, AllowListPolicy.fromFile, path)
        self.assertIsInstance(e, ValueError)
        self.assertIn(path, str(e))

    def test_notUTF8(self) -> None:
        fp = FilePath(self.mktemp())
        fp.setContent(b"alpha\n\xff\xfe\n")
        e = self.assertRaises(KeyPolicyError, AllowListPolicy.fromFile, fp)
        self.assertIn(fp.path, str(e))

    def test_byteOrderMark(self) -> None:
        """
        A UTF-8 BOM does not become part of the first key.
        """
        fp = FilePath(self.mktemp())
        fp.setContent(b"\xef\xbb\xbfalpha\n")
        policy = AllowListPolicy.fromFile(fp)
        self.assertIs(self.successResultOf(policy.check("alpha")), True)


class URLPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = RecordingResource()
        self.clock = Clock()
        self.policy = URLPolicy(
            VALIDATION_URL,
            StubTreq(self.resource),
            self.clock,
            cacheSeconds=30.0,
            timeoutSeconds=5.0,
        )

    def answer(self, body: bytes, code: int = 200) -> None:
        self.resource.body = body
        self.resource.code = code

    def assertNoKeyIn(self, events: list[dict[str, Any]], key: str) -> None:
        for event in events:
            self.assertNotIn(key, formatEvent(event))
            self.assertNotIn(key, repr(event))

    def test_accepts(self) -> None:
        self.answer(b"1")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)

    def test_acceptsLargeAndPadded(self) -> None:
        self.answer(b"  42\r\n")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)

    def test_zeroRejects(self) -> None:
        self.answer(b"0")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)

    def test_negativeRejects(self) -> None:
        self.answer(b"-3\n")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)

    def test_keySentInPOSTBody(self) -> None:
        """
        The key travels as a form-encoded POST body, never in the URL.
        """
        key = "key with spaces&=+/é"
        self.successResultOf(self.policy.check(key))
        [request] = self.resource.requests
        self.assertEqual(request["method"], b"POST")
        self.assertEqual(request["uri"], b"/validate")
        self.assertEqual(
            request["contentType"], [b"application/x-www-form-urlencoded"]
        )
        self.assertEqual(
            parse_qs(request["body"].decode("ascii"), strict_parsing=True),
            {"key": [key]},
        )

    def test_nonIntegerRejects(self) -> None:
        events = captureLogs(self)
        for body in [b"abc", b"", b"1.0", b"1_000", b"\xff"]:
            self.answer(body)
            # Errors aren't cached, so every check asks again.
            self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        self.assertEqual(len(self.resource.requests), 5)
        warnings = [e for e in events if "key validation at" in formatEvent(e)]
        self.assertEqual(len(warnings), 5)
        self.assertNoKeyIn(events, SECRET)

    def test_httpErrorRejects(self) -> None:
        """
        A non-2xx status refuses, even if the body says yes, and logs a
        warning that names the URL and status but not the key.
        """
        events = captureLogs(self)
        self.answer(b"1", code=500)
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        [warning] = [e for e in events if "key validation at" in formatEvent(e)]
        text = formatEvent(warning)
        self.assertIn(VALIDATION_URL, text)
        self.assertIn("500", text)
        self.assertIn(keyId(SECRET), text)
        self.assertNoKeyIn(events, SECRET)

    def test_connectionRefusedRejects(self) -> None:
        events = captureLogs(self)
        client = FailingClient()
        policy = URLPolicy(VALIDATION_URL, client, self.clock)
        self.assertIs(self.successResultOf(policy.check(SECRET)), False)
        self.assertIs(self.successResultOf(policy.check(SECRET)), False)
        self.assertEqual(client.calls, 2)
        warnings = [e for e in events if "key validation at" in formatEvent(e)]
        self.assertEqual(len(warnings), 2)
        self.assertIn("ConnectionRefusedError", formatEvent(warnings[0]))
        self.assertNoKeyIn(events, SECRET)

    def test_timeoutRejects(self) -> None:
        events = captureLogs(self)
        self.resource.hang = True
        d = self.policy.check(SECRET)
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(self.resource.requests), 1)
        [warning] = [e for e in events if "key validation at" in formatEvent(e)]
        self.assertIn("TimeoutError: no answer within 5 seconds", formatEvent(warning))
        self.assertNoKeyIn(events, SECRET)
        # Timeouts are errors, so not cached.
        self.resource.hang = False
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)
        self.assertEqual(len(self.resource.requests), 2)

    def test_callerCancel(self) -> None:
        """
        A caller cancelling a check sees its cancellation, not a refusal,
        and nothing is logged as a validation failure.
        """
        events = captureLogs(self)
        self.resource.hang = True
        d = self.policy.check(SECRET)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertFalse(
            [e for e in events if "key validation at" in formatEvent(e)]
        )

    def test_cacheHit(self) -> None:
        self.answer(b"1")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)
        # The endpoint changing its mind is not seen within the TTL.
        self.answer(b"0")
        self.clock.advance(29)
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)
        self.assertEqual(len(self.resource.requests), 1)

    def test_rejectionCached(self) -> None:
        self.answer(b"0")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        self.assertEqual(len(self.resource.requests), 1)

    def test_cachePerKey(self) -> None:
        self.answer(b"1")
        self.successResultOf(self.policy.check("one"))
        self.successResultOf(self.policy.check("two"))
        self.assertEqual(len(self.resource.requests), 2)

    def test_cacheExpiry(self) -> None:
        self.answer(b"1")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)
        self.answer(b"0")
        self.clock.advance(30)
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        self.assertEqual(len(self.resource.requests), 2)

    def test_errorsNotCached(self) -> None:
        self.answer(b"oops", code=503)
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), False)
        self.answer(b"1")
        self.assertIs(self.successResultOf(self.policy.check(SECRET)), True)
        self.assertEqual(len(self.resource.requests), 2)

    def test_cacheBounded(self) -> None:
        """
        Beyond the size limit the oldest entry is forgotten.
        """
        policy = URLPolicy(
            VALIDATION_URL, StubTreq(self.resource), self.clock, maxCacheEntries=2
        )
        for key in ["a", "b", "c"]:
            self.successResultOf(policy.check(key))
        self.assertEqual(len(self.resource.requests), 3)
        # "b" and "c" are still cached; "a" was dropped.
        self.successResultOf(policy.check("b"))
        self.successResultOf(policy.check("c"))
        self.assertEqual(len(self.resource.requests), 3)
        self.successResultOf(policy.check("a"))
        self.assertEqual(len(self.resource.requests), 4)

    def test_cacheDoesNotHoldKeys(self) -> None:
        self.successResultOf(self.policy.check(SECRET))
        self.assertNotIn(SECRET, repr(self.policy._cache))

    def test_emptyKeyRejectedWithoutRequest(self) -> None:
        self.answer(b"1")
        self.assertIs(self.successResultOf(self.policy.check("")), False)
        self.assertEqual(self.resource.requests, [])

    def test_description(self) -> None:
        self.assertEqual(self.policy.description, f"validation URL {VALIDATION_URL}")

    def test_descriptionHidesSecrets(self) -> None:
        policy = URLPolicy(
            "https://user:pw@auth.example.com:8443/v?token=t0k#frag",
            StubTreq(self.resource),
            self.clock,
        )
        self.assertEqual(
            policy.description, "validation URL https://auth.example.com:8443/v"
        )


class URLPolicyByGetTests(SynchronousTestCase):
    """
    A validation URL with a C{{key}} placeholder: the original network's
    endpoints, which take the key at the end of a C{GET} URL.
    """

    TEMPLATE = "https://auth.example.com/cgi-bin/validate?key={key}"

    def setUp(self) -> None:
        self.resource = RecordingResource()
        self.clock = Clock()
        self.policy = URLPolicy(self.TEMPLATE, StubTreq(self.resource), self.clock)

    def test_keySentInGETURL(self) -> None:
        """
        The key, URL-quoted (every character that means something in a URL
        included), takes the placeholder's place; there is no body.
        """
        key = "key with spaces&=+/?#é"
        self.assertIs(self.successResultOf(self.policy.check(key)), True)
        [request] = self.resource.requests
        self.assertEqual(request["method"], b"GET")
        self.assertEqual(
            request["uri"],
            b"/cgi-bin/validate?key=key%20with%20spaces%26%3D%2B%2F%3F%23%C3%A9",
        )
        self.assertEqual(parse_qs(urlsplit(request["uri"].decode()).query), {"key": [key]})
        self.assertEqual((request["body"], request["contentType"]), (b"", None))

    def test_keyInPath(self) -> None:
        policy = URLPolicy("https://auth.example.com/keys/{key}/valid", StubTreq(self.resource), self.clock)
        self.successResultOf(policy.check("a/b c"))
        [request] = self.resource.requests
        self.assertEqual((request["method"], request["uri"]), (b"GET", b"/keys/a%2Fb%20c/valid"))

    def test_answers(self) -> None:
        """
        The same answers as a POST: an integer above zero admits, others
        refuse; answers are cached per key.
        """
        for body, admitted in ((b"7\n", True), (b"0", False), (b"-1", False)):
            self.resource.body = body
            key = f"key-{body!r}"
            self.assertIs(self.successResultOf(self.policy.check(key)), admitted, body)
            self.assertIs(self.successResultOf(self.policy.check(key)), admitted, body)
        self.assertEqual(len(self.resource.requests), 3)

    def test_descriptionAndWarningsHideTheKey(self) -> None:
        """
        The policy is described, and its failures logged, by the template's
        safe form: never with the key, quoted or not.
        """
        self.assertEqual(
            self.policy.description, "validation URL https://auth.example.com/cgi-bin/validate (GET)"
        )
        events = captureLogs(self)
        self.resource.code = 500
        key = "s3cret key/0123456789"
        self.assertIs(self.successResultOf(self.policy.check(key)), False)
        [warning] = [e for e in events if "key validation at" in formatEvent(e)]
        self.assertIn("https://auth.example.com/cgi-bin/validate", formatEvent(warning))
        for event in events:
            for secret in (key, quote(key, safe="")):
                self.assertNotIn(secret, formatEvent(event))
                self.assertNotIn(secret, repr(event))

    def test_fromSpecWithBearer(self) -> None:
        policy = policyFromSpec(
            self.TEMPLATE, reactor=self.clock, httpClient=StubTreq(self.resource), bearer="farm-key-1"
        )
        self.assertIsInstance(policy, URLPolicy)
        self.assertIs(self.successResultOf(policy.check("k")), True)
        [request] = self.resource.requests
        self.assertEqual(request["method"], b"GET")
        self.assertEqual(request["uri"], b"/cgi-bin/validate?key=k")
        self.assertEqual(request["authorization"], [b"Bearer farm-key-1"])


class URLPolicyServerTests(TestCase):
    """
    L{URLPolicy} against a real HTTP server on loopback, both ways.
    """

    async def test_againstAServer(self) -> None:
        known = "original key/1"
        resource = KnownKeyResource(known)
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        byGet = policyFromSpec(f"{base}/cgi-bin/validate?key={{key}}", reactor=reactor, httpClient=client)
        byPost = policyFromSpec(f"{base}/v1/keys/validate", reactor=reactor, httpClient=client)
        for policy in (byGet, byPost):
            self.assertIs(await policy.check(known), True)
            self.assertIs(await policy.check("someone else"), False)
        self.assertEqual(
            [(r["method"], r["uri"].split(b"?")[0]) for r in resource.requests],
            [(b"GET", b"/cgi-bin/validate")] * 2 + [(b"POST", b"/v1/keys/validate")] * 2,
        )


class KnownKeyResource(RecordingResource):
    """
    A validation endpoint that knows one key, which it takes from the query
    (C{GET}) or the form body (C{POST}).
    """

    def __init__(self, known: str) -> None:
        super().__init__()
        self.known = known

    def render(self, request: Request) -> bytes | int:
        super().render(request)
        asked = self.requests[-1]
        if asked["method"] == b"GET":
            form = urlsplit(asked["uri"].decode("ascii")).query
        else:
            form = asked["body"].decode("ascii")
        return b"1\n" if parse_qs(form).get("key") == [self.known] else b"0\n"


class PolicyFromSpecTests(SynchronousTestCase):
    def test_open(self) -> None:
        self.assertIsInstance(policyFromSpec("open", reactor=Clock()), OpenPolicy)

    def test_url(self) -> None:
        resource = RecordingResource(b"1")
        clock = Clock()
        for url in ["http://h.example/v", "https://h.example/v"]:
            policy = policyFromSpec(url, reactor=clock, httpClient=StubTreq(resource))
            self.assertIsInstance(policy, URLPolicy)
            self.assertEqual(policy.description, f"validation URL {url}")
            self.assertIs(self.successResultOf(policy.check("k")), True)
        self.assertEqual(len(resource.requests), 2)

    def test_urlUsesReactorAsClock(self) -> None:
        resource = RecordingResource(b"1")
        clock = Clock()
        policy = policyFromSpec(
            "https://h.example/v", reactor=clock, httpClient=StubTreq(resource)
        )
        self.successResultOf(policy.check("k"))
        clock.advance(31)
        self.successResultOf(policy.check("k"))
        self.assertEqual(len(resource.requests), 2)

    def test_urlBearer(self) -> None:
        """
        A farm's key given as C{bearer} goes with every validation request as
        C{Authorization: Bearer}; without it no Authorization header is sent.
        """
        resource = RecordingResource(b"1")
        policy = policyFromSpec(
            "https://h.example/v",
            reactor=Clock(),
            httpClient=StubTreq(resource),
            bearer="farm-key-1",
        )
        self.assertIs(self.successResultOf(policy.check("k")), True)
        plain = policyFromSpec(
            "https://h.example/v", reactor=Clock(), httpClient=StubTreq(resource)
        )
        self.successResultOf(plain.check("k"))
        first, second = resource.requests
        self.assertEqual(first["authorization"], [b"Bearer farm-key-1"])
        self.assertEqual(
            first["contentType"], [b"application/x-www-form-urlencoded"]
        )
        self.assertIsNone(second["authorization"])
        self.assertNotIn("farm-key-1", policy.description)

    def test_urlDefaultsToTreq(self) -> None:
        policy = policyFromSpec("https://h.example/v", reactor=Clock())
        assert isinstance(policy, URLPolicy)
        self.assertIs(policy._httpClient, treq)

    def test_file(self) -> None:
        fp = FilePath(self.mktemp())
        fp.setContent(b"alpha\n")
        policy = policyFromSpec(fp.path, reactor=Clock())
        self.assertIsInstance(policy, AllowListPolicy)
        self.assertIs(self.successResultOf(policy.check("alpha")), True)

    def test_missingFile(self) -> None:
        self.assertRaises(KeyPolicyError, policyFromSpec, self.mktemp(), reactor=Clock())


class KeyIdTests(SynchronousTestCase):
    def test_shape(self) -> None:
        kid = keyId(SECRET)
        self.assertEqual(len(kid), 12)
        self.assertRegex(kid, r"\A[0-9a-f]{12}\Z")
        self.assertNotIn(kid, SECRET)

    def test_stable(self) -> None:
        self.assertEqual(keyId(SECRET), keyId(SECRET))
        # sha256("abc") = ba7816bf8f01cfea...
        self.assertEqual(keyId("abc"), "ba7816bf8f01")

    def test_distinct(self) -> None:
        self.assertNotEqual(keyId("a"), keyId("b"))
