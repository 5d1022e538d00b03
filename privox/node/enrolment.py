"""
A node's identity, and its enrolment with its exchange (L{privox.identity}).

A node that names its exchange (C{--exchange URL}, the API's base URL, and
C{--exchange-key}, the exchange's public key as C{GET URL/v1/exchange}
gives it) keeps a long-term Ed25519 identity key in its state directory
(L{loadIdentity}: C{identity.key}, mode 0600, the same across restarts)
and has the exchange vouch for it: L{Enrolment} asks for a certificate
(C{POST URL/v1/enroll}, its producer key as the Bearer token), renews it at
half its lifetime, retries with backoff while the exchange cannot be
reached and slowly once it refused. A certificate not signed by the pinned
key is refused: a wrong URL, or something posing as the exchange.

While it holds a good certificate, L{Enrolment.offer} gives each farm
connection a fresh key to seal with (L{privox.sealing.Sealer}); without
one, the node takes only unsealed jobs.

Logs name the node by its identity's fingerprint, and its key by its key
id; never a key.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Awaitable, Callable, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.identity import (
    Certificate,
    ConnectionOffer,
    IdentityError,
    encodeKey,
    enrolmentProof,
    fingerprint,
    loadOrCreateKey,
    publicBytes,
)
from privox.keys import accountId, webReason, withoutSecrets

log = Logger()

#: The state directory by default (relative to the working directory).
DEFAULT_STATE_DIR = "privox-node-state"
#: The identity key's file in the state directory.
IDENTITY_FILE = "identity.key"
#: Waits between tries while the exchange cannot be reached: 1 s, doubling
#: to this.
RETRY_MAX = 300.0
#: The wait after the exchange refused (or answered a certificate that is
#: not its own): a key being fixed, or revoked for good.
REFUSED_RETRY = 900.0
#: The soonest a certificate is renewed.
MIN_RENEWAL = 30.0
#: Seconds an enrolment request may take.
REQUEST_TIMEOUT = 30.0

#: Asks the exchange for a certificate of an identity (its public key's
#: raw bytes): fires with the certificate's text.
Enrol = Callable[[bytes], Awaitable[str]]


class IdentityFileError(Exception):
    """
    The identity key cannot be read or made; the message is one line.
    """


class EnrolmentRefused(Exception):
    """
    The exchange said no (an unknown or revoked key, or no such route):
    trying again soon will not help.
    """


class EnrolmentFailed(Exception):
    """
    No certificate this time (an error, an answer that is not one): try
    again.
    """


def loadIdentity(stateDir: str) -> tuple[Ed25519PrivateKey, bool]:
    """
    The node's identity key, in C{stateDir}, made there (mode 0600) at first.

    @return: the key, and whether it was made now.
    @raise IdentityFileError: it cannot be read or made.
    """
    path = os.path.join(stateDir, IDENTITY_FILE)
    made = not os.path.lexists(path)
    try:
        return loadOrCreateKey(path), made
    except OSError as e:
        raise IdentityFileError(
            f"cannot read or make the node's identity key {path}: {e.strerror or e}"
        ) from None
    except IdentityError:
        raise IdentityFileError(f"the identity key file {path} holds no Ed25519 key") from None


def httpEnrol(
    url: str, key: str, identity: Ed25519PrivateKey, clock: IReactorTime, http: Any = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Enrol:
    """
    Enrolment over HTTP: C{POST URL/v1/enroll} with C{key} as the Bearer
    token, and C{identity}'s proof that it is the node's (no other key can
    enrol it). C{http}: treq or its like (C{StubTreq} in tests).

    @raise EnrolmentRefused: 401, 403 or 404.
    @raise EnrolmentFailed: no answer in C{timeout} seconds, another
        status, or no certificate in the answer.
    """
    target = url.rstrip("/") + "/v1/enroll"
    if http is None:
        import treq as http

    proof = enrolmentProof(identity, accountId(key))

    async def post(public: bytes) -> tuple[int, bytes]:
        response = await http.post(
            target,
            json={"identity": encodeKey(public), "proof": proof},
            headers={"Authorization": f"Bearer {key}"},
        )
        return response.code, await response.content()

    def timedOut(result: object, timeout: float) -> NoReturn:
        raise EnrolmentFailed(f"no answer within {timeout:g} s")

    async def enrol(identity: bytes) -> str:
        d = Deferred.fromCoroutine(post(identity))
        d.addTimeout(timeout, clock, onTimeoutCancel=timedOut)
        try:
            code, body = await d
        except (CancelledError, EnrolmentFailed):
            raise  # stopping; or the timeout
        except Exception as e:
            raise EnrolmentFailed(webReason(e)) from None
        answer = _json(body)
        if code == 200:
            certificate = answer.get("certificate")
            if not isinstance(certificate, str):
                raise EnrolmentFailed("HTTP 200 without a certificate")
            return certificate
        error = answer.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        reason = f"HTTP {code}" + (f": {' '.join(str(message).split())[:200]}" if message else "")
        if code == 404:
            raise EnrolmentRefused(f"{reason} (is {withoutSecrets(url)} the API's base URL?)")
        if code in (401, 403):
            raise EnrolmentRefused(reason)
        raise EnrolmentFailed(reason)

    return enrol


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Enrolment(Service):
    """
    A node's certificate from its exchange, renewed: a
    L{privox.sealing.Sealer}.

    @param identity: the node's identity key (L{loadIdentity}).
    @param exchange: the exchange's pinned public key; a certificate not
        signed by it is refused.
    @param enrol: asks the exchange for a certificate (L{httpEnrol}; in
        C{privox-local}, the exchange itself).
    @param where: the exchange, for log lines (its URL without secrets).
    @param account: the key id the node enrols with, for log lines.
    @param jitter: seconds added to each wait while the exchange cannot be
        reached (0 to 1 by default).
    """

    def __init__(
        self,
        identity: Ed25519PrivateKey,
        exchange: Ed25519PublicKey | None,
        enrol: Enrol,
        clock: IReactorTime,
        where: str = "the exchange",
        account: str | None = None,
        retryMax: float = RETRY_MAX,
        refusedRetry: float = REFUSED_RETRY,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._identity = identity
        self.public = publicBytes(identity.public_key())
        self.fingerprint = fingerprint(self.public)
        #: The exchange's key; L{None} until the node has learnt it
        #: (privox.node.exchangekey), and then it is started.
        self.exchange = exchange
        self._enrol = enrol
        self._clock = clock
        self.where = where
        self.account = account
        # Jitter: nodes that lost their exchange together do not all come
        # back at once.
        self._backoff = backoffPolicy(
            initialDelay=1.0, maxDelay=retryMax, factor=2.0, jitter=jitter
        )
        self._refusedRetry = refusedRetry
        self._failures = 0
        self._certificate: Certificate | None = None
        self._saidExpired = False
        self._call: Any = None
        self._attempt: Deferred[None] | None = None
        self._tried: list[Deferred[None]] | None = []
        self._renewed: list[Callable[[], None]] = []

    @property
    def certificate(self) -> Certificate | None:
        """
        The certificate held now, if it is still good.
        """
        certificate = self._certificate
        if certificate is None or self._clock.seconds() >= certificate.expires:
            return None
        return certificate

    def offer(self, farm: str | None = None) -> tuple[X25519PrivateKey, ConnectionOffer] | None:
        """
        A fresh connection key and its offer (bound to the farm of key id
        C{farm}, if given), or L{None} while this node holds no good
        certificate.
        """
        certificate = self.certificate
        if certificate is None:
            if self._certificate is not None and not self._saidExpired:
                self._saidExpired = True
                log.warn(
                    "node {node}: its certificate has expired; new farm connections take"
                    " only unsealed jobs until it enrols again",
                    node=self.fingerprint,
                )
            return None
        return ConnectionOffer.make(self._identity, certificate, farm)

    def whenRenewed(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} each time a new certificate is held: connections
        made before it offer an older one (or none), and should be made
        again.
        """
        self._renewed.append(callback)

    def tried(self) -> Deferred[None]:
        """
        Fires once the first enrolment has been tried, whatever came of it
        (now, if it has).
        """
        if self._tried is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._tried.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        log.info(
            "node identity {node}: enrolling with {where}",
            node=self.fingerprint,
            where=self.where,
        )
        self._try()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._attempt is not None:
            self._attempt.cancel()

    def _try(self) -> None:
        self._call = None
        self._attempt = Deferred.fromCoroutine(self._once())

    def _later(self, delay: float) -> None:
        if self.running:
            self._call = self._clock.callLater(delay, self._try)

    async def _once(self) -> None:
        try:
            await self._get()
        except CancelledError:
            return  # stopping
        finally:
            self._attempt = None
            tried, self._tried = self._tried, None
            for d in tried or ():
                d.callback(None)

    async def _get(self) -> None:
        try:
            text = await self._enrol(self.public)
        except CancelledError:
            raise
        except EnrolmentRefused as e:
            log.error(
                "{where} refused to enrol node {node} (key {keyId}): {why}; trying again"
                " in {delay:.0f} s",
                where=self.where,
                node=self.fingerprint,
                keyId=self.account,
                why=str(e),
                delay=self._refusedRetry,
            )
            self._later(self._refusedRetry)
            return
        except Exception as e:
            delay = self._backoff(self._failures)
            self._failures += 1
            log.warn(
                "cannot enrol with {where}: {why}; trying again in {delay:.1f} s",
                where=self.where,
                why=str(e) if isinstance(e, EnrolmentFailed) else webReason(e),
                delay=delay,
            )
            self._later(delay)
            return
        now = self._clock.seconds()
        try:
            assert self.exchange is not None  # started once it is known
            certificate = Certificate.verify(text, self.exchange, now)
            if certificate.identity != self.public:
                raise IdentityError("the certificate names another node")
        except IdentityError as e:
            log.error(
                "{where} answered a certificate this node refuses ({why}): a wrong"
                " --exchange URL, or not the exchange whose key --exchange-key pins;"
                " trying again in {delay:.0f} s",
                where=self.where,
                why=str(e),
                delay=self._refusedRetry,
            )
            self._later(self._refusedRetry)
            return
        self._certificate = certificate
        self._saidExpired = False
        self._failures = 0
        lifetime = min(certificate.expires - certificate.issued, certificate.expires - now)
        renewal = max(MIN_RENEWAL, lifetime / 2)
        log.info(
            "node {node} enrolled with {where} (account {account}): certificate good for"
            " {hours:.1f} h, renewed in {renewal:.0f} s",
            node=self.fingerprint,
            where=self.where,
            account=certificate.account[:12],
            hours=(certificate.expires - now) / 3600,
            renewal=renewal,
        )
        self._later(renewal)
        for callback in list(self._renewed):
            callback()
