"""Only the edge answers: every answer the proxy makes itself is the edge's page (Server as
configured, a request id, no echo of the input, no mitmproxy wording), no certificate of
mitmproxy's CA is ever presented, and mitmweb's master keeps mitmproxy's own apps away."""

import json
import re
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from addons import failsafe
from tests.conftest import free_port
from tests.rawnet import OK, RecordingOrigin, exchange, status_of

GET = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"
MARK = b"EchoMark7f3a"       # in every hostile input: must never come back
ID = re.compile(rb"request id: ([0-9a-f-]{36})\n")

HOSTILE = {
    "request line": (b"GARBAGE " + MARK + b" <script>\r\n\r\n", 400),
    "header line": (b"GET / HTTP/1.1\r\nHost: shop.example\r\n" + MARK + b" no colon\r\n\r\n", 400),
    "two lengths": (b"POST / HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 1\r\nContent-Length: 2"
                    + MARK + b"\r\n\r\nx", 400),
    "smuggling check": (b"POST / HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n"
                        b"Content-Length: 5\r\nX-" + MARK + b": 1\r\n\r\n0\r\n\r\n", 400),
    "CONNECT": (b"CONNECT " + MARK + b".example:443 HTTP/1.1\r\nHost: " + MARK + b".example:443\r\n\r\n", 405),
    "head too large": (b"GET /" + MARK + b" HTTP/1.1\r\nHost: shop.example\r\nX-Big: " + b"a" * 4000, 431),
    "bad chunk": (b"POST / HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\nzz" + MARK + b"\r\n", 400),
    "body too large": (b"POST /" + MARK + b" HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5000\r\n\r\n", 413),
}


