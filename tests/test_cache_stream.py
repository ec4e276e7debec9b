"""The cache and streamed bodies: a streamed response is stored while it passes (committed when
complete, never when cut), requests arriving during the fetch read it as it is written, and a
disk entry too large for memory is served from its file with bounded memory, also after a
restart. Through real edges, raw origins and real clients."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import h2.events
import httpx
import pytest

from addons import internals
from addons.cache.policy import ResponseRules
from addons.cache.serve import response_head, ticket_of
from addons.cache.store import Entry, Store
from tests.rawnet import RecordingOrigin
from tests.test_h2_abuse import RawH2
from tests.test_cache_disk import EdgeProcess

MiB = 2**20
BOUND = MiB         # what the edge may hold for one streamed exchange: a few buffers
HOST = {"Host": "shop.example"}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def cacheable(length: int | None, content_type: bytes = b"application/octet-stream") -> bytes:
    framing = b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nCache-Control: max-age=600\r\n"
            + framing + b"\r\n\r\n")


def pieces(size: int, piece: int = 65536) -> list[bytes]:
    return [bytes([i % 251]) * min(piece, size - off) for i, off in enumerate(range(0, size, piece))]


def held(e) -> int:
    return internals.bytes_held(e.master) + e.master.addons.get("edge").cache.origin.bytes_held()


class Gated:
    """An origin script: the head and `before` pieces, then waits for `gate`, then the rest
    (or a hang-up when `cut`). Counts the requests it answered."""

    def __init__(self, head: bytes, parts: list[bytes], before: int, cut: bool = False, chunked: bool = False):
        self.head, self.parts, self.before, self.cut, self.chunked = head, parts, before, cut, chunked
        self.gate, self.sent_first = threading.Event(), threading.Event()

    def __call__(self, _request: bytes):
        def answer():
            yield self.head
            for i, part in enumerate(self.parts):
                if i == self.before:
                    self.sent_first.set()
                    assert self.gate.wait(20)
                    if self.cut:
                        raise OSError("the origin hangs up mid-body")
                yield chunk(part) if self.chunked else part
            if self.chunked:
                yield b"0\r\n\r\n"
        return answer()


def test_a_chunked_cacheable_response_is_stored_while_it_streams(edge):
    body = pieces(3 * MiB)
    o = RecordingOrigin(cacheable(None) + b"".join(chunk(p) for p in body) + b"0\r\n\r\n")
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            first, second = c.get("/live.bin"), c.get("/live.bin")
        assert first.content == second.content == b"".join(body)
        assert first.headers["cache-status"] == 'edge; fwd=uri-miss; fwd-status=200; detail="storing while streamed"'
        assert second.headers["cache-status"].startswith("edge; hit") and len(o.requests) == 1
        assert second.headers["content-length"] == str(3 * MiB)
    finally:
        o.stop()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_cut_streamed_response_is_not_stored(edge, chunked):
    """The origin hangs up mid-body (Content-Length short, or no last chunk): the client's answer
    is cut, nothing is stored, and the next request goes to the origin and gets it whole."""
    body = pieces(4 * MiB)
    script = Gated(cacheable(None if chunked else 4 * MiB), body, before=20, cut=True, chunked=chunked)
    o = RecordingOrigin(script)
    script.gate.set()
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                c.get("/cut.bin")
            script.cut = False
            again = c.get("/cut.bin")
        assert again.content == b"".join(body) and "hit" not in again.headers["cache-status"]
        assert len(o.requests) == 2
    finally:
        o.stop()


def test_a_response_delimited_by_the_close_is_not_stored(edge):
    """Without Content-Length or chunked, a cut looks like the end: such a body is never stored."""
    body = b"q" * (2 * MiB)

    def until_close(_request: bytes):
        yield b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n" + body
        raise OSError("the end of the body is the close")
    o = RecordingOrigin(lambda request: until_close(request))
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            first = c.get("/eof.bin")
            second = c.get("/eof.bin")
        assert first.content == second.content == body
        assert first.headers["cache-status"].endswith('detail="not stored: no framing"')
        assert len(o.requests) == 2
    finally:
        o.stop()


def test_requests_during_a_fetch_read_the_object_as_it_is_written(edge):
    """A second and third client ask while the origin is still sending: they get the head and
    the bytes so far before the origin sends the rest (read-while-writer), then all of it;
    the origin is asked once. (This origin offers no byte ranges, so the cache cannot take
    the fetch over: the fill goes at the pace of the client that fetches it, which reads too.)"""
    body = pieces(6 * MiB)
    script = Gated(cacheable(6 * MiB), body, before=16)
    o = RecordingOrigin(script)
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as a, httpx.Client(base_url=e.url, headers=HOST) as b, \
                httpx.Client(base_url=e.url, headers=HOST) as d:
            with a.stream("GET", "/popular.bin") as first:
                first_rest = first.iter_bytes()
                got_a = [next(first_rest)]
                assert script.sent_first.wait(10)
                with b.stream("GET", "/popular.bin") as second, d.stream("GET", "/popular.bin") as third:
                    assert second.headers["cache-status"] == 'edge; hit; detail="read while stored"'
                    assert second.headers["content-length"] == str(6 * MiB)
                    rest = second.iter_bytes()
                    early = next(rest)                      # before the origin sent the rest
                    assert early and not script.gate.is_set()
                    script.gate.set()
                    reader = threading.Thread(target=lambda: got_a.extend(first_rest))
                    reader.start()
                    got_b = early + b"".join(rest)
                    got_d = third.read()
                    reader.join(20)
        whole = b"".join(body)
        assert b"".join(got_a) == got_b == got_d == whole
        assert len(o.requests) == 1
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            assert c.get("/popular.bin").headers["cache-status"].startswith("edge; hit")
    finally:
        script.gate.set()
        o.stop()


def test_a_failed_fetch_cuts_its_readers_and_stores_nothing(edge):
    body = pieces(4 * MiB)
    script = Gated(cacheable(4 * MiB), body, before=8, cut=True)
    o = RecordingOrigin(script)
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as a, httpx.Client(base_url=e.url, headers=HOST) as b:
            with a.stream("GET", "/fragile.bin") as first:
                first_rest = first.iter_bytes()
                next(first_rest)
                assert script.sent_first.wait(10)
                with b.stream("GET", "/fragile.bin") as second:
                    assert "read while stored" in second.headers["cache-status"]
                    script.gate.set()
                    with pytest.raises(httpx.RemoteProtocolError):
                        b"".join(second.iter_bytes())   # cut, never completed with bytes missing
                with pytest.raises(httpx.RemoteProtocolError):
                    b"".join(first_rest)
        script.cut = False
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            again = c.get("/fragile.bin")
        assert again.content == b"".join(body) and "hit" not in again.headers["cache-status"]
        assert len(o.requests) == 2
    finally:
        script.gate.set()
        o.stop()


def disk_config(o, folder) -> str:
    return (f"pools: {{eu: {{origins: [{o.url}]}}}}\n"
            f"cache: {{max_size: 4MB, max_object: 1MB, disk: {{path: {folder}, max_size: 200MB}}}}\n")


def test_a_large_disk_hit_streams_from_its_file_with_bounded_memory(edge, tmp_path):
    size = 24 * MiB
    body = b"".join(pieces(size))
    o = RecordingOrigin(cacheable(size) + body)
    try:
        e = edge(disk_config(o, tmp_path / "cache"))
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            assert c.get("/video.mp4").content == body
            ranged = c.get("/video.mp4", headers={"Range": "bytes=5000000-5999999"})
            head = c.head("/video.mp4")
        assert ranged.status_code == 206 and ranged.content == body[5_000_000:6_000_000]
        assert ranged.headers["content-range"] == f"bytes 5000000-5999999/{size}"
        assert head.headers["content-length"] == str(size) and head.content == b""
        with socket.socket() as s:              # a slow reader of the disk hit
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.settimeout(10)
            s.connect((e.host, e.port))
            s.sendall(b"GET /video.mp4 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            got, most, digest = b"", 0, hashlib.sha256()
            while b"\r\n\r\n" not in got:
                got += s.recv(16384)
            head_bytes, rest = got.split(b"\r\n\r\n", 1)
            assert b"cache-status: edge; hit" in head_bytes.lower()
            digest.update(rest)
            received = len(rest)
            while received < size:
                data = s.recv(16384)
                assert data, "closed early"
                digest.update(data)
                received += len(data)
                most = max(most, held(e))
        assert most < BOUND, most
        assert digest.digest() == hashlib.sha256(body).digest()
        assert len(o.requests) == 1
    finally:
        o.stop()


def test_a_disk_entry_filled_while_streaming_survives_a_restart(tmp_path):
    size = 12 * MiB
    body = b"".join(pieces(size))
    o = RecordingOrigin(cacheable(None) + b"".join(chunk(p) for p in pieces(size)) + b"0\r\n\r\n")
    try:
        config = disk_config(o, tmp_path / "cache")
        first = EdgeProcess(tmp_path, config)
        try:
            with httpx.Client(base_url=first.url, headers=HOST) as c:
                assert c.get("/big.iso").content == body
        finally:
            first.stop()
        second = EdgeProcess(tmp_path, config)
        try:
            with httpx.Client(base_url=second.url, headers=HOST) as c:
                hit = c.get("/big.iso")
        finally:
            second.stop()
        assert hit.content == body and hit.headers["cache-status"].startswith("edge; hit")
        assert len(o.requests) == 1
    finally:
        o.stop()


def test_a_streamed_compressible_response_stores_the_origin_bytes_and_the_coding(edge):
    """br streamed to the first client: the origin's identity body and the br made on the way are
    both stored, so br, gzip and identity clients after it cost no origin fetch."""
    text = b"".join(b"line %d of a large text document that compresses\n" % i for i in range(80_000))
    o = RecordingOrigin(cacheable(None, b"text/plain") + chunk(text[:MiB]) + chunk(text[MiB:]) + b"0\r\n\r\n")
    try:
        e = edge([o.url])
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            def get(coding):
                return c.get("/doc.txt", headers={"Accept-Encoding": coding})
            first, br, gz, plain = get("br"), get("br"), get("gzip"), get("identity")
        # (httpx undoes the coding: .content is the text when the br was right)
        assert first.headers["content-encoding"] == "br" and first.content == text
        assert br.headers["cache-status"].startswith("edge; hit") and br.headers["content-encoding"] == "br"
        assert br.content == text
        assert int(br.headers["content-length"]) < len(text) // 4             # the stored coding, framed
        assert gz.headers["content-encoding"] == "gzip" and gz.content == text       # made from the base
        assert plain.content == text and "content-encoding" not in plain.headers
        assert all(r.headers["cache-status"].startswith("edge; hit") for r in (br, gz, plain))
        assert len(o.requests) == 1
    finally:
        o.stop()


def test_the_store_origin_answers_only_a_ticket_once(edge):
    """The in-process server that streams stored bodies sends nothing without a ticket the
    cache issued, and a ticket serves once."""
    body = b"".join(pieces(2 * MiB))
    o = RecordingOrigin(cacheable(len(body)) + body)
    try:
        e = edge([o.url])
        store_origin = e.master.addons.get("edge").cache.origin
        host, port = store_origin.address
        assert host == "127.0.0.1"
        for request in (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
                        b"GET /x HTTP/1.1\r\nHost: a\r\nEdge-Cache-Ticket: guessed\r\n\r\n"):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(request)
                assert s.recv(100) == b""           # closed, nothing sent
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            assert c.get("/a.bin").content == body
        assert store_origin.tickets == {}
    finally:
        o.stop()


# -- pure parts ----------------------------------------------------------------------------------

def test_response_head_frames_the_answer_itself():
    fields = ((b"Content-Length", b"99"), (b"Transfer-Encoding", b"chunked"), (b"ETag", b'"a"'))
    assert response_head(206, b"Partial Content", fields, 10) == \
        b'HTTP/1.1 206 Partial Content\r\nETag: "a"\r\ncontent-length: 10\r\n\r\n'
    assert response_head(200, b"OK", fields, None).endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert ticket_of(b"GET / HTTP/1.1\r\nHost: a\r\nedge-cache-TICKET:  t0k \r\n\r\n") == "t0k"
    assert ticket_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") is None


def test_bodies_stored_while_streamed_share_a_memory_budget(edge):
    """Many slow downloads of large cacheable objects at once cannot fill memory: what memory
    fills hold together is capped (a quarter of cache.max_size, at least max_object). Past it,
    a response streams unstored, whole for its client."""
    first_body, second_body = pieces(3 * MiB), [b"s" * 65536] * 48
    gated = Gated(cacheable(3 * MiB), first_body, before=4)

    def script(request: bytes):
        if b"/one.bin" in request:
            return gated(request)
        return cacheable(3 * MiB) + b"".join(second_body)
    o = RecordingOrigin(script)
    try:
        e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{max_size: 8MB, max_object: 4MB}}\n")
        with httpx.Client(base_url=e.url, headers=HOST) as a, httpx.Client(base_url=e.url, headers=HOST) as b:
            with a.stream("GET", "/one.bin") as first:
                rest = first.iter_bytes()
                got = [next(rest)]
                assert gated.sent_first.wait(10)
                second = b.get("/two.bin")              # while /one.bin holds 3 of the 4 MiB budget
                gated.gate.set()
                got.extend(rest)
            assert second.content == b"".join(second_body)
            assert second.headers["cache-status"].endswith('detail="not stored: no room to store it while streamed"')
            assert b"".join(got) == b"".join(first_body)
            assert a.get("/one.bin").headers["cache-status"].startswith("edge; hit")
            assert e.master.addons.get("edge").cache.store.filling == 0
    finally:
        gated.gate.set()
        o.stop()


def test_memory_fills_reserve_their_length_and_release_it():
    store = Store(8 * MiB, 4 * MiB)                       # fill budget: 4 MiB
    known = store.writer("http://a/known", 3 * MiB)
    assert store.filling == 3 * MiB and store.writer("http://a/more", 2 * MiB) is None
    assert store.writer("http://a/huge", 5 * MiB) is None     # past max_object
    unknown = store.writer("http://a/chunked")
    assert unknown.write(b"x" * MiB) and store.filling == 4 * MiB
    assert not unknown.write(b"x") and store.filling == 3 * MiB     # past the budget: given up, released
    assert known.write(b"k" * (3 * MiB)) and store.filling == 3 * MiB  # within what it reserved
    assert known.commit(entry_for(store)) and store.filling == 0
    assert store.lookup("http://a/known", {})[0].body == b"k" * (3 * MiB)


def entry_for(store: Store) -> Entry:
    return Entry(200, b"OK", ((b"Content-Type", b"x/y"),), {"content-type": "x/y"}, b"", 1.0, 1.0,
                 ResponseRules({}, False), 60.0, ())


# -- a fill whose fetcher stops feeding it ---------------------------------------------------------

class Ranged:
    """An origin of one object with byte ranges and a strong ETag: the first answer is sent up to
    `before` pieces, then waits for `gate` (when set); a Range request gets the rest as a 206."""

    def __init__(self, parts: list[bytes], before: int | None = None) -> None:
        self.body = b"".join(parts)
        self.parts, self.before = parts, before
        self.gate, self.sent_first = threading.Event(), threading.Event()
        self.ranges: list[bytes] = []

    def __call__(self, request: bytes):
        head = request.split(b"\r\n\r\n", 1)[0].lower()
        fields = (b"Content-Type: application/octet-stream\r\nCache-Control: max-age=600\r\n"
                  b"Accept-Ranges: bytes\r\nETag: \"v1\"\r\n")
        if b"\r\nrange: bytes=" in head:
            first = int(head.split(b"\r\nrange: bytes=", 1)[1].split(b"-", 1)[0])
            self.ranges.append(head)
            rest = self.body[first:]
            return (b"HTTP/1.1 206 Partial Content\r\n" + fields +
                    b"Content-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n\r\n"
                    % (first, len(self.body) - 1, len(self.body), len(rest)) + rest)

        def answer():
            yield b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: %d\r\n\r\n" % len(self.body)
            for i, part in enumerate(self.parts):
                if i == self.before:
                    self.sent_first.set()
                    self.gate.wait(20)
                yield part
        return answer()


def test_readers_get_the_whole_object_when_its_fetcher_hangs_up(edge):
    """The client whose request fetches the object leaves mid-body while another reads it: the
    cache fetches the rest itself (Range from where the fill stopped, If-Range its ETag), so the
    reader gets every byte and the object is stored."""
    parts = pieces(6 * MiB)
    script = Ranged(parts, before=12)
    o = RecordingOrigin(script)
    try:
        e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{max_size: 64MB, max_object: 16MB}}\n")
        leaver = socket.create_connection((e.host, e.port), timeout=10)
        leaver.sendall(b"GET /movie.mp4 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        assert leaver.recv(65536).startswith(b"HTTP/1.1 200")
        assert script.sent_first.wait(10)
        with httpx.Client(base_url=e.url, headers=HOST) as b:
            with b.stream("GET", "/movie.mp4") as reader:
                assert "read while stored" in reader.headers["cache-status"]
                rest = reader.iter_bytes()
                got = next(rest)
                leaver.close()                          # the fetcher's client hangs up
                got += b"".join(rest)
            assert got == script.body
            assert b.get("/movie.mp4").headers["cache-status"].startswith("edge; hit")
        assert len(script.ranges) == 1 and b'if-range: "v1"' in script.ranges[0]
        assert len(o.requests) == 2
    finally:
        script.gate.set()
        o.stop()


def test_a_slow_fetcher_does_not_hold_back_the_readers(edge):
    """The fetching client stops reading (its relay pauses the origin read): a reader that
    waits on the fill for a second gets the rest fetched by the cache, at the origin's pace,
    while the slow client goes on at its own."""
    parts = pieces(8 * MiB)
    script = Ranged(parts)
    o = RecordingOrigin(script)
    try:
        e = edge(f"pools: {{eu: {{origins: [{o.url}]}}}}\ncache: {{max_size: 64MB, max_object: 16MB}}\n")
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            slow.settimeout(20)
            slow.connect((e.host, e.port))
            slow.sendall(b"GET /iso HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            first = slow.recv(16384)                # then it reads nothing for a while
            assert first.startswith(b"HTTP/1.1 200")
            with httpx.Client(base_url=e.url, headers=HOST, timeout=20) as b:
                fast = b.get("/iso")
            assert fast.content == script.body and "read while stored" in fast.headers["cache-status"]
            assert len(script.ranges) == 1
            got = bytearray(first.split(b"\r\n\r\n", 1)[1])
            while len(got) < len(script.body):              # the slow client still gets its own, whole
                data = slow.recv(1 << 20)
                assert data
                got += data
            assert bytes(got) == script.body
    finally:
        o.stop()


def test_content_range_parsing():
    from addons.cache.policy import content_range
    assert content_range("bytes 100-199/1000") == (100, 199, 1000)
    assert content_range("bytes 0-0/*") == (0, 0, None)
    for bad in ("bytes */1000", "items 0-1/2", "bytes 5-4/10", "bytes 0-10/10", "bytes -1-2/3", "", "bytes 1-2"):
        assert content_range(bad) is None, bad


def test_a_coding_made_from_a_disk_base_is_kept_as_its_variant(edge, tmp_path):
    """An identity client stores the base; a br client's hit is encoded as it streams from the
    file and that br is stored; the next br client gets the stored br (framed by its length)."""
    text = b"".join(b"row %d of a large text file kept on disk\n" % i for i in range(100_000))
    o = RecordingOrigin(cacheable(len(text), b"text/plain") + text)
    try:
        e = edge(disk_config(o, tmp_path / "cache"))
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            def get(coding):
                return c.get("/big.txt", headers={"Accept-Encoding": coding})
            plain, made, kept = get("identity"), get("br"), get("br")
        assert plain.content == made.content == kept.content == text       # httpx undoes the br
        assert made.headers["content-encoding"] == kept.headers["content-encoding"] == "br"
        assert "content-length" not in made.headers                           # encoded on the way
        assert int(kept.headers["content-length"]) < len(text) // 4          # the stored variant
        assert all(r.headers["cache-status"].startswith("edge; hit") for r in (made, kept))
        assert len(o.requests) == 1
    finally:
        o.stop()


def test_a_large_disk_entry_is_refreshed_by_a_304(edge, tmp_path):
    """A stale disk entry too large for memory is revalidated: the 304 answers from the file,
    and the refreshed head (copied with the body in a thread) is what the next hit carries."""
    body = b"".join(pieces(3 * MiB))
    answers = iter([
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nETag: \"e1\"\r\nX-Version: 1\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
        b"HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=600\r\nETag: \"e1\"\r\nX-Version: 2\r\n\r\n",
    ])
    o = RecordingOrigin(lambda request: next(answers))
    try:
        e = edge(disk_config(o, tmp_path / "cache"))
        cache = e.master.addons.get("edge").cache
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            first = c.get("/report.bin")
            revalidated = c.get("/report.bin")
            assert revalidated.content == body and revalidated.headers["x-version"] == "2"
            assert b'if-none-match: "e1"' in o.requests[1].lower()
            deadline = time.monotonic() + 10
            while cache.tasks and time.monotonic() < deadline:       # the copy in its thread
                time.sleep(0.05)
            hit = c.get("/report.bin")
        assert first.content == body
        assert hit.headers["cache-status"].startswith("edge; hit") and hit.headers["x-version"] == "2"
        assert hit.content == body and len(o.requests) == 2
    finally:
        o.stop()


def test_a_large_disk_entry_that_changed_is_read_while_the_new_one_is_stored(edge, tmp_path):
    old, new = b"".join(pieces(3 * MiB)), b"N" * (3 * MiB)
    answers = iter([
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nETag: \"e1\"\r\nContent-Length: %d\r\n\r\n" % len(old) + old,
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"e2\"\r\nContent-Length: %d\r\n\r\n" % len(new) + new,
    ])
    o = RecordingOrigin(lambda request: next(answers))
    try:
        e = edge(disk_config(o, tmp_path / "cache"))
        with httpx.Client(base_url=e.url, headers=HOST) as c:
            first, changed, hit = c.get("/data.bin"), c.get("/data.bin"), c.get("/data.bin")
        assert first.content == old and changed.content == new and hit.content == new
        assert changed.headers["etag"] == '"e2"' and "read while stored" in changed.headers["cache-status"]
        assert hit.headers["cache-status"].startswith("edge; hit") and len(o.requests) == 2
    finally:
        o.stop()


def test_http2_clients_read_disk_hits(edge, tls, tmp_path):
    """Over HTTP/2 (TLS, ALPN h2): a disk hit and a range of it on two streams of one connection,
    each whole and exact, read with the client's flow control."""
    size = 10 * MiB
    body = b"".join(pieces(size))
    o = RecordingOrigin(cacheable(size) + body)
    try:
        e = edge(disk_config(o, tmp_path / "cache"), cert=str(tls.pem))
        with httpx.Client(verify=tls.client_context(), headers=HOST) as c:
            assert c.get(f"https://127.0.0.1:{e.port}/clip.mp4").content == body       # stored on disk
        client = RawH2(e, tls)
        for stream, extra in ((1, []), (3, [("range", "bytes=1000000-1999999")])):
            client.conn.send_headers(stream, [(":method", "GET"), (":path", "/clip.mp4"), (":scheme", "https"),
                                              (":authority", "shop.example"), *extra], end_stream=True)
        client.flush()
        got: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}
        heads: dict[int, dict] = {}
        ended: set[int] = set()
        while ended != {1, 3}:
            data = client.sock.recv(65536)
            assert data, "closed early"
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    heads[event.stream_id] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    got[event.stream_id] += event.data
                    client.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            client.flush()
        client.close()
        assert heads[1][b":status"] == b"200" and heads[1][b"cache-status"].startswith(b"edge; hit")
        assert heads[3][b":status"] == b"206"
        assert bytes(got[1]) == body and bytes(got[3]) == body[1_000_000:2_000_000]
        assert len(o.requests) == 1
    finally:
        o.stop()
