"""The one place edge reaches into mitmproxy's private modules. Each patch says why, is applied
once, is checked against the pinned mitmproxy version and is covered by an integration test.

- Error pages: mitmproxy answers protocol errors itself, with its own HTML page, `Server:
  mitmproxy <version>` and its message (the connect error naming the origin's address, the
  client's request line quoted back, its option names, "not running in regular mode" for a
  CONNECT). An `error` hook cannot change that page (mitmproxy-notes: a response set there is
  ignored). Every such answer is the edge's page instead (failsafe.answer: the flow's id as
  request id, a fresh id logged to the access log when there is no flow): the HTTP/1 server's
  error branch of `send`, its head parser's 400 (`make_error_response`), the HTTP/2 server's
  error responses, and `format_error` for anything else. A CONNECT (which reverse mode
  refuses) is answered 405. An HTTP/2 request with pseudo-headers mitmproxy cannot take (a
  CONNECT among them) is answered on its stream, where mitmproxy would close the whole
  connection with its message as GOAWAY data; a real protocol error still ends the
  connection, with a request id as the GOAWAY's data.
- Answers from the `error` hook: when the origin fails before any response, an addon may set
  `flow.response` in `error` (the cache serving a stale copy, failover's last resort) and that
  response is sent instead of the 502. mitmproxy ignores such a response (its PR #7999, open).
- Interim responses: an origin's 1xx (103 Early Hints, 100 Continue, 102) before its final
  response is taken by mitmproxy as the final one and the client hangs (mitmproxy #2229). The
  interim heads are now taken off the origin's stream first and, for HTTP/1.1 clients, passed
  through `interim_filter` (origin masking: a 103's Link names the origin as readily as a
  Location does) and forwarded, as RFC 9110 15.2 requires; other clients do not get them.
- Failover: when the connection to the chosen origin cannot be opened, or breaks before the
  origin's response head arrived, mitmproxy answers 502. `reroute(flow, error, sent)` is asked
  first; when it points the flow at another origin, the same request goes there on a new
  connection, before the client sees anything. `sent` says bytes may have reached the failed
  origin (reroute declines that for non-idempotent requests). Rewriting the address in
  `server_connect` instead leaks connections under lazy strategy (shield notes Q6).
- Request head cap: mitmproxy buffers an HTTP/1 request head without limit (its FIXME in
  Http1Server.read_headers): a head that grows past `max_head` bytes without ending is answered
  431 and the connection closed, before it is parsed or grows memory.
- Request body cap: `max_request_body` is checked as mitmproxy checks its body_size_limit
  (Content-Length at once, chunked bodies as they arrive: 413), but for requests only: the
  option would also cut large responses.
- Streamed request bodies: mitmproxy checks no size once a request body streams. Each chunk
  is now counted against `max_request_body` as it passes; past it the origin's connection is
  cut (it got a part, never the end) and the client gets 413 (or is cut if its answer began).
  A body held under a flow's STREAM_AFTER (flow metadata, set by the stream addon for bodies of
  unknown length) starts streaming once more than that is held, as mitmproxy's global
  stream_large_bodies does, but per flow: a small chunked upload stays whole.
- A request body's prefix: mitmproxy has no hook between the head and the body's end, so a
  WAF could judge a body only once it was held whole. At the STREAM_AFTER switch a
  `request_prefix(flow)` hook (RequestPrefixHook) now runs first, with what is held; if
  an addon answers there, the answer is sent at once and the rest of the body is read and
  dropped (the origin gets nothing: it is not even connected), else the prefix goes on and the
  rest streams.
- HTTP/2 backpressure: mitmproxy waits for socket write buffers to drain after each read
  (drain_writers), which bounds what a slow reader makes it hold, but an HTTP/2 client that
  keeps a stream's flow-control window shut leaves the stream's data in h2 send buffers
  (BufferedH2Connection), unbounded. An origin connection now reads only while its client
  stream holds at most H2_HELD unsent bytes (_GatedReader, woken when the client's frames
  change the buffers); the origin's kernel buffers then fill and TCP slows it.
- bytes_held: what the proxy holds of bodies right now (socket buffers, HTTP stream buffers,
  HTTP/2 send buffers), read from mitmproxy's private state, for the tests' memory bounds.
- Closing a client connection from outside a hook (slow clients): cancel the task that runs it,
  as mitmproxy's own tcp_timeout does (shield notes Q1; public attributes of the proxyserver
  addon, no underscore names).
- A socket leak in mitmproxy: ConnectionHandler.handle_connection closes the socket only when
  its read loop ends normally. A cancellation ("closed by command": a 431, a refusal) that lands
  while it waits for the event lock escapes without closing it, and the peer is never told: its
  sends block forever (seen under CPU load with a >64 KB first segment). The socket is closed
  on that path too.
- Origin read timeout: mitmproxy waits for an origin's answer until the client's tcp_timeout
  (600 s) and then closes with no answer. From the end of the request, an HTTP/1 origin must
  now send something every `read_timeouts[address]` seconds until its response is complete
  (nginx's proxy_read_timeout); else its connection is cut (a loop timer per request, cancelled
  when the response completes) and the stream gets READ_TIMEOUT. A response not yet sent to
  the client (still waiting for the head, or its body buffered) is then answered by the
  `error` hook (route: 504); a streamed one is cut.
- A connect that failed is not remembered: mitmproxy keeps a connection that never opened
  in its HTTP layer and answers every later request of that client connection (all streams
  of an HTTP/2 client) with its error at once, with no connect, even after the origin is
  back. Such a connection is forgotten, so the next request connects again (connections that
  opened and then failed, e.g. an untrusted TLS certificate, stay remembered as mitmproxy means).
- Request framing towards HTTP/1 origins: mitmproxy's Http1Client.send forwards an HTTP/2
  request's body without Content-Length or Transfer-Encoding when the client sent no
  content-length, and the origin reads the body as further requests (smuggling past every
  hook). Every request now goes with exactly one framing (protocol rules.framed): the client's
  chunked coding, else Content-Length when the length is known (a buffered body, or a stream
  whose Content-Length holds), else chunked; and always in origin-form. Failover never re-sends
  a request whose body was streamed (it is not kept: the next origin got the head alone).
- Trailers: mitmproxy's HTTP/1 reader raises NotImplementedError on a chunked body's trailer
  section ("mitmproxy has crashed!", no answer), for requests and responses alike. The section
  is now passed on as a trailers event, as HTTP/2 does; the protocol addon drops trailers, and
  the HTTP/1 senders drop any that still reach them (an HTTP/1 sender crashed on those too).
  A request body that cannot be read (bad chunk syntax or trailer fields) is answered 400
  before the connection is closed; mitmproxy closed it without an answer.
- HTTP/2 client connections (GuardedH2Connection, the Http2Server patches): mitmproxy's h2
  server counts nothing, so a client may reset streams, or send SETTINGS, PING, PRIORITY,
  empty DATA and connection WINDOW_UPDATE frames, without end. Each such frame is spent from the
  connection's budgets (shield/h2abuse.py); past one, h2 ends the connection with GOAWAY
  ENHANCE_YOUR_CALM. The connection advertises `h2_limits.max_concurrent_streams` and
  `max_head` as SETTINGS_MAX_HEADER_LIST_SIZE, and a header block (HEADERS + CONTINUATION,
  compressed or decoded) past twice `max_head` ends it the same way: h2's own defaults let a
  block grow to 64 CONTINUATION frames of 128 KiB.
- A reset that mitmproxy drops: when a HEADERS(END_STREAM)+RST_STREAM pair arrives in one read,
  h2 reports the stream closed by the time mitmproxy handles its StreamEnded, mitmproxy forgets
  the stream, ignores the reset and the request goes on to the origin (rapid reset: nearly every
  reset stream became an origin request). The reset is passed on; a stream reset in the same
  read as its HEADERS never becomes a request at all (no flow, no hooks: the cost of a rapid
  reset is h2's parsing); a stream reset while its origin connection was being opened sends
  nothing on it.
- mitmweb's page (`edge run --web`, the edge's console: addons/console): mitmweb shows a
  flow's comment in a span whose white space collapses, so the decisions, one per line, read as
  one run-on line in the Comment tab, and the flow list gives the comment 150 px. Its index
  page now carries a style that keeps the comment's line breaks in the detail view and widens
  the comment column. Installed only when mitmweb's app is loaded (the lean master never
  imports it).
- Graceful shutdown (addons/lifecycle): whether a client connection is idle is read from
  mitmproxy's layers (no request stream open, no part of a next HTTP/1 head received), and an
  idle HTTP/2 connection is sent GOAWAY(NO_ERROR) through its TLS layer before it is closed;
  mitmproxy has no drain of its own (its shutdown cancels every connection's task).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
import sys
import time
import types
import weakref
from collections.abc import Callable

import h2.errors
import h2.events
import h11
import h2.errors
import h2.events
import h2.exceptions
from h11._readers import ChunkedReader
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame
from mitmproxy import ctx, flow, http, version
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import layer as layer_module
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http3, _http_h2
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestProtocolError, ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook

from addons import failsafe
from addons.config import Http2Limits
from addons.protocol import rules
from addons.route.health import READ_TIMEOUT
from addons.shield.h2abuse import FrameBudgets
from addons.trace import STREAMED_IN

logger = logging.getLogger("edge")
TESTED_WITH = "12.3."
_installed = False
_console_installed = False


def error_page(status: int, message: str, request_id: str | None = None) -> bytes:
    """The body of an error the proxy layer answers itself. 5xx messages come from the origin
    side and may name it, so they are replaced; 4xx messages are the caller's own words."""
    if status >= 500:
        message = failsafe.reason_for(status)
    return failsafe.page(status, message, request_id or failsafe.new_request_id())


