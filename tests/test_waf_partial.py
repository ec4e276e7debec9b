"""The WAF reads a request body up to `shield.waf.body_limit` (ModSecurity's ProcessPartial):
a longer body is held only that far, judged on that prefix before the origin gets a byte, and
the rest streams. Through a real edge with the CRS, real clients (httpx, curl over HTTP/2, raw
sockets) and a recording origin."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading

import httpx
import pytest

from addons import internals
from addons.config import ConfigError, parse_config
from addons.shield.waf import close_multipart, multipart_boundary
from addons.stream import rules
from tests.rawnet import RecordingOrigin, exchange, status_of
from tests.test_h2_abuse import wait_for
from tests.test_protocol import dechunk
from tests.test_shield import needs_crs
from tests.test_streaming import log_lines

KiB, MiB = 2**10, 2**20
LIMIT = 128 * KiB                   # the default shield.waf.body_limit
READ = 64 * KiB                     # at most one read past the limit is held when the prefix is judged
BOUND = 4 * MiB                     # what the edge may hold while a 20 MB upload passes
SQLI = b"id=1%27%20OR%20%271%27%3D%271"
FORM = {"Host": "shop.example", "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)", "Accept": "*/*"}
PARTIAL = f"partial: first {LIMIT} bytes"        # what the trace's waf says of a prefix judged


# -- the decision rule --------------------------------------------------------------------------

@pytest.mark.parametrize("length, inspected, after", [
    (LIMIT, LIMIT, None),               # within the WAF's limit: held whole, judged whole
    (10, LIMIT, None), (0, LIMIT, None),
    (LIMIT + 1, LIMIT, LIMIT),          # longer: the limit is held and judged, then it streams
    (20 * MiB, LIMIT, LIMIT),           # (not from the head, as it would without a WAF)
    (None, LIMIT, LIMIT),               # unknown length (chunked, HTTP/2): the same
    (512 * KiB, 4 * MiB, None),         # a WAF limit above buffer_limit holds more
    (20 * MiB, None, 0), (None, None, MiB),     # no WAF reads it: the buffer limit decides
])
def test_request_rule_with_a_waf(length, inspected, after):
    assert rules.request_stream_after(length, MiB, inspected) == after


@pytest.mark.parametrize("content_type, boundary", [
    ("multipart/form-data; boundary=BB", b"BB"),
    ('Multipart/Form-Data; charset=utf-8; boundary="a b:c"', b"a b:c"),
    ("multipart/mixed;boundary=x-1;foo=bar", b"x-1"),
    ("application/x-www-form-urlencoded", None), ("multipart/form-data", None), (None, None),
])
def test_multipart_boundary(content_type, boundary):
    assert multipart_boundary(content_type) == boundary


PARTS = (b'--BB\r\nContent-Disposition: form-data; name="q"\r\n\r\nhello\r\n'
         b'--BB\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n' + b"z" * 100 + b"\r\n--BB--\r\n")


@pytest.mark.parametrize("limit, closed", [
    (len(PARTS) - 20, PARTS[:len(PARTS) - 20 - 10] + b"\r\n--BB--\r\n"),   # cut in the file: it ends there
    (90, b'--BB\r\nContent-Disposition: form-data; name="q"\r\n\r\nhello\r\n--BB--\r\n'),  # cut in a part's header
    (64, b'--BB\r\nContent-Disposition: form-data; name="q"\r\n\r\nhell\r\n--BB--\r\n'),  # cut in a value
    (40, None),                         # no part header is complete
    (5, None),
])
def test_close_multipart(limit, closed):
    out = close_multipart(PARTS, b"BB", limit)
    assert out == closed and (out is None or len(out) <= limit)


@needs_crs
def test_body_limit_config():
    base = "pools: {p: {origins: ['http://127.0.0.1:1']}}\nshield:\n  waf: "
    assert parse_config(base + "{}\n", "t.yaml").shield.waf.body_limit == LIMIT
    assert parse_config(base + "{body_limit: 1MB}\n", "t.yaml").shield.waf.body_limit == MiB
    for bad in ("0", "lots"):
        with pytest.raises(ConfigError, match=r"t.yaml:3: shield.waf.body_limit"):
            parse_config(base + f"{{body_limit: {bad}}}\n", "t.yaml")


# -- through the edge ---------------------------------------------------------------------------

class Prefixes:
    """An embedder's addon (after the shield) noting the size of each body prefix judged."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def request_prefix(self, flow) -> None:
        self.sizes.append(len(flow.metadata[internals.PREFIX]))


