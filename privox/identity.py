"""
Who a node is, vouched for by the exchange rather than by any farm.

  - The exchange has an Ed25519 signing key; the API holds it, publishes
    its public half, and node and API configurations pin that.
  - A node has a long-term Ed25519 identity key, made at its first start
    and kept (mode 0600) in its state directory.
  - A node enrols with its exchange (its producer key proves it may): the
    exchange answers a short-lived L{Certificate} of its identity.
  - On each connection to a farm a node makes a fresh X25519 key and offers
    it in its HELO, signed by its identity, with its certificate
    (L{ConnectionOffer}). A consumer given that offer with an assignment
    checks both signatures against the pinned exchange key before it seals
    anything for that node (L{privox.sealing}): a farm cannot put a key of
    its own in their place.
  - Farms that joined the exchange by themselves (strangers' machines) are
    shown no key: a node names none there and is let in by its
    certificate, and the API shows a L{ConsumerPass} the exchange signed
    for that farm alone (privox.farm.vouching).

Keys travel as unpadded URL-safe base64; a certificate is the base64 of its
JSON body, a dot, and the base64 of the exchange's signature of that body.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

#: How long a certificate is good for: a node enrols again well before.
CERTIFICATE_LIFETIME = 24 * 3600.0
#: The most a certificate may claim it was issued in the future (clocks).
CLOCK_SKEW = 300.0
#: What a node's identity signs, before the farm's key id and its
#: connection key, for a farm that lets it in by its certificate.
_BOUND_OFFER_CONTEXT = b"privox connection key for farm v1\x00"
#: What a node's identity signs, before the account it enrols with.
_ENROL_CONTEXT = b"privox enrol v1\x00"
#: What a node's identity signs, before its connection key.
_OFFER_CONTEXT = b"privox connection key v1\x00"
#: The longest certificate text accepted (a HELO field).
MAX_CERTIFICATE = 1024
#: How long a consumer pass is good for: an API makes one per connection,
#: shown once at its handshake, so a pass seen on the way is soon no use.
PASS_LIFETIME = 300.0
#: What a consumer's HELO key starts with when it is a pass.
PASS_PREFIX = "pass:"
#: What the exchange signs, before a pass's body (never a certificate's).
_PASS_CONTEXT = b"privox consumer pass v1\x00"


class IdentityError(ValueError):
    """
    A certificate or offer that does not hold: malformed, signed by another
    exchange, expired, or a connection key its node did not sign.
    """


def encodeKey(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decodeKey(text: Any, length: int = 32) -> bytes:
    """
    @raise IdentityError: not unpadded URL-safe base64 of C{length} bytes.
    """
    if not isinstance(text, str) or len(text) > 4 * length:
        raise IdentityError("a key must be a base64 string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise IdentityError("a key is not base64") from None
    if len(raw) != length:
        raise IdentityError(f"a key must be {length} bytes")
    return raw


def fingerprint(public: bytes) -> str:
    """
    A public key, short enough for a log line: the first 16 characters of
    its base64.
    """
    return encodeKey(public)[:16]


def publicBytes(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def exchangePublicKey(text: str) -> Ed25519PublicKey:
    """
    The exchange's public key as configurations pin it.

    @raise IdentityError: not such a key.
    """
    try:
        return Ed25519PublicKey.from_public_bytes(decodeKey(text.strip()))
    except (IdentityError, ValueError):
        raise IdentityError(
            "not an exchange's public key (43 characters of unpadded URL-safe base64)"
        ) from None


def enrolmentProof(identity: Ed25519PrivateKey, account: str) -> str:
    """
    A node's proof, when it enrols with the key of C{account} (an account
    id), that it holds C{identity}: so that no other key can enrol it.
    """
    return encodeKey(identity.sign(_ENROL_CONTEXT + account.encode("ascii")))


def checkEnrolmentProof(identity: bytes, account: str, proof: Any) -> None:
    """
    @raise IdentityError: C{proof} is not C{identity}'s L{enrolmentProof}
        for C{account}.
    """
    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(
            decodeKey(proof, 64), _ENROL_CONTEXT + account.encode("ascii")
        )
    except (InvalidSignature, ValueError):
        raise IdentityError("not signed by that identity") from None


def loadOrCreateKey(path: str) -> Ed25519PrivateKey:
    """
    The Ed25519 private key kept at C{path} (32 raw bytes, base64, one
    line), made and written there (mode 0600, the directory made) if there
    is none yet.

    @raise OSError: the file cannot be read or made.
    @raise IdentityError: the file holds no such key.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii", "replace").strip()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes_raw()
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(encodeKey(raw) + "\n")
        return key
    try:
        return Ed25519PrivateKey.from_private_bytes(decodeKey(text))
    except IdentityError:
        raise IdentityError(f"{path} holds no Ed25519 key") from None


