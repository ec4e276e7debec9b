"""The edge as a proxy: TLS and HTTP/2, balancing, origin failure, failing closed, the trace."""

import json
import subprocess
import threading
from collections import Counter

import httpx
import pytest
from mitmproxy import http

from addons.failsafe import fail_closed
from tests.conftest import free_port


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """curl speaks HTTP/2 over TLS the way browsers do (ALPN h2 first)."""
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "10", *args], capture_output=True, check=True).stdout
    head, _, body = out.decode().partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers | {":version": status_line.split()[0]}, body


def test_tls_http2_and_http11(origin, edge, tls):
    o = origin("eu")
    e = edge([o.url], cert=str(tls.pem))
    base = f"https://127.0.0.1:{e.port}"
    status, headers, body = curl("--http2", "--cacert", str(tls.ca), "-H", "X-Forwarded-For: 6.6.6.6", f"{base}/echo")
    assert headers[":version"] == "HTTP/2" and status == 200
    assert headers["server"] == "edge" and "x-powered-by" not in headers
    seen = json.loads(body)["headers"]
    assert seen["host"] == f"127.0.0.1:{e.port}"                      # the client's authority
    assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-for"] == "127.0.0.1"
    status, headers, _ = curl("--http2", "--cacert", str(tls.ca), f"{base}/redirect")
    assert status == 302 and headers["location"] == f"{base}/"
    with httpx.Client(verify=tls.client_context()) as c:
        r = c.get(f"{base}/")
        assert r.http_version == "HTTP/1.1" and r.text == "hello from eu\n"
    assert httpx.get(f"{e.url}/").text == "hello from eu\n"          # plaintext on the same port


def test_https_origin_is_verified_and_masked(origin, edge, tls):
    o = origin("secure", tls=tls.server_context())
    e = edge([o.url], settings=[f"ssl_verify_upstream_trusted_ca={tls.ca}"])
    r = httpx.get(f"{e.url}/redirect", headers={"Host": "shop.example"})
    assert r.status_code == 302 and r.headers["location"] == "http://shop.example/"   # https origin URL moved
    assert o.seen[-1].headers["host"] == "shop.example"


def test_https_origin_with_an_untrusted_certificate_is_refused(origin, edge, tls):
    o = origin("impostor", tls=tls.server_context())
    e = edge([o.url])                             # the test CA is not trusted here
    r = httpx.get(f"{e.url}/")
    assert r.status_code == 502 and str(o.port) not in r.text
    assert o.seen == []


def test_no_upstream_connection_before_routing(origin, edge):
    """Lazy connections: the reverse-mode target (the first origin) is dead, yet the request
    routed elsewhere is served; an eager master would have dropped the client."""
    alive = origin("alive")
    e = edge(f"pools:\n  p:\n    origins:\n      - {{url: http://127.0.0.1:{free_port()}, weight: 1}}\n"
             f"      - {{url: {alive.url}, weight: 1000}}\n")
    r = httpx.get(f"{e.url}/")
    assert r.status_code == 200 and r.text == "hello from alive\n"


def test_weighted_pool_spreads_by_weight(origin, edge):
    a, b = origin("a"), origin("b")
    e = edge(f"pools:\n  p:\n    origins:\n      - {{url: {a.url}, weight: 3}}\n      - {{url: {b.url}, weight: 1}}\n")
    with httpx.Client() as c:
        names = [c.get(f"{e.url}/echo").json()["origin"] for _ in range(40)]
    assert Counter(names) == {"a": 30, "b": 10}
    assert names[:4].count("a") == 3                                   # smooth: no burst of b


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_unreachable_origin_answer_names_nothing(origin, edge, tls, version):
    o = origin("eu")
    e = edge([o.url], cert=str(tls.pem))
    url = f"https://127.0.0.1:{e.port}/"
    assert curl(version, "--cacert", str(tls.ca), url)[0] == 200   # recently heard from: no probe
    o.stop()
    status, headers, body = curl(version, "--cacert", str(tls.ca), url)
    assert status == 502 and "origin could not be reached" in body
    assert str(o.port) not in body and "Errno" not in body and "mitmproxy" not in body.lower()
    assert headers["server"] == "edge" and headers["edge-request-id"] in body
    status, _, body = curl(version, "--cacert", str(tls.ca), url)   # the refusal took the origin out:
    assert status == 503 and str(o.port) not in body                # the edge answers for it


class Explodes:
    """A security addon with a bug: its guarded hooks raise on some paths."""

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.path == "/boom-request":
            raise RuntimeError("bug in a request hook")

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.request.path == "/boom-response":
            flow.response.headers["X-Secret-Origin"] = "10.0.0.9"
            raise RuntimeError("bug in a response hook")