def waf_edge(edge, o, log, waf: str = "{}", max_body: str = "64MB", **kw):
    prefixes = Prefixes()
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\n"
             f"shield:\n  max_body: {max_body}\n  waf: {waf}\n", extra_addons=[prefixes], **kw)
    return e, prefixes


def pieces(data: bytes, size: int = 64 * KiB):
    for i in range(0, len(data), size):
        yield data[i:i + size]


BOUNDARY = b"edge-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY.decode()}"


def multipart(data: bytes) -> bytes:
    """A form upload of one file."""
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="backup.tar"\r\n'
            b"Content-Type: application/x-tar\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n")


def sent_body(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    return dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body


@needs_crs
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_attack_in_the_first_bytes_of_a_long_body_is_blocked_and_the_origin_gets_nothing(edge, tmp_path, framing):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, prefixes = waf_edge(edge, o, log)
        body = SQLI + b"&pad=" + b"x" * (2 * MiB)
        content = body if framing == "content-length" else pieces(body)
        r = httpx.post(f"{e.url}/form", content=content, headers=FORM, timeout=20)
        assert r.status_code == 403 and "request id" in r.text
        assert httpx.get(f"{e.url}/").text == "ok"                  # a normal client is served after it
        (request,) = o.wait_for_requests(1)
        assert request.startswith(b"GET / ") and o.received == request     # not a byte of the upload
        refused = log_lines(log, 2)[0]["edge"]
        assert refused["shield"] == "waf: request blocked (403)" and "942100" in refused["waf"]
        assert refused["waf"].endswith(PARTIAL) and "stream" not in refused
        assert len(prefixes.sizes) == 1 and LIMIT < prefixes.sizes[0] <= LIMIT + READ
    finally:
        o.stop()


@needs_crs
def test_form_fields_ahead_of_a_large_file_are_inspected(edge, tmp_path):
    """The prefix of a multipart upload is closed at the cut before the engine reads it: the
    fields before a large file are read (fed cut, the engine's parser would read no part)."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log)
        body = (b'--' + BOUNDARY + b'\r\nContent-Disposition: form-data; name="id"\r\n\r\n1\' OR \'1\'=\'1\r\n'
                + multipart(b"\x00" * 4 * MiB))
        r = httpx.post(f"{e.url}/upload", content=body, headers={**FORM, "Content-Type": MULTIPART}, timeout=20)
        assert r.status_code == 403 and o.received == b""
        assert "942100" in log_lines(log, 1)[0]["edge"]["waf"]
    finally:
        o.stop()


@needs_crs
def test_the_dropped_rest_of_a_refused_body_is_never_read_as_a_request(edge, tmp_path):
    """The rest of a body refused on its prefix is read by its framing and dropped: a request
    hidden in it never reaches the origin, and the next request on the connection is served."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log)
        hidden = b"GET /smuggled HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        body = SQLI + b"&pad=" + b"x" * 2 * LIMIT + hidden + b"x" * 1000
        head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in FORM.items())
        answer = exchange(e.host, e.port, b"POST /form HTTP/1.1\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body)
                          + body + b"GET /next HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 403 and answer.count(b"HTTP/1.1 ") == 2 and answer.endswith(b"\r\n\r\nok")
        (request,) = o.wait_for_requests(1)
        assert request.startswith(b"GET /next ") and o.received == request
    finally:
        o.stop()


@needs_crs
def test_a_clean_20mb_upload_streams_byte_identical_with_a_bounded_hold(edge, tmp_path):
    """A multipart file upload above the limit and within max_body reaches the origin as sent
    (its Content-Length framing kept), while the edge holds at most the prefix and buffers."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    held: list[int] = []
    done = threading.Event()
    try:
        e, prefixes = waf_edge(edge, o, log)
        body = multipart(hashlib.sha256(b"seed").digest() * (20 * MiB // 32))
        headers = {**FORM, "Content-Type": MULTIPART}

        def sample() -> None:
            while not done.wait(0.002):
                held.append(internals.bytes_held(e.master))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = httpx.post(f"{e.url}/upload", content=body, headers=headers, timeout=60)
        finally:
            done.set()
            sampler.join(5)
        assert r.status_code == 200 and r.text == "ok"
        (request,) = o.wait_for_requests(1)
        head, _, sent = request.partition(b"\r\n\r\n")
        assert b"content-length: %d" % len(body) in head.lower()
        assert hashlib.sha256(sent).hexdigest() == hashlib.sha256(body).hexdigest()
        assert held and max(held) < BOUND, max(held)
        assert len(prefixes.sizes) == 1 and LIMIT < prefixes.sizes[0] <= LIMIT + READ
        rec = log_lines(log, 1)[0]["edge"]
        assert rec["waf"] == f"score 0, rules -, {PARTIAL}" and rec["stream"] == "request"
    finally:
        o.stop()


@needs_crs
def test_an_attack_after_the_limit_passes(edge, tmp_path):
    """ProcessPartial as documented: what lies past body_limit is not read. The limit is the
    operator's trade (raise it to read further; the engine's time grows with it)."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log)
        body = b"pad=" + b"x" * LIMIT + b"&" + SQLI
        assert httpx.post(f"{e.url}/form", content=body, headers=FORM, timeout=20).status_code == 200
        (request,) = o.wait_for_requests(1)
        assert sent_body(request) == body
        rec = log_lines(log, 1)[0]["edge"]
        assert rec["waf"] == f"score 0, rules -, {PARTIAL}" and "shield" not in rec
    finally:
        o.stop()


