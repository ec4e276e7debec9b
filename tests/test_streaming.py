"""Streaming: bodies of unknown length or above buffer_limit are relayed as they arrive, with
memory bounded by backpressure, and what must keep working on a streamed body (masking of
the head, Cache-Status, the access log's bytes, the request body cap); WebSocket flows keep
no message history."""

from __future__ import annotations

import json
import queue
import zlib
import socket
import subprocess
import threading
import time

import brotli
import h2.events
import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as wsevents

from addons import internals
from addons.compress.negotiate import zstd
from addons.config import ConfigError, parse_config
from addons.stream import rules
from tests.conftest import free_port
from tests.test_h2_abuse import RawH2
from tests.test_protocol import dechunk
from tests.test_shield import needs_crs
from tests.rawnet import RecordingOrigin, status_of

MiB = 2**20


# -- the decision rule --------------------------------------------------------------------------

@pytest.mark.parametrize("length, content_type, streamed", [
    (None, "text/html", True),                      # chunked or read until close: unknown
    (2 * MiB, "application/octet-stream", True),    # above the limit
    (MiB, "text/html", False),                      # at the limit: held whole
    (10, "text/event-stream; charset=utf-8", True), # a live stream, whatever its framing says
    (10, "Text/Event-Stream", True),
    (0, "text/event-stream", False),                # no body (HEAD, 204, 304)
    (0, None, False),
])
def test_response_rule(length, content_type, streamed):
    assert rules.stream_response(length, content_type, MiB) is streamed


@pytest.mark.parametrize("length, inspected, after", [
    (2 * MiB, None, 0),                             # known and above the limit: from the head
    (None, None, MiB),                              # unknown: held up to the limit, then streamed
    (MiB, None, None), (0, None, None),
    (None, 4 * MiB, 4 * MiB), (2 * MiB, 4 * MiB, None),    # a WAF reads the body: up to its limit
])
def test_request_rule(length, inspected, after):
    assert rules.request_stream_after(length, MiB, inspected) == after


def test_websocket_history_rule():
    assert rules.messages_to_drop([5], web=False) == 1
    assert rules.messages_to_drop([5] * rules.WEB_MESSAGES, web=True) == 0
    assert rules.messages_to_drop([5] * (rules.WEB_MESSAGES + 1), web=True) == 1
    big = rules.WEB_BYTES // 2
    assert rules.messages_to_drop([big, big, big], web=True) == 1          # a byte budget too
    assert rules.messages_to_drop([1, 3 * rules.WEB_BYTES], web=True) == 1  # the newest stays


# -- helpers -------------------------------------------------------------------------------------

def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_until(sock: socket.socket, buf: bytearray, needle: bytes) -> None:
    """Read until `needle` is in `buf` (the socket's timeout bounds the wait)."""
    while needle not in buf:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"closed before {needle!r}; got {bytes(buf[-200:])!r}")
        buf += data


def serve_each(sock: socket.socket, serve) -> None:
    """Accept connections until `sock` closes, each served by `serve(conn)` in its thread
    (the edge's connect probe comes first, then the connection that carries the request)."""
    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


