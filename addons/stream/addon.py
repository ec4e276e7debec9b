"""The stream addon: decides, per body, whether it is relayed as it arrives (rules.py), and
keeps no WebSocket history. A streamed response is compressed on the way (encode.py) with
the coding the compress addon chose for the client. Runs after the cache and routing (a hit
or an edge answer is never streamed; a streamed request's origin connection opens right
after `requestheaders`) and before the scrub, whose `responseheaders` masks a streamed head
before it leaves.

Backpressure is mitmproxy's own once a body streams: after every read it waits for all of
the connection's writers to drain (proxy/server.py drain_writers), so a slow reader stops
the origin read and a slow origin's bytes go out as they come. The HTTP/2 case it misses
(a client stream's shut window) is covered in internals (_GatedReader)."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http
from mitmproxy.net.http.http1 import expected_http_body_size

from addons import internals
from addons.compress.addon import META as ENCODING
from addons.compress.negotiate import weak_etag
from addons.failsafe import fail_closed
from addons.protocol.rules import declared_length
from addons.stream import rules
from addons.stream.encode import StreamEncoder
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
    """A streamed response's chunk function: hands the origin's bytes to the cache (`tee`,
    when it stores the response), encodes (if asked), hands the encoded bytes to the cache too,
    and counts what passes (the access log's bytes)."""

    def __init__(self, flow: http.HTTPFlow, encoder: StreamEncoder | None = None, tee=None) -> None:
        self.metadata, self.encoder, self.tee = flow.metadata, encoder, tee
        self.metadata[SENT] = 0

    def __call__(self, chunk: bytes) -> bytes:
        if self.tee is not None:
            self.tee.base(chunk)
        if self.encoder is not None:
            chunk = self.encoder(chunk)
            if self.tee is not None:
                self.tee.coded(chunk)
        self.metadata[SENT] += len(chunk)
        return chunk


def encode_streamed(flow: http.HTTPFlow) -> tuple[StreamEncoder | None, tuple]:
    """The coder for a streamed response, its head changed to match (None to pass it as it
    is), and the head of the origin's representation: with `Vary: Accept-Encoding` whenever
    the coding depends on it, as the compress addon does, but not yet encoded."""
    resp, coding = flow.response, flow.metadata.get(ENCODING)
    headers = resp.headers
    if coding is None or not rules.compress_stream(resp.status_code, headers.get("content-type"),
                                                   headers.get("content-encoding"), headers.get("cache-control"),
                                                   flow.request.http_version == "HTTP/1.0"):
        return None, headers.fields
    vary = headers.get("vary", "")
    if "accept-encoding" not in vary.lower() and "*" not in vary:
        headers["Vary"] = f"{vary}, Accept-Encoding" if vary else "Accept-Encoding"
    base = headers.fields
    if coding == "identity":
        return None, base
    headers["Content-Encoding"] = coding
    headers.pop("Content-Length", None)
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        headers["Transfer-Encoding"] = "chunked"        # HTTP/1 framing (HTTP/2 drops the field)
    if "etag" in headers:
        headers["ETag"] = weak_etag(headers["etag"])
    decisions(flow)["compress"] = f"{coding} streamed"
    return StreamEncoder(coding), base


class Stream:
    def __init__(self, inspected_body: Callable[[http.HTTPFlow], int | None] = lambda flow: None,
                 on_streamed: Callable = lambda flow, fields, coding: None) -> None:
        """`inspected_body(flow)`: how many bytes of this request's body a WAF reads, or None;
        `on_streamed(flow, fields, coding)`: told when a response head is about to leave ahead
        of its body (`fields`: the origin's representation's head, `coding`: what the relay
        encodes it to, or None); it answers the cache's tee for the body, or None."""
        self.buffer_limit = 2**20
        self.inspected_body, self.on_streamed = inspected_body, on_streamed
        self.web = False

    def apply(self, buffer_limit: int, web: bool) -> None:
        self.buffer_limit, self.web = buffer_limit, web

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        after = rules.request_stream_after(request_length(flow.request), self.buffer_limit,
                                            self.inspected_body(flow))
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
            encoder, base = encode_streamed(flow)
            tee = self.on_streamed(flow, base, encoder.coding if encoder is not None else None)
            resp.stream = Relay(flow, encoder, tee)
            rec = decisions(flow)
            rec["stream"] = f"{rec['stream']}, response" if "stream" in rec else "response"

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        messages = flow.websocket.messages
        if drop := rules.messages_to_drop([len(m.content) for m in messages], self.web):
            del messages[:drop]
