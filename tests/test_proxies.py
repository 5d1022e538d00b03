"""
Who the client is behind trusted reverse proxies (L{privox.api.proxies}).
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from privox.api.proxies import ClientView, TrustedProxies
from privox.api.service import ApiSettings, Options, trustedProxies

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "2001:db8:ffff::/48"])


class PlainRequest(DummyRequest):
    """
    A request over plain HTTP from C{127.0.0.1}.
    """

    def __init__(self) -> None:
        super().__init__([b"signup"])
        self.client = IPv4Address("TCP", "127.0.0.1", 4711)

    def isSecure(self) -> bool:
        return False


class TrustedProxiesTests(SynchronousTestCase):
    def test_noneTrustedByDefault(self) -> None:
        """
        With no trusted proxy, the peer is the client and its own TLS
        counts, whatever the headers say.
        """
        proxies = TrustedProxies()
        self.assertEqual(len(proxies), 0)
        self.assertFalse(proxies.trusts("127.0.0.1"))
        self.assertEqual(
            proxies.view("127.0.0.1", False, [b"203.0.113.9"], [b"https"]),
            ClientView("127.0.0.1", False),
        )

    def test_trustedPeer(self) -> None:
        """
        From a trusted proxy, the client is the address it appended.
        """
        self.assertEqual(
            PROXIES.view("127.0.0.1", False, [b"203.0.113.9"]),
            ClientView("203.0.113.9", False),
        )

    def test_chainOfProxies(self) -> None:
        """
        Walking from the right past every trusted proxy: the first address
        that is not one is the client; what lies to its left (the client's
        own words) is ignored.
        """
        chain = [b"198.51.100.1, 203.0.113.9, 10.2.3.4, 10.0.0.7"]
        self.assertEqual(PROXIES.view("10.0.0.1", False, chain).address, "203.0.113.9")
        # The header's lines are one list, in order.
        self.assertEqual(
            PROXIES.view("10.0.0.1", False, [b"198.51.100.1, 203.0.113.9", b"10.2.3.4"]).address,
            "203.0.113.9",
        )
        # Every hop a trusted proxy: the left-most, where the request began.
        self.assertEqual(PROXIES.view("10.0.0.1", False, [b"10.9.9.9,127.0.0.1"]).address,
                         "10.9.9.9")

    def test_untrustedPeerForges(self) -> None:
        """
        A peer outside the trusted networks is the client, and its headers
        change nothing: it cannot pass as another or as TLS.
        """
        view = PROXIES.view(
            "203.0.113.9", False, [b"198.51.100.1", b"10.0.0.1"], [b"https"]
        )
        self.assertEqual(view, ClientView("203.0.113.9", False))
        self.assertEqual(PROXIES.view("203.0.113.9", True, [], [b"http"]),
                         ClientView("203.0.113.9", True))

    def test_malformed(self) -> None:
        """
        An entry that is not an address, met while walking, makes the
        request the trusted proxy's own; one left of the client does not
        matter.
        """
        for header in ([b"203.0.113.9, unknown"], [b"203.0.113.9, "], [b"203.0.113.9:4711"],
                       [b"_hidden, 10.0.0.2"], [b"1.2.3.4.5"], [b""], [b"\xff\xfe"]):
            self.assertEqual(PROXIES.view("10.0.0.1", False, header).address, "10.0.0.1", header)
        self.assertEqual(PROXIES.view("10.0.0.1", False, [b"garbage, 203.0.113.9"]).address,
                         "203.0.113.9")
        # No header at all: the proxy's own request.
        self.assertEqual(PROXIES.view("10.0.0.1", False).address, "10.0.0.1")

    def test_ipv6(self) -> None:
        proxies = TrustedProxies(["::1", "2001:db8:ffff::/48"])
        self.assertEqual(
            proxies.view("::1", False, [b"2001:DB8:1:2::9, 2001:db8:ffff:1::1"]).address,
            "2001:db8:1:2::9",
        )
        self.assertEqual(proxies.view("2001:db8:fffe::1", False, [b"2001:db8:1::1"]).address,
                         "2001:db8:fffe::1")
        # A dual-stack socket's IPv4-mapped peer is its IPv4 address.
        self.assertEqual(
            PROXIES.view("::ffff:127.0.0.1", False, [b"::ffff:203.0.113.9"]).address,
            "203.0.113.9",
        )
        self.assertTrue(TrustedProxies(["::ffff:10.0.0.0/104"]).trusts("10.1.2.3"))

    def test_forwardedProto(self) -> None:
        """
        From a trusted proxy, the last X-Forwarded-Proto says whether the
        client came over TLS; without one, the connection's own TLS does.
        """
        for protos, tls, secure in (
            ([b"https"], False, True),
            ([b"HTTPS"], False, True),
            ([b"http"], False, False),
            ([b"http"], True, False),
            ([b"https, http"], False, False),
            ([b"http", b"https"], False, True),
            ([], False, False),
            ([], True, True),
            ([b"https, "], False, True),
        ):
            self.assertEqual(
                PROXIES.view("127.0.0.1", tls, [b"203.0.113.9"], protos).secure, secure,
                (protos, tls),
            )
        # Its word counts even where its X-Forwarded-For does not.
        self.assertEqual(PROXIES.view("127.0.0.1", False, [b"nonsense"], [b"https"]),
                         ClientView("127.0.0.1", True))

    def test_peerWithoutAddress(self) -> None:
        """
        A peer with no IP address (a UNIX socket) is trusted by no network.
        """
        self.assertEqual(PROXIES.view("", False, [b"203.0.113.9"], [b"https"]),
                         ClientView("", False))

    def test_networks(self) -> None:
        proxies = TrustedProxies(["192.0.2.0/24, 198.51.100.7", " ", "fd00::/8"])
        self.assertEqual(len(proxies), 3)
        self.assertTrue(proxies.trusts("192.0.2.200"))
        self.assertTrue(proxies.trusts("198.51.100.7"))
        self.assertFalse(proxies.trusts("198.51.100.8"))
        self.assertTrue(proxies.trusts("fd12::1"))
        self.assertFalse(proxies.trusts("nonsense"))
        # Host bits set are taken as the network.
        self.assertTrue(TrustedProxies(["10.1.2.3/8"]).trusts("10.200.0.1"))
        e = self.assertRaises(ValueError, TrustedProxies, ["10.0.0.0/8", "proxy.example"])
        self.assertIn("'proxy.example'", str(e))

    def test_ofRequest(self) -> None:
        """
        A request's peer, TLS and headers.
        """
        request = PlainRequest()
        request.requestHeaders.addRawHeader(b"X-Forwarded-For", b"203.0.113.9")
        request.requestHeaders.addRawHeader(b"X-Forwarded-Proto", b"https")
        self.assertEqual(PROXIES.ofRequest(request), ClientView("203.0.113.9", True))
        self.assertEqual(TrustedProxies().ofRequest(request), ClientView("127.0.0.1", False))


class SettingTests(SynchronousTestCase):
    def test_option(self) -> None:
        """
        --trusted-proxies repeats; a bad item is a usage error.
        """
        options = Options()
        options.parseOptions(["--farm", "a tcp:host=x:port=1 none", "--trusted-proxies",
                              "127.0.0.1", "--trusted-proxies", "::1"])
        self.assertEqual(options.settings.trusted_proxies, ("127.0.0.1", "::1"))
        self.assertEqual(len(trustedProxies(options.settings)), 2)
        self.assertEqual(ApiSettings().trusted_proxies, ())
        e = self.assertRaises(usage.UsageError, Options().parseOptions,
                              ["--farm", "a tcp:host=x:port=1 none", "--trusted-proxies", "nginx"])
        self.assertIn("--trusted-proxies: not an IP address or network: 'nginx'", str(e))
