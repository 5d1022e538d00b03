"""
The account pages (L{privox.api.accountpages}) through the HTTP API: a real
L{PrivoxAPI} on a loopback port over a real SQLite account store (its
queries run in threads, so the requests go over a socket rather than
StubTreq), the farms stubbed and the clock a L{Clock}; the sign-up limiter
on its own.
"""

from __future__ import annotations

import html
import os
import re
import time
from typing import Any

import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from privox.accounts.store import AccountStore
from privox.api.access import AccountAccess, PolicyAccess, modelCosts
from privox.api.accountpages import PAGE_SIZE, SignupLimiter, barChart
from privox.api.app import PrivoxAPI
from privox.api.enrolment import ExchangeKey
from privox.api.proxies import TrustedProxies
from privox.identity import encodeKey, enrolmentProof, fingerprint, publicBytes
from privox.keys import OpenPolicy, accountId
from tests.test_api_accounts import MODELS, SecondsExchange, wav
from tests.test_api_app import multipart

#: The test clock's now: a whole hour and a half past 1970's first day.
NOW = 86_400.0 * 2 + 1800.0


def ledgerRecord(n: int, at: float, producer: str | None, consumer: str | None,
                 service: str = "stt", status: str = "ok") -> dict[str, Any]:
    return {
        "job_id": f"{n:016x}", "farm": "farm-a", "time": at, "service": service,
        "model": "whisper:tiny.en" if service == "stt" else "piper:en_US-lessac-low",
        "input_bytes": 32000, "output_bytes": 40, "audio_seconds": 2.0 if status == "ok" else None,
        "processing_ms": 150.0, "status": status, "producer": producer, "consumer": consumer,
    }


class SignupLimiterTests(SynchronousTestCase):
    def test_perClientAndInAll(self) -> None:
        limiter = SignupLimiter(perClient=2, inAll=3, period=100.0, secret=b"s" * 32)
        self.assertIsNone(limiter.admit("10.0.0.1", 0.0))
        self.assertIsNone(limiter.admit("10.0.0.1", 10.0))
        # A third from the same client waits until its first leaves.
        self.assertEqual(limiter.admit("10.0.0.1", 20.0), 80.0)
        self.assertIsNone(limiter.admit("10.0.0.2", 20.0))
        # Three in all: a new client waits too.
        self.assertEqual(limiter.admit("10.0.0.3", 30.0), 70.0)
        self.assertIsNone(limiter.admit("10.0.0.1", 100.5))

    def test_noAddressKept(self) -> None:
        """
        The limiter holds HMACs of addresses, not the addresses.
        """
        limiter = SignupLimiter(secret=b"k" * 32)
        limiter.admit("192.0.2.77", 0.0)
        self.assertNotIn(b"192.0.2.77", repr(limiter.__dict__).encode())
        self.assertEqual([len(c) for c in limiter._clients], [16])

    def test_ipv6ClientIsItsSlash64(self) -> None:
        limiter = SignupLimiter(perClient=1, secret=b"k" * 32)
        self.assertIsNone(limiter.admit("2001:db8:1:2::1", 0.0))
        self.assertIsNotNone(limiter.admit("2001:db8:1:2:ffff::9", 1.0))
        self.assertIsNone(limiter.admit("2001:db8:1:3::1", 2.0))
        self.assertIsNone(limiter.admit("192.0.2.1", 3.0))
        self.assertIsNotNone(limiter.admit("192.0.2.1", 4.0))

    def test_chart(self) -> None:
        """
        One bar per hour and series, scaled to the highest, with its figure.
        """
        from twisted.web.template import flattenString

        chart = barChart("t", [0.0, 3600.0], [("used", "#000", [1.0, 4.0])], "s")
        svg = self.successResultOf(flattenString(None, chart)).decode()
        bars = re.findall(r'<rect [^>]*height="([\d.]+)"[^>]*data-value="([^"]+)"', svg)
        # The plot is 164 units high: the highest bar fills it.
        self.assertEqual(bars, [("41.0", "1"), ("164.0", "4")])
        self.assertIn("<title>1970-01-01 01:00 UTC: 4.0 s used</title>", svg)
        self.assertIn("used (5.0 s in all)", svg)