def log_lines(path, n: int, timeout: float = 5.0) -> list[dict]:
    """The access log once it has `n` lines (the `response` hook of a streamed body fires
    after its last byte went out, so the line may follow the client's read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"access log has fewer than {n} lines")


def trickling(release: queue.Queue, parts: list[bytes], head: bytes):
    """An origin answer sending its head, then each chunk when the test releases it."""
    def answer(_request: bytes):
        yield head
        for part in parts:
            release.get(timeout=10)
            yield chunk(part)
        yield b"0\r\n\r\n"
    return answer


# -- responses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/event-stream", "text/plain"])
def test_trickled_chunks_reach_the_client_one_by_one(edge, content_type):
    """Each chunk is read by the client before the origin sends the next: were the body held
    until its end, the first read would wait for a chunk the origin never sends."""
    release: queue.Queue = queue.Queue()
    parts = [b"data: event %d\n\n" % i for i in range(5)]
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode() +
            b"\r\nTransfer-Encoding: chunked\r\nCache-Control: no-store\r\nServer: gunicorn\r\n"
            b"X-Powered-By: Express\r\n\r\n")
    o = RecordingOrigin(trickling(release, parts, head))
    try:
        e = edge([o.url])
        with socket.create_connection((e.host, e.port), timeout=5) as s:
            s.sendall(b"GET /events HTTP/1.1\r\nHost: site.example\r\n\r\n")
            buf = bytearray()
            read_until(s, buf, b"\r\n\r\n")
            head_seen = bytes(buf[:buf.index(b"\r\n\r\n")]).lower()
            for part in parts:
                release.put(True)
                read_until(s, buf, part)
            release.put(True)
            read_until(s, buf, b"\r\n0\r\n\r\n")
        assert status_of(bytes(buf)) == 200
        assert b"server: edge" in head_seen and b"gunicorn" not in head_seen and b"x-powered-by" not in head_seen
        assert b"cache-status: edge" in head_seen
    finally:
        o.stop()


def test_streamed_response_keeps_the_log_bytes_and_cache_status_and_is_not_stored(edge, tmp_path):
    """A cacheable response above the cache's max_object (8 MB) streams: Cache-Status leaves
    with its head, it is not stored (too large), the access log counts what was relayed."""
    body = bytes(range(256)) * (9 * MiB // 256 + 7)
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nCache-Control: max-age=60\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body)) + body
    o = RecordingOrigin(answer)
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\n")
        with httpx.Client() as c:
            first, second = (c.get(f"{e.url}/big.bin") for _ in range(2))
        assert first.content == body and second.content == body
        assert first.headers["cache-status"] == 'edge; fwd=uri-miss; fwd-status=200; detail="not stored: too-large"'
        assert "hit" not in second.headers["cache-status"]
        assert len(o.requests) == 2
        records = log_lines(log, 2)
        assert [r["bytes"] for r in records] == [len(body)] * 2
        assert all(r["edge"]["stream"] == "response" for r in records)
    finally:
        o.stop()


def test_cacheable_streamed_body_is_stored_while_it_passes(edge):
    """Above buffer_limit but one the cache stores (within max_object): streamed, and stored
    as it passes, so the next request is a hit."""
    body = b"c" * (2 * MiB)
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Cache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    try:
        e = edge([o.url])
        with httpx.Client() as c:
            first, second = (c.get(f"{e.url}/bundle.js.map") for _ in range(2))
        assert first.content == second.content == body
        assert first.headers["cache-status"] == 'edge; fwd=uri-miss; fwd-status=200; detail="storing while streamed"'
        assert second.headers["cache-status"].startswith("edge; hit") and len(o.requests) == 1
    finally:
        o.stop()


def test_chunked_response_bytes_are_counted(edge, tmp_path):
    parts = [b"x" * 1000, b"y" * 2345, b"z"]
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(chunk(p) for p in parts) + b"0\r\n\r\n")
    o = RecordingOrigin(answer)
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\n")
        assert httpx.get(f"{e.url}/c").content == b"".join(parts)
        (record,) = log_lines(log, 1)
        assert record["bytes"] == 3346 and record["edge"]["stream"] == "response"
    finally:
        o.stop()


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_trickled_events_are_compressed_and_still_arrive_one_by_one(edge, coding):
    """The coder flushes each chunk: a client asking for gzip/br decodes every event before
    the origin sends the next."""
    release: queue.Queue = queue.Queue()
    parts = [b"data: event %d\n\n" % i for i in range(5)]
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Cache-Control: no-store\r\n\r\n")
    o = RecordingOrigin(trickling(release, parts, head))
    try:
        e = edge([o.url])
        with httpx.Client(timeout=5) as c, c.stream("GET", f"{e.url}/events",
                                                    headers={"Accept-Encoding": coding}) as r:
            assert r.headers["content-encoding"] == coding and r.headers["vary"] == "Accept-Encoding"
            pieces = r.iter_bytes()
            got = b""
            for part in parts:
                release.put(True)
                while part not in got:
                    got += next(pieces)
            release.put(True)
            got += b"".join(pieces)
        assert got == b"".join(parts)
        # the origin is asked for its representation: the edge makes the coding (one fetch for all)
        assert o.requests[0].lower().count(b"accept-encoding: identity") == 1
    finally:
        o.stop()


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "identity"])
def test_large_text_is_compressed_as_it_streams(edge, tmp_path, coding):
    body = b"".join(b"line %d of a large text file\n" % i for i in range(120_000))      # 3.4 MB
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nETag: \"v1\"\r\nCache-Control: no-store\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\n")
        with socket.create_connection((e.host, e.port), timeout=10) as s:
            s.sendall(b"GET /big.txt HTTP/1.1\r\nHost: site.example\r\nAccept-Encoding: %s\r\n"
                      b"Connection: close\r\n\r\n" % coding.encode())
            raw = b""
            while data := s.recv(65536):
                raw += data
        head, _, framed = raw.partition(b"\r\n\r\n")
        head = head.lower()
        (record,) = log_lines(log, 1)
        if coding == "identity":
            assert framed == body and b"content-encoding" not in head and b'etag: "v1"' in head
            assert record["bytes"] == len(body)
            return
        assert b"content-encoding: " + coding.encode() in head and b"content-length" not in head
        assert b"transfer-encoding: chunked" in head and b'etag: w/"v1"' in head and b"vary: accept-encoding" in head
        encoded = dechunk(framed)
        assert decode(encoded, coding) == body and len(encoded) < len(body) // 4
        assert record["bytes"] == len(encoded) and record["edge"]["compress"] == f"{coding} streamed"
    finally:
        o.stop()


def test_streamed_compressed_response_to_an_http2_client(edge, tls, tmp_path):
    """Over HTTP/2 the chunked framing field is dropped (HTTP/2 frames the body itself)."""
    body = b"".join(b"row %d of an export\n" % i for i in range(200_000))
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + chunk(body) + b"0\r\n\r\n")
    try:
        e = edge([o.url], cert=str(tls.pem))
        out = tmp_path / "export.csv.gz"
        head = subprocess.run(["curl", "-s", "--http2", "--cacert", str(tls.ca), "--max-time", "20", "-D", "-",
                               "-H", "Accept-Encoding: gzip", "-o", str(out), f"https://127.0.0.1:{e.port}/export.csv"],
                              capture_output=True, check=True, timeout=30).stdout.decode().lower()
        assert head.startswith("http/2 200") and "content-encoding: gzip" in head
        assert "transfer-encoding" not in head and zlib.decompress(out.read_bytes(), 47) == body
    finally:
        o.stop()


def decode(data: bytes, coding: str) -> bytes:
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstd.decompress(data)
    return zlib.decompress(data, 47)


def test_range_of_a_large_object_streams_the_origins_206(edge):
    """A Range request passes to the origin (nothing is stored yet); its 206 streams whole."""
    part = bytes(range(256)) * 8192                 # 2 MiB of a larger file
    o = RecordingOrigin(b"HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Range: bytes 0-%d/104857600\r\nContent-Length: %d\r\n"
                        b"Cache-Control: max-age=60\r\n\r\n" % (len(part) - 1, len(part)) + part)
    try:
        e = edge([o.url])
        r = httpx.get(f"{e.url}/video.mp4", headers={"Range": "bytes=0-2097151"})
        assert r.status_code == 206 and r.content == part
        assert r.headers["content-range"] == "bytes 0-2097151/104857600"
        assert b"range: bytes=0-2097151" in o.requests[0].lower()
    finally:
        o.stop()


def test_small_known_length_bodies_keep_the_buffered_path(edge, tmp_path):
    """Below buffer_limit: held whole, so the cache stores it and the next request is a hit."""
    body = b"a" * 100_000
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Cache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\nbuffer_limit: 512KB\n")
        with httpx.Client() as c:
            first, second = (c.get(f"{e.url}/small.bin") for _ in range(2))
        assert first.content == second.content == body
        assert second.headers["cache-status"].startswith("edge; hit")
        assert len(o.requests) == 1
        assert "stream" not in log_lines(log, 2)[0]["edge"]
    finally:
        o.stop()


@pytest.mark.parametrize("limit, streamed", [("512KB", True), ("1MB", False)])
def test_buffer_limit_decides(edge, tmp_path, limit, streamed):
    body = b"b" * 600_000
    o = RecordingOrigin(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Cache-Control: no-store\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\nbuffer_limit: {limit}\n")
        assert httpx.get(f"{e.url}/x").content == body
        assert ("stream" in log_lines(log, 1)[0]["edge"]) is streamed
    finally:
        o.stop()


# -- backpressure --------------------------------------------------------------------------------

BOUND = MiB         # what the edge may hold for one streamed exchange: a few 64 KiB buffers


def endless_body(size: int, piece: int = 65536):
    """A Content-Length answer of `size` bytes, sent as fast as the edge takes it."""
    def answer(_request: bytes):
        yield (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"\xab" * piece
        for _ in range(size // piece):
            yield block
    return answer


def test_slow_reader_pauses_the_origin_read(edge):
    """A client reading 16 KiB at a time: whenever it reads, the edge holds at most BOUND bytes
    of the 24 MiB body (held whole, it would be 24 MiB before the first byte reached the client)."""
    size = 24 * MiB
    o = RecordingOrigin(endless_body(size))
    try:
        e = edge([o.url])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.settimeout(10)
            s.connect((e.host, e.port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: site.example\r\n\r\n")
            got, most = 0, 0
            while got < size:
                data = s.recv(16384)
                assert data, "closed early"
                got += len(data)
                most = max(most, internals.bytes_held(e.master))
        assert most < BOUND, most
        assert got >= size
    finally:
        o.stop()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_streamed_upload_to_a_slow_origin_is_bounded(edge, framing):
    """A 24 MiB upload to an origin that reads 16 KiB at a time: whenever it reads, the edge
    holds at most BOUND (held whole, the body would be in the edge before the origin got any)."""
    size, piece = 24 * MiB, 65536
    samples: list[int] = []
    master_box: dict = {}

    class SlowOrigin:
        def __init__(self) -> None:
            self.sock = socket.create_server(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
            self.received = 0
            serve_each(self.sock, self.serve)

        def serve(self, conn: socket.socket) -> None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            with conn:
                head, tail, total = b"", b"", None
                while not (tail.endswith(b"\r\n0\r\n\r\n") or (total is not None and self.received >= total)):
                    data = conn.recv(16384)
                    if not data:
                        return
                    self.received += len(data)
                    tail = (tail + data)[-16:]
                    if total is None and b"\r\n\r\n" not in head:
                        head += data
                        if b"\r\n\r\n" in head and b"content-length" in head.lower():
                            total = head.index(b"\r\n\r\n") + 4 + size
                    if "master" in master_box:
                        samples.append(internals.bytes_held(master_box["master"]))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    o = SlowOrigin()
    e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\nshield:\n  max_body: 64MB\n")
    master_box["master"] = e.master

    def body():
        block = b"\xcd" * piece
        for _ in range(size // piece):
            yield block

    content = body() if framing == "chunked" else b"".join(body())
    r = httpx.post(f"{e.url}/upload", content=content, timeout=30)
    o.sock.close()
    assert r.status_code == 200 and r.text == "ok"
    assert o.received > size and samples
    assert max(samples) < BOUND, max(samples)


def test_http2_stream_with_a_shut_window_pauses_the_origin_read(edge, tls):
    """An HTTP/2 client that lets a stream's window run out (h2's 64 KiB) and reads nothing
    more: the edge holds at most BOUND (else the origin's whole body piled up in its HTTP/2
    send buffers); once the client opens the window, the whole body arrives."""
    size = 24 * MiB
    sent = [0]

    def answer(request: bytes):
        for piece in endless_body(size)(request):
            sent[0] += len(piece)
            yield piece

    o = RecordingOrigin(answer)
    try:
        e = edge([o.url], cert=str(tls.pem))
        client = RawH2(e, tls)
        client.conn.send_headers(1, [(":method", "GET"), (":path", "/big"), (":scheme", "https"),
                                     (":authority", "localhost")], end_stream=True)
        client.flush()
        received = lambda: sum(len(x.data) for x in client.events if isinstance(x, h2.events.DataReceived))
        client.read_until(lambda _: received() >= 65535)            # the stream's window is spent
        deadline = time.monotonic() + 1.5       # held whole, the origin's 24 MiB would be in the edge by then
        while time.monotonic() < deadline and sent[0] < size // 2:
            time.sleep(0.02)
        assert internals.bytes_held(e.master) < BOUND
        assert sent[0] < size // 2
        got, most = received(), 0
        client.conn.acknowledge_received_data(got, 1)
        client.flush()
        while got < size:                       # now read it all, opening the window as we go
            data = client.sock.recv(65536)
            assert data, "closed early"
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got += len(event.data)
                    client.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            client.flush()
            most = max(most, internals.bytes_held(e.master))
        assert most < BOUND
        client.close()
    finally:
        o.stop()


# -- request bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("max_body, origin_got_some", [("3MB", True), ("512KB", False)])
def test_request_body_over_the_cap(edge, tmp_path, max_body, origin_got_some):
    """A chunked body past max_body gets 413. Under buffer_limit the origin saw nothing; past
    it the body was streaming, and the origin's connection is cut: it got a part, never the
    end. A normal client beside it is served."""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\nshield:\n  max_body: {max_body}\n")

        def body():
            for _ in range(128):                # 8 MiB in all
                yield b"\xee" * 65536

        r = httpx.post(f"{e.url}/upload", content=body(), timeout=10)
        assert r.status_code == 413
        upload = lambda: [c for c in o.connections if c.data.startswith(b"POST")]
        if origin_got_some:
            deadline = time.monotonic() + 5      # the origin's thread may not have read it all yet
            while not (upload() and upload()[0].closed.is_set()) and time.monotonic() < deadline:
                time.sleep(0.01)
            (conn,) = upload()
            assert conn.closed.is_set()                         # cut by the edge
            assert MiB < len(conn.data) < 4 * MiB and not conn.requests     # never a whole request
        else:
            assert not upload()
        assert httpx.get(f"{e.url}/").text == "ok"
        assert any(rec.get("error") == "Request body too large" for rec in log_lines(log, 2))
    finally:
        o.stop()


def test_small_chunked_upload_is_held_whole(edge):
    """Unknown length, under buffer_limit: held, and sent whole (in one chunk: the client's
    chunked coding is kept)."""
    o = RecordingOrigin()
    try:
        e = edge([o.url])
        r = httpx.post(f"{e.url}/form", content=iter([b"a=1", b"&b=2"]), timeout=10)
        assert r.status_code == 200
        (request,) = o.wait_for_requests(1)
        assert request.endswith(b"\r\n\r\n7\r\na=1&b=2\r\n0\r\n\r\n")
    finally:
        o.stop()


@needs_crs
def test_a_body_the_waf_inspects_is_held_whole(edge, tmp_path):
    """With a WAF reading up to 4MB, a 2 MiB form body is held and scored whole (an injection
    at its end is refused before the origin sees a byte); a path the WAF skips streams.
    (Longer bodies: tests/test_waf_partial.py.)"""
    o = RecordingOrigin()
    log = tmp_path / "access.log"
    try:
        e = edge(f"pools: {{p: {{origins: [{o.url}]}}}}\naccess_log: {log}\nshield:\n"
                 f"  waf: {{skip: ['~u /upload'], body_limit: 4MB}}\n")
        body = b"a=" + b"x" * (2 * MiB) + b"&id=1' OR '1'='1"
        form = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Mozilla/5.0", "Accept": "*/*"}
        assert httpx.post(f"{e.url}/form", content=body, headers=form, timeout=20).status_code == 403
        assert not o.connections or not any(c.data for c in o.connections)
        assert httpx.post(f"{e.url}/upload", content=body, headers=form, timeout=20).status_code == 200
        (request,) = o.wait_for_requests(1)
        assert request.endswith(body)
        refused, streamed = log_lines(log, 2)
        assert refused["edge"]["shield"] == "waf: request blocked (403)" and "stream" not in refused["edge"]
        assert streamed["edge"]["stream"] == "request" and streamed["edge"]["waf"] == "skipped"
    finally:
        o.stop()


def test_large_request_body_streams_whole_to_the_origin(edge):
    body = bytes(range(256)) * (3 * MiB // 256)
    o = RecordingOrigin()
    try:
        e = edge([o.url])
        r = httpx.put(f"{e.url}/file", content=body, timeout=10)
        assert r.status_code == 200
        (request,) = o.wait_for_requests(1)
        head, _, sent = request.partition(b"\r\n\r\n")
        assert b"content-length: %d" % len(body) in head.lower() and sent == body
    finally:
        o.stop()


# -- WebSocket -----------------------------------------------------------------------------------

class WsEchoOrigin:
    """A WebSocket origin (wsproto, raw sockets) echoing every message back."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        serve_each(self.sock, self._serve)

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        with conn:
            while data := conn.recv(65536):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wsevents.Request):
                        conn.sendall(ws.send(wsevents.AcceptConnection()))
                    elif isinstance(event, wsevents.Message):
                        conn.sendall(ws.send(type(event)(data=event.data, message_finished=event.message_finished)))
                    elif isinstance(event, wsevents.CloseConnection):
                        conn.sendall(ws.send(event.response()))
                        return

    def stop(self) -> None:
        self.sock.close()


