"""Raw-socket peers for the tests that must see or send exact bytes: an origin that records
every byte it receives per connection and answers from a script, and a client that sends
bytes as they are and reads what comes back. Nothing here parses HTTP for the edge's sake."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: no-store\r\n\r\nok"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r?$")
_CHUNKED = re.compile(rb"(?im)^transfer-encoding:[^\r\n]*chunked")


@dataclass
class Received:
    """One connection as the origin saw it: every byte, and the requests split from them."""
    data: bytearray = field(default_factory=bytearray)
    requests: list[bytes] = field(default_factory=list)     # each: head + body exactly as framed
    closed: threading.Event = field(default_factory=threading.Event)


def split_request(buf: bytes) -> tuple[bytes, int] | None:
    """The first complete request in `buf` (head + body by its framing) and its length, or
    None while incomplete. Framing as an HTTP/1.1 origin reads it: chunked, then
    Content-Length, else no body."""
    m = _HEAD_END.search(buf)
    if m is None:
        return None
    head = buf[:m.end()]
    pos = m.end()
    if _CHUNKED.search(head):
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n\r\n", pos - 2)        # trailers, then the empty line
                return (buf[:end + 4], end + 4) if end >= 0 else None
            pos += size + 2
            if pos > len(buf):
                return None
    lm = _LENGTH.search(head)
    size = int(lm[1]) if lm else 0
    if len(buf) < pos + size:
        return None
    return buf[:pos + size], pos + size


# An answer for one request: bytes to send, None to stay silent, CLOSE to hang up, or an
# iterator of bytes sent piece by piece as it yields them (a trickled or endless answer).
CLOSE = object()
Script = Callable[[bytes], "bytes | None | object | Iterator[bytes]"]


class RecordingOrigin:
    """A TCP origin on 127.0.0.1 that records what each connection sent and answers each
    complete request with `script(request_bytes)` (default: a 2-byte 200)."""

    def __init__(self, script: Script | bytes = OK) -> None:
        self.script: Script = (lambda _: script) if isinstance(script, bytes) else script
        self.connections: list[Received] = []
        self.got_request = threading.Condition()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self._peers: list[socket.socket] = []
        threading.Thread(target=self._accept, name="recording-origin", daemon=True).start()

    @property
    def requests(self) -> list[bytes]:
        """Every complete request received, over all connections, in order of arrival."""
        return [r for c in self.connections for r in c.requests]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.connections)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[bytes]:
        with self.got_request:
            self.got_request.wait_for(lambda: len(self.requests) >= n, timeout)
        return self.requests

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            rec = Received()
            self.connections.append(rec)
            self._peers.append(conn)
            threading.Thread(target=self._serve, args=(conn, rec), daemon=True).start()

    def _serve(self, conn: socket.socket, rec: Received) -> None:
        pending = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                rec.data += chunk
                pending += chunk
                while (found := split_request(pending)) is not None:
                    request, used = found
                    pending = pending[used:]
                    with self.got_request:
                        rec.requests.append(request)
                        self.got_request.notify_all()
                    answer = self.script(request)
                    if answer is CLOSE:
                        return
                    if isinstance(answer, Iterator):
                        for piece in answer:
                            conn.sendall(piece)
                    elif answer:
                        conn.sendall(answer)
        except OSError:
            pass
        finally:
            rec.closed.set()
            conn.close()

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        for peer in self._peers:
            try:
                peer.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.close()


def exchange(host: str, port: int, data: bytes, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send `data` as it is on a new connection; read until the peer closes (or, with
    until_close=False, until one complete response head arrived and its Content-Length body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if not until_close:
                    m = _HEAD_END.search(out)
                    if m:
                        lm = _LENGTH.search(out[:m.end()])
                        if len(out) >= m.end() + (int(lm[1]) if lm else 0):
                            break
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def status_of(response: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(m[1]) if m else None
