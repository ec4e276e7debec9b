"""What operators read: the access log's fields (HTTP/1, HTTP/2 over TLS, hits, refusals,
streams) in both formats, the X-Request-Id the origin gets, and /metrics as prometheus-client's
own parser reads it, checked against the requests made and against the Grafana dashboard."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.config import ConfigError, parse_config
from addons.scrub.request import request_id_fields
from addons.trace import combined_line
from tests.rawnet import RecordingOrigin, exchange, status_of

REPO = Path(__file__).resolve().parent.parent
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# An analyser's reading of the combined format (GoAccess/AWStats style), strict about every field,
# with the request id as one more quoted field.
COMBINED = re.compile(
    r'^(?P<client>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" "(?P<id>[^"]*)"$')
NO_STORE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: no-store\r\nContent-Type: text/plain\r\n\r\nhello"
CACHEABLE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=60\r\nContent-Type: text/plain\r\n\r\nhello"


def log_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    """The first n lines of the access log, once written (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"{path} has {len(lines)} lines, expected {n}")


def records(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in log_lines(path, n)]


def admin_url(e) -> str:
    host, port = e.master.addons.get("admin").bound
    return f"http://{host}:{port}"


def scrape(e) -> dict:
    """/metrics parsed by prometheus_client's parser: {(sample name, sorted labels): value},
    and the family names."""
    text = httpx.get(admin_url(e) + "/metrics").text
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return samples, families


def families_named(families, name: str) -> list:
    return [s for f in families if f.name == name for s in f.samples]


def test_http1_record_fields_and_the_request_id_the_origin_gets(edge, tmp_path):
    o = RecordingOrigin(NO_STORE)
    log = tmp_path / "access.log"
    e = edge([o.url], access_log=str(log))
    sent = (b"POST /form?x=1 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: probe/1.0\r\n"
            b"Referer: http://ref.example/page\r\nX-Request-Id: spoofed-by-client\r\n"
            b"Content-Length: 5\r\n\r\nabcde")
    got = exchange(e.host, e.port, sent, until_close=False)
    assert status_of(got) == 200 and got.endswith(b"hello")
    [line] = records(log, 1)
    assert line["protocol"] == "HTTP/1.1" and line["tls"] is None
    assert line["user_agent"] == "probe/1.0" and line["referer"] == "http://ref.example/page"
    assert line["upstream_addr"] == f"127.0.0.1:{o.port}" and line["upstream_status"] == 200
    assert 0 <= line["upstream_ms"] <= line["ms"]
    assert line["bytes_in"] == len(sent)                    # head and body as received, byte for byte
    assert line["bytes_out"] == len(got) and line["bytes"] == 5
    assert "request_id" not in line                         # nobody trusted sent one
    [request] = o.wait_for_requests(1)
    assert request.count(b"X-Request-Id") == 1 and b"spoofed" not in request     # the client's is replaced
    assert f"\r\nX-Request-Id: {line['id']}\r\n".encode() in request            # by the edge's own id
    assert UUID.fullmatch(line["id"])


def test_each_request_gets_its_own_id_and_edge_pages_show_it(edge, tmp_path):
    o = RecordingOrigin(NO_STORE)
    log = tmp_path / "access.log"
    e = edge([o.url], access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        assert c.get("/a").status_code == c.get("/b").status_code == 200
    ids = [r["id"] for r in records(log, 2)]
    seen = [re.search(rb"X-Request-Id: (\S+)\r\n", r)[1].decode() for r in o.wait_for_requests(2)]
    assert seen == ids and ids[0] != ids[1]


def test_a_trusted_proxys_request_id_is_kept_a_malformed_one_replaced(edge, tmp_path):
    o = RecordingOrigin(NO_STORE)
    log = tmp_path / "access.log"
    e = edge(f"trusted_proxies: [127.0.0.1/32]\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        c.get("/kept", headers={"X-Request-Id": "front-7f3a"})
        c.get("/bad", headers={"X-Request-Id": 'has "quote"'})
        c.get("/two", headers=[("X-Request-Id", "a"), ("X-Request-Id", "b")])
    kept, bad, two = records(log, 3)
    first, second, third = o.wait_for_requests(3)
    assert b"\r\nX-Request-Id: front-7f3a\r\n" in first and first.count(b"X-Request-Id") == 1
    assert kept["request_id"] == "front-7f3a" and UUID.fullmatch(kept["id"])
    assert f"\r\nX-Request-Id: {bad['id']}\r\n".encode() in second and b"quote" not in second
    assert f"\r\nX-Request-Id: {two['id']}\r\n".encode() in third and third.count(b"X-Request-Id") == 1
    assert "request_id" not in bad and "request_id" not in two


def test_request_id_fields_rules():
    fields = ((b"Host", b"a"), (b"x-request-id", b"r-1"))
    assert request_id_fields(fields, "E", trusted_peer=True) == (fields, "r-1")
    assert request_id_fields(fields, "E", trusted_peer=False) == (((b"Host", b"a"), (b"X-Request-Id", b"E")), None)
    assert request_id_fields(((b"Host", b"a"),), "E", True) == (((b"Host", b"a"), (b"X-Request-Id", b"E")), None)
    long = ((b"X-Request-Id", b"x" * 201),)
    assert request_id_fields(long, "E", True) == (((b"X-Request-Id", b"E"),), None)


def h2_get(host: str, port: int, context: ssl.SSLContext, path: str, fields: list) -> tuple[ssl.SSLSocket, int]:
    """One HTTP/2 GET over TLS; the connection is left open (closed by the caller)."""
    context.set_alpn_protocols(["h2"])
    s = context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname="localhost")
    assert s.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
                          (":path", path), *fields], end_stream=True)
    s.sendall(conn.data_to_send())
    status = None
    while True:
        for event in conn.receive_data(s.recv(65536)):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.StreamEnded):
                s.sendall(conn.data_to_send())
                return s, status
        s.sendall(conn.data_to_send())


