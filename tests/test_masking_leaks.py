"""Identity leaks through a real edge: an origin that names itself, internal hosts and internal
addresses every way it can, and what the client gets instead (exact headers, exact bodies); a
normal site's policies pass untouched."""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import subprocess
import threading

import httpx
import pytest
from h2 import events as h2_events
from h2.config import H2Configuration
from h2.connection import H2Connection

from addons.config import ConfigError, parse_config
from tests.rawnet import RecordingOrigin, exchange

HOST = {"Host": "shop.example"}


def answer(status: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\nCache-Control: no-store\r\n\r\n").encode() + body


def path_of(request: bytes) -> str:
    return request.split(b" ", 2)[1].decode()


@pytest.fixture
def scripted(edge):
    """start(pages, scrub_yaml) -> (edge, origin): a RecordingOrigin answering each path from
    `pages` (path -> callable(origin) -> raw response), behind a real edge."""
    started = []

    def start(pages: dict, scrub: str = "{internal_domains: [internal.example]}", **kw):
        origin = RecordingOrigin(lambda req: pages[path_of(req)](origin))
        started.append(origin)
        e = edge(f"pools: {{eu: {{origins: [{origin.url}]}}}}\nscrub: {scrub}\n", **kw)
        return e, origin

    yield start
    for origin in started:
        origin.stop()


LOCATIONS = {
    "//10.1.2.3/x?y=1": "http://shop.example/x?y=1",          # protocol-relative: was a 302 without Location
    "10.1.2.3/x": "http://shop.example/x",                    # a bare IP
    "http://origin-7.internal.example/a": "http://shop.example/a",   # under a declared internal domain
    "http://ip-10-1-2-3.ec2.internal/a": "http://shop.example/a",
    "http://localhost:{port}/a": "http://shop.example/a",
    "http://127.0.0.1:{port}/a": "http://shop.example/a",
    "http://167838211/a": "http://shop.example/a",
    "http://0x0a010203/a": "http://shop.example/a",
    "http://012.1.2.3/a": "http://shop.example/a",
    "http://[::ffff:10.1.2.3]/a": "http://shop.example/a",
    "http://[::ffff:a01:203]:8080/a": "http://shop.example/a",
    "http://backend:3000/a": "http://shop.example/a",         # a dotless (docker, k8s) host
    "https://partner.example/a?from=http://10.0.0.5/b": "https://partner.example/a?from=http://shop.example/b",
    "/relative": "/relative",
}


def test_every_internal_spelling_in_location_is_rewritten(scripted):
    targets = list(LOCATIONS)
    pages = {f"/r{i}": (lambda o, t=t: answer("302 Found", [("Location", t.format(port=o.port))]))
             for i, t in enumerate(targets)}
    e, _ = scripted(pages)
    with httpx.Client(base_url=e.url, headers=HOST) as client:
        for i, target in enumerate(targets):
            r = client.get(f"/r{i}")
            assert r.status_code == 302
            assert r.headers.get_list("location") == [LOCATIONS[target]], target


LEAKY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; script-src 'self' http://127.0.0.1:{port} https://cdn.example.com "
                                "http://metrics.internal; object-src 'none'; report-uri http://127.0.0.1:{port}/csp"),
    ("Content-Security-Policy-Report-Only", "img-src 'self' *.internal"),
    ("Link", "<http://127.0.0.1:{port}/app.css>; rel=preload; as=style, <https://cdn.example.com/a.js>; rel=preload"),
    ("WWW-Authenticate", 'Bearer realm="localhost:{port}", authorization_uri="http://127.0.0.1:{port}/oauth"'),
    ("Access-Control-Allow-Origin", "http://10.0.0.9:3000"),
    ("Alt-Svc", 'h3=":{port}"; ma=86400, h2="alt.example.com:443"'),
    ("Refresh", "5; url=http://ip-10-1-2-3.ec2.internal/later"),
    ("X-Served-By", "origin-7.internal.example"),
    ("X-Node", "::ffff:10.1.2.3"),
    ("X-Upstream", ":{port}"),
]
EXPECTED = {
    "content-security-policy": "default-src 'self'; script-src 'self' http://shop.example https://cdn.example.com; "
                               "object-src 'none'; report-uri http://shop.example/csp",
    "content-security-policy-report-only": "img-src 'self'",
    "link": "<http://shop.example/app.css>; rel=preload; as=style, <https://cdn.example.com/a.js>; rel=preload",
    "www-authenticate": 'Bearer realm="shop.example", authorization_uri="http://shop.example/oauth"',
    "alt-svc": 'h2="alt.example.com:443"',
    "refresh": "5; url=http://shop.example/later",
}


