"""Well-formed requests and one framing: the pure rules, then hostile clients through a real
edge with an origin that records every byte it receives."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from addons.protocol.rules import check_request, closes, declared_length, framed, host_from_target, http1_fields
from tests.rawnet import CLOSE, RecordingOrigin, exchange, status_of

# -- pure ------------------------------------------------------------------------------------------

HOST = ((b"Host", b"shop.example"),)


def verdict(method=b"GET", target=b"/", authority=b"", version=b"HTTP/1.1", fields=HOST, h2=False):
    refusal = check_request(method, target, authority, version, fields, h2=h2)
    return None if refusal is None else refusal.status


@pytest.mark.parametrize("value, status", [
    (b"plain value, with\tHTAB and obs-text \xe9", None),
    (b"a\rX-Forwarded-For: 1.2.3.4", 400),        # bare CR: a new field to some parsers
    (b"a\x00b", 400),
    (b"a\r\n X-Forwarded-Host: evil", 400),       # obs-fold, as mitmproxy joins it
    (b"a\x01b", 400), (b"a\x7fb", 400), (b"a\x1bb", 400),
])
def test_field_values(value, status):
    assert verdict(fields=HOST + ((b"X-A", value),)) == status


def test_field_names_are_tokens():
    assert verdict(fields=HOST + ((b"X A", b"1"),)) == 400
    assert verdict(fields=HOST + ((b"X-A:", b"1"),)) == 400
    assert verdict(fields=HOST + ((b"", b"1"),)) == 400
    assert verdict(fields=((b"", b"1"),) + HOST) == 400


@pytest.mark.parametrize("version, h2, status", [
    (b"HTTP/1.1", False, None), (b"HTTP/1.0", False, None), (b"HTTP/2.0", True, None),
    (b"HTTP/1.2", False, 505), (b"HTTP/0.9", False, 505), (b"HTTP/3.0", False, 505),
    (b"HTTP/2.0", False, 505),                    # "HTTP/2.0" in an HTTP/1 request line
    (b"HTTP/1.1", True, 505),
])
def test_versions(version, h2, status):
    assert verdict(version=version, h2=h2) == status


@pytest.mark.parametrize("method, status", [
    (b"GET", None), (b"PURGE", None), (b"M-SEARCH", None), (b"PROPFIND", None),
    (b"purge", 400), (b"get", 400), (b"Get", 400),         # case-sensitive: not GET nor PURGE
    (b"GE(T", 400), (b"", 400),
])
def test_methods(method, status):
    assert verdict(method=method) == status


@pytest.mark.parametrize("method, target, status", [
    (b"GET", b"/a?b=c", None), (b"OPTIONS", b"*", None), (b"GET", b"/caf\xc3\xa9", None),
    (b"GET", b"/a#frag", 400), (b"GET", b"*", 400), (b"GET", b"http://other.example/", 400),
    (b"GET", b"a", 400), (b"GET", b"/a b", 400), (b"GET", b"/a\x00", 400), (b"GET", b"/a\x7f", 400),
])
def test_targets(method, target, status):
    assert verdict(method=method, target=target) == status


@pytest.mark.parametrize("fields, version, authority, h2, status", [
    ((), b"HTTP/1.1", b"", False, 400),                              # RFC 9112 3.2: missing
    ((), b"HTTP/1.0", b"", False, None),                             # HTTP/1.0 may omit it
    (HOST * 2, b"HTTP/1.1", b"", False, 400),                        # never two, even equal
    (HOST * 2, b"HTTP/1.0", b"", False, 400),
    (((b"host", b""),), b"HTTP/1.1", b"", False, 400),
    (((b"host", b"a,b"),), b"HTTP/1.1", b"", False, 400),
    (((b"host", b"a b"),), b"HTTP/1.1", b"", False, 400),
    (((b"host", b"shop.example:"),), b"HTTP/1.1", b"", False, 400),
    (((b"host", b"shop.example:8080"),), b"HTTP/1.1", b"", False, None),
    (((b"host", b"[::1]:8080"),), b"HTTP/1.1", b"", False, None),
    (((b"host", b"127.0.0.1"),), b"HTTP/1.1", b"", False, None),
    (HOST, b"HTTP/1.1", b"other.example", False, None),             # absolute-form: its authority wins
    (((b"host", b"not valid"),), b"HTTP/1.1", b"other.example", False, None),   # ... and Host is ignored
    ((), b"HTTP/1.1", b"other.example", False, 400),                 # HTTP/1.1 still needs a Host
    ((), b"HTTP/1.0", b"other.example", False, None),
    (HOST, b"HTTP/1.1", b"user@other.example", False, 400),
    ((), b"HTTP/2.0", b"shop.example", True, None),
    (((b"host", b"shop.example"),), b"HTTP/2.0", b"", True, None),
    (((b"host", b"shop.example"),), b"HTTP/2.0", b"shop.example", True, None),
    (((b"host", b"other.example"),), b"HTTP/2.0", b"shop.example", True, 400),
    ((), b"HTTP/2.0", b"", True, 400),
])
def test_host(fields, version, authority, h2, status):
    assert verdict(fields=fields, version=version, authority=authority, h2=h2) == status


@pytest.mark.parametrize("fields, version, h2, status", [
    (((b"Content-Length", b"5"),), b"HTTP/1.1", False, None),
    (((b"Transfer-Encoding", b"chunked"),), b"HTTP/1.1", False, None),
    (((b"Transfer-Encoding", b"gzip, chunked"),), b"HTTP/1.1", False, None),
    (((b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")), b"HTTP/1.1", False, 400),
    (((b"Transfer-Encoding", b"chunked"),) * 2, b"HTTP/1.1", False, 400),
    (((b"Transfer-Encoding", b"chunked, chunked"),), b"HTTP/1.1", False, 400),
    (((b"Transfer-Encoding", b"gzip"),), b"HTTP/1.1", False, 400),
    (((b"Transfer-Encoding", b"chunked"),), b"HTTP/1.0", False, 400),
    (((b"transfer-encoding", b"chunked"),), b"HTTP/2.0", True, 400),
    (((b"Content-Length", b"5"),) * 2, b"HTTP/1.1", False, 400),
    (((b"Content-Length", b"5, 5"),), b"HTTP/1.1", False, 400),
    (((b"Content-Length", b"-1"),), b"HTTP/1.1", False, 400),
])
def test_framing_fields(fields, version, h2, status):
    authority = b"shop.example" if h2 else b""
    assert verdict(fields=(() if h2 else HOST) + fields, version=version, authority=authority, h2=h2) == status


def test_absolute_form_authority_replaces_host_in_place():
    fields = ((b"Accept", b"*/*"), (b"host", b"shop.example"), (b"X-A", b"1"))
    assert host_from_target(b"other.example:8080", fields) == (
        (b"Accept", b"*/*"), (b"host", b"other.example:8080"), (b"X-A", b"1"))


@pytest.mark.parametrize("version, connection, expected", [
    (b"HTTP/1.1", None, False), (b"HTTP/1.1", b"close", True), (b"HTTP/1.1", b"Keep-Alive, Close", True),
    (b"HTTP/1.0", None, True), (b"HTTP/1.0", b"keep-alive", True),
])
def test_closes(version, connection, expected):
    fields = HOST + (((b"Connection", connection),) if connection else ())
    assert closes(version, fields) is expected


def test_http2_fields_for_http1():
    fields = ((b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2"))
    assert http1_fields(fields, b"shop.example") == (
        (b"Host", b"shop.example"), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*"))
    assert http1_fields(((b"host", b"shop.example"),), b"shop.example") == ((b"host", b"shop.example"),)


def test_framed_gives_exactly_one_framing():
    te, cl = (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")
    assert framed(HOST + (te,), has_body=True, length=3) == (HOST + (te,), True)           # the client's chunking
    assert framed(HOST + (te, cl), has_body=True, length=None) == (HOST + (te,), True)     # RFC 9112 6.3
    assert framed(HOST, has_body=False, length=0) == (HOST, False)                         # no body, no framing
    assert framed(HOST + (cl,), has_body=False, length=3) == (HOST + ((b"Content-Length", b"0"),), False)
    assert framed(HOST, has_body=True, length=3) == (HOST + (cl,), False)                  # h2 body, buffered
    assert framed(HOST + (cl,), has_body=True, length=3) == (HOST + (cl,), False)
    assert framed(HOST + ((b"content-length", b"9"),), has_body=True, length=3) == (HOST + (cl,), False)
    assert framed(HOST, has_body=True, length=None) == (HOST + (te,), True)                # h2 body, streamed
    assert declared_length(HOST + (cl,)) == 3 and declared_length(HOST + (cl, cl)) is None
    assert declared_length(HOST) is None


# -- through a real edge -----------------------------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: shop.example\r\n\r\n"
CACHEABLE = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nCache-Control: max-age=60\r\n\r\npage"


def head_and_body(request: bytes) -> tuple[bytes, bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def fields_named(head: bytes, name: bytes) -> list[bytes]:
    return [v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            if k.lower() == name]


def dechunk(body: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        if size == 0:
            return out
        out += body[eol + 2:eol + 2 + size]
        pos = eol + 4 + size


@pytest.fixture
def recording():
    started: list[RecordingOrigin] = []

    def make(script=None) -> RecordingOrigin:
        o = RecordingOrigin() if script is None else RecordingOrigin(script)
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


def h2_streams(port: int, tls, streams: list[tuple[list, bytes, list | None]], timeout: float = 10.0):
    """One HTTP/2 connection over TLS; each (headers, body, trailers) is sent as its own stream,
    as given (no client-side validation). Returns [(status or None if reset, body), ...]."""
    ctx = tls.client_context()
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        conn.initiate_connection()
        results: dict[int, list] = {}
        for headers, body, trailers in streams:
            sid = conn.get_next_available_stream_id()
            results[sid] = [None, b""]
            conn.send_headers(sid, headers, end_stream=not body and not trailers)
            if body:
                conn.send_data(sid, body, end_stream=not trailers)
            if trailers:
                conn.send_headers(sid, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        open_ = set(results)
        while open_:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    results[ev.stream_id][0] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    results[ev.stream_id][1] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    open_.discard(ev.stream_id)
            sock.sendall(conn.data_to_send())
        return [tuple(results[sid]) for sid in sorted(results)]


def h2_head(method: bytes, path: bytes, authority: bytes = b"shop.example", extra=()) -> list:
    return [(b":method", method), (b":scheme", b"https"), (b":path", path), (b":authority", authority), *extra]


@pytest.mark.parametrize("streamed", [False, True])
def test_http2_body_without_content_length_is_framed(edge, tls, recording, streamed):
    """The smuggling found: an HTTP/2 body with no content-length reached the origin with no
    framing, and the origin read the requests inside it as its own (51 from one stream)."""
    o = recording()
    e = edge([o.url], cert=str(tls.pem), settings=["stream_large_bodies=1"] if streamed else [])
    body = b"x" + SMUGGLED * 50
    [(status, answer)] = h2_streams(e.port, tls, [(h2_head(b"POST", b"/upload"), body, None)])
    assert (status, answer) == (200, b"ok")
    [request] = o.wait_for_requests(1)
    head, sent = head_and_body(request)
    assert head.startswith(b"POST /upload HTTP/1.1\r\n") and fields_named(head, b"host") == [b"shop.example"]
    if streamed:
        assert fields_named(head, b"transfer-encoding") == [b"chunked"] and not fields_named(head, b"content-length")
        assert dechunk(sent) == body
    else:
        assert fields_named(head, b"content-length") == [str(len(body)).encode()]
        assert not fields_named(head, b"transfer-encoding") and sent == body
    assert o.received == request                  # nothing else: no request from inside the body


def test_curl_http2_upload_from_stdin_keeps_its_body(edge, tls, recording):
    o = recording()
    e = edge([o.url], cert=str(tls.pem))
    upload = b"line one\nline two\n" * 100
    out = subprocess.run(["curl", "-s", "--http2", "--max-time", "10", "--cacert", str(tls.ca), "-T", "-",
                          f"https://localhost:{e.port}/files/up.txt"], input=upload, capture_output=True, check=True)
    assert out.stdout == b"ok"
    [request] = o.wait_for_requests(1)
    head, sent = head_and_body(request)
    assert head.startswith(b"PUT /files/up.txt HTTP/1.1\r\n") and sent == upload
    assert fields_named(head, b"content-length") == [str(len(upload)).encode()]
    assert o.received == request


def test_http2_trailers_do_not_crash_and_are_dropped(edge, tls, recording):
    o = recording()
    e = edge([o.url], cert=str(tls.pem))
    streams = [(h2_head(b"POST", b"/t"), b"abc", [(b"x-forwarded-for", b"6.6.6.6"), (b"x-checksum", b"1")]),
               (h2_head(b"GET", b"/after"), b"", None)]
    assert h2_streams(e.port, tls, streams) == [(200, b"ok"), (200, b"ok")]
    first = next(r for r in o.wait_for_requests(2) if r.startswith(b"POST"))
    head, sent = head_and_body(first)
    assert fields_named(head, b"content-length") == [b"3"] and sent == b"abc"
    assert b"6.6.6.6" not in o.received and b"x-checksum" not in o.received.lower()


def test_absolute_form_target_sets_host_for_origin_and_cache(edge, recording):
    """Cache poisoning: the absolute URI went to the origin as it came (an nginx origin serves
    other.example) and its answer was stored under shop.example."""
    o = recording(CACHEABLE)
    e = edge([o.url])
    out = exchange(e.host, e.port, b"GET http://other.example/page HTTP/1.1\r\nHost: shop.example\r\n\r\n",
                   until_close=False)
    assert status_of(out) == 200
    [request] = o.wait_for_requests(1)
    head, _ = head_and_body(request)
    assert head.startswith(b"GET /page HTTP/1.1\r\n") and fields_named(head, b"host") == [b"other.example"]
    assert fields_named(head, b"x-forwarded-host") == [b"other.example"]
    # shop.example's /page was never fetched: the origin is asked; other.example's is a hit
    assert httpx.get(f"{e.url}/page", headers={"Host": "shop.example"}).status_code == 200
    assert len(o.wait_for_requests(2)) == 2 and fields_named(o.requests[1], b"host") == [b"shop.example"]
    hit = httpx.get(f"{e.url}/page", headers={"Host": "other.example"})
    assert hit.headers["cache-status"].startswith("edge; hit") and len(o.requests) == 2


NORMAL = b"GET /normal HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
MALFORMED = {
    "bare CR": (b"GET /a HTTP/1.1\r\nHost: shop.example\r\nX-A: a\rX-Forwarded-For: 1.2.3.4\r\n\r\n", 400),
    "NUL": (b"GET /a HTTP/1.1\r\nHost: shop.example\r\nX-A: a\x00b\r\n\r\n", 400),
    "obs-fold": (b"GET /a HTTP/1.1\r\nHost: shop.example\r\nX-A: a\r\n X-Forwarded-Host: evil\r\n\r\n", 400),
    "control character": (b"GET /a HTTP/1.1\r\nHost: shop.example\r\nX-A: a\x1bb\r\n\r\n", 400),
    "no Host": (b"GET /a HTTP/1.1\r\n\r\n", 400),
    "two Hosts": (b"GET /a HTTP/1.1\r\nHost: shop.example\r\nHost: other.example\r\n\r\n", 400),
    "invalid Host": (b"GET /a HTTP/1.1\r\nHost: shop.example, other.example\r\n\r\n", 400),
    "fragment": (b"GET /a#b HTTP/1.1\r\nHost: shop.example\r\n\r\n", 400),
    "HTTP/1.2": (b"GET /a HTTP/1.2\r\nHost: shop.example\r\n\r\n", 505),
    "HTTP/2.0 over HTTP/1": (b"GET /a HTTP/2.0\r\nHost: shop.example\r\n\r\n", 505),
    "lower-case get": (b"get /a HTTP/1.1\r\nHost: shop.example\r\n\r\n", 400),
    "body with both framings": (b"POST /a HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    "bad chunk size": (b"POST /a HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n", 400),
    "bad trailer field": (b"POST /a HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabc\r\n0\r\nX-A: a\x00b\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_refused_and_others_served(edge, recording, case):
    data, status = MALFORMED[case]
    o = recording()
    e = edge([o.url])
    out = exchange(e.host, e.port, data + NORMAL)        # the rest of the connection is not read
    assert status_of(out) == status and out.count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in out.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert exchange(e.host, e.port, NORMAL).startswith(b"HTTP/1.1 200 ")      # everyone else is served
    [request] = o.wait_for_requests(1)
    assert request.startswith(b"GET /normal ") and o.received == request


def test_both_framings_refused_even_without_mitmproxy_validation(edge, recording):
    """RFC 9112 6.3: with validate_inbound_headers off mitmproxy reads the chunked body and
    forwarded both fields; the edge's own rule still refuses."""
    o = recording()
    e = edge([o.url], settings=["validate_inbound_headers=false"])
    data = MALFORMED["body with both framings"][0]
    out = exchange(e.host, e.port, data)
    assert status_of(out) == 400 and b"edge" in out
    assert exchange(e.host, e.port, NORMAL).startswith(b"HTTP/1.1 200 ")
    assert o.wait_for_requests(1) and o.received.startswith(b"GET /normal ")


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
def test_http10_without_host_is_served_and_told_of_the_close(edge, recording, connection):
    o = recording()
    e = edge([o.url])
    out = exchange(e.host, e.port, b"GET /old HTTP/1.0\r\n" + connection + b"\r\n" + SMUGGLED)
    assert status_of(out) == 200 and b"\r\nConnection: close\r\n" in out and out.count(b"HTTP/1.1 ") == 1
    [request] = o.wait_for_requests(1)
    assert request.startswith(b"GET /old HTTP/1.0\r\n") and not fields_named(request, b"host")


