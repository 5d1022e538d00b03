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

A node's offer here is bound to this farm (its key id, signed by the
node's identity), and a pass names it: what one farm is shown lets nobody
in at another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred, succeed

from privox.identity import PASS_PREFIX, ConnectionOffer, ConsumerPass, IdentityError, fingerprint

#: An account id as the ledger takes it (L{privox.keys.accountId}).
_ACCOUNT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Vouched:
    """
    A peer the exchange vouches for: its account, a node's identity
    fingerprint (L{None} for the API), and when the exchange's word ends.
    """

    account: str
    node: str | None
    until: float


class Vouching:
    """
    What the farm of an exchange knows of it: its public key, once pinned
    or read, and the farm's own key id there (what passes name).
    """

    def __init__(self, farm: str, exchange: Ed25519PublicKey | None = None) -> None:
        self.farm = farm
        self.exchange = exchange

    def speaksFor(self, role: str, key: str, offer: dict[str, str] | None) -> bool:
        """
        Whether a PVX/2 peer of C{role} naming C{key} (a producer offering
        C{offer}) is to be let in by the exchange's word rather than by a
        key policy: a producer with no key and an offer bound to a farm, a
        consumer with a pass.
        """
        if role == "producer":
            return not key and offer is not None and "farm" in offer
        return key.startswith(PASS_PREFIX)

    def vouched(
        self, role: str, key: str, offer: dict[str, str] | None, now: float
    ) -> Vouched:
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
            shown = ConsumerPass.verify(key[len(PASS_PREFIX):], self.exchange, self.farm, now)
            account, until = shown.account, shown.expires
        else:
            assert offer is not None
            parsed = ConnectionOffer.parse(offer)
            if parsed.farm != self.farm:
                # Shown to another farm, or made for none: a farm that was
                # shown it must not be let in with it here.
                raise IdentityError("the offer is not bound to this farm")
            certificate, _ = parsed.verify(self.exchange, now)
            account, node = certificate.account, fingerprint(certificate.identity)
            until = certificate.expires
        if not _ACCOUNT.fullmatch(account):
            raise IdentityError("it names no account id")
        return Vouched(account, node, until)


class ExchangeOnly:
    """
    The key policy C{exchange} on a farm that joined one: no key lets a
    peer in; only the exchange's word does (L{Vouching}).
    """

    description = "the exchange's API and certified nodes only"
    refusal = "this farm lets in only its exchange's API (by pass) and certified nodes (by certificate)"

    def check(self, key: str) -> Deferred[bool]:
        return succeed(False)
