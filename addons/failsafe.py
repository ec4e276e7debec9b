"""The edge's own answers, and failing closed.

Every answer the proxy makes itself, from a hook (a refusal, a 503) or from mitmproxy's protocol
layer (a head it cannot parse, a CONNECT, an unreachable origin: addons/internals.py), has one
form: plain text naming the status, a reason in the edge's own words (never the client's bytes),
and a request id that is also in the access log; `Server` as configured, `Cache-Control:
no-store`, `Edge-Request-Id` (not X-Request-Id: an origin's own id of that name, kept on a
page that replaces its body, must not be confused with the edge's).

Fail closed: an exception in one of our hooks answers that one client with a 5xx and never
lets the request or response through unchecked. mitmproxy itself would log and carry on."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
import weakref
from collections.abc import Callable

from mitmproxy import http

from addons.trace import decisions

logger = logging.getLogger("edge")

server_header: str | None = "edge"             # scrub.server_header; None: no Server field
answer_log: Callable[[dict], None] | None = None     # the access log, for answers without a flow
_made: weakref.WeakSet[http.Response] = weakref.WeakSet()

# What the edge says when the reason is mitmproxy's (whose messages quote the client's bytes,
# name the origin or mitmproxy's options): one sentence per status, in the edge's words.
REASONS = {
    400: "the request could not be read",
    405: "this method is not served here",
    408: "the request was not received in time",
    413: "request body too large",
    431: "request header fields too large",
    500: "the edge could not process this request",
    502: "the origin could not be reached or did not answer properly",
    503: "no origin is available to serve this request",
    504: "the origin did not answer in time",
    505: "this HTTP version is not supported",
}


def configure(server: str | None, log: Callable[[dict], None] | None) -> None:
    global server_header, answer_log
    server_header, answer_log = server, log


def reason_for(status: int) -> str:
    return REASONS.get(status) or ("the request was refused" if status < 500 else REASONS[500])


def new_request_id() -> str:
    """An id for an answer that has no flow (a flow's id is its request id): the same form."""
    return str(uuid.uuid4())


def page(status: int, reason: str, request_id: str) -> bytes:
    """The body of every edge answer."""
    phrase = http.status_codes.RESPONSES.get(status, "Error")
    return f"{status} {phrase}: {reason}\nrequest id: {request_id}\n".encode()


def page_headers(request_id: str, close: bool = False) -> dict[str, str]:
    """The header fields of every edge answer (Content-Length is added with the body)."""
    headers = {"Server": server_header} if server_header is not None else {}
    headers |= {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store",
                "Edge-Request-Id": request_id}
    if close:
        headers["Connection"] = "close"
    return headers


def answer(status: int, reason: str, request_id: str, headers: dict | None = None,
           close: bool = False) -> http.Response:
    """An edge answer as a response object; `made_by_edge` knows it."""
    response = http.Response.make(status, page(status, reason, request_id),
                                  page_headers(request_id, close) | (headers or {}))
    _made.add(response)
    return response


def edge_answer(flow: http.HTTPFlow, status: int, reason: str, headers: dict | None = None) -> http.Response:
    """A response made by the edge itself for this flow (the flow id is the request id)."""
    # load tools count a silent close as an error: say it
    close = flow.request.headers.get("connection", "").lower() == "close"
    return answer(status, reason, flow.id, headers, close)


def made_by_edge(response: http.Response | None) -> bool:
    """Did the edge make this response (not the origin, not the cache from a stored one)?"""
    return response is not None and response in _made


def log_answer(client: tuple | None, status: int | None, request_id: str, why: str) -> None:
    """An access-log line for an answer without a flow (status None: the connection was closed
    with the request id, an HTTP/2 GOAWAY); `why` (mitmproxy's wording, perhaps quoting the
    client) is for the operator only, shortened."""
    if answer_log is not None:
        answer = reason_for(status) if status is not None else "connection closed: protocol error"
        answer_log({"client": client[0] if client else None, "status": status, "id": request_id,
                    "edge": {"answer": answer}, "error": why[:200]})


def fail_closed(hook):
    """Wrap an HTTP hook `(self, flow)`, sync or returning an awaitable: on an exception, log
    it with the flow id and answer 500 (request side) or 502 (response side). In
    `responseheaders` the origin's body is still to come and would fill any response set
    there, so the flow is killed instead."""
    name = hook.__qualname__
    headers_phase = hook.__name__ == "responseheaders"

    def fail(flow: http.HTTPFlow, e: Exception) -> None:
        logger.exception("%s failed on flow %s; failing closed", name, flow.id, exc_info=e)
        decisions(flow)["failed"] = f"{name}: {type(e).__name__}"
        if flow.response is None:
            flow.response = edge_answer(flow, 500, "the edge could not process this request")
        elif headers_phase or flow.response.stream:
            flow.kill()
        else:
            flow.response = edge_answer(flow, 502, "the edge could not process the origin's response")

    async def guarded_async(awaitable, flow: http.HTTPFlow) -> None:
        try:
            await awaitable
        except Exception as e:
            fail(flow, e)

    @functools.wraps(hook)
    def guarded(self, flow: http.HTTPFlow):
        try:
            result = hook(self, flow)
        except Exception as e:
            fail(flow, e)
            return None
        if inspect.isawaitable(result):
            return guarded_async(result, flow)
        return result
    return guarded