@needs_crs
def test_a_body_within_the_limit_is_held_and_judged_whole(edge, tmp_path):
    """At most body_limit: today's path (held whole, one Content-Length framing, an attack at
    its very end refused); a raised limit reads further."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, prefixes = waf_edge(edge, o, log, waf="{body_limit: 4MB}")
        late = b"pad=" + b"x" * (2 * MiB) + b"&" + SQLI
        assert httpx.post(f"{e.url}/form", content=late, headers=FORM, timeout=20).status_code == 403
        clean = b"pad=" + b"x" * (2 * MiB)
        assert httpx.post(f"{e.url}/form", content=clean, headers=FORM, timeout=20).status_code == 200
        (request,) = o.wait_for_requests(1)
        assert b"content-length: %d" % len(clean) in request.lower() and request.endswith(clean)
        assert o.received == request and prefixes.sizes == []
        refused, passed = (line["edge"] for line in log_lines(log, 2))
        assert "942100" in refused["waf"] and "partial" not in refused["waf"]
        assert passed["waf"] == "score 0, rules -" and "stream" not in passed
    finally:
        o.stop()


@needs_crs
def test_json_cut_at_the_limit_is_not_a_parse_error_but_a_bad_prefix_is(edge, tmp_path):
    """The JSON parser fails on any body cut short: that failure is the edge's, not the
    client's (rule 200003 lets it pass). A syntax error inside the prefix is still refused,
    as is any malformed body within the limit (200002)."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log)
        json_headers = {**FORM, "Content-Type": "application/json"}
        post = lambda body: httpx.post(f"{e.url}/api", content=body, headers=json_headers, timeout=20).status_code
        clean = b'{"items": [' + b",".join([b'{"sku": "A-1", "qty": 2}'] * 20000) + b"]}"
        assert len(clean) > 2 * LIMIT and post(clean) == 200
        assert post(b'{"items": [' + b"}" + b" " * 2 * LIMIT) == 400       # broken in the prefix
        assert post(b'{"a": 1') == 400                                    # broken, within the limit
        assert post(b'{"q": "1 UNION SELECT password FROM users--", "pad": "' + b"x" * 2 * LIMIT + b'"}') == 403
        assert [sent_body(r) for r in o.wait_for_requests(1)] == [clean]
        rules_hit = [line["edge"]["waf"] for line in log_lines(log, 4)]
        assert "200003" in rules_hit[1] and "200002" in rules_hit[2]
    finally:
        o.stop()