def assert_edge_page(response: bytes, status: int, server: str | None = "edge") -> str:
    """The edge's page for `status`; its request id."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == status, response
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    assert fields.get(b"server") == (server.encode() if server else None)
    assert fields[b"cache-control"] == b"no-store" and fields[b"content-type"].startswith(b"text/plain")
    m = ID.search(body)
    assert m and fields[b"edge-request-id"] == m[1]
    assert body.startswith(f"{status} ".encode())
    assert b"mitmproxy" not in response.lower() and MARK.lower() not in response.lower()
    assert b"validate_inbound_headers" not in response and b"<html" not in response
    return m[1].decode()


@pytest.mark.parametrize("name", HOSTILE)
def test_mitmproxy_made_answers_are_the_edges_page(edge, tmp_path, name):
    data, status = HOSTILE[name]
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield: {{max_header_bytes: 1KB, max_body: 1KB}}\n",
             access_log=str(log))
    request_id = assert_edge_page(exchange(e.host, e.port, data), status)
    normal = exchange(e.host, e.port, b"GET /normal HTTP/1.1\r\nHost: shop.example\r\n\r\n", until_close=False)
    assert normal.endswith(b"\r\n\r\nok")                             # the client beside is served
    assert len(o.requests) == 1 and o.requests[0].startswith(b"GET /normal HTTP/1.1\r\n")
    assert MARK not in o.received                                      # nothing of the hostile one
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    (rec,) = [r for r in lines if r.get("id") == request_id]          # the request id is in the log
    assert rec["client"] == "127.0.0.1"


def test_unreachable_origin_is_the_edges_502(edge):
    dead = f"http://127.0.0.1:{free_port()}"
    e = edge(f"pools: {{p: {{origins: [{dead}]}}}}\n")
    # a first request may be refused by the route (503, the connect probe found it dead): both
    # are edge pages, and neither names the origin
    out = exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", until_close=False)
    assert_edge_page(out, status_of(out))
    assert status_of(out) in (502, 503) and dead.split(":")[-1].encode() not in out


def test_502_after_a_connect_failure_carries_the_flow_id(edge, origin, tmp_path):
    """The origin refuses the connection after passing the route's probe: mitmproxy's 502."""
    o = origin("eu")
    log = tmp_path / "access.log"
    e = edge([o.url], access_log=str(log))
    assert status_of(exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until_close=False)) == 200
    o.stop()
    out = exchange(e.host, e.port, b"GET /gone HTTP/1.1\r\nHost: a\r\n\r\n")
    request_id = assert_edge_page(out, 502)
    (rec,) = [json.loads(line) for line in log.read_text().splitlines() if request_id in line]
    assert rec["url"].endswith("/gone") and str(o.port) not in out.decode()


def test_mitmproxys_own_body_size_limit_answers_the_edges_413(edge):
    o = RecordingOrigin()
    e = edge([o.url], settings=["body_size_limit=1k"])
    data = b"POST /" + MARK + b" HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5000\r\n\r\n"
    assert_edge_page(exchange(e.host, e.port, data), 413)           # mitmproxy's wording named its option
    assert o.requests == []


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\nX-Origin: " + MARK + b"\r\n\r\nok",
    b"NOT HTTP " + MARK + b"\r\n\r\n",
])
def test_a_malformed_origin_response_is_the_edges_502(edge, answer):
    o = RecordingOrigin(answer)
    e = edge([o.url])
    out = exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", until_close=False)
    assert_edge_page(out, 502)


def test_502_to_a_head_request_has_no_body(edge, origin):
    o = origin("eu")
    e = edge([o.url])
    assert status_of(exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until_close=False)) == 200
    o.stop()
    out = exchange(e.host, e.port, b"HEAD /gone HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert status_of(out) == 502 and b"\r\nEdge-Request-Id: " in head and body == b""


def test_server_header_null_removes_it_from_protocol_answers(edge):
    o = RecordingOrigin()
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nscrub: {{server_header: null}}\n")
    assert_edge_page(exchange(e.host, e.port, HOSTILE["request line"][0]), 400, server=None)
    assert_edge_page(exchange(e.host, e.port, HOSTILE["CONNECT"][0]), 405, server=None)


def test_edge_answers_say_so_in_cache_status(edge):
    e = edge([f"http://127.0.0.1:{free_port()}"])
    r = httpx.get(f"{e.url}/")
    assert r.status_code == 503 and r.headers["cache-status"] == 'edge; detail="edge answer"'


def h2_request(host: str, port: int, context: ssl.SSLContext, headers: list) -> tuple[dict, bytes]:
    """One HTTP/2 stream with exactly these pseudo-headers and fields; the answer's fields and
    body (or, if the connection was ended, `:goaway` with the GOAWAY's debug data)."""
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False))
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        s.sendall(conn.data_to_send())
        fields, body = {}, b""
        while True:
            data = s.recv(65536)
            if not data:
                raise AssertionError("closed before the stream ended")
            events = conn.receive_data(data)
            goaways = [e.additional_data or b"" for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            if goaways:                                         # with whatever else it sent, raw
                return {":goaway": b"".join(goaways) + b"".join(iter(lambda: s.recv(65536), b""))}, b""
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    fields = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(len(event.data), event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return fields, body
            s.sendall(conn.data_to_send())


H2_GET = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/")]


@pytest.mark.parametrize("headers, status", [
    ([(":method", "CONNECT"), (":authority", MARK.decode() + ".example:443")], "405"),
    ([(":method", "GET"), (":scheme", "https"), (":authority", MARK.decode() + ":99999"), (":path", "/")], "400"),
])
def test_http2_requests_mitmproxy_cannot_take_get_the_edges_page(edge, tls, tmp_path, headers, status):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    e = edge([o.url], cert=str(tls.pem), access_log=str(log))
    fields, body = h2_request(e.host, e.port, tls.client_context(), headers)
    assert fields[":status"] == status and fields["server"] == "edge" and fields["cache-control"] == "no-store"
    assert body.startswith(status.encode() + b" ") and fields["edge-request-id"].encode() in body
    assert b"mitmproxy" not in body.lower() and MARK not in body and "connection" not in fields
    assert fields["edge-request-id"] in log.read_text()
    assert h2_request(e.host, e.port, tls.client_context(), H2_GET)[0][":status"] == "200"
    assert MARK not in o.received


def test_http2_protocol_error_ends_the_connection_with_a_request_id_only(edge, tls, tmp_path):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    e = edge([o.url], cert=str(tls.pem), access_log=str(log))
    fields, _ = h2_request(e.host, e.port, tls.client_context(), H2_GET + [(":" + MARK.decode(), "x")])
    goaway = fields[":goaway"]
    m = re.search(rb"request id: ([0-9a-f-]{36})", goaway)             # the GOAWAY data: not mitmproxy's message
    assert m and m[1].decode() in log.read_text()
    assert MARK.lower() not in goaway.lower() and b"pseudo" not in goaway
    assert h2_request(e.host, e.port, tls.client_context(), H2_GET)[0][":status"] == "200"


def test_http2_502_is_the_edges_page(edge, origin, tls):
    o = origin("eu")
    e = edge([o.url], cert=str(tls.pem))
    assert h2_request(e.host, e.port, tls.client_context(), H2_GET)[0][":status"] == "200"
    o.stop()
    fields, body = h2_request(e.host, e.port, tls.client_context(), H2_GET)
    assert fields[":status"] == "502" and fields["server"] == "edge"
    assert fields["edge-request-id"].encode() in body and b"mitmproxy" not in body.lower()


# -- TLS: never a certificate of mitmproxy's CA ------------------------------------------------------

def handshake(host: str, port: int, sni: str) -> x509.Certificate:
    """A TLS handshake that accepts any certificate; the one presented."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=sni) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def issuer_cn(cert: x509.Certificate) -> str:
    return cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.mark.parametrize("web", [False, True])
def test_no_tls_without_a_certificate(edge, web, caplog):
    o = RecordingOrigin()
    e = edge([o.url], web=web, web_port=free_port())
    for sni in ("localhost", "shop.example", "a.example", "b.example"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            handshake(e.host, e.port, sni)
    assert exchange(e.host, e.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until_close=False).endswith(b"ok")
    said = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert len(said) == 1 and "no certificate is configured" in said[0]      # reported once, not per client


def test_with_a_certificate_only_that_one_is_presented(edge, tls):
    o = RecordingOrigin()
    e = edge([o.url], cert=str(tls.pem))
    for sni in ("localhost", "other.example", "mitm.it"):
        cert = handshake(e.host, e.port, sni)
        assert issuer_cn(cert) == "edge test CA"                      # never minted for the name asked
    minted = [k for k in e.master.addons.get("tlsconfig").certstore.certs if isinstance(k, tuple)]
    assert minted == []


def test_a_certificate_for_some_names_is_no_licence_to_mint_others(edge, tls):
    o = RecordingOrigin()
    e = edge([o.url], settings=[f"certs=localhost={tls.pem}"])
    assert issuer_cn(handshake(e.host, e.port, "localhost")) == "edge test CA"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        handshake(e.host, e.port, "other.example")                    # mitmproxy would mint one for it


# -- mitmweb's master: mitmproxy's own apps stay away from clients ------------------------------------

def test_web_master_forwards_onboarding_and_crl_paths(edge):
    o = RecordingOrigin(OK)
    e = edge([o.url], web=True, web_port=free_port())
    serial = e.master.addons.get("tlsconfig").certstore.default_ca.serial
    asks = [(b"/", b"mitm.it"), (b"/cert/pem", b"mitm.it"), (f"/mitmproxy-{serial}.crl".encode(), b"shop.example")]
    for path, host in asks:
        out = exchange(e.host, e.port, b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", until_close=False)
        assert out.endswith(b"\r\n\r\nok") and b"mitmproxy" not in out.lower()     # the origin's answer
    assert [r.split(b"\r\n", 1)[0] for r in o.requests] == [b"GET " + p + b" HTTP/1.1" for p, _ in asks]
    assert e.master.addons.get("onboarding") is None


@pytest.mark.parametrize("web", [False, True])
def test_web_master_leaves_alt_svc_as_the_lean_one_does(edge, web):
    """mitmweb's UpdateAltSvc would point Alt-Svc at the listener's port; the lean master (and
    so production) has no such addon: what mitmweb shows is what clients get."""
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nAlt-Svc: h3=\"cdn.example:443\"\r\nContent-Length: 2\r\n"
                        b"Cache-Control: no-store\r\n\r\nok")
    e = edge([o.url], web=web, web_port=free_port())
    out = exchange(e.host, e.port, GET, until_close=False)
    assert status_of(out) == 200 and f":{e.port}".encode() not in out


# -- the pure parts ---------------------------------------------------------------------------------

def test_page_and_headers_are_one_format():
    assert failsafe.page(431, "request header fields too large", "abc") == \
        b"431 Request Header Fields Too Large: request header fields too large\nrequest id: abc\n"
    assert failsafe.page(599, "x", "abc").startswith(b"599 Error: x\n")
    headers = failsafe.page_headers("abc", close=True)
    assert headers["Server"] == failsafe.server_header and headers["Edge-Request-Id"] == "abc"
    assert headers["Connection"] == "close" and headers["Cache-Control"] == "no-store"
    assert failsafe.reason_for(502) == "the origin could not be reached or did not answer properly"
    assert failsafe.reason_for(418) == "the request was refused" and failsafe.reason_for(599) == failsafe.REASONS[500]
    response = failsafe.answer(503, "x", "abc")
    assert failsafe.made_by_edge(response) and not failsafe.made_by_edge(None)
