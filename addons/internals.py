"""The one place edge reaches into mitmproxy's private modules. Each patch says why, is applied
once, is checked against the pinned mitmproxy version and is covered by an integration test.

- Error pages: when an origin cannot be reached mitmproxy answers 502 with the connect error
  (which names the origin's address and port) and `Server: mitmproxy <version>`. An `error`
  hook cannot change that page (mitmproxy-notes: a response set there is ignored), so the page
  itself is replaced by an origin-free one.
"""

from __future__ import annotations

import html
import logging

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2

logger = logging.getLogger("edge")
TESTED_WITH = "12.3."
_installed = False

GENERIC_5XX = {
    502: "The origin could not be reached or did not answer properly.",
    503: "No origin is available to serve this request.",
    504: "The origin did not answer in time.",
}


def error_page(status: int, message: str) -> bytes:
    """The body of an error the proxy layer answers itself. 5xx messages come from the origin
    side and may name it, so they are replaced; 4xx messages are about the client's request."""
    reason = http.status_codes.RESPONSES.get(status, "Error")
    if status >= 500:
        message = GENERIC_5XX.get(status, "The edge could not complete this request.")
    return (f"<html><head><title>{status} {reason}</title></head><body>"
            f"<h1>{status} {reason}</h1><p>{html.escape(message)}</p></body></html>\n").encode()


def _make_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(status_code, error_page(status_code, message),
                              http.Headers(Connection="close", Content_Type="text/html"))
    return http1.assemble_response(resp)


def install() -> None:
    """Apply the patches (idempotent)."""
    global _installed
    if _installed:
        return
    if not version.VERSION.startswith(TESTED_WITH):
        logger.warning("edge: mitmproxy %s is untested; error pages may name the origin", version.VERSION)
    _http1.make_error_response = _make_error_response
    _http2.format_error = error_page
    _installed = True
