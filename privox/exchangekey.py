"""
The exchange's public key, for a farm or a node given none
(C{--exchange-key} empty): read from C{GET EXCHANGE/v1/exchange}. A node
reads it at its first start, logs its fingerprint and keeps it in its state
directory (C{exchange.pub}); from then on the kept one is the node's, as if
pinned (trust on first use, as SSH does): an exchange that later answers
with another key is refused until the file is removed. A farm reads it
before it registers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.identity import IdentityError, encodeKey, exchangePublicKey, fingerprint, publicBytes

log = Logger()

#: The file in the node's state directory that keeps the key first read.
KEPT_FILE = "exchange.pub"
#: Longest wait for the exchange's answer.
REQUEST_TIMEOUT = 30.0


class ExchangeKeyUnread(Exception):
    """
    The exchange could not be asked, or answered no key; the message is
    one line.
    """


def keptKey(stateDir: str) -> Ed25519PublicKey | None:
    """
    The key a first start kept, if any.

    @raise IdentityError: the file holds no such key.
    """
    try:
        with open(os.path.join(stateDir, KEPT_FILE)) as f:
            return exchangePublicKey(f.read())
    except FileNotFoundError:
        return None


def keep(stateDir: str, key: Ed25519PublicKey) -> None:
    os.makedirs(stateDir, mode=0o700, exist_ok=True)
    path = os.path.join(stateDir, KEPT_FILE)
    with open(path + ".part", "w") as f:
        f.write(encodeKey(publicBytes(key)) + "\n")
    os.replace(path + ".part", path)


async def readExchangeKey(url: str, http: Any, clock: IReactorTime) -> Ed25519PublicKey:
    """
    The key C{GET URL/v1/exchange} answers.

    @raise ExchangeKeyUnread: none.
    """
    target = url.rstrip("/") + "/v1/exchange"

    async def get() -> tuple[int, bytes]:
        response = await http.get(target)
        return response.code, await response.content()

    d = Deferred.fromCoroutine(get())
    d.addTimeout(REQUEST_TIMEOUT, clock)
    try:
        code, body = await d
    except Exception as e:
        raise ExchangeKeyUnread(f"no answer ({e.__class__.__name__})") from None
    if code != 200:
        raise ExchangeKeyUnread(f"HTTP {code}")
    try:
        return exchangePublicKey(str(json.loads(body)["key"]))
    except (IdentityError, ValueError, KeyError, TypeError):
        raise ExchangeKeyUnread("its answer holds no exchange key") from None


def logLearnt(key: Ed25519PublicKey, where: str, stateDir: str) -> None:
    log.warn(
        "pinned the exchange key {fingerprint} that {where} gave on first use, kept in {path};"
        " compare it with what the exchange publishes, or give --exchange-key",
        fingerprint=fingerprint(publicBytes(key)),
        where=where,
        path=os.path.join(stateDir, KEPT_FILE),
    )
