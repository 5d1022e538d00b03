"""
The peers an exchange vouches for, let in without their keys.

A farm that joined an exchange by itself (C{--exchange}) is a stranger's
machine to the exchange's users, so no key is shown to it:

  - A node that found the farm in the exchange's directory names no key in
    its C{HELO}; its seal offer (L{privox.identity.ConnectionOffer}) carries
    the exchange's certificate of the node, which names the node's account
    (the SHA-256 of its key), and the node's signature of this connection's
    key. The ledger credits the certificate's account.
  - The exchange's API names a L{privox.identity.ConsumerPass} as its key:
    signed by the exchange for this farm alone (its key id), so the farm
    can use it nowhere else.

The farm checks both against the exchange's public key (C{--exchange-key},
or read from C{GET EXCHANGE/v1/exchange} before it registers). By default
(C{--producer-keys exchange}, C{--consumer-keys exchange}) such a farm lets
in no one else, so that its nodes serve the exchange's users only, by the
exchange's rules.

A farm that replays a node's offer elsewhere gets a producer whose sealed
jobs it cannot open, credited to that node's account: nothing to gain.
"""

from __future__ import annotations

import re

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred, succeed

from privox.identity import PASS_PREFIX, ConnectionOffer, ConsumerPass, IdentityError, fingerprint

#: An account id as the ledger takes it (L{privox.keys.accountId}).
_ACCOUNT = re.compile(r"[0-9a-f]{64}")


class Vouching:
    """
    What the farm of an exchange knows of it: its public key, once pinned
    or read, and the farm's own key id there (what passes name).
    """

    def __init__(self, farm: str, exchange: Ed25519PublicKey | None = None) -> None:
        self.farm = farm
        self.exchange = exchange

    def speaksFor(self, role: str, key: str) -> bool:
        """
        Whether a PVX/2 peer of C{role} naming C{key} is to be let in by
        the exchange's word rather than by a key policy.
        """
        return not key if role == "producer" else key.startswith(PASS_PREFIX)

    def account(
        self, role: str, key: str, offer: dict[str, str] | None, now: float
    ) -> tuple[str, str | None]:
        """
        The account of a peer L{speaksFor} covers: a producer's from its
        seal offer, a consumer's from its pass; and a producer's node (its
        identity's fingerprint), which the farm tells the exchange is
        online.

        @raise IdentityError: the exchange does not vouch for it, or this
            farm does not know the exchange's key yet.
        """
        if self.exchange is None:
            raise IdentityError("this farm does not know its exchange's key yet")
        node = None
        if role == "consumer":
            account = ConsumerPass.verify(key[len(PASS_PREFIX):], self.exchange, self.farm, now).account
        elif offer is None:
            raise IdentityError("a producer without a key must offer its exchange certificate")
        else:
            certificate, _ = ConnectionOffer.parse(offer).verify(self.exchange, now)
            account, node = certificate.account, fingerprint(certificate.identity)
        if not _ACCOUNT.fullmatch(account):
            raise IdentityError("it names no account id (enrol again)")
        return account, node


class ExchangeOnly:
    """
    The key policy C{exchange} on a farm that joined one: no key lets a
    peer in; only the exchange's word does (L{Vouching}).
    """

    description = "the exchange's API and certified nodes only"
    refusal = "this farm lets in only its exchange's API (by pass) and certified nodes (by certificate)"

    def check(self, key: str) -> Deferred[bool]:
        return succeed(False)
