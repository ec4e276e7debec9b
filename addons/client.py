"""Facts about the client every addon agrees on, worked out once per flow and kept in the trace."""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import http

from addons.net import client_ip
from addons.trace import decisions


def client_of(flow: http.HTTPFlow, trusted: Sequence) -> str:
    """The real client IP (honouring trusted proxies' X-Forwarded-For), cached in the trace."""
    rec = decisions(flow)
    ip = rec.get("client")
    if ip is None:
        xff = flow.request.headers.get_all("x-forwarded-for") if trusted else ()
        ip = rec["client"] = client_ip(flow.client_conn.peername[0], xff, trusted)
    return ip


def split_host(authority: str) -> str:
    """The host part of a Host header value, lower case, without port or brackets."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
