"""The scrub addon: the origin learns who the client is; the client learns nothing of the origin."""

from __future__ import annotations

from mitmproxy import http

from addons.client import client_of, split_host
from addons.config import EdgeConfig, ScrubConfig
from addons.failsafe import fail_closed
from addons.net import is_trusted, parse_ip
from addons.scrub.forwarding import FORWARDING, forwarding_headers, hop_by_hop
from addons.scrub.masking import UNSCANNED, URL_HEADERS, OriginMask
from addons.trace import decisions


def _last(value: str | None) -> str | None:
    return value.rsplit(",", 1)[-1].strip() or None if value else None


class Scrub:
    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.settings = ScrubConfig()
        self.strip: frozenset[str] = frozenset(n.lower() for n in self.settings.strip)
        self.mask = OriginMask([])

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies
        self.settings = config.scrub
        self.strip = frozenset(n.lower() for n in config.scrub.strip)
        self.mask = OriginMask((o.host, o.port) for o in config.origins)

    # -- towards the origin -------------------------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        req, rec = flow.request, decisions(flow)
        headers = req.headers
        client = client_of(flow, self.trusted)
        proto = "https" if flow.client_conn.tls_established else "http"
        host = req.host_header
        if self.trusted and is_trusted(parse_ip(flow.client_conn.peername[0]), self.trusted):
            proto = _last(headers.get("x-forwarded-proto")) or proto
            host = _last(headers.get("x-forwarded-host")) or host
        websocket = headers.get("upgrade", "").lower() == "websocket"
        for name in hop_by_hop(headers.get_all("connection"), websocket):
            headers.pop(name, None)
        for name in FORWARDING:
            headers.pop(name, None)
        headers.update(forwarding_headers(client, proto, host))
        rec["public_url"] = f"{proto}://{host or req.host}{req.path}"
        rec["public_base"] = f"{proto}://{host or req.host}"

    # -- towards the client -------------------------------------------------------------------------

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response.stream:     # headers leave before `response` fires
            self._mask(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.response.stream:
            self._mask(flow)

    def _mask(self, flow: http.HTTPFlow) -> None:
        headers, rec, mask = flow.response.headers, decisions(flow), self.mask
        if "server" in headers or self.settings.server_header is not None:
            headers.pop("server", None)
            if self.settings.server_header is not None:
                headers["Server"] = self.settings.server_header
        base = rec.get("public_base") or f"{flow.request.scheme}://{flow.request.host_header}"
        public_host = split_host(base.split("://", 1)[1])
        removed, rewritten = [], []
        for name in list(headers.keys()):
            low = name.lower()
            if low in self.strip or low == "via":
                del headers[name]
                removed.append(name)
                continue
            if low in UNSCANNED:
                continue
            values = headers.get_all(name)
            if low in URL_HEADERS:
                new = [mask.rewrite_url(v, base, public_host) for v in values]
            elif low == "link":
                new = [mask.rewrite_links(v, base, public_host) for v in values]
            elif low == "refresh":
                new = [mask.rewrite_refresh(v, base, public_host) for v in values]
            elif low == "set-cookie":
                new = [mask.rewrite_cookie_domain(v, public_host) for v in values]
            else:
                new = values
            if new != values:
                rewritten.append(name)
            kept = [v for v in new if not mask.leaks(v, public_host)]
            if len(kept) != len(new):
                removed.append(name)
            if kept != values:
                headers.set_all(name, kept)
        if removed:
            rec["scrubbed"] = removed
        if rewritten:
            rec["rewritten"] = rewritten