def test_hooks_fail_closed_and_the_proxy_keeps_serving(origin, edge, tmp_path, caplog):
    o = origin("eu")
    log = tmp_path / "access.log"
    e = edge([o.url], extra_addons=[Explodes()], access_log=str(log))
    with httpx.Client() as c:
        r = c.get(f"{e.url}/boom-request")
        assert r.status_code == 500 and "request id:" in r.text
        flow_id = r.text.split("request id: ")[1].strip()
        assert any(flow_id in rec.getMessage() and rec.exc_info for rec in caplog.records)   # logged with its id
        assert all(s.path != "/boom-request" for s in o.seen)          # never reached the origin
        r = c.get(f"{e.url}/boom-response")
        assert r.status_code == 502 and "x-secret-origin" not in r.headers
        assert "hello" not in r.text
        assert c.get(f"{e.url}/").status_code == 200                  # everyone else is served
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    failed = {rec["url"].rsplit("/", 1)[1]: rec["edge"].get("failed") for rec in lines}
    assert failed["boom-request"].startswith("Explodes.requestheaders")
    assert failed["boom-response"].startswith("Explodes.response")
    assert failed[""] is None


def test_access_log_line_carries_the_decisions(origin, edge, tmp_path):
    o = origin("eu")
    log = tmp_path / "access.log"
    e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\naccess_log: {log}\n")
    httpx.get(f"{e.url}/leaky?x=1", headers={"Host": "shop.example"})
    (rec,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert rec["client"] == "127.0.0.1" and rec["method"] == "GET" and rec["status"] == 200
    assert rec["url"] == "http://shop.example/leaky?x=1" and rec["bytes"] == len(b"look at the headers\n")
    assert rec["ms"] > 0 and rec["time"].endswith("+00:00")
    d = rec["edge"]
    assert d["pool"] == "eu" and d["origin"] == o.url
    assert {"X-Powered-By", "X-Backend-Server", "X-Debug", "Via"} <= set(d["scrubbed"])
    assert d["rewritten"] == ["Link"]
    assert not {"client", "public_url", "public_base"} & set(d)      # shown once, as the line's own fields


def test_mitmweb_shows_the_decisions(origin, edge):
    o = origin("eu")
    e = edge([o.url], web=True, web_port=free_port())
    assert httpx.get(f"{e.url}/leaky").status_code == 200
    token = e.master.web_url.split("token=")[1]
    web = e.master.web_url.split("?")[0].rstrip("/")
    flows = httpx.get(f"{web}/flows", headers={"Authorization": f"Bearer {token}"}).json()
    (flow,) = [f for f in flows if f["request"]["path"] == "/leaky"]
    lines = flow["comment"].split("\n")         # the verdict, then one decision per line (tests/test_console.py)
    assert lines[:3] == [f"miss → default {o.url}", "pool: default", f"origin: {o.url}/leaky"]
    assert "scrubbed: X-Powered-By, X-Backend-Server, X-Debug, Via" in lines


def test_mitmproxy_ca_crl_is_not_served(origin, edge):
    """mitmproxy answers /mitmproxy-<serial>.crl itself; an edge forwards every path."""
    o = origin("eu")
    e = edge([o.url])
    serial = e.master.addons.get("tlsconfig").certstore.default_ca.serial
    r = httpx.get(f"{e.url}/mitmproxy-{serial}.crl")
    assert r.status_code == 404 and r.text == "not found\n"          # the origin's answer
    assert o.seen[-1].path == f"/mitmproxy-{serial}.crl"


class ScriptedOrigin:
    """A raw TCP origin that answers every request head with fixed bytes."""

    def __init__(self, answer: bytes):
        import socketserver

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                self.request.sendall(answer)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_interim_responses_do_not_hang_the_client(edge, tls, version):
    o = ScriptedOrigin(b"HTTP/1.1 103 Early Hints\r\nLink: <http://10.0.0.5/a.css>; rel=preload\r\n\r\n"
                       b"HTTP/1.1 102 Processing\r\n\r\n"
                       b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: no-store\r\n\r\nhello")
    try:
        e = edge([o.url], cert=str(tls.pem))
        out = subprocess.run(["curl", "-s", "-i", "--max-time", "5", version, "--cacert", str(tls.ca),
                              f"https://127.0.0.1:{e.port}/"], capture_output=True).stdout.decode()
    finally:
        o.stop()
    assert out.endswith("hello") and " 200" in out and "10.0.0.5" not in out
    if version == "--http1.1":                  # RFC 9110 15.2: relayed, masked like any head
        assert out.startswith("HTTP/1.1 103 Early Hints\r\n")
        assert f"Link: <https://127.0.0.1:{e.port}/a.css>; rel=preload\r\n" in out
        assert "HTTP/1.1 102 Processing\r\n" in out
    else:
        assert "103" not in out
