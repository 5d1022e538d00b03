"""
The exchange's signing key, and nodes enrolling with it (L{privox.identity}).

The API holds the exchange's Ed25519 key (C{--exchange-key}, a file made
mode 0600 at first start). C{GET /v1/exchange} publishes its public half,
which node and API configurations pin; C{POST /v1/enroll} answers a node
that proves it may (its producer key, L{privox.api.access.Access.authorizeNode})
a certificate of its identity key, in the name of that key's id.

Every API server of one exchange must hold the same key: a node's
certificate is checked against the one key its consumers pinned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privox.api.errors import BadInput
from privox.identity import (
    CERTIFICATE_LIFETIME,
    Certificate,
    IdentityError,
    checkEnrolmentProof,
    decodeKey,
    encodeKey,
    fingerprint,
    loadOrCreateKey,
    publicBytes,
)

#: Where the exchange key is by default: the working directory, like the
#: default SQLite account store.
DEFAULT_EXCHANGE_KEY = "privox-exchange.key"


class ExchangeKeyError(Exception):
    """
    The exchange key file cannot be read or made; the message is one line.
    """


@dataclass(frozen=True)
class ExchangeKey:
    """
    The exchange's signing key, and the certificates it issues.
    """

    private: Ed25519PrivateKey = field(repr=False)
    #: How long a certificate is good for.
    lifetime: float = CERTIFICATE_LIFETIME

    @classmethod
    def load(cls, path: str) -> tuple[ExchangeKey, bool]:
        """
        The key kept at C{path}, made there first if there is none.

        @return: the key, and whether it was made now.
        @raise ExchangeKeyError: the file cannot be read or made, or holds
            no key.
        """
        made = not os.path.lexists(path)
        try:
            try:
                return cls(loadOrCreateKey(path)), made
            except FileExistsError:
                # Another process of this exchange made it just now.
                return cls(loadOrCreateKey(path)), False
        except OSError as e:
            raise ExchangeKeyError(
                f"cannot read or make the exchange key {path}: {e.strerror or e}"
            ) from None
        except IdentityError:
            raise ExchangeKeyError(
                f"the exchange key file {path} holds no Ed25519 key"
            ) from None

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def publicText(self) -> str:
        """
        The public key as configurations pin it (C{GET /v1/exchange}).
        """
        return encodeKey(publicBytes(self.public))

    @property
    def fingerprint(self) -> str:
        return fingerprint(publicBytes(self.public))

    def issue(self, identity: bytes, account: str, now: float) -> Certificate:
        return Certificate.issue(self.private, identity, account, now, self.lifetime)


def provenIdentity(body: bytes, account: str) -> bytes:
    """
    The node identity a C{POST /v1/enroll} body names, if its C{proof}
    shows the node holds it (L{privox.identity.enrolmentProof} for the
    enrolling key's C{account}): a key cannot enrol a node it does not run.

    @raise BadInput: anything else.
    """
    identity = readIdentity(body)
    try:
        checkEnrolmentProof(identity, account, json.loads(body).get("proof"))
    except IdentityError:
        raise BadInput(
            "proof must be the node identity's signature of the enrolling key's account"
            " (the node signs it; upgrade a node that sends none)"
        ) from None
    return identity


def readIdentity(body: bytes) -> bytes:
    """
    The node identity a C{POST /v1/enroll} body names:
    C{{"identity": "<its Ed25519 public key, unpadded URL-safe base64>"}}.

    @raise BadInput: anything else.
    """
    try:
        decoded: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInput('the body must be a JSON object: {"identity": KEY}') from None
    if not isinstance(decoded, dict):
        raise BadInput('the body must be a JSON object: {"identity": KEY}')
    try:
        identity = decodeKey(decoded.get("identity"))
        # A point that is no Ed25519 public key is refused here, not signed.
        Ed25519PublicKey.from_public_bytes(identity)
    except (IdentityError, ValueError):
        raise BadInput(
            "identity must be the node's Ed25519 public key (32 bytes, unpadded URL-safe base64)"
        ) from None
    return identity
