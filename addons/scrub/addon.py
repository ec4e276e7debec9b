"""The scrub addon: the origin learns who the client is; the client learns nothing of the origin."""

from __future__ import annotations

from mitmproxy import http

from addons.client import public_base, split_host
from addons.config import EdgeConfig, ScrubConfig
from addons.failsafe import fail_closed
from addons.scrub.masking import OriginMask
from addons.trace import decisions


class Scrub:
    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.mask = OriginMask([])
        self.configure_scrub(ScrubConfig())

    def configure_scrub(self, settings: ScrubConfig) -> None:
        self.drop = frozenset(n.lower().encode() for n in (*settings.strip, "via"))
        self.server = settings.server_header.encode() if settings.server_header is not None else None

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies
        self.mask = OriginMask((o.host, o.port) for o in config.origins)
        self.configure_scrub(config.scrub)

    # -- towards the client -------------------------------------------------------------------------

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response.stream:     # headers leave before `response` fires
            self._mask(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.response.stream:
            self._mask(flow)

    def interim_fields(self, fields: tuple, request: http.Request) -> tuple:
        """The masking of `_mask` for an interim (1xx) response, which has no flow hook: the
        public address comes from the forwarding headers this addon put on the request."""
        headers = request.headers
        proto = headers.get("x-forwarded-proto", "http")
        host = headers.get("x-forwarded-host") or request.host_header or ""
        base = f"{proto}://{host}"
        masked, _, _ = self.mask.scrub_fields(fields, base, split_host(host), self.drop, None)
        return masked

    def _mask(self, flow: http.HTTPFlow) -> None:
        rec, headers = decisions(flow), flow.response.headers
        base = public_base(flow, self.trusted)
        fields, removed, rewritten = self.mask.scrub_fields(
            headers.fields, base, split_host(base.split("://", 1)[1]), self.drop, self.server)
        headers.fields = fields
        if removed:
            rec["scrubbed"] = removed
        if rewritten:
            rec["rewritten"] = rewritten