def _format_error(status: int, message: str) -> bytes:
    """mitmproxy's format_error: its message is never shown (it may quote the client)."""
    return error_page(status, failsafe.reason_for(status))


def _wire_answer(status: int, request_id: str, headers: dict | None = None, head: bool = False) -> bytes:
    """An HTTP/1 edge answer as bytes (without its body for a HEAD); the connection is closed
    after it."""
    response = failsafe.answer(status, failsafe.reason_for(status), request_id, headers, close=True)
    if head:
        response.raw_content = b""          # Content-Length stays: what a GET would get
    return http1.assemble_response(response)


# pages made by _make_error_response that the head parser is about to send: (id, status, message)
_made_without_flow: collections.deque[tuple[str, int, str]] = collections.deque(maxlen=16)


def _make_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's make_error_response, used for a request head it cannot parse (no flow yet):
    the edge's page with a fresh request id, logged by `_server_read_headers`."""
    request_id = failsafe.new_request_id()
    _made_without_flow.append((request_id, status_code, message))
    return _wire_answer(status_code, request_id)


ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def _stream_answer(layer, stream_id: int, status: int, why: str,
                   code: ErrorCode | None = None) -> tuple[int, str, dict, bool]:
    """Status, request id, extra header fields and HEAD-ness of the edge's answer to a protocol
    error on one of the client's streams: the stream's flow id, or a fresh one (logged)."""
    stream = next((p.streams.get(stream_id) for p in reversed(layer.context.layers)
                   if isinstance(p, http_layer.HttpLayer)), None)
    flow_ = getattr(stream, "flow", None)
    headers = {}
    if flow_ is not None and flow_.request.method == "CONNECT" and code == ErrorCode.REQUEST_VALIDATION_FAILED:
        status, headers = 405, {"Allow": ALLOW}     # reverse mode serves no tunnels
    if flow_ is not None:
        return status, flow_.id, headers, flow_.request.method == "HEAD"
    request_id = failsafe.new_request_id()
    failsafe.log_answer(layer.conn.peername, status, request_id, why)
    return status, request_id, headers, False


def _protocol_answer(layer, event: ResponseProtocolError, status: int) -> tuple[int, str, dict, bool]:
    return _stream_answer(layer, event.stream_id, status, event.message, event.code)


_original_server_send = _http1.Http1Server.send


