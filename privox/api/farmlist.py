"""
The API's farm directory: one line per farm (L{FarmEntry.parse})::

    NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback] [status=URL]

for example C{main tcp:host=farm.example:port=1776
tcp:host=farm.example:port=1777 weight=2}. Endpoints are Twisted client
endpoint strings; C{none} stands for a service that farm does not offer.
C{status=URL} is the farm's C{/status} (its C{--metrics-listen} endpoint),
which the API's own C{/status} then shows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from privox.messages import SERVICES
from privox.tls import checkEndpoint

_NONE = "none"

T = TypeVar("T", bound=Any)


@dataclass(frozen=True)
class FarmEntry:
    """
    One farm of the directory.

    @ivar stt: client endpoint string of its STT port, or C{None}.
    @ivar tts: client endpoint string of its TTS port, or C{None}.
    @ivar weight: relative chance of being drawn among non-fallback farms.
    @ivar fallback: reserved: tried only after the drawn farms failed.
    @ivar status: http(s) URL of the farm's C{/status} (its
        C{--metrics-listen} endpoint), shown on the API's C{/status}; or
        C{None}.
    @ivar member: the key id of a farm that joined by itself
        (privox.api.farmdirectory), or of one that vouches as those do
        (privox-local's): shown a pass, never the API's key.
    """

    name: str
    stt: str | None
    tts: str | None
    weight: float = 1.0
    fallback: bool = False
    status: str | None = None
    member: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a farm needs a name")
        if self.stt is None and self.tts is None:
            raise ValueError(f"farm {self.name!r} serves neither stt nor tts")
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise ValueError(f"farm {self.name!r}: weight must be a positive number")

    def endpoint(self, service: str) -> str | None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}")
        return self.stt if service == "stt" else self.tts

    @property
    def services(self) -> list[str]:
        return [s for s in SERVICES if self.endpoint(s) is not None]

    @classmethod
    def parse(cls, line: str) -> FarmEntry:
        """
        Parse C{NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback]}.

        @raise ValueError: the line is malformed (the message says how).
        """
        words = line.split()
        if len(words) < 3:
            raise ValueError(
                f"farm line {line.strip()!r}: expected "
                "'NAME STT-ENDPOINT TTS-ENDPOINT [weight=N] [fallback]'"
            )
        name, stt, tts = words[:3]
        weight = 1.0
        fallback = False
        status = None
        seen: set[str] = set()
        for option in words[3:]:
            key = option.split("=", 1)[0]
            if key in seen:
                raise ValueError(f"farm {name!r}: {key!r} given twice")
            seen.add(key)
            if option == "fallback":
                fallback = True
            elif key == "weight":
                text = option.split("=", 1)[1] if "=" in option else ""
                try:
                    weight = float(text)
                except ValueError:
                    raise ValueError(
                        f"farm {name!r}: weight must be a positive number, not {text!r}"
                    ) from None
                if not math.isfinite(weight) or weight <= 0:
                    raise ValueError(
                        f"farm {name!r}: weight must be a positive number, not {text!r}"
                    )
            elif key == "status":
                status = option.split("=", 1)[1] if "=" in option else ""
                if not status.startswith(("http://", "https://")):
                    raise ValueError(
                        f"farm {name!r}: status must be an http(s) URL, not {status!r}"
                    )
            else:
                raise ValueError(
                    f"farm {name!r}: unknown option {option!r} "
                    "(expected weight=N, fallback or status=URL)"
                )
        endpoints = {}
        for service, text in (("stt", stt), ("tts", tts)):
            if text.lower() == _NONE:
                endpoints[service] = None
                continue
            _checkEndpoint(name, service, text)
            endpoints[service] = text
        return cls(name, endpoints["stt"], endpoints["tts"], weight, fallback, status)


def _checkEndpoint(name: str, service: str, text: str) -> None:
    """
    Reject an endpoint string Twisted could not connect with (unknown type,
    missing or bad port...), at configuration time rather than at the first
    request. Building an endpoint does not touch the reactor.
    """
    try:
        checkEndpoint(text)
    except ValueError as e:
        raise ValueError(
            f"farm {name!r}: bad {service} endpoint {text!r} ({e}); "
            "expected a Twisted client endpoint string such as "
            "'tcp:host=farm.example:port=1776', or 'none'"
        ) from None


def parseFarms(lines: Iterable[str]) -> list[FarmEntry]:
    """
    The farm directory from config lines (L{FarmEntry.parse}); blank lines
    and C{#} comments are skipped.

    @raise ValueError: a bad line (its number is in the message), a name used
        twice, or no farm at all.
    """
    farms: list[FarmEntry] = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        try:
            entry = FarmEntry.parse(line)
        except ValueError as e:
            raise ValueError(f"farm line {number}: {e}") from None
        if any(f.name == entry.name for f in farms):
            raise ValueError(f"farm line {number}: farm {entry.name!r} is listed twice")
        farms.append(entry)
    if not farms:
        raise ValueError("no farms configured")
    return farms


def weightedChoice(
    entries: list[T], rng: random.Random, weight: Callable[[T], float] = lambda e: e.weight
) -> T:
    """
    Draw one of C{entries} with probability proportional to its C{weight}
    (a farm line's own, by default).
    """
    if not entries:
        raise ValueError("nothing to choose from")
    total = sum(weight(e) for e in entries)
    point = rng.random() * total
    for entry in entries:
        point -= weight(entry)
        if point < 0:
            return entry
    return entries[-1]