def test_lower_case_purge_does_not_purge(edge, recording):
    o = recording(CACHEABLE)
    e = edge([o.url])
    assert httpx.get(f"{e.url}/page").status_code == 200
    out = exchange(e.host, e.port, b"purge /page HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % e.port)
    assert status_of(out) == 400
    assert httpx.get(f"{e.url}/page").headers["cache-status"].startswith("edge; hit")
    assert len(o.requests) == 1
    assert httpx.request("PURGE", f"{e.url}/page").status_code == 200       # the real one still works
    assert httpx.get(f"{e.url}/page").status_code == 200 and len(o.wait_for_requests(2)) == 2


def test_http2_malformed_stream_refused_and_the_connection_goes_on(edge, tls, recording):
    """h2 itself refuses CR, LF and NUL; other controls, lower-case methods and targets that
    are not origin-form are the edge's to refuse (each on its own stream)."""
    o = recording()
    e = edge([o.url], cert=str(tls.pem))
    streams = [(h2_head(b"GET", b"/a", extra=[(b"x-a", b"a\x01b")]), b"", None),
               (h2_head(b"purge", b"/a"), b"", None),
               (h2_head(b"GET", b"http://other.example/a"), b"", None),
               (h2_head(b"GET", b"/a#frag"), b"", None),
               (h2_head(b"GET", b"/normal"), b"", None)]
    results = h2_streams(e.port, tls, streams)
    assert [status for status, _ in results] == [400, 400, 400, 400, 200]
    [request] = o.wait_for_requests(1)
    assert request.startswith(b"GET /normal HTTP/1.1\r\nHost: shop.example\r\n") and o.received == request


@pytest.mark.parametrize("streamed", [False, True])
def test_chunked_request_with_trailers_is_served(edge, recording, streamed):
    """Trailers crashed mitmproxy's connection handler (no answer at all)."""
    o = recording()
    e = edge([o.url], settings=["stream_large_bodies=1"] if streamed else [])
    data = (b"POST /t HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Checksum: 1\r\n\r\n")
    out = exchange(e.host, e.port, data + NORMAL)
    assert out.count(b"HTTP/1.1 200 ") == 2                 # the same connection goes on
    first, second = o.wait_for_requests(2)
    head, body = head_and_body(first)
    assert fields_named(head, b"transfer-encoding") == [b"chunked"] and body == b"3\r\nabc\r\n0\r\n\r\n"
    assert b"6.6.6.6" not in o.received and b"checksum" not in o.received.lower()
    assert second.startswith(b"GET /normal ")


TRAILED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nCache-Control: no-store\r\n\r\n"
           b"5\r\nhello\r\n0\r\nX-Checksum: 127.0.0.1:9\r\n\r\n")