def _signed(exchange: Ed25519PrivateKey, fields: dict[str, Any], context: bytes) -> str:
    """
    C{fields} as JSON, signed by the exchange after C{context}: the base64
    of the body, a dot, the base64 of the signature.
    """
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    return encodeKey(body) + "." + encodeKey(exchange.sign(context + body))


def _opened(
    text: Any, exchange: Ed25519PublicKey, context: bytes, what: str, now: float,
    grace: float = 0.0,
) -> tuple[dict[str, Any], float, float]:
    """
    The fields of a L{_signed} C{text} (a C{what}) of version 1 that names an
    account, with its times, if the exchange signed it and it is good at
    C{now} (or was, C{grace} seconds ago: clocks differ).

    @raise IdentityError: it is not.
    """
    if not isinstance(text, str) or len(text) > MAX_CERTIFICATE or text.count(".") != 1:
        raise IdentityError(f"malformed {what}")
    bodyText, signatureText = text.split(".")
    body = _decodeBlob(bodyText, what)
    try:
        exchange.verify(decodeKey(signatureText, 64), context + body)
    except InvalidSignature:
        raise IdentityError(f"{what} not signed by this exchange") from None
    try:
        fields = json.loads(body)
        issued, expires = float(fields["issued"]), float(fields["expires"])
    except (ValueError, KeyError, TypeError):
        raise IdentityError(f"malformed {what}") from None
    if fields.get("v") != 1 or not isinstance(fields.get("account"), str):
        raise IdentityError(f"malformed {what}")
    if now >= expires + grace:
        raise IdentityError(f"{what} expired")
    if issued > now + CLOCK_SKEW:
        raise IdentityError(f"{what} issued in the future")
    return fields, issued, expires


@dataclass(frozen=True)
class Certificate:
    """
    The exchange's word that C{identity} (an Ed25519 public key) is a node
    of the account C{account} (an account id), from C{issued} until
    C{expires}.
    """

    identity: bytes
    account: str
    issued: float
    expires: float
    text: str

    @classmethod
    def issue(
        cls,
        exchange: Ed25519PrivateKey,
        identity: bytes,
        account: str,
        now: float,
        lifetime: float = CERTIFICATE_LIFETIME,
    ) -> Certificate:
        issued, expires = round(now, 3), round(now + lifetime, 3)
        fields = {"v": 1, "identity": encodeKey(identity), "account": account,
                  "issued": issued, "expires": expires}
        return cls(identity, account, issued, expires, _signed(exchange, fields, b""))

    @classmethod
    def verify(cls, text: Any, exchange: Ed25519PublicKey, now: float) -> Certificate:
        """
        The certificate C{text}, if the exchange signed it and it is good at
        C{now}.

        @raise IdentityError: it is not.
        """
        fields, issued, expires = _opened(text, exchange, b"", "certificate", now)
        try:
            identity = decodeKey(fields.get("identity"))
        except IdentityError:
            raise IdentityError("malformed certificate") from None
        return cls(identity, fields["account"], issued, expires, text)


