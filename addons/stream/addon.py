"""The stream addon: decides, per body, whether it is relayed as it arrives (rules.py), and
keeps no WebSocket history. Runs after the cache and routing (a hit or an edge answer is
never streamed; a streamed request's origin connection opens right after `requestheaders`)
and before the scrub, whose `responseheaders` masks a streamed head before it leaves.

Backpressure is mitmproxy's own once a body streams: after every read it waits for all of
the connection's writers to drain (proxy/server.py drain_writers), so a slow reader stops
the origin read and a slow origin's bytes go out as they come. The HTTP/2 case it misses is
covered in internals (streamed_held)."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http
from mitmproxy.net.http.http1 import expected_http_body_size

from addons import internals
from addons.failsafe import fail_closed
from addons.protocol.rules import declared_length
from addons.stream import rules
from addons.trace import STREAMED, decisions

SENT = STREAMED          # flow metadata: body bytes of a streamed response relayed so far


def response_length(flow: http.HTTPFlow) -> int | None:
    """The response body's size from its framing; None when unknown."""
    try:
        length = expected_http_body_size(flow.request, flow.response)
    except ValueError:
        return None
    return None if length is None or length < 0 else length


def request_length(request: http.Request) -> int | None:
    if "transfer-encoding" in request.headers:
        return None
    length = declared_length(request.headers.fields)
    if length is None and not (request.is_http2 or request.is_http3):
        return 0                        # HTTP/1 without framing has no body
    return length


class Relay:
    """A streamed response's chunk function: counts what passes (the access log's bytes)."""

    def __init__(self, flow: http.HTTPFlow) -> None:
        self.metadata = flow.metadata
        self.metadata[SENT] = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.metadata[SENT] += len(chunk)
        return chunk


class Stream:
    def __init__(self, inspects_body: Callable[[http.HTTPFlow], bool] = lambda flow: False,
                 on_streamed: Callable[[http.HTTPFlow], None] = lambda flow: None) -> None:
        """`inspects_body(flow)`: a WAF will read this request's body in `request`;
        `on_streamed(flow)`: told when a response head is about to leave ahead of its body."""
        self.buffer_limit = 2**20
        self.inspects_body, self.on_streamed = inspects_body, on_streamed
        self.web = False

    def apply(self, buffer_limit: int, web: bool) -> None:
        self.buffer_limit, self.web = buffer_limit, web

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        after = rules.request_stream_after(request_length(flow.request), self.buffer_limit, self.inspects_body(flow))
        if after == 0:
            flow.request.stream = True
        elif after is not None:
            flow.metadata[internals.STREAM_AFTER] = after      # internals switches once that much is held

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:             # a streamed body ended (this hook follows its last byte)
            decisions(flow)["stream"] = "request"

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp.raw_content is not None or resp.stream:    # made by an addon (a hit, an answer): whole already
            return
        if rules.stream_response(response_length(flow), resp.headers.get("content-type"), self.buffer_limit):
            resp.stream = Relay(flow)
            self.on_streamed(flow)
            rec = decisions(flow)
            rec["stream"] = f"{rec['stream']}, response" if "stream" in rec else "response"

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        messages = flow.websocket.messages
        sizes = [len(m.content) for m in messages] if self.web else [0] * len(messages)
        if drop := rules.messages_to_drop(sizes, self.web):
            del messages[:drop]