def test_http2_over_tls_record_and_the_connection_gauge(edge, tmp_path, tls):
    o = RecordingOrigin(NO_STORE)
    log = tmp_path / "access.log"
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log), cert=str(tls.pem))
    s, status = h2_get(e.host, e.port, tls.client_context(), "/h2",
                       [("referer", "https://ref.example/"), ("user-agent", "h2c/2")])
    with s:
        assert status == 200
        samples, _ = scrape(e)                                  # the client's connection is still open
        assert samples[("edge_client_connections", (("protocol", "http2"),))] == 1
        assert samples[("edge_client_connections", (("protocol", "http1"),))] == 0
    [line] = records(log, 1)
    assert line["protocol"] == "HTTP/2.0" and line["tls"] in ("TLSv1.3", "TLSv1.2")
    assert line["user_agent"] == "h2c/2" and line["referer"] == "https://ref.example/"
    assert line["upstream_addr"] == f"127.0.0.1:{o.port}" and line["upstream_status"] == 200
    # an HTTP/2 head is counted as its HTTP/1 text: the request line and every field received
    assert line["bytes_in"] == len(b"GET /h2 HTTP/2.0\r\nreferer: https://ref.example/\r\nuser-agent: h2c/2\r\n\r\n")
    assert line["bytes_out"] > line["bytes"] == 5
    deadline = time.monotonic() + 5
    while scrape(e)[0][("edge_client_connections", (("protocol", "http2"),))] != 0:   # closed: not counted
        assert time.monotonic() < deadline
        time.sleep(0.02)
    httpx.get(e.url.replace("http://", "https://") + "/one", verify=tls.client_context())     # HTTP/1.1 over TLS
    second = records(log, 2)[1]
    assert second["protocol"] == "HTTP/1.1" and second["tls"] == line["tls"]