def _server_send(self, event):
    """mitmproxy's HTTP/1 server send, with the edge's page for its error answers, dropping
    trailers (it has no way to send them)."""
    if isinstance(event, http_layer.ResponseTrailers):
        return
    if (isinstance(event, ResponseProtocolError) and not self.response and self.conn.state & ConnectionState.CAN_WRITE
            and (status := event.code.http_status_code()) is not None):
        yield commands.SendData(self.conn, _wire_answer(*_protocol_answer(self, event, status)))
        yield commands.CloseConnection(self.conn)
        return
    yield from _original_server_send(self, event)


def _h2_answer(self, stream_id: int, status: int, request_id: str, headers: dict, head: bool = False) -> None:
    """Queue the edge's page on an HTTP/2 stream (no Connection field: HTTP/2 forbids it)."""
    response = failsafe.answer(status, failsafe.reason_for(status), request_id, headers)
    fields = [(b":status", b"%d" % status)] + [(k.lower(), v) for k, v in response.headers.fields]
    self.h2_conn.send_headers(stream_id, fields, end_stream=head)
    if not head:
        self.h2_conn.send_data(stream_id, response.raw_content, end_stream=True)


_original_h2_server_handle_event = _http2.Http2Server._handle_event


def _h2_server_handle_event(self, event):
    """mitmproxy's HTTP/2 server, with the edge's page for its error answers."""
    if (isinstance(event, ResponseProtocolError) and (status := event.code.http_status_code()) is not None
            and self.is_open_for_us(event.stream_id)
            and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent):
        _h2_answer(self, event.stream_id, *_protocol_answer(self, event, status))
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        return
    yield from _original_h2_server_handle_event(self, event)


_original_h2_server_handle_h2_event = _http2.Http2Server.handle_h2_event


def _h2_server_handle_h2_event(self, event):
    """mitmproxy's, answering a request whose pseudo-headers it cannot take (a CONNECT, which
    has no :scheme or :path; an unknown pseudo-header; a bad :authority) on its own stream, 405
    or 400, where mitmproxy would end the whole connection with its message (which quotes the
    client's fields) as GOAWAY data. The client's other streams go on."""
    if isinstance(event, h2.events.RequestReceived):
        try:
            _http2.parse_h2_request_headers(event.headers)
        except ValueError as e:
            connect = (b":method", b"CONNECT") in event.headers
            status, headers = (405, {"Allow": ALLOW}) if connect else (400, {})
            request_id = failsafe.new_request_id()
            failsafe.log_answer(self.conn.peername, status, request_id, f"HTTP/2 request: {e}")
            _h2_answer(self, event.stream_id, status, request_id, headers)
            if not event.stream_ended:          # answered before the request ended (RFC 9113 8.1)
                self.h2_conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return False
    return (yield from _original_h2_server_handle_h2_event(self, event))


def _h2_server_protocol_error(self, message: str, error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR):
    """mitmproxy's protocol_error for the client's connection, with a request id as the GOAWAY's
    debug data instead of mitmproxy's message (logged instead)."""
    request_id = failsafe.new_request_id()
    failsafe.log_answer(self.conn.peername, None, request_id, message)
    self.h2_conn.close_connection(error_code, f"request id: {request_id}".encode())
    yield commands.SendData(self.conn, self.h2_conn.data_to_send())
    yield from self.close_connection(message)


_original_handle_protocol_error = http_layer.HttpStream.handle_protocol_error
# (flow, error, sent) -> True if the flow now points at another origin worth trying
reroute: Callable[[http.HTTPFlow, str, bool], bool] | None = None
MAX_REROUTES = 8        # bounded whatever `reroute` says


def _make_server_connection(self):
    """mitmproxy's HttpStream.make_server_connection, asking `reroute` after a failed connect,
    and sending nothing when the client reset the stream while the connection was opened."""
    for _ in range(MAX_REROUTES):
        connection, err = yield http_layer.GetHttpConnection(
            (self.flow.request.host, self.flow.request.port), self.flow.request.scheme == "https",
            self.flow.server_conn.via, self.flow.server_conn.transport_protocol)
        if not err and (reset := _pending_reset(self)) is not None:
            yield http_layer.SendHttp(RequestProtocolError(self.stream_id, reset.message, reset.code), connection)
            self.flow.error = flow.Error(reset.message)
            yield HttpErrorHook(self.flow)
            self.client_state = self.server_state = self.state_errored
            self.flow.live = False
            yield http_layer.DropStream(self.stream_id)
            return False
        if not err:
            self.context.server = self.flow.server_conn = connection
            return True
        if (reroute is None or not self.context.client.connected or _pending_reset(self) is not None
                or not reroute(self.flow, err, False)):     # a connect the client gave up is not the origin's failure
            break
    yield from self.handle_protocol_error(ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED))
    return False


def _send_request(self):
    """Send the (fully received) request on the stream's server connection, as mitmproxy's
    state_consume_request_body does."""
    request = self.flow.request
    content = request.raw_content
    yield http_layer.SendHttp(http_layer.RequestHeaders(self.stream_id, request, not (content or request.trailers)),
                              self.context.server)
    if content:
        yield http_layer.SendHttp(http_layer.RequestData(self.stream_id, content), self.context.server)
    if request.trailers:
        yield http_layer.SendHttp(http_layer.RequestTrailers(self.stream_id, request.trailers), self.context.server)
    yield http_layer.SendHttp(http_layer.RequestEndOfMessage(self.stream_id), self.context.server)


