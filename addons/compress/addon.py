"""The compress addon: one coding per client, chosen from Accept-Encoding. The origin is asked
for its identity representation (Accept-Encoding: identity) and the edge makes each coding from
it, so the cache keeps the origin's response once and each coding made from it as a variant:
br, zstd, gzip and identity clients of one page cost one origin fetch. Runs before the cache in
the chain: the cache looks up and stores with the request the origin sees.

Encoding happens here only, on the way to the client, for a response from the origin as for a
hit the cache answered with the base; the origin's representation is left in flow.metadata
(BASE) so the cache stores it and the encoded body as the variant. Bodies of THREAD_MIN bytes
and more are encoded in a thread: br of 50 MiB blocked the event loop 2.4 s."""

from __future__ import annotations

import asyncio

from mitmproxy import http

from addons.compress.negotiate import choose, encode
from addons.compress.variants import THREAD_MIN, encoded_fields, transformable, with_accept_encoding
from addons.config import CompressConfig, EdgeConfig
from addons.failsafe import fail_closed
from addons.trace import decisions

META = "edge.encoding"          # the coding this client gets
BASE = "edge.encoding.base"     # (fields, body) of the representation the encoding was made from


class Compress:
    def __init__(self) -> None:
        self.settings = CompressConfig(enabled=False)
        self.encoding: dict[tuple[int, str], asyncio.Future] = {}   # (id(body), coding) -> its encoding in a thread

    def apply(self, config: EdgeConfig) -> None:
        self.settings = config.compress

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not self.settings.enabled:
            return
        headers = flow.request.headers
        flow.metadata[META] = choose(headers.get("accept-encoding"), self.settings.encodings) or "identity"
        headers["Accept-Encoding"] = "identity"     # one origin representation, every coding made here

    @fail_closed
    def response(self, flow: http.HTTPFlow):
        coding = flow.metadata.get(META)
        resp = flow.response
        if coding is None or resp.stream or resp.raw_content is None:
            return None
        headers, body = resp.headers, resp.raw_content
        if not transformable(resp.status_code, headers, len(body), self.settings.min_size):
            return None                 # the same bytes for every client: no Vary needed
        if (vary := with_accept_encoding(headers.get("vary"))) is not None:
            headers["Vary"] = vary
        if coding == "identity":
            return None
        if len(body) >= THREAD_MIN:
            return self._encode_off_loop(flow, coding, body)
        self._replace(flow, coding, encode(body, coding))
        return None

    async def _encode_off_loop(self, flow: http.HTTPFlow, coding: str, body: bytes) -> None:
        """Concurrent hits on one stored body share one encoding (the bytes object is the
        cache's, alive while the job runs)."""
        job = (id(body), coding)
        future = self.encoding.get(job)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(encode, body, coding))
            self.encoding[job] = future
            future.add_done_callback(lambda _: self.encoding.pop(job, None))
        self._replace(flow, coding, await asyncio.shield(future))

    @staticmethod
    def _replace(flow: http.HTTPFlow, coding: str, encoded: bytes) -> None:
        resp = flow.response
        flow.metadata[BASE] = (resp.headers.fields, resp.raw_content)
        size = len(resp.raw_content)
        resp.headers.fields = encoded_fields(resp.headers.fields, coding, len(encoded))
        resp.raw_content = encoded
        decisions(flow)["compress"] = f"{coding} {size}->{len(encoded)}"
