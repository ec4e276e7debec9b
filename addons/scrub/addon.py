"""The scrub addon: the origin learns who the client is; the client learns nothing of the origin."""

from __future__ import annotations

from mitmproxy import http

from addons.client import public_base, split_host
from addons.config import EdgeConfig, ScrubConfig
from addons.failsafe import edge_answer, fail_closed
from addons.scrub.masking import OriginMask, public_address
from addons.trace import decisions


class Scrub:
    def __init__(self) -> None:
        self.trusted: tuple = ()
        self.mask = OriginMask([])
        self.origins: dict[tuple[str, int], None] = {}     # every origin of every config applied
        self.configure_scrub(ScrubConfig())

    def configure_scrub(self, settings: ScrubConfig) -> None:
        self.drop = frozenset(n.lower().encode() for n in (*settings.strip, "via"))
        self.server = settings.server_header.encode() if settings.server_header is not None else None
        self.error_bodies = settings.error_bodies == "mask"

    def apply(self, config: EdgeConfig) -> None:
        self.trusted = config.trusted_proxies
        # an origin a reload removed is still masked: its answers in flight, and cached ones, name it
        self.origins.update(dict.fromkeys((o.host, o.port) for o in config.origins))
        self.mask = OriginMask(self.origins, config.scrub.internal_domains, config.scrub.internal_networks)
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
        if flow.response.trailers:      # sent after this hook, streamed or not
            self._mask_trailers(flow)

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
        rec, resp = decisions(flow), flow.response
        base = public_base(flow, self.trusted)
        host = split_host(base.split("://", 1)[1])
        fields, removed, rewritten = self.mask.scrub_fields(
            resp.headers.fields, base, host, self.drop, self.server, flow.request.headers.get("origin"))
        resp.headers.fields = fields
        if removed:
            rec["scrubbed"] = removed
        if rewritten:
            rec["rewritten"] = rewritten
        public = public_address(base, host)
        if resp.reason and resp.reason != http.status_codes.RESPONSES.get(resp.status_code) and \
                self.mask.leaks(resp.reason, public):
            resp.reason = http.status_codes.RESPONSES.get(resp.status_code, "")
            rec.setdefault("masked", []).append("reason")
        if (self.error_bodies and resp.status_code >= 500 and not resp.stream and resp.raw_content and
                self.mask.body_leaks(resp.raw_content, resp.headers.get("content-type"),
                                     resp.headers.get("content-encoding"), public)):
            self._error_page(flow)
            rec.setdefault("masked", []).append("body")

    def _mask_trailers(self, flow: http.HTTPFlow) -> None:
        """Trailer fields (gRPC's grpc-message, a Server-Timing) leak as readily as headers."""
        base = public_base(flow, self.trusted)
        trailers = flow.response.trailers
        trailers.fields, removed, _ = self.mask.scrub_fields(
            trailers.fields, base, split_host(base.split("://", 1)[1]), self.drop, None)
        if removed:
            decisions(flow).setdefault("scrubbed", []).extend(removed)

    @staticmethod
    def _error_page(flow: http.HTTPFlow) -> None:
        """The origin's 5xx body named an internal address: the edge's page of the same status
        instead, keeping the origin's other headers (Retry-After, Cache-Status, cookies...)
        but none that described the replaced body."""
        resp = flow.response
        page = edge_answer(flow, resp.status_code, "the origin could not complete this request")
        own = {k.lower() for k in page.headers}
        kept = tuple((k, v) for k, v in resp.headers.fields
                     if k.lower() not in REPRESENTATION and k.decode("latin-1").lower() not in own)
        resp.headers.fields = page.headers.fields + kept
        resp.raw_content = page.raw_content


# Headers about the body itself: wrong for the edge's page that replaces it.
REPRESENTATION = frozenset({b"content-type", b"content-length", b"content-encoding", b"content-language",
                            b"content-location", b"content-range", b"content-disposition", b"content-md5",
                            b"digest", b"content-digest", b"repr-digest", b"etag", b"last-modified",
                            b"transfer-encoding"})