def _handle_protocol_error(self, event):
    """mitmproxy's handling, except that (for a fully received request whose origin failed
    before its response head) `reroute` may send the request to another origin, and a response
    set by an `error` hook is sent to the client."""
    if (isinstance(event, ResponseProtocolError) and event.message == READ_TIMEOUT
            and self.server_state == self.state_consume_response_body):
        self.flow.response = None           # buffered, never sent: the client gets the edge's answer
        self.response_body_buf.clear()
        self.server_state = self.state_wait_for_response_headers
    if not (isinstance(event, ResponseProtocolError) and self.flow.response is None
            and self.client_state == self.state_done
            and self.server_state not in (self.state_done, self.state_errored)):
        yield from _original_handle_protocol_error(self, event)
        return
    if (event.code != ErrorCode.CONNECT_FAILED and self.server_state == self.state_wait_for_response_headers
            and reroute is not None and reroute(self.flow, event.message, True)
            and self.flow.request.raw_content is not None):    # a streamed body is gone: not sent again
        if (yield from self.make_server_connection()):
            yield from _send_request(self)
        return
    self.flow.error = flow.Error(event.message)
    yield HttpErrorHook(self.flow)
    if self.flow.response is not None and self.flow.error.msg != flow.Error.KILLED_MESSAGE:
        self.flow.error = None              # answered: the flow goes on as if the origin had
        yield from self.send_response()
        return
    # as mitmproxy does after its error hook (proxy/layers/http/__init__.py handle_protocol_error)
    if (yield from self.check_killed(False)):
        return
    if self.client_state != self.state_errored:
        yield http_layer.SendHttp(event, self.context.client)
    self.server_state = self.state_errored
    self.flow.live = False
    yield http_layer.DropStream(self.stream_id)


# -- request limits ---------------------------------------------------------------------------------

max_head: int | None = None             # bytes of an HTTP/1 request head
max_request_body: int | None = None     # bytes of a request body
HEAD_TOO_LARGE = "Request header fields too large"
BODY_TOO_LARGE = "Request body too large"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_original_server_read_headers = _http1.Http1Server.read_headers


def _server_read_headers(self, event):
    """Refuse a request head that exceeds max_head before mitmproxy buffers more of it; log
    the answers to heads mitmproxy cannot parse (they have no flow) with the client."""
    if (max_head is not None and isinstance(event, events.DataReceived)
            and len(self.buf) > max_head and not _END_OF_HEAD.search(bytes(self.buf._data[:max_head + 4]))):
        request_id = failsafe.new_request_id()
        failsafe.log_answer(self.conn.peername, 431, request_id, HEAD_TOO_LARGE)
        yield commands.SendData(self.conn, _wire_answer(431, request_id))
        yield commands.CloseConnection(self.conn)
        self.state = self.done
        return
    for command in _original_server_read_headers(self, event):     # its commands never block
        if _made_without_flow and isinstance(command, commands.SendData):
            for request_id, status, message in _made_without_flow:
                failsafe.log_answer(self.conn.peername, status, request_id, message)
            _made_without_flow.clear()
        yield command


_original_check_body_size = http_layer.HttpStream.check_body_size
STREAM_AFTER = "edge.stream.after"      # flow metadata: request body bytes held before the rest streams
PREFIX = "edge.request.prefix"          # flow metadata during `request_prefix`: the body bytes held


@dataclasses.dataclass
class RequestPrefixHook(commands.StartHook):
    """A request body held up to its flow's STREAM_AFTER is about to stream; what is held is
    in the flow's metadata (PREFIX: mitmproxy's hooks take one argument). An addon may answer
    the request here (`flow.response`); then nothing of it goes on. (The shield's WAF judges
    the prefix: ModSecurity's ProcessPartial.)"""
    flow: http.HTTPFlow


def _answer_before_body_end(self):
    """Send the response an addon set on a body's prefix, as mitmproxy sends one set in the
    `request` hook, at once; the rest of the body is read and dropped, as nginx discards the
    body of a refused request (the stream is gone once answered; what was queued for it while
    the hooks ran goes to `_drop_request_body`)."""
    self.client_state = self.state_done
    self.flow.response.timestamp_start = time.time()
    yield http_layer.HttpResponseHeadersHook(self.flow)
    if not (yield from self.check_killed(True)):
        yield from self.send_response()
    self.client_state = types.MethodType(_drop_request_body, self)


def _drop_request_body(self, event):
    """A refused request's client state: its body events are dropped."""
    yield from ()


def _check_body_size(self, request: bool):
    """mitmproxy's body size check, plus max_request_body for requests (413), and a request
    body held past its flow's STREAM_AFTER bytes starts streaming (as stream_large_bodies
    does, per flow: what is held is sent, then the rest as it comes), once the
    `request_prefix` hook has seen what is held and not answered it."""
    after = self.flow.metadata.get(STREAM_AFTER)
    if (request and after is not None and len(self.request_body_buf) > after and not self.flow.request.stream
            and (max_request_body is None or len(self.request_body_buf) <= max_request_body)):
        held = bytes(self.request_body_buf)
        self.request_body_buf.clear()
        self.flow.metadata[PREFIX] = held
        yield RequestPrefixHook(self.flow)              # the WAF's verdict, before the origin gets a byte
        self.flow.metadata.pop(PREFIX, None)
        if (yield from self.check_killed(True)):
            return True
        if self.flow.response is not None:
            yield from _answer_before_body_end(self)
            return True
        self.flow.request.stream = True
        yield from self.start_request_stream()
        if self.client_state == self.state_stream_request_body:
            yield from self.handle_event(http_layer.RequestData(self.stream_id, held))
        return False
    if request and max_request_body is not None:
        if self.request_body_buf:
            size = len(self.request_body_buf)
        else:
            try:
                size = http1.expected_http_body_size(self.flow.request, None)
            except ValueError:
                size = None
        if size is not None and size > max_request_body:
            if not self.request_body_buf:
                yield http_layer.HttpRequestHeadersHook(self.flow)
            self.flow.error = flow.Error(BODY_TOO_LARGE)
            yield HttpErrorHook(self.flow)
            yield http_layer.SendHttp(ResponseProtocolError(self.stream_id, BODY_TOO_LARGE,
                                                            ErrorCode.REQUEST_TOO_LARGE), self.context.client)
            self.client_state = self.state_errored
            self.flow.live = False
            return True
    return (yield from _original_check_body_size(self, request))


_original_stream_request_body = http_layer.HttpStream.state_stream_request_body


