"""
The exchange's signed directory of farms (C{GET /v1/farms}).

Volunteers' farms register with an API (C{POST /v1/farms}); the API probes
each and lists those that work. The list is signed with the exchange's
Ed25519 key, the one that certifies nodes, and expires: a node that knows
only the exchange's URL and its pinned public key reads it, checks it, and
dials the farms it names. A directory a farm or a network in between
changed, or an old one replayed past its expiry, is refused.

On the wire, one JSON object::

    {"v": 1, "farms": [{"name": ..., "stt": ENDPOINT|null, "tts": ...}, ...],
     "issued": SECONDS, "expires": SECONDS, "signature": BASE64}

The signature covers every other field, as canonical JSON (sorted keys, no
spaces). Endpoints are Twisted client endpoint strings, as in an API's farm
lines.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privox.identity import CLOCK_SKEW, IdentityError, decodeKey, encodeKey
from privox.messages import SERVICES

VERSION = 1
#: How long a directory is good for once issued (seconds): nodes re-read it
#: well before (L{REFRESH}).
LIFETIME = 600.0
#: How often a node reads the directory again.
REFRESH = 60.0
#: The most farms a directory may list, and the longest name or endpoint.
MAX_FARMS = 1000
MAX_FIELD = 300
#: The endpoints a directory may name: plain host and port, TCP or TLS (the
#: dialler's own CAs verify a TLS farm's certificate). Nothing else: another
#: endpoint type or parameter would have an API or a node read its own
#: files or dial its own sockets.
PLAIN_ENDPOINT = re.compile(r"(tcp|tls):host=([A-Za-z0-9.\-]{1,253}):port=([0-9]{1,5})")


class DirectoryError(Exception):
    """
    A directory that cannot be trusted or read; the message is one line.
    """


#: A farm's key id at the exchange (privox.keys.keyId).
MEMBER = re.compile(r"[0-9a-f]{12}")
#: The most models a farm's producer counts may name.
MAX_MODELS = 200
#: The most nodes a farm's registration says are online (never listed in
#: the directory: only the exchange's account pages use them).
MAX_NODES = 1000


def readProducers(value: Any) -> dict[str, dict[str, int]]:
    """
    A farm's producers per service and model (C{{"stt": {"whisper:tiny.en":
    3}}}), as it says; {} where absent.

    @raise ValueError: malformed.
    """
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= set(SERVICES):
        raise ValueError("producers must map stt and tts to models")
    out: dict[str, dict[str, int]] = {}
    for service, models in value.items():
        if not isinstance(models, dict) or len(models) > MAX_MODELS:
            raise ValueError(f"producers: bad {service} models")
        for model, count in models.items():
            if not (isinstance(model, str) and 0 < len(model) <= MAX_FIELD
                    and isinstance(count, int) and not isinstance(count, bool)
                    and 0 <= count <= 1_000_000):
                raise ValueError(f"producers: bad {service} model count")
        out[service] = dict(models)
    return out


@dataclass(frozen=True)
class ListedFarm:
    """
    A farm as the directory lists it: its name, the client endpoint of each
    port it serves (None: it does not serve that service), and how many
    producers it had per service and model when it last registered (what
    nodes go by to find the farms that need them most).

    C{member}: the key id of a farm that joined by itself (a stranger's), or
    that vouches as those do: a node shows it no key, only its certificate,
    in an offer bound to that key id (privox.farm.vouching). L{None}: one of
    the exchange's own farms, which takes the node's key as its key policy
    says.
    """

    name: str
    stt: str | None
    tts: str | None
    producers: dict[str, dict[str, int]] = field(default_factory=dict, compare=False)
    member: str | None = None

    def endpoint(self, service: str) -> str | None:
        return self.stt if service == "stt" else self.tts

    def fields(self) -> dict[str, Any]:
        fields = {"name": self.name, "stt": self.stt, "tts": self.tts, "producers": self.producers}
        if self.member is not None:
            fields["member"] = self.member
        return fields

    def serving(self, service: str, models: Iterable[str]) -> int:
        """
        How many of its producers serve one of C{models} (or any model).
        """
        counts = self.producers.get(service, {})
        return sum(counts.get(m, 0) for m in {*models, "*"})

    @classmethod
    def parse(cls, fields: Any) -> ListedFarm:
        """
        @raise DirectoryError: not a farm entry.
        """
        if not isinstance(fields, dict):
            raise DirectoryError("a farm entry is not an object")
        name = fields.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_FIELD:
            raise DirectoryError("a farm entry has no name")
        ports = []
        for service in SERVICES:
            value = fields.get(service)
            if value is not None and (not isinstance(value, str) or not PLAIN_ENDPOINT.fullmatch(value)):
                raise DirectoryError(f"farm {name!r}: bad {service} endpoint")
            ports.append(value)
        if ports == [None, None]:
            raise DirectoryError(f"farm {name!r} serves neither stt nor tts")
        try:
            producers = readProducers(fields.get("producers"))
        except ValueError as e:
            raise DirectoryError(f"farm {name!r}: {e}") from None
        member = fields.get("member")
        if member is not None and not (isinstance(member, str) and MEMBER.fullmatch(member)):
            raise DirectoryError(f"farm {name!r}: bad member key id")
        return cls(name, ports[0], ports[1], producers, member)


@dataclass(frozen=True)
class Directory:
    farms: tuple[ListedFarm, ...]
    issued: float
    expires: float

    def _body(self) -> bytes:
        return json.dumps(
            {
                "v": VERSION,
                "farms": [farm.fields() for farm in self.farms],
                "issued": self.issued,
                "expires": self.expires,
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()

    def signed(self, key: Ed25519PrivateKey) -> dict[str, Any]:
        """
        The directory as C{GET /v1/farms} answers it.
        """
        fields: dict[str, Any] = json.loads(self._body())
        fields["signature"] = encodeKey(key.sign(self._body()))
        return fields

    @classmethod
    def issue(cls, farms: list[ListedFarm], now: float, lifetime: float = LIFETIME) -> Directory:
        return cls(tuple(sorted(farms, key=lambda f: f.name)), round(now, 3), round(now + lifetime, 3))

    @classmethod
    def verify(cls, fields: Any, exchange: Ed25519PublicKey, now: float) -> Directory:
        """
        The directory C{fields} (decoded JSON), if the exchange signed it
        and it is good at C{now}.

        @raise DirectoryError: it is not.
        """
        if not isinstance(fields, dict):
            raise DirectoryError("the directory is not a JSON object")
        if fields.get("v") != VERSION:
            raise DirectoryError(f"directory version {fields.get('v')!r} is not {VERSION}")
        farms = fields.get("farms")
        issued, expires = fields.get("issued"), fields.get("expires")
        if not isinstance(farms, list):
            raise DirectoryError("the directory lists no farms")
        if len(farms) > MAX_FARMS:
            raise DirectoryError(f"the directory lists more than {MAX_FARMS} farms")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (issued, expires)):
            raise DirectoryError("the directory has no issue or expiry time")
        directory = cls(tuple(ListedFarm.parse(f) for f in farms), issued, expires)
        try:
            exchange.verify(decodeKey(fields.get("signature"), 64), directory._body())
        except (InvalidSignature, IdentityError):
            raise DirectoryError("the directory is not signed by this exchange") from None
        if now >= expires:
            raise DirectoryError("the directory has expired")
        if issued > now + CLOCK_SKEW:
            raise DirectoryError("the directory was issued in the future")
        return directory

    def serving(self, service: str) -> tuple[str, ...]:
        """
        The endpoints of the farms that serve C{service}, in the directory's
        order.
        """
        return tuple(e for farm in self.farms if (e := farm.endpoint(service)) is not None)

    def member(self, endpoint: str) -> str | None:
        """
        The key id of the farm that joined by itself at C{endpoint}, or
        L{None} for one of the exchange's own farms (or one not listed).
        """
        for farm in self.farms:
            if endpoint in (farm.stt, farm.tts):
                return farm.member
        return None

    def byNeed(self, service: str, models: Iterable[str], rng: random.Random) -> tuple[str, ...]:
        """
        The endpoints of the farms that serve C{service}, those with the
        fewest producers of C{models} first, drawn (a farm with C{n} of them
        weighs 1/(1+n)) so that nodes reading the same directory spread
        over the farms instead of all taking the first.
        """
        models = tuple(models)
        left = [f for f in self.farms if f.endpoint(service) is not None]
        order = []
        while left:
            weights = [1.0 / (1 + f.serving(service, models)) for f in left]
            point = rng.random() * sum(weights)
            for index, weight in enumerate(weights):
                point -= weight
                if point < 0 or index == len(left) - 1:
                    order.append(left.pop(index))
                    break
        return tuple(f.endpoint(service) for f in order)  # type: ignore[misc]
