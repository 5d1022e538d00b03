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
import re
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class ListedFarm:
    """
    A farm as the directory lists it: its name and the client endpoint of
    each port it serves (None: it does not serve that service).
    """

    name: str
    stt: str | None
    tts: str | None

    def endpoint(self, service: str) -> str | None:
        return self.stt if service == "stt" else self.tts

    def fields(self) -> dict[str, Any]:
        return {"name": self.name, "stt": self.stt, "tts": self.tts}

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
        return cls(name, ports[0], ports[1])


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
