"""
Key policies: how a farm decides whether a peer's key lets it in.

Producers and consumers each get their own L{KeyPolicy}. Three kinds exist:

  - L{OpenPolicy} lets everyone in;
  - L{AllowListPolicy} checks against a fixed set of keys read from a file
    once, at start-up;
  - L{URLPolicy} asks an HTTP validation endpoint, as the original Privox
    network did (by C{GET}, the key in the URL, where the URL has a
    C{{key}} placeholder), and caches the answers for a short while.

L{policyFromSpec} turns a command-line/config string into one of them.

Keys are secrets: nothing here logs a key or puts one in a description.
Use L{keyId} when a log line needs to tell keys apart.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from hashlib import sha256
from typing import Any, NoReturn, Protocol
from urllib.parse import quote, urlsplit

import treq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

log = Logger()

#: How many distinct keys L{URLPolicy} remembers answers for.
DEFAULT_CACHE_SIZE = 10_000

#: Where a validation URL takes the key, for endpoints asked by C{GET}.
KEY_PLACEHOLDER = "{key}"

# A plain ASCII decimal integer, optionally signed. int() alone would also
# take "1_000" and non-ASCII digits, which no validation server means to send.
_INTEGER = re.compile(r"[+-]?[0-9]+")


def keyId(key: str) -> str:
    """
    A short, stable, non-reversible name for C{key}, for log lines.

    @return: the first 12 hex digits of the SHA-256 of the UTF-8 key.
    """
    return accountId(key)[:12]


def accountId(key: str) -> str:
    """
    The name an account store and the ledger know C{key} by: the SHA-256 of
    the UTF-8 key, 64 hex digits. Stores keep this, never the key; its first
    12 digits are the key's L{keyId}.
    """
    return sha256(key.encode("utf-8")).hexdigest()


class KeyPolicyError(ValueError):
    """
    A key policy could not be built from its configuration.
    """


class KeyPolicy(Protocol):
    """
    Decides whether a peer presenting a key may join the farm.
    """

    #: Short human-readable summary for log lines. Never contains a key.
    description: str

    def check(self, key: str) -> Deferred[bool]:
        """
        @return: a L{Deferred} firing C{True} to admit the peer, C{False} to
            refuse it. It does not fail: trouble checking means C{False}.
        """
        ...


class HTTPClient(Protocol):
    """
    The part of the C{treq} API L{URLPolicy} uses (C{treq} itself, or
    C{treq.testing.StubTreq} in tests).
    """

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]: ...

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]: ...


class OpenPolicy:
    """
    Accept every key, including the empty one.
    """

    description = "open"

    def check(self, key: str) -> Deferred[bool]:
        return succeed(True)


class AllowListPolicy:
    """
    Accept exactly the keys in a fixed set (normally read by L{fromFile}).
    The empty key is never accepted.
    """

    def __init__(self, path: FilePath[str] | str, keys: frozenset[str]) -> None:
        self.path = path if isinstance(path, FilePath) else FilePath(path)
        # Dropping "" here is what makes the empty key always fail.
        self.keys = frozenset(keys) - {""}
        self.description = f"allow-list file ({len(self.keys)} keys)"

    @classmethod
    def fromFile(cls, path: FilePath[str] | str) -> AllowListPolicy:
        """
        Read an allow-list file: UTF-8 text, one key per line. Surrounding
        whitespace is stripped; blank lines and lines starting with C{#} are
        ignored.

        This reads the file synchronously, so call it while configuring,
        before the reactor runs. The file is not re-read afterwards.

        @raise KeyPolicyError: the file is missing, unreadable or not UTF-8.
        """
        fp = path if isinstance(path, FilePath) else FilePath(path)
        try:
            raw = fp.getContent()
        except OSError as e:
            raise KeyPolicyError(
                f"cannot read key allow-list file {fp.path!r}: "
                f"{e.strerror or e}"
            ) from e
        try:
            # utf-8-sig: tolerate the BOM some editors put at the start, which
            # would otherwise silently become part of the first key.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise KeyPolicyError(
                f"key allow-list file {fp.path!r} is not valid UTF-8 "
                f"(byte offset {e.start})"
            ) from e
        keys = frozenset(
            stripped
            for stripped in (line.strip() for line in text.splitlines())
            if stripped and not stripped.startswith("#")
        )
        if not keys:
            log.warn(
                "key allow-list file {path} has no keys; every peer will be "
                "refused",
                path=fp.path,
            )
        return cls(fp, keys)

    def check(self, key: str) -> Deferred[bool]:
        return succeed(key in self.keys)


class _ValidationError(Exception):
    """
    The validation endpoint answered, but not with something we understand.
    Messages never include the response body, which might echo the key.
    """


class URLPolicy:
    """
    Ask an HTTP endpoint about each key.

    The key is POSTed as a C{key=...} form body (not in the query string, so
    it stays out of access logs), unless C{url} holds L{KEY_PLACEHOLDER}:
    then the key, URL-quoted, takes its place and the check is a C{GET}
    without a body, as the original network's endpoints expect
    (C{https://host/cgi-bin/validate?key={key}}). The stripped response
    body must be an integer: positive admits, zero or negative refuses.
    Anything else -- a connection error, a non-2xx status, a body that is
    not an integer, no answer within C{timeoutSeconds} -- refuses and logs a
    warning.

    Answers (both yes and no) are cached per key for C{cacheSeconds}, so a
    flapping peer doesn't hammer the endpoint. Errors are not cached, so one
    hiccup doesn't lock a good key out for the whole TTL.

    With C{bearer} (a farm's own key), every request carries
    C{Authorization: Bearer BEARER}, so the endpoint knows which farm asks.
    """

    def __init__(
        self,
        url: str,
        httpClient: HTTPClient,
        clock: IReactorTime,
        cacheSeconds: float = 30.0,
        timeoutSeconds: float = 5.0,
        maxCacheEntries: int = DEFAULT_CACHE_SIZE,
        bearer: str | None = None,
    ) -> None:
        self.url = url
        self._byGet = KEY_PLACEHOLDER in url
        self._headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        self._httpClient = httpClient
        self._clock = clock
        self._cacheSeconds = cacheSeconds
        self._timeoutSeconds = timeoutSeconds
        self._maxCacheEntries = maxCacheEntries
        # sha256(key) digest -> (expiry time, answer). Keyed by digest so the
        # long-lived process doesn't hold every key it has seen in memory.
        # Insertion-ordered, so the first entry is the oldest.
        self._cache: OrderedDict[bytes, tuple[float, bool]] = OrderedDict()
        # The template's, never a URL with the key in it.
        self._safeURL = withoutSecrets(url)
        how = " (GET)" if self._byGet else ""
        self.description = f"validation URL {self._safeURL}{how}"

    def check(self, key: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._check(key))

    async def _check(self, key: str) -> bool:
        if not key:
            return False
        digest = sha256(key.encode("utf-8")).digest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        try:
            accepted = await self._ask(key)
        except CancelledError:
            # Our caller gave up (not a timeout: that arrives as
            # TimeoutError); let them see their own cancellation.
            raise
        except Exception as e:
            log.warn(
                "key validation at {url} failed for key {keyId}: {why}",
                url=self._safeURL,
                keyId=keyId(key),
                why=webReason(e),
            )
            return False
        self._remember(digest, accepted)
        return accepted

    def _ask(self, key: str) -> Deferred[bool]:
        # The timeout covers reading the body too, not just the headers (as
        # treq's own timeout would), and runs on the injected clock so tests
        # can drive it.
        exchange = Deferred.fromCoroutine(self._exchange(key))
        exchange.addTimeout(
            self._timeoutSeconds, self._clock, onTimeoutCancel=_timedOut
        )

        # A cancelled HTTP request fails with a wrapper (ResponseNeverReceived
        # and friends), not CancelledError. Remember that it was our caller
        # who cancelled so they get a CancelledError, not a logged refusal.
        cancelled = False

        def cancel(_: Deferred[bool]) -> None:
            nonlocal cancelled
            cancelled = True
            exchange.cancel()

        def translate(failure: Failure) -> Failure:
            if cancelled:
                raise CancelledError()
            return failure

        result: Deferred[bool] = Deferred(cancel)
        exchange.addErrback(translate).chainDeferred(result)
        return result

    async def _exchange(self, key: str) -> bool:
        headers = {} if self._headers is None else {"headers": self._headers}
        if self._byGet:
            # safe="": a "/", "&", "?" or "#" in a key stays part of the key.
            url = self.url.replace(KEY_PLACEHOLDER, quote(key, safe=""))
            response = await self._httpClient.get(url, **headers)
        else:
            # A dict for data= makes treq send application/x-www-form-urlencoded.
            response = await self._httpClient.post(self.url, data={"key": key}, **headers)
        body = await treq.content(response)
        if not 200 <= response.code < 300:
            raise _ValidationError(f"HTTP status {response.code}")
        try:
            text = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _ValidationError("response body is not an integer") from None
        if _INTEGER.fullmatch(text) is None:
            raise _ValidationError("response body is not an integer")
        return int(text) > 0

    def _cached(self, digest: bytes) -> bool | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        expires, accepted = entry
        if self._clock.seconds() >= expires:
            del self._cache[digest]
            return None
        return accepted

    def _remember(self, digest: bytes, accepted: bool) -> None:
        # Re-inserting moves the key to the end, so "oldest" means
        # least-recently stored.
        self._cache.pop(digest, None)
        self._cache[digest] = (self._clock.seconds() + self._cacheSeconds, accepted)
        while len(self._cache) > self._maxCacheEntries:
            self._cache.popitem(last=False)


def withoutSecrets(url: str) -> str:
    """
    C{scheme://host[:port]/path} of C{url}: no user-info, query or fragment,
    any of which might carry a credential for the validation endpoint.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _timedOut(result: object, timeout: float) -> NoReturn:
    """
    C{onTimeoutCancel} for L{Deferred.addTimeout}: whatever the cancelled
    request failed with, report it as a timeout.
    """
    raise TimeoutError(f"no answer within {timeout:g} seconds")


def webReason(e: BaseException) -> str:
    """
    A one-line reason for a validation failure, for the warning.
    """
    reasons = getattr(e, "reasons", None)  # twisted.web's wrapper exceptions
    if isinstance(reasons, list) and reasons:
        message = "; ".join(
            r.getErrorMessage() if isinstance(r, Failure) else str(r)
            for r in reasons
        )
    else:
        message = str(e)
    name = type(e).__name__
    return f"{name}: {message}" if message else name


def policyFromSpec(
    spec: str,
    *,
    reactor: IReactorTime,
    httpClient: HTTPClient | None = None,
    bearer: str | None = None,
) -> KeyPolicy:
    """
    Build a policy from a configuration string:

      - C{"open"}: L{OpenPolicy};
      - C{"http://..."} or C{"https://..."}: L{URLPolicy} for that URL (a
        C{GET} with the key in place of C{{key}} where the URL has one, else
        a C{POST}), using C{httpClient} (default: the C{treq} module) and
        C{reactor} as clock, sending C{bearer} (if any) as
        C{Authorization: Bearer};
      - anything else: the path of an allow-list file, see
        L{AllowListPolicy.fromFile}.

    @raise KeyPolicyError: an allow-list file cannot be read.
    """
    if spec == "open":
        return OpenPolicy()
    if spec.lower().startswith(("http://", "https://")):
        client: HTTPClient = httpClient if httpClient is not None else treq
        return URLPolicy(spec, client, reactor, bearer=bearer)
    return AllowListPolicy.fromFile(spec)