def _stream_request_body(self, event):
    """mitmproxy's, counting a streamed request body against max_request_body as it passes
    (its Content-Length was checked at the head, see `_check_body_size`): past the cap the
    origin's connection is cut (it got a part, never the whole) and the client is answered 413,
    or cut if its answer already started."""
    if isinstance(event, http_layer.RequestData) and max_request_body is not None:
        self.edge_streamed = getattr(self, "edge_streamed", 0) + len(event.data)
        self.flow.metadata[STREAMED_IN] = self.edge_streamed        # the access log's bytes in
        if self.edge_streamed > max_request_body:
            self.flow.error = flow.Error(BODY_TOO_LARGE)
            yield HttpErrorHook(self.flow)
            yield http_layer.SendHttp(RequestProtocolError(self.stream_id, BODY_TOO_LARGE,
                                                           ErrorCode.REQUEST_TOO_LARGE), self.context.server)
            yield http_layer.SendHttp(ResponseProtocolError(self.stream_id, BODY_TOO_LARGE,
                                                            ErrorCode.REQUEST_TOO_LARGE), self.context.client)
            self.client_state = self.server_state = self.state_errored
            self.flow.live = False
            return
    yield from _original_stream_request_body(self, event)


def bytes_held(master) -> int:
    """Body bytes the proxy holds right now, over all connections: what waits in its socket
    write buffers and read buffers, and in HTTP/2 send buffers (what backpressure bounds)."""
    held = 0
    for handler in list(master.addons.get("proxyserver").connections.values()):
        layer = handler.layer
        while layer is not None:                    # NextLayer -> ... -> HttpLayer -> its streams
            for stream in list(getattr(layer, "streams", {}).values()):
                held += len(getattr(stream, "request_body_buf", b"")) + len(getattr(stream, "response_body_buf", b""))
            layer = getattr(layer, "layer", None) if isinstance(layer, layer_module.NextLayer) \
                else getattr(layer, "child_layer", None)
        for io in list(handler.transports.values()):
            transport = getattr(io.writer, "transport", None)
            if transport is not None:
                held += transport.get_write_buffer_size()
            held += len(getattr(io.reader, "_buffer", b""))
    for h2_conn in list(_h2_connections):
        held += sum(len(d.data) for chunks in list(h2_conn.stream_buffers.values()) for d in chunks)
    return held


def _client_io(master, client):
    handler = master.addons.get("proxyserver").connections.get(client.id)
    return handler.transports.get(handler.client) if handler is not None else None


def sending(master, client) -> bool:
    """Is a response still on its way to the client (bytes waiting in the socket buffer)?"""
    io = _client_io(master, client)
    transport = getattr(io.writer, "transport", None) if io is not None and io.writer is not None else None
    return transport is not None and transport.get_write_buffer_size() > 0


_original_handle_connection = proxy_server.ConnectionHandler.handle_connection


async def _handle_connection(self, connection):
    """mitmproxy's, closing the socket when a cancellation escapes before it did; an origin
    connection's reads wait for its HTTP/2 client stream (_GatedReader)."""
    io = self.transports.get(connection)
    if connection is not self.client and io is not None and isinstance(io.reader, asyncio.StreamReader):
        io.reader = _GatedReader(self, connection, io.reader)
    try:
        await _original_handle_connection(self, connection)
    except asyncio.CancelledError:
        io = self.transports.pop(connection, None)     # still there: mitmproxy did not close it
        if io is not None and io.writer is not None:
            try:
                io.writer.close()
            except OSError:
                pass
        raise


def close_client(master, client) -> bool:
    """Close a client connection now (from a timer, not a hook). False if it is gone."""
    io = _client_io(master, client)
    if io is None or io.handler is None:
        return False
    io.handler.cancel("edge: closed")
    return True


def client_idle(handler, now: float, grace: float) -> bool:
    """No request in progress on this client connection: no HTTP stream open (a response
    still being sent keeps its stream), and no part of a next HTTP/1 head received. A
    connection that has no HTTP layer yet (a TLS handshake, nothing sent) is given `grace`
    seconds from its start for its request (wall-clock `now`, as mitmproxy's timestamps)."""
    layer = _http_layer(handler)
    if layer is None:
        return now - handler.client.timestamp_start > grace
    if layer.streams:
        return False
    server = layer.connections.get(handler.client)
    return not (isinstance(server, _http1.Http1Server) and len(server.buf))


def goaway(handler) -> bool:
    """Tell an idle HTTP/2 client that no further stream will be taken: GOAWAY(NO_ERROR) with
    the last stream it opened, written through the TLS layers above the HTTP layer (h2 goes
    over TLS only: h2c is disabled). Sent right before the connection is closed, never while a
    stream is open: h2 (python's, httpx's) ends every stream when a GOAWAY arrives."""
    layer = _http_layer(handler)
    server = layer.connections.get(handler.client) if layer is not None else None
    io = handler.transports.get(handler.client)
    if not isinstance(server, _http2.Http2Server) or io is None or io.writer is None or io.writer.is_closing():
        return False
    frame = GoAwayFrame(0)
    frame.last_stream_id, frame.error_code = server.h2_conn.highest_inbound_stream_id, 0
    data = frame.serialize()
    for tls in reversed(_client_tls_layers(handler)):
        data = b"".join(c.data for c in tls.send_data(data) if isinstance(c, commands.SendData))
    io.writer.write(data)
    return True


def _client_tls_layers(handler) -> list:
    """The client TLS layers between the top of the stack and the HTTP layer, outermost first."""
    found, layer = [], handler.layer
    while layer is not None and not isinstance(layer, http_layer.HttpLayer):
        if isinstance(layer, tls_layers.ClientTLSLayer):
            found.append(layer)
        layer = layer.layer if isinstance(layer, layer_module.NextLayer) else getattr(layer, "child_layer", None)
    return found


_INTERIM_HEAD = re.compile(rb"HTTP/1\.[01] 1(?!01)\d\d\b")
Fields = tuple[tuple[bytes, bytes], ...]
# (header fields of an interim response, the request it answers) -> the fields a client may see
interim_filter: Callable[[Fields, http.Request], Fields] | None = None
_original_read_headers = _http1.Http1Client.read_headers


