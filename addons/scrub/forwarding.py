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


def drop_set(overrides: frozenset[bytes] = frozenset()) -> frozenset[bytes]:
    """What `forwardable` removes from a request besides the fields its Connection names: the
    hop-by-hop and forwarding headers, and `overrides` (lower-case names: the override headers
    of a client that is not a trusted proxy). Worked out once per config, not per request."""
    return _DROP | overrides


def forwardable(fields: Fields, drop: frozenset[bytes] = _DROP) -> tuple[Fields, list[bytes]]:
    """Request header fields without those in `drop` (see drop_set) and those the client named
    in Connection (RFC 9110 7.6.1), and the names removed. A WebSocket upgrade keeps
    `Connection: upgrade` and `Upgrade`, which mitmproxy relays end to end; message framing
    (Content-Length, Transfer-Encoding) and Host are never touched. One pass over the names: it
    runs for every request, cache hits included."""
    names = [k.lower() for k, _ in fields]
    if b"connection" in names or b"upgrade" in names:
        named = {t.strip().lower() for n, (_, v) in zip(names, fields) if n == b"connection" for t in v.split(b",")}
        drop = drop | (named - _FRAMING)
        if any(n == b"upgrade" and v.strip().lower() == b"websocket" for n, (_, v) in zip(names, fields)):
            drop = drop - {b"connection", b"upgrade"}
    kept = tuple(f for n, f in zip(names, fields) if n not in drop)
    return kept, [f[0] for n, f in zip(names, fields) if n in drop] if len(kept) < len(fields) else []


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
