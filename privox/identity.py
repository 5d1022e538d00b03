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
#: What a node's identity signs, before its connection key.
_OFFER_CONTEXT = b"privox connection key v1\x00"
_CERTIFICATE_VERSION = 1
#: The longest certificate text accepted (a HELO field).
MAX_CERTIFICATE = 1024


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


@dataclass(frozen=True)
class Certificate:
    """
    The exchange's word that C{identity} (an Ed25519 public key) is a node
    of the account C{account} (a key id), from C{issued} until C{expires}.
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
        body = json.dumps(
            {
                "v": _CERTIFICATE_VERSION,
                "identity": encodeKey(identity),
                "account": account,
                "issued": round(now, 3),
                "expires": round(now + lifetime, 3),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        text = encodeKey(body) + "." + encodeKey(exchange.sign(body))
        return cls(identity, account, round(now, 3), round(now + lifetime, 3), text)

    @classmethod
    def verify(cls, text: Any, exchange: Ed25519PublicKey, now: float) -> Certificate:
        """
        The certificate C{text}, if the exchange signed it and it is good at
        C{now}.

        @raise IdentityError: it is not.
        """
        if not isinstance(text, str) or len(text) > MAX_CERTIFICATE or text.count(".") != 1:
            raise IdentityError("malformed certificate")
        bodyText, signatureText = text.split(".")
        body = _decodeBlob(bodyText)
        try:
            exchange.verify(decodeKey(signatureText, 64), body)
        except InvalidSignature:
            raise IdentityError("certificate not signed by this exchange") from None
        try:
            fields = json.loads(body)
            identity = decodeKey(fields["identity"])
            account, issued, expires = fields["account"], float(fields["issued"]), float(fields["expires"])
        except (ValueError, KeyError, TypeError):
            raise IdentityError("malformed certificate") from None
        if fields.get("v") != _CERTIFICATE_VERSION or not isinstance(account, str):
            raise IdentityError("malformed certificate")
        if now >= expires:
            raise IdentityError("certificate expired")
        if issued > now + CLOCK_SKEW:
            raise IdentityError("certificate issued in the future")
        return cls(identity, account, issued, expires, text)


def _decodeBlob(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise IdentityError("malformed certificate") from None


@dataclass(frozen=True)
class ConnectionOffer:
    """
    What a node's HELO offers for sealing: its certificate, a fresh X25519
    key for this connection, and its identity's signature of that key.
    """

    certificate: str
    key: bytes
    signature: bytes

    @classmethod
    def make(
        cls, identity: Ed25519PrivateKey, certificate: Certificate
    ) -> tuple[X25519PrivateKey, ConnectionOffer]:
        """
        A fresh connection key and the offer of its public half.
        """
        private = X25519PrivateKey.generate()
        key = publicBytes(private.public_key())
        return private, cls(certificate.text, key, identity.sign(_OFFER_CONTEXT + key))

    def fields(self) -> dict[str, str]:
        return {
            "certificate": self.certificate,
            "key": encodeKey(self.key),
            "signature": encodeKey(self.signature),
        }

    @classmethod
    def parse(cls, fields: Any) -> ConnectionOffer:
        """
        @raise IdentityError: not an offer's fields.
        """
        if not isinstance(fields, dict):
            raise IdentityError("a seal offer must be an object")
        certificate = fields.get("certificate")
        if not isinstance(certificate, str) or len(certificate) > MAX_CERTIFICATE:
            raise IdentityError("malformed certificate")
        return cls(certificate, decodeKey(fields.get("key")), decodeKey(fields.get("signature"), 64))

    def verify(self, exchange: Ed25519PublicKey, now: float) -> tuple[Certificate, X25519PublicKey]:
        """
        The node's certificate and connection key, if the exchange vouches
        for the node and the node signed this key.

        @raise IdentityError: either does not hold.
        """
        certificate = Certificate.verify(self.certificate, exchange, now)
        try:
            Ed25519PublicKey.from_public_bytes(certificate.identity).verify(
                self.signature, _OFFER_CONTEXT + self.key
            )
        except InvalidSignature:
            raise IdentityError("connection key not signed by the certified node") from None
        return certificate, X25519PublicKey.from_public_bytes(self.key)
