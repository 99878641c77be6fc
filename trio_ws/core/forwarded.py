"""The client's address behind trusted proxies: ``X-Forwarded-For`` and ``Forwarded``.

Theory of operation: a header that names the client is believed only from a peer that is a
configured trusted proxy (``TRIO_WS_TRUSTED_PROXIES``); from anyone else it is ignored, since
any client can write it. A proxy appends the address it got the request from to the right of
the list (nginx's ``$proxy_add_x_forwarded_for``), keeping what the client sent on the left.
So the list is read from the right: while the address is another trusted proxy, go one step
left; the first untrusted address is the client. What a client wrote itself is further left
and is never reached. An entry that is not an address stops the walk at the last trusted hop.

``X-Forwarded-For`` is read when present (nginx always sets it), else ``Forwarded`` (RFC 7239,
its ``for=`` parameters). A proxy that writes only ``Forwarded`` must drop a client's
``X-Forwarded-For`` (docs/operations.md, "Trusted proxies").
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    Network = ipaddress.IPv4Network | ipaddress.IPv6Network
    Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address | None:
    """An address from a header entry: ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``,
    ``[2001:db8::1]:80``, optionally quoted; None for anything else (``unknown``, ``_hidden``)."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header, in order (an element without one gives
    ``""``, which is no address)."""
    found = []
    for element in value.split(","):
        node = ""
        for pair in element.split(";"):
            name, _, content = pair.partition("=")
            if name.strip().lower() == "for":
                node = content.strip()
        found.append(node)
    return found


class TrustedProxies:
    """The peers whose forwarding headers are believed."""

    def __init__(self, entries: Sequence[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in entries
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client_address(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The client's address as the trusted proxies report it, or None when the peer is
        itself the client (it is no trusted proxy, or it forwarded no usable header)."""
        if not self.networks:
            return None
        peer_address = parse_address(peer)
        if peer_address is None or not self.trusts(peer_address):
            return None
        xff: list[str] = []
        forwarded: list[str] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"x-forwarded-for":
                xff.extend(value.decode("latin-1").split(","))
            elif lowered == b"forwarded":
                forwarded.extend(forwarded_for(value.decode("latin-1")))
        chain = xff or forwarded
        client: Address | None = None
        for entry in reversed(chain):
            address = parse_address(entry)
            if address is None:
                break
            client = address
            if not self.trusts(address):
                break
        return None if client is None else str(client)

    def forwarded_origin(
        self, peer: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[str | None, str | None]:
        """The host and scheme the client's request was made to, as a trusted proxy reports
        them in ``X-Forwarded-Host`` / ``X-Forwarded-Proto`` (the nearest proxy's entry, the
        last of a list); ``(None, None)`` when the peer is no trusted proxy."""
        if not self.networks:
            return None, None
        peer_address = parse_address(peer)
        if peer_address is None or not self.trusts(peer_address):
            return None, None
        host = scheme = None
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"x-forwarded-host":
                host = value.decode("latin-1").split(",")[-1].strip() or None
            elif lowered == b"x-forwarded-proto":
                scheme = value.decode("latin-1").split(",")[-1].strip().lower() or None
        return host, scheme