class AccountPagesTests(TestCase):
    async def start(self, accounts: bool = True, proxies: TrustedProxies | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.exchange = SecondsExchange()
        if accounts:
            self.store = AccountStore.open("sqlite:" + os.path.abspath(self.mktemp()), reactor)
            self.addCleanup(self.store.close)
            await self.store.migrate()
            access: Any = AccountAccess(
                self.store, self.clock, hourlySeconds=600.0,
                costOf=modelCosts(MODELS.stt, ["whisper:tiny.en 2"]),
            )
        else:
            access = PolicyAccess(OpenPolicy())
        self.api = PrivoxAPI(self.exchange, MODELS, access, clock=self.clock,
                             exchangeKey=ExchangeKey(Ed25519PrivateKey.generate()),
                             proxies=proxies)
        port = reactor.listenTCP(0, self.api.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def get(self, path: str, cookie: str | None = None) -> tuple[int, Any, str]:
        headers = {"Cookie": cookie} if cookie else {}
        response = await self.http.get(self.url + path, headers=headers, allow_redirects=False)
        return response.code, response.headers, (await response.content()).decode("utf-8")

    async def post(
        self, path: str, cookie: str | None = None, headers: dict[str, str] | None = None,
        **data: str,
    ) -> tuple[int, Any, str]:
        headers = dict(headers or {}, **({"Cookie": cookie} if cookie else {}))
        response = await self.http.post(self.url + path, data=data, headers=headers,
                                        allow_redirects=False)
        return response.code, response.headers, (await response.content()).decode("utf-8")

    def cookies(self, headers: Any) -> dict[str, str]:
        """
        Set-Cookie lines by cookie name.
        """
        return {line.split("=", 1)[0]: line for line in headers.getRawHeaders("set-cookie", [])}

    async def signUp(self) -> tuple[str, str]:
        """
        Sign up: the new key shown once on the account page; the cookie
        header to send as that key, and the key.
        """
        code, headers, _ = await self.post("/signup")
        self.assertEqual(code, 303)
        self.assertEqual(headers.getRawHeaders("location"), ["/account"])
        set = self.cookies(headers)
        keyCookie = set["privox_key"].split(";")[0]
        revealCookie = set["privox_new"].split(";")[0]
        self.assertIn("Max-Age=600", set["privox_new"])
        code, headers, page = await self.get("/account", f"{keyCookie}; {revealCookie}")
        self.assertEqual(code, 200)
        shown = re.search(r'<pre id="new-key">(pvx_[\w-]+)</pre>', page)
        assert shown is not None, page
        key = shown.group(1)
        self.assertEqual(keyCookie, f"privox_key={key}")
        # Shown once: the page clears the flag, and without it shows no key.
        self.assertIn("privox_new=; Expires=Thu, 01 Jan 1970", self.cookies(headers)["privox_new"])
        code, _, again = await self.get("/account", keyCookie)
        self.assertEqual(code, 200)
        self.assertNotIn(key, again)
        self.assertNotIn("new-key", again)
        return keyCookie, key

    async def test_signUpShowsKeyOnce(self) -> None:
        await self.start()
        keyCookie, key = await self.signUp()
        account = await self.store.authenticate(key)
        assert account is not None
        self.assertEqual((account.role, account.label), ("user", "signed up"))
        _, _, page = await self.get("/account", keyCookie)
        self.assertIn(f'<code id="key-id">{accountId(key)[:12]}</code>', page)
        self.assertIn('<td id="allowance">600 s</td>', page)
        self.assertIn('<td id="used">0.0 s</td>', page)

    async def test_cookieAttributes(self) -> None:
        """
        The key's cookie is HttpOnly and SameSite=Strict, not Secure over
        plain HTTP; signing out clears it.
        """
        await self.start()
        key, _ = await self.store.createKey(NOW)
        code, headers, _ = await self.post("/signin", key=key)
        self.assertEqual(code, 303)
        line = self.cookies(headers)["privox_key"]
        self.assertIn("HttpOnly", line)
        self.assertIn("SameSite=strict", line)
        self.assertNotIn("Secure", line)
        self.assertTrue(line.startswith(f"privox_key={key};"))
        code, headers, _ = await self.post("/signout", f"privox_key={key}")
        self.assertEqual(code, 303)
        self.assertIn("privox_key=; Expires=Thu, 01 Jan 1970", self.cookies(headers)["privox_key"])

    async def test_crossSiteFormsRefused(self) -> None:
        """
        A form another site had a browser post (to sign its visitor in as
        someone, out, or up) is refused; this site's own is taken.
        """
        await self.start()
        key, _ = await self.store.createKey(NOW)
        host = self.url.split("://", 1)[1]
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}):
            for path, data in (("/signin", {"key": key}), ("/signup", {}), ("/signout", {})):
                code, responseHeaders, page = await self.post(path, headers=headers, **data)
                self.assertEqual(code, 403, (path, headers))
                self.assertIn("sent from another site", page)
                self.assertEqual(responseHeaders.getRawHeaders("set-cookie"), None)
        code, _, _ = await self.post(
            "/signin", headers={"Origin": self.url, "Sec-Fetch-Site": "same-origin"}, key=key
        )
        self.assertEqual((code, host.startswith("127.0.0.1")), (303, True))

    async def test_enrolledNodes(self) -> None:
        """
        The nodes enrolled under the key, on its own page only: each by
        its identity's fingerprint, with its certificate's times.
        """
        await self.start()
        key, _ = await self.store.createKey(NOW)
        other, _ = await self.store.createKey(NOW)
        private = Ed25519PrivateKey.generate()
        identity = publicBytes(private.public_key())
        body = {"identity": encodeKey(identity), "proof": enrolmentProof(private, accountId(key))}
        response = await self.http.post(
            self.url + "/v1/enroll", json=body, headers={"Authorization": f"Bearer {key}"},
        )
        self.assertEqual(response.code, 200, await response.content())
        self.clock.advance(3600)
        await self.http.post(
            self.url + "/v1/enroll", json=body, headers={"Authorization": f"Bearer {key}"},
        )
        _, _, page = await self.get("/account", f"privox_key={key}")
        node = fingerprint(identity)
        row = re.search(r'<table id="enrolled">.*?</table>', page, re.S).group(0)
        self.assertIn(node, row)
        self.assertEqual(row.count("<code>"), 1)
        self.assertIn(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(NOW)), row)  # first
        self.assertIn(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(NOW + 3600)), row)
        self.assertIn("<td>enrolled, not connected</td>", row)
        _, _, page = await self.get("/account", f"privox_key={other}")
        self.assertNotIn(node, page)
        self.assertIn("No node has enrolled with this key yet.", page)

        # Online now: as farms say when they register; a farm's word holds
        # a few minutes, and the next word replaces it.
        now = self.clock.seconds()
        mine = accountId(key)[:12]
        await self.store.noteOnline("farm-a", [(node, mine, 2), ("someoneElsesNode", mine, 1),
                                               (node, accountId(other)[:12], 5)], now)
        await self.store.noteOnline("farm-b", [(node, mine, 1)], now - 3600)
        _, _, page = await self.get("/account", f"privox_key={key}")
        row = re.search(r'<table id="enrolled">.*?</table>', page, re.S).group(0)
        self.assertIn("<td>online: 2 connections at 1 farm</td>", row)
        self.assertNotIn("someoneElsesNode", page)
        await self.store.noteOnline("farm-b", [(node, mine, 1)], now)
        _, _, page = await self.get("/account", f"privox_key={key}")
        self.assertIn("<td>online: 3 connections at 2 farms</td>", page)
        await self.store.noteOnline("farm-a", [], now)
        await self.store.noteOnline("farm-b", [], now)
        _, _, page = await self.get("/account", f"privox_key={key}")
        self.assertIn("<td>enrolled, not connected</td>", page)

    async def test_signInRefused(self) -> None:
        await self.start()
        farm, _ = await self.store.createKey(NOW, role="farm")
        for key in ("pvx_nobody", farm, ""):
            code, headers, page = await self.post("/signin", key=key)
            self.assertEqual(code, 403, key)
            self.assertIn("That key was not accepted", page)
            self.assertEqual(headers.getRawHeaders("set-cookie"), None)
        # A stale cookie gets the sign-in form, and is cleared.
        code, headers, page = await self.get("/account", "privox_key=pvx_gone")
        self.assertIn("Sign in to see your account.", page)
        self.assertIn("privox_key=;", self.cookies(headers)["privox_key"])

    async def test_signUpLimited(self) -> None:
        await self.start()
        self.api.accountPages.limiter = SignupLimiter(perClient=2, inAll=10, period=3600.0)
        for _ in range(2):
            self.assertEqual((await self.post("/signup"))[0], 303)
        code, headers, page = await self.post("/signup")
        self.assertEqual(code, 429)
        self.assertEqual(headers.getRawHeaders("retry-after"), ["3600"])
        self.assertIn("Too many sign-ups just now: try again in 61 minutes.", page)
        self.assertEqual(len(await self.store.accounts()), 2)
        self.clock.advance(3601)
        self.assertEqual((await self.post("/signup"))[0], 303)

    async def test_signUpLimitedPerClientBehindProxy(self) -> None:
        """
        Behind a trusted proxy (here the loopback the test connects from),
        each client its X-Forwarded-For names has its own allowance, and
        the addresses a client writes to the left of its own change
        nothing.
        """
        await self.start(proxies=TrustedProxies(["127.0.0.1"]))
        self.api.accountPages.limiter = SignupLimiter(perClient=1, inAll=10, period=3600.0)

        async def signUpAs(forwardedFor: str) -> int:
            code, _, _ = await self.post("/signup", headers={"X-Forwarded-For": forwardedFor})
            return code

        self.assertEqual(await signUpAs("203.0.113.1"), 303)
        self.assertEqual(await signUpAs("203.0.113.1"), 429)
        self.assertEqual(await signUpAs("203.0.113.2"), 303)
        # 203.0.113.2 again, claiming to be a new client behind it: still itself.
        self.assertEqual(await signUpAs("198.51.100.7, 203.0.113.2"), 429)
        # A chain through another trusted hop: the client past it.
        self.assertEqual(await signUpAs("203.0.113.3, 127.0.0.1"), 303)
        self.assertEqual(len(await self.store.accounts()), 3)

    async def test_secureCookieBehindProxy(self) -> None:
        """
        Behind a trusted proxy that says the client came over TLS
        (X-Forwarded-Proto: https), the key's cookies are Secure, and the
        front page's examples say https; without the header they are not.
        """
        await self.start(proxies=TrustedProxies(["127.0.0.0/8", "::1"]))
        tls = {"X-Forwarded-For": "203.0.113.1", "X-Forwarded-Proto": "https"}
        code, headers, _ = await self.post("/signup", headers=tls)
        self.assertEqual(code, 303)
        cookies = self.cookies(headers)
        self.assertIn("Secure", cookies["privox_key"])
        self.assertIn("Secure", cookies["privox_new"])
        key, _ = await self.store.createKey(NOW)
        code, headers, _ = await self.post("/signin", headers=tls, key=key)
        self.assertEqual(code, 303)
        self.assertIn("Secure", self.cookies(headers)["privox_key"])
        code, headers, _ = await self.post("/signout", f"privox_key={key}", headers=tls)
        self.assertIn("Secure", self.cookies(headers)["privox_key"])
        code, headers, _ = await self.post("/signin", key=key)
        self.assertNotIn("Secure", self.cookies(headers)["privox_key"])
        response = await self.http.get(self.url + "/", headers={"X-Forwarded-Proto": "https"})
        self.assertIn(f"curl -s https://{self.url.split('://', 1)[1]}/v1/models",
                      (await response.content()).decode("utf-8"))

    async def test_untrustedPeerHeadersIgnored(self) -> None:
        """
        From a peer that is no trusted proxy (by default, none is), the
        forwarding headers change nothing: one client, whatever its
        X-Forwarded-For says, and no Secure cookie over plain HTTP.
        """
        await self.start()
        self.api.accountPages.limiter = SignupLimiter(perClient=1, inAll=10, period=3600.0)
        code, headers, _ = await self.post(
            "/signup", headers={"X-Forwarded-For": "203.0.113.1", "X-Forwarded-Proto": "https"}
        )
        self.assertEqual(code, 303)
        self.assertNotIn("Secure", self.cookies(headers)["privox_key"])
        code, _, _ = await self.post("/signup", headers={"X-Forwarded-For": "203.0.113.2"})
        self.assertEqual(code, 429)
        # Trusting another network changes nothing for this peer either.
        self.api.accountPages.proxies = TrustedProxies(["10.0.0.0/8"])
        code, _, _ = await self.post("/signup", headers={"X-Forwarded-For": "203.0.113.3"})
        self.assertEqual(code, 429)
        self.assertEqual(len(await self.store.accounts()), 1)

    async def test_noAccountStore(self) -> None:
        await self.start(accounts=False)
        for method, path in (("post", "/signup"), ("get", "/signup"), ("get", "/account")):
            code, _, page = await getattr(self, method)(path)
            self.assertEqual(code, 404)
            self.assertIn("This API keeps no accounts", page)
        code, _, page = await self.get("/about")
        self.assertEqual(code, 200)
        self.assertIn("This API keeps no ledger", page)

    async def test_usageChartAndLedger(self) -> None:
        """
        A request's seconds show as used, this hour; the ledger's jobs
        where the key produced show as earned, in its nodes' table and in
        its transactions, paged and filtered, newest first.
        """
        await self.start()
        key, _ = await self.store.createKey(NOW - 7200)
        other, _ = await self.store.createKey(NOW - 7200)
        cookie = f"privox_key={key}"
        body, contentType = multipart({"key": key}, {"file": ("a.wav", wav(20))})
        response = await self.http.post(self.url + "/stt", data=body,
                                        headers={"Content-Type": contentType})
        self.assertEqual(response.code, 200)
        me, them = accountId(key), accountId(other)
        farm, _ = await self.store.createKey(NOW, role="farm")
        records = [ledgerRecord(n, NOW - 3 * 3600 + n * 60, me, them) for n in range(25)]
        records.append(ledgerRecord(100, NOW - 60, them, me, service="tts"))
        records.append(ledgerRecord(101, NOW - 30, them, None, service="tts"))
        await self.store.record(accountId(farm), records, NOW - 3 * 3600,
                                lambda model: 2.0)

        _, _, page = await self.get("/account", cookie)
        self.assertIn('<td id="used">20.0 s</td>', page)
        # The chart: 24 hours, two series; this hour used 20 s; three hours
        # ago (when the ledger was credited) 25 jobs x 2 s x 2 = 100 QSS.
        used = re.findall(r'data-series="used" data-value="([^"]+)"', page)
        earned = re.findall(r'data-series="earned" data-value="([^"]+)"', page)
        self.assertEqual(len(used), 24)
        self.assertEqual(used[-1], "20")
        self.assertEqual(earned[-4], "100")
        self.assertEqual(sum(float(v) for v in earned), 100.0)
        # Its nodes: 25 jobs on farm-a.
        nodes = re.search(r'<div id="nodes">.*?</div>', page, re.S)
        assert nodes is not None
        self.assertIn("<td>farm-a</td><td>stt</td><td>whisper:tiny.en</td><td>25</td><td>25</td>"
                      "<td>50.0</td><td>100</td>", nodes.group(0))
        self.assertIn("<td>quiet</td>", nodes.group(0))
        # Its transactions: 26 (not the one it had no part in), newest
        # first, 20 a page.
        rows = re.findall(r'<tr class="transaction">(.*?)</tr>', page)
        self.assertEqual(len(rows), PAGE_SIZE)
        self.assertIn("<td>consumer</td><td>tts</td>", rows[0])
        self.assertIn("<td>producer</td><td>stt</td>", rows[1])
        self.assertIn("Page 1 of 2 (26 in all)", page)
        self.assertNotIn(them, page)
        self.assertNotIn(them[:12], page)
        _, _, second = await self.get("/account?page=2", cookie)
        self.assertEqual(len(re.findall(r'class="transaction"', second)), 6)
        _, _, consumed = await self.get("/account?role=consumer", cookie)
        self.assertEqual(len(re.findall(r'class="transaction"', consumed)), 1)
        self.assertIn('<option value="consumer" selected="selected">', consumed)
        _, _, stt = await self.get("/account?role=producer&service=stt&page=2", cookie)
        self.assertEqual(len(re.findall(r'class="transaction"', stt)), 5)
        self.assertIn(html.escape("/account?role=producer&service=stt"), stt)

    async def test_about(self) -> None:
        """
        Farms and producers per model from the status report; jobs per
        second and per hour from the ledger.
        """
        await self.start()
        self.exchange.health = lambda: {"farms": [  # type: ignore[method-assign]
            {"name": "farm-a", "up": True, "services": ["stt", "tts"]},
            {"name": "farm-b", "up": False, "services": ["stt"]},
        ]}
        load = {"services": {"stt": {"queue": 0, "models": {
            "whisper:tiny.en": {"connected": 3, "idle": 2, "busy": 1, "sealing": 3}}}}}
        self.api.farmStatus = lambda: {"farm-a": load, "farm-b": load}
        farm, _ = await self.store.createKey(NOW, role="farm")
        records = [ledgerRecord(n, NOW - 30 - n, None, None) for n in range(12)]
        records += [ledgerRecord(50 + n, NOW - 5 * 3600, None, None) for n in range(4)]
        await self.store.record(accountId(farm), records, NOW, lambda model: 1.0)
        code, _, page = await self.get("/about")
        self.assertEqual(code, 200)
        self.assertIn("1 of 2 farms up.", page)
        self.assertIn("<td>stt</td><td>whisper:tiny.en</td><td>2</td><td>6</td><td>4</td>", page)
        self.assertIn("0.20 jobs per second in the last minute, 0.003 in the last hour (12 jobs).",
                      page)
        jobs = re.findall(r'data-series="jobs" data-value="([^"]+)"', page)
        self.assertEqual(len(jobs), 24)
        self.assertEqual((jobs[-1], jobs[-6]), ("12", "4"))
        # No address, no key of anyone.
        self.assertNotIn("127.0.0.1", page)


