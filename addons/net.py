"""Addresses: who the client really is, and which addresses are internal. Pure functions."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that name something inside a network and never belong in a public response.
INTERNAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",    # RFC 1918
    "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",  # loopback, link-local, shared (CGNAT)
    "::1/128", "fc00::/7", "fe80::/10",                 # loopback, RFC 4193 ULA, link-local
    "0.0.0.0/8", "::/128", "fec0::/10",                 # "this host" (http://0.0.0.0:5000/), deprecated site-local
))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))   # RFC 6052, RFC 8215
_V4_PART = {16: re.compile(r"[0-9a-f]*"), 8: re.compile(r"[0-7]*"), 10: re.compile(r"[0-9]+")}


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


def parse_ipv4_host(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a browser reads from a URL host (WHATWG URL, IPv4 parser): one to four
    dot-separated parts, each decimal, octal (leading 0) or hex (0x), the last filling the
    remaining bytes: 167838211, 0x0a010203, 012.1.2.3 and 10.1.515 are all 10.1.2.3."""
    parts = text.lower().split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        if part.startswith("0x"):
            digits, base = part[2:], 16
        elif len(part) > 1 and part[0] == "0":
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if not _V4_PART[base].fullmatch(digits) or len(digits) > 32:
            return None
        numbers.append(int(digits, base) if digits else 0)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


@lru_cache(maxsize=4096)
def parse_host_ip(host: str) -> IPAddress | None:
    """The address a URL host names, in any spelling a browser accepts: IPv6 with or without
    brackets and zone id, or IPv4 as `parse_ipv4_host` reads it. None for a name."""
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    return parse_ipv4_host(host) if host and (host[-1].isdigit() or host[-1] == "." or "0x" in host.lower()) else None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
    (::a.b.c.d), 6to4 (2002:AABB:CCDD::/48) or NAT64 (64:ff9b::a.b.c.d)."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_internal(ip: IPAddress, extra: Sequence = ()) -> bool:
    """Is the address (or the IPv4 address inside it) in an internal range, or in `extra`?"""
    inner = embedded_ipv4(ip)
    if inner is not None and is_internal(inner, extra):
        return True
    return any(ip in net for net in (*INTERNAL_NETWORKS, *extra) if net.version == ip.version)


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
