"""What the origin is told about the client: forwarding headers and hop-by-hop removal. Pure."""

from __future__ import annotations

from addons.net import parse_ip

# RFC 9110 7.6.1, plus the non-standard ones proxies meet in practice. Transfer-Encoding is left
# to mitmproxy, which owns message framing on both sides.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                        "proxy-authenticate", "proxy-authorization"})
# Claims about the client that only a trusted proxy may make.
FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
              "x-forwarded-port", "x-real-ip", "x-client-ip", "true-client-ip")


Fields = tuple[tuple[bytes, bytes], ...]
_DROP = frozenset(n.encode() for n in (*HOP_BY_HOP, *FORWARDING))
_FRAMING = frozenset({b"transfer-encoding", b"content-length", b"host"})


def header_set(names) -> frozenset[bytes]:
    """Header names as `forwardable` compares them: lower-case bytes."""
    return frozenset(n.lower().encode() for n in names)


def forwardable(fields: Fields, overrides: frozenset[bytes] = frozenset()) -> Fields:
    """Request header fields without hop-by-hop headers (RFC 9110 7.6.1, and those the client
    named in Connection), without the client's own forwarding claims, and without the
    `overrides` (lower-case names: the override headers of a client that is not a trusted
    proxy). A WebSocket upgrade keeps `Connection: upgrade` and `Upgrade`, which mitmproxy
    relays end to end; message framing (Content-Length, Transfer-Encoding) is mitmproxy's and
    is never touched."""
    drop = _DROP | overrides if overrides else _DROP
    named = [v for k, v in fields if k.lower() == b"connection"]
    websocket = any(k.lower() == b"upgrade" and v.strip().lower() == b"websocket" for k, v in fields)
    if named or websocket:
        drop = set(drop).union(t.strip().lower() for v in named for t in v.split(b",")) - _FRAMING
        if websocket:
            drop -= {b"connection", b"upgrade"}
    return tuple(f for f in fields if f[0].lower() not in drop)


def forwarded_node(ip: str) -> str:
    """RFC 7239 node: IPv6 is quoted and bracketed."""
    parsed = parse_ip(ip)
    return f'"[{parsed}]"' if parsed is not None and parsed.version == 6 else ip


def forwarding_headers(client: str, proto: str, host: str | None) -> dict[str, str]:
    """The headers the origin gets about the client, all derived from verified facts."""
    out = {"X-Forwarded-For": client, "X-Forwarded-Proto": proto}
    fwd = f"for={forwarded_node(client)};proto={proto}"
    if host:
        out["X-Forwarded-Host"] = host
        fwd += f';host="{host}"'
    out["Forwarded"] = fwd
    return out