def test_headers_are_rewritten_inside_not_deleted(scripted):
    e, origin = scripted({"/leaky": lambda o: answer("401 Unauthorized", [
        (k, v.format(port=o.port)) for k, v in LEAKY_HEADERS])})
    r = httpx.get(f"{e.url}/leaky", headers=HOST)
    assert r.status_code == 401
    assert {k: r.headers[k] for k in EXPECTED if k in r.headers} == EXPECTED
    for gone in ("access-control-allow-origin", "x-served-by", "x-node", "x-upstream"):
        assert gone not in r.headers, gone
    raw = "\n".join(f"{k}: {v}" for k, v in r.headers.multi_items())
    for leak in (str(origin.port), "10.", "internal", "127.0.0.1", "localhost"):
        assert leak not in raw, leak


PUBLIC_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; script-src 'self' https://cdn.example.com 'nonce-r4nd'; "
                                "frame-ancestors 'none'; report-uri https://csp.example.com/r"),
    ("Access-Control-Allow-Origin", "https://app.example.com"),
    ("Access-Control-Allow-Credentials", "true"),
    ("WWW-Authenticate", 'Bearer realm="api", authorization_uri="https://id.example.com/authorize"'),
    ("Alt-Svc", 'h3=":443"; ma=86400'),
    ("Link", "</static/app.css>; rel=preload; as=style"),
    ("X-Build", "1.2.3.4.5"),
    ("X-Served-At", "12:34:56"),
]


def test_a_normal_sites_headers_pass_untouched(scripted):
    e, _ = scripted({"/": lambda o: answer("401 Unauthorized", PUBLIC_HEADERS)})
    r = httpx.get(f"{e.url}/", headers=HOST)
    for name, value in PUBLIC_HEADERS:
        assert r.headers.get_list(name) == [value], name


def test_acao_echoing_an_internal_clients_origin_passes(scripted):
    e, _ = scripted({"/api": lambda o: answer("200 OK", [("Access-Control-Allow-Origin", "http://10.0.0.9:3000"),
                                                         ("Vary", "Origin")], b"{}")})
    with httpx.Client(base_url=e.url, headers=HOST) as client:
        assert client.get("/api", headers={"Origin": "http://10.0.0.9:3000"}).headers[
            "access-control-allow-origin"] == "http://10.0.0.9:3000"       # the client's own origin
        assert "access-control-allow-origin" not in client.get("/api", headers={"Origin": "https://evil.example"}).headers
        assert "access-control-allow-origin" not in client.get("/api").headers


ERROR_PAGES = {
    "/trace": lambda o: answer("502 Bad Gateway", [("Content-Type", "text/html"), ("Retry-After", "30"),
                                                   ("X-Request-Id", "abc")],
                               b"<h1>502</h1><pre>connect to 10.0.0.5:5432 failed (db.internal)</pre>"),
    "/gzip": lambda o: answer("500 Internal Server Error", [("Content-Type", "application/json"),
                                                            ("Content-Encoding", "gzip")],
                              gzip.compress(b'{"error": "http://backend:8080/api timed out"}')),
    "/clean": lambda o: answer("503 Service Unavailable", [("Content-Type", "text/html"), ("Retry-After", "5")],
                               b"<h1>Down for maintenance until 12:30</h1>"),
    "/image": lambda o: answer("500 Internal Server Error", [("Content-Type", "image/png")], b"\x89PNG 10.0.0.5"),
    "/reason": lambda o: (b"HTTP/1.1 502 upstream 10.0.0.5 refused\r\nContent-Length: 2\r\n"
                          b"Cache-Control: no-store\r\n\r\nno"),
}


def test_origin_5xx_bodies_naming_internal_hosts_become_the_edge_page(scripted, tmp_path):
    log = tmp_path / "access.log"
    e, _ = scripted(ERROR_PAGES, access_log=str(log))
    with httpx.Client(base_url=e.url, headers=HOST) as client:
        r = client.get("/trace")
        assert r.status_code == 502 and r.headers["retry-after"] == "30" and r.headers["x-request-id"] == "abc"
        assert r.headers["content-type"].startswith("text/plain") and "request id:" in r.text
        assert "10.0.0.5" not in r.text and "db.internal" not in r.text and "<h1>" not in r.text
        assert r.headers["content-length"] == str(len(r.content)) and "content-encoding" not in r.headers
        r = client.get("/gzip")
        assert r.status_code == 500 and "backend" not in r.text and "request id:" in r.text
        r = client.get("/clean")      # names nothing: the origin's own page
        assert (r.status_code, r.text, r.headers["retry-after"]) == (503, "<h1>Down for maintenance until 12:30</h1>", "5")
        assert client.get("/image").content == b"\x89PNG 10.0.0.5"     # not text: not scanned
    raw = exchange(e.host, e.port, b"GET /reason HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"10.0.0.5" not in raw
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["url"].rsplit("/", 1)[1], line["edge"].get("masked")) for line in lines] == [
        ("trace", ["body"]), ("gzip", ["body"]), ("clean", None), ("image", None), ("reason", ["reason"])]