def _read_headers(self, event):
    """Take interim 1xx heads off the origin's stream before mitmproxy parses the final head."""
    if isinstance(event, events.DataReceived) and self.request:
        for _ in range(16):                     # bounded: an origin cannot loop us forever
            if not _INTERIM_HEAD.match(self.buf._data, 0, 16):     # h11's buffer, read in place
                break
            lines = self.buf.maybe_extract_lines()
            if lines is None:
                return                          # the interim head is incomplete: wait for more
            if interim_filter is not None and self.request.http_version == "HTTP/1.1" \
                    and self.context.client.alpn != b"h2":
                status, *header_lines = (bytes(line) for line in lines)
                fields = tuple((k.strip(), v.strip()) for k, _, v in (h.partition(b":") for h in header_lines))
                fields = interim_filter(fields, self.request)
                head = status + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields) + b"\r\n"
                yield commands.SendData(self.context.client, head)
        if not self.buf:
            return
    yield from _original_read_headers(self, event)


# -- origin read timeout ------------------------------------------------------------------------------

read_timeouts: dict[tuple[str, int], float] = {}     # origin address -> seconds (the route addon's)
_original_client_handle_event = _http1.Http1Connection._handle_event


def _reading(self) -> bool:
    """The request is sent and the response is not complete."""
    return self.stream_id is not None and not self.response_done and self.state in (self.read_headers, self.read_body)


def _client_handle_event(self, event):
    """mitmproxy's Http1Client event handling, plus the read deadline."""
    if isinstance(event, events.DataReceived):
        self.edge_last_read = time.monotonic()
    elif isinstance(event, events.ConnectionClosed) and getattr(self, "edge_read_expired", False):
        self.state = self.done                  # cut by _read_timer below: say why
        yield http_layer.ReceiveHttp(
            ResponseProtocolError(self.stream_id, READ_TIMEOUT, ErrorCode.GENERIC_SERVER_ERROR))
        return
    yield from _original_client_handle_event(self, event)
    timer = getattr(self, "edge_read_timer", None)
    if isinstance(event, http_layer.RequestEndOfMessage) and _reading(self):
        timeout = read_timeouts.get(self.conn.address)
        if timeout and timer is None:
            self.edge_last_read = time.monotonic()
            self.edge_read_timer = asyncio.get_running_loop().call_later(timeout, _read_timer, self, timeout)
    elif timer is not None and not _reading(self):
        timer.cancel()                          # also drops its reference to this layer
        self.edge_read_timer = None


def _read_timer(self, timeout: float) -> None:
    """The origin sent nothing for `timeout` seconds: cut its connection (the task that reads
    it is cancelled, as mitmproxy's own close does; _client_handle_event reports the cut)."""
    self.edge_read_timer = None
    if not _reading(self):
        return
    idle = time.monotonic() - self.edge_last_read
    if idle < timeout:
        self.edge_read_timer = asyncio.get_running_loop().call_later(timeout - idle, _read_timer, self, timeout)
        return
    handler = ctx.master.addons.get("proxyserver").connections.get(self.context.client.id)
    io = handler.transports.get(self.conn) if handler is not None else None
    if io is not None and io.handler is not None:
        self.edge_read_expired = True
        io.handler.cancel(READ_TIMEOUT)


_original_get_connection = http_layer.HttpLayer.get_connection


def _get_connection(self, event, *, reuse: bool = True):
    """mitmproxy's HttpLayer.get_connection, after forgetting this spec's connections that
    never opened (no socket: no event can come for them any more)."""
    for connection in [c for c in self.connections if event.connection_spec_matches(c)]:     # servers only
        if connection.error and connection.timestamp_tcp_setup is None \
                and connection not in self.waiting_for_establishment:
            del self.connections[connection]
    return (yield from _original_get_connection(self, event, reuse=reuse))


# -- HTTP/1 framing and trailers --------------------------------------------------------------------

def _upstream_head(self, event: http_layer.RequestHeaders) -> bytes:
    """The request head for an HTTP/1 origin; sets `self.edge_chunked` for the body."""
    request = event.request
    data = request.data
    fields, version = data.headers.fields, data.http_version
    if request.is_http2 or request.is_http3:
        fields, version = rules.http1_fields(fields, data.authority), b"HTTP/1.1"
    if data.content is not None:
        length = len(data.content)                  # buffered: the whole body is here
    elif callable(request.stream):
        length = None                               # a stream function may change the length
    else:
        length = rules.declared_length(fields)
    fields, self.edge_chunked = rules.framed(fields, has_body=not event.end_stream, length=length)
    if self.edge_chunked and version == b"HTTP/1.0":
        version = b"HTTP/1.1"                       # chunked needs HTTP/1.1
    target = data.authority if data.method.upper() == b"CONNECT" else data.path
    head = b"".join(b"%s: %s\r\n" % field for field in fields)      # as bytes(Headers) writes it
    return b"%s %s %s\r\n%s\r\n" % (data.method, target, version, head)


def _client_send(self, event):
    """mitmproxy's Http1Client.send with the edge's framing (see `_upstream_head`)."""
    if isinstance(event, http_layer.RequestProtocolError):
        yield commands.CloseConnection(self.conn)
        return
    if self.stream_id is None:
        self.stream_id, self.request = event.stream_id, event.request
    if isinstance(event, http_layer.RequestHeaders):
        yield commands.SendData(self.conn, _upstream_head(self, event))
    elif isinstance(event, http_layer.RequestData):
        chunked = getattr(self, "edge_chunked", False)
        if event.data:
            yield commands.SendData(self.conn, b"%x\r\n%s\r\n" % (len(event.data), event.data) if chunked
                                    else event.data)
    elif isinstance(event, http_layer.RequestEndOfMessage):
        if getattr(self, "edge_chunked", False):
            yield commands.SendData(self.conn, b"0\r\n\r\n")
        yield from self.mark_done(request=True)
    elif not isinstance(event, http_layer.RequestTrailers):     # trailers: dropped
        raise AssertionError(f"Unexpected event: {event}")


