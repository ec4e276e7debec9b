"""The protocol addon, first in the chain: a request that is not well-formed is answered 400
(505 for an unknown HTTP version) before any other addon sees it, and the rest see one
meaning for each request.

requestheaders     the rules of rules.py; an absolute-form target becomes origin-form with
                   its authority as Host (RFC 9112 3.2.2), so the cache key, routing, the WAF
                   and the origin all see the same Host
request            request trailers are dropped (nginx and Envoy do the same by default): a
                   field section after the body that the shield does not inspect. Response
                   trailers go on to HTTP/2 clients (gRPC's status lives there) after the
                   scrub masked them; HTTP/1 clients never get them (internals)
responseheaders,   a client that asked to close (Connection: close, HTTP/1.0) is told so and
response           mitmproxy closes after the answer; the scrub removes the request's
                   Connection field before mitmproxy would look at it

How each request is framed towards an HTTP/1 origin is decided in internals' Http1Client
send, with rules.framed.
"""

from __future__ import annotations

from mitmproxy import http

from addons.failsafe import edge_answer, fail_closed
from addons.protocol import rules
from addons.trace import decisions

CLOSE = "edge.protocol.close"       # flow metadata: the client closes after this exchange


def _note(flow: http.HTTPFlow, what: str) -> None:
    rec = decisions(flow)
    rec["protocol"] = f"{rec['protocol']}; {what}" if "protocol" in rec else what


class Protocol:
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        data = flow.request.data
        h2 = flow.client_conn.alpn == b"h2"
        refusal = rules.check_request(data.method, data.path, data.authority, data.http_version,
                                      data.headers.fields, h2=h2)
        if refusal is not None:
            _note(flow, f"refused: {refusal.detail}")
            # HTTP/1: the connection may be out of step with the client; HTTP/2: only the stream
            flow.response = edge_answer(flow, refusal.status, refusal.reason, None if h2 else {"Connection": "close"})
            return
        if not h2 and data.authority:
            data.headers.fields = rules.host_from_target(data.authority, data.headers.fields)
            data.authority = b""
            _note(flow, "absolute-form target: Host from its authority")
        if not h2 and rules.closes(data.http_version, data.headers.fields):
            flow.metadata[CLOSE] = True

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.request.trailers:
            return
        flow.request.trailers = None
        _note(flow, "request trailers dropped")

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(CLOSE):
            flow.response.headers["Connection"] = "close"

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(CLOSE):       # also for answers made in `error`, which skip responseheaders
            flow.response.headers["Connection"] = "close"
