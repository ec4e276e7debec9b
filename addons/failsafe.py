"""Fail closed: an exception in one of our hooks answers that one client with a 5xx and never
lets the request or response through unchecked. mitmproxy itself would log and carry on."""

from __future__ import annotations

import functools
import inspect
import logging

from mitmproxy import http

from addons.trace import decisions

logger = logging.getLogger("edge")


def edge_answer(flow: http.HTTPFlow, status: int, reason: str, headers: dict | None = None) -> http.Response:
    """A response made by the edge itself: short plain text with the request id, nothing else."""
    body = f"{status} {http.status_codes.RESPONSES.get(status, '')}: {reason}\nrequest id: {flow.id}\n"
    hdrs = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
    if flow.request.headers.get("connection", "").lower() == "close":
        hdrs["Connection"] = "close"     # load tools count a silent close as an error
    hdrs.update(headers or {})
    return http.Response.make(status, body.encode(), hdrs)


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
