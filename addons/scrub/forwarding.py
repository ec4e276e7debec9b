"""What the origin is told about the client: forwarding headers and hop-by-hop removal. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from addons.net import parse_ip

# RFC 9110 7.6.1, plus the non-standard ones proxies meet in practice. Transfer-Encoding is left
# to mitmproxy, which owns message framing on both sides.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                        "proxy-authenticate", "proxy-authorization"})
# Claims about the client that only a trusted proxy may make.
FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
              "x-forwarded-port", "x-real-ip", "x-client-ip", "true-client-ip")


def hop_by_hop(connection_values: Iterable[str], websocket_upgrade: bool = False) -> set[str]:
    """Header names (lower case) to remove before forwarding. A WebSocket upgrade keeps
    `Connection: upgrade` and `Upgrade`, which mitmproxy relays end to end."""
    names = set(HOP_BY_HOP)
    names.update(t.strip().lower() for v in connection_values for t in v.split(",") if t.strip())
    names.discard("transfer-encoding")
    names.discard("content-length")
    if websocket_upgrade:
        names -= {"connection", "upgrade"}
    return names


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
