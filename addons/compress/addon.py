"""The compress addon: one coding per client, chosen from Accept-Encoding; the request's
Accept-Encoding is narrowed to that choice so the cache keeps one variant per coding and a
hit never compresses again. Runs before the cache in the chain."""

from __future__ import annotations

from mitmproxy import http

from addons.compress.negotiate import choose, compressible, encode, weak_etag
from addons.config import CompressConfig, EdgeConfig
from addons.failsafe import fail_closed
from addons.trace import decisions

META = "edge.encoding"


class Compress:
    def __init__(self) -> None:
        self.settings = CompressConfig(enabled=False)

    def apply(self, config: EdgeConfig) -> None:
        self.settings = config.compress

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not self.settings.enabled:
            return
        headers = flow.request.headers
        coding = choose(headers.get("accept-encoding"), self.settings.encodings) or "identity"
        flow.metadata[META] = coding
        headers["Accept-Encoding"] = coding         # the origin and the cache's Vary see the choice

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        coding = flow.metadata.get(META)
        resp = flow.response
        if coding is None or resp.stream:
            return
        headers, body = resp.headers, resp.raw_content
        if (resp.status_code != 200 or body is None or len(body) < self.settings.min_size
                or "content-encoding" in headers or not compressible(headers.get("content-type"))
                or "no-transform" in headers.get("cache-control", "").lower()):
            return                      # the same bytes for every client: no Vary needed
        vary = headers.get("vary", "")
        if "accept-encoding" not in vary.lower() and "*" not in vary:
            headers["Vary"] = f"{vary}, Accept-Encoding" if vary else "Accept-Encoding"
        if coding == "identity":
            return
        encoded = encode(body, coding)
        if len(encoded) >= len(body):
            return
        headers["Content-Encoding"] = coding
        resp.raw_content = encoded
        headers["Content-Length"] = str(len(encoded))
        if "etag" in headers:
            headers["ETag"] = weak_etag(headers["etag"])
        decisions(flow)["compress"] = f"{coding} {len(body)}->{len(encoded)}"
