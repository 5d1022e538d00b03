"""
A volunteer's farm joining an exchange by itself: C{privox-farm --exchange
URL --api-key FARM-KEY --public 'STT-ENDPOINT TTS-ENDPOINT'} registers with
the exchange's API (C{POST URL/v1/farms}) once it listens, and again every
L{privox.directory.REFRESH} seconds while it runs. The API probes the farm
before listing it, and drops it when it stops registering.

Before its first registration it reads the exchange's public key (C{GET
URL/v1/exchange}) unless C{--exchange-key} pins it: the farm then lets in
the nodes the exchange certified without their keys (L{privox.farm.vouching}).

C{--public} names the client endpoints API servers and nodes should dial
(C{tcp:host=farm.example.org:port=1776}, or C{tls:...}; C{none} for a service
the farm does not offer): what the farm listens on may be behind a NAT or
a proxy, so only its operator knows them.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from privox.directory import REFRESH
from privox.farm.vouching import Vouching
from privox.exchangekey import ExchangeKeyUnread, readExchangeKey
from privox.identity import fingerprint, publicBytes
from privox.keys import webReason, withoutSecrets
from privox.periodic import Periodic

#: Longest wait for the API's answer (its probe of the farm included).
REQUEST_TIMEOUT = 30.0
#: The range of refresh periods an API may ask for (seconds).
MIN_REFRESH, MAX_REFRESH = 1.0, 3600.0


def parsePublic(text: str) -> tuple[str | None, str | None]:
    """
    C{--public}: 'STT-ENDPOINT TTS-ENDPOINT', either C{none}.

    @raise ValueError: not two endpoints, or both C{none}.
    """
    parts = text.split()
    if len(parts) != 2:
        raise ValueError("--public must be 'STT-ENDPOINT TTS-ENDPOINT' (either may be 'none')")
    stt, tts = (None if p == "none" else p for p in parts)
    if stt is None and tts is None:
        raise ValueError("--public names no endpoint")
    return stt, tts


class Registration(Periodic):
    """
    Registers the farm C{name} at C{url} with C{key}, now and every
    C{refresh} seconds (or as often as the API asks). C{http}: treq or its
    like.
    """

    def __init__(
        self,
        url: str,
        key: str,
        name: str,
        public: tuple[str | None, str | None],
        clock: IReactorTime,
        http: Any = treq,
        refresh: float = REFRESH,
        producers: Callable[[], dict[str, dict[str, int]]] = dict,
        vouching: Vouching | None = None,
        online: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        """
        @param producers: the farm's producers per service and model now,
            which the directory shows nodes choosing a farm.
        @param online: the exchange's nodes connected now (fingerprint, key
            id, connections), which their owners' account pages show.
        @param vouching: where the farm keeps the exchange's key; one
            without it is read from the exchange first.
        """
        super().__init__(clock, refresh, self._register)
        self.target = url.rstrip("/") + "/v1/farms"
        self.where = withoutSecrets(url)
        self.key = key
        self.body = {"name": name, "stt": public[0], "tts": public[1]}
        self.producers = producers
        self.online = online
        self.http = http
        self.vouching = vouching
        self.url = url
        #: Whether the exchange's key was pinned (else it is read there).
        self.pinned = vouching is not None and vouching.exchange is not None

    async def _register(self) -> None:
        if self.vouching is not None and self.vouching.exchange is None:
            if not await self._readExchangeKey():
                return
        d = Deferred.fromCoroutine(self._post())
        d.addTimeout(REQUEST_TIMEOUT, self.clock)
        try:
            code, body = await d
        except Exception as e:
            self.say(f"cannot reach the exchange at {self.where} ({webReason(e)}); trying again")
            return
        if code == 200:
            self.say(f"listed in the directory of {self.where}", warn=False)
            self._pace(body)
            return
        try:
            # A JSON error, or the one line of text the API's own routes answer.
            error = json.loads(body).get("error", {})
            message = str(error.get("message", ""))
        except (ValueError, AttributeError):
            message = body.decode("utf-8", "replace")
        message = " ".join(message.split())[:300]
        self.say(f"the exchange at {self.where} refused this farm: HTTP {code}"
                 + (f": {message}" if message else ""))
        if "pass not signed by this exchange" in message and not self.pinned:
            # The API's passes are signed by a key this farm does not hold:
            # the exchange's key changed. Read it again.
            assert self.vouching is not None
            self.vouching.exchange = None
            await self._readExchangeKey()

    async def _readExchangeKey(self) -> bool:
        assert self.vouching is not None
        if not self.url.startswith("https://"):
            self.say(f"reading the exchange's key from {self.where} over plain HTTP: anyone on the"
                     " way could give another; pin it with --exchange-key")
        try:
            key = await readExchangeKey(self.url, self.http, self.clock)
        except ExchangeKeyUnread as e:
            self.say(f"cannot read the exchange's key from {self.where} ({e}); trying again")
            return False
        self.vouching.exchange = key
        self.log.info(
            "the exchange at {where} signs with key {fingerprint}: its certified nodes"
            " join without their keys",
            where=self.where,
            fingerprint=fingerprint(publicBytes(key)),
        )
        return True

    def _pace(self, body: bytes) -> None:
        """
        Register as often as the API asks (its C{refresh_s}, within
        bounds): it drops a farm that misses a few.
        """
        try:
            asked = json.loads(body).get("refresh_s")
        except (ValueError, AttributeError):
            return
        if (
            isinstance(asked, (int, float)) and not isinstance(asked, bool)
            and MIN_REFRESH <= asked <= MAX_REFRESH
        ):
            self.every = float(asked)

    async def _post(self) -> tuple[int, bytes]:
        response = await self.http.post(
            self.target, json=dict(self.body, producers=self.producers(), nodes=self.online()),
            headers={"Authorization": f"Bearer {self.key}"},
        )
        return response.code, await response.content()