class WebSocketFlows:
    """An embedder's addon (after the stream addon) keeping the WebSocket flows to look at."""

    def __init__(self) -> None:
        self.flows: list = []

    def websocket_start(self, flow) -> None:
        self.flows.append(flow)


def ws_echo(host: str, port: int, count: int, size: int) -> int:
    """Open a WebSocket through the edge, send `count` messages of `size` bytes one by one,
    read each echo; returns the echoed bytes."""
    ws = WSConnection(ConnectionType.CLIENT)
    echoed = 0
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(ws.send(wsevents.Request(host="site.example", target="/ws")))
        events: list = []

        def wait_for(kind):
            while True:
                while events:
                    event = events.pop(0)
                    if isinstance(event, kind):
                        return event
                data = s.recv(65536)
                assert data, "closed"
                ws.receive_data(data)
                events.extend(ws.events())

        wait_for(wsevents.AcceptConnection)
        payload = b"m" * size
        for _ in range(count):
            s.sendall(ws.send(wsevents.BytesMessage(data=payload)))
            got = 0
            while got < size:
                got += len(wait_for(wsevents.BytesMessage).data)
            echoed += got
        s.sendall(ws.send(wsevents.CloseConnection(code=1000)))
        wait_for(wsevents.CloseConnection)
    return echoed