def _browse(driver: Any, url: str, steps: str, key: str = "") -> dict[str, Any]:
    """
    The account pages in headless Chromium (blocking: run in a thread).
    C{steps} "signup": sign up, read the key, reload; "account": sign out,
    sign in with C{key}, read the account and about pages, screenshots.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    seen: dict[str, Any] = {}
    if steps == "signup":
        driver.get(url + "/")
        driver.find_element(By.LINK_TEXT, "sign up").click()
        wait.until(lambda d: d.title == "Privox: Sign up")
        driver.find_element(By.XPATH, "//button[text()='Make me a key']").click()
        wait.until(lambda d: d.find_elements(By.ID, "new-key"))
        seen["key"] = driver.find_element(By.ID, "new-key").text
        seen["keyId"] = driver.find_element(By.ID, "key-id").text
        seen["cookieVisible"] = driver.execute_script("return document.cookie")
        driver.refresh()
        wait.until(lambda d: d.find_elements(By.ID, "key-id"))
        seen["afterReload"] = driver.page_source
        return seen
    driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
    wait.until(lambda d: d.title == "Privox: Sign in")
    driver.get(url + "/account")
    seen["signedOut"] = driver.title
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "signin").click()
    wait.until(lambda d: d.find_elements(By.ID, "key-id"))
    seen["used"] = driver.find_element(By.ID, "used").text
    seen["earned"] = driver.find_element(By.ID, "earned").text
    seen["usedBars"] = driver.execute_script(
        "return [...document.querySelectorAll('rect[data-series=used]')]"
        ".map(r => [+r.dataset.value, r.getBoundingClientRect().height])")
    seen["nodes"] = driver.find_element(By.ID, "nodes").text
    seen["enrolled"] = driver.find_element(By.ID, "enrolled").text
    seen["rows"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "tr.transaction")]
    seen["pager"] = driver.find_element(By.ID, "pager").text
    driver.save_screenshot(os.path.abspath("account-page.png"))
    driver.find_element(By.ID, "filter-role").send_keys("producer")
    driver.find_element(By.ID, "filter").click()
    wait.until(lambda d: "role=producer" in d.current_url)
    seen["producerRows"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "tr.transaction")]
    driver.find_element(By.LINK_TEXT, "about the network").click()
    wait.until(lambda d: d.title == "Privox: The network")
    seen["capacity"] = driver.find_element(By.ID, "capacity").text
    seen["rate"] = driver.find_element(By.ID, "rate").text
    seen["jobBars"] = driver.execute_script(
        "return [...document.querySelectorAll('rect[data-series=jobs]')].map(r => +r.dataset.value)")
    driver.save_screenshot(os.path.abspath("about-page.png"))
    seen["scripts"] = driver.execute_script("return document.scripts.length")
    seen["console"] = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return seen


class AccountPagesInChromiumTests(TestCase):
    timeout = 180

    async def test_signUpUseAndProduce(self) -> None:
        """
        In headless Chromium against a whole local exchange: sign up and
        see the key once; a speech request with it through the exchange;
        a farm's ledger naming the key as a job's producer; then signed
        out and in again with the key: its use, its node and its
        transactions on /account, and the network on /about.
        """
        import json

        from twisted.internet.threads import deferToThread
        from twisted.python.filepath import FilePath

        from tests.test_page import ROOT, browserPaths, chromium, localExchange

        try:
            browserPaths()
        except AssertionError as e:
            self.fail(str(e))
        local, _ = await localExchange(self)
        assert local.store is not None
        mic = FilePath(self.mktemp())
        mic.setContent(wav(1.0))
        browser = chromium(mic.path)
        http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
        driver = await deferToThread(browser.__enter__)
        self.addCleanup(deferToThread, browser.__exit__, None, None, None)

        first = await deferToThread(_browse, driver, local.url, "signup")
        key = first["key"]
        self.assertTrue(key.startswith("pvx_"), key)
        self.assertEqual(first["keyId"], accountId(key)[:12])
        self.assertNotIn(key, first["afterReload"])
        self.assertEqual(first["cookieVisible"], "")  # HttpOnly

        # A request with the key, through the exchange's farm and node.
        response = await http.post(
            local.url + "/v1/audio/speech",
            json.dumps({"model": "tts-1", "input": "Hello from the account page.",
                        "voice": "alloy", "response_format": "wav"}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        speech = await response.content()
        self.assertEqual(response.code, 200, speech)
        # A volunteer farm's ledger: jobs a node with this key served.
        farm, _ = await local.store.createKey(reactor.seconds(), role="farm")
        now = reactor.seconds()
        records = [ledgerRecord(n, now - 40 + n, accountId(key), None) for n in range(3)]
        response = await http.post(
            local.url + "/v1/ledger", json.dumps({"transactions": records}).encode(),
            headers={"Authorization": f"Bearer {farm}", "Content-Type": "application/json"},
        )
        self.assertEqual(json.loads(await response.content()), {"recorded": 3, "duplicates": 0})
        # A node of the key's, enrolled, and held by a farm of the exchange.
        private = Ed25519PrivateKey.generate()
        identity = publicBytes(private.public_key())
        body = {"identity": encodeKey(identity), "proof": enrolmentProof(private, accountId(key))}
        response = await http.post(
            local.url + "/v1/enroll", json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 200, await response.content())
        await local.store.noteOnline(
            "farm-a", [(fingerprint(identity), accountId(key)[:12], 2)], reactor.seconds()
        )

        seen = await deferToThread(_browse, driver, local.url, "account", key)
        print(f"\naccount page: used {seen['used']}, earned {seen['earned']}; {seen['rate']}")
        self.assertEqual(seen["signedOut"], "Privox: Sign in")
        used = float(seen["used"].split()[0])
        self.assertGreater(used, 1.0)
        # Three jobs of 2 s each at whisper:tiny.en's cost: privox-local
        # sends every quality to it, up to xcribe2's 32 QSS a second.
        self.assertEqual(seen["earned"], "192")
        # This hour's bar is the one with the use, and drawn.
        self.assertEqual(len(seen["usedBars"]), 24)
        self.assertLess(abs(seen["usedBars"][-1][0] - used), 0.1)
        self.assertGreater(seen["usedBars"][-1][1], 50)
        self.assertIn("farm-a stt whisper:tiny.en 3 3 6.0 192", seen["nodes"])
        self.assertIn("serving", seen["nodes"])
        self.assertIn(fingerprint(identity), seen["enrolled"])
        self.assertIn("online: 2 connections at 1 farm", seen["enrolled"])
        self.assertEqual(len(seen["rows"]), 3)
        self.assertEqual(len(seen["producerRows"]), 3)
        self.assertTrue(all(" producer stt whisper:tiny.en 2.0 150 ok 64.0" in r
                            for r in seen["producerRows"]), seen["producerRows"])
        self.assertEqual(seen["pager"], "Page 1 of 1 (3 in all)")
        self.assertIn("tts piper", seen["capacity"])
        # The volunteer farm's three, and the speech request's: the local
        # farm writes its own ledger into the store.
        self.assertIn("(4 jobs)", seen["rate"])
        self.assertEqual(seen["jobBars"][-1], 4)
        self.assertEqual(seen["scripts"], 0)
        self.assertEqual(seen["console"], [])
        for name in ("account-page.png", "about-page.png"):
            shot = FilePath(os.path.abspath(name))
            self.assertGreater(shot.getsize(), 10_000)
            if os.environ.get("PRIVOX_UPDATE_SCREENSHOT") == "1":
                ROOT.child("docs").child(name).setContent(shot.getContent())
