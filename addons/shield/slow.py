"""Deadlines per client connection against slow clients (slowloris, slow POST, idle keep-alive).
Pure bookkeeping: the addon sweeps `expired()` and closes those connections.

mitmproxy's tcp_timeout is an idle timer that every received byte resets, so a client sending a
byte a second never hits it. These deadlines are absolute: a head must be complete within
`request_headers` of the connection (or of the previous response), a body within `request_body`
of its head, whatever trickles in meanwhile.

HTTP/2 multiplexes requests on one connection, so its deadlines are per stream: each stream's
body must be complete within `request_body` of its head, and a connection with no open stream
is idle (the same `idle` + `request_headers` as a keep-alive HTTP/1 connection). A stream that
misses its deadline closes the connection, as a slow HTTP/1 body does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Deadlines:
    request_headers: float
    request_body: float
    idle: float
    due: dict[str, tuple[float, str]] = field(default_factory=dict)    # connection id -> (when, why)
    streams: dict[str, dict[str, float]] = field(default_factory=dict)  # HTTP/2: connection -> open stream -> body due

    def connected(self, conn: str, now: float) -> None:
        self.due[conn] = (now + self.request_headers, "request headers timeout")

    def head_received(self, conn: str, now: float, body_expected: bool) -> None:
        if body_expected:
            self.due[conn] = (now + self.request_body, "request body timeout")
        else:
            self.due.pop(conn, None)

    def body_received(self, conn: str) -> None:
        self.due.pop(conn, None)

    def answered(self, conn: str, now: float) -> None:
        """Keep-alive: the next request head must be complete within idle + request_headers."""
        self.due[conn] = (now + self.idle + self.request_headers, "idle timeout")

    def stream_opened(self, conn: str, stream: str, now: float, body_expected: bool) -> None:
        """HTTP/2: while a stream is open the connection is not idle."""
        self.due.pop(conn, None)
        self.streams.setdefault(conn, {})[stream] = now + self.request_body if body_expected else math.inf

    def stream_body_received(self, conn: str, stream: str) -> None:
        if stream in (open_ := self.streams.get(conn, {})):
            open_[stream] = math.inf

    def stream_closed(self, conn: str, stream: str, now: float) -> None:
        open_ = self.streams.get(conn)
        if open_ is None or open_.pop(stream, None) is None:
            return
        if not open_:
            del self.streams[conn]
            self.answered(conn, now)

    def forget(self, conn: str) -> None:
        self.due.pop(conn, None)
        self.streams.pop(conn, None)

    def expired(self, now: float) -> list[tuple[str, str]]:
        out = [(conn, why) for conn, (when, why) in self.due.items() if when <= now]
        out += [(conn, "request body timeout") for conn, open_ in self.streams.items() if min(open_.values()) <= now]
        for conn, _ in out:
            self.forget(conn)
        return out