def test_chunked_response_with_trailers_is_served(edge, tls, recording):
    o = recording(TRAILED)
    e = edge([o.url], cert=str(tls.pem))
    out = exchange(e.host, e.port, b"GET /a HTTP/1.1\r\nHost: shop.example\r\n\r\n" + NORMAL)
    assert out.count(b"HTTP/1.1 200 ") == 2 and b"127.0.0.1:9" not in out
    assert out.split(b"\r\n\r\n", 1)[1].startswith(b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 ")
    assert h2_streams(e.port, tls, [(h2_head(b"GET", b"/b"), b"", None)]) == [(200, b"hello")]


def test_connection_close_is_honoured(edge, recording):
    """The scrub removes Connection before mitmproxy looked at it: the edge kept the
    connection open and answered a request pipelined after the close."""
    o = recording(CACHEABLE)
    e = edge([o.url])
    closing = b"GET /page HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
    for _ in ("from the origin", "from the cache"):
        out = exchange(e.host, e.port, closing + SMUGGLED, timeout=10)      # ends only when the edge closes
        assert out.count(b"HTTP/1.1 ") == 1 and status_of(out) == 200
        assert re.search(rb"\r\nConnection: close\r\n", out.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    assert len(o.requests) == 1 and b"/smuggled" not in o.received
    assert not fields_named(o.requests[0], b"connection")     # hop-by-hop: not forwarded


def test_refusals_and_rewrites_are_in_the_access_log(edge, recording, tmp_path):
    """The smuggled requests were in no log; what the protocol addon decides is in the trace."""
    log = tmp_path / "access.log"
    o = recording()
    e = edge([o.url], access_log=str(log))
    exchange(e.host, e.port, MALFORMED["bare CR"][0])
    exchange(e.host, e.port, b"GET http://other.example/x HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
    refused, rewritten = (json.loads(line) for line in log.read_text().splitlines())
    assert refused["status"] == 400 and refused["edge"]["protocol"] == "refused: a bare CR in X-A"
    assert "origin" not in refused["edge"] and len(o.requests) == 1
    assert rewritten["status"] == 200 and rewritten["url"] == "http://other.example/x"
    assert rewritten["edge"]["protocol"] == "absolute-form target: Host from its authority"


def test_streamed_body_is_never_sent_again_without_its_body(edge, recording):
    """Failover re-sends a request whose origin failed before answering; a streamed body is
    gone by then, and the next origin got the PUT with its Content-Length and no body (it
    would read the next request as the body): a 502 instead."""
    failing, good = recording(lambda _: CLOSE), recording()
    e = edge([failing.url, good.url], settings=["stream_large_bodies=1"])
    put = b"PUT /f HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789"
    statuses = sorted(status_of(exchange(e.host, e.port, put)) for _ in range(2))
    assert statuses == [200, 502] and len(failing.requests) == 1
    assert len(good.requests) == 1 and good.requests[0].endswith(b"\r\n\r\n0123456789")
