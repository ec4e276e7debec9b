"""The compress addon: one coding per client, chosen from Accept-Encoding. The origin is asked
for its identity representation (Accept-Encoding: identity) and the edge makes each coding from
it, so the cache keeps the origin's response once and each coding made from it as a variant:
br, zstd, gzip and identity clients of one page cost one origin fetch. Runs before the cache in
the chain: the cache looks up and stores with the request the origin sees.

Codings are made here, on the way to the client, for a response from the origin as for a hit
the cache answered with the base (the cache makes them itself only for an answer it makes after
this addon's turn); the origin's representation is left in flow.metadata (BASE) so the cache
stores it and the result as the variant. Bodies of THREAD_MIN bytes and more, and every decoding
(a small body can expand a thousandfold), run in a thread: br of 50 MiB blocked the event loop
2.4 s."""

from __future__ import annotations

import asyncio

from mitmproxy import http

from addons.compress.negotiate import choose
from addons.compress.variants import THREAD_MIN, encoded_fields, plan, represent, with_accept_encoding
from addons.config import CompressConfig, EdgeConfig
from addons.failsafe import fail_closed
from addons.trace import decisions

META = "edge.encoding"          # the coding this client gets
ACCEPT = "edge.encoding.accept"  # the client's Accept-Encoding (the origin is sent identity)
BASE = "edge.encoding.base"     # (fields, body) of the representation the encoding was made from
ENABLED = "edge.compress.enabled"   # a site route's compress.enabled, in place of the config's


class Compress:
    def __init__(self) -> None:
        self.settings = CompressConfig(enabled=False)
        self.encoding: dict[tuple[int, str], asyncio.Future] = {}   # (id(body), coding) -> its encoding in a thread

    def apply(self, config: EdgeConfig) -> None:
        self.settings = config.compress

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.metadata.get(ENABLED, self.settings.enabled):
            return
        headers = flow.request.headers
        flow.metadata[ACCEPT] = headers.get("accept-encoding")
        flow.metadata[META] = choose(flow.metadata[ACCEPT], self.settings.encodings) or "identity"
        headers["Accept-Encoding"] = "identity"     # one origin representation, every coding made here

    @fail_closed
    def response(self, flow: http.HTTPFlow):
        coding = flow.metadata.get(META)
        resp = flow.response
        if coding is None or resp.stream or resp.raw_content is None:
            return None
        headers, body = resp.headers, resp.raw_content
        varies, target = plan(resp.status_code, headers, len(body), self.settings.min_size, coding,
                              flow.metadata.get(ACCEPT))
        if not varies:
            return None                 # the same bytes for every client: no Vary needed
        if (vary := with_accept_encoding(headers.get("vary"))) is not None:
            headers["Vary"] = vary
        if target is None:
            return None
        own = headers.get("content-encoding")
        if target == "identity" and own is None:
            return None                 # the origin's own bytes are what this client takes
        if target == "identity" or len(body) >= THREAD_MIN:
            return self._off_loop(flow, body, own, target)
        self._replace(flow, target, represent(body, own, target))
        return None

    async def _off_loop(self, flow: http.HTTPFlow, body: bytes, own: str | None, target: str) -> None:
        """Concurrent hits on one stored body share one job (the bytes object is the cache's,
        alive while the job runs)."""
        job = (id(body), target)
        future = self.encoding.get(job)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(represent, body, own, target))
            self.encoding[job] = future
            future.add_done_callback(lambda _: self.encoding.pop(job, None))
        self._replace(flow, target, await asyncio.shield(future))

    @staticmethod
    def _replace(flow: http.HTTPFlow, target: str, made: bytes | None) -> None:
        if made is None:
            return                      # an origin's coding we could not undo: sent as it is
        resp = flow.response
        flow.metadata[BASE] = (resp.headers.fields, resp.raw_content)
        size = len(resp.raw_content)
        resp.headers.fields = encoded_fields(resp.headers.fields, target, len(made))
        resp.raw_content = made
        decisions(flow)["compress"] = f"{target} {size}->{len(made)}"