@pytest.mark.parametrize("web", [False, True])
def test_websocket_keeps_no_history(edge, web):
    """Many messages each way: none is kept (under --web, the last WEB_MESSAGES)."""
    o = WsEchoOrigin()
    seen = WebSocketFlows()
    try:
        kw = {"web": True, "web_port": free_port()} if web else {}
        e = edge([o.url], extra_addons=[seen], **kw)
        count = rules.WEB_MESSAGES + 200
        assert ws_echo(e.host, e.port, count, 1000) == count * 1000
        (flow,) = seen.flows
        assert len(flow.websocket.messages) == (rules.WEB_MESSAGES if web else 0)
    finally:
        o.stop()


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("8KB", "x.yaml:2: buffer_limit: at least 16KB"),
    ("lots", "x.yaml:2: buffer_limit: 'lots': expected a size like 512KB, 8MB or 1GB"),
])
def test_buffer_limit_errors_name_the_line(value, message):
    with pytest.raises(ConfigError) as e:
        parse_config(f"pools: {{a: {{origins: ['http://127.0.0.1:1']}}}}\nbuffer_limit: {value}\n", "x.yaml")
    assert str(e.value).startswith(message)


def test_buffer_limit_default_and_value():
    base = "pools: {a: {origins: ['http://127.0.0.1:1']}}\n"
    assert parse_config(base, "x.yaml").buffer_limit == MiB
    assert parse_config(base + "buffer_limit: 4MB\n", "x.yaml").buffer_limit == 4 * MiB
