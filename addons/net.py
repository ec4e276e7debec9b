"""Addresses: who the client really is, and which addresses are internal. Pure functions."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that name something inside a network and never belong in a public response.
INTERNAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",    # RFC 1918
    "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",  # loopback, link-local, shared (CGNAT)
    "::1/128", "fc00::/7", "fe80::/10",                 # loopback, RFC 4193 ULA, link-local
))


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress | None:
    """An address from text (brackets, IPv4-mapped IPv6 and zone ids handled), or None."""
    text = text.strip().strip('"').strip("[]")
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def is_internal(ip: IPAddress) -> bool:
    return any(ip in net for net in INTERNAL_NETWORKS if net.version == ip.version)


def in_networks(ip: IPAddress | None, networks: Sequence) -> bool:
    """Is the address in one of the networks (trusted proxies, allow and deny lists)?"""
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def client_ip(peer: str, forwarded_for: Iterable[str], trusted: Sequence) -> str:
    """The real client: the peer, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not itself a trusted proxy (entries left of it are
    whatever the client claimed and are not believed)."""
    peer_ip = parse_ip(peer)
    if not trusted or not in_networks(peer_ip, trusted):
        return str(peer_ip) if peer_ip else peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        ip = parse_ip(hop)
        if ip is None:          # garbage in the chain: stop believing it here
            break
        if not in_networks(ip, trusted):
            return str(ip)
    return str(peer_ip)