def test_error_bodies_pass_when_configured(scripted):
    e, _ = scripted(ERROR_PAGES, "{error_bodies: pass}")
    r = httpx.get(f"{e.url}/trace", headers=HOST)
    assert r.status_code == 502 and "db.internal" in r.text


def test_bare_ip_and_protocol_relative_redirects_through_the_demo_origin(origin, edge):
    """The OriginServer fixture: a redirect page answering //10.1.2.3/x keeps its Location."""
    o = origin("eu")
    o.pages["/pr"] = lambda req, o: (302, [("Location", "//10.1.2.3/x")], b"")
    e = edge([o.url])
    r = httpx.get(f"{e.url}/pr")
    assert r.status_code == 302 and r.headers["location"] == f"{e.url}/x"


@pytest.mark.parametrize("text, key, problem", [
    ("internal_domains: ['a b']", "scrub.internal_domains[0]", "expected a domain name"),
    ("internal_domains: [10.0.0.1]", "scrub.internal_domains[0]", "expected a domain name"),
    ("internal_networks: [nope]", "scrub.internal_networks[0]", "not an IP address or CIDR"),
    ("error_bodies: drop", "scrub.error_bodies", "expected mask or pass"),
])
def test_scrub_config_errors_name_the_key(text, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(f"pools: {{a: {{origins: [http://127.0.0.1:1]}}}}\nscrub:\n  {text}\n", "edge.yaml")
    assert str(e.value).startswith(f"edge.yaml:3: {key}: ") and problem in str(e.value)


def test_scrub_config_defaults():
    cfg = parse_config("pools: {a: {origins: [http://127.0.0.1:1]}}\n"
                       "scrub: {internal_domains: [.Corp.Example.], internal_networks: [198.18.0.0/15]}\n")
    assert cfg.scrub.internal_domains == ("corp.example",) and str(cfg.scrub.internal_networks[0]) == "198.18.0.0/15"
    assert cfg.scrub.error_bodies == "mask"
    assert parse_config("pools: {a: {origins: [http://127.0.0.1:1]}}\n").scrub.error_bodies == "mask"


def test_streamed_responses_are_rewritten_before_their_head_leaves(scripted):
    """With stream_large_bodies the head is sent from `responseheaders`: the same rewrites."""
    body = b"x" * 4096
    e, _ = scripted({"/big": lambda o: answer("200 OK", [
        ("Content-Security-Policy", f"default-src 'self' http://127.0.0.1:{o.port}"),
        ("Location", "//10.1.2.3/x")], body)}, settings=["stream_large_bodies=1k"])
    r = httpx.get(f"{e.url}/big", headers=HOST)
    assert r.content == body
    assert r.headers["content-security-policy"] == "default-src 'self' http://shop.example"
    assert r.headers["location"] == "http://shop.example/x"



class H2TrailerOrigin:
    """A TLS origin speaking HTTP/2 (ALPN h2) that answers every stream with a body and
    trailers naming internal hosts, as a gRPC service's grpc-message does."""

    def __init__(self, context: ssl.SSLContext) -> None:
        context.set_alpn_protocols(["h2"])
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
            h2 = H2Connection(H2Configuration(client_side=False))
            h2.initiate_connection()
            conn.sendall(h2.data_to_send())
            while data := conn.recv(65536):
                for event in h2.receive_data(data):
                    if isinstance(event, h2_events.RequestReceived):
                        h2.send_headers(event.stream_id, [(":status", "200"), ("content-type", "text/plain")])
                        h2.send_data(event.stream_id, b"ok")
                        h2.send_headers(event.stream_id, [("grpc-status", "14"),
                                                          ("grpc-message", "connect to 10.0.0.5:50051 failed"),
                                                          ("x-trace", "shop")], end_stream=True)
                conn.sendall(h2.data_to_send())
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def stop(self) -> None:
        self.sock.close()


def test_http2_response_trailers_are_masked(edge, tls):
    """curl prints an HTTP/2 response's trailers after the body with -i."""
    origin = H2TrailerOrigin(tls.server_context())
    try:
        e = edge([origin.url], cert=str(tls.pem), settings=[f"ssl_verify_upstream_trusted_ca={tls.ca}"])
        out = subprocess.run(["curl", "-s", "-i", "--http2", "--max-time", "10", "--cacert", str(tls.ca),
                              f"https://127.0.0.1:{e.port}/x"], capture_output=True, check=True).stdout
    finally:
        origin.stop()
    assert out.startswith(b"HTTP/2 200") and b"\r\n\r\nok" in out
    assert b"grpc-status: 14" in out and b"x-trace: shop" in out        # the trailers arrived
    assert b"10.0.0.5" not in out and b"grpc-message" not in out