def test_a_hit_and_an_edge_refusal_have_no_upstream(edge, tmp_path):
    o = RecordingOrigin(CACHEABLE)
    log = tmp_path / "access.log"
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield: {{bots: {{block: [scanner]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        assert c.get("/page").status_code == c.get("/page").status_code == 200
        refused = c.get("/page", headers={"User-Agent": "sqlmap/1.7"})
    assert refused.status_code == 403
    miss, hit, refusal = records(log, 3)
    assert miss["upstream_status"] == 200 and miss["upstream_addr"] == f"127.0.0.1:{o.port}"
    assert hit["edge"]["cache"].startswith("hit")
    for line in (hit, refusal):
        assert line["upstream_addr"] is line["upstream_status"] is line["upstream_ms"] is None
        assert line["bytes_out"] > 0 and line["bytes_in"] > 0
    assert refusal["status"] == 403 and refusal["id"] == refused.headers["edge-request-id"]
    assert len(o.wait_for_requests(1)) == 1                 # only the miss reached the origin


def test_a_streamed_response_logs_what_was_relayed(edge, tmp_path):
    piece = b"x" * 4096

    def chunked(_request):
        yield b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
        for _ in range(10):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    o = RecordingOrigin(chunked)
    log = tmp_path / "access.log"
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        r = c.get("/stream", headers={"Accept-Encoding": "identity"})
    assert r.content == piece * 10
    [line] = records(log, 1)
    assert "response" in line["edge"]["stream"] and line["bytes"] == len(piece) * 10
    assert line["upstream_status"] == 200
    head = len(b"HTTP/1.1 200 OK\r\n") + sum(len(k) + len(v) + 4 for k, v in r.headers.raw) + 2
    assert line["bytes_out"] == head + len(piece) * 10         # the head sent and the body bytes relayed
    samples, _ = scrape(e)
    assert samples[("edge_streamed_responses_total", (("site", "default"),))] == 1
    assert samples[("edge_sent_bytes_total", (("site", "default"),))] == line["bytes_out"]


def test_the_combined_format_reads_as_analysers_expect(edge, tmp_path):
    o = RecordingOrigin(NO_STORE)
    log = tmp_path / "access.log"
    e = edge(f"access_log_format: combined\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        c.get("/a?b=1", headers={"User-Agent": "Mozilla/5.0 (X11)", "Referer": "http://r.example/"})
        c.get("/evil", headers={"User-Agent": 'evil" 200 1 "x\\', "Referer": ""})
    bad = exchange(e.host, e.port, b"NOT HTTP\r\n\r\n")          # the edge's 400, no flow: no request line
    assert status_of(bad) == 400
    lines = log_lines(log, 3)
    parsed = [COMBINED.match(line) for line in lines]
    assert all(parsed), lines
    first, evil, refused = (m.groupdict() for m in parsed)
    assert first["client"] == "127.0.0.1" and first["request"] == "GET /a?b=1 HTTP/1.1"
    assert first["status"] == "200" and first["bytes"] == "5" and first["time"].endswith("+0000")
    assert first["referer"] == "http://r.example/" and first["agent"] == "Mozilla/5.0 (X11)"
    assert UUID.fullmatch(first["id"])
    assert evil["agent"] == 'evil\\" 200 1 \\"x\\\\' and evil["referer"] == "-"     # escaped: one field
    assert refused["status"] == "400" and refused["request"] == "-" and UUID.fullmatch(refused["id"])
    assert refused["id"].encode() in bad


def test_combined_line_without_an_answer_and_with_bytes_outside_ascii():
    line = combined_line({"time": "2026-03-05T07:08:09.123+00:00", "client": "::1", "method": "GET",
                          "url": "http://h/caf\u00e9", "protocol": "HTTP/2.0", "status": None, "bytes": 0,
                          "user_agent": "ü", "id": "abc"})
    assert line == '::1 - - [05/Mar/2026:07:08:09 +0000] "GET /caf\\xC3\\xA9 HTTP/2.0" 444 0 "-" "\\xC3\\xBC" "abc"'
    assert COMBINED.match(line)


def test_access_log_format_is_checked():
    with pytest.raises(ConfigError) as err:
        parse_config("pools: {p: {origins: [http://127.0.0.1:1]}}\naccess_log_format: clf\n", "e.yaml")
    assert str(err.value).startswith("e.yaml:2: access_log_format:") and "json, combined" in str(err.value)
    assert parse_config("pools: {p: {origins: [http://127.0.0.1:1]}}\n").access_log_format == "json"


def test_metrics_parse_and_agree_with_the_requests_made(edge, tmp_path):
    o = RecordingOrigin(lambda req: CACHEABLE if b" /cached " in req else NO_STORE)
    log = tmp_path / "access.log"
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        statuses = [c.get(path).status_code for path in ("/cached", "/cached", "/one", "/two")]
    assert statuses == [200] * 4
    lines = records(log, 4)
    samples, families = scrape(e)
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))
    assert samples[key("edge_request_duration_seconds_count", site="default", pool="p", status="2xx")] == 3
    assert samples[key("edge_request_duration_seconds_count", site="default", pool="none", status="2xx")] == 1
    assert samples[key("edge_upstream_ttfb_seconds_count", pool="p", status="2xx")] == 3    # the hit: none
    assert samples[key("edge_requests_total", status="2xx", cache="hit")] == 1
    assert samples[key("edge_received_bytes_total", site="default")] == sum(r["bytes_in"] for r in lines)
    assert samples[key("edge_sent_bytes_total", site="default")] == sum(r["bytes_out"] for r in lines)
    assert samples[key("edge_origin_available", pool="p", origin=o.url)] == 1
    assert samples[key("edge_cache_bytes")] > 0
    misses = [r["ms"] / 1000 for r in lines if r["edge"].get("pool") == "p"]
    for family in families:                     # every histogram: cumulative buckets ending in +Inf == count
        if family.type != "histogram":
            continue
        series: dict = {}
        for s in family.samples:
            series.setdefault(tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")), []).append(s)
        for labelled in series.values():
            buckets = [s for s in labelled if s.name.endswith("_bucket")]
            count = next(s.value for s in labelled if s.name.endswith("_count"))
            values = [s.value for s in buckets]
            assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf" and values[-1] == count > 0
    for s in families_named(families, "edge_request_duration_seconds"):     # each bucket holds exactly
        if s.name.endswith("_bucket") and s.labels["pool"] == "p":             # the requests at most its bound
            assert s.value == sum(1 for m in misses if m <= float(s.labels["le"])), s
    assert not any(f.name.endswith("_created") for f in families)
    assert not any("url" in s.labels or "client" in s.labels for f in families for s in f.samples)


def test_each_edge_has_its_own_registry(edge):
    """Series of one edge never show in another's (tests run several in one process)."""
    from addons.metrics import EdgeMetrics
    o = RecordingOrigin(NO_STORE)
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n")
    httpx.get(e.url + "/x")
    chain = e.master.addons.get("edge")
    other = EdgeMetrics(chain._held)
    series = ("edge_request_duration_seconds_count", (("pool", "p"), ("site", "default"), ("status", "2xx")))
    assert scrape(e)[0][series] == 1
    assert series not in {(s.name, tuple(sorted(s.labels.items())))
                          for f in text_string_to_metric_families(other.exposition()) for s in f.samples}


def test_the_grafana_dashboard_uses_only_names_the_edge_exposes(edge):
    o = RecordingOrigin(NO_STORE)
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n")
    _, families = scrape(e)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exposed = {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}
    dashboard = json.loads((REPO / "data" / "grafana-edge.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in exprs for name in re.findall(r"\bedge_[a-z_]+\b", expr)}
    assert len(exprs) >= 12 and used and used <= exposed, used - exposed
    assert {"edge_request_duration_seconds_bucket", "edge_upstream_ttfb_seconds_bucket", "edge_requests_total",
            "edge_shield_refusals_total", "edge_origin_available", "edge_received_bytes_total"} <= used


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_streamed_upload_counts_every_body_byte_received(edge, tmp_path, framing):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    e = edge(f"buffer_limit: 16KB\npools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    body = bytes(range(256)) * 400                          # 100 KiB: past buffer_limit, so it streams
    if framing == "chunked":
        head = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5000]), body[i:i + 5000])
                          for i in range(0, len(body), 5000)) + b"0\r\n\r\n"
    else:
        head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
        framed = body
    got = exchange(e.host, e.port, head + framed, until_close=False)
    assert status_of(got) == 200
    [line] = records(log, 1)
    assert line["edge"]["stream"] == "request"
    assert line["bytes_in"] == len(head) + len(body)        # the head as sent, the body's bytes (not its chunk framing)
    assert len(o.wait_for_requests(1)) == 1                 # and the origin got the whole request


def test_label_values_stay_bounded_whatever_clients_send(edge, tmp_path):
    """Hostile variety (hosts, paths, methods, ids, agents) adds no series: labels are status
    classes, configured names and cache verdicts, never what a client wrote."""
    o = RecordingOrigin(NO_STORE)
    e = edge(f"admin: 127.0.0.1:0\npools: {{p: {{origins: [{o.url}]}}}}\n")
    with httpx.Client(base_url=e.url) as c:
        c.get("/warm")
        before = set(scrape(e)[0])
        for i in range(40):
            c.request("GET" if i % 2 else "DELETE", f"/p{i}?q={i}",
                      headers={"Host": f"h{i}.example", "X-Request-Id": f"id{i}", "User-Agent": f"ua{i}"})
    after = set(scrape(e)[0])
    grown = {name for name, labels in after - before}
    assert grown <= {"edge_requests_total"}, grown        # DELETE: cache verdict "method", once
    assert len(after) - len(before) <= 1


def test_a_revalidation_logs_the_origins_304_beside_the_clients_200(edge, tmp_path):
    def script(request: bytes) -> bytes:
        if b"if-none-match:" in request.lower():
            return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=0\r\n\r\n'
        return b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nCache-Control: max-age=0\r\nContent-Length: 5\r\n\r\nhello'

    o = RecordingOrigin(script)
    log = tmp_path / "access.log"
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\n", access_log=str(log))
    with httpx.Client(base_url=e.url) as c:
        first, second = c.get("/r"), c.get("/r")
    assert first.text == second.text == "hello" and second.status_code == 200
    assert b"if-none-match" in o.wait_for_requests(2)[1].lower()
    fetched, revalidated = records(log, 2)
    assert fetched["upstream_status"] == 200
    assert revalidated["status"] == 200 and revalidated["upstream_status"] == 304     # what the origin said
