"""
Who the client is, and whether it came over TLS, behind reverse proxies
the operator trusts (C{--trusted-proxies}).

A proxy that terminates TLS (nginx, Caddy) connects to the API itself: the
TCP peer is the proxy, and the request is plain HTTP. A trusted proxy says
what it saw in C{X-Forwarded-For} (each proxy appends the address it was
connected from) and C{X-Forwarded-Proto}. Only a peer within a trusted
network is believed: from any other, both headers are ignored, so a client
cannot make itself someone else or its plain HTTP TLS.

The client is the right-most C{X-Forwarded-For} address that is not itself
a trusted proxy: the addresses to its left were written by the client (or
by proxies nobody vouches for) and may be made up. An entry that is not an
address, met on the way, makes the request the proxy's own (the peer's
address), as does no header at all.

Pure: L{TrustedProxies.view} takes the peer, whether its connection is
TLS, and the two headers' values; L{TrustedProxies.ofRequest} reads them
from a request. No address is logged.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from twisted.web.iweb import IRequest

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class ClientView:
    """
    A request as its client made it: the client's address (the peer's
    where no trusted proxy says otherwise; empty when the peer has no IP
    address, e.g. a UNIX socket) and whether it came over TLS.
    """

    address: str
    secure: bool


def _address(text: str) -> _Address | None:
    """
    C{text} as an IP address (an IPv4-mapped IPv6 one as its IPv4), or
    L{None} if it is not one.
    """
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _values(headers: Sequence[bytes | str]) -> list[str]:
    """
    The comma-separated values of a header's lines, in order.
    """
    values = []
    for line in headers:
        text = line.decode("latin-1") if isinstance(line, bytes) else line
        values += [v.strip() for v in text.split(",")]
    return values


class TrustedProxies:
    """
    The networks whose peers' C{X-Forwarded-For} and C{X-Forwarded-Proto}
    are believed.

    @param networks: IP addresses and CIDR networks (C{"127.0.0.1"},
        C{"10.0.0.0/8"}, C{"::1"}); an item may hold several, separated by
        commas or spaces. None: no proxy is trusted.
    @raise ValueError: an item that is neither.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        parsed: list[_Network] = []
        for item in networks:
            for word in _SEPARATORS.split(item.strip()):
                if not word:
                    continue
                try:
                    network = ipaddress.ip_network(word, strict=False)
                except ValueError:
                    raise ValueError(f"not an IP address or network: {word!r}") from None
                if isinstance(network, ipaddress.IPv6Network):
                    mapped = network.network_address.ipv4_mapped
                    if mapped is not None and network.prefixlen >= 96:
                        network = ipaddress.ip_network(
                            f"{mapped}/{network.prefixlen - 96}", strict=False
                        )
                parsed.append(network)
        self.networks: tuple[_Network, ...] = tuple(parsed)

    def __len__(self) -> int:
        return len(self.networks)

    def trusts(self, address: str | _Address | None) -> bool:
        """
        Whether C{address} is within a trusted network.
        """
        if isinstance(address, str):
            address = _address(address)
        if address is None:
            return False
        return any(address in network for network in self.networks)

    def view(
        self,
        peer: str,
        tls: bool,
        forwardedFor: Sequence[bytes | str] = (),
        forwardedProto: Sequence[bytes | str] = (),
    ) -> ClientView:
        """
        The client and its TLS, for a request from C{peer} (over TLS if
        C{tls}) with these C{X-Forwarded-For} and C{X-Forwarded-Proto}
        header lines.
        """
        peerAddress = _address(peer)
        if peerAddress is None or not self.trusts(peerAddress):
            return ClientView(str(peerAddress) if peerAddress is not None else peer, tls)
        protos = [p for p in _values(forwardedProto) if p]
        secure = protos[-1].lower() == "https" if protos else tls
        chain = _values(forwardedFor)
        client = peerAddress
        for entry in reversed(chain):
            hop = _address(entry)
            if hop is None:
                # A proxy we trust wrote nonsense: the request is its own.
                client = peerAddress
                break
            client = hop
            if not self.trusts(hop):
                break
        return ClientView(str(client), secure)

    def ofRequest(self, request: IRequest) -> ClientView:
        """
        L{view} for C{request}: its TCP peer, its transport's TLS and its
        headers.
        """
        peer = getattr(request.getClientAddress(), "host", "") or ""
        headers = request.requestHeaders
        return self.view(
            peer,
            bool(request.isSecure()),
            headers.getRawHeaders(b"x-forwarded-for", []),
            headers.getRawHeaders(b"x-forwarded-proto", []),
        )