def curl_h2_upload(e, tls, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """curl over HTTP/2 uploading from stdin: no content-length (an unknown length), the
    body in DATA frames as curl reads it."""
    out = subprocess.run(["curl", "-s", "--http2", "--cacert", str(tls.ca), "--max-time", "30", "-T", "-",
                          "-X", "POST", "-H", f"Content-Type: {content_type}", "-H", "Host: shop.example",
                          "-H", "Accept: */*", "-A", "Mozilla/5.0 (X11; Linux x86_64)",
                          "-w", "\n%{http_code} %{http_version}",
                          f"https://127.0.0.1:{e.port}{path}"],
                         input=body, capture_output=True, check=False, timeout=60).stdout
    answer, _, status = out.rpartition(b"\n")
    code, version = status.decode().split()
    assert version == "2", version
    return int(code), answer


@needs_crs
def test_http2_uploads_without_a_length(edge, tls, tmp_path):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, prefixes = waf_edge(edge, o, log, cert=str(tls.pem))
        attack = SQLI + b"&pad=" + b"x" * (2 * MiB)
        code, answer = curl_h2_upload(e, tls, "/form", attack, FORM["Content-Type"])
        assert code == 403 and b"request id" in answer and o.received == b""
        clean = multipart(bytes(range(256)) * (3 * MiB // 256))
        code, answer = curl_h2_upload(e, tls, "/upload", clean, MULTIPART)
        assert (code, answer) == (200, b"ok")
        (request,) = o.wait_for_requests(1)
        assert b"transfer-encoding: chunked" in request.lower() and sent_body(request) == clean
        assert len(prefixes.sizes) == 2 and all(LIMIT < n <= LIMIT + READ for n in prefixes.sizes)
        refused, passed = (line["edge"] for line in log_lines(log, 2))
        assert refused["shield"] == "waf: request blocked (403)" and refused["waf"].endswith(PARTIAL)
        assert passed["stream"] == "request" and passed["waf"].endswith(PARTIAL)
    finally:
        o.stop()


@needs_crs
def test_slow_uploaders_beside_a_normal_client(edge, tmp_path):
    """One uploader stalls inside the prefix (held: the origin has nothing of it), another
    after it (judged and streaming: the origin has the prefix); a normal client is served
    meanwhile, and both uploads complete byte for byte once they go on."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, prefixes = waf_edge(edge, o, log)
        body = multipart(bytes(range(256)) * (MiB // 256))
        head = (b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
                b"Accept: */*\r\nContent-Type: " + MULTIPART.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        uploads = [socket.create_connection((e.host, e.port), timeout=10) for _ in range(2)]
        inside, past = uploads
        inside.sendall(head + body[:LIMIT // 2])
        past.sendall(head + body[:2 * LIMIT])
        upload_data = lambda: [c.data for c in o.connections if c.data.startswith(b"POST")]
        assert wait_for(lambda: any(len(d) > LIMIT for d in upload_data()))
        assert httpx.get(f"{e.url}/", headers={"Host": "shop.example"}).text == "ok"
        assert len(upload_data()) == 1 and prefixes.sizes and len(prefixes.sizes) == 1
        for s, sent in ((inside, LIMIT // 2), (past, 2 * LIMIT)):
            s.sendall(body[sent:])
        for s in uploads:
            answer = b""
            while b"\r\n\r\nok" not in answer and (chunk := s.recv(65536)):
                answer += chunk
            assert status_of(answer) == 200
            s.close()
        assert [sent_body(r) for r in o.wait_for_requests(3) if r.startswith(b"POST")] == [body, body]
    finally:
        o.stop()


@needs_crs
def test_the_body_cap_counts_the_streamed_rest(edge, tmp_path):
    """Past the prefix the body streams, and max_body still bounds it: 413, the origin's
    connection cut (it got a part, never a whole request)."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log, max_body="1MB")
        r = httpx.post(f"{e.url}/upload", content=pieces(multipart(b"\xee" * 8 * MiB)),
                       headers={**FORM, "Content-Type": MULTIPART}, timeout=20)
        assert r.status_code == 413
        upload = lambda: [c for c in o.connections if c.data.startswith(b"POST")]
        assert wait_for(lambda: upload() and upload()[0].closed.is_set())
        (conn,) = upload()
        assert LIMIT < len(conn.data) < 2 * MiB and not conn.requests
        assert log_lines(log, 1)[0]["edge"]["shield"] == "size: request body too large (413)"
    finally:
        o.stop()


@needs_crs
def test_detect_mode_records_the_prefix_verdict_and_streams(edge, tmp_path):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log, waf="{mode: detect}")
        body = SQLI + b"&pad=" + b"x" * MiB
        assert httpx.post(f"{e.url}/form", content=body, headers=FORM, timeout=20).status_code == 200
        assert [sent_body(r) for r in o.wait_for_requests(1)] == [body]
        rec = log_lines(log, 1)[0]["edge"]
        assert rec["shield"] == "detect: waf: request blocked (403)" and rec["waf"].endswith(PARTIAL)
    finally:
        o.stop()


@needs_crs
@pytest.mark.parametrize("on_error, status", [("block", 500), ("pass", 200)])
def test_an_engine_failure_on_the_prefix_follows_on_error(edge, tmp_path, on_error, status):
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e, _ = waf_edge(edge, o, log, waf=f"{{on_error: {on_error}}}")

        def broken(*args):
            raise RuntimeError("engine exploded")
        e.master.addons.get("shield").waf.finish = broken         # fault injection into the engine
        body = b"pad=" + b"x" * MiB
        assert httpx.post(f"{e.url}/form", content=body, headers=FORM, timeout=20).status_code == status
        if status == 500:               # fail closed: not a byte reached the origin
            assert httpx.post(f"{e.url}/form", content=b"a=1", headers=FORM).status_code == 500    # still answering
            assert o.received == b""
        else:
            assert [sent_body(r) for r in o.wait_for_requests(1)] == [body]
            assert log_lines(log, 1)[0]["edge"]["waf"] == "engine error: passed"
    finally:
        o.stop()
