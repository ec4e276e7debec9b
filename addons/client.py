"""Facts about the client every addon agrees on, worked out once per flow and kept in the trace."""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import http

from addons.net import client_ip, in_networks, parse_ip
from addons.trace import decisions


def client_of(flow: http.HTTPFlow, trusted: Sequence) -> str:
    """The real client IP (honouring trusted proxies' X-Forwarded-For), cached in the trace."""
    rec = decisions(flow)
    ip = rec.get("client")
    if ip is None:
        xff = flow.request.headers.get_all("x-forwarded-for") if trusted else ()
        ip = rec["client"] = client_ip(flow.client_conn.peername[0], xff, trusted)
    return ip


def _last(value: str | None) -> str | None:
    return value.rsplit(",", 1)[-1].strip() or None if value else None


def public_base(flow: http.HTTPFlow, trusted: Sequence) -> str:
    """scheme://host the client used to reach us (a trusted proxy's X-Forwarded-Proto/-Host
    win), cached in the trace: the address every rewrite points at. Call it before the
    forwarding headers are replaced."""
    rec = decisions(flow)
    base = rec.get("public_base")
    if base is None:
        req = flow.request
        proto = "https" if flow.client_conn.tls_established else "http"
        host = req.host_header
        if trusted and in_networks(parse_ip(flow.client_conn.peername[0]), trusted):
            proto = _last(req.headers.get("x-forwarded-proto")) or proto
            host = _last(req.headers.get("x-forwarded-host")) or host
        base = rec["public_base"] = f"{proto}://{host or flow.client_conn.sockname[0]}"
        rec["public_url"] = base + req.path
    return base


def split_host(authority: str) -> str:
    """The host part of a Host header value, lower case, without port or brackets."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