MALFORMED_BODY = "Malformed request body"


class _TrailersReader:
    """h11's chunked body reader, keeping a trailer section aside (mitmproxy raises on it)."""

    def __init__(self) -> None:
        self.reader = ChunkedReader()
        self.trailers: http.Headers | None = None

    def __call__(self, buf):
        event = self.reader(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.trailers = http.Headers(event.headers.raw_items())
            return h11.EndOfMessage()
        return event

    def read_eof(self):
        return self.reader.read_eof()


_original_make_body_reader = _http1.make_body_reader
_original_read_body = _http1.Http1Connection.read_body


def _make_body_reader(expected_size: int | None):
    return _TrailersReader() if expected_size is None else _original_make_body_reader(expected_size)


def _read_body(self, event):
    """mitmproxy's, with a trailer section passed on as a trailers event before the end, and
    a 400 for a client whose body cannot be read (mitmproxy closes without a word)."""
    for command in _original_read_body(self, event):
        if (isinstance(command, commands.CloseConnection) and isinstance(self, _http1.Http1Server)
                and self.response is None and self.conn.state & ConnectionState.CAN_WRITE):
            yield commands.SendData(self.conn, _wire_answer(*_stream_answer(self, self.stream_id, 400, MALFORMED_BODY)))
        trailers = getattr(self.body_reader, "trailers", None)
        if (trailers is not None and isinstance(command, ReceiveHttp)
                and isinstance(command.event, (http_layer.RequestEndOfMessage, http_layer.ResponseEndOfMessage))):
            kind = http_layer.RequestTrailers if isinstance(self, _http1.Http1Server) else http_layer.ResponseTrailers
            yield ReceiveHttp(kind(self.stream_id, trailers))
        yield command


# -- HTTP/2 client connections ----------------------------------------------------------------------

h2_limits = Http2Limits()
LINGER = 2.0        # seconds a flooding client is still read (and ignored) after its GOAWAY: closing
                    # with its data unread would make the kernel send a reset that destroys the GOAWAY
LINGER_BYTES = 2**20    # ... or until it sent this much more: a client still pushing is cut off now
# (client connection, why) -> None: told when a client connection is ended for a flood
on_flood: Callable[[object, str], None] | None = None
_FRAME_KINDS = {RstStreamFrame: "resets", PriorityFrame: "priorities"}


def _frame_kind(frame) -> str | None:
    """Which budget a received frame spends from, if any."""
    kind = type(frame)
    if kind is DataFrame:
        return "empty_frames" if not frame.data and "END_STREAM" not in frame.flags else None
    if kind is SettingsFrame or kind is PingFrame:
        return None if "ACK" in frame.flags else ("settings" if kind is SettingsFrame else "pings")
    if kind is WindowUpdateFrame:
        return "window_updates" if frame.stream_id == 0 else None
    return _FRAME_KINDS.get(kind)


_h2_connections: weakref.WeakSet = weakref.WeakSet()     # the clients' (GuardedH2Connection), for bytes_held


class Flood(h2.exceptions.DenialOfServiceError):
    """A client past one of its budgets; h2 answers it with GOAWAY ENHANCE_YOUR_CALM."""


class GuardedH2Connection(_http_h2.BufferedH2Connection):
    """mitmproxy's h2 connection for a client, spending each costly frame from its budgets."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _h2_connections.add(self)
        self.room_waiters: list[asyncio.Future] = []
        self.budgets = FrameBudgets(h2_limits, time.monotonic())
        self.block_cap = 2 * (max_head or 2**16)
        self.local_settings.max_concurrent_streams = h2_limits.max_concurrent_streams
        self.local_settings.max_header_list_size = max_head or 2**16
        self.local_settings.acknowledge()               # as mitmproxy does: sent by initiate_connection
        self.decoder.max_header_list_size = self.block_cap

    def _receive_frame(self, frame):
        kind = _frame_kind(frame)
        if kind == "resets" and not ((stream := self.streams.get(frame.stream_id)) is not None and stream.open):
            kind = None                                 # a finished stream: the reset cancels no work (curl sends them)
        if kind is not None and (why := self.budgets.spend(kind, time.monotonic())) is not None:
            raise Flood(why)                            # h2's receive_data sends the GOAWAY
        return super()._receive_frame(frame)

    def wait_for_room(self, stream_id: int) -> asyncio.Future | None:
        """None if the stream holds at most H2_HELD unsent bytes (the client's flow-control
        window is shut for the rest), else a future done when that may have changed."""
        chunks = self.stream_buffers.get(stream_id)
        if not chunks or sum(len(c.data) for c in chunks) <= H2_HELD:
            return None
        room = asyncio.get_running_loop().create_future()
        self.room_waiters.append(room)
        return room

    def _wake(self) -> None:
        waiters, self.room_waiters = self.room_waiters, []
        for room in waiters:
            if not room.done():
                room.set_result(None)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        super().reset_stream(stream_id, error_code)
        self._wake()

    def receive_data(self, data):
        try:
            return self._receive_guarded(data)
        finally:
            if self.room_waiters:       # a WINDOW_UPDATE sent buffered data, a reset dropped it
                self._wake()

    def _receive_guarded(self, data):
        events = super().receive_data(data)
        block = self.incoming_buffer._headers_buffer    # HEADERS + CONTINUATION not yet ended
        if block and sum(len(f.data) for f in block) > self.block_cap:
            self.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            raise Flood(f"header block over {self.block_cap} bytes")
        return events


H2_HELD = 256 * 2**10      # unsent bytes an HTTP/2 client stream may hold before its origin read pauses


def _http_layer(handler) -> http_layer.HttpLayer | None:
    layer = handler.layer
    while layer is not None and not isinstance(layer, http_layer.HttpLayer):
        layer = layer.layer if isinstance(layer, layer_module.NextLayer) else getattr(layer, "child_layer", None)
    return layer


class _GatedReader:
    """An origin connection's reader that, before each read, waits while the HTTP/2 client
    stream it feeds holds more than H2_HELD unsent bytes: mitmproxy's drain_writers waits for
    socket buffers only, and an HTTP/2 client that leaves a stream's window shut (a paused
    video) made the origin's whole body pile up in h2 send buffers."""

    def __init__(self, handler, connection, reader: asyncio.StreamReader) -> None:
        self.handler, self.connection, self.reader = handler, connection, reader

    async def read(self, n: int = -1) -> bytes:
        while (room := self._room()) is not None:
            await room
        return await self.reader.read(n)

    def _room(self) -> asyncio.Future | None:
        layer = _http_layer(self.handler)
        if layer is None:
            return None
        h2_conn = getattr(layer.connections.get(self.handler.client), "h2_conn", None)
        origin = getattr(layer.connections.get(self.connection), "child_layer", None)     # HttpClient -> Http1Client
        if not isinstance(h2_conn, GuardedH2Connection) or not isinstance(origin, _http1.Http1Client) \
                or origin.stream_id is None:        # an HTTP/2 origin maps its own stream ids: not gated
            return None
        return h2_conn.wait_for_room(origin.stream_id)

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


