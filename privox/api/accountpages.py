"""
The account pages, for people in a browser: C{/signup} (a new key, shown
once), C{/signin} and C{/signout} (the key kept in a cookie), C{/account}
(allowance, use and credit, an hourly chart of the last day, what the key's
nodes served, its ledger records) and C{/about} (the network's capacity).

Rendered on the server with C{twisted.web.template}, charts as inline SVG:
no script, nothing from elsewhere. The key lives in a cookie that is
HttpOnly, SameSite=Strict (so no other site can post a form with it) and
Secure over TLS. Behind reverse proxies named in C{--trusted-proxies}, the
client and its TLS are what they say (L{privox.api.proxies}).

Privacy: a page shows only the signed-in key's own figures and its key id,
never another account, an address or content. Sign-ups are limited per
client by an HMAC of its address under a secret made at start (kept in
memory only; the address itself is neither stored nor logged).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, flattenString, tags

from privox.accounts.store import AccountStore
from privox.api import forms
from privox.api.access import Access
from privox.api.errors import Unauthorized
from privox.api.pages import static
from privox.api.proxies import TrustedProxies
from privox.api.site import FORM_LIMIT
from privox.cached import Cached

log = Logger()

#: The cookie that holds the signed-in key.
KEY_COOKIE = b"privox_key"
#: The cookie that names a new key waiting to be shown (once).
REVEAL_COOKIE = b"privox_new"
#: Sign-ups one client may make per L{SIGNUP_PERIOD}, and all clients.
SIGNUPS_PER_CLIENT = 3
SIGNUPS_IN_ALL = 100
SIGNUP_PERIOD = 3600.0
#: Seconds a new key waits to be shown, and how long ago a producer's
#: latest job makes it "serving now".
REVEAL_FOR = 600.0
ONLINE_WITHIN = 600.0
#: How long a farm's word that a node is connected holds (farms say it each
#: time they register: every minute by default).
ONLINE_SAID = 300.0
#: Seconds /about's figures are kept: a day of the ledger is counted at
#: most this often, however often the page is asked for.
ABOUT_FRESH = 10.0
#: Ledger records per page.
PAGE_SIZE = 20

_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src data:;"
    b" form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class SignupLimiter:
    """
    Sign-ups per client and in all, over a sliding period. A client is an
    HMAC of its address under a secret that lives only in this process.
    """

    def __init__(
        self, perClient: int = SIGNUPS_PER_CLIENT, inAll: int = SIGNUPS_IN_ALL,
        period: float = SIGNUP_PERIOD, secret: bytes | None = None,
    ) -> None:
        self.perClient = perClient
        self.inAll = inAll
        self.period = period
        self._secret = secret or secrets.token_bytes(32)
        self._clients: dict[bytes, deque[float]] = {}
        self._all: deque[float] = deque()

    def _client(self, address: str) -> bytes:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            pass
        else:
            if ip.version == 6:
                # One client is one /64: a host has a whole one to pick from.
                address = str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return hmac.new(self._secret, address.encode("utf-8", "replace"), hashlib.sha256).digest()[:16]

    def _forget(self, now: float) -> None:
        while self._all and self._all[0] <= now - self.period:
            self._all.popleft()
        for client in [c for c, times in self._clients.items() if times[-1] <= now - self.period]:
            del self._clients[client]

    def admit(self, address: str, now: float) -> float | None:
        """
        Count a sign-up from C{address} if it is allowed.

        @return: L{None} if it is (and it is counted), else the seconds
            until one would be.
        """
        self._forget(now)
        times = self._clients.get(self._client(address), deque())
        while times and times[0] <= now - self.period:
            times.popleft()
        waits = []
        if len(times) >= self.perClient:
            waits.append(times[0] + self.period - now)
        if len(self._all) >= self.inAll:
            waits.append(self._all[0] + self.period - now)
        if waits:
            return max(1.0, max(waits))
        times.append(now)
        self._clients[self._client(address)] = times
        self._all.append(now)
        return None


def _seeOther(request: IRequest, where: bytes) -> bytes:
    """
    Answer a form's POST with a redirect to the page C{where}.
    """
    request.setResponseCode(303)
    request.setHeader(b"Location", where)
    return b""


def _fromHere(request: IRequest) -> bool:
    """
    Whether a POST came from this site's own pages. A browser that says
    where a request comes from (C{Sec-Fetch-Site}) must say here; else an
    C{Origin} must be this host (pages sent with no referrer make it
    C{null}, as for a form of ours); one that says nothing (curl, an old
    browser) is taken at its word.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site in (b"same-origin", b"none")
    origin = request.getHeader(b"origin")
    if origin is None or origin == b"null":
        return True
    host = request.getHeader(b"host") or b""
    return origin.split(b"://", 1)[-1] == host


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def _figure(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def barChart(
    title: str, hours: list[float], series: list[tuple[str, str, list[float]]], unit: str
) -> Tag:
    """
    An SVG bar chart: one group of bars per hour (C{hours}: their starts),
    one bar per series C{(name, colour, values)}; a legend, the scale's top
    and hour marks every six hours. Each bar has a C{<title>} with its
    figure, for a pointer and for screen readers.
    """
    width, height, left, bottom, top = 640, 200, 72, 24, 12
    plot = height - bottom - top
    peak = max([v for _, _, values in series for v in values] + [0.0])
    scale = peak if peak > 0 else 1.0
    slot = (width - left - 4) / max(1, len(hours))
    bar = max(1.0, (slot - 2) / max(1, len(series)))
    svg = Tag("svg")(
        xmlns="http://www.w3.org/2000/svg", viewBox=f"0 0 {width} {height}",
        role="img", width="100%", **{"class": "chart", "aria-label": title},
    )
    svg(Tag("title")(title))
    svg(Tag("line")(x1=str(left), y1=str(top + plot), x2=str(width), y2=str(top + plot),
                    stroke="#8a8a94"))
    svg(Tag("text")(f"{_figure(peak)} {unit}", x=str(left - 4), y=str(top + 8),
                    **{"text-anchor": "end", "font-size": "11"}))
    svg(Tag("text")("0", x=str(left - 4), y=str(top + plot),
                    **{"text-anchor": "end", "font-size": "11"}))
    for n, start in enumerate(hours):
        x = left + n * slot
        for k, (name, colour, values) in enumerate(series):
            value = values[n]
            h = plot * value / scale
            svg(Tag("rect")(
                Tag("title")(f"{_when(start)}: {_figure(value)} {unit} {name}"),
                x=f"{x + 1 + k * bar:.1f}", y=f"{top + plot - h:.1f}", width=f"{bar:.1f}",
                height=f"{h:.1f}", fill=colour,
                **{"data-series": name, "data-value": f"{value:g}"},
            ))
        if n % 6 == 0 or n == len(hours) - 1:
            label = time.strftime("%H:00", time.gmtime(start))
            svg(Tag("text")(label, x=f"{x + slot / 2:.1f}", y=str(height - 6),
                            **{"text-anchor": "middle", "font-size": "11"}))
    legend = tags.p(**{"class": "legend"})
    for name, colour, values in series:
        legend(tags.span(style=f"background:{colour}", **{"class": "swatch"}), f" {name} ",
               f"({_figure(sum(values))} {unit} in all) ")
    return tags.figure(svg, legend)


class AccountPages:
    """
    The pages' handlers, each C{(request, done) -> body}, for
    L{privox.api.app.PrivoxAPI} to route.

    @param store: the account store, or L{None} (C{--accounts none}: then
        there is no sign-up and no account page).
    @param status: fires with the API's status report (farms and their
        load).
    @param proxies: the reverse proxies whose word on the client's
        address and TLS is taken (none by default).
    """

    def __init__(
        self, store: AccountStore | None, access: Access, clock: Any,
        status: Callable[[], Awaitable[dict[str, Any]]],
        limiter: SignupLimiter | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        self.store = store
        self.access = access
        self.clock = clock
        self.status = status
        self.limiter = limiter or SignupLimiter()
        self.proxies = proxies if proxies is not None else TrustedProxies()
        #: How long a farm's word that a node is connected holds: a few of
        #: its registrations (privox-api sets it from --farm-refresh).
        self.onlineSaid = ONLINE_SAID
        #: /about's figures, shared by whoever asks within ABOUT_FRESH s.
        self.network: Cached[list[Any]] = Cached(clock, ABOUT_FRESH, self._network)
        #: New keys waiting to be shown once: token -> (key, until when).

    # -- rendering --------------------------------------------------------

    async def _page(self, request: IRequest, title: str, *body: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", _CSP)
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        signedIn = request.getCookie(KEY_COOKIE) is not None
        nav = tags.nav(
            tags.a("Privox", href="/"), " · ", tags.a("about the network", href="/about"), " · ",
            tags.a("your account", href="/account") if signedIn else tags.a("sign in", href="/signin"),
            " · ", tags.a("sign up", href="/signup"),
        )
        if signedIn:
            nav(" · ", tags.form(tags.button("Sign out", type="submit"),
                                 method="post", action="/signout", **{"class": "inline"}))
        content = await flattenString(None, tags.body(nav, tags.h1(title), *body))
        head = (
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>Privox: {title}</title><link rel=icon href='data:,'>"
            f"<style>{static('style.css')}{static('account.css')}</style></head>"
        )
        return head.encode("utf-8") + content + b"</html>"

    def _secure(self, request: IRequest) -> bool:
        """
        Whether the browser reached us over TLS (its cookies then Secure).
        """
        return self.proxies.ofRequest(request).secure

    def _setKey(self, request: IRequest, key: str) -> None:
        request.addCookie(
            KEY_COOKIE, key.encode("utf-8"), path=b"/", httpOnly=True,
            secure=self._secure(request), sameSite="strict",
        )

    def _clear(self, request: IRequest, name: bytes, path: bytes = b"/") -> None:
        request.addCookie(
            name, b"", path=path, httpOnly=True, secure=self._secure(request), sameSite="strict",
            expires=b"Thu, 01 Jan 1970 00:00:00 GMT",
        )

    async def _unavailable(self, request: IRequest, title: str) -> bytes:
        request.setResponseCode(404)
        return await self._page(
            request, title,
            tags.p("This API keeps no accounts (it runs with --accounts none): there is"
                   " no sign-up and no account page here.", **{"class": "error"}),
        )

    async def _crossSite(self, request: IRequest, title: str) -> bytes | None:
        """
        The refusal of a form another site had a browser post (signing
        someone in as another, out, or up); L{None} for one of ours.
        """
        if _fromHere(request):
            return None
        request.setResponseCode(403)
        return await self._page(
            request, title,
            tags.p("This form was sent from another site; use this one's.", **{"class": "error"}),
        )

    def _form(self, request: IRequest) -> forms.Fields:
        size = forms.bodySize(request, FORM_LIMIT)
        return forms.readForm(request, size)

    # -- sign-up ----------------------------------------------------------

    async def signup(self, request: IRequest, done: Any) -> bytes:
        if self.store is None:
            return await self._unavailable(request, "Sign up")
        if request.method == b"POST":
            return await self._crossSite(request, "Sign up") or await self._createKey(request)
        return await self._page(
            request, "Sign up",
            tags.p("A key of your own: its allowance is its own, and your nodes' work earns it"
                   " more. The exchange keeps only a hash of it; it is shown to you once."),
            tags.form(tags.button("Make me a key", type="submit"), method="post", action="/signup"),
        )

    async def _createKey(self, request: IRequest) -> bytes:
        assert self.store is not None
        # The client behind any trusted proxy; hashed by the limiter, never logged.
        address = self.proxies.ofRequest(request).address
        wait = self.limiter.admit(address, self.clock.seconds())
        if wait is not None:
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", str(int(wait + 0.999)).encode("ascii"))
            return await self._page(
                request, "Sign up",
                tags.p(f"Too many sign-ups just now: try again in {int(wait // 60) + 1} minutes.",
                       **{"class": "error"}),
            )
        key, account = await self.store.createKey(self.clock.seconds(), label="signed up")
        log.info("signed up key {keyId}", keyId=account.keyId)
        self._setKey(request, key)
        # Only a flag: the key itself is in its own cookie, so any API
        # server of the exchange shows it, once, and none keeps it.
        request.addCookie(REVEAL_COOKIE, b"1", path=b"/account", httpOnly=True,
                          secure=self._secure(request), sameSite="strict",
                          max_age=str(int(REVEAL_FOR)))
        # Post/redirect/get: reloading the account page shows no key and
        # makes none.
        return _seeOther(request, b"/account")

    # -- signing in and out ----------------------------------------------

    async def signin(self, request: IRequest, done: Any) -> bytes:
        if self.store is None:
            return await self._unavailable(request, "Sign in")
        message = None
        if request.method == b"POST":
            refused = await self._crossSite(request, "Sign in")
            if refused is not None:
                return refused
            key = self._form(request).text("key")
            try:
                if not key:
                    raise Unauthorized("no key")
                await self.access.authorize(key)
            except Unauthorized:
                request.setResponseCode(403)
                message = "That key was not accepted (unknown, revoked, or not a user key)."
            else:
                assert key is not None
                self._setKey(request, key)
                return _seeOther(request, b"/account")
        return await self._signinForm(request, message)

    async def _signinForm(self, request: IRequest, message: str | None) -> bytes:
        return await self._page(
            request, "Sign in",
            tags.p(message, **{"class": "error"}) if message else "",
            tags.form(
                tags.label("Your key ", tags.input(type="password", name="key", id="key",
                                                   autocomplete="off", required="required")),
                tags.button("Sign in", type="submit", id="signin"),
                method="post", action="/signin",
            ),
            tags.p("No key yet? ", tags.a("Sign up", href="/signup"), "."),
        )

    async def signout(self, request: IRequest, done: Any) -> bytes:
        refused = await self._crossSite(request, "Sign out")
        if refused is not None:
            return refused
        self._clear(request, KEY_COOKIE)
        return _seeOther(request, b"/signin")

    # -- the account page -------------------------------------------------

    async def account(self, request: IRequest, done: Any) -> bytes:
        if self.store is None:
            return await self._unavailable(request, "Your account")
        cookie = request.getCookie(KEY_COOKIE)
        key = cookie.decode("utf-8", "replace") if cookie else ""
        try:
            caller = await self.access.authorize(key) if key else None
        except Unauthorized:
            caller = None
        if caller is None or caller.account is None:
            if key:
                self._clear(request, KEY_COOKIE)
            return await self._signinForm(request, "Sign in to see your account." if key else None)
        store, account, now = self.store, caller.account, self.clock.seconds()
        standing = await self.access.standing(caller)
        hourly = await store.hourly(account, now)
        producing = await store.producing(account)
        enrolled = await store.enrolments(caller.keyId, now - self.onlineSaid)
        role = _choice(request, b"role", ("consumer", "producer"))
        service = _choice(request, b"service", ("stt", "tts"))
        page = _number(request, b"page")
        rows, total = await store.accountLedger(
            account, role, service, (page - 1) * PAGE_SIZE, PAGE_SIZE
        )
        body: list[Any] = []
        if request.getCookie(REVEAL_COOKIE) is not None:
            self._clear(request, REVEAL_COOKIE, b"/account")
            body.append(tags.div(
                tags.p("Your new key. Copy it now: it is not shown again, and the exchange"
                       " keeps only its hash."),
                tags.pre(key, id="new-key"), id="reveal", **{"class": "reveal"},
            ))
        body += [
            tags.p("Key id ", tags.code(standing["key_id"], id="key-id"),
                   f" · figures for the last {standing['window_seconds'] / 60:g} minutes"),
            tags.table(
                tags.tr(tags.th("allowance"), tags.th("used"), tags.th("earned (QSS)"),
                        tags.th("remaining")),
                tags.tr(*[tags.td(_figure(standing[k]) + ("" if k == "earned" else " s"), id=k)
                          for k in ("allowance", "used", "earned", "remaining")]),
                id="standing",
            ),
            tags.h2("The last 24 hours"),
            # Two charts: seconds used and QSS earned differ by a model's
            # cost (up to 32 times), so one scale would flatten the use.
            barChart("Audio seconds used per hour", [h for h, _, _ in hourly],
                     [("used", "#2a4fb0", [u for _, u, _ in hourly])], "s"),
            barChart("QSS earned per hour", [h for h, _, _ in hourly],
                     [("earned", "#2f9e5a", [e for _, _, e in hourly])], "QSS"),
            tags.h2("Your nodes"),
            _enrolled(enrolled, now),
            _producing(producing, now),
            tags.h2("Your transactions"),
            _filters(role, service),
            _ledger(rows, total, page),
            _pager(role, service, page, total),
        ]
        return await self._page(request, "Your account", *body)

    # -- the network ------------------------------------------------------

    async def about(self, request: IRequest, done: Any) -> bytes:
        return await self._page(request, "The network", *await self.network.get())

    async def _network(self) -> list[Any]:
        """
        The network's figures: the farms' status and a day of the ledger
        counted, at most every L{ABOUT_FRESH} seconds however often anyone
        asks (L{network}).
        """
        report = await self.status()
        now = self.clock.seconds()
        models: dict[tuple[str, str], list[int]] = {}
        up = 0
        for farm in report.get("farms", []):
            up += bool(farm.get("up"))
            for service, figures in ((farm.get("load") or {}).get("services") or {}).items():
                for model, counts in (figures.get("models") or {}).items():
                    row = models.setdefault((service, model), [0, 0, 0])
                    row[0] += 1
                    row[1] += int(counts.get("connected", 0))
                    row[2] += int(counts.get("idle", 0))
        body: list[Any] = [
            tags.p(f"{up} of {len(report.get('farms', []))} farms up.", id="farms-up"),
            tags.table(
                tags.tr(tags.th("service"), tags.th("model"), tags.th("farms"),
                        tags.th("producers online"), tags.th("idle")),
                *[tags.tr(tags.td(s), tags.td(m), *[tags.td(str(n)) for n in row])
                  for (s, m), row in sorted(models.items())],
                id="capacity",
            ) if models else tags.p("No farm reports its producers just now."),
        ]
        if self.store is None:
            body.append(tags.p("This API keeps no ledger, so it cannot count jobs."))
        else:
            lastHour = await self.store.jobsSince(now - 3600)
            lastMinute = await self.store.jobsSince(now - 60)
            perHour = await self.store.jobsPerHour(now)
            body += [
                tags.p(f"{lastMinute / 60:.2f} jobs per second in the last minute,"
                       f" {lastHour / 3600:.3f} in the last hour ({lastHour} jobs).", id="rate"),
                tags.h2("Jobs per hour, the last 24 hours"),
                barChart("Jobs per hour", [h for h, _ in perHour],
                         [("jobs", "#2a4fb0", [float(n) for _, n in perHour])], "jobs"),
            ]
        return body


def _choice(request: IRequest, name: bytes, allowed: tuple[str, ...]) -> str | None:
    value = (request.args.get(name) or [b""])[0].decode("utf-8", "replace")
    return value if value in allowed else None


def _number(request: IRequest, name: bytes) -> int:
    value = (request.args.get(name) or [b"1"])[0]
    return int(value) if value.isdigit() and 0 < int(value) < 1_000_000 else 1


def _query(role: str | None, service: str | None, page: int = 1) -> str:
    fields = {k: v for k, v in (("role", role), ("service", service)) if v}
    if page > 1:
        fields["page"] = str(page)
    return "/account" + ("?" + urlencode(fields) if fields else "")


def _enrolled(enrolled: list[dict[str, Any]], now: float) -> Tag:
    """
    The nodes enrolled under the key, and whether each is online now: the
    farms that joined the exchange (and privox-local's) say so as they
    register, for the nodes they let in by certificate
    (privox.farm.observe.onlineNodes); the exchange's own farms do not. A
    node renews its day-long certificate at half-life, so one whose
    certificate is good but that no such farm has is at the exchange's own
    farms, between farms, or stopped less than a day ago.
    """
    if not enrolled:
        return tags.p("No node has enrolled with this key yet.", id="enrolled")
    return tags.table(
        tags.tr(*[tags.th(h) for h in ("node", "first enrolled", "latest certificate",
                                      "good until", "now")]),
        *[
            tags.tr(
                tags.td(tags.code(e["node"])), tags.td(_when(e["first"])),
                tags.td(_when(e["last"])), tags.td(_when(e["expires"])),
                tags.td(_online(e, now)),
            )
            for e in enrolled
        ],
        id="enrolled",
    )


def _online(enrolment: dict[str, Any], now: float) -> str:
    farms, connections = int(enrolment["farms"]), int(enrolment["connections"])
    if farms:
        return (f"online: {connections} connection{'s' * (connections != 1)}"
                f" at {farms} farm{'s' * (farms != 1)}")
    return "enrolled, not connected" if enrolment["expires"] > now else "expired"


def _producing(producing: list[dict[str, Any]], now: float) -> Tag:
    if not producing:
        return tags.p("No job served by a node with your key is in the ledger yet. Run a node"
                      " with --key YOUR-KEY and its jobs earn this key QSS.", id="nodes")
    rows = [
        tags.tr(
            tags.td(p["farm"]), tags.td(p["service"]), tags.td(p["model"]),
            tags.td(str(int(p["jobs"]))), tags.td(str(int(p["ok"]))),
            tags.td(_figure(p["audio_seconds"])), tags.td(_figure(p["qss"])),
            tags.td(_when(p["last"])),
            tags.td("serving" if now - p["last"] <= ONLINE_WITHIN else "quiet"),
        )
        for p in producing
    ]
    return tags.div(
        tags.p("Producer sessions as the farms' ledger records them: a node counts as serving"
               " when its latest job ended in the last ten minutes."),
        tags.table(
            tags.tr(*[tags.th(h) for h in ("farm", "service", "model", "jobs", "ok",
                                          "audio s", "QSS", "latest job", "now")]),
            *rows,
        ),
        id="nodes",
    )


def _filters(role: str | None, service: str | None) -> Tag:
    def select(name: str, values: tuple[str, ...], chosen: str | None, every: str) -> Tag:
        options = [tags.option(every, value="")]
        for value in values:
            option = tags.option(value, value=value)
            if value == chosen:
                option(selected="selected")
            options.append(option)
        return tags.select(*options, name=name, id=f"filter-{name}")

    return tags.form(
        tags.label("as ", select("role", ("consumer", "producer"), role, "either")),
        tags.label("service ", select("service", ("stt", "tts"), service, "any")),
        tags.button("Show", type="submit", id="filter"),
        method="get", action="/account",
    )


def _ledger(rows: list[dict[str, Any]], total: int, page: int) -> Tag:
    if not rows:
        return tags.p("No transactions.", id="transactions")
    return tags.table(
        tags.tr(*[tags.th(h) for h in ("ended", "as", "service", "model", "audio s", "ms",
                                      "status", "QSS")]),
        *[tags.tr(
            tags.td(_when(float(r["at"]))), tags.td(r["role"]), tags.td(r["service"]),
            tags.td(r["model"]),
            tags.td("" if r["audio_seconds"] is None else _figure(float(r["audio_seconds"]))),
            tags.td(str(int(r["processing_ms"]))), tags.td(r["status"]),
            tags.td(_figure(float(r["qss"])) if r["role"] == "producer" else ""),
            **{"class": "transaction"},
        ) for r in rows],
        id="transactions",
    )


def _pager(role: str | None, service: str | None, page: int, total: int) -> Tag:
    pages = max(1, -(-total // PAGE_SIZE))
    pager = tags.p(f"Page {min(page, pages)} of {pages} ({total} in all)", id="pager")
    if page > 1:
        pager(" · ", tags.a("newer", href=_query(role, service, page - 1), rel="prev"))
    if page < pages:
        pager(" · ", tags.a("older", href=_query(role, service, page + 1), rel="next"))
    return pager