@dataclass(frozen=True)
class ConsumerPass:
    """
    The exchange's word that whoever shows it is the exchange's API (of
    account C{account}), at the farm of key id C{farm} only, from C{issued}
    until C{expires}: a farm that joined the exchange takes it in place of a
    consumer key, so the API's key never reaches a stranger's farm, and a
    farm cannot use the pass anywhere else.
    """

    farm: str
    account: str
    issued: float
    expires: float
    text: str

    @classmethod
    def issue(
        cls,
        exchange: Ed25519PrivateKey,
        farm: str,
        account: str,
        now: float,
        lifetime: float = PASS_LIFETIME,
    ) -> ConsumerPass:
        issued, expires = round(now, 3), round(now + lifetime, 3)
        fields = {"v": 1, "farm": farm, "account": account, "issued": issued, "expires": expires}
        return cls(farm, account, issued, expires, _signed(exchange, fields, _PASS_CONTEXT))

    @classmethod
    def verify(cls, text: str, exchange: Ed25519PublicKey, farm: str, now: float) -> ConsumerPass:
        """
        The pass C{text}, if the exchange signed it for C{farm} and it is
        good at C{now}.

        @raise IdentityError: it is not.
        """
        # A pass lives minutes: a farm's clock a little ahead must not
        # refuse every one.
        fields, issued, expires = _opened(text, exchange, _PASS_CONTEXT, "pass", now, CLOCK_SKEW)
        if fields.get("farm") != farm:
            raise IdentityError("the pass is for another farm")
        return cls(farm, fields["account"], issued, expires, text)


def _decodeBlob(text: str, what: str = "certificate") -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise IdentityError(f"malformed {what}") from None


@dataclass(frozen=True)
class ConnectionOffer:
    """
    What a node's HELO offers for sealing: its certificate, a fresh X25519
    key for this connection, and its identity's signature of that key.

    An offer to a farm that lets the node in by it (a farm that joined the
    exchange: privox.farm.vouching) is bound to that farm: C{farm} is its
    key id, and the signature covers it too, so a farm shown the offer
    cannot be let in with it anywhere else.
    """

    certificate: str
    key: bytes
    signature: bytes
    farm: str | None = None

    @classmethod
    def make(
        cls, identity: Ed25519PrivateKey, certificate: Certificate, farm: str | None = None
    ) -> tuple[X25519PrivateKey, ConnectionOffer]:
        """
        A fresh connection key and the offer of its public half (bound to
        C{farm}, if given).
        """
        private = X25519PrivateKey.generate()
        key = publicBytes(private.public_key())
        signature = identity.sign(_signedOffer(key, farm))
        return private, cls(certificate.text, key, signature, farm)

    def fields(self) -> dict[str, str]:
        fields = {
            "certificate": self.certificate,
            "key": encodeKey(self.key),
            "signature": encodeKey(self.signature),
        }
        if self.farm is not None:
            fields["farm"] = self.farm
        return fields

    @classmethod
    def parse(cls, fields: Any) -> ConnectionOffer:
        """
        @raise IdentityError: not an offer's fields.
        """
        if not isinstance(fields, dict):
            raise IdentityError("a seal offer must be an object")
        certificate, farm = fields.get("certificate"), fields.get("farm")
        if not isinstance(certificate, str) or len(certificate) > MAX_CERTIFICATE:
            raise IdentityError("malformed certificate")
        if farm is not None and not (isinstance(farm, str) and 0 < len(farm) <= 64):
            raise IdentityError("malformed seal offer")
        return cls(
            certificate, decodeKey(fields.get("key")), decodeKey(fields.get("signature"), 64), farm
        )

    def verify(self, exchange: Ed25519PublicKey, now: float) -> tuple[Certificate, X25519PublicKey]:
        """
        The node's certificate and connection key, if the exchange vouches
        for the node and the node signed this key (and the farm it names).

        @raise IdentityError: either does not hold.
        """
        certificate = Certificate.verify(self.certificate, exchange, now)
        try:
            Ed25519PublicKey.from_public_bytes(certificate.identity).verify(
                self.signature, _signedOffer(self.key, self.farm)
            )
        except InvalidSignature:
            raise IdentityError("connection key not signed by the certified node") from None
        return certificate, X25519PublicKey.from_public_bytes(self.key)


def _signedOffer(key: bytes, farm: str | None) -> bytes:
    """
    What a node's identity signs for an offer of C{key}: bound to C{farm}
    under a context of its own, so neither form passes for the other.
    """
    if farm is None:
        return _OFFER_CONTEXT + key
    return _BOUND_OFFER_CONTEXT + farm.encode("utf-8") + b"\x00" + key