_original_h2_server_init = _http2.Http2Server.__init__


def _h2_server_init(self, context) -> None:
    _original_h2_server_init(self, context)
    self.h2_conn = GuardedH2Connection(self.h2_conf)    # nothing sent yet: that is at Start


def _h2_server_event(self, event):
    """Floods end the connection (h2 has queued the GOAWAY); resets mitmproxy would drop are passed on."""
    if isinstance(event, h2.exceptions.DenialOfServiceError):
        try:
            if on_flood is not None:
                on_flood(self.conn, str(event))
        except Exception:           # the connection is ended all the same
            logger.exception("edge: could not record an HTTP/2 flood")
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        for command in self.close_connection(f"HTTP/2 flood: {event}"):
            if isinstance(command, commands.CloseConnection) and command.connection is self.conn:
                command = commands.CloseTcpConnection(self.conn, half_close=True)     # FIN after the GOAWAY
            yield command
        yield commands.RequestWakeup(LINGER)
        self.lingered = 0
        self._handle_event = _lingering.__get__(self)
        return True
    if isinstance(event, h2.events.RequestReceived) and self.h2_conn._stream_is_closed_by_reset(event.stream_id):
        return False                # reset in the same read: never a request (no flow, no hooks, no origin)
    if isinstance(event, h2.events.StreamReset) and event.stream_id not in self.streams and event.stream_id % 2:
        yield ReceiveHttp(RequestProtocolError(event.stream_id, "stream reset by client", ErrorCode.CANCEL))
        return False
    return (yield from _h2_server_handle_h2_event(self, event))


def _lingering(self, event):
    """A flooding client's connection after its GOAWAY: read and ignore, then close."""
    if isinstance(event, events.DataReceived):
        self.lingered += len(event.data)
    if isinstance(event, events.Wakeup) or self.lingered > LINGER_BYTES:
        self._handle_event = self.done
        yield commands.CloseConnection(self.conn)


def _pending_reset(stream) -> RequestProtocolError | None:
    """A client reset of this stream waiting behind the stream's current command, if any."""
    return next((e for e in stream._paused_event_queue if isinstance(e, RequestProtocolError)), None)


def install(interim: Callable[[Fields, http.Request], Fields],
            failover: Callable[[http.HTTPFlow, str, bool], bool] | None = None) -> None:
    """Apply the patches (idempotent); `interim` masks interim responses' header fields,
    `failover` is asked for another origin when one fails before answering."""
    global _installed, interim_filter, reroute
    interim_filter, reroute = interim, failover
    _install_console()
    if _installed:
        return
    if not version.VERSION.startswith(TESTED_WITH):
        logger.warning("edge: mitmproxy %s is untested; error pages may name the origin", version.VERSION)
    _http1.make_error_response = _make_error_response
    _http1.Http1Server.send = _server_send
    _http2.Http2Server._handle_event = _h2_server_handle_event
    _http2.Http2Server.handle_h2_event = _h2_server_event      # floods and resets, then bad pseudo-headers
    _http2.Http2Server.protocol_error = _h2_server_protocol_error
    for module in (_http1, _http2, _http3):
        module.format_error = _format_error
    http_layer.HttpStream.handle_protocol_error = _handle_protocol_error
    http_layer.HttpStream.make_server_connection = _make_server_connection
    _http1.Http1Client.read_headers = _read_headers
    _http1.Http1Client._handle_event = _client_handle_event
    http_layer.HttpLayer.get_connection = _get_connection
    _http1.Http1Server.read_headers = _server_read_headers
    http_layer.HttpStream.check_body_size = _check_body_size
    proxy_server.ConnectionHandler.handle_connection = _handle_connection
    _http1.Http1Client.send = _client_send
    _http1.make_body_reader = _make_body_reader
    _http1.Http1Connection.read_body = _read_body
    _http2.Http2Server.__init__ = _h2_server_init
    http_layer.HttpStream.state_stream_request_body = _stream_request_body
    _installed = True


# -- mitmweb's page: the console's style -------------------------------------------------------------

_index_render: Callable | None = None       # tornado's RequestHandler.render, as mitmweb's page had it
CONSOLE_STYLE = (b"<style>.flow-detail .kv-value{white-space:pre-wrap}"
                 b".flow-table .col-comment{width:38%}</style>")


def _console_render(self, template_name: str, **kwargs):
    """mitmweb's IndexHandler.render: its page with the console's style. The handler's get and
    post stay mitmweb's (they carry its authentication: the login page renders unchanged)."""
    if template_name != "../index.html":
        return _index_render(self, template_name, **kwargs)
    page = self.render_string(template_name, **kwargs)
    return self.finish(page.replace(b"</head>", CONSOLE_STYLE + b"</head>", 1))


def _install_console() -> None:
    """Once mitmweb's app module is loaded (a web master exists): its page with the style."""
    global _console_installed, _index_render
    web = sys.modules.get("mitmproxy.tools.web.app")
    if _console_installed or web is None:
        return
    _index_render, web.IndexHandler.render = web.IndexHandler.render, _console_render
    _console_installed = True
