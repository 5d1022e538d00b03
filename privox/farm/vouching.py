"""
Nodes that prove their account with the exchange's word instead of their
key.

A node that found a farm in an exchange's directory does not know who runs
that farm, so it does not hand it its key (a user key: it spends, and signs
in on the account pages). Its C{HELO} names no key; its seal offer
(L{privox.identity.ConnectionOffer}) carries the exchange's certificate of
the node, which names the node's account (the SHA-256 of its key), and the
node's signature of this connection's key. A farm that joined the exchange
knows the exchange's public key (C{--exchange-key}, or read from C{GET
EXCHANGE/v1/exchange} before it registers) and checks both; the ledger
credits the certificate's account.

A farm that replays an offer it was given gets a producer whose sealed jobs
it cannot open, credited to that node's account: nothing to gain.
"""

from __future__ import annotations

import re

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privox.identity import ConnectionOffer, IdentityError

#: An account id as the ledger takes it (L{privox.keys.accountId}).
_ACCOUNT = re.compile(r"[0-9a-f]{64}")


class Vouching:
    """
    What the farm of an exchange (C{--exchange}) knows of it: its public
    key, once pinned or read.
    """

    def __init__(self, exchange: Ed25519PublicKey | None = None) -> None:
        self.exchange = exchange

    def account(self, offer: dict[str, str] | None, now: float) -> str:
        """
        The account of a producer that names no key, from its seal offer.

        @raise IdentityError: no offer, an offer the exchange does not vouch
            for, or this farm does not know the exchange's key yet.
        """
        if self.exchange is None:
            raise IdentityError("this farm does not know its exchange's key yet")
        if offer is None:
            raise IdentityError("a producer without a key must offer its exchange certificate")
        certificate, _ = ConnectionOffer.parse(offer).verify(self.exchange, now)
        if not _ACCOUNT.fullmatch(certificate.account):
            raise IdentityError("the certificate names no account id (enrol again)")
        return certificate.account
